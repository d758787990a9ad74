"""Write a transplanted checkpoint that any engine can serve, with its manifest."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import AlreadyExists
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
