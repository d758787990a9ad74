"""One mapping from domain errors to gRPC status codes; only the unexpected is INTERNAL."""
from __future__ import annotations

import functools
import logging

import grpc

from transplant_core import errors as E

from .scheduler import QueueFull

log = logging.getLogger("transplant.server")


class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, message: str):
        self.message = message


class NotReady(Exception):
    """The server is still loading its model."""

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


def rpc(method):
    """Servicer method decorator: domain errors become their status; anything else INTERNAL
    (logged with its traceback, reported without internals)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            _ready(self, request)
            return method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as e:   # noqa: BLE001 - this is the one place errors become statuses
            code = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
                context.abort(code, f"internal error in {method.__name__}: {type(e).__name__}; see the server log")
            context.abort(code, str(e))
    return wrapper


def rpc_stream(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            _ready(self, request)
            yield from method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as e:   # noqa: BLE001
            code = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
                context.abort(code, f"internal error in {method.__name__}: {type(e).__name__}; see the server log")
            context.abort(code, str(e))
    return wrapper
