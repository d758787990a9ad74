"""Assembling the server: `create_server(config) -> Server` with the bound ports, so
tests bind port 0 and talk through real stubs."""
from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import AdminAuthInterceptor, load_or_create_token
from .config import ServeConfig
from .http import HttpServer
from .rpc import ADMIN_SERVICE, INFERENCE_SERVICE, admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from .runtime import Runtime
from .servicers import AdminServicer, InferenceServicer

log = logging.getLogger("transplant.server")
SERVICES = ("", INFERENCE_SERVICE, ADMIN_SERVICE)


class Server:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.token, self.token_created = load_or_create_token(cfg.token_file)
        self.runtime = Runtime(cfg)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="grpc"),
            interceptors=[AdminAuthInterceptor(self.token, (ADMIN_SERVICE,))],
            maximum_concurrent_rpcs=cfg.grpc_workers + cfg.max_queue,
            options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                 admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.grpc_port = self.grpc.add_secure_port(cfg.grpc_listen, creds)
        else:
            self.grpc_port = self.grpc.add_insecure_port(cfg.grpc_listen)
        if not self.grpc_port:
            raise OSError(f"cannot listen on {cfg.grpc_listen}")
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.runtime), self.grpc)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.runtime), self.grpc)
        self.http = HttpServer(cfg.http_listen, self.runtime.metrics.registry, self.token)
        self.http_port = self.http.port
        self._stopped = threading.Event()

    def _set_health(self, status) -> None:
        for s in SERVICES:
            self.health.set(s, status)

    def start(self) -> "Server":
        """Listen at once (NOT_SERVING), load, then SERVING."""
        self.grpc.start()
        self.http.start()
        try:
            self.runtime.load()
        except BaseException:
            self.grpc.stop(0)
            self.http.stop()
            self.runtime.close()
            raise
        self.runtime.serving = True
        self.runtime.metrics.healthy.set(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, drain_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish, then exit."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.runtime.serving = False
        self.runtime.metrics.healthy.set(0)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.cfg.drain_timeout_s if drain_s is None else drain_s
        done = self.grpc.stop(grace)
        if hasattr(self.runtime, "scheduler"):
            self.runtime.drain(grace)
        done.wait(grace + 1)
        self.http.stop()
        self.runtime.close()

    def wait(self) -> None:
        self._stopped.wait()


def create_server(cfg: ServeConfig) -> Server:
    return Server(cfg).start()
