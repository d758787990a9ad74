"""The tensor store: content-addressed, one safetensors file per sha256.

objects/<sha256>.safetensors holds one tensor (key "tensor"), written once (tmp + fsync
+ rename) and never rewritten. A generation's record names its tensors by digest, so a
revert or a repeated transplant writes nothing and the store grows only by tensors it
has never seen. A fleet shares one store (every replica writes and reads it); a
standalone server has its own under its state directory."""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transplant_core import transplant as tp

from .journal import fsync_dir
from .records import StoreDamaged

HOST = socket.gethostname().replace(".", "_")


class TensorStore:
    def __init__(self, object_dir: Path, shared: bool):
        self.dir = Path(object_dir)
        self.shared = shared
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                        thread_name_prefix="tensor-store")

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.safetensors"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, tensors: dict[str, torch.Tensor], skip: dict[str, str] | None = None) -> dict[str, str]:
        """Hash each {key: tensor} and write those the store lacks (and whose digest is
        not `skip[key]`, the base's), in parallel: sha256 and write release the GIL, so
        hashing one tensor overlaps writing and fsyncing another. Returns {key: digest}."""
        skip = skip or {}

        def one(item: tuple[str, torch.Tensor]) -> tuple[str, str, bool]:
            k, t = item
            digest = tp.tensor_digest(t)
            path = self.path(digest)
            if digest == skip.get(k):
                return k, digest, False
            if path.exists():               # named again: fresh to the sweep (it goes by age), not rewritten
                try:
                    os.utime(path)
                    return k, digest, False
                except FileNotFoundError:   # swept a moment ago: write it again
                    pass
            tmp = path.with_name(f".{digest}.{HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                write_tensor(tmp, t)
                tmp.rename(path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return k, digest, True

        results = list(self._pool.map(one, tensors.items())) if len(tensors) > 1 else [one(i) for i in tensors.items()]
        if any(w for _, _, w in results):
            fsync_dir(self.dir)
        return {k: d for k, d, _ in results}

    def sync(self) -> None:
        """Every object renamed in is durable (one an earlier failed commit left too)."""
        fsync_dir(self.dir)

    def read(self, digest: str) -> torch.Tensor | None:
        """The tensor with this digest (verified), None if the store has no such object."""
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor("tensor").clone()          # our own memory, not a map of the file
        except Exception as e:                  # noqa: BLE001 - a torn or foreign file (SafetensorError, OSError)
            raise StoreDamaged(f"tensor store object {path} cannot be read ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); restore it from a replica's "
                               "store or a backup", digest) from None
        if tp.tensor_digest(t) != digest:
            raise StoreDamaged(f"tensor store object {path} does not match its digest", digest)
        return t

    def tidy(self, named: set[str], orphans: Path) -> None:
        """Tidy what a crash mid-commit can leave: temp files are removed; objects no
        generation names (written before a journal record that never landed, or named by
        records a journal repair dropped) move to `orphans`, out of the way but
        recoverable by hand. A shared store keeps its objects (other replicas name
        objects this one has not seen yet: `sweep` is the fleet's) and other live
        writers' temp files."""
        for f in self.dir.iterdir():
            if f.name.endswith(".tmp"):
                if not self.shared or f".{HOST}.{os.getpid()}." in f.name or _dead_writer(f.name):
                    f.unlink(missing_ok=True)
            elif f.suffix == ".safetensors" and f.stem not in named and not self.shared:
                orphans.mkdir(exist_ok=True)
                os.replace(f, orphans / f.name)

    def sweep(self, named: set[str], grace_s: float) -> list[str]:
        """A fleet's shared store: move objects that no record of the fleet log names
        (`named`) and that are older than `grace_s` (a replica may have just written one
        for an append still on its way) to <store>/orphans/, out of the way but
        recoverable by hand. Returns the digests moved."""
        orphans = self.dir.parent / "orphans"
        moved, now = [], time.time()
        for f in self.dir.iterdir():
            if f.suffix != ".safetensors" or f.stem in named:
                continue
            try:
                if now - f.stat().st_mtime < grace_s:
                    continue
                orphans.mkdir(exist_ok=True)
                os.replace(f, orphans / f.name)
            except FileNotFoundError:            # another replica swept it first
                continue
            moved.append(f.stem)
        return moved

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _dead_writer(tmp_name: str) -> bool:
    """A shared store's temp file (.<digest>.<host>.<pid>.<thread>.tmp) left by a process of
    this host that no longer runs (other hosts' temp files are theirs to tidy)."""
    parts = tmp_name.split(".")
    if len(parts) != 6 or parts[2] != HOST or not parts[3].isdigit():
        return False
    try:
        os.kill(int(parts[3]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


_ST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def write_tensor(path: Path, t: torch.Tensor) -> None:
    """One tensor as a safetensors file (key "tensor"), written from the tensor's own
    memory (no serialised copy), flushed and fsync'd."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    code = _ST_CODES.get(t.dtype)
    if code is None:                      # rare dtypes: the library writer
        save_file({"tensor": t}, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return
    nbytes = t.numel() * t.element_size()
    header = json.dumps({"tensor": {"dtype": code, "shape": list(t.shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        if nbytes:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
