"""Drift on traffic-like prompts (opt-in, `drift: {enabled: true}`; off by default).

The server keeps the token ids of the last `sample` prompts it served, in memory only:
never written to disk, never exported, never logged (only their count is a metric).
After each swap it measures, on a thread of its own, the KL from the parent's
next-token distributions to the new generation's over those prompts
(transplant_core.likelihood.prompt_kl) and exports the mean as
`transplant_drift_kl{generation}`: how far a change moved the model on what it is
actually asked, including traffic its probes do not cover. deploy/prometheus/
drift-alerts.yml has an example alert on it."""
from __future__ import annotations

import collections
import logging
import threading
from statistics import fmean

from transplant_core.likelihood import prompt_kl

log = logging.getLogger("transplant.quality")


class Drift:
    def __init__(self, spec, metrics, pad: int = 0):
        self.spec = spec
        self.metrics = metrics
        self.pad = pad
        self._prompts: collections.deque[list[int]] = collections.deque(maxlen=spec.sample)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def keep(self, ids: list[int]) -> None:
        """A served prompt's token ids (the oldest drop out past `sample`)."""
        if not self.spec.enabled:
            return
        with self._lock:
            self._prompts.append(list(ids[-self.spec.max_tokens:]))
            self.metrics.drift_prompts.set(len(self._prompts))

    def after_swap(self, gen: int, model, parent) -> threading.Thread | None:
        """Measure generation `gen` (its model) against its parent's on the sample, off the
        swap's path. Returns the thread (tests join it)."""
        if not self.spec.enabled:
            return None
        with self._lock:
            prompts = list(self._prompts)
        if not prompts:
            return None

        def run():
            try:
                kl = fmean(prompt_kl(model, parent, prompts, self.pad))
            except Exception:                  # noqa: BLE001 - a monitor must not take the server down
                log.exception("drift of generation %d could not be measured", gen)
                return
            for labels in list(self.metrics.drift_kl._metrics):
                if labels[0] != str(gen):
                    self.metrics.drift_kl.remove(*labels)
            self.metrics.drift_kl.labels(str(gen)).set(kl)
            log.info("drift of generation %d on %d recent prompts: KL %.4f nats per position", gen, len(prompts), kl)

        t = threading.Thread(target=run, name="drift", daemon=True)
        t.start()
        return t
