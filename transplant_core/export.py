"""Write a transplanted checkpoint that any engine can serve, with its manifest.

`write_transplanted` (safetensors targets): a byte-for-byte copy of the target folder
(config, tokenizer, model card, index, custom files, subfolders: untouched), in which
only the bytes of the changed tensors are overwritten in place, in the dtype and at the
offsets the target stores them. Shards without a changed tensor stay byte-identical, the
shard names and the index are the target's, and nothing is re-saved through
transformers (which would rewrite config keys and tokenizer classes for its own
version). Memory: the changed tensors only. `write_checkpoint` (the old way: save the
loaded model) remains for pickle-only targets."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import AlreadyExists, InvalidArgument
from .transplant import Plan, checksums

MANIFEST = "transplant_manifest.json"


def versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"transplant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def manifest(target: str, donor: str, p: Plan, before: dict[str, str], after: dict[str, str],
             selection: dict) -> dict:
    return {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "target": target,
        "donor": donor,
        "alpha": p.alpha,
        "bytes": p.nbytes,
        "unit": p.unit,
        **({"lowrank": {"ranks": p.ranks, "energy": p.energy, "factor_bytes": p.stored_bytes}} if p.factors else {}),
        "modules": [{"name": str(m.ref), "keys": list(m.keys),
                     "sha256_before": {k: before[k] for k in m.keys},
                     "sha256_after": {k: after[k] for k in m.keys}} for m in p.modules],
        "selection": selection,
        "versions": versions(),
    }


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it,
    briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(root: Path) -> None:
    """mkdtemp made `root` 0700 (and a writer may create 0600 files): give the folder and
    everything in it the modes a plain mkdir/open would have, so an engine running as
    another user can read the checkpoint where the umask allows it."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def check_out(src: Path, out: Path) -> None:
    """Refuse an --out that is the target folder or lies inside it (the copy would walk into
    its own temporary output and take in a second copy) or that holds it (--force would
    delete the target)."""
    s, o = Path(src).resolve(), Path(out).expanduser().resolve()
    if o == s or s in o.parents:
        raise InvalidArgument(f"--out {out} is inside the target folder {s}: the copy of the target would take in "
                              "its own output; choose an --out outside the target")
    if o in s.parents:
        raise InvalidArgument(f"--out {out} holds the target folder {s} (replacing it would delete the target); "
                              "choose an --out outside the target")


def _prepare_out(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise AlreadyExists(f"output directory {out} exists and is not empty; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _finish(tmp: Path, out: Path) -> None:
    _honour_umask(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _st_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def write_transplanted(src: Path, locate, new: dict, out: Path, meta: dict, force: bool = False) -> Path:
    """Copy checkpoint folder `src` to `out` and overwrite the changed tensors in place.

    `locate(key) -> (file, key in that file)`; `new` maps model keys to the tensors to
    store (same shape and dtype as stored). Atomic: a temp folder renamed at the end."""
    import torch

    from .checkpoint import refuse_dangling

    src, out = Path(src), Path(out)
    check_out(src, out)
    walk = []
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".cache")]
        walk.append((Path(root), files))
    refuse_dangling([root / n for root, files in walk for n in files])   # before anything is written
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for k, t in new.items():
        f, fk = locate(k)
        by_file.setdefault(Path(f), {})[fk] = t
    tmp = _prepare_out(out, force)
    try:
        for root, files in walk:
            rel = root.relative_to(src)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                shutil.copyfile(root / name, tmp / rel / name)   # byte for byte (sendfile); links followed
        rewritten = []
        for f, tensors in sorted(by_file.items()):
            dest = tmp / f.relative_to(src)
            base, header = _st_header(dest)
            with open(dest, "r+b") as fh:
                for fk, t in tensors.items():
                    h = header[fk]
                    dtype = str(t.dtype).removeprefix("torch.")
                    if h["dtype"] != _ST_CODES.get(dtype) or list(h["shape"]) != list(t.shape):
                        raise ValueError(f"{f.name}: {fk} is stored as {h['dtype']} {h['shape']}, the new value "
                                         f"is {dtype} {list(t.shape)}; not written")
                    start, end = h["data_offsets"]
                    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                    if data.nbytes != end - start:
                        raise ValueError(f"{f.name}: {fk} holds {end - start} bytes, the new value {data.nbytes}")
                    fh.seek(base + start)
                    fh.write(data.data)
                fh.flush()
                os.fsync(fh.fileno())
            rewritten.append(str(f.relative_to(src)))
        meta = dict(meta, sha256_saved=_saved_digests(tmp, src, locate, list(new)), rewritten_files=rewritten)
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _saved_digests(tmp: Path, src: Path, locate, keys: list[str]) -> dict[str, str]:
    """sha256 of each changed tensor as written (read back from the output, one at a time,
    with plain reads: no mapped pages)."""
    from .checkpoint import read_tensor
    from .transplant import tensor_digest

    out = {}
    for k in keys:
        f, fk = locate(k)
        out[k] = tensor_digest(read_tensor(str(tmp / Path(f).relative_to(src)), fk))
    return out


def write_checkpoint(model, tokenizer, out: Path, meta: dict, force: bool = False) -> Path:
    """Save model + tokenizer + manifest into `out`, atomically (temp dir, then rename)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise AlreadyExists(f"output directory {out} exists and is not empty; choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        keys = [k for m in meta.get("modules", []) for k in m["keys"]]
        meta = dict(meta, sha256_saved=checksums(model, keys))
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
        _honour_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
