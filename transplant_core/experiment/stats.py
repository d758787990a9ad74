"""The experiment's arithmetic: paired bootstrap intervals of accuracy, TIR, Recovery,
retention and differences.

Every row of one split is resampled with the SAME bootstrap indices, so target,
donor, transplanted models and controls are compared on the same resampled
questions (a paired bootstrap): the interval of Recovery accounts for the noise in
both baselines, and the interval of a difference (selector minus random) is
narrower than the two intervals side by side.

Point values use the paper's definitions (metrics.py). A resample where a ratio is
undefined (target at 0 for TIR, baselines equal for Recovery) is left out of that
interval and counted; a point value that is undefined has no interval at all.
A "correct" vector may hold fractions: the random control is the per-question mean
over its draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metrics import recovery, retention, tir

LEVEL = 0.95


@dataclass(frozen=True)
class Boot:
    """Bootstrap indices for one split: `idx[b]` is the b-th resample of n questions."""

    idx: np.ndarray   # int [n_boot, n]

    @classmethod
    def make(cls, n: int, n_boot: int = 2000, seed: int = 0) -> "Boot":
        rng = np.random.default_rng(seed)
        return cls(rng.integers(0, max(n, 1), size=(n_boot, n)))

    @property
    def n(self) -> int:
        return self.idx.shape[1]

    def means(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.n,):
            raise ValueError(f"expected {self.n} per-question values, got shape {x.shape}")
        return x[self.idx].mean(axis=1) if self.n else np.zeros(len(self.idx))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval, indexed as metrics.bootstrap_ci does; None if no sample is defined."""
    vals = np.sort(samples[np.isfinite(samples)])
    m = len(vals)
    if m == 0:
        return None
    lo = vals[int((1 - level) / 2 * m)]
    hi = vals[min(m - 1, int((1 + level) / 2 * m))]
    return (float(lo), float(hi))


def _stat(point: float | None, samples: np.ndarray) -> dict:
    undefined = int((~np.isfinite(samples)).sum())
    ci = percentile_interval(samples) if point is not None else None
    return {"value": point, "ci95": list(ci) if ci else None, "undefined_resamples": undefined}


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if len(x) else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def accuracy_stat(correct, boot: Boot) -> dict:
    return _stat(_mean(correct), boot.means(correct))


def tir_stat(after, target, boot: Boot) -> dict:
    """TIR = Acc_after / Acc_target."""
    return _stat(tir(_mean(after), _mean(target)), _ratio(boot.means(after), boot.means(target)))


def recovery_stat(after, target, donor, boot: Boot) -> dict:
    """Recovery = 100 (Acc_after - Acc_target) / (Acc_donor - Acc_target), in percent."""
    a, t, d = boot.means(after), boot.means(target), boot.means(donor)
    return _stat(recovery(_mean(after), _mean(target), _mean(donor)), 100.0 * _ratio(a - t, d - t))


def retention_stat(after, before, boot: Boot) -> dict:
    """Retention = Acc_after / Acc_before on a task the transplant is not for."""
    return _stat(retention(_mean(after), _mean(before)), _ratio(boot.means(after), boot.means(before)))


def difference_stat(a, b, boot: Boot) -> dict:
    """Acc(a) - Acc(b) on the same questions, with its paired interval."""
    return _stat(_mean(a) - _mean(b), boot.means(a) - boot.means(b))


def spread(values: list[float | None]) -> dict:
    """Mean, sd, min and max over random draws (undefined draws left out, counted)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "undefined_draws": len(values)}
    arr = np.asarray(v, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "undefined_draws": len(values) - len(v)}


def excludes_zero(stat: dict) -> bool:
    """True when a difference's interval lies wholly above zero."""
    return bool(stat["ci95"]) and stat["ci95"][0] > 0
