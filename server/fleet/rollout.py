"""The rollout policy, as pure decisions over what the fleet log and the replicas'
reports say (no etcd, no threads: the agent acts on them, any replica may).

A transplant appended to the log names its canaries (the first replicas by name among
those reporting, a count or a fraction of them). While its rollout is undecided only
the canaries install it. It is promoted, and the rest install it, once every canary
reports it live and a probe window has passed with none failing; a canary that cannot
install it (the guard refused it on that replica's probes, an object failed its
digest) fails the rollout, and the fleet reverts to the parent before any other
replica installs it. Reverts go to every replica at once: a rollback has no canary."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .log import ROLLOUT_FAILED, ROLLOUT_PROMOTED


def pick_canaries(canaries: float, alive: list[str], origin: str = "") -> list[str]:
    """`canaries` >= 1: that many replicas; 0 < canaries < 1: that fraction of the replicas
    reporting (rounded up); 0: none (every replica installs at once). The first by name,
    so an operator can tell which they will be."""
    names = sorted(set(alive) | ({origin} if origin else set()))
    n = int(canaries) if canaries >= 1 else math.ceil(canaries * len(names))
    return names[:min(n, len(names))]


def phase(rec: dict, decided: dict[int, dict]) -> str:
    """canary, promoted, failed, or none (a revert, or a transplant without canaries)."""
    if rec.get("kind") != "transplant" or not (rec.get("rollout") or {}).get("canaries"):
        return "none"
    d = decided.get(int(rec["id"]))
    return d["phase"] if d else "canary"


def installable(rec: dict, me: str, head: int, decided: dict[int, dict]) -> bool:
    """May this replica make `rec` live now?"""
    if rec.get("kind") == "load":
        return False
    p = phase(rec, decided)
    if p in ("none", ROLLOUT_PROMOTED):
        return True
    if p == ROLLOUT_FAILED:
        return False
    return int(rec["id"]) == head and me in rec["rollout"]["canaries"]


def target(records: dict[int, dict], live: int, me: str, decided: dict[int, dict]) -> int | None:
    """The newest record after `live` this replica may install (older ones it never
    installed are skipped: superseded before they reached it)."""
    head = max(records) if records else live
    for i in sorted((i for i in records if i > live), reverse=True):
        if installable(records[i], me, head, decided):
            return i
    return None


@dataclass
class Verdict:
    action: str                       # wait, promote, fail
    why: str = ""
    waiting_for: list[str] = field(default_factory=list)
    failed: str = ""                  # the canary that failed


def judge(rec: dict, replicas: dict[str, dict], all_live_since: float | None, now: float, window_s: float) -> Verdict:
    """The canary phase of head transplant `rec`, from the replicas' reports."""
    gen = int(rec["id"])
    canaries = rec["rollout"]["canaries"]
    for name in canaries:
        err = (replicas.get(name) or {}).get("error") or {}
        if err.get("generation") == gen and not err.get("retryable"):   # a verdict, not a passing error
            return Verdict("fail", f"canary {name} could not install generation {gen}: {err.get('message', '')}",
                           failed=name)
    waiting = [n for n in canaries if (replicas.get(n) or {}).get("live") != gen]
    if waiting:
        return Verdict("wait", f"waiting for canaries {', '.join(waiting)} to serve generation {gen}", waiting)
    if all_live_since is None or now - all_live_since < window_s:
        left = window_s if all_live_since is None else window_s - (now - all_live_since)
        return Verdict("wait", f"probe window: {max(left, 0):.1f} s left before the other replicas install it")
    return Verdict("promote", f"every canary ({', '.join(canaries)}) served generation {gen} for the "
                              f"{window_s:g} s probe window")
