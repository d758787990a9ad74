"""The rollout policy, as pure decisions over what the fleet log and the replicas'
reports say (no etcd, no threads: the agent acts on them, any replica may).

A transplant appended to the log names its canaries (the first replicas by name among
those reporting, a count or a fraction of them). While its rollout is undecided only
the canaries install it. It is promoted, and the rest install it, once every canary
reports it live and a probe window has passed with none failing; a canary that cannot
install it (the guard refused it on that replica's probes, an object failed its
digest) fails the rollout, and the fleet reverts to the parent before any other
replica installs it. Reverts go to every replica at once: a rollback has no canary.

The canary phase has a deadline (canary_timeout_s from the record's creation, or from
the last re-pick): past it with canaries that never served the generation, the rollout
fails and the fleet reverts (`on_canary_timeout: revert`, the default: a canary that
hangs may be hung by the change), or the stuck canaries are replaced by replicas heard
from recently (`repick`; none left: revert). It never waits forever, and canaries are
only ever picked among replicas heard from recently (not merely with a live lease)."""
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


def canaries_of(rec: dict, picks: dict[int, dict] | None = None) -> list[str]:
    """The canaries now: the newest re-pick's, else the record's own."""
    p = (picks or {}).get(int(rec["id"]))
    return list(p["canaries"]) if p else list((rec.get("rollout") or {}).get("canaries", []))


def phase(rec: dict, decided: dict[int, dict]) -> str:
    """canary, promoted, failed, or none (a revert, or a transplant without canaries)."""
    if rec.get("kind") != "transplant" or not (rec.get("rollout") or {}).get("canaries"):
        return "none"
    d = decided.get(int(rec["id"]))
    return d["phase"] if d else "canary"


def installable(rec: dict, me: str, head: int, decided: dict[int, dict], picks: dict[int, dict] | None = None) -> bool:
    """May this replica make `rec` live now?"""
    if rec.get("kind") == "load":
        return False
    p = phase(rec, decided)
    if p in ("none", ROLLOUT_PROMOTED):
        return True
    if p == ROLLOUT_FAILED:
        return False
    return int(rec["id"]) == head and me in canaries_of(rec, picks)


def target(records: dict[int, dict], live: int, me: str, decided: dict[int, dict],
           picks: dict[int, dict] | None = None, unbuildable: set[int] = frozenset()) -> int | None:
    """The newest record after `live` this replica may install (older ones it never
    installed are skipped: superseded before they reached it), passing over those it
    cannot build now (`unbuildable`: an object missing from the store; the newest it can
    verify instead, until the object is back)."""
    head = max(records) if records else live
    for i in sorted((i for i in records if i > live), reverse=True):
        if i not in unbuildable and i not in reverted(records, decided) and \
                installable(records[i], me, head, decided, picks):
            return i
    return None


def reverted(records: dict[int, dict], decided: dict[int, dict]) -> set[int]:
    """Generations the fleet took back: a revert's parent, a failed rollout. None of them
    is ever installed again as itself (a later revert to one is a new generation)."""
    out = {int(r["parent"]) for r in records.values() if r.get("kind") == "revert" and r.get("parent") is not None}
    return out | {g for g, d in decided.items() if d.get("phase") == ROLLOUT_FAILED}


@dataclass
class Verdict:
    action: str                       # wait, promote, fail, timeout
    why: str = ""
    waiting_for: list[str] = field(default_factory=list)
    failed: str = ""                  # the canary that failed


def judge(rec: dict, replicas: dict[str, dict], all_live_since: float | None, now: float, window_s: float,
          picks: dict[int, dict] | None = None, wall: float | None = None, deadline_s: float | None = None) -> Verdict:
    """The canary phase of head transplant `rec`, from the replicas' reports. `wall`
    (time.time()) and `deadline_s`: past the deadline with a canary that never served
    it, "timeout"."""
    gen = int(rec["id"])
    canaries = canaries_of(rec, picks)
    for name in canaries:
        err = (replicas.get(name) or {}).get("error") or {}
        if err.get("generation") == gen and not err.get("retryable"):   # a verdict, not a passing error
            return Verdict("fail", f"canary {name} could not install generation {gen}: {err.get('message', '')}",
                           failed=name)
    waiting = [n for n in canaries if (replicas.get(n) or {}).get("live") != gen]
    if waiting:
        since = ((picks or {}).get(gen) or {}).get("since") or rec.get("created") or 0.0
        if deadline_s is not None and wall is not None and since and wall - since > deadline_s:
            return Verdict("timeout", f"canar{'ies' if len(waiting) > 1 else 'y'} {', '.join(waiting)} did not serve "
                                      f"generation {gen} within the {deadline_s:g} s canary deadline", waiting)
        return Verdict("wait", f"waiting for canaries {', '.join(waiting)} to serve generation {gen}", waiting)
    if all_live_since is None or now - all_live_since < window_s:
        left = window_s if all_live_since is None else window_s - (now - all_live_since)
        return Verdict("wait", f"probe window: {max(left, 0):.1f} s left before the other replicas install it")
    return Verdict("promote", f"every canary ({', '.join(canaries)}) served generation {gen} for the "
                              f"{window_s:g} s probe window")


def replace_stuck(canaries: list[str], stuck: list[str], fresh: list[str], count: float,
                  tried: list[str] = ()) -> list[str] | None:
    """New canaries after a deadline: the ones that served it, and replicas heard from
    recently that were never canaries of it before (`tried`: every round's), as many as
    before; None when there are none left to take (the rollout then fails)."""
    keep = [n for n in canaries if n not in stuck]
    spare = [n for n in sorted(fresh) if n not in canaries and n not in tried]
    want = max(len(canaries), len(pick_canaries(count, fresh))) - len(keep)
    if not spare or want <= 0:
        return None
    return keep + spare[:want]
