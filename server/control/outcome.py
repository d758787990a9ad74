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


def find(records, key: str, digest: str):
    """The record an earlier call with `key` made (records: Record objects or the fleet
    log's dicts), or None; the same key on another request is INVALID_ARGUMENT."""
    for rec in records:
        idem = (rec.get("idempotency") if isinstance(rec, dict) else rec.idempotency) or {}
        if idem.get("key") != key:
            continue
        rid = rec["id"] if isinstance(rec, dict) else rec.id
        if idem.get("request") != digest:
            raise InvalidArgument(f"idempotency_key {key!r} was used for another request (it made generation {rid}); "
                                  "a key names one change: use a new key", field="idempotency_key")
        return rec
    return None


def standalone(rec, live: int, name: str) -> dict:
    """The rollout of a generation on a standalone server."""
    here = rec.id == live
    return {"generation": rec.id, "kind": rec.kind, "phase": "", "canaries": [], "serving": [name] if here else [],
            "progress": "" if here else f"no longer live: generation {live} is", "live_here": here, "replicas": 1}
