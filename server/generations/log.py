"""The generation log: the order in which generations go live.

Every write goes through a log: the controller appends a record on the head it read
(its expected parent), and the follower makes whatever the log adds live. Two logs:
- LocalLog (here): a standalone server's journal; a fleet of one. Appending is
  installing: the record's commit to the journal happens inside the install, at the
  moment the engine can take the new weights, so a swap the engine refuses leaves
  nothing appended.
- the fleet's log in etcd (server/fleet/agent.py, FleetAgent): appends are
  compare-and-swap on the head, landed / conflict / unknown; each replica's follower
  installs what the rollout policy lets it.
Both answer the same calls:
  shared                     True where other servers write too (the guard then refuses
                             in any mode: a fleet record is never installed then reverted)
  check_publishable(parent)  would a record on `parent` be appended now? (before any
                             object is written)
  append(rec)                append on rec.parent (raises Conflict, OutcomeUnknown, or
                             what the install raised)
  revert(to, why, ...)       append a revert of the head, built from the records alone
  wait_installed(gen, s)     ("installed" | "failed" | "refused" | "timeout", why)
  rollout_of(rec)            where a generation stands (control.outcome's fields)
  find(key, request)         the record an idempotency key made, or None
  head_view()                (head, records, what to say when an alert names another)
  record(gen)                a record by id
"""
from __future__ import annotations

from typing import Callable

from transplant_core.errors import PreconditionFailed

from .live import Generations
from .records import Record, find_keyed


class Conflict(Exception):
    """Another record won the append (the log's history moved on)."""


class OutcomeUnknown(Exception):
    """An append was sent, the reply was lost and the log could not be asked since: the
    record may or may not be in the log. `record` is the id it would have."""

    def __init__(self, message: str, record: int = -1):
        super().__init__(message)
        self.record = record


class LocalLog:
    shared = False
    where = ""                       # said after "reverted to N" (a fleet: " across fleet NAME")

    def __init__(self, gens: Generations, install: Callable[[Record], object], name: str):
        self.gens = gens
        self._install = install
        self.name = name

    def check_publishable(self, parent: int) -> None:
        if parent != self.gens.live.id:
            raise PreconditionFailed(f"generation {self.gens.live.id} went live while this change was prepared "
                                     f"on {parent}; plan again")

    def append(self, rec: Record) -> Record:
        with self.gens.lock:
            self.check_publishable(rec.parent)
            self._install(rec)
            return rec

    def revert(self, to: int | None, why: str, requested_by: str = "", reason: str = "", extra: dict | None = None,
               expect: int | None = None, idempotency: dict | None = None) -> Record:
        gens = self.gens
        with gens.lock:
            live = gens.records[gens.live.id]
            if expect is not None and live.id != expect:
                raise Conflict(f"generation {live.id} went live meanwhile; nothing reverted")
            if to is None:
                if live.parent is None:
                    raise PreconditionFailed("the live generation is 0 (the model as loaded): nothing to revert to")
                to = live.parent
            target = gens.get(to)
            if to == live.id:
                raise PreconditionFailed(f"generation {to} is already live")
            rec = gens.revert_record(live.to_journal(), target.to_journal(),
                                     selection={"method": "revert", "why": why, **(extra or {})},
                                     requested_by=requested_by, reason=reason, idempotency=idempotency or {})
            return self.append(rec)

    def wait_installed(self, gen: int, timeout: float) -> tuple[str, str]:
        return "installed", ""       # appending installed it (or raised)

    def rollout_of(self, rec: Record) -> dict:
        live = self.gens.live.id
        here = rec.id == live
        return {"generation": rec.id, "kind": rec.kind, "phase": "", "canaries": [], "serving": [self.name] if here
                else [], "progress": "" if here else f"no longer live: generation {live} is", "live_here": here,
                "replicas": 1}

    def find(self, key: str, request: str) -> Record | None:
        return find_keyed(self.gens.records.values(), key, request)

    def head_view(self) -> tuple[int, dict, Callable[[int], str]]:
        live = self.gens.live.id
        return live, self.gens.records, lambda gen: f"generation {gen} is not live (live is {live})"

    def record(self, gen: int) -> Record:
        return self.gens.get(gen)
