"""Swaps on the vLLM engine (the steps in vllm.py's docstring): the gate, vLLM's pause
(drain or freeze), the changed tensors with their whole fused groups to our worker
extension, the commit, the weight-version label, resume. A mixin of VllmEngine."""
from __future__ import annotations

import asyncio
from typing import Callable

from transplant_core.errors import InvalidArgument, PreconditionFailed


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
    def install(self, parent_model, cand, commit: Callable[[], object]):
        """Put a prepared generation into vLLM and commit it (see the module docstring).
        Nothing changes if the engine refuses or the commit fails."""
        refs = complete_groups(self.table, cand.plan.refs)
        new, old = self._tensors(cand.model, refs), self._tensors(parent_model, refs)
        self._call(self._hold())
        try:
            self._call(self._load(new))
            try:
                rec = commit()
            except BaseException:
                self._call(self._load(old))
                raise
            self.current = rec.id
            self._call(self._label(rec.id))
            return rec
        finally:
            self._call(self._release())

    async def _hold(self) -> None:
        """Close the gate and pause; on any failure the gate opens again (and the engine
        resumes if it can), so requests never wait behind a swap that did not happen."""
        self._gate.clear()
        try:
            await self._pause()
        except BaseException:
            try:
                await self.engine.resume_generation()
            except Exception:                 # noqa: BLE001 - a dead engine cannot resume; requests fail fast
                pass
            self._gate.set()
            raise

    async def _pause(self) -> None:
        if self.spec.swap_policy == "freeze":
            # a pinned request runs wholly on its generation: wait for those (the gate is shut,
            # so no new one starts); the rest are frozen
            await self._wait(self._pinned_idle, "running requests pinned to a generation")
            # keep running requests where they are, but drop their KV cache: on resume vLLM
            # recomputes it with the new weights, so every token after the boundary is the new
            # generation's continuation of the text so far
            await self.engine.pause_generation(mode="keep", clear_cache=True)
            return
        await self._wait(self._idle, "running requests")
        await self.engine.pause_generation(mode="wait", clear_cache=False)

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
            self._gate.set()                          # waiting requests go on (or fail fast on a dead engine)

    async def _load(self, tensors: dict) -> None:
        from safetensors.torch import save

        check_groups(self.table, sorted({m.ref for m in self.table.modules.values() if any(k in tensors for k in m.keys)}))
        await self.engine.collective_rpc("transplant_load", args=(save(tensors),))

    async def _label(self, gen: int) -> None:
        await self.engine.update_weight_version(str(gen))

    def _tensors(self, model, refs) -> dict:
        params = dict(model.named_parameters())
        return {k: params[k].detach().contiguous() for r in refs for k in self.table[r].keys}

    def load_raw(self, tensors: dict) -> None:
        """Send tensors as they are (tests: an incomplete group must be refused here)."""
        self._call(self._load(tensors))
