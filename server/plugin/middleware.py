"""What the plugin puts in front of vLLM's own routes (an ASGI middleware, added by the
plugin itself; `--middleware server.plugin.middleware.GenerationLabel` is the same and
takes effect once).

Every POST but a few known not to run the model (tokenization, our admin routes) passes
the engine's gate: while a swap is being installed it waits, then it counts as running
until its reply (streamed or not) has gone out, so a swap drains it; the reply carries
`x-transplant-generation`, the generation it was admitted on, which computed all of it.
Gating by exclusion means a route vLLM adds later is drained too. Paths are matched
after `--root-path`, as vLLM's own middleware does. GET /health and /ping answer 503
while the runtime is not serving (loading, a dead engine, a fenced fleet replica, a
swap whose rollback failed). Anything else passes through untouched."""
from __future__ import annotations

import json

HEADER = b"x-transplant-generation"
UNGATED = ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize")
HEALTH = ("/health", "/ping")


def generates(method: str, path: str) -> bool:
    return method == "POST" and path not in UNGATED and not path.startswith("/transplant/")


class GenerationLabel:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        app = scope.get("app")
        server = getattr(getattr(app, "state", None), "transplant", None)
        if scope["type"] != "http" or server is None or scope.get("transplant.seen"):
            return await self.app(scope, receive, send)
        scope["transplant.seen"] = True
        method, path = scope["method"], scope["path"].removeprefix(scope.get("root_path", ""))
        engine = server.runtime.scheduler
        if method == "GET" and path in HEALTH and not (server.runtime.serving and engine.healthy()):
            return await _reply(send, 503, {"error": "transplant: not serving (loading, stopping, a dead engine, or "
                                                     "a swap that could not be undone; see the server log)"})
        if not generates(method, path):
            return await self.app(scope, receive, send)
        try:
            generation = await engine.enter()
        except Exception as e:                   # noqa: BLE001 - NotReady: the engine cannot be trusted
            return await _reply(send, 503, {"error": {"message": f"transplant: {e}", "type": "service_unavailable",
                                                      "code": 503}})
        label = str(generation).encode()

        async def labelled(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, label)]}
            await send(message)

        try:
            await self.app(scope, receive, labelled)
        finally:
            engine.leave()


async def _reply(send, status: int, doc: dict) -> None:
    body = (json.dumps(doc) + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
