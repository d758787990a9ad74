"""Write a transplanted checkpoint that any engine can serve, with its manifest."""
from __future__ import annotations

import json
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
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
