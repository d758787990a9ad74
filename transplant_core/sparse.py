"""Sparse task vectors: the donor's weight difference kept on a share of its entries,
the literature's parameter-level baselines for the experiment (units, like lowrank: they
touch every module, and K sets their budget: the share of entries kept equals K
average modules' share of all linear weights).

  ties    TIES-merging's trim (Yadav et al. 2023): keep the entries of each weight's
          difference with the largest magnitude. With one donor its sign election and
          disjoint mean keep every kept entry as it is.
  dare    DARE (Yu et al. 2024): keep each entry at random with probability d and
          rescale the kept ones by 1/d (seeded per tensor).
  graft   model grafting / skill localisation (Panigrahi et al. 2023): a mask over the
          entries, learned by gradient descent on a sigmoid relaxation so that
          target + mask * difference reproduces the donor's own answers to the probe
          prompts (their task loss; we have no labels), initialised with the
          largest-magnitude entries; the learned scores' top share (over the whole
          model) is kept.
  stitch  Localize-and-Stitch's localisation (He et al. 2024): the same relaxation from
          a neutral start with an L1 penalty on the mask; with one donor, stitching is
          grafting the localised entries.

Masks are learned on the probe prompts only: graft's once per decoding length and
budget (started from that budget's largest entries, as Panigrahi et al. learn one mask
per sparsity), stitch's once per decoding length and cut at each budget (as
Localize-and-Stitch keeps the top share of its learned mask).
"""
from __future__ import annotations

import zlib

import torch

from .arch import ModuleTable
from .checkpoint import DictTensors

KINDS = ("ties", "dare", "graft", "stitch")
LEARNED = ("graft", "stitch")


def unit_density(table: ModuleTable, k: int) -> float | None:
    """The share of weight entries as many as k average modules hold; None (a full
    copy) at k = every module."""
    m = len(table.modules)
    return None if k >= m else k / m


class Sparse:
    """Synthetic donors: target + the sparsified weight difference of every module in
    `refs` (biases, being vectors, copied whole, as lowrank does)."""

    def __init__(self, table: ModuleTable, target, donor_src, seed: int = 0):
        self.table, self.src, self.seed = table, donor_src, seed
        self.params = dict(target.named_parameters())
        # (kind, L, share or None) -> key -> scores: graft per share, stitch once (None)
        self.learned: dict[tuple, dict[str, torch.Tensor]] = {}
        self._deltas: dict[str, torch.Tensor] = {}

    def delta(self, key: str) -> torch.Tensor:
        if key not in self._deltas:
            self._deltas[key] = self.src.get(key).float() - self.params[key].detach().float()
        return self._deltas[key]

    def kept(self, kind: str, density: float, length: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """{weight key: the kept (and, for dare, rescaled) difference}."""
        out = {}
        if kind in LEARNED:
            scores = self.learned[learned_key(kind, length, density)]
            flat = torch.cat([scores[k].flatten() for k in keys])
            n = max(1, round(density * flat.numel()))
            cut = torch.topk(flat, n).values.min()
            for k in keys:
                out[k] = self.delta(k) * (scores[k] >= cut)
            return out
        for k in keys:
            d = self.delta(k)
            if kind == "ties":
                n = max(1, round(density * d.numel()))
                cut = torch.topk(d.abs().flatten(), n).values.min()
                out[k] = d * (d.abs() >= cut)
            elif kind == "dare":
                g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{k}".encode()))
                keep = torch.rand(d.shape, generator=g) < density
                out[k] = d * keep / density
            else:
                raise ValueError(f"unknown sparse unit {kind!r}")
        return out

    def source(self, refs, kind: str, density: float, length: int) -> DictTensors:
        infos = [self.table[r] for r in refs]
        kept = self.kept(kind, density, length, [i.weight_key for i in infos])
        values = {}
        for info in infos:
            w = self.params[info.weight_key].detach()
            values[info.weight_key] = (w.float() + kept[info.weight_key]).to(w.dtype)
            if info.bias_key:
                values[info.bias_key] = self.src.get(info.bias_key)
        return DictTensors(values, name=f"donor ({kind}, {density:.3f} of the weight differences)")


def learned_key(kind: str, length: int, density: float) -> tuple:
    return (kind, length, density if kind == "graft" else None)


def learn(ev, length: int, kind: str, sparse: Sparse, steps: int = 60, lr: float = 0.1,
          init_density: float = 0.1, l1: float = 0.5, trace: list | None = None) -> dict[str, torch.Tensor]:
    """Mask scores (logits) per weight entry, learned on the loss of the donor's own
    answers (selectors' evidence `ev`) of target + sigmoid(scores) * difference (plus
    the L1 term for stitch; each step's objective is appended to `trace`)."""
    from torch import nn
    from torch.func import functional_call

    from . import selectors

    b = selectors._batch(ev, length)
    keys = [ev.table[r].weight_key for r in ev.refs()]
    base = {k: sparse.params[k].detach() for k in keys}
    deltas = {k: sparse.delta(k).to(base[k].dtype) for k in keys}
    if kind == "graft":      # start from the largest-magnitude entries, as Panigrahi et al.
        flat = torch.cat([deltas[k].abs().flatten() for k in keys])
        cut = torch.topk(flat, max(1, round(init_density * flat.numel()))).values.min()
        logits = {k: torch.where(deltas[k].abs() >= cut, 3.0, -3.0) for k in keys}
    else:
        logits = {k: torch.zeros_like(deltas[k]) for k in keys}
    logits = {k: v.float().requires_grad_(True) for k, v in logits.items()}
    opt = torch.optim.Adam(list(logits.values()), lr=lr)
    frozen = [p for p in ev.target.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():          # callers may run under no_grad
            for _ in range(steps):
                masks = {k: torch.sigmoid(v) for k, v in logits.items()}
                over = {k: base[k] + (masks[k] * deltas[k]).to(base[k].dtype) for k in keys}
                out = functional_call(ev.target, over, (), {"input_ids": b.ids, "attention_mask": b.mask,
                                                              "position_ids": b.positions, "use_cache": False})
                loss = nn.functional.cross_entropy(out.logits.float().flatten(0, 1), b.labels.flatten(),
                                                   ignore_index=-100)
                if kind == "stitch":
                    loss = loss + l1 * torch.cat([m.flatten() for m in masks.values()]).mean()
                if trace is not None:
                    trace.append(float(loss.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {k: v.detach() for k, v in logits.items()}
