"""Soak: 1,000 transplant and revert cycles under light load. Targets: resident memory
growth at most 5%, journal and snapshot growth as the design says, no error.

    python -m bench.soak                  # tiny model, 1,000 cycles, 2 clients: ~2 min
    python -m bench.soak --quick          # 20 cycles, seconds
    python -m bench.soak --preset small --cycles 200

Growth is measured from the end of a warm-up (10% of the cycles) to the end. The
runtime stores each distinct tensor once (content-addressed), so after the first cycle
a transplant of the same modules and its revert write nothing but two journal lines:
the expected tensor bytes per cycle are 0. Swap latency drift (last 10% of cycles
against the first 10%) shows whether history slows swaps down.
"""
from __future__ import annotations

import gc
import time

from . import common as C

PROG = "soak"


def run(args) -> C.Result:
    m = C.models(args)
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, {args.cycles} cycles of K={args.k}, "
                                               f"{args.clients} clients of light load")
    errors: list[str] = []
    swap_s: list[float] = []
    with C.serving(m, max_batch_size=max(args.clients, 1)) as (server, client):
        gens = server.runtime.gens
        modules = C.pick_modules(server.runtime.table, args.k)
        nbytes = C.module_bytes(server.runtime.table, modules)
        load = C.Load(server.grpc_port, args.clients, args.max_new_tokens, C.prompts(32)).ready().go() \
            if args.clients else None
        warm = max(1, args.cycles // 10)
        marks = {}
        t0 = time.perf_counter()
        for i in range(args.cycles + 1):
            if i == warm or i == args.cycles:
                gc.collect()
                marks[i] = {"rss": C.proc_status()["VmRSS"], "journal": gens.journal.path.stat().st_size,
                            "state": C.dir_bytes(gens.dir), "t": time.perf_counter() - t0}
            if i == args.cycles:
                break
            for kind, fn in (("transplant", lambda: client.transplant("donor", modules)), ("revert", client.revert)):
                s = time.perf_counter()
                try:
                    fn()
                    swap_s.append(time.perf_counter() - s)
                except Exception as e:  # noqa: BLE001 - errors are the result
                    errors.append(f"cycle {i} {kind}: {e}")
        out = load.stop() if load else {"records": []}
    failed = sum(not r["ok"] for r in out["records"])
    a, b = marks[warm], marks[args.cycles]
    n = args.cycles - warm
    res.add("RSS end / RSS after warm-up", "<= 1.05", [b["rss"] / a["rss"]])
    res.add("tensor bytes written per cycle / swapped bytes", "<= 0", [(b["state"] - b["journal"] - a["state"] + a["journal"])
                                                                 / n / nbytes], note="expected 0: tensors are stored once")
    res.add("errors (failed swaps + failed requests)", "<= 0", [float(len(errors) + failed)], unit="")
    tenth = max(1, len(swap_s) // 10)
    res.add("swap time, last 10% / first 10% of cycles", "report",
            [C.median(swap_s[-tenth:]) / C.median(swap_s[:tenth])])
    res.details.update({
        "swapped_bytes": nbytes, "journal_bytes_per_cycle": round((b["journal"] - a["journal"]) / n),
        "state_dir_MB_at_end": round(b["state"] / 1e6, 1), "rss_MB": [round(a["rss"] / 1e6), round(b["rss"] / 1e6)],
        "swap_ms_median": round(C.median(swap_s) * 1e3, 1), "requests_served": len(out["records"]),
        "seconds": round(b["t"], 1), "errors": errors[:5]})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__, preset="tiny")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.cycles = min(args.cycles, 20)
    return run(args)


if __name__ == "__main__":
    main()
