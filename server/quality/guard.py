"""The guard: a transplant that makes a guarded probe task worse by more than its margin,
with enough evidence that it is not noise, is refused or reverted (guard.mode). Worse,
per probe (`statistic`): its accuracy drops (paired over the examples: the lower bound of
the drop is above 0), its reference answers' NLL rises (paired: the lower bound of the
rise is above 0), or, label-free, its KL from the parent exceeds a budget (the lower
bound of the mean KL is above it)."""
from __future__ import annotations

from dataclasses import dataclass

from statistics import fmean

from transplant_core.metrics import mean_lower, paired_drop, paired_shift


@dataclass
class Verdict:
    ok: bool
    violations: list[dict]

    def reason(self) -> str:
        return "; ".join(_why(v) for v in self.violations)


def _why(v: dict) -> str:
    stat = v.get("statistic", "accuracy")
    if stat == "likelihood":
        return (f"{v['task']} answer NLL rose {v['before']:.3f} -> {v['after']:.3f} nats/token (n={v['n']}, "
                f"rise {v['drop']:.3f} > margin {v['margin']:.3f}, lower bound {v['lower']:.3f} > 0)")
    if stat == "kl":
        return (f"{v['task']} moved {v['after']:.3f} nats of KL from its parent (n={v['n']}, lower bound "
                f"{v['lower']:.3f} > budget {v['margin']:.3f})")
    return (f"{v['task']} dropped {v['before']:.3f} -> {v['after']:.3f} (n={v['n']}, "
            f"drop {v['drop']:.3f} > margin {v['margin']:.3f}, lower bound {v['lower']:.3f} > 0)")


def judge(probes, spec, before: dict, after: dict) -> Verdict:
    """Each guarded probe, from `before` (the parent's Measurements by task) to `after`
    (the candidate's), on its statistic, against the guard's margin at its confidence."""
    out = []
    for p in probes:
        if not p.guard or p.task not in before or p.task not in after:
            continue
        b, a, stat = before[p.task], after[p.task], p.statistic or spec.statistic
        n = len(a.nll or a.correct)
        if stat == "likelihood":
            rise, lower = paired_shift(b.nll, a.nll, spec.confidence)
            if rise > spec.nll_margin and lower > 0:
                out.append({"task": p.task, "statistic": stat, "before": fmean(b.nll), "after": fmean(a.nll), "n": n,
                            "drop": rise, "lower": lower, "margin": spec.nll_margin})
        elif stat == "kl":
            kl, lower = mean_lower(a.kl, spec.confidence)
            if lower > spec.kl_budget:
                out.append({"task": p.task, "statistic": stat, "before": 0.0, "after": kl, "n": n, "drop": kl,
                            "lower": lower, "margin": spec.kl_budget})
        else:
            drop, lower = paired_drop(b.correct, a.correct, spec.confidence)
            if drop > spec.margin and lower > 0:
                out.append({"task": p.task, "before": b.accuracy, "after": a.accuracy, "n": n, "drop": drop,
                            "lower": lower, "margin": spec.margin})
    return Verdict(not out, out)
