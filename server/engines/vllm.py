"""The vLLM engine: requests decode on vLLM's AsyncLLM (its own engine process, its own
continuous batching and paged KV cache), embedded in our server, so gRPC and the
OpenAI-compatible API stay ours, and so do generations, journal, store, guard, probes
and alerts. vLLM's own HTTP swap routes are never exposed.

A swap (transplant or revert) is installed in place:
  1. close the gate (new requests wait in our queue) and, with `swap_policy: drain`,
     wait until no request runs (up to swap_drain_timeout_s, else the swap is refused
     and nothing changed); with `freeze`, pause vLLM keeping its requests where they are
  2. name every changed tensor with its whole fused group (q/k/v, gate/up, from the
     architecture table: vLLM fuses them and a partial group silently corrupts the
     layer) to our worker extension by path (its object in the tensor store, or the
     checkpoint's file for a value as loaded; only a low-rank weight, stored as factors,
     goes as bytes), which reads and reloads them in place (vllm_swap.py)
  3. commit the generation (journal, write-ahead); if that fails, send the parent's
     values back
  4. label vLLM's weight version with the generation id, reset the prefix cache (a
     reload does not), resume, open the gate
With `drain`, every request runs wholly on one generation, as on the embedded engine.
With `freeze` the swap waits only for running requests pinned to a generation (they
must run wholly on it); the rest are frozen in place, and a reply whose tokens another
generation sampled says which tokens each sampled (vLLM's weight-version spans). A
request that names no generation runs on whatever is live when it starts; one pinned
to a generation that stopped being live while it waited is refused (NOT_FOUND) before
it starts. The choices of one call pass the gate together, so they start on one
generation.

The engine's processes die with the server, even on kill -9 and from the first moment
of start-up: they are forked with a parent-death signal (SIGKILL). `healthy()` is
false once vLLM's engine process is gone; the runtime then reports NOT_SERVING.

Only the live generation is servable (vLLM holds one set of weights), and vLLM holds
the only copy of the model: the runtime's base is the checkpoint's files mapped
(transplant_core.mapped), probes and evaluation are requests to vLLM
(quality/forward.py), and the guard judges a candidate installed while the gate is shut
(Swaps.trial).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Callable

from transplant_core.errors import InvalidArgument, NotFound
from transplant_core.generation import Completion

from .base import NotReady, QueueFull, Request
from .vllm_process import _env
from .vllm_swap import Swaps, complete_groups

log = logging.getLogger("transplant.vllm")

def _logprob(token: int, d: dict, n: int):
    """vLLM's {token id: Logprob(logprob, rank)} for one position as ours: the token's
    logprob and the top n by rank."""
    from transplant_core.generation import TokenLogprob

    top = sorted(((t, v) for t, v in d.items() if v.rank is not None and v.rank <= n), key=lambda x: x[1].rank)
    return TokenLogprob(token, float(d[token].logprob), tuple((t, float(v.logprob)) for t, v in top[:n]))


def _finish_reason(o) -> str:
    if o.finish_reason == "length":
        return "length"
    if o.finish_reason == "stop":
        return "eos" if o.stop_reason is None else "stop"
    return "cancelled"


class VllmEngine(Swaps):
    def __init__(self, gens, table, model_path, cfg, on_finish: Callable[[Request], None] | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.gens, self.table, self.cfg, self.spec = gens, table, cfg, cfg.vllm
        self.model_path = str(model_path)
        self.max_batch_size, self.max_queue = cfg.max_batch_size, cfg.max_queue
        self._on_finish = on_finish or (lambda r: None)
        self._on_step = on_step or (lambda n: None)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._waiting = 0                 # accepted, not yet running
        self._running = 0
        self._pinned = 0                  # running and pinned: a freeze waits for them
        self._count = threading.Lock()
        self.current = gens.live.id       # the generation vLLM's weights are
        self._checkpoint = None           # the checkpoint's tensors, to say where each lies (sources)
        self.last_load: dict = {}         # the last load sent to the worker: {"paths", "bytes"}
        self.engine = None
        self._stopping = False
        self._held: dict[int, Request] = {}   # accepted and not finished: a stop finishes them
        self.broken = ""                      # why the workers' weights are unknown (a failed undo: Swaps._undo)
        self.last_trial_s = 0.0               # how long the last guard trial kept the gate shut
        self.last_pause_s = 0.0               # the last swap's pause, after the drain (Swaps.install)
        self._trial_deadline: float | None = None   # while a guard trial runs: when its probes must end
        shutil.rmtree(gens.dir / "trial", ignore_errors=True)   # a trial's scratch file left by a crash

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        import multiprocessing

        if self._stopping:
            raise NotReady("the server is stopping")
        self._others = {p.pid for p in multiprocessing.active_children()}   # not ours to kill on stop
        self._thread.start()
        self._call(self._start())
        self._repatch()
        log.info("vLLM engine on %s, generation %d, policy %s", self.model_path, self.current, self.spec.swap_policy)

    def _repatch(self) -> None:
        """A restart on a live generation other than 0: vLLM loaded the checkpoint, so send
        it the live generation's changed tensors (with their fused groups)."""
        overrides = sorted({m.ref for m in self.table.modules.values()
                            if any(k in self.gens.overrides for k in m.keys)})
        if overrides:
            keys = [k for r in complete_groups(self.table, overrides) for k in self.table[r].keys]
            live = self.gens.live
            self._call(self._load(*self.sources(self.gens.records[live.id].state, keys, live.model)))
        self._call(self._label(self.current))

    async def _start(self) -> None:
        _env(self.spec)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.model_path, dtype=self.spec.dtype, max_model_len=self.spec.max_model_len,
                               enforce_eager=self.spec.enforce_eager, gpu_memory_utilization=self.spec.memory_fraction,
                               max_num_seqs=self.max_batch_size, disable_log_stats=True, seed=0,
                               worker_extension_cls="server.engines.vllm_worker.TransplantWorker")
        self._events()
        engine = AsyncLLM.from_engine_args(args)
        if self._stopping:                   # stop() came during start-up: nothing may outlive it
            engine.shutdown()
            raise NotReady("the server is stopping")
        self.engine = engine
        await self._label(self.current)

    def _events(self) -> None:
        """The gate (open: requests may start), idle (no request runs) and pinned-idle
        (no pinned request runs), on the engine's loop."""
        self._gate, self._idle, self._pinned_idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        for e in (self._gate, self._idle, self._pinned_idle):
            e.set()

    def _call(self, coro, timeout: float | None = None):
        """Run `coro` on the engine's loop and wait for it; never forever on a loop that
        stopped (a stop during start-up or during a swap)."""
        import concurrent.futures

        if not self._alive():
            coro.close()
            raise NotReady("the vLLM engine is stopped")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return fut.result(0.5)
            except concurrent.futures.TimeoutError:
                if not self._alive():
                    fut.cancel()
                    raise NotReady("the vLLM engine stopped") from None
                if deadline is not None and time.monotonic() > deadline:
                    fut.cancel()
                    raise TimeoutError("the vLLM engine did not answer in time") from None

    def _alive(self) -> bool:
        """The event loop the engine's calls run on is still running."""
        return self._thread.is_alive()

    def healthy(self) -> bool:
        """False once vLLM's engine process is gone (killed, out of memory, crashed)."""
        return (self.engine is not None and not getattr(self.engine, "errored", False) and self._alive()
                and not self.broken)

    def context_limit(self) -> int | None:
        engine = self.engine
        return engine.model_config.max_model_len if engine is not None else self.spec.max_model_len

    def stop(self) -> None:
        self._stopping = True
        if self.engine is None:
            self._kill_children()                 # a start-up in progress: end what it started
        if self.engine is not None:
            try:
                self.engine.shutdown()            # its engine process must not outlive us
            except Exception:                      # noqa: BLE001 - shutting down anyway
                log.exception("vLLM shutdown")
            self.engine = None
        if self._thread.is_alive():
            try:
                self._call(self._cancel_tasks(), timeout=10)
            except Exception:                      # noqa: BLE001
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        for r in list(self._held.values()):        # nothing accepted is left waiting forever
            self._end(r, NotReady("the server is stopping; retry on another replica"))

    def _kill_children(self) -> None:
        """The processes this engine's vLLM started so far (its engine core, mid start-up):
        from_engine_args cannot be interrupted, but it fails at once when they are gone."""
        import multiprocessing

        for child in multiprocessing.active_children():
            if child.pid in getattr(self, "_others", ()):
                continue
            try:
                os.kill(child.pid, signal.SIGKILL)
            except OSError:                # already gone: nothing to free
                pass

    @staticmethod
    async def _cancel_tasks() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def depth(self) -> int:
        return self._waiting

    def idle(self) -> bool:
        return self._waiting == 0 and self._running == 0

    # ---- requests -------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        return self.submit_many([req])[0]

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        """Queue requests that start together, on one generation (the choices of one call)."""
        if not self.healthy():
            raise NotReady("the vLLM engine process has died; the server is restarting (see its log)")
        with self._count:
            if self._waiting + self._running + len(reqs) > self.max_batch_size + self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry with backoff")
            self._waiting += len(reqs)
        asyncio.run_coroutine_threadsafe(self._serve(reqs), self._loop)
        return reqs

    async def _serve(self, reqs: list[Request]) -> None:
        self._held.update((id(r), r) for r in reqs)
        try:
            while not self._gate.is_set():                     # a swap is being installed
                try:
                    await asyncio.wait_for(self._gate.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                if all(r.cancelled() for r in reqs) or not self.healthy():
                    break
        except BaseException as e:                   # noqa: BLE001 - stopped while waiting: they learn why
            with self._count:
                self._waiting -= len(reqs)
            for r in reqs:
                self._end(r, self._why(e))
            raise
        # from here to each row's first await nothing else runs on this loop: a swap's _hold
        # sees these rows counted as running (drain, or a pinned row a freeze must wait for)
        with self._count:
            self._waiting -= len(reqs)
            self._running += len(reqs)
        self._idle.clear()
        pinned = [r for r in reqs if r.pinned is not None]
        if pinned:
            self._pinned += len(pinned)
            self._pinned_idle.clear()
        await asyncio.gather(*(self._serve_one(r, r.pinned is not None) for r in reqs))

    async def _serve_one(self, req: Request, pinned: bool) -> None:
        try:
            if req.cancelled():
                raise TimeoutError("cancelled or deadline exceeded before the request started")
            if not self.healthy():
                raise NotReady("the vLLM engine process has died; the server is restarting (see its log)")
            if pinned and req.pinned.id != self.current:
                raise NotFound(f"generation {req.pinned.id} stopped being live while the request waited "
                               f"(live: {self.current}); the vLLM engine serves the live generation only",
                               field="model")
            req.admit(self.current)
            self._on_step(self._running)
            await self._generate(req, uuid.uuid4().hex)
        except BaseException as e:       # noqa: BLE001 - the request learns why
            req.fail(self._why(e))
        finally:
            with self._count:
                self._running -= 1
                if self._running == 0:
                    self._idle.set()
                if pinned:
                    self._pinned -= 1
                    if self._pinned == 0:
                        self._pinned_idle.set()
            self._end(req)

    def _end(self, req: Request, error: BaseException | None = None) -> None:
        """Finish `req` once (a stop may race the request's own end)."""
        if req.done.is_set():
            return
        self._held.pop(id(req), None)
        if error is not None:
            req.fail(error)
        try:
            self._on_finish(req)
        finally:
            req.finish()

    def _why(self, e: BaseException) -> BaseException:
        """What a request that failed with `e` is told: a dead or stopping engine is UNAVAILABLE
        (retry elsewhere), not an internal error."""
        if isinstance(e, (NotReady, InvalidArgument, NotFound, TimeoutError)):
            return e
        if (isinstance(e, asyncio.CancelledError) or type(e).__name__ in ("EngineDeadError", "EngineGenerateError")
                or self._stopping or not self.healthy()):
            return NotReady("the vLLM engine stopped or died while the request ran; retry (see the server log)")
        return e

    async def _generate(self, req: Request, rid: str) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = req.params
        echo_only = p.max_new_tokens == 0            # the prompt's logprobs only: vLLM decodes one token, unused
        sp = SamplingParams(max_tokens=max(1, p.max_new_tokens), temperature=p.temperature, top_p=p.top_p,
                            seed=p.seed, stop=list(p.stop) or None, skip_special_tokens=True,
                            output_kind=RequestOutputKind.DELTA, top_k=p.top_k or 0, min_p=p.min_p,
                            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                            repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens,
                            ignore_eos=p.ignore_eos, stop_token_ids=list(p.stop_token_ids) or None,
                            logit_bias=dict(p.logit_bias) or None, logprobs=p.logprobs,
                            prompt_logprobs=p.prompt_logprobs)
        text, ids, last, lps, plps = [], [], None, [], None
        try:
            async for out in self.engine.generate({"prompt_token_ids": req.prompt_ids}, sp, request_id=rid):
                o = out.outputs[0]
                if plps is None and out.prompt_logprobs is not None:
                    plps = [None] + [_logprob(t, d, p.prompt_logprobs)
                                     for t, d in zip(req.prompt_ids[1:], out.prompt_logprobs[1:])]
                if echo_only:
                    last = o
                    break
                text.append(o.text)
                ids.extend(o.token_ids)
                new = [_logprob(t, d, p.logprobs) for t, d in zip(o.token_ids, o.logprobs or [])] \
                    if p.logprobs is not None else []
                lps += new
                req.deliver(o.text, new, plps)
                last = o
                if req.cancelled():
                    await self.engine.abort(rid)
                    req.result = Completion("".join(text), ids, len(req.prompt_ids), "cancelled")
                    return
        except ValueError as e:                 # vLLM's own input checks
            raise InvalidArgument(str(e).splitlines()[0]) from None
        except Exception as e:                  # noqa: BLE001 - VLLMValidationError is not a ValueError
            if type(e).__name__ == "VLLMValidationError":
                raise InvalidArgument(str(e).splitlines()[0]) from None
            raise
        if echo_only:
            await self.engine.abort(rid)
            req.result = Completion("", [], len(req.prompt_ids), "length", prompt_logprobs=plps)
            return
        reason, stop_token = _finish_reason(last), None
        if ids and (reason == "eos" or isinstance(last.stop_reason, int)):
            # as on the embedded engine: the EOS or stop token is not an output token (its logprob stays)
            ids, stop_token = ids[:-1], ids[-1]
        spans = self._spans(last, len(ids), req.generation)
        if spans and len({g for g, _, _ in spans}) == 1:     # frozen before its first token: wholly the next one's
            req.generation, spans = spans[0][0], None
        req.result = Completion("".join(text), ids, len(req.prompt_ids), reason, spans=spans,
                                logprobs=lps if p.logprobs is not None else None, prompt_logprobs=plps,
                                stop_token=stop_token)

    @staticmethod
    def _spans(o, n: int, generation: int) -> list[tuple[int, int, int]] | None:
        """Which generation sampled which tokens, where any but `generation` (the one the
        request started on, which the reply names) sampled some (a freeze)."""
        spans = [(int(s.version), s.start, min(s.end, n)) for s in (o.weight_versions or [])
                 if str(s.version).isdigit() and s.start < n]
        return spans if any(g != generation for g, _, _ in spans) else None
