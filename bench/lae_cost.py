"""Activation analysis cost: LAE on donor and target against plain greedy decoding of
the same prompts on both models. Target: at most 1.5x.

    python -m bench.lae_cost              # 300M Llama, 8 prompts x 8 steps, 3 repeats
    python -m bench.lae_cost --quick      # tiny model, seconds

Both sides decode the same prompts in one batch with the same step budget; LAE adds a
forward hook on every transplantable module (168 on the 300M model) and the scoring.
The order of the two sides alternates between repeats. The "teacher_forced" alignment
is measured too (the donor reads the target's tokens in one forward pass instead of
decoding).
"""
from __future__ import annotations

from . import common as C

PROG = "lae_cost"


def run(args) -> C.Result:
    from transplant_core import lae
    from transplant_core.arch import build_table
    from transplant_core.checkpoint import load_model
    from transplant_core.generation import greedy

    m = C.models(args)
    target, tok, _ = load_model(m.target)
    donor, _, _ = load_model(m.donor)
    table = build_table(target)
    ps = C.prompts(args.prompts)
    T = args.max_new_tokens
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, {len(ps)} prompts x {T} steps, "
                                               f"{len(table.modules)} modules hooked")

    def plain():
        greedy(target, tok, ps, T)
        greedy(donor, tok, ps, T)

    def analysis(alignment):
        return lambda: lae.analyze(target, donor, tok, table, ps, T, alignment)

    plain(), analysis("free")()                      # warm-up (page faults, allocator)
    ratios = {"free": [], "teacher_forced": []}
    secs = {"plain": [], "free": [], "teacher_forced": []}
    for i in range(args.repeats):
        order = ["plain", "free", "teacher_forced"] if i % 2 == 0 else ["teacher_forced", "free", "plain"]
        t = {}
        for name in order:
            fn = plain if name == "plain" else analysis(name)
            t[name] = C.in_thread(lambda: C.seconds(fn))
            secs[name].append(round(t[name], 3))
        for a in ratios:
            ratios[a].append(t[a] / t["plain"])
    res.add("LAE (free) / greedy on both models", "<= 1.5", ratios["free"])
    res.add("LAE (teacher_forced) / greedy on both", "report", ratios["teacher_forced"])
    res.details.update({f"{k}_s": v for k, v in secs.items()})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 2
    return run(args)


if __name__ == "__main__":
    main()
