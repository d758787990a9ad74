"""The alert policy, written once for a standalone server and a fleet: a firing rollback
alert reverts the generation it names to its parent, once, and only while that
generation is the head (the live one; a fleet's newest). Everything else changes
nothing and says why."""
from __future__ import annotations


def _get(rec, key: str):
    return rec.get(key) if isinstance(rec, dict) else getattr(rec, key)


def refusal(gen: int, head: int, records: dict, not_head: str) -> str | None:
    """Why an alert for generation `gen` changes nothing (`not_head`: said when `gen` is not
    the head), or None: revert it to its parent. `records`: id -> Record or log dict."""
    if gen != head:
        return not_head
    if any(_get(r, "kind") == "revert" and _get(r, "parent") == gen
           and (_get(r, "selection") or {}).get("why") == "alert" for r in records.values()):
        return f"generation {gen} was already reverted for an alert"
    if _get(records[gen], "parent") is None:
        return "generation 0 is the model as loaded: nothing to revert to"
    return None
