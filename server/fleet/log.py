"""The fleet's generation log in etcd: the fleet-wide counterpart of the local journal.

Keys, all under /transplant/fleets/<NAME>/:
  log/<id, 12 digits>   one generation record (the journal's JSON) per id, never rewritten
  head                  the newest id; a record is appended in ONE transaction that
                        compares head with the id it was prepared on, writes the record
                        and moves head, so two operators cannot fork history
  rollout/<id>          "promoted" or "failed": the outcome of a transplant's canary phase
                        (created once, never changed)
  replicas/<name>       each replica's state (live generation, health, last error), under
                        its lease: a replica that dies drops out when the lease expires

Generation 0 (the model as loaded, with the checksums of every tensor) is written by
the first replica that joins; a replica whose base model differs is refused."""
from __future__ import annotations

import json
import time

from . import etcd as E
from .etcd import Etcd, Unavailable

ROLLOUT_PROMOTED, ROLLOUT_FAILED = "promoted", "failed"


class Conflict(Exception):
    """Another record won the append (the fleet's history moved on)."""


def _dump(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


class FleetLog:
    def __init__(self, etcd: Etcd, fleet: str):
        self.etcd = etcd
        self.fleet = fleet
        self.root = f"/transplant/fleets/{fleet}/"

    def _log(self, i: int) -> str:
        return f"{self.root}log/{i:012d}"

    @property
    def _head(self) -> str:
        return f"{self.root}head"

    # ---- the log --------------------------------------------------------------------------

    def genesis(self, record0: dict) -> dict:
        """Generation 0 of the fleet: this one if the fleet is new, else the one it has."""
        ok, resp = self.etcd.txn([E.absent(self._head)], [E.put(self._log(0), _dump(record0)), E.put(self._head, "0")],
                                 [E.get(self._log(0))])
        if ok:
            return record0
        kvs = resp[0]
        if not kvs:
            raise RuntimeError(f"fleet {self.fleet}: etcd has a head but no generation 0 under {self.root}log/")
        return kvs[0].json()

    def head(self) -> int:
        kv = self.etcd.get(self._head)
        return int(kv.value) if kv else -1

    def records(self, after: int = -1) -> tuple[dict[int, dict], int]:
        """Records with id > after, by id; and the etcd revision they were read at."""
        kvs, rev = self.etcd.range(self._log(after + 1), f"{self.root}log0")   # "log0" sorts after "log/..."
        return {int(kv.key.rsplit("/", 1)[1]): kv.json() for kv in kvs}, rev

    def append(self, record: dict) -> None:
        """Append `record` (its id = head + 1, its parent the head); Conflict when the head
        moved, naming the record that won."""
        rid, parent = int(record["id"]), int(record["parent"])
        mine = _dump(record)
        try:
            ok, resp = self.etcd.txn([E.value_is(self._head, str(parent)), E.absent(self._log(rid))],
                                     [E.put(self._log(rid), mine), E.put(self._head, str(rid))],
                                     [E.get(self._head)])
        except Unavailable:
            if self._landed(rid, mine):        # the reply was lost, not the append
                return
            raise
        if ok or self._landed(rid, mine):      # (a resent request finds its own first try)
            return
        head = int(resp[0][0].value) if resp and resp[0] else -1
        won = self.etcd.get(self._log(head)) if head >= 0 else None
        who = ""
        if won is not None:
            w = won.json()
            who = f" ({w.get('kind')} requested by {w.get('requested_by') or 'unknown'} on replica " \
                  f"{w.get('replica') or '?'})"
        raise Conflict(f"generation {head}{who} was appended first: the fleet's head is {head}, not {parent}; "
                       f"nothing changed here; plan again against generation {head}")

    def _landed(self, rid: int, mine: str) -> bool:
        try:
            kv = self.etcd.get(self._log(rid))
        except Unavailable:
            return False
        return kv is not None and kv.value.decode() == mine

    # ---- rollouts ---------------------------------------------------------------------------

    def rollout(self, gen: int) -> dict | None:
        kv = self.etcd.get(f"{self.root}rollout/{gen:012d}")
        return kv.json() if kv else None

    def rollouts(self, after: int = -1) -> dict[int, dict]:
        kvs, _ = self.etcd.range(f"{self.root}rollout/{after + 1:012d}", f"{self.root}rollout0")
        return {int(kv.key.rsplit("/", 1)[1]): kv.json() for kv in kvs}

    def decide(self, gen: int, phase: str, by: str, why: str = "") -> bool:
        """Record a rollout's outcome once; False if another replica decided first."""
        key = f"{self.root}rollout/{gen:012d}"
        ok, _ = self.etcd.txn([E.absent(key)], [E.put(key, _dump({"phase": phase, "by": by, "why": why,
                                                                 "time": time.time()}))])
        return ok

    def fail_and_revert(self, gen: int, revert: dict, by: str, why: str) -> bool:
        """In one transaction: mark generation `gen`'s rollout failed and append `revert`
        (whose parent is `gen`), if `gen` is still the head and undecided."""
        key = f"{self.root}rollout/{gen:012d}"
        ok, _ = self.etcd.txn(
            [E.value_is(self._head, str(gen)), E.absent(key), E.absent(self._log(int(revert["id"])))],
            [E.put(key, _dump({"phase": ROLLOUT_FAILED, "by": by, "why": why, "time": time.time()})),
             E.put(self._log(int(revert["id"])), _dump(revert)), E.put(self._head, str(revert["id"]))])
        return ok

    # ---- replicas ---------------------------------------------------------------------------

    def report(self, name: str, state: dict, lease: int) -> None:
        self.etcd.put(f"{self.root}replicas/{name}", _dump(state), lease=lease)

    def replicas(self) -> dict[str, dict]:
        kvs, _ = self.etcd.range(f"{self.root}replicas/", prefix=True)
        return {kv.key.rsplit("/", 1)[1]: kv.json() for kv in kvs}
