"""Admin authentication: a bearer token, compared in constant time.

With no token configured the server creates one (mode 0600) in its state directory
and says where."""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import grpc

from transplant_core.errors import InvalidArgument


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """(token, created)."""
    path = Path(path)
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            raise ValueError(f"admin token in {path} is shorter than 16 characters")
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def check_bearer(header: str | None, token: str) -> str | None:
    """None if authorised, else 'missing' or 'wrong'."""
    if not header:
        return "missing"
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return "missing"
    return None if hmac.compare_digest(value.strip().encode(), token.encode()) else "wrong"


class AdminAuthInterceptor(grpc.ServerInterceptor):
    """Guards every method of the given services; others pass through. `what` names
    the credential in the refusal (admin token, inference key)."""

    def __init__(self, token: str, services: tuple[str, ...], what: str = "admin token"):
        self._token = token
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._what = what

    def intercept_service(self, continuation, details):
        if not details.method.startswith(self._prefixes):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        verdict = check_bearer(md.get("authorization"), self._token)
        if verdict is None:
            return continuation(details)
        code, msg = ((grpc.StatusCode.UNAUTHENTICATED, f"these calls need 'authorization: Bearer <{self._what}>' "
                      "metadata") if verdict == "missing" else
                     (grpc.StatusCode.PERMISSION_DENIED, f"the {self._what} is wrong"))

        def deny(request, context):
            context.abort(code, msg)

        handler = continuation(details)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def load_key(path: Path | None) -> str | None:
    """The optional inference API key (None: inference is open)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"inference key file {path} does not exist")
    key = path.read_text().strip()
    if len(key) < 16:
        raise InvalidArgument(f"the inference key in {path} is shorter than 16 characters")
    return key
