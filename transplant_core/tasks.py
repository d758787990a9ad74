"""Tasks and scorers.

A task spec is `zoo:NAME` (the embedded family's synthetic tasks) or a JSONL file,
one `{"prompt": ..., "answer": ...}` per line with an optional `"scorer"`:
`exact` (default), `boxed`, `contains` or `regex:<pattern>`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument, NotFound

SCORERS = ("exact", "boxed", "contains", "regex:<pattern>")


def normalise(text: str) -> str:
    return " ".join(text.strip().split())


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def check_scorer(scorer: str) -> str:
    if scorer in ("exact", "boxed", "contains"):
        return scorer
    if scorer.startswith("regex:"):
        try:
            re.compile(scorer[6:])
        except re.error as e:
            raise InvalidArgument(f"scorer {scorer!r}: invalid regular expression: {e}") from None
        return scorer
    raise InvalidArgument(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}")


def score(output: str, answer: str, scorer: str = "exact") -> bool:
    """Exact match after normalisation, on the answer the scorer extracts.

    regex: with a capturing group, group 1 is the extracted answer; without one, a
    match anywhere in the output counts as correct."""
    if scorer == "exact":
        return normalise(output) == normalise(answer)
    if scorer == "boxed":
        got = extract_boxed(output)
        return got is not None and normalise(got.strip("$ ")) == normalise(answer)
    if scorer == "contains":
        return normalise(answer) in normalise(output)
    if scorer.startswith("regex:"):
        m = re.search(scorer[6:], output)
        if m is None:
            return False
        return normalise(m.group(1)) == normalise(answer) if m.re.groups else True
    raise InvalidArgument(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    scorer: str = "exact"


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    def head(self, n: int | None) -> "Task":
        return self if n is None else Task(self.name, self.examples[:n])

    def split(self, fraction: float = 0.5) -> tuple["Task", "Task"]:
        """Disjoint (dev, test) halves, deterministic: even/odd positions."""
        return (Task(f"{self.name}/dev", self.examples[0::2]), Task(f"{self.name}/test", self.examples[1::2]))


def selection_task(spec: str, n: int | None = None) -> Task:
    """The prompts a task + K selection ranks modules on, the same for the CLI and the
    server: never ones the selection's quality is measured on (held_out_task). A zoo
    task: its probe split (disjoint from eval); a JSONL file: its even positions."""
    if spec.startswith("zoo:"):
        return load_task(spec, n=n, split="probe")
    return load_task(spec).split()[0].head(n)


def held_out_task(spec: str, n: int | None = None) -> Task:
    """What a selection's task is evaluated on, disjoint from selection_task: a zoo task's
    eval split; a JSONL file's odd positions."""
    if spec.startswith("zoo:"):
        return load_task(spec, n=n)
    return load_task(spec).split()[1].head(n)


def load_task(spec: str, n: int | None = None, split: str = "eval") -> Task:
    """Resolve a task spec; `n` keeps the first n examples."""
    if n is not None and n < 1:
        raise InvalidArgument(f"the number of examples must be at least 1, got {n}")
    if spec.startswith("zoo:"):
        from . import zoo

        try:
            pairs = zoo.task_examples(spec[4:], split=split, n=n)
        except zoo.ZooError as e:
            raise NotFound(str(e)) from None
        return Task(spec, tuple(Example(p, a) for p, a in pairs))
    return load_jsonl(Path(spec)).head(n)


def load_jsonl(path: Path) -> Task:
    if not path.is_file():
        raise NotFound(f"task file {str(path)!r} does not exist; give a JSONL file or zoo:NAME")
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"{path}:{lineno}: expected an object with 'prompt' and 'answer'")
        for field_ in ("prompt", "answer"):
            if not isinstance(row.get(field_), str):
                raise InvalidArgument(f"{path}:{lineno}: missing or non-string {field_!r}")
        scorer = row.get("scorer", "exact")
        if not isinstance(scorer, str):
            raise InvalidArgument(f"{path}:{lineno}: 'scorer' must be a string")
        try:
            examples.append(Example(row["prompt"], row["answer"], check_scorer(scorer)))
        except InvalidArgument as e:
            raise InvalidArgument(f"{path}:{lineno}: {e}") from None
    if not examples:
        raise InvalidArgument(f"task file {path} has no examples")
    return Task(str(path), tuple(examples))


def write_jsonl(task: Task, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in task.examples:
            row = {"prompt": e.prompt, "answer": e.answer}
            if e.scorer != "exact":
                row["scorer"] = e.scorer
            f.write(json.dumps(row) + "\n")
