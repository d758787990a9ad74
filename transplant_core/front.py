"""Recovery against retention: the Pareto front of a ranking's top-K transplants.

Transplanting more of a ranking recovers more of the donor's task and, where the two
models' skills conflict (cross-generation: v2 learned rev where v1 knew add), costs more
of the target's other tasks. `measure` installs each top-K off to the side and measures
both on prompts disjoint from evaluation; `pareto` marks the K that no other K beats on
both; `choose` takes the largest Recovery whose retention (the worst over the retained
tasks) stays at or above a floor. The experiment report draws the same front from its
test-split numbers (`front_rows`), the plan uses it to pick K.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import math
from statistics import fmean

from .evaluate import evaluate
from .likelihood import answer_scores
from .metrics import recovery, retention
from .tasks import Task

# what retention measures, each 1 when nothing changed and smaller the more a task lost:
# accuracy after / before; exp(-rise of the reference answers' NLL per token); exp(-KL
# from the target's next-token distributions at the answer positions), label-free
STATISTICS = ("accuracy", "likelihood", "kl")


@dataclass
class Point:
    k: int
    recovery: float | None           # percent of the donor's gain over the target; None: undefined
    retention: float | None          # worst over the retained tasks of accuracy after / before; None: none measurable
    on_front: bool = False
    chosen: bool = False
    accuracy: float = 0.0            # the task's accuracy after, on the measured prompts

    def to_dict(self) -> dict:
        return asdict(self)


def ks_up_to(k: int) -> list[int]:
    """The K measured for a front up to `k`: 1, 2, 3, 4, then about 1.4x apart, and k."""
    out, x = [], 1
    while x < k:
        out.append(x)
        x = x + 1 if x < 4 else max(x + 1, round(x * 1.4))
    return out + [k]


def pareto(points: list[Point]) -> list[Point]:
    """Mark (and return) the points no other point beats on both Recovery and retention
    (an undefined value counts as the worst)."""
    def key(p: Point) -> tuple[float, float]:
        return (p.recovery if p.recovery is not None else float("-inf"),
                p.retention if p.retention is not None else float("-inf"))

    for p in points:
        r, t = key(p)
        p.on_front = not any((q_r >= r and q_t >= t) and (q_r > r or q_t > t)
                             for q_r, q_t in (key(q) for q in points if q is not p))
    return [p for p in points if p.on_front]


def choose(points: list[Point], floor: float) -> tuple[Point | None, str]:
    """The point with the largest Recovery whose retention is at least `floor` (ties: the
    higher retention, then the smaller K: so it is on the front), and why; None if no K
    keeps retention at the floor."""
    ok = [p for p in points if p.retention is None or p.retention >= floor]
    if not ok:
        worst = max(points, key=lambda p: p.retention or 0.0)
        return None, (f"no K keeps retention at or above {floor:.3f}: the best is K={worst.k} at "
                      f"{worst.retention:.3f}")
    best = max(ok, key=lambda p: (p.recovery if p.recovery is not None else float("-inf"),
                                  p.retention if p.retention is not None else float("-inf"), -p.k))
    best.chosen = True
    rec = f"{best.recovery:.1f}%" if best.recovery is not None else "undefined"
    ret = f"{best.retention:.3f}" if best.retention is not None else "not measurable"
    return best, (f"K={best.k}: the largest Recovery ({rec}) among the {len(ok)} of {len(points)} K whose retention "
                  f"stays at or above {floor:.3f} (its retention: {ret})")


def measure(build: Callable[[int], object], target, donor, tokenizer, task: Task, retain: dict[str, Task],
            ks: list[int], max_new_tokens: int, progress: Callable[[int], None] | None = None,
            statistic: str = "accuracy") -> list[Point]:
    """The front of `build(k)` (a model with the top-k installed, built off to the side)
    for each k in `ks`: `task` accuracy as Recovery between `target` and `donor`, and
    the worst retention over the `retain` tasks, on `statistic` (STATISTICS). Marks the front."""
    def acc(model, t: Task) -> float:
        return evaluate(model, tokenizer, t, max_new_tokens).accuracy

    def nll(model, t: Task) -> float:
        return fmean(answer_scores(model, tokenizer, t).nll)

    def kept_by(model, name: str, t: Task) -> float | None:
        if statistic == "likelihood":
            return math.exp(-(nll(model, t) - before[name]))
        if statistic == "kl":
            return math.exp(-fmean(answer_scores(model, tokenizer, t, parent=target).kl))
        return retention(acc(model, t), before[name])

    a_t, a_d = acc(target, task), acc(donor, task)
    before = {name: (nll if statistic == "likelihood" else acc)(target, t) for name, t in retain.items()}
    points = []
    for i, k in enumerate(ks):
        model = build(k)
        a = acc(model, task)
        kept = [kept_by(model, name, t) for name, t in retain.items()]
        kept = [x for x in kept if x is not None]
        points.append(Point(k, recovery(a, a_t, a_d), min(kept) if kept else None, accuracy=a))
        if progress:
            progress(i + 1)
    pareto(points)
    return points


def front_rows(rows: list[dict], method: str, L: int, split: str = "test") -> list[Point]:
    """An experiment's sweep rows of one method and length as front points (Recovery on
    `split`, retention min on its retention questions), the front marked."""
    pts = [Point(r["k"], r["split"][split]["recovery"]["value"], r["retention_summary"]["min"],
                 accuracy=r["split"][split]["accuracy"]["value"])
           for r in rows if r["method"] == method and r["L"] == L and r.get("retention_summary")]
    pts.sort(key=lambda p: p.k)
    pareto(pts)
    return pts
