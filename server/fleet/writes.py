"""The fleet's generation log, as the controller calls it (the calls
server/generations/log.py lists): checks before an append, appends, reverts built from
the log alone, waiting for a generation to go live here, and where a generation
stands. A mixin of FleetAgent (agent.py), which follows the log and reports."""
from __future__ import annotations

import logging
import time

from transplant_core.errors import NotFound, PreconditionFailed

from ..generations import Record
from ..generations.records import find_keyed
from . import rollout
from .etcd import Unavailable
from .log import ROLLOUT_FAILED, Conflict

log = logging.getLogger("transplant.fleet")


class FleetLogCalls:
    # ---- writes (from the runtime) ------------------------------------------------------------

    def _writable(self) -> None:
        if self.fatal:
            raise PreconditionFailed(self.fatal)
        if self.joined and not self.reachable:     # the last try failed: ask again (another member may answer)
            try:
                self.refresh()
            except Unavailable as e:
                self._unreachable(e)
        if not self.joined or not self.reachable:
            raise Unavailable(f"fleet {self.spec.name}: {self.etcd_error or f'etcd at {self.spec.etcd} is unreachable'}"
                              "; nothing changed (the replicas keep serving; try again when etcd answers)")

    def check_publishable(self, parent: int) -> None:
        """Would a record prepared on `parent` be appended now? Asked before its tensors are
        written to the shared store, so a refused transplant leaves no objects behind."""
        self._writable()
        head = max(self.records)
        if rollout.phase(self.records[head], self.decided) == "canary":
            raise PreconditionFailed(f"generation {head} is still in its canary phase "
                                     f"({self.progress(head)}); wait for it to be promoted, or revert it first")
        if parent != head and head in self._damaged:
            raise PreconditionFailed(f"this replica cannot build the fleet's head, generation {head}: object "
                                     f"{self._damaged[head]['digest']} is missing or damaged in the shared store; "
                                     "restore it, or revert the head (`transplant admin revert` on any replica), "
                                     "then transplant again")
        if parent != head:
            raise Conflict(f"this replica serves generation {parent} and the fleet's head is {head}: it has not "
                           f"caught up yet; nothing changed; try again in a moment (or send it to a replica "
                           f"serving {head})")

    def publish(self, rec) -> None:
        """Append a record this replica built (a transplant prepared on its live generation,
        which must be the fleet's head); the rollout names its canaries."""
        self._writable()
        head = max(self.records)
        if rollout.phase(self.records[head], self.decided) == "canary":
            raise PreconditionFailed(f"generation {head} is still in its canary phase "
                                     f"({self.progress(head)}); wait for it to be promoted, or revert it first")
        rec.replica = self.name
        if rec.kind == "transplant" and self.spec.canaries > 0:
            fresh = self.log.fresh()              # heard from recently, not merely with a lease not yet expired
            alive = [n for n, s in self.log.replicas().items() if s.get("health") == "SERVING" and n in fresh]
            rec.rollout = {"canaries": rollout.pick_canaries(self.spec.canaries, alive, self.name),
                           "window_s": self.spec.probe_window_s}
        self.log.append(rec.to_journal())
        self.records = {**self.records, rec.id: rec.to_journal()}
        log.info("fleet %s: appended generation %d (%s)%s", self.spec.name, rec.id, rec.kind,
                 f"; canaries {', '.join(rec.rollout['canaries'])}" if rec.rollout else "")

    def revert(self, to: int | None, why: str, requested_by: str = "", reason: str = "", extra: dict | None = None,
               expect: int | None = None, _again: bool = True, idempotency: dict | None = None):
        """Append a revert of the fleet's head (to its parent, or to `to`), built from the log
        alone: this replica need not serve the head. `expect`: only if the head is still
        that generation (an alert's). Returns the record."""
        self._writable()
        self.refresh()
        head = max(self.records)
        if expect is not None and head != expect:
            raise Conflict(f"the fleet's head moved from generation {expect} to {head} meanwhile")
        h = self.records[head]
        if to is None:
            if h.get("parent") is None:
                raise PreconditionFailed("the fleet's head is generation 0 (the model as loaded): nothing to revert to")
            to = int(h["parent"])
        if to not in self.records:
            raise NotFound(f"generation {to} does not exist in fleet {self.spec.name}; generations are 0..{head}")
        if to == head:
            raise PreconditionFailed(f"generation {to} is already the fleet's head")
        rec = self.rt.gens.revert_record(h, self.records[to], selection={"method": "revert", "why": why,
                                                                         **(extra or {})},
                                         requested_by=requested_by, reason=reason, replica=self.name,
                                         idempotency=idempotency or {})
        if rollout.phase(h, self.decided) == "canary":      # its rollout stops here too
            if not self.log.fail_and_revert(head, rec.to_journal(), self.name, f"reverted ({why})"):
                if _again:                                   # promoted meanwhile: revert it as promoted
                    return self.revert(to, why, requested_by, reason, extra, expect=head, _again=False,
                                       idempotency=idempotency)
                raise Conflict(f"fleet {self.spec.name} moved past generation {head} meanwhile; look again")
        else:
            self.log.append(rec.to_journal())
        self.records = {**self.records, rec.id: rec.to_journal()}
        log.info("fleet %s: appended generation %d (revert to %d, %s)", self.spec.name, rec.id, to, why)
        return rec

    # ---- the generation log's calls (server/generations/log.py) -------------------------------

    shared = True

    @property
    def where(self) -> str:
        return f" across fleet {self.spec.name}"

    def append(self, rec: Record) -> Record:
        self.publish(rec)
        return rec

    def find(self, key: str, request: str) -> dict | None:
        """The record an idempotency key made, read fresh (a call whose outcome was unknown
        may have landed meanwhile)."""
        self.refresh()
        return find_keyed(self.records.values(), key, request)

    def head_view(self):
        """For an alert: the fleet's head as etcd has it now."""
        self._writable()
        self.refresh()
        head = max(self.records)
        return head, self.records, lambda gen: f"generation {gen} is not the fleet's head (generation {head})"

    def wait_installed(self, gen: int, timeout: float) -> tuple[str, str]:
        """Until generation `gen` is live here ("installed"), its rollout failed or was
        superseded ("failed"), this replica refused it ("refused"), or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.rt.gens.live.id >= gen and gen in self.rt.gens.records and not self.rt.gens.records[gen].skipped:
                    return "installed", ""
                if gen in self._refused:
                    return "refused", self._refused[gen]
                d = self.decided.get(gen)
                if d and d.get("phase") == ROLLOUT_FAILED:
                    return "failed", d.get("why", "")
                later = [r for i, r in sorted(self.records.items()) if i > gen]
                if later:
                    sel = later[0].get("selection", {})
                    return "failed", (f"generation {later[0]['id']} ({later[0].get('kind')}, "
                                      f"{sel.get('why') or later[0].get('reason') or ''}) superseded it before it "
                                      f"reached this replica{': ' + sel['error'] if sel.get('error') else ''}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout", self.progress(gen)
                self._cond.wait(min(left, 1.0))

    # ---- views -----------------------------------------------------------------------------------

    def record(self, gen: int) -> Record:
        return Record.from_doc(self.records[gen], skipped=False)

    def rollout_of(self, record: Record) -> dict:
        """Where a generation stands: live here or not, its phase, the replicas serving it
        (this one as it is, the others as they last reported) and what it waits for."""
        gen = record.id
        rec = self.records.get(gen) or {}
        here = self.rt.gens.live.id == gen
        reports = dict(self.replicas)
        serving = {n for n, s in reports.items() if s.get("live") == gen and n != self.name}
        if here:
            serving.add(self.name)
        names = set(reports) | {self.name}
        progress = "" if serving == names else self.progress(gen)
        live = self.rt.gens.live.id
        if not here and live > gen and gen in self.rt.gens.records and not self.rt.gens.records[gen].skipped:
            progress = f"no longer live here: generation {live} is; {progress}".rstrip("; ")
        return {"generation": gen, "kind": rec.get("kind", ""), "phase": rollout.phase(rec, self.decided) if rec else "",
                "canaries": rollout.canaries_of(rec, self.picks) if rec else [], "serving": sorted(serving),
                "progress": progress, "live_here": here, "replicas": len(names)}

    def progress(self, gen: int) -> str:
        rec = self.records.get(gen)
        if rec is None:
            return f"generation {gen} is not in the fleet log"
        p = rollout.phase(rec, self.decided)
        if p == "canary":
            return self._judge(rec).why
        behind = sorted(n for n, s in self.replicas.items() if (s.get("live") or 0) < gen)
        if behind:
            return f"not yet served by {', '.join(behind)}"
        return f"served by all {len(self.replicas)} replicas reporting"

    def view(self) -> dict:
        """The fleet as this replica sees it: read fresh when etcd answers; while it does
        not, as last read (the follower keeps trying), without waiting on etcd again."""
        if self.reachable:
            try:
                self.refresh()
            except Unavailable as e:
                self._unreachable(e)
        head = max(self.records) if self.records else -1
        fresh = None
        if self.reachable:
            try:
                fresh = self.log.fresh()
            except Unavailable as e:
                self._unreachable(e)
        replicas = {n: dict(s, stale=fresh is not None and n not in fresh, behind=max(0, head - (s.get("live") or 0)))
                    for n, s in self.replicas.items()}
        out = {"name": self.spec.name, "etcd": self.spec.etcd, "replica": self.name, "reachable": self.reachable,
               "etcd_error": self.etcd_error, "fatal": self.fatal, "head": head, "replicas": replicas,
               "rollout": None, "fenced": self.fenced}
        if head >= 0:
            rec = self.records[head]
            p = rollout.phase(rec, self.decided)
            out["rollout"] = {"generation": head, "kind": rec.get("kind"), "phase": p,
                              "canaries": rollout.canaries_of(rec, self.picks),
                              "serving": sorted(n for n, s in self.replicas.items() if s.get("live") == head),
                              "progress": self.progress(head), "live_here": self.rt.gens.live.id == head,
                              "replicas": len(self.replicas)}
        return out

