"""The append-only journal: one JSON record per line, fsync'd before a change is
acknowledged. A torn last line (a crash mid-write) is cut off on open; nothing
that was acknowledged is ever rewritten."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.records = self._read_and_repair()
        self._f = open(self.path, "ab")

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good < len(data):   # torn tail from a crash: never acknowledged, safe to drop
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.records.append(record)

    def close(self) -> None:
        self._f.close()
