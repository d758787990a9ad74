"""Assembling the server: `create_server(config) -> Server` with the bound ports, so
tests bind port 0 and talk through real stubs."""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from transplant_core.errors import PreconditionFailed

from .auth import AdminAuthInterceptor, load_key, load_or_create_token
from .config import ServeConfig
from .api.http import HttpServer
from .api.openai import OpenAIApi
from .api.errors import MalformedRequest
from .rpc import ADMIN_SERVICE, INFERENCE_SERVICE, admin_pb2, inference_pb2
from .runtime import Runtime
from .api.grpc import AdminServicer, InferenceServicer

log = logging.getLogger("transplant.server")
SERVICES = ("", INFERENCE_SERVICE, ADMIN_SERVICE)


def tolerant_handler(service, servicer) -> grpc.GenericRpcHandler:
    """The service's handlers, built from its descriptor like the generated code, except
    that a request that does not parse (invalid UTF-8 in a string, say) reaches the
    servicer as MalformedRequest, so the client gets INVALID_ARGUMENT, not INTERNAL."""
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError

    handlers = {}
    for m in service.methods:
        cls, out = message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type)

        def parse(data, cls=cls):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return MalformedRequest(f"malformed {cls.DESCRIPTOR.name}: {e} (strings must be valid UTF-8)")

        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=parse,
                                response_serializer=out.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class Server:
    def __init__(self, cfg: ServeConfig, runtime: Runtime | None = None, openai: bool = True):
        """runtime: one built by the caller (the vLLM plugin's, on vLLM's engine); openai:
        serve /v1 on our HTTP port (not inside `vllm serve`, where vLLM's own server does)."""
        self.cfg = cfg
        self.token, self.token_created = load_or_create_token(cfg.token_file)
        self.inference_key = load_key(cfg.inference_key_file)
        self.runtime = runtime or Runtime(cfg)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="grpc"),
            interceptors=[AdminAuthInterceptor(self.token, (ADMIN_SERVICE,))] + (
                [AdminAuthInterceptor(self.inference_key, (INFERENCE_SERVICE,), "inference key")]
                if self.inference_key else []),
            maximum_concurrent_rpcs=cfg.grpc_workers + cfg.max_queue,
            # gRPC turns SO_REUSEPORT on by default: a second server on a taken port would bind
            # too and the kernel would split connections between the two. Off: a clear error.
            options=[("grpc.max_receive_message_length", 4 * 1024 * 1024), ("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self.grpc_port = self._bind_grpc(cfg)
        self.grpc.add_generic_rpc_handlers((
            tolerant_handler(inference_pb2.DESCRIPTOR.services_by_name["Inference"], InferenceServicer(self.runtime)),
            tolerant_handler(admin_pb2.DESCRIPTOR.services_by_name["Admin"], AdminServicer(self.runtime)),
        ))
        try:
            self.http = HttpServer(cfg.http_listen, self.runtime.metrics.registry, self.token, self._on_alert,
                                   api=OpenAIApi(self.runtime, cfg.http_timeout_s) if openai else None,
                                   inference_key=self.inference_key,
                                   count=self.runtime.metrics.count_http,
                                   serving=lambda: self.runtime.serving,
                                   fleet_state=lambda: self.runtime.fleet.public_state() if self.runtime.fleet else None)
        except OSError as e:
            self.grpc.stop(0)
            raise PreconditionFailed(f"cannot listen on {cfg.http_listen} (HTTP: /metrics, /alerts): {_why(e)}; "
                                     "stop whatever holds it or give --http-listen HOST:PORT") from None
        self.http_port = self.http.port
        self.runtime.endpoints.update(grpc=_advertised(cfg.grpc_listen, self.grpc_port),
                                      http=_advertised(cfg.http_listen, self.http_port))
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._listening = False
        self.exit_on_engine_death = False   # `transplant serve`: a supervisor restarts it
        self._health_lock = threading.Lock()   # start, stop and an engine's death set health in turn
        self.runtime.on_engine_dead = self._on_engine_dead
        self.runtime.on_fence = self._on_fence

    def _bind_grpc(self, cfg: ServeConfig) -> int:
        try:
            if cfg.tls_cert:
                creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
                port = self.grpc.add_secure_port(cfg.grpc_listen, creds)
            else:
                port = self.grpc.add_insecure_port(cfg.grpc_listen)
        except RuntimeError:          # grpcio >= 1.5x raises where older ones returned 0
            port = 0
        if not port:
            raise PreconditionFailed(f"cannot listen on {cfg.grpc_listen} (gRPC): the address is in use or not "
                                     "available here (another `transplant serve`?); stop whatever holds it or "
                                     "give --grpc-listen HOST:PORT")
        return port

    def _on_alert(self, doc: dict) -> tuple[int, dict]:
        if not self.runtime.ready.is_set():
            return 503, {"error": "the server is loading; Alertmanager will retry"}
        return self.runtime.on_alert(doc)

    def _on_engine_dead(self) -> None:
        """NOT_SERVING at once; then (exit_on_engine_death) stop, and `transplant serve`
        exits 1 after engine_dead_exit_s, so a supervisor or Kubernetes restarts it."""
        with self._health_lock:
            self.runtime.serving = False
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.exit_on_engine_death:
            def later():
                time.sleep(self.cfg.engine_dead_exit_s)
                log.error("the engine is dead: stopping (exit status 1)")
                self.stop(drain_s=0)
            threading.Thread(target=later, name="engine-dead-exit", daemon=True).start()

    def _on_fence(self, why: str) -> None:
        """A fleet replica cut off from etcd whose generation the fleet reverted stops
        serving (`why`), and serves again once etcd answers (`why` empty)."""
        with self._health_lock:
            if self._stopped.is_set() or self.runtime.engine_dead or not self.runtime.ready.is_set():
                return
            self.runtime.serving = not why
            self.runtime.metrics.healthy.set(0 if why else 1)
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING if why else
                             health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status) -> None:
        for s in SERVICES:
            self.health.set(s, status)

    def listen(self) -> "Server":
        """Accept connections (health says NOT_SERVING until the model is loaded)."""
        if not self._listening:
            self._listening = True
            self.grpc.start()
            self.http.start()
        return self

    def start(self) -> "Server":
        """Listen, load, then SERVING."""
        self.listen()
        try:
            self.runtime.load()
        except BaseException:
            self.grpc.stop(0)
            self.http.stop()
            self.runtime.close()
            raise
        with self._health_lock:
            if self._stopped.is_set() or self.runtime.engine_dead:
                return self                      # stopped (or the engine died) during start-up
            self.runtime.serving = True
            self.runtime.metrics.healthy.set(1)
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, drain_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish, then exit."""
        if self._stopped.is_set():
            return
        with self._health_lock:
            self._stopped.set()
            self.runtime.serving = False
            self.runtime.metrics.healthy.set(0)
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            grace = self.cfg.drain_timeout_s if drain_s is None else drain_s
            done = self.grpc.stop(grace)
            if hasattr(self.runtime, "scheduler"):
                self.runtime.drain(grace)
            done.wait(grace + 1)
            self.http.stop()
            self.runtime.close()
        finally:
            self._finished.set()

    def wait(self) -> None:
        """Block until stop() has drained and closed everything."""
        self._finished.wait()


def _advertised(listen: str, port: int) -> str:
    """HOST:PORT others reach this listener at (a wildcard host: this machine's name)."""
    import socket

    host = listen.rpartition(":")[0]
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def _why(e: OSError) -> str:
    import errno

    if e.errno == errno.EADDRINUSE:
        return "the address is in use (another `transplant serve`?)"
    return e.strerror or str(e)


def create_server(cfg: ServeConfig) -> Server:
    return Server(cfg).start()
