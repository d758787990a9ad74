"""Tensor values by digest: the base's, recent ones kept in memory, stored objects, and
low-rank weights rebuilt from their recipes; every one verified against its digest."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transplant_core import transplant as tp
from transplant_core.change import LowRankRecipe
from transplant_core.errors import PreconditionFailed

from .records import StoreDamaged
from .store import TensorStore


class Values:
    def __init__(self, base: nn.Module, store: TensorStore, legacy: Callable[[int], dict[str, torch.Tensor]],
                 where: Path):
        self.store = store
        self.base_params = {k: p.detach() for k, p in base.named_parameters()}
        self.base_sums: dict[str, str] = {}            # generation 0's checksums, set once it is known
        self.recent: dict[str, torch.Tensor] = {}      # digest -> tensor: live overrides + last replaced
        self.recipes: dict[str, LowRankRecipe] = {}    # digest -> how to rebuild it (low-rank)
        self._legacy = legacy
        self._where = where                            # the state directory, for messages

    def learn(self, derived: dict[str, dict]) -> None:
        """Remember how to rebuild low-rank weights; the first recipe of a digest stays (any
        recipe of it rebuilds the same bits)."""
        for d, r in derived.items():
            if r.get("of") != d:
                self.recipes.setdefault(d, LowRankRecipe.from_doc(r))

    def load_state(self, state: dict[str, str], gen: int) -> dict[str, torch.Tensor]:
        """A generation's override set {key: digest} as tensors: from memory when recent,
        else from the store (or a pre-store per-generation file), verified."""
        out: dict[str, torch.Tensor] = {}
        legacy: dict[str, torch.Tensor] | None = None
        for k, digest in state.items():
            t = self.find(digest)
            if t is None:
                if legacy is None:
                    legacy = self._legacy(gen)
                t = legacy.get(k)
                if t is None or tp.tensor_digest(t) != digest:
                    raise StoreDamaged(f"tensor {k} of generation {gen} ({digest}) is missing from the tensor "
                                       f"store in {self.store.dir}", digest)
            out[k] = self.typed(k, t)
        return out

    def value(self, k: str, digest: str) -> torch.Tensor:
        """Tensor `k` by digest: the base's, a recent one, a stored one, or rebuilt."""
        if digest == self.base_sums.get(k):
            return self.base_params[k]
        t = self.find(digest)
        if t is None:
            raise StoreDamaged(f"tensor {k} ({digest}) is missing from the tensor store in {self.store.dir}", digest)
        return self.typed(k, t)

    def find(self, digest: str) -> torch.Tensor | None:
        """A tensor by digest from memory, the store, or its low-rank recipe (None: none has it)."""
        t = self.recent.get(digest)
        if t is None:
            t = self.store.read(digest)
        if t is None and digest in self.recipes:
            t = self._rebuild(digest)
        return t

    def _rebuild(self, digest: str) -> torch.Tensor:
        """A low-rank weight from its recipe: the value it was applied to (stored, recent,
        the base's, or itself rebuilt: a chain of low-rank generations on one weight is
        walked back to a value at hand, then replayed forward) moved by its factors, each
        step verified against its digest."""
        chain, d, seen = [], digest, set()
        while True:
            r = self.recipes[d]
            if d in seen:
                raise PreconditionFailed(f"the low-rank recipes of tensor {r.key} form a loop; the journal in "
                                         f"{self._where} is damaged")
            seen.add(d)
            chain.append(r)
            d = r.of
            if d == self.base_sums.get(r.key) or d in self.recent or self.store.has(d) or d not in self.recipes:
                break
        k = chain[-1].key
        t = self.value(k, chain[-1].of)
        for r, want in zip(reversed(chain), [c.of for c in reversed(chain[:-1])] + [digest]):
            t = r.apply(t, self._factor(r.b), self._factor(r.a))
            if tp.tensor_digest(t) != want:
                raise StoreDamaged(f"tensor {k} rebuilt from its low-rank factors does not match its digest "
                                   f"{want[:12]}; the store in {self.store.dir} is damaged", want)
        return t

    def _factor(self, digest: str) -> torch.Tensor:
        t = self.recent.get(digest)
        if t is None:
            t = self.store.read(digest)
        if t is None:
            raise StoreDamaged(f"low-rank factor {digest} is missing from the tensor store in {self.store.dir}",
                               digest)
        return t

    def typed(self, k: str, t: torch.Tensor) -> torch.Tensor:
        """The store is addressed by bytes alone, so two tensors with equal bytes but another
        shape or dtype (zeroed up and down projections) share one object: give the bytes
        the shape and dtype of the parameter they are read for."""
        want = self.base_params[k]
        if t.dtype == want.dtype and t.shape == want.shape:
            return t
        return t.reshape(-1).view(torch.uint8).view(want.dtype).reshape(want.shape)

    def named(self) -> set[str]:
        """Every digest a recipe needs (its factors)."""
        return {d for r in self.recipes.values() for d in (r.b, r.a)}
