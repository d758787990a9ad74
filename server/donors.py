"""The donor registry: checkpoints the live model may take modules from.

Donors are opened lazily (safetensors memory maps, metadata only): registering one
costs its header, not its weights. Paths must lie inside the configured donor roots
(symlinks resolved; no traversal). A watchdog observer on the roots registers
checkpoints dropped in, once completely written (config.json + safetensors, sizes
unchanged for a settle period), and unregisters removed ones; it reconciles by set
difference, so a burst of events costs one pass; a checkpoint it cannot register is
warned about once (again only when the reason changes), not on every pass.

Hugging Face caches: a root may be a hub cache (`~/.cache/huggingface/hub`): each
`models--ORG--NAME` in it registers as donor NAME (ORG--NAME where two repositories share
a NAME), from the snapshot `refs/main` names, else the newest. Confinement follows
symlinks: every file of a donor, resolved, must lie inside the donor roots, so a
snapshot's links into its repository's `blobs/` are fine when the cache is under a root,
and a link to anywhere else is refused.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transplant_core.arch import ModuleTable
from transplant_core.checkpoint import Checkpoint, describe_hub, hub_folder, hub_repo, hub_snapshot
from transplant_core.compat import CompatReport, check
from transplant_core.errors import AlreadyExists, InvalidArgument, NotFound

log = logging.getLogger("transplant.donors")


@dataclass
class Donor:
    name: str
    path: Path
    origin: str                 # config, rpc, watch
    checkpoint: Checkpoint
    compat: CompatReport


class DonorRegistry:
    def __init__(self, live_table: ModuleTable, roots: list[Path], allow_pickle: bool = False,
                 on_change: Callable[[int], None] | None = None):
        self.table = live_table
        self.roots = [Path(r).resolve() for r in roots]
        self.allow_pickle = allow_pickle
        self._donors: dict[str, Donor] = {}
        self._lock = threading.Lock()
        self._on_change = on_change or (lambda n: None)
        self._observer = None
        self._reconcile_wakeup = threading.Event()
        self._stop = threading.Event()
        self._refused: dict[Path, str] = {}     # drop-ins that failed to register: the reason last warned

    # ---- registry ----------------------------------------------------------------

    def confine(self, path: str) -> Path:
        if not path:
            raise InvalidArgument("donor path is empty")
        if "\x00" in path:
            raise InvalidArgument("donor path contains a NUL byte")
        p = Path(path).expanduser().resolve()
        if not self._inside(p):
            raise InvalidArgument(f"donor path {path!r} is outside the donor roots {self._roots_text()}; "
                                  "put the checkpoint under a root or add one with --donor-root")
        return p

    def _inside(self, p: Path) -> bool:
        return any(p == r or r in p.parents for r in self.roots)

    def _roots_text(self) -> str:
        return ", ".join(map(str, self.roots)) or "(none configured)"

    def confine_files(self, p: Path) -> None:
        """The folder is inside a root; its files must be too, symlinks followed (a weight
        file linked to /etc/... is as much outside as the folder would be). A Hugging Face
        snapshot's links into ../../blobs stay inside when its cache is under a root."""
        outside = []
        for dirpath, dirnames, filenames in os.walk(p):
            for n in dirnames + filenames:
                f = Path(dirpath) / n
                if f.is_symlink() and not self._inside(f.resolve()):
                    outside.append(f"{f.relative_to(p)} -> {f.resolve()}")
        if outside:
            more = f" (+{len(outside) - 4} more)" if len(outside) > 4 else ""
            raise InvalidArgument(f"donor {p}: symlinks lead outside the donor roots {self._roots_text()}: "
                                  f"{', '.join(outside[:4])}{more}; copy the files in, or add a root that holds "
                                  "what they point to")

    def register(self, name: str, path: str, origin: str = "rpc", trusted: bool = False) -> Donor:
        """`trusted` skips root confinement: only for donors named in the server's own config."""
        p = Path(path).expanduser().resolve() if trusted else self.confine(path)
        if not (p / "config.json").exists() and hub_folder(p):
            p = hub_snapshot(p)[0].resolve()     # a cache folder models--ORG--NAME: its snapshot, once
        if not trusted and p.exists():
            self.confine_files(p)
        name = name or hub_name(p) or p.name
        with self._lock:
            old = self._donors.get(name)
            if old is not None:
                if old.path == p:
                    return old
                raise AlreadyExists(f"a donor named {name!r} is already registered ({old.path}); choose another name")
        if not p.exists():
            raise NotFound(f"donor path {str(p)!r} does not exist")
        ck = Checkpoint.open(str(p), self.allow_pickle)
        donor = Donor(name, p, origin, ck, check(self.table, ck.table))
        with self._lock:
            self._donors.setdefault(name, donor)
            n = len(self._donors)
        self._on_change(n)
        hub = describe_hub(p)
        log.info("registered donor %s (%s, %s%s): %d compatible modules", name, p, origin, f"; {hub}" if hub else "",
                 len(donor.compat.compatible))
        return donor

    def unregister(self, name: str) -> None:
        with self._lock:
            self._donors.pop(name, None)
            n = len(self._donors)
        self._on_change(n)

    def get(self, name: str) -> Donor:
        with self._lock:
            d = self._donors.get(name)
            names = sorted(self._donors)
        if d is None:
            raise NotFound(f"no donor named {name!r}; registered: {', '.join(names) or 'none'} "
                           "(add one with `transplant admin register-donor`)")
        return d

    def list(self) -> list[Donor]:
        """The registered donors, less those whose folder is gone from disk (deleted between
        two watchdog passes: listed again if it comes back, dropped at the next pass)."""
        with self._lock:
            return [self._donors[k] for k in sorted(self._donors) if self._donors[k].path.is_dir()]

    # ---- watching the roots ----------------------------------------------------------

    def watch(self, settle_s: float = 1.0) -> None:
        from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._reconcile_wakeup
        reads = (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE)

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                # a pass reads the folders it registers; waking on reads made a drop-in that
                # fails to register be tried (and warned about) again at every pass, forever
                if event.event_type not in reads:
                    wake.set()

        self._observer = Observer()
        for r in self.roots:
            if r.is_dir():
                self._observer.schedule(Handler(), str(r), recursive=True)
        self._observer.start()
        try:                # what is already there registers before the server says SERVING
            self._reconcile(settle_s=0.0)
        except Exception:   # noqa: BLE001 - a bad drop-in must not stop the server
            log.exception("donor scan failed")
        threading.Thread(target=self._reconcile_loop, args=(settle_s,), name="donor-watch", daemon=True).start()

    def _candidates(self) -> dict[str, Path]:
        out, hub = {}, []
        for r in self.roots:
            if not r.is_dir():
                continue
            for d in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if hub_folder(d):
                    try:
                        snap = hub_snapshot(d)[0]
                    except InvalidArgument:
                        continue                         # no snapshot yet: still downloading
                    # links, even broken ones: a missing blob is then warned about, not silently skipped
                    if os.path.lexists(snap / "config.json") and any(snap.glob("*.safetensors")):
                        hub.append(snap)
                    continue
                weights = any(d.glob("*.safetensors")) or (
                    self.allow_pickle and any(d.glob("pytorch_model*.bin")))   # pickle: only when allowed
                if (d / "config.json").is_file() and weights:
                    out[d.name] = d.resolve()
        short = [hub_name(snap) or snap.parent.parent.name for snap in hub]
        for snap, name in zip(hub, short):      # NAME, unless another repository or folder is called that too
            full = hub_name(snap, full=True) or snap.parent.parent.name
            out[name if short.count(name) == 1 and name not in out else full] = snap.resolve()
        return out

    @staticmethod
    def _fingerprint(d: Path) -> tuple:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir() if f.is_file()))

    def _reconcile_loop(self, settle_s: float) -> None:
        while not self._stop.is_set():
            if not self._reconcile_wakeup.wait(timeout=5.0):
                continue
            self._reconcile_wakeup.clear()
            try:
                self._reconcile(settle_s)
            except Exception:       # a bad drop-in must not kill the watcher
                log.exception("donor reconcile failed")

    def _reconcile(self, settle_s: float) -> None:
        on_disk = self._candidates()
        watched = {d.name: d for d in self.list() if d.origin == "watch"}
        for name in sorted(n for n in watched if on_disk.get(n) != watched[n].path):   # gone, or refs/main moved
            log.info("donor %s removed from %s", name, watched[name].path)
            self.unregister(name)
        self._refused = {p: why for p, why in self._refused.items() if p in on_disk.values()}
        for name in sorted(set(on_disk) - {d.name for d in self.list()}):
            path = on_disk[name]
            before = self._fingerprint(path)
            time.sleep(settle_s)                     # completely written = unchanged for settle_s
            if not path.exists() or self._fingerprint(path) != before:
                self._reconcile_wakeup.set()         # still being written: look again
                continue
            try:
                self.register(name, str(path), origin="watch")
                self._refused.pop(path, None)
            except Exception as e:
                if self._refused.get(path) != str(e):    # once per folder and reason, not every pass
                    log.warning("not registering %s: %s", path, e)
                self._refused[path] = str(e)

    def close(self) -> None:
        self._stop.set()
        self._reconcile_wakeup.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)


def hub_name(snapshot: Path, full: bool = False) -> str | None:
    """The donor name of a Hugging Face snapshot: its repository's NAME (ORG--NAME with
    `full`), in the characters donor names allow (config.DonorSpec: letters, digits, ._:-)."""
    repo = hub_repo(snapshot)
    if repo is None:
        return None
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", repo.replace("/", "--") if full else repo.rsplit("/", 1)[-1])
    return re.sub(r"^[^A-Za-z0-9]+", "", name)[:64] or None
