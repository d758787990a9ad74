"""What logprobs cost on the embedded engine: output tokens/s of the same load with
`logprobs: 5` (each token's logprob and the top 5, OpenAI's shape) and without, measured
by vLLM's own benchmark client (`vllm bench serve`, in its own process: random prompts,
ignore_eos so both sides decode the same number of tokens) against one server, windows
alternating.
Target: logprobs cost at most 10% (ratio on / off >= 0.9).

    python -m bench.logprobs              # 300M Llama, 8 concurrent, 32 prompts x 32 tokens, 3 repeats
    python -m bench.logprobs --quick      # tiny model, seconds

Needs vLLM installed (its benchmark client), not a vLLM engine: the server is the
embedded one. The logprob work is one log_softmax and one top-k per decoded token per row
(on the raw logits), plus the reply's larger JSON.
"""
from __future__ import annotations

from . import common as C
from .vs_vllm import client

PROG = "logprobs"


def run(args) -> C.Result:
    m = C.models(args)
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, embedded engine, {args.concurrency} concurrent, "
                                               f"{args.prompts} prompts x {args.tokens} tokens")
    ratios, tps = [], {"off": [], "on": []}
    with C.serving(m, donor_name=None, served_model_name="bench", probes=[], max_batch_size=16) as (server, _):
        run_one = lambda lp: client(server.http_port, m.target, args.prompts, args.concurrency, args.tokens,  # noqa: E731
                                    input_len=16, logprobs=lp)
        run_one(None)                                                   # warm-up
        for i in range(args.repeats):
            t = {}
            for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                t[side] = run_one(5 if side == "on" else None)["output_throughput"]
                tps[side].append(round(t[side], 1))
            ratios.append(t["on"] / t["off"])
    res.add("tokens/s with logprobs=5 / without", ">= 0.9", ratios)
    res.details.update(output_tokens_per_s=tps)
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.prompts, args.tokens = 2, 8, 8
    return run(args)


if __name__ == "__main__":
    main()
