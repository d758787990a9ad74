"""Static (request-level) batching, the engine before continuous batching: kept as
`batching: static` for comparison (bench/continuous) and for models whose KV cache
cannot be spliced. Concurrent requests share forward passes.

Requests wait in a bounded queue (full: RESOURCE_EXHAUSTED, never unbounded memory).
One worker thread takes up to `max_batch_size` of them, pins the live generation,
and decodes them together with per-request sampling; requests that arrive while a
batch runs join the next one. A swap only changes which generation the NEXT batch
pins, so it never waits for a running batch and a batch never mixes generations.
Rows whose client went away or whose deadline passed are dropped from the batch.

Regrouping: the clients of a batch all get their answers at the same moment and most
come straight back, a few milliseconds apart (a burst of 16 arrives over 15-20 ms on a
busy 2-core machine, far longer than batch_wait_ms). Taking the next batch the instant
the first of them returns splits them into two half batches that then alternate for
good (measured: mean batch 8 with 16 closed-loop clients, 2.4 with 4). So the next
batch waits a little longer while it is smaller than the demand just seen, the last
batch plus what queued up while it ran: at most REGROUP_FRACTION of the last batch's
decode time, never over REGROUP_MAX_S (batch_wait_ms = 0 turns waiting off).

Batch wait: a new batch waits up to batch_wait_ms (default 10) for more requests, but
never more than REGROUP_FRACTION of the last batch's decode time, so a lone client of
a small, fast model is not slowed down by the wait a large model's batches profit
from (measured on a 308M model, 16 closed-loop clients: 3.85x serial throughput at a
2 ms wait, 4.81x at 10 ms; one client unchanged).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from transplant_core.generation import generate

from ..generations import Generations
from .base import BoundedQueue, InProcess, NotReady, QueueFull, Request  # noqa: F401  (QueueFull: re-exported)


REGROUP_FRACTION = 0.05      # of the last batch's decode time
REGROUP_MAX_S = 0.1


class Scheduler(InProcess):
    def __init__(self, gens: Generations, tokenizer, max_batch_size: int, max_queue: int, batch_wait_ms: float,
                 on_finish: Callable[[Request], None] | None = None, on_step: Callable[[int], None] | None = None):
        self.gens = gens
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self._bq = BoundedQueue(max_queue)
        self._q = self._bq.q
        self._on_finish = on_finish or (lambda r: None)
        self._on_step = on_step or (lambda n: None)
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._demand, self._last_seconds = 0, 0.0       # the previous batch + its backlog, for regrouping
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._q.qsize()

    def submit(self, req: Request) -> Request:
        return self._bq.put(req)

    def idle(self) -> bool:
        return self._q.empty() and not self._busy.is_set()

    def stop(self) -> None:

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._fail_queued(NotReady("the server is stopping; retry on another replica"))

    def _take(self) -> list[Request]:
        try:
            first = self._q.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        now = time.monotonic()
        wait = self.batch_wait
        if self._last_seconds:                          # at most a small share of a batch's decode time
            wait = min(wait, REGROUP_FRACTION * self._last_seconds)
        until = now + wait
        regroup = now + min(REGROUP_MAX_S, REGROUP_FRACTION * self._last_seconds)
        want = min(self._demand, self.max_batch_size) if self.batch_wait else 0   # 0 ms: never wait
        while len(batch) < self.max_batch_size:
            left = (until if len(batch) >= want else max(until, regroup)) - time.monotonic()
            try:
                batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            self._busy.set()
            t0 = time.monotonic()
            try:
                self._decode(batch)
            except BaseException as e:          # noqa: BLE001 - never leave a request unfinished
                for r in batch:
                    if not r.done.is_set():
                        r.fail(e)
                        self._finish(r)
            finally:
                self._busy.clear()
                self._demand, self._last_seconds = len(batch) + self._q.qsize(), time.monotonic() - t0

    def _decode(self, batch: list[Request]) -> None:
        live = [r for r in batch if not r.cancelled()]
        for r in batch:
            if r.cancelled():
                r.error = TimeoutError("cancelled or deadline exceeded before the request started")
                self._finish(r)
        pinned = self.gens.live                       # one generation per sub-batch: the live one
        groups: dict[int, tuple[object, list[Request]]] = {}
        for r in live:                                # unless a request is pinned to another
            target = self.target(r, pinned)
            groups.setdefault(target.id, (target, []))[1].append(r)
        for target, rows in groups.values():
            self._decode_on(target, rows)

    def _decode_on(self, target, live: list[Request]) -> None:
        for r in live:
            r.admit(target.id)

        def on_text(i: int, delta: str, logprobs: list, prompt_logprobs) -> None:
            live[i].deliver(delta, logprobs, prompt_logprobs)

        self._on_step(len(live))
        try:
            outs = generate(target.model, self.tokenizer, [r.prompt for r in live], [r.params for r in live],
                            on_text=on_text, cancelled=lambda i: live[i].cancelled(),
                            prompt_ids=[r.prompt_ids for r in live])
            for r, c in zip(live, outs):
                r.result = c
        except BaseException as e:           # the batch failed: every request in it learns why
            for r in live:
                r.error = e
        for r in live:
            self._finish(r)

    def _finish(self, r: Request) -> None:
        try:
            self._on_finish(r)
        finally:
            r.finish()
