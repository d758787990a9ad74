"""Every metric the server exports, declared in one place, on a registry of its own
(so several servers can live in one process, as in the tests). Labels stay
low-cardinality: RPC names, status codes, results and reasons; never module names,
prompts or donors' paths."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


FLEET_GAUGES = {
    "transplant_fleet_etcd_reachable": "1 while this replica reaches etcd",
    "transplant_fleet_etcd_silence_seconds": "Seconds since etcd last answered this replica",
    "transplant_fleet_head_lag": "Generations between the fleet's head (as last read) and the one live here",
    "transplant_fleet_fenced": "1 while this replica does not serve: cut off from etcd, and a peer says its "
                               "generation was reverted",
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("transplant_requests_total", "RPCs handled, by method and status code",
                                ["rpc", "code"], registry=r)
        self.queue_seconds = Histogram("transplant_queue_seconds", "Time a generate request waited for a batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("transplant_time_to_first_token_seconds", "Time from arrival to first token",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("transplant_request_seconds", "Total time of a generate request",
                                         ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("transplant_generated_tokens_total", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("transplant_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.http_requests = Counter("transplant_http_requests_total", "OpenAI-compatible API calls, by route and "
                                     "HTTP status", ["route", "status"], registry=r)
        self.http_seconds = Histogram("transplant_http_request_seconds", "Time of an API call (a stream: until its "
                                      "last event)", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("transplant_batch_size", "Rows per decode step (static batching: per batch)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("transplant_queue_depth", "Requests waiting for a batch", registry=r)
        self.live_generation = Gauge("transplant_live_generation", "Id of the live generation", registry=r)
        self.swaps = Counter("transplant_swaps_total", "Transplants and reverts, by kind, result and reason",
                             ["kind", "result", "reason"], registry=r)
        self.swap_seconds = Histogram("transplant_swap_seconds", "Time to commit a new generation (validate, "
                                      "snapshot, write-ahead, swap), by kind", ["kind"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.swap_pause_seconds = Histogram(
            "transplant_swap_pause_seconds", "vLLM: how long a swap held requests once none was running (load in "
            "every worker, commit, label, resume), by kind", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.guard_trial_seconds = Histogram(
            "transplant_guard_trial_seconds", "vLLM: how long the guard's trial of a candidate kept requests waiting "
            "(install with the gate shut, the guarded probes through vLLM, the parent back)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.modules_swapped = Counter("transplant_modules_swapped_total", "Modules installed by swaps", registry=r)
        self.bytes_swapped = Counter("transplant_bytes_swapped_total", "Bytes installed by swaps", registry=r)
        self.donors = Gauge("transplant_donors_registered", "Donor checkpoints registered", registry=r)
        self.healthy = Gauge("transplant_serving", "1 when the server is SERVING", registry=r)
        self.engine_up = Gauge("transplant_engine_up", "1 while the engine can decode (0: its process died; "
                               "the server reports NOT_SERVING and exits)", registry=r)

    def watch_fleet(self, agent) -> None:
        """A fleet replica's view of etcd (FLEET_GAUGES), read at each scrape; only a fleet
        replica exports them."""
        values = {
            "transplant_fleet_etcd_reachable": lambda: float(agent.reachable),
            "transplant_fleet_etcd_silence_seconds": lambda: time.monotonic() - agent.contact,
            "transplant_fleet_head_lag": lambda: max(0, (max(agent.records) if agent.records else 0)
                                                     - agent.rt.gens.live.id),
            "transplant_fleet_fenced": lambda: float(bool(agent.fenced)),
        }
        for name, help_ in FLEET_GAUGES.items():
            Gauge(name, help_, registry=self.registry).set_function(values[name])

    def count_http(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ("/v1/completions", "/v1/chat/completions") else "/v1/models"
        self.http_requests.labels(route, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)


class QualityMetrics:
    """Task quality per generation. Only the live generation's series exist (older ones
    are removed on every swap), so the generation label stays bounded while alerts can
    still name the generation they are about."""

    def __init__(self, registry) -> None:
        labels = ["task", "generation"]
        self.accuracy = Gauge("transplant_quality_accuracy", "Accuracy of the live generation on a probe task",
                              labels, registry=registry)
        self.baseline = Gauge("transplant_quality_baseline_accuracy",
                              "Accuracy of the live generation's parent on the same examples", labels, registry=registry)
        self.samples = Gauge("transplant_quality_samples", "Examples behind the accuracy", labels, registry=registry)
        self.answer_nll = Gauge("transplant_quality_answer_nll",
                                "Mean negative log-likelihood per reference-answer token (nats; teacher-forced) of "
                                "the live generation on a probe task", labels, registry=registry)
        self.kl = Gauge("transplant_quality_kl",
                        "Mean KL divergence from the parent's next-token distribution to the live generation's, "
                        "per answer position of a probe task (nats)", labels, registry=registry)
        self.tir = Gauge("transplant_quality_tir", "TIR of the last transplant (after / parent); absent when undefined",
                         labels, registry=registry)
        self.recovery = Gauge("transplant_quality_recovery_percent",
                              "Recovery of the last transplant against parent and donor; absent when undefined",
                              labels, registry=registry)
        self.measured = Gauge("transplant_quality_measured_timestamp_seconds", "When the accuracy was measured",
                              labels, registry=registry)
        # per task, surviving failed probes and swaps: what staleness alerts compare with time()
        self.last_success = Gauge("transplant_quality_last_success_timestamp_seconds",
                                  "When the exported quality of the live generation on a probe task was measured",
                                  ["task"], registry=registry)
        self.interval = Gauge("transplant_quality_probe_interval_seconds", "Configured interval of a probe task",
                              ["task"], registry=registry)
        self.probe_failures = Counter("transplant_quality_probe_failures_total",
                                      "Periodic probes that could not run, by task and reason (exception class)",
                                      ["task", "reason"], registry=registry)
        self.guard = Counter("transplant_guard_decisions_total", "Guard decisions on transplants", ["decision"],
                             registry=registry)
        self.alerts = Counter("transplant_alerts_received_total", "Alert webhook notifications, by outcome",
                              ["outcome"], registry=registry)
        self.drift_kl = Gauge("transplant_drift_kl", "Mean KL from the parent's next-token distributions to the live "
                              "generation's over recent served prompts (opt-in: drift.enabled)", ["generation"],
                              registry=registry)
        self.drift_prompts = Gauge("transplant_drift_sample_prompts", "Recent prompts kept in memory for drift",
                                   registry=registry)
        self._gauges = (self.accuracy, self.baseline, self.samples, self.tir, self.recovery, self.measured,
                        self.answer_nll, self.kl)

    def forget_except(self, generation: int) -> None:
        keep = str(generation)
        for g in self._gauges:
            for labels in list(g._metrics):      # prometheus_client keeps label tuples here
                if labels[1] != keep:
                    g.remove(*labels)

    def forget(self, task: str, generation: int) -> None:
        for g in self._gauges:
            g.remove(task, str(generation))
