"""Swaps under load: p50 and p99 request latency with 16 clients while a transplant and
a revert run every second, against the same load without swaps. Target: p99 at most
1.25x, zero failed requests.

    python -m bench.swap_load             # 300M Llama, 16 clients, 2 x (30 s quiet, 30 s swapping)
    python -m bench.swap_load --quick     # tiny model, seconds

Quiet and swapping windows alternate (quiet, swapping, quiet, swapping, ...) and each
swapping window is compared with the quiet window just before it. Swaps go through the
Admin RPC (K=8 modules); one starts every half second (transplant, revert, transplant,
...), or back to back when one takes longer than that (the achieved rate is printed).
"""
from __future__ import annotations

import threading
import time

from . import common as C

PROG = "swap_load"


class Swapper:
    """Alternates transplant and revert every `period` seconds on its own thread."""

    def __init__(self, client, modules: list[str], period: float):
        self.client, self.modules, self.period = client, modules, period
        self.stop = threading.Event()
        self.times: list[float] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="swapper", daemon=True)

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            live = self.client.admin("GetStatus", self.client.A.GetStatusRequest()).live_generation
            kind = "transplant" if live % 2 == 0 else "revert"     # even: loaded weights (0, 2, 4, ...)
            t0 = time.perf_counter()
            try:
                self.client.transplant("donor", self.modules) if kind == "transplant" else self.client.revert()
                self.times.append(time.perf_counter() - t0)
            except Exception as e:   # noqa: BLE001 - a failed swap is a result to report
                self.errors.append(f"{kind}: {e}")
            nxt += self.period
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> "Swapper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def latencies(out: dict) -> tuple[list[float], int, set]:
    recs = out["records"]
    return ([r["latency"] for r in recs if r["ok"]], sum(not r["ok"] for r in recs),
            {r.get("generation") for r in recs if r["ok"]})


def run(args) -> C.Result:
    m = C.models(args)
    ps = C.prompts(64)
    res = C.Result(PROG, C.command_line(PROG),
                   f"{m.label}, {args.clients} clients x {args.max_new_tokens} tokens, windows of {args.duration:g} s, "
                   f"a swap every {args.period:g} s")
    p50, p99, failed, swap_ms, swap_err, gens_seen, counts = [], [], 0, [], [], set(), []
    with C.serving(m, max_batch_size=args.clients) as (server, client):
        modules = C.pick_modules(server.runtime.table, args.k)
        client.transplant("donor", modules)
        client.revert()                               # warm-up of the swap path; live is now 2 (even)
        for _ in range(args.repeats):
            quiet = C.run_load(server.grpc_port, args.clients, args.max_new_tokens, ps, duration=args.duration)
            sw = Swapper(client, modules, args.period)
            busy = C.run_load(server.grpc_port, args.clients, args.max_new_tokens, ps, duration=args.duration,
                              during=sw.__enter__)
            sw.__exit__(None, None, None)
            (lq, fq, _), (lb, fb, gb) = latencies(quiet), latencies(busy)
            failed += fq + fb
            gens_seen |= gb
            swap_ms += [round(t * 1e3, 1) for t in sw.times]
            swap_err += sw.errors
            counts.append({"quiet_requests": len(lq), "swapping_requests": len(lb), "swaps": len(sw.times)})
            p50.append(C.percentile(lb, 50) / C.percentile(lq, 50))
            p99.append(C.percentile(lb, 99) / C.percentile(lq, 99))
            res.details.setdefault("quiet_p50_p99_s", []).append([round(C.percentile(lq, q), 3) for q in (50, 99)])
            res.details.setdefault("swapping_p50_p99_s", []).append([round(C.percentile(lb, q), 3) for q in (50, 99)])
    res.add("p99 swapping / p99 quiet", "<= 1.25", p99)
    res.add("p50 swapping / p50 quiet", "report", p50)
    res.add("failed requests (count)", "<= 0", [float(failed)], unit="")
    window = args.duration * args.repeats
    res.details.update({"windows": counts, "swaps_per_s": round(len(swap_ms) / window, 2),
                        "swap_ms_median": C.median(swap_ms), "swap_ms_max": max(swap_ms, default=0),
                        "swap_errors": swap_err[:5], "generations_served_while_swapping": len(gens_seen)})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--period", type=float, default=0.5, help="seconds between swap starts (default: 2 per second)")
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.duration = 1, min(args.duration, 3.0)
    return run(args)


if __name__ == "__main__":
    main()
