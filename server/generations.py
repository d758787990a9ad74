"""The live model and its generations.

A generation is an immutable record (journal) plus an immutable set of weights: the
base model as loaded, overlaid with `overrides`, the tensors that differ from it.
Each generation's model object is a fork of its parent's that shares every tensor
except the swapped modules', so a swap copies only those bytes and requests already
running keep their own generation's model until they finish.

Write-ahead order of a commit (a crash at any point leaves the old or the new
generation, never a mix):
  1. validate (transplant_core.plan), build the new model off to the side
     (transplant_core.derive: copies only the plan's tensors and the modules on
     their path)
  2. write the tensors the content-addressed store lacks (one file per sha256,
     fsync, rename); a revert or a repeated transplant writes nothing
  3. append the journal record (the full override set by digest), fsync: the
     commit point
  4. swap the live pointer
On restart the base is reloaded, its checksums verified, and the last committed
generation's tensors read back from the store (each verified against its digest).

A low-rank generation stores its factors, not the weights they make: the record's
`derived` maps each such weight's digest to its recipe (the digest of the value it
was applied to, the digests of B and A, the rank and alpha), and a weight missing from
the store is rebuilt from it (transplant_core.lowrank_update gives the same bits on
every machine) and verified against its digest like any stored tensor.
The live tensors and the ones the last commit replaced stay in memory, so a revert
to the parent neither reads nor hashes anything.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


class StoreDamaged(PreconditionFailed):
    """A tensor the store should hold is missing, unreadable or not what its digest says.
    Not a verdict on the change: restoring the object fixes it (a fleet replica retries)."""

    def __init__(self, message: str, digest: str):
        super().__init__(message)
        self.digest = digest


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
    replica: str = ""             # fleet: the replica that appended it to the fleet log
    rollout: dict | None = None   # fleet: {"canaries": [...]} of a transplant's canary phase
    skipped: bool = False         # fleet: in the log, never live here (superseded before it could be)
    ranks: dict[str, int] = field(default_factory=dict)    # low-rank: module -> rank of its factors
    derived: dict[str, dict] = field(default_factory=dict)  # low-rank: weight digest -> recipe (see above)
    stored_bytes: int = 0         # bytes this generation added to describe its change (factors, values)
    idempotency: dict = field(default_factory=dict)   # {"key", "request"}: the call that made it, if it gave a key

    def to_journal(self) -> dict:
        return {"type": "generation", **{k: v for k, v in self.__dict__.items() if k != "quality"}}


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
        self.shared = shared_store is not None
        self.object_dir = Path(shared_store) / "objects" if self.shared else self.tensor_dir / "objects"
        self.object_dir.mkdir(parents=True, exist_ok=True)
        self._owner = owner or claim(self.dir)   # one server per state directory (owner: claim() done earlier)
        try:
            self.model_spec = model_spec
            self._crash = crash_hook or (lambda point: None)
            self.lock = threading.RLock()        # one mutation at a time
            self._pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                            thread_name_prefix="tensor-store")
            self.journal = Journal(self.dir / "journal.jsonl")
            self.records: dict[int, Record] = {}
            self._overrides: dict[str, torch.Tensor] = {}   # live generation's tensors that differ from base
            self._recent: dict[str, torch.Tensor] = {}      # digest -> tensor: live overrides + last replaced
            self._recipes: dict[str, dict] = {}             # digest -> how to rebuild it (low-rank)
            self.live = Live(0, base)
            self._base_params = {k: p.detach() for k, p in base.named_parameters()}
            self._recover()
            self._servable: dict[int, Live] = {self.live.id: self.live}   # in memory, oldest first
            self._migrate_legacy()
            self._sweep()
        except BaseException:
            if hasattr(self, "journal"):
                self.journal.close()
            if hasattr(self, "_pool"):
                self._pool.shutdown(wait=False)
            self._owner.close()
            raise

    # ---- recovery ----------------------------------------------------------------

    def _base_checksums(self) -> dict[str, str]:
        """sha256 of every parameter of the model as loaded (embeddings, norms and the head
        too: a checkpoint whose head changed on disk is not the one generation 0 was)."""
        return tp.checksums(self.base)

    def _recover(self) -> None:
        entries = self.journal.records
        if not entries:
            rec = Record(0, None, "load", selection={"model": self.model_spec}, created=time.time(),
                         checksums=self._base_checksums())
            self.journal.append(rec.to_journal())
            self.records[0] = rec
            return
        first = entries[0]
        now = self._base_checksums()
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
                fields = {k: v for k, v in e.items() if k in Record.__dataclass_fields__}
                self.records[e["id"]] = Record(**fields)
                self._learn(self.records[e["id"]].derived)
            elif e.get("type") == "quality" and e["generation"] in self.records:
                self.records[e["generation"]].quality.append(e["quality"])
        last = max(i for i, r in self.records.items() if not r.skipped)
        if last:
            self._overrides = self._load_overrides(last)
            self._recent = {self.records[last].state[k]: t for k, t in self._overrides.items()}
            self.live = Live(last, self.materialize(last))

    # ---- the tensor store ------------------------------------------------------------
    # Content-addressed: tensors/objects/<sha256>.safetensors, one tensor each, written
    # once (tmp + fsync + rename) and never rewritten. A generation's record names its
    # tensors by digest (`state`), so a revert or a repeated transplant writes nothing,
    # and the store grows only by tensors it has never seen.

    def _obj(self, digest: str) -> Path:
        return self.object_dir / f"{digest}.safetensors"

    def _legacy_file(self, gen: int) -> Path:
        """Per-generation override file of state directories written before the store."""
        return self.tensor_dir / f"state-{gen:06d}.safetensors"

    def _store(self, tensors: dict[str, torch.Tensor], skip: dict[str, str] | None = None) -> dict[str, str]:
        """Hash each {key: tensor} and write those the store lacks (and whose digest is
        not `skip[key]`, the base's), in parallel: sha256 and write release the GIL, so
        hashing one tensor overlaps writing and fsyncing another. Returns {key: digest}."""
        skip = skip or {}

        def one(item: tuple[str, torch.Tensor]) -> tuple[str, str, bool]:
            k, t = item
            digest = tp.tensor_digest(t)
            path = self._obj(digest)
            if digest == skip.get(k):
                return k, digest, False
            if path.exists():               # named again: fresh to the sweep (it goes by age), not rewritten
                try:
                    os.utime(path)
                    return k, digest, False
                except FileNotFoundError:   # swept a moment ago: write it again
                    pass
            tmp = path.with_name(f".{digest}.{_HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                write_tensor(tmp, t)
                tmp.rename(path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return k, digest, True

        results = list(self._pool.map(one, tensors.items())) if len(tensors) > 1 else [one(i) for i in tensors.items()]
        if any(w for _, _, w in results):
            fsync_dir(self.object_dir)
        return {k: d for k, d, _ in results}

    def _read_object(self, digest: str) -> torch.Tensor | None:
        path = self._obj(digest)
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

    def _load_overrides(self, gen: int) -> dict[str, torch.Tensor]:
        """Generation `gen`'s tensors that differ from the base: from memory when they are
        recent, else from the store (verified against their digests)."""
        return self._load_state(self.get(gen).state, gen)

    def _load_state(self, state: dict[str, str], gen: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        legacy: dict[str, torch.Tensor] | None = None
        for k, digest in state.items():
            t = self._find(digest)
            if t is None:
                if legacy is None:
                    legacy = self._read_legacy(gen)
                t = legacy.get(k)
                if t is None or tp.tensor_digest(t) != digest:
                    raise StoreDamaged(f"tensor {k} of generation {gen} ({digest}) is missing from the tensor "
                                       f"store in {self.object_dir}", digest)
            out[k] = self._typed(k, t)
        return out

    def _value(self, k: str, digest: str) -> torch.Tensor:
        """Tensor `k` by digest: the base's, a recent one, a stored one, or rebuilt."""
        if digest == self.records[0].checksums.get(k):
            return self._base_params[k]
        t = self._find(digest)
        if t is None:
            raise StoreDamaged(f"tensor {k} ({digest}) is missing from the tensor store in {self.object_dir}", digest)
        return self._typed(k, t)

    def _find(self, digest: str) -> torch.Tensor | None:
        """A tensor by digest from memory, the store, or its low-rank recipe (None: none has it)."""
        t = self._recent.get(digest)
        if t is None:
            t = self._read_object(digest)
        if t is None and digest in self._recipes:
            t = self._rebuild(digest)
        return t

    def _learn(self, derived: dict[str, dict]) -> None:
        """Remember how to rebuild low-rank weights; the first recipe of a digest stays (any
        recipe of it rebuilds the same bits)."""
        for d, r in derived.items():
            if r.get("of") != d:
                self._recipes.setdefault(d, r)

    def _rebuild(self, digest: str) -> torch.Tensor:
        """A low-rank weight from its recipe: the value it was applied to (stored, recent,
        the base's, or itself rebuilt: a chain of low-rank generations on one weight is
        walked back to a value at hand, then replayed forward) moved by its factors, each
        step verified against its digest."""
        chain, d, seen = [], digest, set()
        base_sums = self.records[0].checksums
        while True:
            r = self._recipes[d]
            if d in seen:
                raise PreconditionFailed(f"the low-rank recipes of tensor {r['key']} form a loop; the journal in "
                                         f"{self.dir} is damaged")
            seen.add(d)
            chain.append(r)
            d = r["of"]
            if d == base_sums.get(r["key"]) or d in self._recent or self._obj(d).is_file() or d not in self._recipes:
                break
        k = chain[-1]["key"]
        t = self._value(k, chain[-1]["of"])
        for r, want in zip(reversed(chain), [c["of"] for c in reversed(chain[:-1])] + [digest]):
            out, inp = t.shape
            rank = int(r["rank"])
            b, a = self._factor(r["B"], (out, rank)), self._factor(r["A"], (rank, inp))
            t = tp.lowrank_update(t, b, a, float(r["alpha"]))
            if tp.tensor_digest(t) != want:
                raise StoreDamaged(f"tensor {k} rebuilt from its low-rank factors does not match its digest "
                                         f"{want[:12]}; the store in {self.object_dir} is damaged", want)
        return t

    def _factor(self, digest: str, shape: tuple[int, int]) -> torch.Tensor:
        t = self._recent.get(digest)
        if t is None:
            t = self._read_object(digest)
        if t is None:
            raise StoreDamaged(f"low-rank factor {digest} is missing from the tensor store in {self.object_dir}",
                               digest)
        return t.reshape(-1).view(torch.uint8).view(torch.float32).reshape(shape)

    def _store_change(self, c: "Candidate") -> tuple[dict[str, str], dict[str, dict]]:
        """Write what describes candidate `c`'s change to the store (write-ahead): the full
        values of copied tensors, the factors of low-rank weights. Returns ({key: digest of
        its new value}, {digest: recipe} for the low-rank weights)."""
        p, params = c.plan, dict(c.model.named_parameters())
        base_sums, parent_state = self.records[0].checksums, self.records[c.parent].state
        full = {k: params[k].detach() for k in p.keys if k not in p.factors}
        parts = {f"{k}#{n}": t for k, (b, a) in p.factors.items() for n, t in (("B", b), ("A", a))}
        stored = self._store({**full, **parts}, skip=base_sums)
        digests, derived = {k: stored[k] for k in full}, {}
        for k, (b, _) in p.factors.items():
            digests[k] = d = tp.tensor_digest(params[k].detach())
            if d != base_sums.get(k) and d != parent_state.get(k, base_sums[k]):    # it changed
                derived[d] = {"key": k, "of": parent_state.get(k, base_sums[k]), "B": stored[f"{k}#B"],
                              "A": stored[f"{k}#A"], "rank": int(b.shape[1]), "alpha": p.alpha}
        return digests, derived

    def _typed(self, k: str, t: torch.Tensor) -> torch.Tensor:
        """The store is addressed by bytes alone, so two tensors with equal bytes but another
        shape or dtype (zeroed up and down projections) share one object: give the bytes
        the shape and dtype of the parameter they are read for."""
        want = self._base_params[k]
        if t.dtype == want.dtype and t.shape == want.shape:
            return t
        return t.reshape(-1).view(torch.uint8).view(want.dtype).reshape(want.shape)

    def _read_legacy(self, gen: int) -> dict[str, torch.Tensor]:
        path = self._legacy_file(gen)
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}

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

    # ---- mutation ----------------------------------------------------------------

    def prepare(self, p: tp.Plan, share: bool = False) -> "Candidate":
        """Build the next generation's model off to the side (the live one is untouched):
        it shares every tensor but the plan's with the live model (tp.derive). `share`
        only for plans whose values are immutable tensors (revert_plan's). Shadow
        evaluation runs on it before it may go live."""
        parent = self.live
        model, replaced = tp.derive(parent.model, p, share=share)
        return Candidate(p, parent.id, model, replaced)

    def commit(self, c: "Candidate", kind: str, requested_by: str = "", reason: str = "",
               selection: dict | None = None, reverted_to: int | None = None, record: Record | None = None,
               skipped: tuple[Record, ...] = (), idempotency: dict | None = None) -> Record:
        """Make a prepared candidate the live generation (write-ahead, then swap). A fleet
        replica passes the `record` from the fleet log (its id, its weights: checked
        against the candidate) and the records it never made live (`skipped`)."""
        with self.lock:
            if c.parent != self.live.id:
                raise PreconditionFailed(f"generation {self.live.id} went live while this change was prepared "
                                         f"on {c.parent}; plan again")
            p, params = c.plan, dict(c.model.named_parameters())
            base_sums, parent_state = self.records[0].checksums, self.records[c.parent].state
            derived = {}
            if record is not None:           # the fleet's record names every value by digest
                digests = {k: record.state.get(k, base_sums.get(k)) for k in p.keys}
            elif reverted_to is not None:    # the values are that generation's: stored, digests known
                known = self.state_checksums(reverted_to)
                digests = {k: known[k] for k in p.keys}
            else:                            # hash and store in one pass (write-ahead)
                digests, derived = self._store_change(c)
            state, overrides = dict(parent_state), dict(self._overrides)
            for k in p.keys:
                if digests[k] == base_sums.get(k):
                    state.pop(k, None)                           # back to the loaded value
                    overrides.pop(k, None)
                else:
                    state[k] = digests[k]
                    overrides[k] = params[k].detach()
            if record is not None:
                if state != record.state:
                    raise PreconditionFailed(f"generation {record.id} from the fleet log does not match the weights "
                                             "built for it here; not installed")
                rec, gen = record, record.id
            else:
                gen = max(self.records) + 1
                rec = Record(gen, c.parent, kind, p.donor, [str(r) for r in p.refs], p.alpha, selection or {},
                             digests, state, requested_by=requested_by, reason=reason, created=time.time(),
                             reverted_to=reverted_to, bytes=p.nbytes, ranks=p.ranks, derived=derived,
                             stored_bytes=0 if reverted_to is not None else p.stored_bytes,
                             idempotency=idempotency or {})
            if state and record is None:    # every object the record names is durable, even one an
                fsync_dir(self.object_dir)  # earlier failed commit renamed in
            self._crash("after_tensors")
            for s in skipped:               # history only: never live here
                if s.id not in self.records:
                    s.skipped = True
                    self.journal.append(s.to_journal())
                    self.records[s.id] = s
                    self._learn(s.derived)
            self.journal.append(rec.to_journal())                # commit point
            self._crash("after_journal")
            self.records[gen] = rec
            self._learn(rec.derived)
            # keep the live tensors and the ones just replaced in memory: reverting to
            # the parent then reads and hashes nothing
            recent = {state[k]: t for k, t in overrides.items()}
            recent.update({parent_state[k]: c.replaced[k] for k in p.keys if k in parent_state})
            self._recent = recent
            self._overrides, self.live = overrides, Live(gen, c.model)
            self._keep(self.live)
            self._crash("after_swap")
            return rec

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
        self._learn(derived or {})      # facts about digests: true whether or not it commits
        want = self._load_state(state, gen)
        keys = set(want) | set(self._overrides)
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

    def stage(self, c: "Candidate", kind: str, requested_by: str = "", reason: str = "",
              selection: dict | None = None, idempotency: dict | None = None) -> Record:
        """The record committing candidate `c` would write, its tensors already durable in
        the store, without committing it (a fleet appends it to its log first)."""
        with self.lock:
            digests, derived = self._store_change(c)
            if any(digests[k] != self.records[0].checksums.get(k) for k in c.plan.keys):
                fsync_dir(self.object_dir)
            state = self._next_state(c, digests)
            return Record(c.parent + 1, c.parent, kind, c.plan.donor, [str(r) for r in c.plan.refs], c.plan.alpha,
                          selection or {}, digests, state, requested_by=requested_by, reason=reason,
                          created=time.time(), bytes=c.plan.nbytes, ranks=c.plan.ranks, derived=derived,
                          stored_bytes=c.plan.stored_bytes, idempotency=idempotency or {})

    def _next_state(self, c: "Candidate", digests: dict[str, str]) -> dict[str, str]:
        base_sums = self.records[0].checksums
        state = dict(self.records[c.parent].state)
        for k in c.plan.keys:
            if digests[k] == base_sums.get(k):
                state.pop(k, None)
            else:
                state[k] = digests[k]
        return state

    def state_checksums(self, gen: int) -> dict[str, str]:
        """sha256 of every transplantable tensor of generation `gen` (base + overrides)."""
        return {**self.records[0].checksums, **self.get(gen).state}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.journal.close()
        self._owner.close()                  # releases the state directory

    def _sweep(self) -> None:
        """Tidy what a crash mid-commit can leave in the store: temp files are removed;
        objects no generation names (written before a journal record that never landed,
        or named by records a journal repair dropped) move to tensors/orphans/, out of
        the way but recoverable by hand."""
        named = {d for r in self.records.values() for d in r.state.values()}
        named |= {d for r in self._recipes.values() for d in (r["B"], r["A"])}
        for f in self.object_dir.iterdir():
            if f.name.endswith(".tmp"):
                if not self.shared or f".{_HOST}.{os.getpid()}." in f.name or _dead_writer(f.name):
                    f.unlink(missing_ok=True)
            elif f.suffix == ".safetensors" and f.stem not in named and not self.shared:
                # (a fleet's shared store: other replicas name objects this one has not seen yet)
                orphans = self.tensor_dir / "orphans"
                orphans.mkdir(exist_ok=True)
                os.replace(f, orphans / f.name)

    def sweep_shared(self, named: set[str], grace_s: float) -> list[str]:
        """A fleet's shared store: move objects that no record of the fleet log names
        (`named`) and that are older than `grace_s` (a replica may have just written one
        for an append still on its way) to <store>/orphans/, out of the way but
        recoverable by hand. Returns the digests moved."""
        orphans = self.object_dir.parent / "orphans"
        moved, now = [], time.time()
        for f in self.object_dir.iterdir():
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

    def _migrate_legacy(self) -> None:
        """State directories from before the store kept each generation's tensors in
        tensors/state-NNNNNN.safetensors. Copy them into the store (verified), so that
        newer generations, which name tensors by digest only, find them after a restart.
        The old files stay where they are."""
        for gen, rec in self.records.items():
            missing = {k: d for k, d in rec.state.items() if not self._obj(d).exists()}
            if not missing or not self._legacy_file(gen).is_file():
                continue
            legacy = self._read_legacy(gen)
            tensors = {k: legacy[k] for k in missing if k in legacy}
            got = self._store(tensors)
            bad = [k for k in tensors if got[k] != missing[k]]
            if bad:
                raise PreconditionFailed(f"tensor file {self._legacy_file(gen)} does not match the journal "
                                         f"checksums of generation {gen} ({', '.join(bad)})")

    def add_quality(self, gen: int, quality: dict) -> None:
        self.journal.append({"type": "quality", "generation": gen, "quality": quality, "time": time.time()})
        self.records[gen].quality.append(quality)

    def append_event(self, event: dict) -> None:
        self.journal.append({"type": "event", "time": time.time(), **event})


_HOST = __import__("socket").gethostname().replace(".", "_")


def _dead_writer(tmp_name: str) -> bool:
    """A shared store's temp file (.<digest>.<host>.<pid>.<thread>.tmp) left by a process of
    this host that no longer runs (other hosts' temp files are theirs to tidy)."""
    parts = tmp_name.split(".")
    if len(parts) != 6 or parts[2] != _HOST or not parts[3].isdigit():
        return False
    try:
        os.kill(int(parts[3]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def claim(state_dir: Path):
    """An exclusive lock on <state_dir>/server.lock for this process's lifetime (the
    kernel drops it if the process dies): two servers on one journal would interleave
    generations."""
    import fcntl

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


class _Overlay(DictTensors):
    """Overrides over the base model's tensors: a generation's full weights, as a donor."""

    def __init__(self, overrides: dict[str, torch.Tensor], base: nn.Module, name: str = "snapshot"):
        params = {k: p.detach() for k, p in base.named_parameters()}
        super().__init__({**params, **overrides}, name=name)

