"""Which guard sees a regression with fewer probe examples: accuracy, answer likelihood, or KL.

For a (target, donor, guarded task) setting, candidates of known effect on the guarded
task are built (each is the target with some of its linear modules changed: blended
toward the donor at a random alpha, or moved by noise of a random size, on a random
subset of modules) and binned by the drop of their accuracy on the task's full eval split
(300 examples): harmless (within noise: |drop| < 1 point and the paired 95% interval of the
drop holds 0) and harmful by about 2, 5, 10 and 20 points. Each candidate is scored on every
eval example (correct, answer NLL, KL from the target) once; then, for probe sizes n, many
draws of n examples without replacement stand for the guard's probe set, and each guard's
verdict on each draw is the one server/quality/guard.py would give (the same paired
bootstrap, with its fixed seed). Reported: detection rate per regression size and
false-alarm rate on the harmless candidates, per guard, margin and n, with 95% intervals,
and the figure of merit: the smallest n at which a guard detects 95% of the 5-point
regressions with at most 5% false alarms.

    python -m transplant_core.experiment.guard --out docs/experiments/guard
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import likelihood as L
from .. import transplant as tp
from ..evaluate import evaluate
from ..metrics import paired_drop
from ..tasks import load_task
from ..workflow import open_model

SETTINGS = (("zoo:v2", "zoo:v1", "zoo:rev"), ("zoo:base", "zoo:tuned", "zoo:copy"), ("zoo:base", "zoo:lora", "zoo:copy"))
BINS = {"harmless": (-1.0, 1.0), "2": (1.3, 2.7), "5": (3.5, 6.5), "10": (7.5, 12.5), "20": (15.0, 25.0)}
SIZES = (4, 8, 16, 32, 64, 128)
MARGINS = {"accuracy": (0.0, 0.05), "likelihood": (0.0, 0.02, 0.05, 0.1), "kl": (0.01, 0.02, 0.05, 0.1)}
N_BOOT, CONFIDENCE = 2000, 0.95


def _candidate(target, donor, table, rng: random.Random):
    """A copy of `target` with a random subset of its linear modules blended toward the
    donor (alpha in [0.1, 1]) or moved by noise (sd log-uniform in [0.003, 0.5])."""
    refs = table.refs()
    subset = rng.sample(refs, rng.randint(1, len(refs)))
    keys = [k for r in subset for k in table[r].keys]
    model = tp.fork(target, keys)
    params = dict(model.named_parameters())
    dparams = dict(donor.named_parameters())
    kind = rng.choice(("blend", "noise"))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    amount = rng.uniform(0.1, 1.0) if kind == "blend" else math.exp(rng.uniform(math.log(0.003), math.log(0.5)))
    with torch.no_grad():
        for k in keys:
            p = params[k]
            if kind == "blend":
                p.copy_(torch.lerp(p, dparams[k].to(p.dtype), amount))
            else:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * amount)
    return model, {"kind": kind, "amount": amount, "modules": len(subset)}


def _bin(drop_points: float, lower: float, upper_zero: bool) -> str | None:
    for name, (lo, hi) in BINS.items():
        if name == "harmless":
            if lo < drop_points < hi and upper_zero:
                return name
        elif lo <= drop_points <= hi:
            return name
    return None


def _boot_index(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """The resamples transplant_core.metrics.mean_lower draws for n values (random.choices
    with a fixed seed), so a simulated verdict is the guard's own."""
    rng = random.Random(seed)
    return np.array([[math.floor(rng.random() * n) for _ in range(n)] for _ in range(n_boot)], dtype=np.int64)


def _lower(values: np.ndarray, idx: np.ndarray) -> float:
    boots = np.sort(values[idx].mean(axis=1))
    return float(boots[int((1 - CONFIDENCE) * len(boots))])


def measure(target_spec: str, donor_spec: str, task_spec: str, per_bin: int, budget: int, draws: int,
            seed: int, log=print) -> dict:
    torch.set_num_threads(1)
    t, d = open_model(target_spec, False, None), open_model(donor_spec, False, None)
    tok, table = t.tokenizer, t.table
    task = load_task(task_spec, n=300)
    base_correct = evaluate(t.model, tok, task, 8).correct
    base = L.answer_scores(t.model, tok, task, batch_size=64)
    rng = random.Random(seed)
    cands: list[dict] = []
    counts = dict.fromkeys(BINS, 0)
    tried, t0 = 0, time.time()
    while tried < budget and min(counts.values()) < per_bin:
        tried += 1
        model, how = _candidate(t.model, d.model, table, rng)
        correct = evaluate(model, tok, task, 8).correct
        drop, lower = paired_drop(base_correct, correct)
        up = -paired_drop(correct, base_correct)[1]                  # the drop's upper bound
        b = _bin(100 * drop, lower, lower <= 0 <= up)
        if b is None or counts[b] >= per_bin:
            continue
        s = L.answer_scores(model, tok, task, parent=t.model, batch_size=64)
        counts[b] += 1
        cands.append({"bin": b, "drop": drop, **how, "correct": correct, "nll": s.nll, "kl": s.kl})
        if tried % 25 == 0:
            log(f"  {task_spec} on {target_spec}: {tried} tried, bins {counts} ({time.time() - t0:.0f} s)")
    base_c = np.array(base_correct, dtype=float)
    base_nll = np.array(base.nll)
    out = {"target": target_spec, "donor": donor_spec, "task": task_spec, "tried": tried, "counts": counts,
           "base_accuracy": float(base_c.mean()), "draws": draws, "rates": {}}
    drng = np.random.default_rng(seed)
    for n in SIZES:
        idx = _boot_index(n)
        picks = [drng.choice(len(base_c), size=n, replace=False) for _ in range(draws)]
        hits = {(stat, m): dict.fromkeys(BINS, 0) for stat, ms in MARGINS.items() for m in ms}
        for c in cands:
            per = {"accuracy": base_c - np.array(c["correct"], dtype=float),   # per-example drop
                   "likelihood": np.array(c["nll"]) - base_nll,                 # per-example NLL rise
                   "kl": np.array(c["kl"])}
            for stat, values in per.items():
                means = np.array([values[p].mean() for p in picks])
                lowers = np.array([_lower(values[p], idx) for p in picks])
                for m in MARGINS[stat]:
                    refused = (lowers > m) if stat == "kl" else (means > m) & (lowers > 0)
                    hits[(stat, m)][c["bin"]] += int(refused.sum())
        for (stat, m), h in hits.items():
            out["rates"][f"{stat}|{m}|{n}"] = {b: [h[b], counts[b] * draws] for b in BINS}
        log(f"  n={n} done ({time.time() - t0:.0f} s)")
    return out


def _rate(hit_total) -> tuple[float, float, float]:
    """Rate with a 95% Wilson interval."""
    k, n = hit_total
    if not n:
        return (float("nan"),) * 3
    p, z = k / n, 1.96
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, mid - half), min(1.0, mid + half)


def merit(res: dict, stat: str) -> tuple[int | None, float | None]:
    """The smallest n (and its margin) at which `stat` detects >= 95% of the 5-point
    regressions with <= 5% false alarms on the harmless candidates."""
    best = None
    for n in SIZES:
        for m in MARGINS[stat]:
            r = res["rates"][f"{stat}|{m}|{n}"]
            if _rate(r["5"])[0] >= 0.95 and _rate(r["harmless"])[0] <= 0.05:
                best = (n, m) if best is None or n < best[0] else best
        if best is not None:
            return best
    return None, None


def report(results: list[dict]) -> str:
    lines = ["# Guards compared: accuracy, answer likelihood, KL", "",
             "Produced by `python -m transplant_core.experiment.guard --out docs/experiments/guard` "
             "(transplant_core/experiment/guard.py, which says how). Rates are over candidates x draws; "
             "intervals are 95% Wilson intervals (draws of one candidate are not independent: read them as "
             "indicative).", ""]
    lines += ["## Figure of merit: the smallest probe size n detecting >= 95% of 5-point regressions with "
              "<= 5% false alarms", "", "| setting | accuracy | likelihood | kl |", "|---|---|---|---|"]
    for r in results:
        cells = []
        for stat in MARGINS:
            n, m = merit(r, stat)
            cells.append("not reached (n <= 128)" if n is None else f"n = {n} (margin {m})")
        lines.append(f"| {r['target']} <- {r['donor']}, guarding {r['task']} | " + " | ".join(cells) + " |")
    for r in results:
        lines += ["", f"## {r['target']} <- {r['donor']}, guarding {r['task']}", "",
                  f"Target accuracy on the 300 eval examples: {r['base_accuracy']:.3f}; candidates tried "
                  f"{r['tried']}, kept per bin: {r['counts']}; {r['draws']} probe draws per candidate and n.", "",
                  "| guard | margin | n | false alarms (harmless) | detect 2 pt | detect 5 pt | detect 10 pt | detect 20 pt |",
                  "|---|---|---|---|---|---|---|---|"]
        for stat, margins in MARGINS.items():
            for m in margins:
                for n in SIZES:
                    rr = r["rates"][f"{stat}|{m}|{n}"]

                    def cell(b):
                        p, lo, hi = _rate(rr[b])
                        return "-" if p != p else f"{p:.2f} ({lo:.2f}-{hi:.2f})"
                    lines.append(f"| {stat} | {m} | {n} | {cell('harmless')} | {cell('2')} | {cell('5')} | "
                                 f"{cell('10')} | {cell('20')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m transplant_core.experiment.guard", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/experiments/guard"))
    ap.add_argument("--per-bin", type=int, default=20, help="candidates kept per regression size (default 20)")
    ap.add_argument("--budget", type=int, default=600, help="candidates tried per setting at most (default 600)")
    ap.add_argument("--draws", type=int, default=100, help="probe draws per candidate and n (default 100)")
    ap.add_argument("--settings", type=int, default=len(SETTINGS), help="the first N settings (default all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    results = []
    for target, donor, task in SETTINGS[:args.settings]:
        print(f"{target} <- {donor}, guarding {task}", file=sys.stderr)
        results.append(measure(target, donor, task, args.per_bin, args.budget, args.draws, args.seed,
                               log=lambda s: print(s, file=sys.stderr)))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "report.md").write_text(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
