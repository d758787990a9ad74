"""Memory: resident memory added by registering a donor (target: at most 10% of its
weight bytes until used), and the peak added by a transplant (target: at most 3x the
transplanted bytes).

    python -m bench.memory                # 300M Llama, K=8, 3 repeats
    python -m bench.memory --quick        # tiny model, seconds (figures meaningless there)

Readings are this process's /proc/self/status (the server runs in it): VmRSS before and
after, and VmHWM reset just before the operation (clear_refs) for the peak. File-backed
pages of memory-mapped checkpoints count (they are resident); a 1 ms sampler of RssAnon
gives the anonymous part separately. The benchmark re-executes itself with
MALLOC_MMAP_THRESHOLD_ set, so glibc returns every freed large block to the system at
once: otherwise freed tensors stay in the heap, later swaps reuse them, and RSS
under-reports what a swap allocates.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

from . import common as C

PROG = "memory"


class AnonPeak:
    """Samples RssAnon every millisecond on a thread; .peak once stopped."""

    def __enter__(self) -> "AnonPeak":
        self.peak, self._stop = C.proc_status()["RssAnon"], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, C.proc_status()["RssAnon"])
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def measured(fn) -> dict:
    """Run fn; resident bytes before, after, peak (VmHWM) and anonymous peak."""
    gc.collect()
    before = C.proc_status()
    can_peak = C.reset_peak()
    with AnonPeak() as anon:
        fn()
    after = C.proc_status()
    gc.collect()
    settled = C.proc_status()
    return {"rss_before": before["VmRSS"], "rss_after": settled["VmRSS"],
            "peak": after["VmHWM"] if can_peak else max(before["VmRSS"], after["VmRSS"]),
            "anon_before": before["RssAnon"], "anon_peak": anon.peak, "peak_exact": can_peak}


def run(args) -> C.Result:
    from transplant_core.checkpoint import Checkpoint

    m = C.models(args)
    weight_bytes = Checkpoint.open(m.donor).weight_bytes
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, donor weights {weight_bytes / 1e6:.0f} MB, K={args.k}")
    reg, reg_anon, peak, peak_anon, steady = [], [], [], [], []
    with C.serving(m, donor_name=None) as (server, client):
        modules = C.pick_modules(server.runtime.table, args.k)
        nbytes = C.module_bytes(server.runtime.table, modules)
        for i in range(args.repeats):
            r = measured(lambda: client.admin("RegisterDonor", client.A.RegisterDonorRequest(
                name=f"donor{i}" if i else "donor", path=m.donor)))
            reg.append((r["rss_after"] - r["rss_before"]) / weight_bytes)
            reg_anon.append((r["anon_peak"] - r["anon_before"]) / weight_bytes)
        client.transplant("donor", modules)          # warm-up: allocator pools, code paths
        client.revert()
        for _ in range(args.repeats):
            for fn in (lambda: client.transplant("donor", modules), client.revert):
                r = measured(fn)
                peak.append((r["peak"] - r["rss_before"]) / nbytes)
                peak_anon.append((r["anon_peak"] - r["anon_before"]) / nbytes)
                steady.append((r["rss_after"] - r["rss_before"]) / nbytes)
        res.details["peak_exact"] = r["peak_exact"]
    res.add("donor registration RSS / donor weight bytes", "<= 0.1", reg)
    res.add("transplant+revert peak RSS / swapped bytes", "<= 3", peak)
    res.add("  same, anonymous memory only (sampled)", "report", peak_anon)
    res.add("  RSS left after each swap / swapped bytes", "report", steady)
    res.details.update({"swapped_bytes": nbytes, "donor_weight_bytes": weight_bytes, "modules": modules,
                        "registration_anon_peak / weights": [round(x, 4) for x in reg_anon]})
    return C.emit(res, args)


MMAP_THRESHOLD = "65536"


def main(argv=None) -> C.Result:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD and argv is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD      # read by glibc at start-up only
        os.execv(sys.executable, [sys.executable, "-m", "bench.memory", *sys.argv[1:]])
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return run(args)


if __name__ == "__main__":
    main()
