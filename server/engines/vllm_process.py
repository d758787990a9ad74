"""The vLLM engine's environment and its child processes: they die with the server, even
on kill -9 and from the first moment of start-up (forked with a parent-death signal)."""
from __future__ import annotations

import os
import signal
import sys

_PDEATHSIG: dict = {"prctl": None, "forker": 0}


def _before_fork() -> None:
    _PDEATHSIG["forker"] = os.getpid()


def _die_with_us() -> None:
    """In a child forked by this process (vLLM's engine core) or by one of its children: SIGKILL
    when the thread that forked it ends, so kill -9 of the server (or a stop during start-up)
    frees the memory at once, down the whole tree. prctl was resolved before the fork: nothing
    is loaded in the child. (Spawned children exec and run no fork hooks: vllm_worker watches.)"""
    if _PDEATHSIG["prctl"](1, signal.SIGKILL) != 0:     # PR_SET_PDEATHSIG
        return
    if os.getppid() != _PDEATHSIG["forker"]:          # the parent died before prctl took effect
        os._exit(1)


def _arm_parent_death_signal() -> None:
    if _PDEATHSIG["prctl"] is not None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        _PDEATHSIG["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):      # no prctl: vllm_worker's watch remains
        return
    os.register_at_fork(before=_before_fork, after_in_child=_die_with_us)


def _env(spec) -> None:
    os.environ["TRANSPLANT_SERVER_PID"] = str(os.getpid())    # vllm_worker: die with the server
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")   # vLLM's default on CPU; forks run the hook
    _arm_parent_death_signal()
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")        # else vLLM picks a non-loopback address
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")   # partial reloads log a warning per layer
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
