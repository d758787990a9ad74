"""The fleet's generation log in etcd: the fleet-wide counterpart of the local journal.

Keys, all under /transplant/fleets/<NAME>/:
  log/<id, 12 digits>   one generation record (the journal's JSON) per id, never rewritten
  head                  the newest id; a record is appended in ONE transaction that
                        compares head with the id it was prepared on, writes the record
                        and moves head, so two operators cannot fork history
  rollout/<id>          "promoted" or "failed": the outcome of a transplant's canary phase
                        (created once, never changed)
  canaries/<id>/<round> the canaries of a transplant's canary phase after its deadline
                        passed with canaries that never served it (round 1, 2, ...: each
                        created once); the record's own list until then
  replicas/<name>       each replica's state (live generation, health, last error), under
                        its lease: a replica that dies drops out when the lease expires

Generation 0 (the model as loaded, with the checksums of every tensor) is written by
the first replica that joins; a replica whose base model differs is refused."""
from __future__ import annotations

import json
import time
import uuid

from . import etcd as E
from ..generations.log import Conflict, OutcomeUnknown  # noqa: F401 - what an append answers
from .etcd import Etcd, Unavailable

ROLLOUT_PROMOTED, ROLLOUT_FAILED = "promoted", "failed"


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
        """Append `record` (its id = head + 1, its parent the head): it landed (returns),
        it did not (Conflict: the head moved, naming the record that won; Unavailable:
        etcd was not reached) or nobody can tell yet (OutcomeUnknown)."""
        rid, parent = int(record["id"]), int(record["parent"])
        self._txn(rid, [E.value_is(self._head, str(parent))],
                  [E.put(self._log(rid), _dump(record)), E.put(self._head, str(rid))], _dump(record), parent)

    def _txn(self, rid: int, compare: list[dict], success: list[dict], mine: str, parent: int) -> None:
        """Write record `rid` (`mine`) in one transaction, once. Each try carries a fence
        (a key that must be absent): when the reply is lost, writing the fence stops the
        transaction from applying later, whatever is still in flight, and reading the
        record then says for certain whether it landed."""
        fence = f"{self.root}fence/{rid:012d}-{uuid.uuid4().hex}"
        try:
            ok, resp = self.etcd.txn([*compare, E.absent(self._log(rid)), E.absent(fence)], success,
                                     [E.get(self._head)])
        except Unavailable as e:
            if not e.sent:                     # it never reached etcd: nothing changed
                raise
            if self._resolve(rid, mine, fence, e):
                return
            raise Conflict(f"generation {rid}'s append to the fleet log did not land (etcd's reply was lost; "
                           f"it is fenced off now); nothing changed; plan again") from None
        if ok:
            return
        own = self.etcd.get(self._log(rid))
        if own is not None and own.value.decode() == mine:   # a resent request found its own first try
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

    def _resolve(self, rid: int, mine: str, fence: str, lost: Unavailable, tries: int = 3) -> bool:
        """After a lost reply: fence the transaction off and say whether it landed; if etcd
        stays silent, OutcomeUnknown."""
        for i in range(tries):
            try:
                self.etcd.put(fence, "1")
                kv = self.etcd.get(self._log(rid))
                return kv is not None and kv.value.decode() == mine
            except Unavailable:
                time.sleep(0.5 * (i + 1))
        raise OutcomeUnknown(f"generation {rid} was sent to the fleet log and etcd's reply was lost ({lost}); it may "
                             f"or may not have landed: look for generation {rid} in `transplant admin history` or "
                             "`transplant admin fleet` once etcd answers, or, if the call gave an idempotency key, send it "
                             "again with the same key (it returns this call's outcome, never a second generation)", rid)

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
        rid = int(revert["id"])
        try:
            self._txn(rid, [E.value_is(self._head, str(gen)), E.absent(key)],
                      [E.put(key, _dump({"phase": ROLLOUT_FAILED, "by": by, "why": why, "time": time.time()})),
                       E.put(self._log(rid), _dump(revert)), E.put(self._head, str(rid))], _dump(revert), gen)
        except Conflict:
            return False
        return True

    def picks(self, after: int = -1) -> dict[int, dict]:
        """Re-picked canaries: generation -> its newest round ({"canaries", "since", "round", ...})."""
        kvs, _ = self.etcd.range(f"{self.root}canaries/{after + 1:012d}", f"{self.root}canaries0")
        out: dict[int, dict] = {}
        for kv in kvs:
            gen, rnd = kv.key.rsplit("/", 2)[1:]
            doc = dict(kv.json(), round=int(rnd))
            if int(gen) not in out or out[int(gen)]["round"] < doc["round"]:
                out[int(gen)] = doc
        return out

    def repick(self, gen: int, rnd: int, canaries: list[str], by: str, why: str, tried: list[str] = ()) -> bool:
        """Round `rnd` of generation `gen`'s canaries, if no other replica wrote it first and
        the rollout is still undecided."""
        key = f"{self.root}canaries/{gen:012d}/{rnd:04d}"
        ok, _ = self.etcd.txn([E.absent(key), E.absent(f"{self.root}rollout/{gen:012d}")],
                              [E.put(key, _dump({"canaries": canaries, "since": time.time(), "by": by, "why": why,
                                                  "tried": list(tried)}))])
        return ok

    # ---- replicas ---------------------------------------------------------------------------

    def report(self, name: str, state: dict, lease: int) -> None:
        self.etcd.put(f"{self.root}replicas/{name}", _dump(state), lease=lease)

    def replicas(self) -> dict[str, dict]:
        kvs, _ = self.etcd.range(f"{self.root}replicas/", prefix=True)
        return {kv.key.rsplit("/", 1)[1]: kv.json() for kv in kvs}

    def fresh(self) -> set[str]:
        """The replicas heard from recently: their lease was renewed within the last half
        of its TTL (a replica renews every third), by etcd's clock, not ours. A replica
        cut off a moment ago still has a report, but not a fresh one."""
        kvs, _ = self.etcd.range(f"{self.root}replicas/", prefix=True)
        out = set()
        for kv in kvs:
            if not kv.lease:
                continue
            left, granted = self.etcd.time_to_live(kv.lease)
            if left >= 0 and 2 * left >= granted:
                out.add(kv.key.rsplit("/", 1)[1])
        return out
