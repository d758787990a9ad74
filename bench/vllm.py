"""The vLLM engine (`engine: vllm`), three comparisons in one run:

1. swap vs new engine: a K=8 transplant (and its revert) through the running vLLM
   server's Admin RPC against what an operator would do without transplant: start a
   fresh vLLM AsyncLLM on a checkpoint with those modules merged in (written once by
   `transplant apply`), timed from `AsyncLLM.from_engine_args` to the first token of one
   request. Target: swap (and revert) <= 1/20 of the new engine.
2. drain vs freeze under 16 closed-loop clients: the wall time of each Admin
   Transplant/Revert (and the swap_seconds the server reports) with
   `vllm.swap_policy: drain` (a swap waits for running requests) and `freeze` (it pauses
   them in place); p50 and p99 of each, and their ratio drain / freeze. Reported.
3. tokens/s of the vLLM engine vs the embedded engine, 1 and 16 clients, the same
   prompts, greedy, a fixed max_new_tokens. Reported.

    python -m bench.vllm                  # 300M Llama, float32 (~10-15 min on 2 busy cores)
    python -m bench.vllm --quick          # small model, 3M (~3 min: two vLLM engine starts dominate)

Needs vLLM (`bash deploy/setup.sh --vllm`). `--quick` runs on the small preset, not tiny:
vLLM's CPU attention has no kernel for tiny's head_dim of 16 (the engine dies on the
first request). Only one vLLM engine runs at a time: the
vLLM server (parts 1-3) is stopped before the new engines start (part 1's other side),
so the two sides of part 1 are measured minutes apart and paired by repeat index. The
embedded server of part 3 runs beside the vLLM server (in-process; idle while the vLLM
side is measured and vice versa); 1-client and 16-client windows alternate between the
two engines, paired per repeat. Clients are `bench.loadgen` in its own process.

Part 1: each timed transplant writes tensors the store has not seen (as in bench.swap);
vLLM receives every changed module with the rest of its fused group (q/k/v, gate/up),
so more bytes cross to the engine than the K modules hold (both figures are printed).
The new engine starts in this process, where vLLM is already imported (its engine
process imports it afresh), from a checkpoint in the page cache: both favour it.
Part 2: both policies run on the one engine, the policy switched between windows (the
engine reads it at each swap), drain and freeze windows alternating; in each window
swaps alternate transplant/revert of the same K modules (stored tensors after the first)
at random gaps, so they land at random points of the clients' requests. p99 is
nearest-rank: with few swaps per window it is their maximum.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from . import common as C

PROG = "vllm"
QUICK_PRESET = "small"      # not tiny: vLLM's CPU attention has no kernel for head_dim 16


# ---- the merged checkpoint and a fresh engine ----------------------------------------------

def merged_dir(args, m, name: str):
    """Where a benchmark keeps its merged checkpoint: beside the preset, or (for --target /
    --donor) under the bench root, tagged by the pair."""
    if args.target or args.donor:
        import hashlib

        tag = hashlib.sha256(f"{m.target}\0{m.donor}".encode()).hexdigest()[:12]
        return C.bench_setup.bench_root() / f"{name}-{tag}"
    return C.bench_setup.preset_dir(args.preset) / name


def merged_checkpoint(m: C.Models, names: list[str], out: Path) -> tuple[Path, bool]:
    """The target with `names` from the donor merged in, written by `transplant apply` in
    its own process; reused when `out` already holds the same merge. (path, reused)."""
    manifest = out / "transplant_manifest.json"
    if manifest.is_file() and (out / "model.safetensors").is_file():
        doc = json.loads(manifest.read_text())
        if doc.get("target") == m.target and doc.get("donor") == m.donor and \
                sorted(x["name"] for x in doc.get("modules", [])) == sorted(names) and doc.get("alpha") == 1.0:
            return out, True
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "server.cli", "apply", "--target", m.target, "--donor", m.donor,
                    "--modules", ",".join(names), "--out", str(out), "--force"],
                   check=True, cwd=root, env=env, stdout=subprocess.DEVNULL)
    return out, False


def new_engine(path: Path, spec, max_num_seqs: int, prompt: str) -> dict:
    """Start a plain vLLM AsyncLLM on `path` with the server's engine arguments, send one
    greedy request, shut it down. Seconds from from_engine_args to: the engine object
    (ready_s), the first token (first_token_s); then shutdown_s (not part of the figure)."""
    import asyncio

    from server.engines.vllm import _env

    _env(spec)

    async def go() -> dict:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=str(path), dtype=spec.dtype, max_model_len=spec.max_model_len,
                               enforce_eager=spec.enforce_eager, gpu_memory_utilization=spec.memory_fraction,
                               max_num_seqs=max_num_seqs, disable_log_stats=True, seed=0)
        t0 = time.perf_counter()
        engine = AsyncLLM.from_engine_args(args)
        ready = time.perf_counter() - t0
        first = None
        try:
            async for out in engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                             request_id="bench-first-token"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - t0
        finally:
            t1 = time.perf_counter()
            engine.shutdown()
            down = time.perf_counter() - t1
        if first is None:
            raise RuntimeError("the new engine produced no token")
        return {"ready_s": ready, "first_token_s": first, "shutdown_s": down}

    return C.in_thread(lambda: asyncio.run(go()))


def engine_processes() -> list[int]:
    """Pids of vLLM engine processes among this process's descendants."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def wait_engines_gone(timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := engine_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# ---- swaps -----------------------------------------------------------------------------------

class Swaps:
    """Alternating transplant/revert of the same modules through the Admin RPC, timed."""

    def __init__(self, client, names: list[str]):
        self.client, self.names = client, names
        self.transplanted = False

    def one(self) -> dict:
        kind = "revert" if self.transplanted else "transplant"
        t0 = time.perf_counter()
        r = self.client.revert() if self.transplanted else self.client.transplant("donor", self.names)
        wall = time.perf_counter() - t0
        self.transplanted = not self.transplanted
        return {"kind": kind, "wall": wall, "server": r.swap_seconds, "generation": r.generation.id}

    def back_to_target(self) -> None:
        if self.transplanted:
            self.one()


@contextmanager
def timed_steps():
    """Inclusive seconds in each step of a vLLM swap (patched in place, restored)."""
    import functools
    import inspect

    import server.generations as G
    from server.engines import vllm as V

    totals: dict[str, float] = defaultdict(float)
    targets = [(G.Generations, "prepare"), (G.Generations, "stage"), (G.Generations, "commit"),
               (V.VllmEngine, "sources"), (V.VllmEngine, "_tensors"), (V.VllmEngine, "_hold"),
               (V.VllmEngine, "_load"), (V.VllmEngine, "_label"), (V.VllmEngine, "_release")]
    saved = []
    for owner, attr in targets:
        orig = getattr(owner, attr, None)
        if orig is None:
            continue
        label = f"{owner.__name__}.{attr}"
        if inspect.iscoroutinefunction(orig):
            async def wrapper(*a, _orig=orig, _label=label, **kw):
                t0 = time.perf_counter()
                try:
                    return await _orig(*a, **kw)
                finally:
                    totals[_label] += time.perf_counter() - t0
        else:
            def wrapper(*a, _orig=orig, _label=label, **kw):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    totals[_label] += time.perf_counter() - t0
        setattr(owner, attr, functools.wraps(orig)(wrapper))
        saved.append((owner, attr, orig))
    try:
        yield totals
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


def under_load(server, swaps: Swaps, clients: int, max_new_tokens: int, prompts: list[str], n: int,
               gap: float, rng: random.Random) -> tuple[list[dict], dict]:
    """n swaps at random gaps (uniform 0.5-1.5 x gap) while `clients` closed-loop clients
    generate; (swap records, load records)."""
    load = C.Load(server.grpc_port, clients, max_new_tokens, prompts).ready().go()
    recs = []
    try:
        time.sleep(gap * rng.uniform(0.5, 1.5))
        for _ in range(n):
            recs.append(swaps.one())
            time.sleep(gap * rng.uniform(0.5, 1.5))
        swaps.back_to_target()       # inside the window: a transplant left behind is reverted under load too
    finally:
        out = load.stop()
    return recs, out


def set_policy(server, policy: str) -> None:
    eng = server.runtime.scheduler
    eng.spec = eng.spec.model_copy(update={"swap_policy": policy})


# ---- tokens/s --------------------------------------------------------------------------------

def tokens_per_s(server, clients: int, prompts: list[str], max_new_tokens: int) -> dict:
    """One client: every prompt once; more: each client sends >= 2 requests (the prompts
    in rounds), as bench.throughput does."""
    rounds = 1 if clients == 1 else max(1, -(-2 * clients // len(prompts)))
    out = C.run_load(server.grpc_port, clients, max_new_tokens, prompts, requests=rounds * len(prompts))
    recs = out["records"]
    tokens = sum(r["tokens"] for r in recs)
    return {"tok_s": tokens / out["wall"], "tokens": tokens, "seconds": out["wall"],
            "failed": sum(not r["ok"] for r in recs)}


# ---- the run ---------------------------------------------------------------------------------

def check_context(server, prompts: list[str], max_new_tokens: int) -> int:
    """vLLM's max_model_len (the model's max_position_embeddings unless configured) must
    hold the longest prompt plus max_new_tokens; returns the limit."""
    limit = server.runtime.scheduler.engine.model_config.max_model_len
    tok = server.runtime.tokenizer
    longest = max(len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts)
    if longest + max_new_tokens > limit:
        raise SystemExit(f"prompts of up to {longest} tokens + max_new_tokens {max_new_tokens} exceed the "
                         f"model's max_model_len {limit}")
    return limit


def run(args) -> C.Result:
    if args.quick and not (args.target or args.donor):
        # vLLM's CPU attention has no kernel for the tiny preset's head_dim of 16
        args = argparse.Namespace(**{**vars(args), "quick": False, "preset": QUICK_PRESET})
    m = C.models(args)
    ps = C.prompts(args.requests)
    rng = random.Random(args.seed)
    res = C.Result(PROG, C.command_line(PROG),
                   f"{m.label}, K={args.k}, vllm dtype {args.dtype}; load: {args.clients} clients x "
                   f"{args.max_new_tokens} tokens, {args.swaps} swaps per window; tok/s: {len(ps)} prompts x "
                   f"{args.tokens} tokens")
    vllm_cfg = {"swap_policy": "drain", "dtype": args.dtype}
    batch = max(args.clients, 16)
    swap, revert, swap_srv, revert_srv = [], [], [], []
    windows: dict[str, list[list[dict]]] = {"drain": [], "freeze": []}
    lat: dict[str, list[float]] = {"drain": [], "freeze": []}
    failed = {"drain": 0, "freeze": 0, "tok_s": 0}
    tps: dict[str, dict[int, list[float]]] = {e: {c: [] for c in args.tps_clients} for e in ("vllm", "embedded")}
    token_counts: dict[str, list] = defaultdict(list)
    details: dict = {}
    t_start = time.perf_counter()
    with C.serving(m, max_batch_size=batch) as (emb, _emb_client), \
            C.serving(m, engine="vllm", max_batch_size=batch, vllm=vllm_cfg) as (vs, vc):
        details["server_start_s"] = round(time.perf_counter() - t_start, 1)
        assert type(vs.runtime.scheduler).__name__ == "VllmEngine", "the vLLM server did not get the vLLM engine"
        table = vs.runtime.table
        names = C.pick_modules(table, args.k)
        from server.engines.vllm import complete_groups
        from transplant_core.refs import ModuleRef

        sent = [str(r) for r in complete_groups(table, [ModuleRef.parse(n) for n in names])]
        details.update({"modules": names, "bytes": C.module_bytes(table, names),
                        "modules_sent_to_vllm": len(sent), "bytes_sent_to_vllm": C.module_bytes(table, sent),
                        "max_model_len": check_context(vs, ps, max(args.max_new_tokens, args.tokens))})
        from .swap import forget

        # -- part 1, the swap side: idle server, tensors new to the store each time
        sw = Swaps(vc, names)
        sw.one(), sw.one()                                     # warm-up
        forget(vs, vs.runtime.gens.live.id - 1)
        for _ in range(args.repeats):
            a, b = sw.one(), sw.one()
            swap.append(a["wall"]), swap_srv.append(a["server"])
            revert.append(b["wall"]), revert_srv.append(b["server"])
            forget(vs, vs.runtime.gens.live.id - 1)
        if args.breakdown:
            steps = {}
            for kind in ("transplant", "revert"):
                with timed_steps() as totals:
                    total = sw.one()["wall"]
                steps[kind] = {"total_ms": round(total * 1e3, 1),
                               **{k: round(v * 1e3, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}}
            details["breakdown_ms (inclusive)"] = steps

        # -- part 2: drain vs freeze, alternating windows on the one engine; the tensors are
        # stored first (one transplant + revert), so no window's first swap writes them
        sw.one(), sw.one()
        for w in range(args.windows):
            for policy in (("drain", "freeze") if w % 2 == 0 else ("freeze", "drain")):
                set_policy(vs, policy)
                recs, out = under_load(vs, sw, args.clients, args.max_new_tokens, ps, args.swaps, args.gap, rng)
                windows[policy].append(recs)
                lat[policy] += [r["latency"] for r in out["records"] if r["ok"]]
                failed[policy] += sum(not r["ok"] for r in out["records"])
        set_policy(vs, "drain")

        # -- part 3: tokens/s, vLLM vs embedded, alternating engines per level
        for rep in range(args.tps_repeats):
            for c in args.tps_clients:
                order = (("vllm", vs), ("embedded", emb)) if rep % 2 == 0 else (("embedded", emb), ("vllm", vs))
                for eng, srv in order:
                    r = tokens_per_s(srv, c, ps, args.tokens)
                    tps[eng][c].append(r["tok_s"])
                    token_counts[f"{eng}_c{c}"].append(r["tokens"])
                    failed["tok_s"] += r["failed"]
        details["vllm_engine_processes_while_serving"] = len(engine_processes())

    left = wait_engines_gone()
    if left:
        raise RuntimeError(f"vLLM engine processes {left} outlived the server")

    # -- part 1, the other side: one vLLM engine at a time, so after the server stopped
    spec = vs.cfg.vllm
    t0 = time.perf_counter()
    merged, reused = merged_checkpoint(m, names, merged_dir(args, m, f"merged-k{args.k}"))
    details["merged_checkpoint"] = {"path": str(merged), "reused": reused,
                                    "write_s": round(time.perf_counter() - t0, 1)}
    starts = []
    for _ in range(args.repeats):
        starts.append(new_engine(merged, spec, batch, ps[0]))
        left = wait_engines_gone()
        if left:
            raise RuntimeError(f"vLLM engine processes {left} outlived the new engine's shutdown")
    first = [s["first_token_s"] for s in starts]

    # -- figures
    res.add("vLLM swap / new engine (first token)", "<= 0.05", [s / f for s, f in zip(swap, first)])
    res.add("vLLM revert / new engine (first token)", "<= 0.05", [s / f for s, f in zip(revert, first)])
    walls = {p: [[r["wall"] for r in win] for win in windows[p]] for p in windows}
    srv = {p: [[r["server"] for r in win] for win in windows[p]] for p in windows}
    pooled = {p: [x for win in walls[p] for x in win] for p in walls}
    pooled_srv = {p: [x for win in srv[p] for x in win] for p in srv}
    for q in (50, 99):
        res.add(f"drain / freeze, swap wall p{q} ({args.clients} clients)", "report",
                [C.percentile(d, q) / C.percentile(f, q) for d, f in zip(walls["drain"], walls["freeze"])])
    for q in (50, 99):
        res.add(f"drain / freeze, server swap_seconds p{q}", "report",
                [C.percentile(d, q) / C.percentile(f, q) for d, f in zip(srv["drain"], srv["freeze"])])
    for p in ("drain", "freeze"):
        for q in (50, 99):
            res.add(f"{p}: swap wall p{q}, s (per window)", "report", [C.percentile(w, q) for w in walls[p]])
    for c in args.tps_clients:
        res.add(f"vLLM / embedded tok/s, {c} client{'s' if c > 1 else ''}", "report",
                [v / e for v, e in zip(tps["vllm"][c], tps["embedded"][c])])

    ms = lambda xs: [round(x * 1e3, 1) for x in xs]   # noqa: E731
    pct = lambda xs: {f"p{q}": round(C.percentile(xs, q) * 1e3, 1) for q in (50, 99)}   # noqa: E731
    details.update({
        "swap_ms": ms(swap), "swap_server_ms": ms(swap_srv), "revert_ms": ms(revert),
        "revert_server_ms": ms(revert_srv),
        "new_engine_first_token_ms": ms(first), "new_engine_ready_ms": ms([s["ready_s"] for s in starts]),
        "new_engine_shutdown_ms": ms([s["shutdown_s"] for s in starts]),
        **{f"{p}_swap_wall_ms": {**pct(pooled[p]), "n": len(pooled[p]), "all": ms(pooled[p])} for p in pooled},
        **{f"{p}_swap_server_ms": {**pct(pooled_srv[p]), "all": ms(pooled_srv[p])} for p in pooled_srv},
        **{f"{p}_request_latency_ms": {**pct(lat[p]), "n": len(lat[p])} for p in lat},
        **{f"{e}_c{c}_tok_s": [round(x, 2) for x in tps[e][c]] for e in tps for c in tps[e]},
        "completion_tokens": dict(token_counts), "failed_requests": failed,
        "wall_s": round(time.perf_counter() - t_start, 1),
    })
    mismatch = [c for c in args.tps_clients if token_counts[f"vllm_c{c}"] != token_counts[f"embedded_c{c}"]]
    if mismatch:
        details["token_count_mismatch_clients"] = mismatch
    res.details.update(details)
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--k", type=int, default=8, help="modules per transplant (default 8)")
    ap.add_argument("--dtype", default="float32", help="vllm.dtype (default float32: parity with transformers)")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients while swapping (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="per request while swapping (default 16)")
    ap.add_argument("--swaps", type=int, default=6, help="swaps per drain/freeze window (default 6)")
    ap.add_argument("--windows", type=int, default=2, help="drain and freeze windows each (default 2)")
    ap.add_argument("--gap", type=float, default=1.0, help="mean seconds between swaps under load (default 1)")
    ap.add_argument("--requests", type=int, default=8, help="distinct prompts (default 8)")
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens for tokens/s (default 16)")
    ap.add_argument("--tps-clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                    help="client counts for tokens/s, comma separated (default 1,16)")
    ap.add_argument("--tps-repeats", type=int, default=2, help="paired tokens/s repeats (default 2)")
    ap.add_argument("--breakdown", action="store_true", help="also time each step of one vLLM transplant and revert")
    ap.add_argument("--seed", type=int, default=0, help="seeds the gaps between swaps under load")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.swaps, args.windows, args.tps_repeats = 1, min(args.swaps, 3), 1, 1
        args.max_new_tokens, args.tokens, args.gap = min(args.max_new_tokens, 8), min(args.tokens, 8), 0.3
    if not math.isfinite(args.gap) or args.gap < 0:
        ap.error("--gap must be >= 0")
    return run(args)


if __name__ == "__main__":
    main()
