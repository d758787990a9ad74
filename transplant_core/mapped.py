"""A model whose weights stay in the checkpoint's files: the module tree built on the meta
device, every parameter a read-only view of its safetensors file's memory map.

What the vLLM paths hold instead of a second copy of the model (vLLM has the one that
serves): the module table, the plan's checks and a transplant's new tensors need the
parameters' names, shapes and, for a few modules, values; none needs all of them in
memory at once. A page of the file is read when a tensor is (a checksum, a weight-only
selector, the old value of a module being replaced) and `release` gives the pages back,
so the resident memory stays the handful of modules in use, whatever the model's size.

The map is private (copy-on-write): nothing writes the base's tensors (generations copy
the modules they change), and a write could never reach the checkpoint on disk. The
model cannot run a forward pass (its non-persistent buffers stay on the meta device):
probes and evaluation go through the engine that serves it."""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from torch import nn

from .checkpoint import _ST_TORCH, _open_safetensors, check_causal_lm, skeleton, weight_files
from .errors import InvalidArgument


class NotMappable(InvalidArgument):
    """The checkpoint's tensors are not the model's parameters one for one (transformers
    renames or fuses them on load: GPT-NeoX's head, Mixtral's experts): they cannot be
    used in place."""


class Mapping:
    """The memory maps of a checkpoint's safetensors files, and where each tensor lies."""

    def __init__(self):
        self._maps: list[mmap.mmap] = []
        self._files = []
        self.where: dict[str, tuple[mmap.mmap, int, int]] = {}   # checkpoint key -> (map, start, bytes)

    def open(self, f: Path) -> dict[str, torch.Tensor]:
        _open_safetensors(f)                         # a broken file refused by name, as elsewhere
        fh = open(f, "rb")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self._files.append(fh)
        self._maps.append(mm)
        n = struct.unpack("<Q", mm[:8])[0]
        header = json.loads(mm[8:8 + n])
        out = {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            dtype = _ST_TORCH.get(v["dtype"])
            if dtype is None:
                raise NotMappable(f"{f}: tensor {k} has dtype {v['dtype']}, which transplant cannot read in place")
            start, end = v["data_offsets"]
            size = torch.empty((), dtype=dtype).element_size()
            if end > start:
                t = torch.frombuffer(mm, dtype=dtype, count=(end - start) // size, offset=8 + n + start)
            else:
                t = torch.empty(0, dtype=dtype)
            out[k] = t.view(tuple(v["shape"]))
            self.where[k] = (mm, 8 + n + start, end - start)
        return out

    def release(self, key: str | None = None) -> None:
        """Give back the pages read so far (of one checkpoint tensor, or all): the next read
        of them comes from the file (or the page cache) again."""
        if key is None:
            for mm in self._maps:
                mm.madvise(mmap.MADV_DONTNEED)
            return
        if key not in self.where:
            return
        mm, start, size = self.where[key]
        lo = start - start % mmap.PAGESIZE
        hi = min(len(mm), -(-(start + size) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Close the files (the maps stay while tensors view them)."""
        for fh in self._files:
            fh.close()


def mapped_model(path: Path, allow_pickle: bool = False) -> nn.Module:
    """The model at `path` (a resolved checkpoint folder) with its weights mapped from its
    safetensors files, as stored (no dtype conversion: that would need a copy). The
    model's `transplant_mapping` says where each parameter lies and releases pages."""
    files = weight_files(path, allow_pickle)
    pickled = [f.name for f in files if f.suffix != ".safetensors"]
    if pickled:
        raise NotMappable(f"{path} has pickle weights ({', '.join(pickled)}), which cannot be read in place")
    check_causal_lm(path)
    model = skeleton(path)
    mapping = Mapping()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(mapping.open(f))
    want = dict(model.state_dict(keep_vars=True))
    renamed = {}
    for k, t in state.items():
        if k in want:
            renamed[k] = t
        else:          # older checkpoints omit the base-model prefix (GPT-2's "h.0..." for "transformer.h.0...")
            full = [w for w in want if w.split(".", 1)[-1] == k]
            renamed[full[0] if len(full) == 1 else k] = t
    info = model.load_state_dict(renamed, strict=False, assign=True)
    model.tie_weights()
    missing = sorted(k for k, p in model.named_parameters() if p.is_meta)
    if missing or info.unexpected_keys:
        mapping.close()
        raise NotMappable(f"{path}: its tensors are not {type(model).__name__}'s parameters one for one (transformers "
                          f"converts them on load: parameters without a tensor {', '.join(missing[:4]) or 'none'}; "
                          f"tensors without a parameter {', '.join(sorted(info.unexpected_keys)[:4]) or 'none'})")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    mapping.close()                  # (the maps stay open while tensors view them)
    model.transplant_mapping = mapping
    named = {id(t): k for k, t in state.items()}
    # model parameter -> its name in the checkpoint (tied parameters appear once)
    model.transplant_keys = {k: named.get(id(renamed.get(k)), k) for k, _ in model.named_parameters()}
    return model


def release(model: nn.Module, key: str | None = None) -> None:
    """Release the pages of a mapped model's parameter `key` (or all); nothing for a model in memory."""
    mapping = getattr(model, "transplant_mapping", None)
    if mapping is not None:
        mapping.release(None if key is None else model.transplant_keys.get(key, key))
