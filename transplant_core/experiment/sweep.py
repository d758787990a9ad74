"""Model states of the experiment and their evaluation.

A State names one transplanted target: whole modules from the donor (the paper's
unit), optionally with the non-linear parameters the paper leaves out (+x), or
every module moved only by the top-r singular directions of its weight difference
(a unit finer than a module). The Sweep commits a state into the target, evaluates
it once, and reverts bitwise (transplant.commit / revert); every path, including the
synthetic low-rank donor, goes through transplant.plan.

Greedy decoding to a shorter length is a prefix of decoding to a longer one, so the
Evaluator decodes each state once at the longest L and scores every L by cutting
the tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import change
from .. import transplant as tp
from ..arch import ModuleInfo, ModuleTable
from ..checkpoint import DictTensors
from ..generation import greedy
from ..refs import ModuleRef
from ..sparse import Sparse
from ..tasks import Task, score

Outcome = dict   # {L: {block: bool ndarray}}; blocks: "dev", "test", each retention task (its test
#                  questions) and DEV + each retention task (its dev questions)
DEV = "dev:"


@dataclass(frozen=True)
class State:
    """The target with `refs` from the donor; with every differing non-linear parameter
    too when `extras`; or, when `rank` is set, with each of `refs` moved toward the
    donor by the top-`rank` singular components of its weight difference only."""

    refs: frozenset
    extras: bool = False
    rank: int | None = None
    sparse: tuple | None = None      # (unit, share of entries kept, decoding length): transplant_core.sparse


def extras_table(table: ModuleTable, target, donor) -> ModuleTable:
    """The parameters the paper never transplants (norms, embeddings, output head) that
    differ between the two models and could be copied (same shape and dtype), as
    pseudo-modules: per-layer ones under their layer, the rest under layer
    `num_layers` (one past the stack). They go through the same plan/commit/revert."""
    linear = {k for info in table.modules.values() for k in info.keys}
    dparams = dict(donor.named_parameters())
    prefix = table.layers_path + "."
    modules = {}
    for key, p in target.named_parameters():
        d = dparams.get(key)
        if key in linear or d is None or d.shape != p.shape or d.dtype != p.dtype or torch.equal(d, p):
            continue
        if key.startswith(prefix):
            layer, _, rest = key[len(prefix):].partition(".")
            ref = ModuleRef(int(layer), "x." + rest.removesuffix(".weight").replace(".", "_"))
        else:
            ref = ModuleRef(table.num_layers, "x." + key.removesuffix(".weight").replace(".", "_"))
        modules[ref] = ModuleInfo(ref, key.removesuffix(".weight"), key, tuple(p.shape),
                                  str(p.dtype).removeprefix("torch."))
    return ModuleTable(table.arch, "extras", table.layers_path, table.vocab_size, modules)


def lowrank_rank(table: ModuleTable, k: int) -> int | None:
    """The rank whose factors (r x (in + out) numbers per module, over every module) hold
    as many numbers as k average whole modules; None (a full copy) at k = every module."""
    m = len(table.modules)
    if k >= m:
        return None
    total = sum(info.out_in[0] * info.out_in[1] for info in table.modules.values())
    per_rank = sum(sum(info.out_in) for info in table.modules.values())
    return max(1, int(k * total / (m * per_rank)))


class LowRank:
    """Synthetic donors W_target + U_r S_r V_r^T, from the SVD of W_donor - W_target
    (computed once per module). Biases, being vectors, are copied whole."""

    def __init__(self, table: ModuleTable, target, donor_src):
        self.table, self.src = table, donor_src
        self.params = dict(target.named_parameters())
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if key not in self._svd:
            self._svd[key] = change.difference_svd(self.src.get(key), self.params[key])
        return self._svd[key]

    def source(self, refs, rank: int) -> DictTensors:
        values = {}
        for ref in refs:
            info = self.table[ref]
            u, s, vh = self._factors(info.weight_key)
            w = self.params[info.weight_key].detach()
            # the truncation and the update the runtime's low-rank transplant makes
            values[info.weight_key] = change.value(w, factors=change.truncate(u, s, vh, rank))
            if info.bias_key:
                values[info.bias_key] = self.src.get(info.bias_key)
        return DictTensors(values, name=f"donor (rank-{rank} weight differences)")


MAIN = ("dev", "test")


class Evaluator:
    """Decodes every question block once per model state, at the longest L, and scores
    the task's blocks (MAIN) at each L by cutting the tokens. Retention blocks are
    always scored at the longest L: the decoding length is the task's budget, and what a
    transplant costs other tasks should not be hidden by answers cut short."""

    def __init__(self, tokenizer, blocks: dict[str, Task], lengths: list[int], batch_size: int):
        self.tokenizer, self.lengths, self.batch_size = tokenizer, sorted(lengths), batch_size
        self.blocks = blocks
        self.examples = [(b, e) for b, t in blocks.items() for e in t.examples]

    def __call__(self, model) -> Outcome:
        longest = max(self.lengths)
        comps = greedy(model, self.tokenizer, [e.prompt for _, e in self.examples], longest, self.batch_size)
        out: Outcome = {}
        for L in self.lengths:
            hits: dict[str, list[bool]] = {b: [] for b in self.blocks}
            for (b, e), c in zip(self.examples, comps):
                cut = L if b in MAIN else longest
                hits[b].append(score(self.tokenizer.decode(c.token_ids[:cut], skip_special_tokens=True),
                                     e.answer, e.scorer))
            out[L] = {b: np.array(v, dtype=bool) for b, v in hits.items()}
        return out


class Sweep:
    """Evaluates model states on the target, each once, reverting bitwise after each."""

    def __init__(self, target, table: ModuleTable, extras: ModuleTable, donor_src, evaluator: Evaluator):
        self.target, self.table, self.extras, self.src, self.evaluate = target, table, extras, donor_src, evaluator
        self.lowrank = LowRank(table, target, donor_src)
        self.sparse = Sparse(table, target, donor_src)
        self.cache: dict[State, Outcome] = {}

    def _parts(self, state: State):
        refs = sorted(state.refs)
        if state.sparse is not None:
            src = self.sparse.source(refs, *state.sparse)
        else:
            src = self.src if state.rank is None else self.lowrank.source(refs, state.rank)
        yield self.table, src, refs
        if state.extras:
            yield self.extras, self.src, self.extras.refs()

    def __call__(self, state: State) -> Outcome:
        if state.extras and not self.extras.modules:      # nothing non-linear differs: the same state
            state = State(state.refs, False, state.rank, state.sparse)
        if state not in self.cache:
            with contextlib.ExitStack() as undo:
                for table, src, refs in self._parts(state):
                    if refs:
                        snap = tp.commit(self.target, tp.plan(table, src, refs))
                        undo.callback(tp.revert, self.target, table, snap)
                self.cache[state] = self.evaluate(self.target)
        return self.cache[state]
