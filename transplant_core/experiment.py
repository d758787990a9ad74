"""The experiment: the paper's tables on one (target, donor, task) setting, with the
controls the paper lacks.

For every decoding length L and transplant strength K it measures, on a dev and a
disjoint test split of the task: accuracy after transplanting the top-K modules of
each selector (paper-exact LAE, weight-difference norm, and any of selectors.py),
K random compatible modules (several draws), TIR and Recovery with paired bootstrap
intervals, retention on other tasks, and the attention/FFN composition of the top-K.
Best K is chosen on dev and reported on test; the paper's in-sample choice (best K
on the full set) is reported separately, labelled as such.

This module: configuration, inputs, selection and the run. experiment_sweep holds
the model states and their evaluation, experiment_numbers the arithmetic of the
results document, experiment_report its rendering. Both models load once; each
distinct state is committed, evaluated once and reverted bitwise, however many
(method, K, L) rows name it.

Nothing here prints; `progress(stage, done, total)` reports where it is.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import selectors as sel
from . import sparse
from . import transplant as tp
from .arch import ModuleTable
from .checkpoint import ModelTensors
from .errors import InvalidArgument
from .experiment_numbers import EXTRAS, REFERENCES, UNITS, assemble
from .experiment_sweep import DEV, Evaluator, State, Sweep, extras_table, lowrank_rank
from .export import versions
from .refs import ModuleRef
from .selection import random_k, top_k
from .tasks import Task, load_task
from .workflow import compatibility, open_model

Progress = Callable[[str, int, int], None]
DEFAULT_KS = ("1", "2", "4", "8", "16", "all")
DEFAULT_LENGTHS = (8,)


@dataclass(frozen=True)
class ExperimentConfig:
    target: str
    donor: str
    task: str
    ks: tuple[str, ...] = DEFAULT_KS            # integers or "all"
    max_new_tokens: tuple[int, ...] = DEFAULT_LENGTHS
    retain: tuple[str, ...] | None = None       # None: the other zoo tasks for a zoo task, else none
    seeds: int = 5                              # random-module draws per K
    selectors: tuple[str, ...] = REFERENCES
    n: int | None = None                        # questions per split (dev and test); None: all
    n_probe: int = 64                           # diagnostic prompts for the selectors
    n_retain: int = 100                         # questions per retention task, in each of its dev and test
    n_boot: int = 2000
    batch_size: int = 256
    seed: int = 0
    greedy_steps: int | None = None             # None: up to the largest K below all
    allow_pickle: bool = False

    def validate(self) -> "ExperimentConfig":
        for k in self.ks:
            if k != "all" and not (str(k).isdigit() and int(k) >= 1):
                raise InvalidArgument(f"--ks: {k!r} is neither a positive integer nor 'all'")
        if not self.ks:
            raise InvalidArgument("--ks: give at least one K (e.g. 1,2,4,8,all)")
        if not self.max_new_tokens or min(self.max_new_tokens) < 1:
            raise InvalidArgument(f"--max-new-tokens: each length must be >= 1, got {list(self.max_new_tokens)}")
        for name, v, lo in (("--seeds", self.seeds, 1), ("--n-probe", self.n_probe, 1),
                            ("--n-retain", self.n_retain, 1), ("--n-boot", self.n_boot, 100),
                            ("--batch-size", self.batch_size, 1)):
            if v < lo:
                raise InvalidArgument(f"{name} must be at least {lo}, got {v}")
        if self.n is not None and self.n < 2:
            raise InvalidArgument(f"--n must be at least 2 questions per split, got {self.n}")
        check_methods(self.selectors)
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods run: paper LAE and dW always, then the requested ones (a selector
        name ending in +x also copies every differing non-linear parameter; lowrank is
        the finer unit of experiment_sweep.LowRank)."""
        return tuple(dict.fromkeys(REFERENCES + check_methods(self.selectors)))

    def command(self) -> str:
        """The canonical command line that reruns this experiment."""
        parts = ["transplant", "experiment", "--target", self.target, "--donor", self.donor, "--task", self.task,
                 "--ks", ",".join(map(str, self.ks)), "--max-new-tokens", ",".join(map(str, self.max_new_tokens)),
                 "--seeds", str(self.seeds), "--selectors", ",".join(self.methods)]
        if self.retain is not None:
            parts += ["--retain", ",".join(self.retain) or "none"]
        for flag, v, default in (("--n", self.n, None), ("--n-probe", self.n_probe, 64),
                                 ("--n-retain", self.n_retain, 100), ("--n-boot", self.n_boot, 2000),
                                 ("--seed", self.seed, 0), ("--greedy-steps", self.greedy_steps, None)):
            if v != default:
                parts += [flag, str(v)]
        return " ".join(parts)


def check_methods(names) -> tuple[str, ...]:
    """Selector names (each optionally with the +x suffix) and units; 'all' = every
    selector and unit, without +x."""
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n in ("", "random"):
            continue
        if n == "all":
            out += sel.SELECTORS + tuple(UNITS)
            continue
        if n.removesuffix(EXTRAS) not in UNITS:
            sel.check_names([n.removesuffix(EXTRAS)])      # raises, naming the valid ones
        out.append(n)
    return tuple(dict.fromkeys(out))


# ---- inputs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    dev: Task
    test: Task
    probe: Task
    retain: dict[str, Task]        # test questions of each retention task (reported)
    retain_dev: dict[str, Task] = field(default_factory=dict)   # dev questions (the retention-safe K rule)
    keep: tuple[str, ...] = ()     # other tasks' prompts, disjoint from their evaluated ones (greedy_keep)


def _is_zoo(spec: str) -> bool:
    return spec.startswith("zoo:")


def default_retain(task: str) -> tuple[str, ...]:
    if not _is_zoo(task):
        return ()
    from .zoo.tasks import TASK_NAMES

    return tuple(f"zoo:{t}" for t in TASK_NAMES if f"zoo:{t}" != task)


def load_workload(cfg: ExperimentConfig) -> Workload:
    """Dev/test/probe splits of the task (zoo: its own splits; a JSONL file: even/odd
    halves, the probe taken from the dev half) and the retention tasks' dev and test
    splits (a JSONL file: its halves), with a few more of their prompts for greedy_keep."""
    if _is_zoo(cfg.task):
        dev, test = load_task(cfg.task, cfg.n, "dev"), load_task(cfg.task, cfg.n, "test")
        probe = load_task(cfg.task, cfg.n_probe, "probe")
    else:
        dev, test = load_task(cfg.task).split()
        probe, dev, test = dev.head(cfg.n_probe), dev.head(cfg.n), test.head(cfg.n)
    if len(dev) < 2 or len(test) < 2:
        raise InvalidArgument(f"task {cfg.task} has too few questions for a dev/test split ({len(dev)}/{len(test)})")
    retain_specs = default_retain(cfg.task) if cfg.retain is None else cfg.retain
    retain, retain_dev, keep = {}, {}, []
    per_task = max(1, cfg.n_probe // max(1, len(retain_specs)))
    for spec in retain_specs:
        if spec == cfg.task:
            raise InvalidArgument(f"--retain {spec}: that is the task itself; retention is measured on OTHER tasks")
        if _is_zoo(spec):
            retain_dev[spec], retain[spec] = (load_task(spec, cfg.n_retain, sp) for sp in ("dev", "test"))
            keep += load_task(spec, per_task, "probe").prompts
        else:
            half_dev, half_test = load_task(spec).split()
            retain_dev[spec], retain[spec] = half_dev.head(cfg.n_retain), half_test.head(cfg.n_retain)
            keep += half_dev.prompts[cfg.n_retain:cfg.n_retain + per_task]
    return Workload(dev, test, probe, retain, retain_dev, tuple(keep))


def resolve_ks(ks, m: int) -> tuple[list[int], list[str]]:
    """K values as integers within [1, m], sorted; and a note for each one dropped."""
    out, notes = set(), []
    for k in ks:
        v = m if k == "all" else int(k)
        if v > m:
            notes.append(f"K={v} dropped: only {m} compatible modules")
        else:
            out.add(v)
    if not out:
        raise InvalidArgument(f"no K in {list(ks)} is within 1..{m} (the compatible modules)")
    return sorted(out), notes


def compatible_table(table: ModuleTable, refs) -> ModuleTable:
    return ModuleTable(table.arch, table.source, table.layers_path, table.vocab_size, {r: table[r] for r in refs})



def blocks(work: Workload) -> dict[str, Task]:
    """The question blocks every state is evaluated on."""
    return {"dev": work.dev, "test": work.test, **work.retain, **{DEV + k: v for k, v in work.retain_dev.items()}}


# ---- the run ----------------------------------------------------------------------------

@dataclass
class Selections:
    """Which modules each method picks: scores[method][L], sets[(method, L, K)], random[K] = draws."""

    scores: dict[str, dict[int, dict[ModuleRef, float]]] = field(default_factory=dict)
    sets: dict[tuple[str, int, int], list[ModuleRef]] = field(default_factory=dict)
    random: dict[int, list[list[ModuleRef]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    traces: dict[str, list[float]] = field(default_factory=dict)

    ranks: dict[tuple[str, int, int], int | None] = field(default_factory=dict)
    sparse: dict[tuple[str, int, int], tuple | None] = field(default_factory=dict)
    learned: dict[tuple, dict] = field(default_factory=dict)     # sparse.learned_key -> learned mask scores

    def state(self, name: str, L: int, k: int) -> State:
        return State(frozenset(self.sets[(name, L, k)]), name.endswith(EXTRAS), self.ranks.get((name, L, k)),
                     self.sparse.get((name, L, k)))

    def draws(self, k: int) -> list[State]:
        return [State(frozenset(d)) for d in self.random[k]]


def select_all(cfg: ExperimentConfig, ev: sel.Evidence, ks: list[int], lengths: list[int],
               progress: Progress) -> Selections:
    s = Selections()
    for i, name in enumerate(cfg.methods):
        progress(f"selector {name}", i, len(cfg.methods))
        t0 = time.perf_counter()
        unit = name.removesuffix(EXTRAS)
        if unit in UNITS:     # every module; K sets the rank (lowrank) or the share of entries kept
            for L in lengths:
                for k in ks:
                    d = sparse.unit_density(ev.table, k)
                    key = sparse.learned_key(unit, L, d)
                    if unit in sparse.LEARNED and d is not None and key not in s.learned:
                        sp = sparse.Sparse(ev.table, ev.target, ev.donor_source())
                        s.learned[key] = sparse.learn(ev, L, unit, sp, init_density=d)
                    s.sets[(name, L, k)] = ev.refs()
                    if unit == "lowrank":
                        s.ranks[(name, L, k)] = lowrank_rank(ev.table, k)
                    else:
                        # a learned mask depends on L (the donor's answers); trim and drop do not
                        s.sparse[(name, L, k)] = None if d is None else (unit, d, L if unit in sparse.LEARNED else 0)
            s.seconds[name] = round(time.perf_counter() - t0, 3)
            continue
        base = name.removesuffix(EXTRAS)
        s.scores[name] = {}
        for L in lengths:
            if base in s.scores and L in s.scores[base]:
                s.scores[name][L] = s.scores[base][L]
            elif base in sel.LENGTH_FREE and s.scores[name]:
                s.scores[name][L] = next(iter(s.scores[name].values()))
            else:
                s.scores[name][L] = sel.scores(base, ev, L)
            for k in ks:
                s.sets[(name, L, k)] = top_k(s.scores[name][L], k)
        s.seconds[name] = round(time.perf_counter() - t0, 3)
    progress("selectors", len(cfg.methods), len(cfg.methods))
    s.traces = {k.replace("_trace", "@L"): v for k, v in ev._cache.items() if "_trace" in k}
    refs = ev.refs()
    for k in ks:
        s.random[k] = [random_k(refs, k, seed=_draw_seed(cfg.seed, k, d)) for d in range(cfg.seeds)]
    return s


def _draw_seed(seed: int, k: int, draw: int) -> int:
    return random.Random(f"{seed}/{k}/{draw}").randrange(2 ** 31)


def run(cfg: ExperimentConfig, progress: Progress | None = None) -> dict:
    """Run the whole experiment; returns the results document (built by `assemble`)."""
    cfg.validate()
    progress = progress or (lambda *_: None)
    t_start = time.perf_counter()
    progress("loading models", 0, 2)
    target, donor = open_model(cfg.target, cfg.allow_pickle), open_model(cfg.donor, cfg.allow_pickle)
    progress("loading models", 2, 2)
    compat = compatibility(target.table, donor.table)
    table = compatible_table(target.table, compat.compatible)
    m = len(table.modules)
    ks, notes = resolve_ks(cfg.ks, m)
    lengths = sorted(set(cfg.max_new_tokens))
    work = load_workload(cfg)
    evaluator = Evaluator(target.tokenizer, blocks(work), lengths, cfg.batch_size)
    digest = tp.model_digest(target.model)
    timings = {}

    progress("baselines", 0, 2)
    t0 = time.perf_counter()
    base_t, base_d = evaluator(target.model), evaluator(donor.model)
    timings["baselines"] = round(time.perf_counter() - t0, 2)
    progress("baselines", 2, 2)

    t0 = time.perf_counter()
    ev = sel.Evidence(target.model, donor.model, target.tokenizer, table, work.probe.prompts, max(lengths),
                      greedy_steps=cfg.greedy_steps or max([k for k in ks if k < m], default=m),
                      keep_prompts=list(work.keep))
    s = select_all(cfg, ev, ks, lengths, progress)
    timings["selection"] = round(time.perf_counter() - t0, 2)

    extras = extras_table(table, target.model, donor.model)
    sweep = Sweep(target.model, table, extras, ModelTensors(donor.model, cfg.donor), evaluator)
    sweep.sparse.learned.update(s.learned)
    sweep.cache[State(frozenset())] = base_t
    todo = list(dict.fromkeys([s.state(*key) for key in s.sets] + [d for k in ks for d in s.draws(k)]))
    t0 = time.perf_counter()
    for i, key in enumerate(todo):
        progress("transplant + evaluate", i, len(todo))
        sweep(key)
    progress("transplant + evaluate", len(todo), len(todo))
    timings["sweep"] = round(time.perf_counter() - t0, 2)
    restored = tp.model_digest(target.model) == digest

    doc = assemble(cfg, work, table, ks, lengths, base_t, base_d, s, sweep)
    doc["setting"].update(compatible_modules=m, dropped_ks=notes, model_states_evaluated=len(sweep.cache) + 1,
                          target_restored_bitwise=restored,
                          extras=[{"name": str(r), "key": i.weight_key} for r, i in sorted(extras.modules.items())])
    doc["selector_seconds"] = s.seconds
    doc["greedy_traces"] = s.traces
    doc["timings_s"] = dict(timings, total=round(time.perf_counter() - t_start, 2))
    doc["command"] = cfg.command()
    doc["argv"] = list(sys.argv)
    doc["versions"] = dict(versions(), torch_threads=torch.get_num_threads())
    doc["config"] = asdict(cfg)
    return doc

