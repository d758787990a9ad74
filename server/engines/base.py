"""The engine seam: the small interface the runtime calls.

An engine takes validated requests (`submit`, bounded: a full queue is QueueFull),
decodes each wholly on one generation (the one it is pinned to, else the live one when
it starts) and finishes every request it accepted: a result, an error or a
cancellation, then `done` is set. `on_finish(request)` and `on_step(rows)` let the
runtime count without the engine knowing of metrics."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from transplant_core.generation import Completion, SamplingParams


class QueueFull(Exception):
    """The bounded request queue is full (RESOURCE_EXHAUSTED, HTTP 429)."""


@dataclass
class Request:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None                   # time.monotonic() value
    alive: Callable[[], bool] = lambda: True
    stream: object | None = None                    # .put(text delta), then .put(None)
    pinned: object | None = None                    # generations.Live to run on; None: the live one
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    generation: int | None = None
    result: Completion | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def cancelled(self) -> bool:
        return not self.alive() or (self.deadline is not None and time.monotonic() > self.deadline)

    def outcome(self) -> Completion:
        """The completion, or the reason there is none (raised): its error, or a timeout
        if it was cancelled during generation."""
        if self.error is not None:
            raise self.error
        if self.result is None or self.result.finish_reason == "cancelled":
            raise TimeoutError("the deadline passed or the call was cancelled during generation")
        return self.result

    def deliver(self, delta: str) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        if self.stream is not None and delta:
            self.stream.put(delta)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.put(None)
        self.done.set()


class Engine(Protocol):
    def start(self) -> None: ...
    def submit(self, req: Request) -> Request: ...
    @property
    def depth(self) -> int: ...
    def idle(self) -> bool: ...
    def stop(self) -> None: ...
    def install(self, parent_model, cand, commit: Callable[[], object]) -> object:
        """Make a prepared generation (`cand`, built on `parent_model`) what the engine
        computes, calling `commit` (the write-ahead journal and live pointer) at the right
        moment; nothing changes if it raises."""


class BoundedQueue:
    """The request queue every engine shares: bounded, never unbounded memory."""

    def __init__(self, max_queue: int):
        self.q: queue.Queue[Request] = queue.Queue(maxsize=max_queue)

    def put(self, req: Request) -> Request:
        try:
            self.q.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.q.maxsize} waiting); retry with backoff") from None
        return req

    def __len__(self) -> int:
        return self.q.qsize()


class InProcess:
    """What the engines that decode on the runtime's own models share: a generation is
    live the moment `commit` swaps the live pointer; requests admitted after it run on
    it, running ones finish on theirs."""

    def install(self, parent_model, cand, commit):
        return commit()
