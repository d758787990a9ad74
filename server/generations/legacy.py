"""State directories from before the tensor store kept each generation's overrides in
tensors/state-NNNNNN.safetensors; newer generations name tensors by digest only."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from transplant_core.errors import PreconditionFailed

from .store import TensorStore


def legacy_file(tensor_dir: Path, gen: int) -> Path:
    return tensor_dir / f"state-{gen:06d}.safetensors"


def read_legacy(tensor_dir: Path, gen: int) -> dict[str, torch.Tensor]:
    path = legacy_file(tensor_dir, gen)
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def migrate(tensor_dir: Path, records: dict, store: TensorStore) -> None:
    """Copy each old per-generation file's tensors into the store (verified), so that newer
    generations find them after a restart. The old files stay where they are."""
    for gen, rec in records.items():
        missing = {k: d for k, d in rec.state.items() if not store.path(d).exists()}
        if not missing or not legacy_file(tensor_dir, gen).is_file():
            continue
        legacy = read_legacy(tensor_dir, gen)
        tensors = {k: legacy[k] for k in missing if k in legacy}
        got = store.put(tensors)
        bad = [k for k in tensors if got[k] != missing[k]]
        if bad:
            raise PreconditionFailed(f"tensor file {legacy_file(tensor_dir, gen)} does not match the journal "
                                     f"checksums of generation {gen} ({', '.join(bad)})")
