"""Synthetic character tasks of the embedded model family.

Every example is a `(prompt, answer)` pair; the prompt names the task and ends in
`=`, e.g. `add:12+7=` -> `19`, `rev:abcd=` -> `dcba`. A model is expected to emit
the answer and then EOS.

Splits are deterministic (fixed seeds, pure Python `random`), independent of torch:
  eval   300 held-out prompts (dev = first half, test = second half)
  probe   64 further held-out prompts (diagnostic workload for module profiling)
  train  an endless stream that never yields an eval or probe prompt
"""
from __future__ import annotations

import random
import string
import zlib
from collections.abc import Iterator
from functools import lru_cache

from .errors import ZooError

TASK_NAMES: tuple[str, ...] = ("copy", "upper", "rev", "sort", "add")
SPLITS: tuple[str, ...] = ("train", "probe", "dev", "test", "eval")

EVAL_SIZE = 300
PROBE_SIZE = 64
TRAIN_DEFAULT_N = 1000  # task_examples(..., "train") without n
MIN_LETTERS, MAX_LETTERS = 3, 6
MAX_ADDEND = 99

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random) -> str:
    n = rng.randint(MIN_LETTERS, MAX_LETTERS)
    return "".join(rng.choice(_LETTERS) for _ in range(n))


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One random example of `task`, drawn from `rng`."""
    if task == "add":
        a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
        return f"add:{a}+{b}=", str(a + b)
    w = _word(rng)
    if task == "copy":
        return f"copy:{w}=", w
    if task == "upper":
        return f"upper:{w}=", w.upper()
    if task == "rev":
        return f"rev:{w}=", w[::-1]
    if task == "sort":
        return f"sort:{w}=", "".join(sorted(w))
    raise _unknown_task(task)


def answer(prompt: str) -> str:
    """The correct answer of any task prompt (an oracle, independent of make_example)."""
    task, sep, rest = prompt.partition(":")
    if not sep or not rest.endswith("="):
        raise ZooError(f"{prompt!r} is not a task prompt of the form '<task>:<input>='")
    body = rest[:-1]
    if task == "add":
        a, plus, b = body.partition("+")
        if not plus or not a.isdigit() or not b.isdigit():
            raise ZooError(f"{prompt!r}: add prompts look like 'add:12+7='")
        return str(int(a) + int(b))
    if task == "copy":
        return body
    if task == "upper":
        return body.upper()
    if task == "rev":
        return body[::-1]
    if task == "sort":
        return "".join(sorted(body))
    raise _unknown_task(task)


def _unknown_task(task: str) -> ZooError:
    return ZooError(f"unknown zoo task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(("transplant-zoo",) + parts).encode())


@lru_cache(maxsize=None)
def _held_out(task: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(eval, probe): distinct prompts, disjoint from each other."""
    if task not in TASK_NAMES:
        raise _unknown_task(task)
    rng = random.Random(_seed("heldout", task))
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    while len(out) < EVAL_SIZE + PROBE_SIZE:
        p, a = make_example(task, rng)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return tuple(out[:EVAL_SIZE]), tuple(out[EVAL_SIZE:])


@lru_cache(maxsize=None)
def held_out_prompts(task: str) -> frozenset[str]:
    ev, pr = _held_out(task)
    return frozenset(p for p, _ in ev + pr)


def train_stream(task: str, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Endless deterministic training examples of `task`; never an eval/probe prompt."""
    banned = held_out_prompts(task)
    rng = random.Random(_seed("train", task, str(seed)))
    while True:
        p, a = make_example(task, rng)
        if p not in banned:
            yield p, a


def task_examples(name: str, split: str = "eval", n: int | None = None) -> list[tuple[str, str]]:
    """Deterministic (prompt, answer) pairs of task `name` from `split`.

    eval = dev + test (150 + 150), probe = 64 more held-out prompts, train = the
    first `n` (default 1000) items of the seed-0 training stream. `n` truncates.
    """
    if name not in TASK_NAMES:
        raise _unknown_task(name)
    if split not in SPLITS:
        raise ZooError(f"unknown split {split!r} for zoo task {name!r}; valid splits: {', '.join(SPLITS)}")
    if n is not None and n < 0:
        raise ZooError(f"n must be >= 0, got {n}")
    if split == "train":
        stream = train_stream(name)
        return [next(stream) for _ in range(TRAIN_DEFAULT_N if n is None else n)]
    ev, pr = _held_out(name)
    half = EVAL_SIZE // 2
    items = {"eval": ev, "dev": ev[:half], "test": ev[half:], "probe": pr}[split]
    return list(items if n is None else items[:n])
