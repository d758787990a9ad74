"""Swaps on the vLLM engine (the steps in vllm.py's docstring): the gate, vLLM's pause
(drain or freeze), the changed tensors with their whole fused groups to our worker
extension, the commit, the weight-version label, resume; and the guard's trial of a
candidate (installed with the gate shut, probed by requests that pass it, taken out).
A mixin of VllmEngine."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

from transplant_core.errors import InvalidArgument, PreconditionFailed
from transplant_core.generation import Completion

from .base import NotReady

log = logging.getLogger("transplant.vllm")
PAUSE_FLOOR_S = 10.0


def complete_groups(table, refs) -> list:
    """`refs` plus the rest of every fused group one of them belongs to (vLLM keeps those
    projections in one parameter: the architecture table's `fused`); a group is loaded
    whole or not at all."""
    from transplant_core.refs import ModuleRef

    out = set(refs)
    for r in refs:
        for group in table.fused:
            if r.kind in group:
                out.update(ModuleRef(r.layer, k) for k in group if ModuleRef(r.layer, k) in table.modules)
    return sorted(out)


def check_groups(table, refs) -> None:
    """Refuse a set of modules with an incomplete fused group (vLLM would corrupt the layer)."""
    missing = sorted(set(complete_groups(table, refs)) - set(refs))
    if missing:
        raise InvalidArgument("vLLM fuses q/k/v and gate/up: these modules must be sent with their group, "
                              f"missing {', '.join(map(str, missing))}")


class Swaps:
    def install(self, parent_model, cand, commit: Callable[[], object], record=None):
        """Put a prepared generation into vLLM and commit it (see the module docstring).
        Nothing changes if the engine refuses or the commit fails. With the staged
        `record`, the worker reads each tensor by path (sources)."""
        refs = complete_groups(self.table, cand.plan.refs)
        keys = [k for r in refs for k in self.table[r].keys]
        if record is not None:
            new = self.sources(record.state, keys, cand.model)
            old = self.sources(self.gens.records[cand.parent].state, keys, parent_model)
        else:
            new, old = ([], self._tensors(cand.model, refs)), ([], self._tensors(parent_model, refs))
        self._call(self._hold())
        paused = time.perf_counter()
        try:
            try:
                self._call(self._load(*new))
                rec = commit()
            except BaseException:
                self._undo(old)                    # (a load may fail part way: the parent's values back)
                raise
            self.current = rec.id
            self._call(self._label(rec.id))
            return rec
        finally:
            self._call(self._release())
            # the swap's own pause: from the moment nothing runs (drained, vLLM paused) until requests go on
            self.last_pause_s = time.perf_counter() - paused

    def trial(self, parent_model, cand, fn: Callable[[], object]):
        """Install candidate `cand` for the guard, call `fn()` (its probes, requests through
        `direct`) and put the parent back: user requests wait at the shut gate all the while
        (the pause this costs is `last_trial_s`), running ones are drained first (under
        `freeze` too), and none ever runs on the candidate. Its
        tensors reach the workers by path (a scratch safetensors file in the state
        directory, removed after), as a staged generation's do."""
        from safetensors.torch import save_file

        self.last_trial_s = 0.0
        refs = complete_groups(self.table, cand.plan.refs)
        keys = [k for r in refs for k in self.table[r].keys]
        params = dict(cand.model.named_parameters())
        old = self.sources(self.gens.records[cand.parent].state, keys, parent_model)
        scratch = self.gens.dir / "trial"
        scratch.mkdir(exist_ok=True)
        file = scratch / f"{uuid.uuid4().hex}.safetensors"
        save_file({k: params[k].detach().contiguous() for k in keys}, str(file))
        t0 = time.perf_counter()
        try:
            # drained even under `freeze`: a frozen request would resume on the candidate
            self._call(self._hold(drain=True))
            try:
                try:
                    self._call(self._load([(k, str(file), k, "", []) for k in keys], {}))
                    self._call(self._reopen())
                    self._trial_deadline = time.monotonic() + self.spec.guard_trial_timeout_s
                    out = fn()
                finally:
                    self._trial_deadline = None
                    try:
                        self._call(self.engine.pause_generation(mode="wait", clear_cache=False), PAUSE_FLOOR_S)
                    except Exception:          # noqa: BLE001 - the parent goes back regardless
                        log.exception("pausing vLLM after a guard trial")
                    self._undo(old)
                if self.broken:                # the parent could not be put back: nothing may commit
                    raise NotReady(self.broken)
                return out
            finally:
                self._call(self._release())
        finally:
            file.unlink(missing_ok=True)
            self.last_trial_s = time.perf_counter() - t0
            log.info("guard trial of %d modules: the gate was shut %.0f ms", len(refs), self.last_trial_s * 1e3)

    def run_all(self, prompts: list[list[int]], params, direct: bool = False) -> list:
        """Requests of the runtime's own (probes, evaluation) for token-id prompts, run and
        waited for: through the gate like any other, at most a batch at a time (the queue
        stays free for users), or `direct`ly past it. Each finished: result or error."""
        from ..generations import Live
        from .base import Request

        if direct:
            reqs = [Request("", ids, params, deadline=self._trial_deadline, internal=True) for ids in prompts]
            self.direct(reqs)
            for r in reqs:
                if r.error is None and r.result is not None and r.result.finish_reason == "cancelled":
                    r.fail(PreconditionFailed(f"the guard's trial took longer than vllm.guard_trial_timeout_s "
                                              f"({self.spec.guard_trial_timeout_s:g} s); the transplant was refused "
                                              "and nothing changed: probe fewer examples or raise the timeout"))
            return reqs
        # pinned to the generation live now: a `freeze` swap waits for them (they run wholly on it)
        live = Live(self.current, None)
        reqs = [Request("", ids, params, pinned=live, internal=True) for ids in prompts]
        step = max(1, self.max_batch_size)
        for i in range(0, len(reqs), step):
            chunk = reqs[i:i + step]
            for r in chunk:
                self.submit(r)
            for r in chunk:
                r.done.wait()
        return reqs

    def direct(self, reqs: list) -> None:
        """Run requests past the gate and its counts, and wait for them: the guard's probes
        of a candidate installed while the gate is shut (Swaps.trial). Each finishes with a
        result or an error."""
        async def one(r: Request) -> None:
            try:
                r.admit(self.current)
                if r.cancelled():                # the trial's deadline passed before it started
                    r.result = Completion("", [], len(r.prompt_ids), "cancelled")
                    return
                await self._generate(r, uuid.uuid4().hex)
            except BaseException as e:     # noqa: BLE001 - the request learns why
                r.fail(self._why(e))
            finally:
                r.finish()

        async def run() -> None:
            await asyncio.gather(*(one(r) for r in reqs))

        deadline = max((r.deadline for r in reqs if r.deadline is not None), default=None)
        # past the deadline a request ends at its next token; a wedged engine gives none: bounded too
        self._call(run(), None if deadline is None else max(0.0, deadline - time.monotonic()) + 30)

    async def _reopen(self) -> None:
        """vLLM runs again (for `direct` requests only: our gate stays shut)."""
        await self.engine.reset_prefix_cache()
        await self.engine.resume_generation()

    def _undo(self, old) -> None:
        """Put the parent's tensors back. If even that fails, the workers' weights are
        unknown: the engine is broken (unhealthy: NOT_SERVING, /health 503, new requests
        refused, the gate stays shut) rather than serving replies under a wrong label."""
        try:
            self._call(self._load(*old))
        except BaseException as e:               # noqa: BLE001 - recorded; the swap's own error is raised
            self.broken = (f"a swap failed and the parent generation {self.current}'s tensors could not be put "
                           f"back ({type(e).__name__}: {e}); restart the server (it re-installs the live generation)")
            log.error("%s", self.broken)

    async def _hold(self, drain: bool = False) -> None:
        """Close the gate and pause (`drain`: wait for running requests whatever the policy);
        on any failure the gate opens again (and the engine resumes if it can), so requests
        never wait behind a swap that did not happen."""
        self._gate.clear()
        try:
            await self._pause(drain)
        except BaseException:
            try:
                await self.engine.resume_generation()
            except Exception:                 # noqa: BLE001 - a dead engine cannot resume; requests fail fast
                pass
            self._gate.set()
            raise

    async def _pause(self, drain: bool = False) -> None:
        if self.spec.swap_policy == "freeze" and not drain:
            # a pinned request runs wholly on its generation: wait for those (the gate is shut,
            # so no new one starts); the rest are frozen
            await self._wait(self._pinned_idle, "running requests pinned to a generation")
            # keep running requests where they are, but drop their KV cache: on resume vLLM
            # recomputes it with the new weights, so every token after the boundary is the new
            # generation's continuation of the text so far
            await self.engine.pause_generation(mode="keep", clear_cache=True)
            return
        await self._wait(self._idle, "running requests")
        # vLLM waits for what it runs itself (our gate counts what we admitted): bounded too, so
        # the gate never stays shut; at least PAUSE_FLOOR_S, the pause's own cost on an idle engine
        bound = max(self.spec.swap_drain_timeout_s, PAUSE_FLOOR_S)
        try:
            await asyncio.wait_for(self.engine.pause_generation(mode="wait", clear_cache=False), bound)
        except asyncio.TimeoutError:
            raise PreconditionFailed(f"vLLM did not pause within {bound:g} s (vllm.swap_drain_timeout_s); "
                                     "the swap was refused and nothing changed") from None

    async def _wait(self, event: asyncio.Event, what: str) -> None:
        try:
            await asyncio.wait_for(event.wait(), self.spec.swap_drain_timeout_s)
        except asyncio.TimeoutError:
            raise PreconditionFailed(f"{what} did not finish within {self.spec.swap_drain_timeout_s:g} s "
                                     "(vllm.swap_drain_timeout_s); the swap was refused and nothing changed") from None

    async def _release(self) -> None:
        try:
            await self.engine.reset_prefix_cache()      # a reload does not: cached prefixes hold old weights' KV
            await self.engine.resume_generation()
        finally:
            if not self.broken:
                self._gate.set()                      # waiting requests go on (or fail fast on a dead engine)

    def sources(self, state: dict[str, str], keys: list[str], model) -> tuple[list, dict]:
        """Where vLLM's worker reads each of `keys` for a generation whose override set is
        `state`: a value as loaded from the checkpoint's own safetensors file, a changed one
        from its object in the tensor store, each by path, (key, file, name, dtype, shape);
        only a value neither holds (a low-rank weight: the store keeps its factors) goes
        as bytes, taken from `model`. Returns (paths, {key: tensor})."""
        from transplant_core.checkpoint import CheckpointTensors

        if self._checkpoint is None:
            self._checkpoint = CheckpointTensors(self.model_path)
        base, store = self.gens.records[0].checksums, self.gens.store
        paths, rest, params = [], {}, None
        for k in keys:
            digest = state.get(k, base.get(k))
            want = self.gens.values.base_params[k]
            if digest == base.get(k) and self._checkpoint.has(k):
                file, name = self._checkpoint.locate(k)
                paths.append((k, file, name, "", []))            # as vLLM loaded it at start
            elif store.has(digest):                              # (bytes alone: give them the parameter's type)
                paths.append((k, str(store.path(digest)), "tensor", str(want.dtype).removeprefix("torch."),
                              list(want.shape)))
            else:
                params = params or dict(model.named_parameters())
                rest[k] = params[k].detach().contiguous()
        return paths, rest

    async def _load(self, paths: list, tensors: dict) -> None:
        from safetensors.torch import save

        sent = set(tensors) | {p[0] for p in paths}
        check_groups(self.table, sorted({m.ref for m in self.table.modules.values() if any(k in sent for k in m.keys)}))
        await self.engine.collective_rpc("transplant_load", args=(paths, save(tensors) if tensors else b""))
        self.last_load = {"paths": len(paths), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}

    async def _label(self, gen: int) -> None:
        await self.engine.update_weight_version(str(gen))

    def _tensors(self, model, refs) -> dict:
        params = dict(model.named_parameters())
        return {k: params[k].detach().contiguous() for r in refs for k in self.table[r].keys}

    def load_raw(self, tensors: dict) -> None:
        """Send tensors as they are (tests: an incomplete group must be refused here)."""
        self._call(self._load([], tensors))
