"""Faster CPU kernels for the float32 linear layers of a loaded model.

On CPU, torch sends a float32 `nn.Linear` to MKL's sgemm, whose small-M (decode: one row
per sequence) performance and threading are poor on some CPUs (measured on an AMD EPYC,
2 threads: a [8, 1024] x [1024, 2816] matmul 1.18 ms, the same through oneDNN 0.48 ms;
a 300M Llama's decode step with 8 rows 184 -> 126 ms). `use_onednn(model)` changes the
class of each large enough plain `nn.Linear` to `OneDNNLinear`, whose forward calls
oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU backend
emits) on the same dense weight: no copy, no packed second weight, so a transplant that
replaces the parameter is read by the next forward as before, and copies of the module
(`transplant.derive`) keep the class.

Below `MIN_ELEMENTS` weight elements oneDNN's per-call overhead makes it slower than MKL
(a 256 x 704 matmul: 0.99x at 8 rows; 128 x 384: about 0.35x), so those stay on torch's
kernel. Anything the kernel does not cover falls back to `F.linear` per call: other dtypes
than float32, tensors off the CPU (or on the meta device), a bias that is not contiguous
(oneDNN would misread it), and autograd (the kernel has no backward). Results equal torch's within float32 rounding (the reduction order differs), so
greedy decoding can pick another token where two logits tie to ~1e-6; set
`TRANSPLANT_LINEAR_KERNEL=torch` to keep torch's kernel everywhere (e.g. to compare tokens
bit for bit with plain transformers).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InvalidArgument

MIN_ELEMENTS = 1 << 19      # 512 x 1024: from here oneDNN is >= 1.1x MKL at 1-16 rows on 2 threads
ENV = "TRANSPLANT_LINEAR_KERNEL"


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def wanted() -> bool:
    """Whether loaders should switch models to oneDNN: unless TRANSPLANT_LINEAR_KERNEL=torch
    (unset or empty: onednn)."""
    choice = os.environ.get(ENV, "").strip().lower() or "onednn"
    if choice not in ("onednn", "torch"):
        raise InvalidArgument(f"{ENV} must be 'onednn' or 'torch', not {choice!r}")
    return choice == "onednn" and available()


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose float32 CPU inference forward runs oneDNN's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
                and w.device.type == "cpu" and (b is None or (b.dtype is torch.float32 and b.is_contiguous()))
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                      or (b is not None and b.requires_grad)))):
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)


def use_onednn(model: nn.Module, min_elements: int = MIN_ELEMENTS) -> int:
    """Switch each plain `nn.Linear` of `model` with at least `min_elements` weight elements
    to `OneDNNLinear` in place; returns how many. Subclasses (LoRA, quantised layers) are
    left as they are."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.in_features * m.out_features >= min_elements:
            m.__class__ = OneDNNLinear
            n += 1
    return n
