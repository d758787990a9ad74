"""The experiment's inputs: its configuration (methods, Ks, lengths, retention tasks),
the workload it runs on (both models' table, the task's dev and test splits, the
retained tasks), and the module sets each method selects."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import selectors as sel
from ..errors import InvalidArgument
from ..refs import ModuleRef
from ..tasks import Task, load_task
from .sweep import State

REFERENCES = ("lae", "dw")       # always measured: the paper's method and the cheap baseline
EXTRAS = "+x"                    # suffix: also copy every differing norm, embedding and head weight
UNITS = {"lowrank": "every compatible module moved by the top-r singular components of its weight difference, "
                    "r chosen so the factors hold as many numbers as K average modules (K = all: full copy)",
         "ties": "TIES trim: every module's weight difference kept on its largest-magnitude entries, as many as "
                 "K average modules hold",
         "dare": "DARE: every module's weight difference kept on random entries (that share), rescaled by 1/share",
         "graft": "model grafting (Panigrahi et al. 2023): a mask over the entries learned on the donor's answers "
                  "to the probe prompts, cut to that share",
         "stitch": "Localize-and-Stitch (He et al. 2024): the mask learned with an L1 penalty, cut to that share"}

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
        the finer unit of sweep.LowRank)."""
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
    from ..zoo.tasks import TASK_NAMES

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


