"""The Admin service over HTTP with JSON: each gRPC method at POST /transplant/v1/<Method>,
its request and reply in protobuf's JSON mapping (field names as in the .proto). It calls
the gRPC servicer itself, so the operations, the validation and the errors are the same
ones; only the transport differs. Errors: {"error": {"code": "FAILED_PRECONDITION",
"message": ...}} with the HTTP status of the one error map (errors.HTTP_STATUS).

Transport-free: the vLLM plugin mounts it on vLLM's own server (server/plugin/)."""
from __future__ import annotations

import grpc
from google.protobuf import json_format, message_factory

from ..auth import check_bearer
from ..rpc import admin_pb2
from .errors import HTTP_STATUS
from .grpc import AdminServicer

PREFIX = "/transplant/v1/"
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
MAX_BODY = 1 << 20


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Context:
    """What the servicer reads of a gRPC call's context, for a call over HTTP."""

    def __init__(self, who: str):
        self._who = who

    def abort(self, code, message):
        raise _Aborted(code, message)

    def invocation_metadata(self):
        return (("x-requested-by", self._who),)

    def peer(self) -> str:
        return self._who

    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        return True


def _error(code: grpc.StatusCode, message: str) -> tuple[int, dict]:
    return HTTP_STATUS.get(code, 500), {"error": {"code": code.name, "message": message}}


class AdminJson:
    def __init__(self, runtime, token: str):
        self.servicer = AdminServicer(runtime)
        self.token = token

    @staticmethod
    def methods() -> list[str]:
        return [m.name for m in SERVICE.methods if not m.server_streaming]

    def refuse(self, authorization: str | None) -> tuple[int, dict] | None:
        """The reply to a caller without the admin token, else None."""
        why = check_bearer(authorization, self.token)
        if why == "missing":                     # as the gRPC interceptor: missing 16, wrong 7 (both HTTP 401)
            return _error(grpc.StatusCode.UNAUTHENTICATED, "missing admin token: send 'Authorization: Bearer "
                                                          "<token>' (the server's admin token file)")
        if why is not None:
            return _error(grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong")
        return None

    def call(self, method: str, body: bytes, authorization: str | None, who: str) -> tuple[int, dict]:
        """(HTTP status, JSON document) for one call; nothing changes unless the caller
        holds the admin token and the request parses."""
        refused = self.refuse(authorization)
        if refused is not None:
            return refused
        m = SERVICE.methods_by_name.get(method)
        if m is None or m.server_streaming:
            return _error(grpc.StatusCode.NOT_FOUND, f"no admin method {method!r}; the methods are "
                                                     f"{', '.join(self.methods())} (POST {PREFIX}<Method>)")
        if len(body) > MAX_BODY:
            return _error(grpc.StatusCode.INVALID_ARGUMENT, f"the body is over {MAX_BODY} bytes")
        request = message_factory.GetMessageClass(m.input_type)()
        try:
            json_format.Parse(body.decode() if body.strip() else "{}", request)
        except (json_format.ParseError, UnicodeDecodeError) as e:
            return _error(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed {m.input_type.name} (protobuf JSON, fields as in transplant/v1/admin.proto): {e}")
        try:
            reply = getattr(self.servicer, method)(request, _Context(who))
        except _Aborted as e:
            return _error(e.code, e.message)
        return 200, json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                              always_print_fields_with_no_presence=True)
