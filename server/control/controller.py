"""The controller: what a transplant, a revert or a rollback alert does, from request to reply.

  transplant(args)
    1. plan (planner.py): validate, select modules, build the validated plan; nothing changes
    2. measure the requested tasks on the live generation (quality before)
    3. build the candidate off to the side (Generations.prepare) and let the guard judge
       it on shadow probes (Follower.judge); a refusal changes nothing
    4. ask the log whether a record on this parent would be appended now, then stage it:
       its tensors durable in the store, the record that names them (Generations.stage)
    5. append it to the generation log on its parent (the log: generations/log.py). On a
       standalone server (LocalLog) appending is installing: the follower hands the
       candidate to the engine, which commits the record to the journal and swaps at the
       moment it can. In a fleet the record goes to etcd and every replica's follower,
       this one's too, installs it as the rollout lets it; this call waits for it here
    6. measure again on the new live generation (quality after); report where it stands
       (live here, pending in its canary phase, live on k of n) from the log
  revert(to): a record built from the log alone (the target's weights by digest),
    appended and installed the same way: revert goes through the same path.
  alert: a firing rollback alert for the head reverts it to its parent, once
    (alerts.py), through revert.
Idempotency keys (outcome.py): the same call with the same key returns the generation
the first one made, as it stands now."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from transplant_core.errors import InvalidArgument, PreconditionFailed

from ..generations import Record
from ..generations.log import Conflict
from . import alerts, outcome
from .follower import Offer
from .planner import TransplantArgs

log = logging.getLogger("transplant.runtime")


@dataclass
class SwapResult:
    record: Record
    before: list[dict]
    after: list[dict]
    seconds: float
    rollout: dict | None = None       # where the generation stands (the log's rollout_of), filled in on return
    replayed: bool = False            # an idempotency key named an earlier call: its generation


class Controller:
    def __init__(self, rt):
        self.rt = rt

    @property
    def log(self):
        return self.rt.log

    def transplant(self, a: TransplantArgs, requested_by: str = "") -> SwapResult:
        rt = self.rt
        if a.selector == "all":
            raise InvalidArgument("selector 'all' compares selectors in a dry run (PlanTransplant, `transplant admin "
                                  "plan --selector all`); give the selector to transplant with")
        key = outcome.check_key(a.idempotency_key)
        digest = outcome.request_digest("transplant", a)
        if key and (done := self._keyed(key, digest)) is not None:   # (a fleet waits for it: not under the lock)
            return done
        tasks = list(dict.fromkeys(([a.task] if a.task else []) + list(a.eval_tasks)))
        with rt.gens.lock:
            if key and (done := self._keyed(key, digest, wait=False)) is not None:
                return done
            pr = rt.planner.plan(a)
            rec, before, seconds, verdict = self._change(pr.plan, tasks, a.eval_examples, requested_by, a.reason,
                                                         pr.selection(a), a.task, outcome.stamp(key, digest))
            if not self.log.shared:       # installed: measure it before anything else changes
                res = self._await(rec, before, tasks, a.eval_examples, seconds, a.task)
                if verdict is not None and not verdict.ok:    # guard mode "revert": take it back now
                    back = self.revert(None, reason="guard", why="guard", extra={"violations": verdict.violations})
                    raise PreconditionFailed(f"the guard reverted generation {rec.id} at once (now "
                                             f"{back.record.id}): {verdict.reason()}")
                return res
        return self._await(rec, before, tasks, a.eval_examples, seconds, a.task)   # the follower installs it

    def _change(self, p, tasks: list[str], n: int, requested_by: str, reason: str, selection: dict,
                held_out: str, idempotency: dict):
        """Steps 2-5 of a transplant: (record, quality before, seconds, the guard's verdict
        when it let a failing candidate through: mode "revert")."""
        rt, gens = self.rt, self.rt.gens
        why = selection.get("why", "manual")
        parent = gens.live
        before = [rt.evaluate_on(parent.model, parent.id, t, n, held_out=t == held_out) for t in tasks]
        t0 = time.perf_counter()
        try:
            cand = gens.prepare(p)
        except Exception:
            rt.metrics.swaps.labels("transplant", "error", why).inc()
            raise
        refuse = rt.cfg.guard.mode == "refuse" or self.log.shared
        verdict, shadow = rt.follower.judge(cand, parent, "transplant", requested_by, refuse=refuse)
        self.log.check_publishable(parent.id)        # before any object is written: a refusal leaves none
        try:
            rec = gens.stage(cand, "transplant", requested_by, reason, selection, idempotency)
        except Exception:
            rt.metrics.swaps.labels("transplant", "error", why).inc()
            raise
        seconds = time.perf_counter() - t0
        rt.follower.offer(rec, Offer(cand, verdict, shadow, seconds, dict(rec.state)))
        try:
            self.log.append(rec)
        except BaseException:
            rt.follower.withdraw(rec.id)
            raise
        return rec, before, seconds, verdict

    def revert(self, to: int | None, reason: str = "", requested_by: str = "", eval_tasks=(), eval_examples: int = 0,
               why: str = "manual", extra: dict | None = None, idempotency_key: str = "", expect: int | None = None,
               wait: bool = True) -> SwapResult:
        rt = self.rt
        key = outcome.check_key(idempotency_key)
        digest = outcome.request_digest("revert", {"to": to, "reason": reason, "eval_tasks": list(eval_tasks),
                                                   "eval_examples": eval_examples})
        if key and (done := self._keyed(key, digest)) is not None:
            return done
        live = rt.gens.live
        before = [rt.evaluate_on(live.model, live.id, t, eval_examples) for t in eval_tasks]
        with rt.gens.lock:                        # one call per key at a time on this server
            if key and (done := self._keyed(key, digest, wait=False)) is not None:
                return done
            rec = self.log.revert(to, why, requested_by, reason, extra, expect=expect,
                                  idempotency=outcome.stamp(key, digest))
            if not wait:
                return self._where(SwapResult(rec, before, [], 0.0))
            if not self.log.shared:
                return self._await(rec, before, list(eval_tasks), eval_examples, 0.0)
        return self._await(rec, before, list(eval_tasks), eval_examples, 0.0)

    def _await(self, rec: Record, before: list[dict], tasks: list[str], n: int, seconds: float,
               held_out: str = "") -> SwapResult:
        """Until this server serves the appended record (a fleet: up to rollout_timeout_s);
        its rollout failing is an error, a timeout returns the record as appended."""
        rt = self.rt
        timeout = rt.cfg.fleet.rollout_timeout_s if rt.cfg.fleet else 0.0
        state, why = self.log.wait_installed(rec.id, timeout)
        if state in ("failed", "refused"):
            rt.follower.withdraw(rec.id)         # never installed here: drop the candidate
            raise PreconditionFailed(f"generation {rec.id} was appended to fleet {rt.cfg.fleet.name} but did not "
                                     f"go live here: {why}; see `transplant admin fleet`")
        after = []
        if state == "installed":
            rec = rt.gens.records[rec.id]
            seconds += rt.follower.install_seconds.get(rec.id, 0.0)
            live = rt.gens.live
            for t in tasks:
                q = rt.evaluate_on(live.model, live.id, t, n, held_out=t == held_out)
                rt.gens.add_quality(live.id, q)
                after.append(q)
        else:
            log.warning("generation %d is in fleet %s's log but not live here after %.0f s: %s", rec.id,
                        rt.cfg.fleet.name, timeout, why)
        return self._where(SwapResult(rec, before, after, seconds))

    # ---- outcomes: idempotency keys and where a generation stands --------------------------------

    def _keyed(self, key: str, digest: str, wait: bool = True) -> SwapResult | None:
        """The outcome of the earlier call that gave `key` (the generation it made, where it
        stands now), or None if no generation carries it. A fleet's log is read fresh (a
        call whose outcome was unknown may have landed meanwhile) and, with `wait`, the
        generation is waited for as a new call's would be."""
        rt = self.rt
        doc = self.log.find(key, digest)
        if doc is None:
            return None
        gen = int(doc["id"] if isinstance(doc, dict) else doc.id)
        if wait:
            state, why = self.log.wait_installed(gen, rt.cfg.fleet.rollout_timeout_s if rt.cfg.fleet else 0.0)
            if state in ("failed", "refused"):       # what the first call was told
                raise PreconditionFailed(f"generation {gen} (idempotency key {key!r}) was appended to fleet "
                                         f"{rt.cfg.fleet.name} but did not go live here: {why}; see "
                                         "`transplant admin fleet`")
        rec = rt.gens.records.get(gen) or self.log.record(gen)
        return self._where(SwapResult(rec, [], [], 0.0, replayed=True))

    def _where(self, res: SwapResult) -> SwapResult:
        res.rollout = self.log.rollout_of(res.record)
        return res

    # ---- alerts (Alertmanager webhook) ---------------------------------------------------

    def on_alert(self, doc: dict) -> tuple[int, dict]:
        """Revert the live generation to its parent, once, when a rollback alert fires for
        it. Everything else is answered and changes nothing."""
        rt = self.rt
        alerts_ = doc.get("alerts") if isinstance(doc, dict) else None
        if not isinstance(alerts_, list) or not all(isinstance(a, dict) for a in alerts_):
            rt.quality.metrics.alerts.labels("malformed").inc()
            return 400, {"error": "expected an Alertmanager webhook body: {\"alerts\": [{\"status\", \"labels\", ...}]}"}
        from ..fleet.etcd import Unavailable

        try:
            decisions = [self._alert(a) for a in alerts_]
        except Unavailable as e:             # a fleet whose etcd is down: Alertmanager retries
            return 503, {"error": str(e)}
        return 200, {"decisions": decisions}

    def _alert(self, a: dict) -> dict:
        rt = self.rt
        labels = a.get("labels") if isinstance(a.get("labels"), dict) else {}
        fp = str(a.get("fingerprint", ""))
        out = {"fingerprint": fp, "alertname": labels.get("alertname", ""), "action": "none"}

        def ignored(why: str) -> dict:
            rt.quality.metrics.alerts.labels("ignored").inc()
            return dict(out, reason=why)

        if a.get("status") != "firing":
            return ignored(f"status is {a.get('status')!r}, not firing")
        if labels.get("alertname") not in rt.cfg.rollback_alerts:
            return ignored(f"alert {labels.get('alertname')!r} is not a rollback alert ({', '.join(rt.cfg.rollback_alerts)})")
        gen = labels.get("generation", "")
        if not str(gen).isdigit():
            return ignored("the alert has no numeric 'generation' label")
        gen = int(gen)
        extra = {"fingerprint": fp, "alertname": labels.get("alertname"), "task": labels.get("task")}
        with rt.gens.lock:
            head, records, not_head = self.log.head_view()
            why = alerts.refusal(gen, head, records, not_head(gen))
            if why is not None:
                return ignored(why)
            try:
                res = self.revert(None, reason="alert", requested_by="alertmanager", why="alert", extra=extra,
                                  expect=gen, wait=False)
            except Conflict:
                return ignored(f"another replica reverted generation {gen} first")
        rt.quality.metrics.alerts.labels("reverted").inc()
        return dict(out, action="reverted", reason=f"generation {gen} reverted to {res.record.reverted_to}"
                    f"{self.log.where}", generation=res.record.id)
