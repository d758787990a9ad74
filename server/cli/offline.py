"""The offline commands of `transplant`: zoo, inspect, compat, analyze, eval and apply.
Each calls transplant_core, importing it (and torch) only when it runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import _emit, _fmt_bytes, _progress


# ---- zoo -----------------------------------------------------------------------------

def cmd_zoo_build(args) -> int:
    from transplant_core import zoo

    root = Path(args.out) if args.out else None
    summary = zoo.build(root=root, progress=not args.quiet, force=args.force,
                        log=(lambda *a, **k: print(*a, file=sys.stderr)))
    _emit(args, summary, lambda d: print(json.dumps(d, indent=2, default=str)))
    return 0


def cmd_zoo_variant(args) -> int:
    from transplant_core import zoo
    from transplant_core.errors import InvalidArgument

    if args.seed < 0:
        raise InvalidArgument("--seed must be >= 0")
    out = zoo.build_variant(args.stage, args.seed, out=Path(args.out) if args.out else None,
                            progress=not args.quiet, log=lambda *a: print(*a, file=sys.stderr))
    card = json.loads((out / "card.json").read_text())
    _emit(args, {"stage": args.stage, "seed": args.seed, "path": str(out), "accuracy": card.get("accuracy")},
          lambda d: print(d["path"]))
    return 0


def cmd_zoo_deep(args) -> int:
    from transplant_core import zoo

    out = zoo.build_deep(out=Path(args.out) if args.out else None, progress=not args.quiet,
                         log=lambda *a: print(*a, file=sys.stderr))
    doc = {"path": str(out), "models": {s: str(out / s) for s in ("v1", "v2")},
           "accuracy": {s: json.loads((out / s / "card.json").read_text())["accuracy"] for s in ("v1", "v2")}}
    _emit(args, doc, lambda d: print(d["path"]))
    return 0


def cmd_zoo_list(args) -> int:
    from transplant_core import zoo

    root = zoo.zoo_root()
    doc = {"root": str(root), "built": zoo.is_built(), "models": list(zoo.MODEL_NAMES),
           "tasks": list(zoo.TASK_NAMES), "settings": zoo.SETTINGS}
    _emit(args, doc, lambda d: print(
        f"zoo at {d['root']} ({'built' if d['built'] else 'not built: run `transplant zoo build`'})\n"
        f"models: {', '.join('zoo:' + m for m in d['models'])}\n"
        f"tasks:  {', '.join('zoo:' + t for t in d['tasks'])}\n"
        + "\n".join(f"setting {k}: target zoo:{v['target']}, donor zoo:{v['donor']}, task zoo:{v['task']}"
                    for k, v in d["settings"].items())))
    return 0


def cmd_zoo_export_task(args) -> int:
    from transplant_core.tasks import load_task, write_jsonl

    task = load_task(args.task if args.task.startswith("zoo:") else "zoo:" + args.task, n=args.n, split=args.split)
    write_jsonl(task, Path(args.out))
    print(f"wrote {len(task)} examples of {task.name} ({args.split}) to {args.out}", file=sys.stderr)
    return 0


# ---- offline method ------------------------------------------------------------------

def _hub_note(spec: str, path) -> str | None:
    """Which snapshot a Hugging Face cache folder (models--ORG--NAME) given as a spec stands for."""
    from transplant_core.checkpoint import describe_hub

    return describe_hub(path) if not spec.startswith("zoo:") and Path(spec).name != Path(path).name else None


def cmd_inspect(args) -> int:
    from transplant_core.workflow import open_donor

    ck = open_donor(args.model, args.allow_pickle)
    mods = [{"name": str(m.ref), "kind": m.ref.kind, "group": m.ref.group, "path": m.path,
             "shape": list(m.out_in), "stored_shape": list(m.weight_shape), "bias": m.bias_key is not None,
             "dtype": m.dtype, "bytes": m.nbytes} for m in (ck.table[r] for r in ck.table.refs())]
    doc = {"model": args.model, "path": str(ck.path), "arch": ck.table.arch, "table": ck.table.source,
           "layers": ck.table.num_layers, "vocab_size": ck.table.vocab_size, "modules": mods,
           "transplantable_bytes": sum(m["bytes"] for m in mods), "weight_file_bytes": ck.weight_bytes,
           "not_transplantable": list(ck.table.skipped)}
    if note := _hub_note(args.model, ck.path):
        doc["snapshot"] = note

    def human(d):
        print(f"{d['model']} -> {d['path']}" + (f" ({d['snapshot']})" if "snapshot" in d else "")
              + f"\n{d['arch']} ({d['table']}), {d['layers']} layers, "
              f"vocab {d['vocab_size']}, {len(mods)} transplantable modules "
              f"({_fmt_bytes(d['transplantable_bytes'])} of {_fmt_bytes(d['weight_file_bytes'])})")
        wn = max([24] + [len(m["name"]) + 2 for m in mods])            # long names keep the columns
        ws = max([18] + [len("x".join(map(str, m["shape"]))) + 2 for m in mods])
        print(f"{'name':<{wn}}{'group':<11}{'shape (out x in)':<{ws}}{'bias':<6}{'dtype':<10}bytes")
        for m in mods:
            print(f"{m['name']:<{wn}}{m['group']:<11}{'x'.join(map(str, m['shape'])):<{ws}}"
                  f"{'yes' if m['bias'] else 'no':<6}{m['dtype']:<10}{_fmt_bytes(m['bytes'])}")
        if d["not_transplantable"]:
            print(f"not transplantable (per layer): {', '.join(d['not_transplantable'])}")
    _emit(args, doc, human)
    return 0


def cmd_compat(args) -> int:
    from transplant_core.compat import check
    from transplant_core.workflow import open_donor

    t, d = open_donor(args.target, args.allow_pickle), open_donor(args.donor, args.allow_pickle)
    report = check(t.table, d.table)
    doc = dict(report.to_dict(), target=args.target, donor=args.donor,
               not_transplantable=sorted(set(t.table.skipped) | set(d.table.skipped)))

    def human(x):
        verdict = "compatible" if x["ok"] else ("partly compatible" if x["usable"] else "NOT compatible")
        print(f"{x['target']} <- {x['donor']}: {verdict}; {len(x['compatible'])} transplantable module pairs")
        for m in x["mismatches"]:
            print(f"  mismatch: {m}")
        if x["not_transplantable"]:
            print(f"  skipped, not transplantable (per layer): {', '.join(x['not_transplantable'])}")
    _emit(args, doc, human)
    return 0 if report.ok else 1


def _load_pair(args):
    from transplant_core.workflow import compatibility, open_model

    from transplant_core.checkpoint import parse_dtype

    dtype = parse_dtype(getattr(args, "dtype", None))
    target, donor = open_model(args.target, args.allow_pickle, dtype), open_model(args.donor, args.allow_pickle, dtype)
    return target, donor, compatibility(target.table, donor.table)


def _analysis(args, target, donor, report):
    """The ranking of args.selector (with "all": the comparison's choice) and the
    comparison (None unless "all")."""
    from transplant_core.errors import InvalidArgument
    from transplant_core.tasks import selection_task
    from transplant_core.workflow import compare, rank

    task = selection_task(args.task, n=args.n)       # the server's split too: the same task and K, the same modules
    selector, comparison = args.selector, None
    if selector == "all":
        if not args.k:
            raise InvalidArgument("--selector all compares the selectors' top-K: give --k")
        print(f"comparing selectors on {len(task)} probe prompts ...", file=sys.stderr)
        comparison = compare(target.model, target.tokenizer, target.table, donor.model, task, report,
                             args.max_new_tokens, args.k)
        selector = comparison.chosen
    with _progress(len(task), f"{selector} analysis", args.quiet) as tick:
        return rank(target.model, target.tokenizer, target.table, donor.model, task, report, args.max_new_tokens,
                    selector, args.alignment, k=args.k, progress=tick), comparison


def _comparison_doc(c) -> dict:
    return {} if c is None else {"comparison": {"k": c.k, "baseline_loss": c.baseline_loss, "chosen": c.chosen,
                                                "why": c.why, "selectors": c.rows}}


def _print_comparison(c) -> None:
    print(f"selectors compared at K={c['k']} (loss of the donor's answers, nothing transplanted: "
          f"{c['baseline_loss']:.4f}):")
    for row in c["selectors"]:
        mark = "*" if row["selector"] == c["chosen"] else " "
        print(f" {mark}{row['selector']:<12}loss {row['loss']:.4f}   {row['seconds']:.2f} s   {row['description']}")
    print(f"chosen: {c['chosen']}: {c['why']}")


def cmd_analyze(args) -> int:
    from transplant_core.plot import score_heatmap

    target, donor, report = _load_pair(args)
    a, comparison = _analysis(args, target, donor, report)
    doc = dict(a.to_dict(), target=args.target, donor=args.donor, task=args.task, **_comparison_doc(comparison))
    if args.k:
        doc["selected"] = [m["name"] for m in doc["modules"][:args.k]]
    if args.plot:
        doc["plot"] = str(score_heatmap(a.scores, Path(args.plot),
                                        f"{a.selector}: {args.donor} vs {args.target} on {args.task}"))

    def human(x):
        if "comparison" in x:
            _print_comparison(x["comparison"])
        print(f"{x['selector']} {x['target']} <- {x['donor']} on {x['task']}: {x['prompts']} prompts"
              + (f", {x['valid_steps']} prompt-steps, alignment {x['alignment']}" if x["selector"] == "lae" else
                 f", {x['seconds']:.2f} s"))
        for i, m in enumerate(x["modules"][:args.k or len(x["modules"])], 1):
            print(f"{i:>4}  {m['name']:<24}{m['score']:.6f}")
        if args.plot:
            print(f"plot: {x['plot']}")
    _emit(args, doc, human)
    return 0


def cmd_eval(args) -> int:
    from transplant_core.evaluate import evaluate
    from transplant_core.tasks import load_task
    from transplant_core.workflow import open_model

    from transplant_core.checkpoint import parse_dtype

    m = open_model(args.model, args.allow_pickle, parse_dtype(args.dtype))
    task = load_task(args.task, n=args.n, split=args.split)
    with _progress(len(task), f"eval {args.task}", args.quiet) as tick:
        r = evaluate(m.model, m.tokenizer, task, args.max_new_tokens, progress=tick)
    doc = dict(r.to_dict(), model=args.model)
    _emit(args, doc, lambda d: print(
        f"{d['model']} on {d['task']}: accuracy {d['accuracy']:.3f} ({d['correct']}/{d['n']}), "
        f"95% CI [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"))
    return 0


def cmd_apply(args) -> int:
    """Select (a task + K needs both models loaded; --modules reads only the tables), then
    write the target's folder with only the changed tensors' bytes replaced."""
    from transplant_core import transplant as tp
    from transplant_core.checkpoint import Checkpoint, ModelTensors, resolve_model_path
    from transplant_core.errors import InvalidArgument
    from transplant_core.export import check_out, manifest, write_checkpoint, write_transplanted
    from transplant_core.workflow import compatibility, explicit_modules, select

    if bool(args.modules) == bool(args.task):
        raise InvalidArgument("give either --modules A,B,... or --task TASK with --k K")
    if args.rank < 0 or args.budget < 0:
        raise InvalidArgument("--rank and --budget must be >= 1 (leave both out for whole modules)")
    if args.rank and args.budget:
        raise InvalidArgument("give --rank or --budget, not both")
    target_path = resolve_model_path(args.target)
    check_out(target_path, Path(args.out))          # before minutes of analysis, not after
    for what, spec in (("target", args.target), ("donor", args.donor)):
        if note := _hub_note(spec, target_path if what == "target" else resolve_model_path(spec)):
            print(f"{what} {spec}: {note}", file=sys.stderr)

    def low(p, current):
        return tp.lowrank(p, current, rank=args.rank or None, budget=args.budget or None) \
            if args.rank or args.budget else p

    if args.modules:
        tgt, don = Checkpoint.open(args.target, args.allow_pickle), Checkpoint.open(args.donor, args.allow_pickle)
        report = compatibility(tgt.table, don.table)
        refs, selection = explicit_modules(args.modules, report), {"method": "explicit", "modules": args.modules}
    else:
        target, donor, report = _load_pair(args)
        a, comparison = _analysis(args, target, donor, report)
        refs = select(a, args.k)
        selection = {"method": a.selector, "task": args.task, "k": args.k, "alignment": a.alignment,
                     "scores": {str(r): a.scores[r] for r in refs}, **_comparison_doc(comparison)}
        del target, donor
        tgt, don = Checkpoint.open(args.target, args.allow_pickle), Checkpoint.open(args.donor, args.allow_pickle)
    if not tgt.tensors.all_safetensors:      # pickle weights (--allow-pickle): load, install, save
        target, donor, _ = _load_pair(args)
        p = low(tp.plan(target.table, _donor_source(donor), refs, args.alpha, cast=args.cast),
                ModelTensors(target.model))
        before = tp.checksums(target.model, p.keys)
        tp.commit(target.model, p)
        meta = manifest(args.target, args.donor, p, before, tp.checksums(target.model, p.keys), selection)
        out = write_checkpoint(target.model, target.tokenizer, Path(args.out), dict(meta, casts=p.casts), args.force)
    else:
        p = low(tp.plan(tgt.table, don.tensors, refs, args.alpha, cast=args.cast), tgt.tensors)
        before, new = {}, {}
        for k in p.keys:             # one target tensor in memory at a time
            old = tgt.tensors.get(k)
            before[k] = tp.tensor_digest(old)
            new[k] = p.value(k, old)
            del old
        meta = manifest(args.target, args.donor, p, before, {k: tp.tensor_digest(t) for k, t in new.items()},
                        selection)
        out = write_transplanted(tgt.path, tgt.tensors.locate, new, Path(args.out), dict(meta, casts=p.casts),
                                 args.force)
    doc = {"out": str(out), "modules": [str(r) for r in p.refs], "alpha": p.alpha, "bytes": p.nbytes,
           "manifest": str(out / "transplant_manifest.json"), "casts": p.casts, "unit": p.unit,
           **({"ranks": p.ranks, "energy": p.energy, "stored_bytes": p.stored_bytes} if p.factors else {})}
    _emit(args, doc, lambda d: print(
        f"transplanted {len(d['modules'])} modules ({_fmt_bytes(d['bytes'])}) from {args.donor} into "
        f"{args.target}, alpha {d['alpha']}: {', '.join(d['modules'])}\nwrote {d['out']} (manifest {d['manifest']})"
        + "".join(f"\n  low-rank {m}: rank {r}, {d['energy'][m]:.1%} of the difference" for m, r in
                  d.get("ranks", {}).items())
        + "".join(f"\n  cast {m} {c['from']} -> {c['to']}: largest error {c['max_abs_error']:.3g} "
                  f"({c['max_rel_error']:.3g} of the largest value)" for m, c in d["casts"].items())))
    return 0


def _donor_source(donor):
    from transplant_core.checkpoint import ModelTensors

    return ModelTensors(donor.model, donor.spec)
