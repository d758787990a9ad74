"""One server per state directory."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from transplant_core.errors import PreconditionFailed


def claim(state_dir: Path):
    """An exclusive lock on <state_dir>/server.lock for this process's lifetime (the
    kernel drops it if the process dies): two servers on one journal would interleave
    generations."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(state_dir) / "server.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise PreconditionFailed(f"state directory {state_dir} is in use by another transplant server "
                                 f"(pid {holder}); stop it, or give this one another --state-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
