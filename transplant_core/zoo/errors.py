"""The zoo's one error type; its message always says what to do."""
from __future__ import annotations

from ..errors import TransplantError


class ZooError(TransplantError):
    """Unknown zoo model/task/split, or a zoo that is not built (run `transplant zoo build`)."""
