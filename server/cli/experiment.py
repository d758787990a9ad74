"""`transplant experiment`: the paper's tables on one setting, with the controls it lacks.

A thin handler: parse flags into an ExperimentConfig, run transplant_core.experiment
with progress bars on stderr, write the report into --out, print a summary (or, with
--json, the whole results document).
"""
from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

from .common import _common, _emit, _progress


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Bars:
    """One tqdm bar per stage, through server.cli.common._progress."""

    def __init__(self, quiet: bool):
        self.quiet, self.stack, self.stage, self.tick, self.done = quiet, contextlib.ExitStack(), None, None, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.stack.close()
            self.stage, self.done = stage, 0
            self.tick = self.stack.enter_context(_progress(total, stage, self.quiet))
        if done > self.done:
            self.tick(done - self.done)
            self.done = done

    def close(self) -> None:
        self.stack.close()


def _default_out(args) -> Path:
    slug = "-".join(re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")[-24:] for s in (args.target, args.donor, args.task))
    return Path("experiments") / slug


def cmd_experiment(args) -> int:
    from transplant_core.experiment import ExperimentConfig, run
    from transplant_core.experiment.report import write

    retain = None if args.retain is None else (() if args.retain.strip() in ("", "none") else _csv(args.retain))
    cfg = ExperimentConfig(
        target=args.target, donor=args.donor, task=args.task, ks=_csv(args.ks), max_new_tokens=args.max_new_tokens,
        retain=retain, seeds=args.seeds, selectors=_csv(args.selectors), n=args.n, n_probe=args.n_probe,
        n_retain=args.n_retain, n_boot=args.n_boot, batch_size=args.batch_size, seed=args.seed,
        greedy_steps=args.greedy_steps, allow_pickle=args.allow_pickle).validate()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bars = _Bars(args.quiet)
    try:
        doc = run(cfg, bars)
    finally:
        bars.close()
    out = Path(args.out) if args.out else _default_out(args)
    doc["files"] = {k: str(out / v) for k, v in write(doc, out).items()}
    _emit(args, doc, _human)
    return 0


def _human(doc: dict) -> None:
    from transplant_core.experiment.report import fmt

    st = doc["setting"]
    print(f"{st['target']} <- {st['donor']} on {st['task']}: {st['compatible_modules']} compatible modules, "
          f"{doc['timings_s']['total']:.0f} s")
    for L in st["lengths"]:
        b = doc["baselines"][str(L)]
        print(f"max new tokens {L}: target {fmt(b['target']['test'])}, donor {fmt(b['donor']['test'])} (test)")
        if b["warning"]:
            print(f"  warning: {b['warning']}")
        for x in (x for x in doc["best_k"] if x["L"] == L):
            h = x["held_out"]
            print(f"  {x['method']:<9} best K {h['k']:>3} (dev) -> test accuracy {fmt(h['accuracy'])}, "
                  f"TIR {fmt(h['tir'])}, Recovery {fmt(h['recovery'], pct=True)}, "
                  f"retention min {h['retention']['min'] if h['retention']['min'] is None else round(h['retention']['min'], 3)}")
    print(f"report: {doc['files']['report']}")


def register(sub) -> None:
    p = sub.add_parser("experiment", help="reproduce the paper's tables on one setting, with controls and a report",
                       description="Best K per decoding length, TIR and Recovery with bootstrap intervals, against "
                                   "random modules and the weight-difference norm, with retention on other tasks; "
                                   "best K chosen on dev and reported on test. Writes report.md, results.json and plots.")
    p.add_argument("--target", required=True, help="model spec: checkpoint dir or zoo:NAME")
    p.add_argument("--donor", required=True, help="model spec: checkpoint dir or zoo:NAME")
    p.add_argument("--task", required=True, help="zoo:NAME (its dev/test/probe splits) or a JSONL file (even/odd halves)")
    p.add_argument("--ks", default="1,2,4,8,16,all", help="transplant strengths K, comma separated; 'all' = every "
                   "compatible module; K above that is dropped (default 1,2,4,8,16,all)")
    p.add_argument("--max-new-tokens", type=_ints, default=(8,), help="decoding lengths, comma separated (default 8)")
    p.add_argument("--retain", help="other tasks to measure retention on, comma separated, or 'none' "
                   "(default: the other zoo tasks for a zoo task, none otherwise)")
    p.add_argument("--seeds", type=int, default=5, help="random-module draws per K (default 5)")
    p.add_argument("--selectors", default="lae,dw", help="methods besides the random control: selectors lae, lae_tf, "
                   "lae_kind, dw, dwx, taylor, swap, loo, greedy, greedy_keep, layer, layer_ends; the finer units lowrank, "
                   "ties, dare, graft, stitch; NAME+x also "
                   "copies every differing norm, embedding and output-head weight; all = every selector and unit "
                   "(default lae,dw; lae and dw always run)")
    p.add_argument("--n", type=int, help="questions per split, dev and test (default: all)")
    p.add_argument("--n-probe", type=int, default=64, help="diagnostic prompts for the selectors (default 64)")
    p.add_argument("--n-retain", type=int, default=100, help="questions per retention task (default 100)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="decoding batch size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws and the bootstrap (default 0)")
    p.add_argument("--greedy-steps", type=int, help="modules the greedy selector adds one by one before ordering the "
                   "rest by swap score (default: the largest K below all)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="output directory (default experiments/<target>-<donor>-<task>)")
    _common(p)
    p.set_defaults(fn=cmd_experiment)
