"""The engine seam: the small interface the runtime calls.

An engine takes validated requests (`submit`, bounded: a full queue is QueueFull;
`submit_many`: the choices of one call, which start together on one generation),
decodes each wholly on one generation (the one it is pinned to, else the live one when
it starts) and finishes every request it accepted: a result, an error or a
cancellation, then `done` is set. `admitted` is set once the request's generation is
known (or it finished). `healthy()` says whether it can still decode (a dead engine
process cannot); `context_limit()` is the most prompt plus reply tokens it takes.
`on_finish(request)` and `on_step(rows)` let the runtime count without the engine
knowing of metrics."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from transplant_core.generation import Completion, SamplingParams


class QueueFull(Exception):
    """The bounded request queue is full (RESOURCE_EXHAUSTED, HTTP 429)."""


class NotReady(Exception):
    """The server is still loading its model, or stopping (UNAVAILABLE, HTTP 503)."""


@dataclass
class Request:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None                   # time.monotonic() value
    alive: Callable[[], bool] = lambda: True
    stream: object | None = None                    # .put(text delta), then .put(None); see deliver
    pinned: object | None = None                    # generations.Live to run on; None: the live one
    group: "Group | None" = None                    # the call's other choices: one generation for all
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    generation: int | None = None
    result: Completion | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    admitted: threading.Event = field(default_factory=threading.Event)
    prompt_logprobs: list | None = None             # known once prefilled, where asked for (echo)
    internal: bool = False                          # the runtime's own (probes, evaluation): not traffic
    _logprobs: list = field(default_factory=list)   # entries not yet streamed (their text was held)

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

    def deliver(self, delta: str, logprobs: list | None = None, prompt_logprobs: list | None = None) -> None:
        """New final text, with the logprob entries of the tokens sampled since the last
        call (and the prompt's, once known). A stream gets each non-empty delta; one that
        says `with_logprobs` gets (delta, entries) instead, the entries of tokens whose
        text was held back included."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs
        if self.stream is None:
            return
        if logprobs:
            self._logprobs.extend(logprobs)
        if delta:
            if getattr(self.stream, "with_logprobs", False):
                entries, self._logprobs = self._logprobs, []
                self.stream.put((delta, entries))
            else:
                self.stream.put(delta)

    def admit(self, generation: int) -> None:
        self.started, self.generation = time.monotonic(), generation
        self.admitted.set()

    def fail(self, error: BaseException) -> None:
        self.error = error if isinstance(error, Exception) else RuntimeError(str(error))

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.put(None)
        self.admitted.set()
        self.done.set()


@dataclass
class Group:
    """The choices of one call: the first to start fixes the generation the others run on."""
    live: object | None = None


class Engine(Protocol):
    def start(self) -> None: ...
    def submit(self, req: Request) -> Request: ...
    def submit_many(self, reqs: list[Request]) -> list[Request]: ...
    def healthy(self) -> bool: ...
    def context_limit(self) -> int | None: ...
    @property
    def depth(self) -> int: ...
    def idle(self) -> bool: ...
    def stop(self) -> None: ...
    def install(self, parent_model, cand, commit: Callable[[], object], record=None) -> object:
        """Make a prepared generation (`cand`, built on `parent_model`) what the engine
        computes, calling `commit` (the write-ahead journal and live pointer) at the right
        moment; nothing changes if it raises. `record`: the generation's staged record
        (its weights by digest: an engine in another process reads them by path)."""


class BoundedQueue:
    """The request queue every engine shares: bounded, never unbounded memory."""

    def __init__(self, max_queue: int):
        self.q: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()

    def put(self, req: Request) -> Request:
        return self.put_many([req])[0]

    def put_many(self, reqs: list[Request]) -> list[Request]:
        """All or none: the choices of one call never half-queued (the consumer only takes)."""
        with self._lock:
            if self.q.maxsize and self.q.qsize() + len(reqs) > self.q.maxsize:
                raise QueueFull(f"the request queue is full ({self.q.maxsize} waiting); retry with backoff")
            for r in reqs:
                self.q.put_nowait(r)
        return reqs

    def drain(self) -> list[Request]:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out

    def __len__(self) -> int:
        return self.q.qsize()


class InProcess:
    """What the engines that decode on the runtime's own models share: a generation is
    live the moment `commit` swaps the live pointer; requests admitted after it run on
    it, running ones finish on theirs. A group's rows may be admitted apart: the first
    fixes the group's generation (a Live holds its model, so it always runs)."""

    def install(self, parent_model, cand, commit, record=None):
        return commit()

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        group = Group()
        for r in reqs:
            r.group = group
        return self._bq.put_many(reqs)

    def _fail_queued(self, error: BaseException) -> None:
        """At stop: what still waits in the queue learns why (nothing waits forever)."""
        for r in self._bq.drain():
            r.fail(error)
            r.finish()

    def target(self, r: Request, live):
        """The generation `r` runs on: its pin, its group's, else the live one."""
        if r.pinned is not None:
            return r.pinned
        if r.group is None:
            return live
        if r.group.live is None:
            r.group.live = live
        return r.group.live

    def context_limit(self) -> int | None:
        cfg = self.gens.live.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
