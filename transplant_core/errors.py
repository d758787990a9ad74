"""Domain errors, in one place. The server maps each class to one gRPC status code
and the CLI to one exit status; messages name the value, what was expected and the fix."""
from __future__ import annotations


class TransplantError(Exception):
    """Base class: every error the core raises on bad input. `field`, where one request
    field is to blame, names it (the APIs report it: OpenAI's `param`)."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidArgument(TransplantError):
    """The request itself is malformed (bad spec, bad alpha, malformed task file)."""


class NotFound(TransplantError):
    """A named thing (module, donor, checkpoint, generation, task) does not exist."""


class AlreadyExists(TransplantError):
    """Registering something under a name that is taken."""


class Incompatible(TransplantError):
    """Donor and target cannot exchange the requested modules (shapes, dtypes, architecture).

    `mismatches` lists every problem found, not just the first."""

    def __init__(self, message: str, mismatches: list[str] | None = None, field: str | None = None):
        self.mismatches = list(mismatches or [])
        if self.mismatches:
            message = message + ":\n  - " + "\n  - ".join(self.mismatches)
        super().__init__(message, field)


class UnsafeCheckpoint(TransplantError):
    """A checkpoint would need pickle (.bin/.pt) and the operator did not opt in."""


class NonFiniteWeights(TransplantError):
    """Donor tensors contain NaN or infinity."""


class PreconditionFailed(TransplantError):
    """The operation is valid but not in the current state (e.g. nothing to revert to)."""
