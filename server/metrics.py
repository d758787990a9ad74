"""Every metric the server exports, declared in one place, on a registry of its own
(so several servers can live in one process, as in the tests). Labels stay
low-cardinality: RPC names, status codes, results and reasons; never module names,
prompts or donors' paths."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
        self.batch_size = Histogram("transplant_batch_size", "Requests per decoding batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("transplant_queue_depth", "Requests waiting for a batch", registry=r)
        self.live_generation = Gauge("transplant_live_generation", "Id of the live generation", registry=r)
        self.swaps = Counter("transplant_swaps_total", "Transplants and reverts, by kind, result and reason",
                             ["kind", "result", "reason"], registry=r)
        self.swap_seconds = Histogram("transplant_swap_seconds", "Time to commit a new generation (validate, "
                                      "snapshot, write-ahead, swap), by kind", ["kind"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.modules_swapped = Counter("transplant_modules_swapped_total", "Modules installed by swaps", registry=r)
        self.bytes_swapped = Counter("transplant_bytes_swapped_total", "Bytes installed by swaps", registry=r)
        self.donors = Gauge("transplant_donors_registered", "Donor checkpoints registered", registry=r)
        self.healthy = Gauge("transplant_serving", "1 when the server is SERVING", registry=r)
