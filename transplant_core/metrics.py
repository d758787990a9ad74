"""The paper's metrics and the intervals it lacks.

Undefined values are None, never 0 or infinity: TIR when the target scores 0,
Recovery when target and donor score the same.
"""
from __future__ import annotations

import random
from statistics import fmean


def accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def tir(acc_after: float, acc_target: float) -> float | None:
    """Transplantation improvement ratio: Acc_after / Acc_target."""
    return None if acc_target == 0 else acc_after / acc_target


def recovery(acc_after: float, acc_target: float, acc_donor: float) -> float | None:
    """100 x (Acc_after - Acc_target) / (Acc_donor - Acc_target), in percent."""
    gap = acc_donor - acc_target
    return None if gap == 0 else 100.0 * (acc_after - acc_target) / gap


def retention(acc_after: float, acc_before: float) -> float | None:
    """Share of the target's own accuracy on another task kept after the transplant."""
    return None if acc_before == 0 else acc_after / acc_before


def bootstrap_ci(correct: list[bool], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy (resampling examples)."""
    if not correct:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(correct)
    vals = sorted(fmean(rng.choices(correct, k=n)) for _ in range(n_boot))
    lo = vals[int((1 - level) / 2 * n_boot)]
    hi = vals[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return (lo, hi)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "undefined" if x is None else format(x, spec)


def paired_drop(before: list[bool], after: list[bool], confidence: float = 0.95, n_boot: int = 2000,
                seed: int = 0) -> tuple[float, float]:
    """(drop, lower): the accuracy drop from `before` to `after` on the SAME examples, and
    the one-sided lower confidence bound of that drop (paired bootstrap over examples).
    lower > 0 means the drop is unlikely to be noise at that confidence."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_drop needs two equally long, non-empty lists of per-example results")
    return paired_shift([int(a) for a in after], [int(b) for b in before], confidence, n_boot, seed)


def paired_shift(before: list[float], after: list[float], confidence: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """(shift, lower): the mean per-example change from `before` to `after` (after - before,
    on the SAME examples), and its one-sided lower confidence bound (paired bootstrap)."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_shift needs two equally long, non-empty lists of per-example values")
    return mean_lower([a - b for b, a in zip(before, after)], confidence, n_boot, seed)


def mean_lower(values: list[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(mean, lower): the mean of per-example values and its one-sided lower confidence
    bound (bootstrap over examples)."""
    if not values:
        raise ValueError("mean_lower needs a non-empty list")
    n = len(values)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_boot))
    return sum(values) / n, boots[int((1 - confidence) * n_boot)]
