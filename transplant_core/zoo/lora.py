"""A minimal LoRA (Hu et al. 2021) for nn.Linear, merged back into plain weights.

`add_lora(model, rank, alpha, targets)` swaps every matching nn.Linear for a
LoRALinear whose frozen base weight W is left as is and whose update is
`(alpha / rank) * B @ A` (A: rank x in, Gaussian init; B: out x rank, zero init, so
training starts exactly at the base model). `merge_lora(model)` folds the update
into W and puts plain nn.Linear modules back, so the result saves as an ordinary
Llama checkpoint with the same parameter names.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        lin = self.base
        with torch.no_grad():
            lin.weight += (self.lora_B @ self.lora_A * self.scale).to(lin.weight.dtype)
        return lin


def _swap(model: nn.Module, cls, make) -> int:
    hits = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, cls)]
    for name, mod in hits:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, make(name, mod))
    return len(hits)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=LLAMA_LINEARS) -> int:
    """Wrap the decoder's linear projections whose name ends in one of `targets`
    (never lm_head). Returns how many were wrapped."""
    wanted = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    count = 0

    def make(name, mod):
        nonlocal count
        if name in wanted:
            count += 1
            return LoRALinear(mod, rank, alpha)
        return mod

    _swap(model, nn.Linear, make)
    return count


def is_lora_param(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into its base weight; returns how many were merged."""
    return _swap(model, LoRALinear, lambda _n, mod: mod.merged())
