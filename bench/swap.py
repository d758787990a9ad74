"""Swap vs reload: transplant K modules into the live server (and revert them) against
the alternative operators use today, loading the whole new checkpoint from disk and
swapping the model in, and against the physical floor, a plain memory copy of the
same bytes. Targets: swap <= 1/20 of a reload and <= 3x the memory copy; same for revert.

    python -m bench.swap                  # 300M Llama, K=8, 5 paired repeats
    python -m bench.swap --quick          # tiny model, seconds

Swap and revert are timed end to end through the Admin RPC of a real in-process
server (validate, derive, copy, checksums, write-ahead tensor store, fsync, journal).
Reload is `from_pretrained` of the donor plus faulting in every weight page (so the
model is as resident as the live one); the donor file is in the page cache for both
sides, which favours reload. `--breakdown` also times each step of one swap.

A transplant is durable before it goes live, so besides the memory-copy floor the
table shows the floor of any write-ahead swap: copying the bytes plus writing them to
the state directory and fsyncing. Each timed transplant writes tensors the store has
not seen (the bench drops them between repeats); "already stored" repeats a
transplant whose tensors the store holds, which writes nothing.
"""
from __future__ import annotations

import gc
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from . import common as C

PROG = "swap"


def touch(model) -> None:
    """Fault in every page of every weight (one element per 4 KiB page)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            step = max(1, 4096 // flat.element_size())
            float(flat[::step].sum())


def reload(path: str) -> float:
    """Load the whole checkpoint from disk and make it the served model; seconds."""
    from transplant_core.checkpoint import load_model

    t0 = time.perf_counter()
    model, _tok, _path = load_model(path)
    touch(model)
    served = model            # "swapping the model in" is a pointer assignment
    dt = time.perf_counter() - t0
    del model, served
    gc.collect()
    return dt


def evict(path: str) -> None:
    """Drop a checkpoint's pages from the page cache (best effort: unmapped pages only)."""
    for f in Path(path).glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def module_tensors(server, names: list[str], donor_path: str) -> list:
    """The K modules' donor tensors, read into memory (the floors' source bytes)."""
    from transplant_core.checkpoint import CheckpointTensors
    from transplant_core.refs import ModuleRef

    table = server.runtime.table
    ck = CheckpointTensors(Path(donor_path))
    return [ck.get(k).clone() for n in names for k in table[ModuleRef.parse(n)].keys]


def copy_floor(server, names: list[str], donor_path: str, reps: int = 5) -> float:
    """Median seconds of a plain tensor copy of the K modules' bytes (in memory to in memory)."""
    import torch

    src = module_tensors(server, names, donor_path)
    dst = [torch.empty_like(s) for s in src]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        times.append(time.perf_counter() - t0)
    return C.median(times[1:])


def durable_floor(server, names: list[str], donor_path: str, reps: int = 3) -> float:
    """Median seconds to write the same bytes to a file in the state directory and fsync
    it: the floor of any swap that is durable before it goes live (write-ahead)."""
    import torch

    src = module_tensors(server, names, donor_path)
    path = Path(server.runtime.gens.dir) / ".bench-floor"
    times = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                for t in src:
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                f.flush()
                os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
            path.unlink()
    finally:
        path.unlink(missing_ok=True)
    return C.median(times)


@contextmanager
def phase_timers():
    """Inclusive seconds spent in each step of the swap path (patched in place, restored)."""
    import server.generations.journal as J
    import server.generations.live as G
    import server.generations.store as S
    from transplant_core import transplant as tp

    totals: dict[str, float] = defaultdict(float)
    targets = [(tp, "plan"), (tp, "_all_finite"), (tp, "derive"), (tp, "fork"), (tp, "commit"), (tp, "checksums"),
               (tp, "tensor_digest"), (S.TensorStore, "put"), (S, "write_tensor"),
               (G.Generations, "_load_overrides"), (G.Generations, "revert_plan"),
               (J.Journal, "append"), (os, "fsync"), (S, "fsync_dir"), (J, "fsync_dir")]
    saved = []
    for owner, attr in targets:
        orig = getattr(owner, attr, None)
        if orig is None:          # the runtime moved on: time what still exists
            continue
        label = f"{getattr(owner, '__name__', '?').rsplit('.', 1)[-1]}.{attr}"

        def wrapper(*a, _orig=orig, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                totals[_label] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)
        saved.append((owner, attr, orig))
    try:
        yield totals
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


def forget(server, gen: int) -> None:
    """Drop generation `gen`'s tensors from the store, so the next transplant of the same
    modules writes them again, as a transplant of a donor never seen before does (the
    store would otherwise find them already there and write nothing)."""
    gens = server.runtime.gens
    for digest in gens.records[gen].state.values():
        gens.store.path(digest).unlink(missing_ok=True)


def run(args) -> C.Result:
    m = C.models(args)
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, K={args.k}")
    swaps, again, reverts, reloads, floors, disk = [], [], [], [], [], []
    with C.serving(m) as (server, client):
        table = server.runtime.table
        names = C.pick_modules(table, args.k)
        nbytes = C.module_bytes(table, names)
        client.transplant("donor", names)          # warm-up: page cache, code paths
        client.revert()
        reload(m.donor)
        forget(server, server.runtime.gens.live.id - 1)
        for _ in range(args.repeats):
            swaps.append(C.seconds(lambda: client.transplant("donor", names)))   # writes K modules to the store
            reverts.append(C.seconds(client.revert))
            again.append(C.seconds(lambda: client.transplant("donor", names)))   # already stored: writes nothing
            client.revert()
            forget(server, server.runtime.gens.live.id - 1)
            reloads.append(C.in_thread(lambda: reload(m.donor)))
            floors.append(C.in_thread(lambda: copy_floor(server, names, m.donor)))
            disk.append(C.in_thread(lambda: durable_floor(server, names, m.donor)))
        breakdown = {}
        if args.breakdown:
            for kind, fn in (("transplant", lambda: client.transplant("donor", names)), ("revert", client.revert)):
                with phase_timers() as totals:
                    total = C.seconds(fn)
                breakdown[kind] = {"total_ms": round(total * 1e3, 1),
                                   **{k: round(v * 1e3, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}
        cold = None
        if args.cold:
            evict(m.donor)
            cold = reload(m.donor)
        gens = len(server.runtime.gens.records)
    res.add("swap / reload", "<= 0.05", [s / r for s, r in zip(swaps, reloads)])
    res.add("swap / memory copy", "<= 3", [s / f for s, f in zip(swaps, floors)])
    res.add("swap / (memory copy + write and fsync)", "(info)", [s / (f + d) for s, f, d in zip(swaps, floors, disk)])
    res.add("swap, tensors already stored / reload", "(info)", [s / r for s, r in zip(again, reloads)])
    res.add("swap, tensors already stored / memory copy", "(info)", [s / f for s, f in zip(again, floors)])
    res.add("revert / reload", "<= 0.05", [s / r for s, r in zip(reverts, reloads)])
    res.add("revert / memory copy", "<= 3", [s / f for s, f in zip(reverts, floors)])
    ms = lambda xs: [round(x * 1e3, 2) for x in xs]   # noqa: E731
    res.details.update({
        "modules": names, "bytes": nbytes, "swap_ms": ms(swaps), "swap_again_ms": ms(again), "revert_ms": ms(reverts),
        "reload_ms": ms(reloads), "memcpy_ms": ms(floors), "write_fsync_ms": ms(disk),
        "memcpy_GBps": round(nbytes / C.median(floors) / 1e9, 2), "generations_made": gens})
    if cold is not None:
        res.details["reload_cold_ms"] = round(cold * 1e3, 1)
    if breakdown:
        res.details["breakdown_ms (inclusive; digests nest in checksums, fsync in write/append)"] = breakdown
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.add_argument("--k", type=int, default=8, help="modules per transplant (default 8)")
    ap.add_argument("--breakdown", action="store_true", help="also time each step of one transplant and revert")
    ap.add_argument("--cold", action="store_true", help="also time one reload with the donor evicted from the page cache")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return run(args)


if __name__ == "__main__":
    main()
