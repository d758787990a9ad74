"""vLLM's own engine inside `vllm serve` (the plugin, server/plugin/): the engine client
and the event loop are vLLM's API server's, not ours. Everything else is VllmEngine's:
the gate, the drain, the changed tensors to our worker extension by path, the commit,
the weight-version label.

vLLM's /v1 requests never pass through `submit`: the plugin's middleware brings them
through the same gate (`enter` / `leave`), so a swap waits for them as for our own
requests and holds new ones until the new generation is installed, and each reply is
labelled with the generation that computed it, taken at admission. Only `drain` is
offered here: under `freeze` a request vLLM serves would run across a swap with no way
for us to say which tokens each generation sampled in its reply.

vLLM owns the engine's life: stopping ours never shuts vLLM's engine down."""
from __future__ import annotations

import asyncio
import logging

from transplant_core.errors import InvalidArgument

from .base import NotReady
from .vllm import VllmEngine

log = logging.getLogger("transplant.vllm")


class AttachedVllmEngine(VllmEngine):
    def __init__(self, client, loop: asyncio.AbstractEventLoop, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.spec.swap_policy != "drain":
            raise InvalidArgument("inside `vllm serve` swaps drain (vllm.swap_policy: drain): under freeze a reply "
                                  "vLLM serves could not say which tokens each generation sampled")
        self._loop.close()                # the base made a loop of its own: vLLM's is the one
        self._loop, self._client = loop, client

    def start(self) -> None:
        if self._stopping:
            raise NotReady("the server is stopping")
        self._call(self._start())
        self._repatch()                   # a restart on generation N: vLLM loaded the checkpoint
        log.info("transplant inside vllm serve on %s: generation %d, swaps drain", self.model_path, self.current)

    async def _start(self) -> None:
        self._events()
        self.engine = self._client

    def _alive(self) -> bool:
        return self._loop.is_running() and not self._loop.is_closed()

    def stop(self) -> None:
        """Ours only: requests we accepted learn why; vLLM's engine is vLLM's to stop."""
        self._stopping = True
        for r in list(self._held.values()):
            self._end(r, NotReady("the server is stopping; retry on another replica"))

    # ---- vLLM's own requests (the plugin's middleware) ------------------------------------

    async def enter(self) -> int:
        """A request vLLM is about to serve: wait while a swap is being installed, then count
        it as running (a swap drains it) and return the generation it runs on."""
        while not self._gate.is_set():
            if self.broken:
                raise NotReady(self.broken)
            try:
                await asyncio.wait_for(self._gate.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        if self.broken:
            raise NotReady(self.broken)
        # nothing awaits between the gate's check and the count: a swap that closes the gate
        # after this point waits for this request
        with self._count:
            self._running += 1
        self._idle.clear()
        return self.current

    def leave(self) -> None:
        with self._count:
            self._running -= 1
            if self._running == 0:
                self._idle.set()
