"""One module change, in the three forms a transplant takes, and how each is written down.

What a change does to one tensor whose current value is `old`:
- copy: the donor's value;
- blend: lerp(old, donor, alpha), alpha in [0, 1);
- low-rank: old + alpha * B @ A, B (out x r, holding the singular values) and A (r x in)
  the top singular directions of (donor - current), summed in a fixed order so every
  machine gets the same bits (`lowrank_update`).
A plan (transplant.Plan.value), `transplant apply`, the journal's rebuild of a weight
from its factors, the fleet (which ships records, not weights) and every engine go
through `value`. The journal keeps a low-rank weight as a `LowRankRecipe` (the digest
of the value it was applied to, its factors' digests, rank, alpha, the factors' dtype)
rather than the product, and rebuilds it with the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgument

FACTOR_DTYPE = torch.float32          # factors are computed and stored in float32


def value(old: torch.Tensor, donor: torch.Tensor | None = None, factors: tuple[torch.Tensor, torch.Tensor] | None = None,
          alpha: float = 1.0) -> torch.Tensor:
    """What a tensor becomes when its current value is `old` (same dtype and device as
    `old`): a low-rank move with `factors`, else a copy (alpha 1) or blend of `donor`.
    May return `donor` itself (a full copy on the same device and dtype)."""
    if factors is not None:
        b, a = factors
        return lowrank_update(old, b.to(old.device), a.to(old.device), alpha)
    v = donor.to(device=old.device, dtype=old.dtype)
    return torch.lerp(old, v, alpha) if alpha < 1.0 else v


def lowrank_update(old: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """old + alpha * (b @ a), in old's dtype, the same bits on every machine: the product
    is summed one rank-1 term at a time in float32 with elementwise multiplies and adds
    (each correctly rounded, in a fixed order), never by a matrix multiply, whose
    summation order depends on the library, the CPU and the thread count. A replica or a
    restart that rebuilds a weight from its journaled factors gets the digest the
    journal recorded."""
    if old.dim() != 2 or b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] \
            or (b.shape[0], a.shape[1]) != tuple(old.shape):
        raise InvalidArgument(f"low-rank factors {list(b.shape)} x {list(a.shape)} do not fit a weight of shape "
                              f"{list(old.shape)}")
    b, a = b.float(), a.float()
    delta = torch.zeros(old.shape, dtype=torch.float32, device=old.device)
    for i in range(b.shape[1]):
        delta.add_(b[:, i:i + 1] * a[i:i + 1, :])
    if alpha != 1.0:
        delta = delta * float(alpha)
    return (old.float() + delta).to(old.dtype)


def difference_svd(donor: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of (donor - current), in float32."""
    delta = donor.float() - current.detach().float().to(donor.device)
    return torch.linalg.svd(delta, full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` factors (B, A) of an SVD: B = U_r * S_r (out x r), A = Vh_r (r x in)."""
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


@dataclass(frozen=True)
class LowRankRecipe:
    """How the journal rebuilds low-rank weight `key`: its value `of` (a digest) moved by
    factors B and A (digests of their stored bytes), rank, alpha, in the factors' dtype."""
    key: str
    of: str
    b: str
    a: str
    rank: int
    alpha: float
    dtype: str = "float32"

    def to_doc(self) -> dict:
        return {"key": self.key, "of": self.of, "B": self.b, "A": self.a, "rank": self.rank, "alpha": self.alpha,
                "dtype": self.dtype}

    @classmethod
    def from_doc(cls, d: dict) -> "LowRankRecipe":
        # (journals written before the dtype was recorded: float32, the only one there was)
        return cls(d["key"], d["of"], d["B"], d["A"], int(d["rank"]), float(d["alpha"]), d.get("dtype", "float32"))

    def factor(self, stored: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """A factor from its stored object (addressed by bytes: give it its dtype and shape)."""
        dtype = getattr(torch, self.dtype)
        return stored.reshape(-1).view(torch.uint8).view(dtype).reshape(shape)

    def apply(self, old: torch.Tensor, b_stored: torch.Tensor, a_stored: torch.Tensor) -> torch.Tensor:
        out, inp = old.shape
        b, a = self.factor(b_stored, (out, self.rank)), self.factor(a_stored, (self.rank, inp))
        return value(old, factors=(b, a), alpha=self.alpha)
