"""Choosing modules: top-K by score, explicit lists, name patterns."""
from __future__ import annotations

import fnmatch
import random

from .errors import InvalidArgument
from .refs import ModuleRef


def top_k(scores: dict[ModuleRef, float], k: int, allowed: set[ModuleRef] | None = None) -> list[ModuleRef]:
    """The k highest-scoring modules (ties broken by name), among `allowed` if given."""
    pool = [(r, s) for r, s in scores.items() if allowed is None or r in allowed]
    if not 1 <= k <= len(pool):
        raise InvalidArgument(f"K must be between 1 and {len(pool)} (the compatible modules), got {k}")
    return [r for r, _ in sorted(pool, key=lambda kv: (-kv[1], kv[0]))[:k]]


def by_pattern(refs: list[ModuleRef], patterns: str | list[str]) -> list[ModuleRef]:
    """Modules whose name matches any glob pattern, e.g. 'layers.*.mlp.*'."""
    pats = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    chosen = [r for r in sorted(refs) if any(fnmatch.fnmatchcase(str(r), p) for p in pats)]
    if not chosen:
        raise InvalidArgument(f"no module matches {', '.join(pats)}; `transplant inspect MODEL` lists the names")
    return chosen


def random_k(refs: list[ModuleRef], k: int, seed: int) -> list[ModuleRef]:
    """K modules drawn uniformly: the control the paper lacks."""
    if not 1 <= k <= len(refs):
        raise InvalidArgument(f"K must be between 1 and {len(refs)}, got {k}")
    return sorted(random.Random(seed).sample(sorted(refs), k))
