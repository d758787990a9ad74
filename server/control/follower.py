"""The follower: makes a record of the generation log live here, the one way any
generation goes live (a standalone server's transplants and reverts, and every record a
fleet's log adds, on every replica).

install(record): the candidate the controller built and offered (a change made on this
server), or one built from the store by the record's digests; shadow-measured and judged
by this server's guard (a fleet record refused here raises: never installed); handed to
the engine, which calls Generations.commit (the journal record, then the swap) at the
moment it can; then metrics and post-swap probes."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from transplant_core.errors import PreconditionFailed

from ..generations import Candidate, Record

log = logging.getLogger("transplant.runtime")


@dataclass(frozen=True)
class Offer:
    """A candidate the controller built for a record it appends: installing that record
    here needs no second build (if it is the record that wins the head)."""
    candidate: Candidate
    verdict: object
    shadow: list
    seconds: float          # spent building and judging it
    state: dict


class Follower:
    def __init__(self, rt):
        self.rt = rt
        self._offers: dict[int, Offer] = {}
        self._lock = threading.Lock()
        self.install_seconds: dict[int, float] = {}   # generation -> seconds its install here took
        self.donor_accuracy: dict | None = None        # the live generation's donor, per probe task
        self.drift = None                              # the last drift measurement's thread (opt-in)

    def offer(self, rec: Record, o: Offer) -> None:
        with self._lock:
            self._offers = {rec.id: o}

    def withdraw(self, gen: int) -> None:
        with self._lock:
            self._offers.pop(gen, None)

    def _take(self, rec: Record) -> Offer | None:
        with self._lock:
            o = self._offers.pop(rec.id, None)
            self._offers = {k: v for k, v in self._offers.items() if k > rec.id}   # superseded ones go
        if o is not None and (o.candidate.parent != self.rt.gens.live.id or o.state != rec.state):
            return None                          # another replica's record won this id
        return o

    def install(self, rec: Record, skipped: tuple[Record, ...] = ()) -> float | None:
        """Make `rec` live here (None: it, or a later one, already is). Returns the seconds
        it took. `skipped`: records before it this server never made live."""
        rt = self.rt
        gens, m = rt.gens, rt.metrics
        why = rec.selection.get("why", "manual")
        with gens.lock:
            if rec.id <= gens.live.id:
                return None
            parent = gens.live
            o = self._take(rec)
            t0 = time.perf_counter()
            if o is not None:
                cand, shadow, built = o.candidate, o.shadow, o.seconds
            else:
                try:
                    # its state may name low-rank weights of records skipped here: their recipes too
                    derived = {d: r for s in (*skipped, rec) for d, r in s.derived.items()}
                    p = gens.state_plan(rec.state, rec.id, derived)
                    cand = gens.prepare(p, share=True)     # stored values: immutable, shared
                except Exception:
                    m.swaps.labels(rec.kind, "error", why).inc()
                    raise
                _, shadow = self.judge(cand, parent, rec.kind, rec.requested_by, refuse=True)
                built = 0.0
            p = cand.plan
            try:
                done = rt.scheduler.install(parent.model, cand, lambda: gens.commit(cand, rec, skipped), record=rec)
            except Exception:
                m.swaps.labels(rec.kind, "error", why).inc()
                raise
            here = time.perf_counter() - t0          # (building it here, if it was not offered, and installing)
            seconds = built + here
            m.swaps.labels(rec.kind, "ok", why).inc()
            m.swap_seconds.labels(rec.kind).observe(seconds)
            if rt.on_vllm:
                m.swap_pause_seconds.labels(rec.kind).observe(rt.scheduler.last_pause_s)
            m.modules_swapped.inc(len(p.modules))
            m.bytes_swapped.inc(p.nbytes)
            m.live_generation.set(done.id)
            live = gens.live
            for s in shadow:
                gens.add_quality(done.id, rt.quality.adopt(done.id, s).to_dict())
            self.probe(live, "post_swap", donor=p.donor if rec.kind == "transplant" else None, parent=parent)
            log.info("%s: generation %d -> %d (%d modules, %.1f ms)", rec.kind, parent.id, done.id, len(p.modules),
                     seconds * 1e3)
            self.install_seconds = {done.id: here}   # the controller adds what it spent building the offer
            if not rt.on_vllm:      # (drift needs both models' full distributions: refused on vLLM by the config)
                self.drift = rt.drift.after_swap(done.id, live.model, parent.model)   # (opt-in; its own thread)
            return seconds

    # ---- judging a candidate, probing a live generation -----------------------------------

    def judge(self, cand, parent, kind: str, requested_by: str, refuse: bool):
        """Shadow-measure the candidate before it goes live; the guard judges transplants
        (never reverts). A refusal raises when `refuse` (guard mode refuse, or any fleet
        record: the rollout fails and the fleet reverts) and is journaled as an event."""
        rt = self.rt
        q = rt.quality
        if not q.probes:
            return None, []
        if rt.on_vllm:
            # vLLM holds one set of weights: the candidate is tried in place with the gate shut
            # (engine.trial), which costs a pause; only a transplant a guard judges pays it
            # and only for what the guard reads: the guarded tasks, and greedy replies only where a
            # guarded probe's statistic is accuracy (likelihood and KL need one prefill per example)
            guarded: dict[str, bool] = {}        # task -> whether a guarded probe of it reads accuracy
            for p in q.probes:
                if p.guard:
                    guarded[p.task] = guarded.get(p.task, False) or (p.statistic or rt.cfg.guard.statistic) == "accuracy"
            if kind != "transplant" or not guarded:
                return None, []                  # measured once live (post_swap)
            before = rt.forward(parent)
            base = {t: q.baseline(before, parent.id, t) for t in guarded}
            try:
                shadow = rt.scheduler.trial(parent.model, cand, lambda: {
                    t: q.measure(rt.forward(None, direct=True), None, t, "shadow", parent=before, accuracy=acc)
                    for t, acc in guarded.items()})
            finally:
                rt.metrics.guard_trial_seconds.observe(rt.scheduler.last_trial_s)
            verdict = q.judge(base, shadow)
            self._refuse(cand, parent, kind, requested_by, verdict, refuse)
            return verdict, []                   # (the generation is measured whole once live: post_swap)
        base = {t: q.baseline(parent.model, parent.id, t) for t in q.tasks}
        shadow = {t: q.measure(cand.model, None, t, "shadow", parent=parent.model) for t in q.tasks}
        verdict = q.judge(base, shadow) if kind == "transplant" else None
        self._refuse(cand, parent, kind, requested_by, verdict, refuse)
        return verdict, list(shadow.values())

    def _refuse(self, cand, parent, kind: str, requested_by: str, verdict, refuse: bool) -> None:
        """A guard's refusal, when `refuse`: journaled as an event, counted, raised."""
        rt = self.rt
        if verdict is not None and not verdict.ok and refuse:
            p = cand.plan
            rt.gens.append_event({"event": "refused", "reason": "guard", "kind": kind, "donor": p.donor,
                                  "modules": [str(r) for r in p.refs], "violations": verdict.violations,
                                  "requested_by": requested_by, "parent": parent.id})
            rt.metrics.swaps.labels(kind, "refused", "guard").inc()
            raise PreconditionFailed(f"the guard refused this transplant: {verdict.reason()}; "
                                     f"generation {parent.id} stays live")

    def probe(self, live, phase: str, donor: str | None = None, parent=None) -> None:
        """Measure generation `live` on every probe task (with its `parent` Live: the KL
        from it too); export, with the donor's own accuracy where it was a transplant's
        (not on vLLM: that would load the donor model, a second copy)."""
        rt = self.rt
        for t in rt.quality.tasks:
            try:
                m = rt.quality.measure(rt.forward(live), live.id, t, phase,
                                       parent=rt.forward(parent) if parent is not None else None)
            except Exception as e:              # noqa: BLE001 - the generation is live: a probe cannot undo that
                log.warning("%s probe %s of generation %d failed: %s", phase, t, live.id, e)
                rt.quality.failed(live.id, t, type(e).__name__)
                continue
            self.record_probe(live, m, export=False)
        acc = None
        if (donor is not None and rt.quality.tasks and not rt.on_vllm
                and donor in {d.name for d in rt.donors.list()}):
            d = rt.donors.get(donor)   # (a fleet replica may not have the donor another one used)
            acc = {t: rt.quality.donor_accuracy(donor, t, lambda: rt.donor_model(d)) for t in rt.quality.tasks}
        self.donor_accuracy = acc
        rt.quality.export(live.id, rt.gens.records[live.id].parent, acc)

    def record_probe(self, live, m, export: bool = True) -> None:
        gens = self.rt.gens
        gens.add_quality(live.id, m.to_dict())
        if export and live.id == gens.live.id:
            self.rt.quality.export(live.id, gens.records[live.id].parent, self.donor_accuracy)
