"""One mapping from domain errors to gRPC status codes; only the unexpected is INTERNAL."""
from __future__ import annotations

import functools
import logging
import time

import grpc

from transplant_core import errors as E

from ..engines.base import NotReady, QueueFull  # noqa: F401 - NotReady: mapped here, raised below
from ..fleet.etcd import Unavailable as FleetUnavailable
from ..generations.log import Conflict as FleetConflict
from ..generations.log import OutcomeUnknown

log = logging.getLogger("transplant.server")


class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, message: str):
        self.message = message



STATUS = {
    E.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    E.NotFound: grpc.StatusCode.NOT_FOUND,
    E.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    E.Incompatible: grpc.StatusCode.FAILED_PRECONDITION,
    E.NonFiniteWeights: grpc.StatusCode.INVALID_ARGUMENT,
    E.UnsafeCheckpoint: grpc.StatusCode.FAILED_PRECONDITION,
    E.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    FleetUnavailable: grpc.StatusCode.UNAVAILABLE,      # etcd unreachable: nothing changed, retry
    FleetConflict: grpc.StatusCode.ABORTED,             # another record won the fleet log's head
    OutcomeUnknown: grpc.StatusCode.UNKNOWN,            # sent, reply lost: the message names the record
}


def _ready(servicer, request) -> None:
    if isinstance(request, MalformedRequest):
        raise E.InvalidArgument(request.message)
    if not servicer.rt.ready.is_set():
        raise NotReady("the server is loading its model; retry when health says SERVING")


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _fail(servicer, name: str, t0: float, e: Exception, context) -> None:
    code = status_of(e)
    servicer.rt.metrics.requests.labels(name, code.name).inc()
    servicer.rt.metrics.request_seconds.labels(name).observe(time.perf_counter() - t0)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name)
        context.abort(code, f"internal error in {name}: {type(e).__name__}; see the server log")
    context.abort(code, str(e))


def _ok(servicer, name: str, t0: float) -> None:
    servicer.rt.metrics.requests.labels(name, "OK").inc()
    servicer.rt.metrics.request_seconds.labels(name).observe(time.perf_counter() - t0)


def rpc(method):
    """Servicer method decorator: counts and times the call; domain errors become their
    status; anything else INTERNAL (logged with its traceback, reported without internals)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            _ready(self, request)
            reply = method(self, request, context)
        except Exception as e:   # noqa: BLE001 - this is the one place errors become statuses
            _fail(self, method.__name__, t0, e, context)
        _ok(self, method.__name__, t0)
        return reply
    return wrapper


def rpc_stream(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            _ready(self, request)
            yield from method(self, request, context)
        except Exception as e:   # noqa: BLE001
            _fail(self, method.__name__, t0, e, context)
        _ok(self, method.__name__, t0)
    return wrapper


# The same errors over HTTP (the OpenAI-compatible API): one map, from the gRPC code.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 502,          # an outcome etcd never confirmed: a retry (same key) learns it
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
              500: "server_error", 502: "server_error", 503: "service_unavailable", 504: "timeout_error"}


def http_status_of(exc: BaseException) -> int:
    return HTTP_STATUS.get(status_of(exc), 500)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}
