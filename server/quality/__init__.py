"""The quality room: what the server measures about each generation and what it does
about it.

- monitor.py: probes on every generation (shadow before it goes live, right after,
  periodically), exported per task and generation for Prometheus
- guard.py: the verdict on a candidate (a guarded task's drop beyond its margin)
The alert policy that reverts on a firing Prometheus alert is server/control/alerts.py."""
from .guard import Verdict
from .monitor import Measurement, QualityMonitor

__all__ = ["Measurement", "QualityMonitor", "Verdict"]
