"""Idempotency keys and the outcome a transplant or revert reports.

A call may carry a key. The generation it makes is journaled (and, in a fleet, logged)
with the key and a digest of the request; the same call sent again with the same key
finds that generation and returns its outcome as it stands now, instead of making a
second one. The same key with another request is refused: keys name one change."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from transplant_core.errors import InvalidArgument


MAX_KEY = 128


def check_key(key: str) -> str:
    if len(key) > MAX_KEY or not key.isprintable() or not key.isascii() or key != key.strip():
        raise InvalidArgument(f"idempotency_key must be at most {MAX_KEY} printable ASCII characters with no "
                              "surrounding spaces", field="idempotency_key")
    return key


def request_digest(kind: str, request) -> str:
    """What the key promises: the call's arguments (a dataclass or a dict), its key left out."""
    doc = dataclasses.asdict(request) if dataclasses.is_dataclass(request) else dict(request)
    doc.pop("idempotency_key", None)
    return hashlib.sha256(json.dumps({"kind": kind, **doc}, sort_keys=True, default=str).encode()).hexdigest()


def stamp(key: str, digest: str) -> dict:
    """The record's `idempotency` field ({} without a key)."""
    return {"key": key, "request": digest} if key else {}
