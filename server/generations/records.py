"""What the journal and the fleet log hold: a generation's record, and the small
values that go with it (what a request pins, a change built off to the side)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from transplant_core import transplant as tp
from transplant_core.errors import InvalidArgument, PreconditionFailed


class StoreDamaged(PreconditionFailed):
    """A tensor the store should hold is missing, unreadable or not what its digest says.
    Not a verdict on the change: restoring the object fixes it (a fleet replica retries)."""

    def __init__(self, message: str, digest: str):
        super().__init__(message)
        self.digest = digest


@dataclass(frozen=True)
class Live:
    """What a request pins: a generation id and the model that computes it."""
    id: int
    model: nn.Module


@dataclass(frozen=True)
class Candidate:
    """A validated change built off to the side, not yet live."""
    plan: tp.Plan
    parent: int
    model: nn.Module
    replaced: dict = field(repr=False)


@dataclass
class Record:
    id: int
    parent: int | None
    kind: str                     # load, transplant, revert
    donor: str = ""
    modules: list[str] = field(default_factory=list)
    alpha: float = 1.0
    selection: dict = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)          # tensors installed
    state: dict[str, str] = field(default_factory=dict)              # full override set: key -> sha256
    quality: list[dict] = field(default_factory=list)
    requested_by: str = ""
    reason: str = ""
    created: float = 0.0
    reverted_to: int | None = None
    bytes: int = 0
    replica: str = ""             # fleet: the replica that appended it to the fleet log
    rollout: dict | None = None   # fleet: {"canaries": [...]} of a transplant's canary phase
    skipped: bool = False         # fleet: in the log, never live here (superseded before it could be)
    ranks: dict[str, int] = field(default_factory=dict)    # low-rank: module -> rank of its factors
    derived: dict[str, dict] = field(default_factory=dict)  # low-rank: weight digest -> recipe (change.LowRankRecipe)
    stored_bytes: int = 0         # bytes this generation added to describe its change (factors, values)
    idempotency: dict = field(default_factory=dict)   # {"key", "request"}: the call that made it, if it gave a key

    def to_journal(self) -> dict:
        return {"type": "generation", **{k: v for k, v in self.__dict__.items() if k != "quality"}}

    @classmethod
    def from_doc(cls, doc: dict, skipped: bool | None = None) -> "Record":
        """A record from its journal or fleet-log form (unknown fields ignored; a fleet's
        document never says `skipped`: that is this replica's own fact)."""
        fields = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__ and k != "quality"}
        if skipped is not None:
            fields["skipped"] = skipped
        return cls(**fields)


def find_keyed(records, key: str, digest: str):
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
