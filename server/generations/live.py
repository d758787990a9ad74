"""The live generation and its history: recovery, building a change off to the side,
staging it (its tensors durable), committing it (the journal record, then the swap).

Each generation's model object is a fork of its parent's that shares every tensor
except the swapped modules', so a swap copies only those bytes and requests already
running keep their own generation's model until they finish.

Write-ahead order (a crash at any point leaves the old or the new generation, never a mix):
  1. validate (transplant_core.plan), build the new model off to the side
     (transplant_core.derive: copies only the plan's tensors and the modules on
     their path): `prepare`
  2. write the tensors the content-addressed store lacks (one file per sha256, fsync,
     rename; a revert or a repeated transplant writes nothing) and build the record
     that names them: `stage`
  3. append the record to the journal, fsync: the commit point; then swap the live
     pointer: `commit`, the one way a generation goes live (a standalone server's own
     records and a fleet log's alike)
On restart the base is reloaded, its checksums verified, and the last committed
generation's tensors read back from the store (each verified against its digest).

A low-rank generation stores its factors, not the weights they make: the record's
`derived` maps each such weight's digest to its recipe (transplant_core.change), and a
weight missing from the store is rebuilt from it and verified (values.py). The live
tensors and the ones the last commit replaced stay in memory, so a revert to the
parent neither reads nor hashes anything.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transplant_core import transplant as tp
from transplant_core.arch import ModuleTable
from transplant_core.change import LowRankRecipe
from transplant_core.checkpoint import DictTensors
from transplant_core.errors import NotFound, PreconditionFailed
from transplant_core.mapped import release

from . import legacy
from .journal import Journal
from .lock import claim
from .records import Candidate, Live, Record, StoreDamaged
from .store import TensorStore
from .values import Values


class Generations:
    def __init__(self, base: nn.Module, table: ModuleTable, state_dir: Path, model_spec: str,
                 crash_hook: Callable[[str], None] | None = None, owner=None, keep_servable: int = 3,
                 shared_store: Path | None = None):
        """shared_store: a fleet's tensor store (objects/ under it), written and read by every
        replica; without it, <state_dir>/tensors/objects, this server's own."""
        self.base = base
        self.keep_servable = keep_servable
        self.table = table
        self.dir = Path(state_dir)
        self.tensor_dir = self.dir / "tensors"
        self._owner = owner or claim(self.dir)   # one server per state directory (owner: claim() done earlier)
        try:
            self.store = TensorStore(Path(shared_store) / "objects" if shared_store is not None
                                     else self.tensor_dir / "objects", shared=shared_store is not None)
            self.model_spec = model_spec
            self._crash = crash_hook or (lambda point: None)
            self.lock = threading.RLock()        # one mutation at a time
            self.journal = Journal(self.dir / "journal.jsonl")
            self.records: dict[int, Record] = {}
            self.overrides: dict[str, torch.Tensor] = {}    # live generation's tensors that differ from base
            self.values = Values(base, self.store, lambda gen: legacy.read_legacy(self.tensor_dir, gen), self.dir)
            self.live = Live(0, base)
            self.unverifiable: dict | None = None   # the journal's live generation, if the store could not build it
            self._recover()
            release(base)                        # a mapped base: give back the pages read here
            self._servable: dict[int, Live] = {self.live.id: self.live}   # in memory, oldest first
            legacy.migrate(self.tensor_dir, self.records, self.store)
            named = {d for r in self.records.values() for d in r.state.values()} | self.values.named()
            self.store.tidy(named, self.tensor_dir / "orphans")
        except BaseException:
            if hasattr(self, "journal"):
                self.journal.close()
            if hasattr(self, "store"):
                self.store.close()
            self._owner.close()
            raise

    @property
    def object_dir(self) -> Path:
        return self.store.dir

    @property
    def shared(self) -> bool:
        return self.store.shared

    # ---- recovery ----------------------------------------------------------------

    def _recover(self) -> None:
        entries = self.journal.records
        # sha256 of every parameter of the model as loaded (embeddings, norms and the head
        # too: a checkpoint whose head changed on disk is not the one generation 0 was)
        now = _streamed_checksums(self.base)
        if not entries:
            rec = Record(0, None, "load", selection={"model": self.model_spec}, created=time.time(), checksums=now)
            self.journal.append(rec.to_journal())
            self.records[0] = rec
            self.values.base_sums = rec.checksums
            return
        first = entries[0]
        recorded = first["checksums"]
        if set(recorded) < set(now):         # written before every tensor was recorded: compare those
            now = {k: now[k] for k in recorded}
        # the weights say whether it is the same model; the spec only names it (a relative
        # path, a symlink, a copy elsewhere are the same checkpoint)
        if first.get("selection", {}).get("model") != self.model_spec and recorded != now:
            raise PreconditionFailed(
                f"state directory {self.dir} belongs to model {first.get('selection', {}).get('model')!r}, "
                f"not {self.model_spec!r}; use another --state-dir for this model")
        if recorded != now:
            changed = sorted(k for k in recorded if recorded[k] != now.get(k))
            raise PreconditionFailed(
                f"the weights of {self.model_spec} changed on disk since generation 0 was recorded in {self.dir} "
                f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "restore the original checkpoint or start with a new --state-dir")
        for e in entries:
            if e.get("type") == "generation":
                self.records[e["id"]] = Record.from_doc(e)
                self.values.learn(self.records[e["id"]].derived)
            elif e.get("type") == "quality" and e["generation"] in self.records:
                self.records[e["generation"]].quality.append(e["quality"])
        self.values.base_sums = self.records[0].checksums
        served = sorted((i for i, r in self.records.items() if not r.skipped), reverse=True)
        for last in served:
            if not last:
                break
            try:
                self.overrides = self._load_overrides(last)
            except StoreDamaged as e:
                if not self.store.shared:    # this server's own store: nothing else has the object
                    raise
                # a fleet's store: serve the newest generation this replica can verify; the
                # follower installs the head again (with backoff) once the object is back
                self.unverifiable = self.unverifiable or {"generation": last, "digest": e.digest, "message": str(e)}
                continue
            self.values.recent = {self.records[last].state[k]: t for k, t in self.overrides.items()}
            self.live = Live(last, self.materialize(last))
            break

    def _load_overrides(self, gen: int) -> dict[str, torch.Tensor]:
        """Generation `gen`'s tensors that differ from the base: from memory when they are
        recent, else from the store (verified against their digests)."""
        return self.values.load_state(self.get(gen).state, gen)

    def factor(self, digest: str, shape: tuple[int, int], dtype: str = "float32") -> torch.Tensor:
        """A stored low-rank factor by digest, as `dtype` and `shape` (the store keeps bytes)."""
        t = self.values.find(digest)
        if t is None:
            raise NotFound(f"low-rank factor {digest} is not in the tensor store")
        return t.reshape(-1).view(torch.uint8).view(getattr(torch, dtype)).reshape(shape)

    # ---- reading generations -----------------------------------------------------

    def materialize(self, gen: int) -> nn.Module:
        """A model object with generation `gen`'s weights (shares everything else with the base)."""
        overrides = self._load_overrides(self.get(gen).id)
        refs = sorted({m.ref for m in self.table.modules.values() if any(k in overrides for k in m.keys)})
        if not refs:
            return self.base
        p = tp.plan(self.table, _Overlay(overrides, self.base), refs, known_finite=True)
        model, _ = tp.derive(self.base, p, share=True)
        return model

    def _keep(self, live: Live) -> None:
        """Past generations stay servable (requests may pin them) while they are among the
        `keep_servable` most recent before the live one; each holds only the tensors it
        does not share with the others (its swapped modules)."""
        servable = dict(self._servable)
        servable[live.id] = live
        while len(servable) > self.keep_servable + 1:
            servable.pop(next(iter(servable)))
        self._servable = servable                # one assignment: readers see old or new

    def servable(self, gen: int) -> Live:
        """The model of generation `gen`, for a request pinned to it."""
        live = self._servable.get(gen)
        if live is None:
            self.get(gen)                                   # NotFound if it never existed
            raise NotFound(f"generation {gen} is no longer servable: requests may pin the live generation and the "
                           f"{self.keep_servable} before it that went live in this process "
                           f"({', '.join(map(str, self.servable_ids()))}); make it live again with a revert")
        return live

    def servable_ids(self) -> list[int]:
        return sorted(self._servable)

    def get(self, gen: int) -> Record:
        if gen not in self.records:
            raise NotFound(f"generation {gen} does not exist; generations are 0..{max(self.records)}")
        return self.records[gen]

    def history(self) -> list[Record]:
        return [self.records[i] for i in sorted(self.records)]

    def state_checksums(self, gen: int) -> dict[str, str]:
        """sha256 of every transplantable tensor of generation `gen` (base + overrides)."""
        return {**self.records[0].checksums, **self.get(gen).state}

    # ---- changes: prepare, stage, commit -------------------------------------------------

    def prepare(self, p: tp.Plan, share: bool = False) -> Candidate:
        """Build the next generation's model off to the side (the live one is untouched):
        it shares every tensor but the plan's with the live model (tp.derive). `share`
        only for plans whose values are immutable tensors (a stored generation's). Shadow
        evaluation runs on it before it may go live."""
        parent = self.live
        model, replaced = tp.derive(parent.model, p, share=share)
        release(self.base)            # a mapped base (vLLM): the pages of the modules just read go back
        return Candidate(p, parent.id, model, replaced)

    def stage(self, c: Candidate, kind: str, requested_by: str = "", reason: str = "",
              selection: dict | None = None, idempotency: dict | None = None,
              reverted_to: int | None = None) -> Record:
        """The record committing candidate `c` makes, with what describes its change durable
        in the store first (write-ahead): the values of copied tensors, the factors of
        low-rank weights. A revert's values are generation `reverted_to`'s: stored, their
        digests known, nothing written."""
        with self.lock:
            p, base_sums = c.plan, self.records[0].checksums
            if reverted_to is not None:
                known, derived = self.state_checksums(reverted_to), {}
                digests = {k: known[k] for k in p.keys}
            else:
                digests, derived = self._store_change(c)
                if any(digests[k] != base_sums.get(k) for k in p.keys):
                    self.store.sync()
            state = dict(self.records[c.parent].state)
            for k in p.keys:
                if digests[k] == base_sums.get(k):
                    state.pop(k, None)                           # back to the loaded value
                else:
                    state[k] = digests[k]
            return Record(c.parent + 1, c.parent, kind, p.donor, [str(r) for r in p.refs], p.alpha, selection or {},
                          digests, state, requested_by=requested_by, reason=reason, created=time.time(),
                          reverted_to=reverted_to, bytes=p.nbytes, ranks=p.ranks, derived=derived,
                          stored_bytes=0 if reverted_to is not None else p.stored_bytes,
                          idempotency=idempotency or {})

    def _store_change(self, c: Candidate) -> tuple[dict[str, str], dict[str, dict]]:
        """Write the full values of copied tensors and the factors of low-rank weights.
        Returns ({key: digest of its new value}, {digest: recipe} for the low-rank weights)."""
        p, params = c.plan, dict(c.model.named_parameters())
        base_sums, parent_state = self.records[0].checksums, self.records[c.parent].state
        full = {k: params[k].detach() for k in p.keys if k not in p.factors}
        parts = {f"{k}#{n}": t for k, (b, a) in p.factors.items() for n, t in (("B", b), ("A", a))}
        stored = self.store.put({**full, **parts}, skip=base_sums)
        digests, derived = {k: stored[k] for k in full}, {}
        for k, (b, _) in p.factors.items():
            digests[k] = d = tp.tensor_digest(params[k].detach())
            of = parent_state.get(k, base_sums[k])
            if d != base_sums.get(k) and d != of:    # it changed
                derived[d] = LowRankRecipe(k, of, stored[f"{k}#B"], stored[f"{k}#A"], int(b.shape[1]), p.alpha,
                                           str(b.dtype).removeprefix("torch.")).to_doc()
        return digests, derived

    def commit(self, c: Candidate, rec: Record, skipped: tuple[Record, ...] = ()) -> Record:
        """Make candidate `c` live as generation `rec` (staged here, or a fleet log's record,
        whose weights by digest are checked against the candidate): the journal record,
        then the swap. `skipped`: records before it this replica never made live."""
        with self.lock:
            if c.parent != self.live.id:
                raise PreconditionFailed(f"generation {self.live.id} went live while this change was prepared "
                                         f"on {c.parent}; plan again")
            p, params = c.plan, dict(c.model.named_parameters())
            base_sums, parent_state = self.records[0].checksums, self.records[c.parent].state
            state, overrides = dict(parent_state), dict(self.overrides)
            for k in p.keys:
                digest = rec.state.get(k, base_sums.get(k))
                if digest == base_sums.get(k):
                    state.pop(k, None)                           # back to the loaded value
                    overrides.pop(k, None)
                else:
                    state[k] = digest
                    overrides[k] = params[k].detach()
            if state != rec.state:
                raise PreconditionFailed(f"generation {rec.id} does not match the weights built for it here; "
                                         "not installed")
            self._crash("after_tensors")
            for s in skipped:               # history only: never live here
                if s.id not in self.records:
                    s.skipped = True
                    self.journal.append(s.to_journal())
                    self.records[s.id] = s
                    self.values.learn(s.derived)
            if rec.id not in self.records:   # (journaled already: live before a restart that could not build it)
                self.journal.append(rec.to_journal())            # commit point
            self._crash("after_journal")
            self.records[rec.id] = rec
            self.values.learn(rec.derived)
            # keep the live tensors and the ones just replaced in memory: reverting to
            # the parent then reads and hashes nothing
            recent = {state[k]: t for k, t in overrides.items()}
            recent.update({parent_state[k]: c.replaced[k] for k in p.keys if k in parent_state})
            self.values.recent = recent
            self.overrides, self.live = overrides, Live(rec.id, c.model)
            self._keep(self.live)
            self._crash("after_swap")
            return rec

    # ---- what a revert installs --------------------------------------------------------

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
        return self.state_plan(target.state, to), to

    def state_plan(self, state: dict[str, str], gen: int, derived: dict | None = None) -> tp.Plan:
        """The plan that makes the live weights those of a generation whose override set is
        `state` (a revert's target, or a record from the fleet log, with the recipes of
        its low-rank weights: `derived`), read from memory or the store, or rebuilt, and
        verified against their digests."""
        self.values.learn(derived or {})      # facts about digests: true whether or not it commits
        want = self.values.load_state(state, gen)
        keys = set(want) | set(self.overrides)
        refs = sorted({m.ref for m in self.table.modules.values() if any(k in keys for k in m.keys)})
        if not refs:   # same weights under another id: still a new generation, nothing copied
            refs = [self.table.refs()[0]]
        source = _Overlay(want, self.base, name=f"generation {gen}")
        # the values are generation `gen`'s: each was scanned for NaN/inf when first installed
        # (or is the model as loaded), so the plan skips only that scan of the same path
        return tp.plan(self.table, source, refs, 1.0, known_finite=True)

    def revert_record(self, head: dict, target: dict, **fields) -> Record:
        """A fleet revert built from log records alone (no weights needed): generation
        head+1 whose weights are `target`'s, naming the modules where they differ from
        `head`'s. Every replica installs it through state_plan."""
        base = self.records[0].checksums
        hs, ts = head.get("state", {}), target.get("state", {})
        changed = {k for k in set(hs) | set(ts) if hs.get(k, base.get(k)) != ts.get(k, base.get(k))}
        refs = sorted({m.ref for m in self.table.modules.values() if any(k in changed for k in m.keys)}) \
            or [self.table.refs()[0]]
        keys = [k for r in refs for k in self.table[r].keys]
        return Record(int(head["id"]) + 1, int(head["id"]), "revert", f"generation {target['id']}",
                      [str(r) for r in refs], 1.0, checksums={k: ts.get(k, base[k]) for k in keys},
                      state=dict(ts), created=time.time(), reverted_to=int(target["id"]),
                      bytes=sum(self.table[r].nbytes for r in refs), **fields)

    # ---- the rest of the journal -------------------------------------------------------

    def add_quality(self, gen: int, quality: dict) -> None:
        self.journal.append({"type": "quality", "generation": gen, "quality": quality, "time": time.time()})
        self.records[gen].quality.append(quality)

    def append_event(self, event: dict) -> None:
        self.journal.append({"type": "event", "time": time.time(), **event})

    def sweep_shared(self, named: set[str], grace_s: float) -> list[str]:
        """A fleet's shared store: objects no record names, older than `grace_s`, to orphans/."""
        return self.store.sweep(named, grace_s)

    def close(self) -> None:
        self.store.close()
        self.journal.close()
        self._owner.close()                  # releases the state directory


def _streamed_checksums(model: nn.Module) -> dict[str, str]:
    """tp.checksums, releasing each tensor's pages once hashed: a mapped base (vLLM holds
    the model) is read through once, never resident as a whole."""
    out = {}
    for k, p in sorted(model.named_parameters()):
        out[k] = tp.tensor_digest(p)
        release(model, k)
    return out


class _Overlay(DictTensors):
    """Overrides over the base model's tensors: a generation's full weights, as a donor."""

    def __init__(self, overrides: dict[str, torch.Tensor], base: nn.Module, name: str = "snapshot"):
        params = {k: p.detach() for k, p in base.named_parameters()}
        super().__init__({**params, **overrides}, name=name)
