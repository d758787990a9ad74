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


def open_model(spec: str, allow_pickle: bool = False, dtype=None) -> Loaded:
    """The model loaded in the dtype its weights are stored in, unless `dtype` says otherwise."""
    model, tok, path = load_model(spec, allow_pickle, dtype)
    return Loaded(spec, model, tok, path, build_table(model))


def open_mapped(spec: str, allow_pickle: bool = False) -> Loaded:
    """The model with its weights left in the checkpoint's files (transplant_core.mapped):
    for a server whose engine holds the model itself (vLLM)."""
    from .checkpoint import load_tokenizer, resolve_model_path
    from .mapped import mapped_model

    path = resolve_model_path(spec)
    model = mapped_model(path, allow_pickle)
    return Loaded(spec, model, load_tokenizer(path, spec), path, build_table(model))


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


# Selectors `--selector all` (and PlanTransplant's "all") compares: every one but the
# forward selections, whose O(M^2) passes cost minutes on large models.
COMPARED = ("lae", "lae_tf", "lae_kind", "dw", "dwx", "taylor", "swap", "loo")


@dataclass
class Ranking:
    """Every compatible module scored by one selector (higher = transplant first)."""
    selector: str
    scores: dict[ModuleRef, float]
    prompts: int
    max_new_tokens: int
    seconds: float
    alignment: str = ""
    valid_steps: int = 0

    def ranking(self) -> list[tuple[ModuleRef, float]]:
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_dict(self) -> dict:
        return {"selector": self.selector, "alignment": self.alignment, "prompts": self.prompts,
                "max_new_tokens": self.max_new_tokens, "valid_steps": self.valid_steps,
                "seconds": round(self.seconds, 3),
                "modules": [{"name": str(r), "score": s} for r, s in self.ranking()]}


def rank(model, tokenizer, table: ModuleTable, donor_model, task: Task, report: CompatReport, max_new_tokens: int,
         selector: str = "lae", alignment: str = "free", k: int | None = None,
         progress: Callable[[int], None] | None = None, evidence=None) -> Ranking:
    """Score the compatible modules with `selector` (selectors.DESCRIPTIONS) on the task's
    prompts. `lae` is the paper's analysis (with `alignment`); the others read the same
    probe prompts and both models, never the evaluation questions."""
    import time

    from . import selectors

    t0 = time.perf_counter()
    if selector == "lae":
        a = analyse(model, tokenizer, table, donor_model, task, report, max_new_tokens, alignment, progress)
        return Ranking("lae", a.scores, a.prompts, a.max_new_tokens, time.perf_counter() - t0, a.alignment,
                       a.valid_steps)
    selectors.check_names([selector])
    if selector not in selectors.SELECTORS:
        raise InvalidArgument(f"unknown selector {selector!r}; use one of {', '.join(selectors.SELECTORS)}")
    ev = evidence or selectors.Evidence(model, donor_model, tokenizer, _compatible(table, report), task.prompts,
                                        max_new_tokens, greedy_steps=k)
    scores = selectors.scores(selector, ev, max_new_tokens)
    if progress:
        progress(len(task))
    return Ranking(selector, scores, len(task), max_new_tokens, time.perf_counter() - t0)


@dataclass
class Comparison:
    """Selectors side by side on the probe prompts: each one's top-K transplanted in turn,
    scored by the loss of the donor's own answers (lower = closer to the donor on the task)."""
    k: int
    baseline_loss: float                      # nothing transplanted
    rows: list[dict]                          # selector, seconds, loss, modules; best first
    chosen: str
    why: str


def compare(model, tokenizer, table: ModuleTable, donor_model, task: Task, report: CompatReport,
            max_new_tokens: int, k: int, names=COMPARED) -> Comparison:
    """Rank with every selector in `names` and pick the one whose top-K brings the target
    closest to the donor's answers on these prompts (ties: the cheaper)."""
    import time

    from . import selectors

    if not k or k < 1:
        raise InvalidArgument("comparing selectors needs k >= 1")
    ev = selectors.Evidence(model, donor_model, tokenizer, _compatible(table, report), task.prompts,
                            max_new_tokens, greedy_steps=k)
    batch = selectors._batch(ev, max_new_tokens)
    base = selectors._loss_with(ev, batch, [])
    rows = []
    for name in names:
        t0 = time.perf_counter()
        r = rank(model, tokenizer, table, donor_model, task, report, max_new_tokens, name, k=k, evidence=ev)
        chosen = top_k(r.scores, k)
        seconds = time.perf_counter() - t0          # evidence shared: later selectors reuse profiles
        rows.append({"selector": name, "seconds": round(seconds, 3), "loss": selectors._loss_with(ev, batch, chosen),
                     "modules": [str(m) for m in chosen], "description": selectors.DESCRIPTIONS[name]})
    rows.sort(key=lambda x: (x["loss"], x["seconds"]))
    best = rows[0]
    why = (f"its top-{k} brings the loss of the donor's own answers on {len(task)} probe prompts from {base:.4f} "
           f"to {best['loss']:.4f}, the lowest of {len(rows)} selectors (ranking took {best['seconds']:.2f} s)")
    return Comparison(k, base, rows, best["selector"], why)


def _compatible(table: ModuleTable, report: CompatReport) -> ModuleTable:
    return ModuleTable(table.arch, table.source, table.layers_path, table.vocab_size,
                       {r: table[r] for r in report.compatible})


def select(analysis: "lae.Analysis | Ranking", k: int) -> list[ModuleRef]:
    if k is None:
        raise InvalidArgument("give --k with --task (how many modules to transplant)")
    return top_k(analysis.scores, k)


def open_donor(spec: str, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint.open(spec, allow_pickle)
