"""Continuous (iteration-level) batching on the embedded transformers model.

One worker thread runs a loop of decode steps. Between two steps it admits whatever
waits in the queue, up to max_batch_size rows in all: the newcomers are prefilled
together and join their generation's running batch (transplant_core.DecodeBatch), so
a request never waits for another's remaining tokens, and a row that finishes leaves
at once and frees its KV cache.

Generations: a request runs wholly on one generation, the one it is pinned to or else
the live one when it is admitted. Rows of different generations sit in separate
batches, one per generation, stepped in turn (round robin), so each row is computed
with its own generation's weights only. A swap changes which batch the next newcomers
join; rows already running finish on the generation they started on.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from transplant_core.generation import DecodeBatch, Event

from .base import BoundedQueue, InProcess, NotReady, Request

log = logging.getLogger("transplant.engine")


class ContinuousEngine(InProcess):
    def __init__(self, gens, tokenizer, max_batch_size: int, max_queue: int,
                 on_finish: Callable[[Request], None] | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.gens = gens
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._q = self._bq = BoundedQueue(max_queue)
        self._on_finish = on_finish or (lambda r: None)
        self._on_step = on_step or (lambda n: None)
        self._batches: dict[int, DecodeBatch] = {}      # generation id -> its running rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._q)

    @property
    def running(self) -> int:
        return sum(len(b) for b in list(self._batches.values()))

    def submit(self, req: Request) -> Request:
        return self._q.put(req)

    def idle(self) -> bool:
        return not len(self._q) and not self._batches

    def stop(self) -> None:

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if not self._thread.is_alive():            # (else the loop still owns its rows)
            self._fail_held(NotReady("the server is stopping; retry on another replica"))
            self._fail_queued(NotReady("the server is stopping; retry on another replica"))

    def healthy(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._taken: list[Request] = []          # off the queue, not yet in a batch
            try:
                self._admit()
                for gen in list(self._batches):
                    self._step(gen)
            except BaseException as e:   # noqa: BLE001 - never let the loop die: fail what it held, go on
                log.exception("engine step failed")
                self._fail_held(e)

    def _fail_held(self, e: BaseException) -> None:
        """Every request the loop holds (taken off the queue, or in a batch) learns why."""
        held = list(getattr(self, "_taken", [])) + [r for b in self._batches.values() for r in list(b.keys)]
        self._batches.clear()
        for r in held:
            if not r.done.is_set():
                r.fail(e)
                self._done(r)

    def _admit(self) -> None:
        free = self.max_batch_size - self.running
        new = self._taken
        if not self._batches:                 # nothing to decode: wait for work
            try:
                new.append(self._q.q.get(timeout=0.1))
            except queue.Empty:
                return
        while len(new) < free:
            try:
                new.append(self._q.q.get_nowait())
            except queue.Empty:
                break
        groups: dict[int, tuple[object, list[Request]]] = {}
        live = self.gens.live
        for r in new:
            if r.cancelled():
                r.error = TimeoutError("cancelled or deadline exceeded before the request started")
                self._done(r)
                continue
            target = self.target(r, live)
            r.admit(target.id)
            groups.setdefault(target.id, (target, []))[1].append(r)
        for gen, (target, reqs) in groups.items():
            try:
                batch = self._batches.get(gen)
                if batch is None or batch.model is not target.model:
                    batch = self._batches.setdefault(gen, DecodeBatch(target.model, self.tokenizer))
                events = batch.add([(r, r.prompt_ids, r.params) for r in reqs])
            except BaseException as e:
                for r in reqs:
                    r.fail(e)
                    self._done(r)
                continue
            self._deliver(events)
            if not len(batch):
                self._batches.pop(gen, None)
        new.clear()

    def _step(self, gen: int) -> None:
        batch = self._batches[gen]
        try:
            self._deliver(batch.cancel(lambda r: r.cancelled()))
            if len(batch):
                self._on_step(len(batch))
                self._deliver(batch.step())
        except BaseException as e:           # the batch failed: every row in it learns why
            for r in list(batch.keys):
                if not r.done.is_set():
                    r.fail(e)
                    self._done(r)
            self._batches.pop(gen, None)
            return
        if not len(batch):
            self._batches.pop(gen, None)

    def _deliver(self, events: list[Event]) -> None:
        for e in events:
            r: Request = e.key
            if r.done.is_set():
                continue
            try:
                r.deliver(e.delta, e.logprobs, e.prompt_logprobs)
            except Exception as err:          # noqa: BLE001 - a client's stream broke: this row only
                r.fail(err)
                self._done(r)
                continue
            if e.completion is not None:
                r.result = e.completion
                self._done(r)

    def _done(self, r: Request) -> None:
        try:
            self._on_finish(r)
        finally:
            r.finish()
