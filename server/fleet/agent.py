"""A replica's agent: joins the fleet, follows its log, installs what the rollout policy
lets it, reports its state under a lease, and carries out rollout decisions.

One thread follows the log (an etcd watch, and a tick every `tick_s` for the probe
window and retries) and is the only one that installs; one keeps the lease alive.
Installs go through the one install path (control/follower.py: shadow evaluation,
guard, probes), with the fleet's record (its id, its weights by digest). The agent is
also the fleet's generation log (the calls generations/log.py lists), which the
controller appends to.

With etcd unreachable the replica keeps serving the generation it has, stays healthy,
and says so in its status; writes (transplant, revert, alert reverts) fail as
UNAVAILABLE naming the endpoint; when etcd returns it catches up to the head."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.request
from typing import Callable

from transplant_core.errors import PreconditionFailed

from ..generations import Record, StoreDamaged
from . import rollout
from .etcd import Etcd, Unavailable
from .log import ROLLOUT_PROMOTED, FleetLog, OutcomeUnknown
from .writes import FleetLogCalls

log = logging.getLogger("transplant.fleet")
RETRY_S = 5.0                 # a failed install (not a guard refusal) is tried again after this


class FleetAgent(FleetLogCalls):
    def __init__(self, rt, spec, endpoints: dict | None = None):
        self.rt = rt
        self.spec = spec
        self.name = spec.replica or socket.gethostname()
        self.endpoints = endpoints or {}
        self.etcd = Etcd(spec.etcd, spec.etcd_timeout_s)
        self.log = FleetLog(self.etcd, spec.name)
        self.records: dict[int, dict] = {}          # the fleet log as last read
        self.decided: dict[int, dict] = {}          # rollout outcomes
        self.picks: dict[int, dict] = {}            # canaries re-picked after a deadline
        self.replicas: dict[str, dict] = {}         # reports, as last read
        self.joined = False
        self.reachable = False
        self.etcd_error = ""
        self.fatal = ""                             # cannot join (another base model, a foreign history)
        self.error: dict | None = None              # this replica's last failed install
        self._refused: dict[int, str] = {}          # guard refusals: not tried again
        self._retry_at: dict[int, float] = {}
        self._damaged: dict[int, dict] = {}          # records the store cannot build now: digest, tries
        self._all_live_since: dict[int, float] = {}
        self._lease = 0
        self.contact = time.monotonic()             # when etcd last answered
        self.fenced = ""                             # why this replica stopped serving (cut off, its generation reverted)
        self.on_fence: Callable[[str], None] = lambda why: None    # the server sets health
        self._reported: dict | None = None
        self._report_lock = threading.Lock()
        self._refresh_lock = threading.Lock()        # one reader of etcd's state at a time
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Join (a fleet with another base model or a foreign history: PreconditionFailed,
        the server does not start) and catch up; with etcd down, serve what the local
        journal has and keep trying in the background."""
        try:
            self._join()
            self.reconcile()
            self._heartbeat_once()
        except Unavailable as e:
            self._unreachable(e)
            log.warning("fleet %s: %s; serving generation %d until it answers", self.spec.name, e,
                        self.rt.gens.live.id)
        loops = [(self._follow, "fleet-log"), (self._heartbeat, "fleet-lease")]
        if self.spec.store_sweep_s:
            loops.append((self._sweeper, "fleet-sweep"))
        for fn, name in loops:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.spec.etcd_timeout_s + 2)
        if self._lease:
            try:                              # drop out of the fleet at once, not at lease expiry
                self.etcd.revoke(self._lease)
            except (Unavailable, ValueError):
                pass

    def _join(self) -> None:
        gens = self.rt.gens
        local0 = gens.records[0].to_journal()
        fleet0 = self.log.genesis(local0)
        if fleet0.get("checksums") != local0["checksums"]:
            self.fatal = (f"this replica's model ({gens.model_spec}) is not fleet {self.spec.name}'s: generation 0's "
                          f"weights differ (the fleet was started on {fleet0.get('selection', {}).get('model')!r}); "
                          "every replica must load the same base checkpoint")
            raise PreconditionFailed(self.fatal)
        recs, _ = self.log.records(0)
        for i, r in sorted(gens.records.items()):
            f = recs.get(i)
            if i and (f is None or f.get("state") != r.state or f.get("kind") != r.kind):
                self.fatal = (f"state directory {gens.dir} holds generation {i} ({r.kind}) that fleet "
                              f"{self.spec.name} does not have: it served outside this fleet; start this replica "
                              "with a fresh --state-dir (it catches up from the fleet log)")
                raise PreconditionFailed(self.fatal)
        self.records = {0: fleet0, **recs}
        self.joined = True
        log.info("fleet %s: joined as %s (head %d, live here %d)", self.spec.name, self.name, max(self.records),
                 gens.live.id)

    # ---- following the log ------------------------------------------------------------------

    def _follow(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if not self.joined:
                    self._join()
                rev = self.reconcile()
                backoff = 0.5
                for _ in self.etcd.watch(self.log.root, rev + 1, self._stop, idle=self.spec.tick_s):
                    self.reconcile()          # on changes, and every tick (probe window, retries)
            except Unavailable as e:
                try:                          # a broken watch: another member may answer at once
                    self.refresh()
                    self._stop.wait(0.1)
                    continue
                except Unavailable:           # no member answers either: unreachable, back off below
                    pass
                self._unreachable(e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except PreconditionFailed as e:  # cannot join: said in the status, looked at again later
                log.error("fleet %s: %s", self.spec.name, e)
                self._stop.wait(30)
            except Exception:                # noqa: BLE001 - the follower must not die
                log.exception("fleet %s: following the log failed", self.spec.name)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _unreachable(self, e: Exception) -> None:
        if self.reachable or self.etcd_error != str(e):
            log.warning("fleet %s: %s", self.spec.name, e)
        self.reachable, self.etcd_error = False, str(e)
        with self._cond:
            self._cond.notify_all()

    def refresh(self) -> int:
        """Read what changed in etcd; returns the revision read at."""
        with self._refresh_lock:
            new, rev = self.log.records(max(self.records) if self.records else -1)
            self.decided = self.log.rollouts()      # (outcomes first: a revert is never seen without its why)
            self.picks = self.log.picks()
            self.records = {**self.records, **new}  # replaced, never changed in place: readers on
                                                    # other threads see one version or the other
            self.replicas = self.log.replicas()
            self.reachable, self.etcd_error = True, ""
            self.contact = time.monotonic()
            if self.fenced:
                log.warning("fleet %s: etcd answers again: serving (catching up to the head)", self.spec.name)
                self.fenced = ""
                self.on_fence("")
            return rev

    def reconcile(self) -> int:
        rev = self.refresh()
        live = self.rt.gens.live.id
        now = time.monotonic()
        waiting = {i for i, d in self._damaged.items() if self._retry_at.get(i, 0) > now}
        t = rollout.target(self.records, live, self.name, self.decided, self.picks, waiting)
        if t is not None and t not in self._refused and self._retry_at.get(t, 0) <= now:
            self._install(t)
        if self.error and self.rt.gens.live.id >= self.error["generation"]:
            self.error = None
        self._duties()
        self._report()
        with self._cond:
            self._cond.notify_all()
        return rev

    def _install(self, t: int) -> None:
        live = self.rt.gens.live.id
        rec = Record.from_doc(self.records[t], skipped=False)
        skipped = tuple(Record.from_doc(self.records[i], skipped=False) for i in range(live + 1, t) if i in self.records)
        try:
            self.rt.follower.install(rec, skipped)
            self._damaged = {i: d for i, d in self._damaged.items() if i > t}
            if self.error and self.error["generation"] <= t:
                self.error = None
            log.info("fleet %s: generation %d live on %s", self.spec.name, t, self.name)
        except StoreDamaged as e:
            rec = self.records[t]
            if rollout.phase(rec, self.decided) == "canary" and self.name in rollout.canaries_of(rec, self.picks):
                self._refused[t] = str(e)           # a canary's verdict: the rollout fails before anyone serves it
                self.error = {"generation": t, "message": str(e), "digest": e.digest}
                log.warning("fleet %s: canary cannot build generation %d: %s", self.spec.name, t, e)
            else:                                   # not a verdict: the newest it can verify, and again later
                d = self._damaged.get(t, {"tries": 0})
                tries = d["tries"] + 1
                self._damaged[t] = {"digest": e.digest, "tries": tries}
                wait = min(RETRY_S * 2 ** (tries - 1), 60.0)
                self._retry_at[t] = time.monotonic() + wait
                self.error = {"generation": t, "message": str(e), "digest": e.digest, "retryable": True}
                if tries == 1 or d.get("digest") != e.digest:
                    log.warning("fleet %s: cannot build generation %d here (%s); serving generation %d, trying "
                                "again with backoff (next in %.0f s)", self.spec.name, t, e, self.rt.gens.live.id, wait)
        except PreconditionFailed as e:          # a verdict (the guard): final, fails a canary phase
            self._refused[t] = str(e)
            self.error = {"generation": t, "message": str(e)}
            log.warning("fleet %s: generation %d not installed here: %s", self.spec.name, t, e)
        except Exception as e:                       # noqa: BLE001 - reported, tried again later
            self._retry_at[t] = time.monotonic() + RETRY_S
            self.error = {"generation": t, "message": f"{type(e).__name__}: {e}", "retryable": True}
            log.exception("fleet %s: installing generation %d failed", self.spec.name, t)
        self._report()                               # canaries' outcomes reach the others at once

    def _duties(self) -> None:
        """What any replica may do for the head's rollout: promote it, fail and revert it,
        or (past its deadline, as configured) re-pick its canaries."""
        head = max(self.records)
        rec = self.records[head]
        if rollout.phase(rec, self.decided) != "canary":
            return
        canaries = rollout.canaries_of(rec, self.picks)
        if all((self.replicas.get(n) or {}).get("live") == head for n in canaries):
            self._all_live_since.setdefault(head, time.monotonic())
        else:
            self._all_live_since.pop(head, None)
        v = self._judge(rec)
        if v.action == "promote":
            if self.log.decide(head, ROLLOUT_PROMOTED, self.name, v.why):
                log.info("fleet %s: generation %d promoted: %s", self.spec.name, head, v.why)
                self.decided = {**self.decided, head: {"phase": ROLLOUT_PROMOTED, "why": v.why}}
            return
        if v.action == "timeout" and self.spec.on_canary_timeout == "repick":
            fresh = [n for n in self.log.fresh() if (self.replicas.get(n) or {}).get("health") == "SERVING"]
            pick = self.picks.get(head) or {}
            tried = sorted(set(pick.get("tried", [])) | set(canaries))
            new = rollout.replace_stuck(canaries, v.waiting_for, fresh, self.spec.canaries, tried)
            if new is not None:
                rnd = pick.get("round", 0) + 1
                if self.log.repick(head, rnd, new, self.name, v.why, tried):
                    log.warning("fleet %s: %s; canaries now %s", self.spec.name, v.why, ", ".join(new))
                return
            v.why += "; no other replica heard from recently to take over"
        if v.action in ("fail", "timeout"):
            target = self.records.get(rec.get("parent"))
            if target is None:
                return
            revert = self.rt.gens.revert_record(
                rec, target, selection={"method": "revert", "why": "canary", "canary": v.failed or
                                        ", ".join(v.waiting_for), "error": v.why},
                requested_by=f"fleet rollout ({self.name})", reason="canary", replica=self.name)
            try:
                failed = self.log.fail_and_revert(head, revert.to_journal(), self.name, v.why)
            except OutcomeUnknown as e:       # the next tick reads the log again and knows
                log.warning("fleet %s: failing the rollout of generation %d: %s", self.spec.name, head, e)
                return
            if failed:
                log.warning("fleet %s: rollout of generation %d failed (%s); the fleet reverts to %d as generation %d",
                            self.spec.name, head, v.why, target["id"], revert.id)

    def _judge(self, rec: dict) -> rollout.Verdict:
        head = int(rec["id"])
        return rollout.judge(rec, self.replicas, self._all_live_since.get(head), time.monotonic(),
                             self.spec.probe_window_s, self.picks, time.time(), self.spec.canary_timeout_s)

    # ---- reporting --------------------------------------------------------------------------

    def state(self) -> dict:
        gens = self.rt.gens
        live = gens.live.id
        error = self.error if self.error and self.error["generation"] > live else None   # past it: moot
        return {"replica": self.name, "live": live, "health": "SERVING" if self.rt.serving else "NOT_SERVING",
                "error": error, "fatal": self.fatal or None, **self.endpoints, "host": socket.gethostname(),
                "pid": os.getpid(), "servable": gens.servable_ids()}

    def _report(self, force: bool = False) -> None:
        with self._report_lock:
            if not self._lease:
                return
            state = self.state()
            if state == self._reported and not force:
                return
            try:
                self.log.report(self.name, dict(state, updated=time.time()), self._lease)
            except ValueError as e:          # the lease expired while etcd could not be reached: a new one
                if "lease not found" not in str(e):
                    raise
                self._lease = self.etcd.grant(self.spec.lease_ttl_s)
                self.log.report(self.name, dict(state, updated=time.time()), self._lease)
            self._reported = state

    def _heartbeat_once(self) -> None:
        if self._lease and self.etcd.keepalive(self._lease) > 0:
            return
        self._lease = self.etcd.grant(self.spec.lease_ttl_s)     # new, or the old one expired
        self._report(force=True)

    def sweep(self) -> list[str]:
        """Objects of the shared store that no record of the fleet log names (a transplant
        that lost the race to the head, a crash before its append) go to orphans/ once
        older than store_sweep_grace_s."""
        named = set()
        for r in dict(self.records).values():
            named |= set((r.get("state") or {}).values()) | set((r.get("checksums") or {}).values())
            for d, recipe in (r.get("derived") or {}).items():
                named |= {d, recipe.get("B", ""), recipe.get("A", ""), recipe.get("of", "")}
        moved = self.rt.gens.sweep_shared(named, self.spec.store_sweep_grace_s)
        if moved:
            log.info("fleet %s: moved %d objects no record names to the store's orphans/", self.spec.name, len(moved))
        return moved

    def _sweeper(self) -> None:
        """Its own thread: a sweep over a large store must not delay the lease."""
        while not self._stop.wait(self.spec.store_sweep_s):
            try:
                if self.joined:
                    self.refresh()               # every record, as etcd has them now
                    self.sweep()
            except Unavailable as e:
                self._unreachable(e)
            except Exception:                    # noqa: BLE001 - tried again next time
                log.exception("fleet %s: sweeping the store failed", self.spec.name)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.spec.lease_ttl_s / 3):
            try:
                self._heartbeat_once()
                self._report()
            except Unavailable as e:
                self._unreachable(e)
                self._check_cut_off()
            except Exception:                    # noqa: BLE001 - the lease must outlive odd replies
                log.exception("fleet %s: renewing the lease failed", self.spec.name)

    # ---- cut off from etcd -------------------------------------------------------------------

    def public_state(self) -> dict:
        """What a replica cut off from etcd asks its peers (GET /fleet/state): whether they
        reach etcd, the head, and the generations the fleet reverted (a revert's parent, a
        failed rollout). Generation ids only."""
        records = dict(self.records)
        return {"fleet": self.spec.name, "replica": self.name, "etcd_reachable": self.reachable,
                "head": max(records) if records else -1, "reverted": sorted(rollout.reverted(records, self.decided))}

    def _check_cut_off(self) -> None:
        """Cut off from etcd for longer than cut_off_s: ask the peers (as last reported);
        if one that reaches etcd says the fleet reverted the generation this replica
        serves, stop serving it (health NOT_SERVING) until etcd answers again. With every
        peer cut off too (etcd itself is down), keep serving."""
        silent = time.monotonic() - self.contact
        if self.fenced or not self.spec.cut_off_s or silent < self.spec.cut_off_s:
            return
        live = self.rt.gens.live.id
        for name, rep in sorted(self.replicas.items()):
            if name == self.name or not rep.get("http"):
                continue
            try:
                with urllib.request.urlopen(f"http://{rep['http']}/fleet/state", timeout=1.0) as r:
                    peer = json.loads(r.read())
            except (OSError, ValueError):
                continue
            if peer.get("fleet") == self.spec.name and peer.get("etcd_reachable") and live in peer.get("reverted", []):
                self.fenced = (f"cut off from etcd for {silent:.0f} s, and replica {name} (which reaches it) says the "
                               f"fleet reverted generation {live}, which this replica serves; not serving until etcd "
                               "answers (fleet.cut_off_s)")
                log.error("fleet %s: %s", self.spec.name, self.fenced)
                self.on_fence(self.fenced)
                return
