"""The live model and its generations.

A generation is an immutable record (journal) plus an immutable set of weights: the
base model as loaded, overlaid with `overrides`, the tensors that differ from it.
Each generation's model object is a fork of its parent's that shares every tensor
except the swapped modules', so a swap copies only those bytes and requests already
running keep their own generation's model until they finish.

Write-ahead order of a commit (a crash at any point leaves the old or the new
generation, never a mix):
  1. validate (transplant_core.plan), build the new model off to the side (fork + commit)
  2. write the new override set and the replaced tensors (safetensors), fsync, rename
  3. append the journal record, fsync: the commit point
  4. swap the live pointer
On restart the base is reloaded, its checksums verified, and the last committed
generation's overrides installed.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from transplant_core import transplant as tp
from transplant_core.arch import ModuleTable
from transplant_core.checkpoint import DictTensors
from transplant_core.errors import NotFound, PreconditionFailed

from .journal import Journal, fsync_dir


@dataclass(frozen=True)
class Live:
    """What a request pins: a generation id and the model that computes it."""
    id: int
    model: nn.Module


@dataclass(frozen=True)
class Candidate:
    """A validated change built off to the side, not yet live."""
    plan: tp.Plan
    parent: int
    model: nn.Module
    replaced: dict = field(repr=False)


@dataclass
class Record:
    id: int
    parent: int | None
    kind: str                     # load, transplant, revert
    donor: str = ""
    modules: list[str] = field(default_factory=list)
    alpha: float = 1.0
    selection: dict = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)          # tensors installed
    state: dict[str, str] = field(default_factory=dict)              # full override set: key -> sha256
    quality: list[dict] = field(default_factory=list)
    requested_by: str = ""
    reason: str = ""
    created: float = 0.0
    reverted_to: int | None = None
    bytes: int = 0

    def to_journal(self) -> dict:
        return {"type": "generation", **{k: v for k, v in self.__dict__.items() if k != "quality"}}


class Generations:
    def __init__(self, base: nn.Module, table: ModuleTable, state_dir: Path, model_spec: str,
                 crash_hook: Callable[[str], None] | None = None):
        self.base = base
        self.table = table
        self.dir = Path(state_dir)
        self.tensor_dir = self.dir / "tensors"
        self.tensor_dir.mkdir(parents=True, exist_ok=True)
        self.model_spec = model_spec
        self._crash = crash_hook or (lambda point: None)
        self.lock = threading.RLock()        # one mutation at a time
        self.journal = Journal(self.dir / "journal.jsonl")
        self.records: dict[int, Record] = {}
        self._overrides: dict[str, torch.Tensor] = {}
        self.live = Live(0, base)
        self._recover()

    # ---- recovery ----------------------------------------------------------------

    def _base_checksums(self) -> dict[str, str]:
        keys = [k for m in self.table.modules.values() for k in m.keys]
        return tp.checksums(self.base, keys)

    def _recover(self) -> None:
        entries = self.journal.records
        if not entries:
            rec = Record(0, None, "load", selection={"model": self.model_spec}, created=time.time(),
                         checksums=self._base_checksums())
            self.journal.append(rec.to_journal())
            self.records[0] = rec
            return
        first = entries[0]
        if first.get("selection", {}).get("model") != self.model_spec:
            raise PreconditionFailed(
                f"state directory {self.dir} belongs to model {first.get('selection', {}).get('model')!r}, "
                f"not {self.model_spec!r}; use another --state-dir for this model")
        if first["checksums"] != self._base_checksums():
            raise PreconditionFailed(
                f"the weights of {self.model_spec} changed on disk since generation 0 was recorded in {self.dir}; "
                "restore the original checkpoint or start with a new --state-dir")
        for e in entries:
            if e.get("type") == "generation":
                fields = {k: v for k, v in e.items() if k in Record.__dataclass_fields__}
                self.records[e["id"]] = Record(**fields)
            elif e.get("type") == "quality" and e["generation"] in self.records:
                self.records[e["generation"]].quality.append(e["quality"])
        last = max(self.records)
        if last:
            self._overrides, self.live = self._load_overrides(last), Live(last, self.materialize(last))

    # ---- reading generations -----------------------------------------------------

    def _file(self, gen: int, what: str = "state") -> Path:
        return self.tensor_dir / f"{what}-{gen:06d}.safetensors"

    def _load_overrides(self, gen: int) -> dict[str, torch.Tensor]:
        if gen == 0 or not self.records[gen].state:
            return {}
        with safe_open(str(self._file(gen)), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
        sums = {k: tp.tensor_digest(v) for k, v in out.items()}
        if sums != self.records[gen].state:
            raise PreconditionFailed(f"tensor file of generation {gen} does not match its journal checksums")
        return out

    def materialize(self, gen: int) -> nn.Module:
        """A model object with generation `gen`'s weights (shares everything else with the base)."""
        overrides = self._load_overrides(self.get(gen).id)
        model = tp.fork(self.base, list(overrides))
        self._install(model, overrides)
        return model

    def get(self, gen: int) -> Record:
        if gen not in self.records:
            raise NotFound(f"generation {gen} does not exist; generations are 0..{max(self.records)}")
        return self.records[gen]

    def history(self) -> list[Record]:
        return [self.records[i] for i in sorted(self.records)]

    # ---- mutation ----------------------------------------------------------------

    def _install(self, model: nn.Module, overrides: dict[str, torch.Tensor]) -> None:
        refs = sorted({m.ref for m in self.table.modules.values() if any(k in overrides for k in m.keys)})
        if refs:
            tp.commit(model, tp.plan(self.table, _Overlay(overrides, self.base), refs))

    def prepare(self, p: tp.Plan) -> "Candidate":
        """Build the next generation's model off to the side (the live one is untouched):
        a fork of the live model sharing all but the plan's tensors, committed through the
        core path. Shadow evaluation runs on it before it may go live."""
        parent = self.live
        model = tp.fork(parent.model, p.keys)
        replaced = tp.commit(model, p)
        return Candidate(p, parent.id, model, replaced.tensors)

    def commit(self, c: "Candidate", kind: str, requested_by: str = "", reason: str = "",
               selection: dict | None = None, reverted_to: int | None = None) -> Record:
        """Make a prepared candidate the live generation (write-ahead, then swap)."""
        with self.lock:
            if c.parent != self.live.id:
                raise PreconditionFailed(f"generation {self.live.id} went live while this change was prepared "
                                         f"on {c.parent}; plan again")
            p, params = c.plan, dict(c.model.named_parameters())
            base_params = dict(self.base.named_parameters())
            overrides = dict(self._overrides)
            for k in p.keys:
                new = params[k].detach()
                if torch.equal(new, base_params[k]):
                    overrides.pop(k, None)                        # back to the loaded value
                else:
                    overrides[k] = new
            gen = max(self.records) + 1
            rec = Record(gen, c.parent, kind, p.donor, [str(r) for r in p.refs], p.alpha, selection or {},
                         tp.checksums(c.model, p.keys), {k: tp.tensor_digest(v) for k, v in overrides.items()},
                         requested_by=requested_by, reason=reason, created=time.time(),
                         reverted_to=reverted_to, bytes=p.nbytes)
            self._write(self._file(gen), overrides)
            self._write(self._file(gen, "replaced"), c.replaced)
            self._crash("after_tensors")
            self.journal.append(rec.to_journal())                # commit point
            self._crash("after_journal")
            self.records[gen] = rec
            self._overrides, self.live = overrides, Live(gen, c.model)
            self._crash("after_swap")
            return rec

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.rename(path)
        fsync_dir(path.parent)

    def revert_plan(self, to: int | None) -> tuple[tp.Plan, int]:
        """The plan that makes generation `to` (default: the live one's parent) live again:
        a transplant whose donor is that generation's snapshot."""
        live = self.records[self.live.id]
        if to is None:
            if live.parent is None:
                raise PreconditionFailed("the live generation is 0 (the model as loaded): nothing to revert to")
            to = live.parent
        target = self.get(to)
        if to == self.live.id:
            raise PreconditionFailed(f"generation {to} is already live")
        want = self._load_overrides(target.id)
        keys = set(want) | set(self._overrides)
        refs = sorted({m.ref for m in self.table.modules.values() if any(k in keys for k in m.keys)})
        if not refs:   # same weights under another id: still a new generation, nothing copied
            refs = [self.table.refs()[0]]
        source = _Overlay(want, self.base, name=f"generation {to}")
        return tp.plan(self.table, source, refs, 1.0), to

    def state_checksums(self, gen: int) -> dict[str, str]:
        """sha256 of every transplantable tensor of generation `gen` (base + overrides)."""
        return {**self.records[0].checksums, **self.get(gen).state}

    def add_quality(self, gen: int, quality: dict) -> None:
        self.journal.append({"type": "quality", "generation": gen, "quality": quality, "time": time.time()})
        self.records[gen].quality.append(quality)

    def append_event(self, event: dict) -> None:
        self.journal.append({"type": "event", "time": time.time(), **event})


class _Overlay(DictTensors):
    """Overrides over the base model's tensors: a generation's full weights, as a donor."""

    def __init__(self, overrides: dict[str, torch.Tensor], base: nn.Module, name: str = "snapshot"):
        params = {k: p.detach() for k, p in base.named_parameters()}
        super().__init__({**params, **overrides}, name=name)

