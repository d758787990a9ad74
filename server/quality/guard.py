"""The guard: a transplant that drops a guarded probe task by more than its margin, with
enough evidence that it is not noise (the lower bound of a paired bootstrap interval on
the drop is above 0), is refused or reverted (guard.mode)."""
from __future__ import annotations

from dataclasses import dataclass

from transplant_core.metrics import paired_drop


@dataclass
class Verdict:
    ok: bool
    violations: list[dict]

    def reason(self) -> str:
        return "; ".join(f"{v['task']} dropped {v['before']:.3f} -> {v['after']:.3f} (n={v['n']}, "
                         f"drop {v['drop']:.3f} > margin {v['margin']:.3f}, lower bound {v['lower']:.3f} > 0)"
                         for v in self.violations)


def judge(probes, spec, before: dict, after: dict) -> Verdict:
    """Each guarded probe's drop from `before` to `after` (Measurements by task) against
    the guard's margin at its confidence."""
    out = []
    for p in probes:
        if not p.guard or p.task not in before or p.task not in after:
            continue
        drop, lower = paired_drop(before[p.task].correct, after[p.task].correct, spec.confidence)
        if drop > spec.margin and lower > 0:
            out.append({"task": p.task, "before": before[p.task].accuracy, "after": after[p.task].accuracy,
                        "n": len(after[p.task].correct), "drop": drop, "lower": lower, "margin": spec.margin})
    return Verdict(not out, out)
