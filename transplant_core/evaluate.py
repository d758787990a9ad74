"""Accuracy of a model on a task: batched greedy generation, then the scorers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .generation import greedy
from .metrics import accuracy, bootstrap_ci
from .tasks import Task, score


@dataclass
class EvalResult:
    task: str
    correct: list[bool]
    outputs: list[str]

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> int:
        return sum(self.correct)

    @property
    def accuracy(self) -> float:
        return accuracy(self.correct)

    def interval(self) -> tuple[float, float]:
        return bootstrap_ci(self.correct)

    def to_dict(self) -> dict:
        lo, hi = self.interval()
        return {"task": self.task, "accuracy": self.accuracy, "n": self.n, "correct": self.n_correct,
                "ci95": [lo, hi]}


def evaluate(model, tokenizer, task: Task, max_new_tokens: int = 32, batch_size: int = 64,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    outs = greedy(model, tokenizer, task.prompts, max_new_tokens, batch_size, progress)
    correct = [score(o.text, e.answer, e.scorer) for o, e in zip(outs, task.examples)]
    return EvalResult(task.name, correct, [o.text for o in outs])
