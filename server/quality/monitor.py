"""Task quality: probes measured on every generation (shadow before it goes live, right
after, and periodically) and exported per task and generation; the guard (guard.py)
judges a candidate on them."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from statistics import fmean

from transplant_core.errors import PreconditionFailed
from transplant_core.evaluate import evaluate
from transplant_core.metrics import bootstrap_ci, recovery, tir
from transplant_core.tasks import Task

from ..config import ProbeSpec, ServeConfig
from ..metrics import QualityMetrics
from . import guard
from .forward import EngineForward, ModelForward
from .guard import Verdict

log = logging.getLogger("transplant.quality")


@dataclass
class Measurement:
    task: str
    generation: int
    phase: str                   # baseline, shadow, post_swap, periodic, request
    correct: list[bool]
    at: float = field(default_factory=time.time)   # when it was measured (not when exported)
    nll: list[float] | None = None     # per example: nats per reference-answer token (transplant_core.likelihood)
    kl: list[float] | None = None      # per example: KL(parent || this model) per answer position
    top: list | None = field(default=None, repr=False)   # an engine's top-N per answer position (memory only)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def to_dict(self) -> dict:
        lo, hi = bootstrap_ci(self.correct)
        out = {"task": self.task, "accuracy": self.accuracy, "n": len(self.correct), "correct": sum(self.correct),
               "generation": self.generation, "ci_low": lo, "ci_high": hi, "phase": self.phase}
        if self.nll:
            out["answer_nll"] = fmean(self.nll)
        if self.kl:
            out["kl"] = fmean(self.kl)
        return out


class QualityMonitor:
    def __init__(self, cfg: ServeConfig, tokenizer, load_task, metrics: QualityMetrics):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.probes: list[ProbeSpec] = list(cfg.probes)
        self.tasks: dict[str, Task] = {p.task: load_task(p.task, p.examples) for p in self.probes}
        self._cache: dict[tuple[int, str], Measurement] = {}
        self._top_gen: dict[str, int] = {}               # task -> the generation whose top-N were kept last
        self._donor_acc: dict[tuple[str, str], float] = {}
        self._failing: set[tuple[int, str]] = set()   # (generation, task) whose last probe failed
        self._kl: dict[tuple[int, str], float] = {}     # (generation, task): its last KL from its parent
        for p in self.probes:
            metrics.interval.labels(p.task).set(p.interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def measure(self, fwd, gen: int | None, task: str, phase: str, parent=None, accuracy: bool = True) -> Measurement:
        """Evaluate on `fwd` (quality.forward: the model object, or the engine serving the
        generation; a bare model is taken as its ModelForward): accuracy, and each reference
        answer's likelihood; with the `parent` (a forward of the same kind), the KL from its
        distributions. Cached as generation `gen`'s latest unless gen is None (a shadow
        candidate has no id until it commits: `adopt` files it then). Without `accuracy`
        (a guard that reads likelihoods only) no reply is decoded: `correct` is empty, and
        such a measurement is never cached or exported."""
        fwd, parent = as_forward(fwd), as_forward(parent)
        t = self.tasks[task]
        correct = fwd.accuracy(self.tokenizer, t, self.cfg.eval_max_new_tokens).correct if accuracy else []
        top = None
        if parent is not None and parent.gen is not None and (pm := self.latest(parent.gen, task)) is not None:
            top = pm.top
        s = fwd.scores(self.tokenizer, t, parent, top)
        m = Measurement(task, gen if gen is not None else -1, phase, correct, nll=s.nll, kl=s.kl, top=s.top)
        if gen is not None and accuracy:
            self.adopt(gen, m)
        return m

    def adopt(self, gen: int, m: Measurement) -> Measurement:
        m.generation = gen
        with self._lock:
            if m.top is not None:
                # an engine's top-N are what the next generation's KL needs from its parent: kept for
                # the two generations measured last per task (a baseline measures again if need be)
                for (g, t), old in self._cache.items():
                    if t == m.task and g not in (gen, self._top_gen.get(t)):
                        old.top = None
                self._top_gen[m.task] = gen
            self._cache[(gen, m.task)] = m
            if m.kl:                                   # measured against the parent: kept until another is
                self._kl[(gen, m.task)] = fmean(m.kl)
            self._failing.discard((gen, m.task))
        return m

    def latest(self, gen: int, task: str) -> Measurement | None:
        with self._lock:
            return self._cache.get((gen, task))

    def baseline(self, fwd, gen: int, task: str) -> Measurement:
        m = self.latest(gen, task)
        if m is None or (m.top is None and isinstance(fwd, EngineForward)):   # the KL needs the parent's top-N
            m = self.measure(fwd, gen, task, "baseline")
        return m

    def donor_accuracy(self, donor_name: str, task: str, load_model) -> float:
        key = (donor_name, task)
        if key not in self._donor_acc:
            self._donor_acc[key] = evaluate(load_model(), self.tokenizer, self.tasks[task],
                                            self.cfg.eval_max_new_tokens).accuracy
        return self._donor_acc[key]

    # ---- the guard -------------------------------------------------------------------

    def judge(self, before: dict[str, Measurement], after: dict[str, Measurement]) -> Verdict:
        v = guard.judge(self.probes, self.cfg.guard, before, after)
        self.metrics.guard.labels("allow" if v.ok else "refuse").inc()
        return v

    # ---- export ----------------------------------------------------------------------

    def export(self, gen: int, parent: int | None, donor_acc: dict[str, float] | None = None) -> None:
        """Publish the live generation's latest measurements (and drop older series)."""
        self.metrics.forget_except(gen)
        for task in self.tasks:
            m = self.latest(gen, task)
            with self._lock:
                failing = (gen, task) in self._failing
            if m is None or failing:     # a failed probe's task stays withdrawn until one succeeds
                continue
            lab = (task, str(gen))
            self.metrics.accuracy.labels(*lab).set(m.accuracy)
            if m.nll:
                self.metrics.answer_nll.labels(*lab).set(fmean(m.nll))
            with self._lock:
                kl = self._kl.get((gen, task))
            if kl is not None:
                self.metrics.kl.labels(*lab).set(kl)
            self.metrics.samples.labels(*lab).set(len(m.correct))
            self.metrics.measured.labels(*lab).set(m.at)
            self.metrics.last_success.labels(task).set(m.at)
            base = self.latest(parent, task) if parent is not None else None
            if base is None:
                continue
            self.metrics.baseline.labels(*lab).set(base.accuracy)
            t = tir(m.accuracy, base.accuracy)
            if t is not None:
                self.metrics.tir.labels(*lab).set(t)
            if donor_acc and task in donor_acc:
                rec = recovery(m.accuracy, base.accuracy, donor_acc[task])
                if rec is not None:
                    self.metrics.recovery.labels(*lab).set(rec)

    # ---- periodic probes ---------------------------------------------------------------

    def start(self, live, on_measure, forward=lambda live: live.model) -> None:
        """Every probe's interval: measure the live generation; `live()` returns the pinned
        Live, `forward(live)` what serves it, `on_measure(live, measurement)` records it."""
        if not self.probes:
            return

        def loop():
            due = {p.task: time.monotonic() + p.interval_s for p in self.probes}
            while not self._stop.wait(0.5):
                for p in self.probes:
                    if self._stop.is_set():
                        break
                    if time.monotonic() >= due[p.task]:
                        due[p.task] = time.monotonic() + p.interval_s
                        pinned = live()
                        try:
                            on_measure(pinned, self.measure(forward(pinned), pinned.id, p.task, "periodic"))
                        except PreconditionFailed as e:   # a swap landed meanwhile: the next probe measures
                            log.info("periodic probe %s of generation %d skipped: %s", p.task, pinned.id, e)
                        except Exception as e:
                            log.exception("periodic probe %s failed on generation %d", p.task, pinned.id)
                            self.failed(pinned.id, p.task, type(e).__name__)

        self._thread = threading.Thread(target=loop, name="quality-probes", daemon=True)
        self._thread.start()

    def failed(self, gen: int, task: str, reason: str) -> None:
        """A probe of generation `gen` could not run: count it and withdraw the task's
        quality series, so they go stale instead of showing the last good value (on which
        TransplantQualityRegression could never fire for this generation). `reason` is an
        exception class name: bounded by the code, never a message."""
        with self._lock:
            self._failing.add((gen, task))
        self.metrics.forget(task, gen)          # first: a scrape that sees the count sees it withdrawn
        self.metrics.probe_failures.labels(task, reason).inc()

    def stop(self) -> None:
        """Wait for a probe in progress: one still decoding when the journal closes, or the
        interpreter exits, fails (or aborts the process from torch's threads)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def as_forward(x):
    """A probe's forward path: a ModelForward or an EngineForward as given, a bare model
    object as its ModelForward (None stays None)."""
    if x is None or isinstance(x, (ModelForward, EngineForward)):
        return x
    return ModelForward(x)
