"""The `vllm.endpoint_plugins` entry point named `transplant` (loaded only when
VLLM_PLUGINS names it). Phase A (`attach_router`): the middleware, the admin routes
under /transplant/v1/, and our server's stop in vLLM's lifespan. Phase B (`init_state`):
our configuration, then the runtime on vLLM's engine client, started before vLLM
accepts its first request (a restart re-installs the live generation first), so no
reply is ever computed on weights the journal does not say are live.

Our settings come from the file TRANSPLANT_CONFIG names (the `transplant serve
--config` format: state_dir, donors, donor_roots, probes, guard, fleet, ports, admin
token file); the model is vLLM's."""
import asyncio
import contextlib
import logging
import os
from pathlib import Path

from transplant_core.errors import InvalidArgument

from ..api.admin_json import MAX_BODY, PREFIX, AdminJson
from ..app import Server
from ..config import ServeConfig, load_config
from ..runtime import Runtime
from .middleware import GenerationLabel

log = logging.getLogger("transplant.plugin")
WORKER = "server.engines.vllm_worker.TransplantWorker"
CONFIG_ENV = "TRANSPLANT_CONFIG"


class TransplantPlugin:
    name = "transplant"
    required_tasks = ("generate",)

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="transplant-admin")

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        app.add_middleware(GenerationLabel)
        router = APIRouter()

        # (no `from __future__ import annotations` in this module: FastAPI reads these at run time)
        @router.post(PREFIX + "{method}")
        async def admin(method: str, request: Request):
            server = getattr(request.app.state, "transplant", None)
            if server is None:
                return JSONResponse({"error": {"code": "UNAVAILABLE", "message": "transplant is not started"}}, 503)
            # the token before the body: an unauthenticated caller gets nothing read, nothing buffered
            authorization = request.headers.get("authorization")
            refused = server.admin_json.refuse(authorization)
            if refused is not None:
                return JSONResponse(refused[1], refused[0])
            body = await _bounded_body(request)
            if body is None:
                return JSONResponse({"error": {"code": "INVALID_ARGUMENT",
                                               "message": f"the body is over {MAX_BODY} bytes"}}, 413)
            who = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
            who = request.headers.get("x-requested-by") or who
            loop = asyncio.get_running_loop()        # our own threads: vLLM's default pool stays free for it
            code, doc = await loop.run_in_executor(self._pool, server.admin_json.call, method, body, authorization,
                                                   who)
            return JSONResponse(doc, code)

        app.include_router(router)
        _stop_with(app)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            raise InvalidArgument("the transplant plugin needs vLLM's engine (not the render-only server)")
        from vllm import envs

        if envs.VLLM_SERVER_DEV_MODE:
            raise InvalidArgument("VLLM_SERVER_DEV_MODE=1 opens vLLM's unauthenticated weight routes (/collective_rpc, "
                                  "/update_weights, /pause): weights could change behind the journal; unset it")
        cfg = plugin_config(args)
        runtime = Runtime(cfg, attach=(engine_client, asyncio.get_running_loop()))
        server = Server(cfg, runtime=runtime, openai=False)
        server.admin_json = AdminJson(runtime, server.token)
        # the load calls into vLLM's engine on this loop: it runs on a thread while we await
        await asyncio.to_thread(server.start)
        state.transplant = server
        if server.token_created:
            log.warning("transplant: created an admin token in %s", cfg.token_file)
        log.info("transplant: generation %d live; Admin gRPC on %s, %s<Method> here, /metrics and /alerts on %s",
                 runtime.gens.live.id, server.runtime.endpoints["grpc"], PREFIX, server.runtime.endpoints["http"])


async def _bounded_body(request) -> bytes | None:
    """The request's body, or None past MAX_BODY (read no further)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def plugin_config(args) -> ServeConfig:
    """Our configuration inside `vllm serve`: TRANSPLANT_CONFIG's file, with vLLM's model
    (the file may name it too, as zoo:NAME or a folder: it must be the same checkpoint)."""
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise InvalidArgument(f"transplant inside vllm serve needs a local checkpoint folder as the model, got "
                              f"{args.model!r}: download it first and serve the folder (nothing is fetched at run time)")
    if (getattr(args, "worker_extension_cls", "") or "") != WORKER:
        raise InvalidArgument(f"vllm serve needs --worker-extension-cls {WORKER} for transplant: it installs "
                              "generations in vLLM's workers")
    if (getattr(args, "api_server_count", None) or 1) != 1:
        raise InvalidArgument("transplant inside vllm serve supports one API server process (--api-server-count 1): "
                              "each would hold its own generations")
    path = os.environ.get(CONFIG_ENV) or None
    named = _file_model(path)
    served = (getattr(args, "served_model_name", None) or [None])[0]
    cfg = load_config(path, engine="vllm", model=None if named else str(model))
    if named:
        from transplant_core.checkpoint import resolve_model_path

        if resolve_model_path(cfg.model).resolve() != model.resolve():
            raise InvalidArgument(f"{CONFIG_ENV} ({path}) names model {cfg.model!r}, but vllm serves {args.model}; "
                                  "name the same checkpoint or leave `model` out of the file")
    if served and not cfg.served_model_name:
        cfg = load_config(path, engine="vllm", model=cfg.model, served_model_name=served)
    return cfg


def _file_model(path: str | None) -> bool:
    if not path:
        return False
    try:
        import yaml

        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{CONFIG_ENV}={path}: {e}") from None
    return isinstance(doc, dict) and bool(doc.get("model"))


def _stop_with(app) -> None:
    """Our server (gRPC, HTTP, probes, the fleet agent) stops when vLLM's does."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as value:
            try:
                yield value
            finally:
                server = getattr(a.state, "transplant", None)
                if server is not None:
                    await asyncio.to_thread(server.stop, 5.0)

    app.router.lifespan_context = lifespan
