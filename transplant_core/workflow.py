"""The offline steps the CLI (and the server) compose: open, analyse, select, apply.

Each function takes loaded objects and returns plain results; none prints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import lae
from .arch import ModuleTable, build_table
from .checkpoint import Checkpoint, load_model
from .compat import CompatReport, check
from .errors import Incompatible, InvalidArgument
from .refs import ModuleRef, parse_refs
from .selection import by_pattern, top_k
from .tasks import Task


@dataclass
class Loaded:
    spec: str
    model: object
    tokenizer: object
    path: object
    table: ModuleTable


def open_model(spec: str, allow_pickle: bool = False) -> Loaded:
    model, tok, path = load_model(spec, allow_pickle)
    return Loaded(spec, model, tok, path, build_table(model))


def compatibility(target: ModuleTable, donor: ModuleTable) -> CompatReport:
    report = check(target, donor)
    if not report.usable:
        raise Incompatible("donor and target share no transplantable module",
                           list(report.model_mismatches + report.mismatches))
    return report


def explicit_modules(text: str, report: CompatReport) -> list[ModuleRef]:
    """`A,B,...` names or glob patterns (`layers.*.mlp.*`), among compatible modules."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if any(ch in t for t in items for ch in "*?["):
        return by_pattern(list(report.compatible), items)
    refs = parse_refs(items)
    bad = [str(r) for r in refs if r not in report.compatible]
    if bad:
        raise Incompatible("modules not transplantable between these models",
                           [f"{b}: not in the compatible set (see `transplant compat`)" for b in bad])
    return refs


def analyse(model, tokenizer, table: ModuleTable, donor_model, task: Task, report: CompatReport,
            max_new_tokens: int, alignment: str = "free",
            progress: Callable[[int], None] | None = None) -> lae.Analysis:
    """LAE over the compatible modules (the only ones that may be selected)."""
    table = ModuleTable(table.arch, table.source, table.layers_path, table.vocab_size,
                        {r: table[r] for r in report.compatible})
    return lae.analyze(model, donor_model, tokenizer, table, task.prompts, max_new_tokens, alignment,
                       progress=progress)


def select(analysis: lae.Analysis, k: int) -> list[ModuleRef]:
    if k is None:
        raise InvalidArgument("give --k with --task (how many modules to transplant)")
    return top_k(analysis.scores, k)


def open_donor(spec: str, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint.open(spec, allow_pickle)
