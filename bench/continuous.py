"""Continuous batching: the server's iteration-level engine (`batching: continuous`,
the default) against request-level batching (`batching: static`) on a mixed workload,
against serial in-process `model.generate` on a uniform one, and the OpenAI-compatible
HTTP API against gRPC at one client. Targets: on the mixed workload, tokens/s
continuous / static >= 1.5 (closed loop) and p99 time to first token continuous /
static <= 1/3 (open loop); on
the uniform workload, 16 clients >= 4x serial generate; HTTP / gRPC mean latency
<= 1.10.

    python -m bench.continuous            # 300M Llama, 2 repeats (see the runtime below)
    python -m bench.continuous --quick    # tiny model, ~30 s
    python -m bench.continuous --parts uniform,http --repeats 3

1. Mixed: 16 closed-loop clients in a separate process (bench.loadgen --stream), each
   request's max_new_tokens drawn uniformly from 8..256 (seeded per request index, so
   both servers get the same prompts with the same lengths), greedy, streamed through
   GenerateStream; time to first token is from sending to the first chunk with text,
   p99 nearest-rank (of 32: the slowest). One server with `batching: continuous`, then
   one with `batching: static`, started one at a time, the order alternating across
   repeats; each run is 32 requests (2 per client: the fewest that make requests join a
   running batch) after one 8-token warm-up request per client. The whole-run figure
   includes the ramp-down tail (the last long requests with fewer than 16 neighbours),
   which with 2 requests per client caps any engine's gain: `mixed_step_bound` is what a
   perfect engine would reach on the lengths decoded, counting decode steps only; the
   "all clients waiting" figure counts only the text chunks (one per token with the
   character tokenizer) streamed from GO until the last request was sent. Every repeat
   checks that both engines produced the same text for each request.
   Open loop, same repeat (time to first token): the static server's closed-loop request
   rate times `--open-load` (0.75: a load both engines sustain) sets a Poisson arrival
   rate; `--open-requests` (24) requests, the same arrival times, lengths and prompts for
   both servers (bench.loadgen --rate), each sent on time whether or not earlier ones
   returned. Closed-loop clients re-synchronise with a server that answers a whole batch
   at once, so with static batching either no request ever arrives while a batch runs
   (all 16 regrouped) or the stragglers wait for a whole one: the closed-loop p99 TTFT
   ratio swung 0.03-1.2 between repeats. It is still reported.
2. Uniform: 16 clients (bench.loadgen, unary Generate), 8 prompts x 16 new tokens in
   rounds (32 requests), on a continuous server, against throughput.serial_generate on
   the server's own model on a worker thread; the order alternates across repeats.
3. HTTP vs gRPC, on the same server: 8 prompts x 8 new tokens, greedy, one request at a
   time, interleaved request by request (which goes first alternates): POST
   /v1/completions through the official `openai` client against gRPC Generate
   (common.Client); both must return the same text (mismatches are counted).

Runtime: the mixed part dominates (4,071 tokens per closed-loop server run on the 300M
preset; a static run takes ~2.5x a continuous one; each open-loop run about as long as
the static closed-loop one, 1/0.75 x 24/32 of it). Measured for the default (2 repeats, 4 server
runs), OMP_WAIT_POLICY=PASSIVE, on 2 cores shared with other jobs: 25 min at load average
1.5-2.8 (continuous runs 3-5 min, static 6-7 min, uniform + http ~2 min per repeat), 44 min
at 5-7. `--repeats 1` halves it; `--parts` picks parts; `--open-load 0` skips the open loop
(which about doubles the mixed part).
"""
from __future__ import annotations

import time

from . import common as C
from . import throughput as T

PROG = "continuous"
PARTS = ("mixed", "uniform", "http")


# ---- 1. mixed workload: continuous vs static ----------------------------------------------

def mixed_run(m: C.Models, batching: str, args, prompts: list[str], rate: float = 0.0) -> dict:
    """One server with this batching, the mixed streamed load (closed loop, or open loop
    at `rate` requests per second), its figures."""
    n = args.open_requests if rate else args.mixed_requests
    with C.serving(m, donor_name=None, batching=batching, max_batch_size=args.clients) as (server, _):
        load = C.Load(server.grpc_port, args.clients, 0, prompts, requests=n, tokens_range=args.mixed_range,
                      seed=args.seed, stream=True, texts=True, rate=rate).ready()
        s0, n0 = T.batch_stats(server)              # after the clients' warm-up requests
        out = load.go().result()
        s1, n1 = T.batch_stats(server)
    recs = out["records"]
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    # steady state: from GO until the last request was sent, every client had one outstanding
    cut = max((r["start"] for r in recs), default=0.0)
    steady = sum(1 for r in ok for t in r.get("chunk_times", ()) if r["start"] + t <= cut)
    first = [r["ttft"] for r in ok if r["i"] < args.clients and r.get("ttft") is not None]
    later = [r["ttft"] for r in ok if r["i"] >= args.clients and r.get("ttft") is not None]
    return {"tokens": tokens, "seconds": out["wall"], "tok_s": tokens / out["wall"], "requests": len(recs),
            "steady_tok_s": steady / cut if cut > 0 else float("nan"), "steady_s": cut,
            "ttft_p50": C.percentile(ttft, 50), "ttft_p99": C.percentile(ttft, 99),
            "ttft_p50_first_wave": C.percentile(first, 50), "ttft_p50_later": C.percentile(later, 50),
            "latency_mean": sum(r["latency"] for r in ok) / max(len(ok), 1),
            "failed": len(recs) - len(ok), "no_text": len(ok) - len(ttft),
            "asked_tokens": sum(r["max_new_tokens"] for r in recs),
            "steps_by_request": {r["i"]: r["tokens"] + (r["tokens"] < r["max_new_tokens"]) for r in ok},
            "mean_batch": (s1 - s0) / max(n1 - n0, 1), "engine_passes": int(n1 - n0),
            "texts": {r["i"]: r.get("text") for r in ok}}


def step_bound(steps: list[int], clients: int) -> float:
    """What a perfect engine could gain on this request set, counting decode steps only
    (each step costs the same whatever its rows; prefill, splicing free): static batches
    of `clients` consecutive requests, each as long as its longest row (a row's steps:
    its tokens, +1 where it ended on EOS), against the closed loop's makespan when each
    request starts as soon as a client is free."""
    import heapq

    static = sum(max(steps[i:i + clients]) for i in range(0, len(steps), clients))
    free = [0] * clients
    end = 0
    for n in steps:
        t = heapq.heappop(free) + n
        end = max(end, t)
        heapq.heappush(free, t)
    return static / end if end else float("nan")


def mixed(m: C.Models, args, res: C.Result) -> None:
    prompts = C.prompts(args.prompts, seed=args.seed)
    ratios: dict[str, list[float]] = {"tok_s": [], "steady_tok_s": [], "ttft_p99": [], "ttft_p50": [],
                                      "latency_mean": [], "open_ttft_p99": [], "open_ttft_p50": [],
                                      "open_latency_mean": []}
    keys = ("tok_s", "steady_tok_s", "ttft_p50", "ttft_p99", "ttft_p50_first_wave", "ttft_p50_later",
            "latency_mean", "mean_batch", "engine_passes", "tokens", "seconds", "steady_s")
    detail: dict[str, list] = {f"{b}_{k}": [] for b in ("continuous", "static") for k in (*keys, "order")}
    detail["step_bound"] = []
    detail["open_rate_per_s"] = []
    detail.update({f"open_{b}_{k}": [] for b in ("continuous", "static")
                   for k in ("ttft_p50", "ttft_p99", "tok_s", "latency_mean", "mean_batch", "seconds")})
    mismatched, failed, no_text = [], 0, 0
    for rep in range(args.repeats):
        order = ("continuous", "static") if rep % 2 == 0 else ("static", "continuous")
        runs = {}
        for pos, b in enumerate(order):
            runs[b] = r = mixed_run(m, b, args, prompts)
            failed += r["failed"]
            no_text += r["no_text"]
            for k in keys:
                detail[f"{b}_{k}"].append(round(r[k], 4) if isinstance(r[k], float) else r[k])
            detail[f"{b}_order"].append(pos + 1)
            print(f"  mixed repeat {rep + 1}/{args.repeats} {b}: {r['tokens']} tokens in {r['seconds']:.1f} s "
                  f"({r['tok_s']:.1f} tok/s; {r['steady_tok_s']:.1f} in the first {r['steady_s']:.1f} s with "
                  f"every client waiting), ttft p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s, "
                  f"mean latency {r['latency_mean']:.2f} s, mean batch {r['mean_batch']:.1f}", flush=True)
        c, s = runs["continuous"], runs["static"]
        by_i = c["steps_by_request"]
        detail["step_bound"].append(round(step_bound([by_i.get(i, 0) for i in range(args.mixed_requests)],
                                                     args.clients), 3))
        for k in ("tok_s", "steady_tok_s", "ttft_p99", "ttft_p50", "latency_mean"):
            ratios[k].append(c[k] / s[k])
        diff = sorted(i for i in set(c["texts"]) | set(s["texts"]) if c["texts"].get(i) != s["texts"].get(i))
        mismatched.append(len(diff))
        detail.setdefault("first_mismatch", None)
        if diff and detail["first_mismatch"] is None:
            i = diff[0]
            detail["first_mismatch"] = {"request": i, "continuous": c["texts"].get(i), "static": s["texts"].get(i)}
        detail.setdefault("asked_tokens", c["asked_tokens"])
        if args.open_load > 0:
            # open loop, at a load the static server sustains: a fraction of the request rate
            # it just reached closed-loop (every client always waiting)
            rate = args.open_load * s["requests"] / s["seconds"]
            detail["open_rate_per_s"].append(round(rate, 4))
            opened = {}
            for b in order:
                opened[b] = r = mixed_run(m, b, args, prompts, rate=rate)
                failed += r["failed"]
                no_text += r["no_text"]
                for k in ("ttft_p50", "ttft_p99", "tok_s", "latency_mean", "mean_batch", "seconds"):
                    detail[f"open_{b}_{k}"].append(round(r[k], 4))
                print(f"  open loop repeat {rep + 1}/{args.repeats} {b} ({rate * 60:.2f} requests/min): "
                      f"{r['tokens']} tokens in {r['seconds']:.1f} s, ttft p50 {r['ttft_p50']:.3f} s "
                      f"p99 {r['ttft_p99']:.3f} s, mean latency {r['latency_mean']:.2f} s, "
                      f"mean batch {r['mean_batch']:.1f}", flush=True)
            oc, os_ = opened["continuous"], opened["static"]
            for k in ("ttft_p99", "ttft_p50", "latency_mean"):
                ratios[f"open_{k}"].append(oc[k] / os_[k])
            diff = sum(oc["texts"].get(i) != os_["texts"].get(i) for i in set(oc["texts"]) | set(os_["texts"]))
            mismatched[-1] += diff
    res.add("mixed: tok/s continuous / static", ">= 1.5", ratios["tok_s"])
    res.add("mixed: tok/s, all clients waiting, cont/static", "report", ratios["steady_tok_s"])
    if args.open_load > 0:
        res.add("mixed, open loop: p99 TTFT continuous / static", "<= 0.333", ratios["open_ttft_p99"])
        res.add("mixed, open loop: p50 TTFT continuous / static", "report", ratios["open_ttft_p50"])
        res.add("mixed, open loop: mean latency continuous / static", "report", ratios["open_latency_mean"])
    res.add("mixed, closed loop: p99 TTFT continuous / static", "report", ratios["ttft_p99"])
    res.add("mixed, closed loop: p50 TTFT continuous / static", "report", ratios["ttft_p50"])
    res.add("mixed, closed loop: mean latency continuous / static", "report", ratios["latency_mean"])
    res.details.update({f"mixed_{k}": v for k, v in detail.items() if v})
    res.details["mixed_text_mismatches_per_repeat"] = mismatched
    res.details["mixed_failed_requests"] = failed
    res.details["mixed_requests_without_text"] = no_text


# ---- 2. uniform workload (vs serial generate) and 3. HTTP vs gRPC, one continuous server ------

def http_vs_grpc(server, client, oa, prompts: list[str], max_new_tokens: int, first_http: bool) -> dict:
    """Mean latency of /v1/completions (openai client) and gRPC Generate, request by request
    interleaved; which goes first alternates."""
    name = server.runtime.cfg.model_name
    th = tg = 0.0
    mismatch = []
    for j, p in enumerate(prompts):
        for kind in (("http", "grpc") if (j % 2 == 0) == first_http else ("grpc", "http")):
            t0 = time.perf_counter()
            if kind == "http":
                text_h = oa.completions.create(model=name, prompt=p, max_tokens=max_new_tokens,
                                               temperature=0).choices[0].text
                th += time.perf_counter() - t0
            else:
                text_g = client.generate(p, max_new_tokens).text
                tg += time.perf_counter() - t0
        if text_h != text_g:
            mismatch.append({"prompt": p, "http": text_h, "grpc": text_g})
    return {"http_s": th / len(prompts), "grpc_s": tg / len(prompts), "mismatch": mismatch}


def uniform_and_http(m: C.Models, args, res: C.Result) -> None:
    from openai import OpenAI

    ps = C.prompts(args.uniform_prompts)
    hp = C.prompts(args.http_requests, seed=args.seed + 1)
    parts = [p for p in args.parts if p in ("uniform", "http")]
    ratios: dict[str, list[float]] = {"uniform": [], "http": []}
    detail: dict[str, list] = {"uniform_serial_tok_s": [], "uniform_server_tok_s": [], "uniform_mean_batch": [],
                               "http_mean_latency_s": [], "grpc_mean_latency_s": []}
    failed, mismatches, token_mismatch = 0, [], []
    with C.serving(m, donor_name=None, batching="continuous", max_batch_size=args.clients) as (server, client):
        model, tok = server.runtime.gens.live.model, server.runtime.tokenizer
        oa = OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                    timeout=900)
        T.serial_and_one_client(server, client, ps[:1], 2)                       # warm-up
        if "http" in parts:
            http_vs_grpc(server, client, oa, hp[:1], 2, True)
        for rep in range(args.repeats):
            if "uniform" in parts:
                def serial():
                    return C.in_thread(lambda: T.serial_generate(model, tok, ps, args.max_new_tokens))

                def served():
                    return T.served(server, args.clients, ps, args.max_new_tokens)

                if rep % 2 == 0:
                    (n_ser, t_ser), r = serial(), served()
                else:
                    r = served()
                    n_ser, t_ser = serial()
                failed += r["failed"]
                if r["tokens"] != n_ser * r["rounds"]:
                    token_mismatch.append({"server": r["tokens"], "serial": n_ser * r["rounds"]})
                ratios["uniform"].append((r["tokens"] / r["seconds"]) / (n_ser / t_ser))
                detail["uniform_serial_tok_s"].append(round(n_ser / t_ser, 2))
                detail["uniform_server_tok_s"].append(round(r["tokens"] / r["seconds"], 2))
                detail["uniform_mean_batch"].append(round(r["mean_batch"], 2))
                print(f"  uniform repeat {rep + 1}/{args.repeats}: serial {n_ser / t_ser:.1f} tok/s, "
                      f"{args.clients} clients {r['tokens'] / r['seconds']:.1f} tok/s "
                      f"(mean rows per step {r['mean_batch']:.1f})", flush=True)
            if "http" in parts:
                h = http_vs_grpc(server, client, oa, hp, args.http_max_new_tokens, first_http=rep % 2 == 0)
                ratios["http"].append(h["http_s"] / h["grpc_s"])
                detail["http_mean_latency_s"].append(round(h["http_s"], 4))
                detail["grpc_mean_latency_s"].append(round(h["grpc_s"], 4))
                mismatches += h["mismatch"]
                print(f"  http repeat {rep + 1}/{args.repeats}: HTTP {h['http_s'] * 1000:.1f} ms, "
                      f"gRPC {h['grpc_s'] * 1000:.1f} ms mean latency", flush=True)
        oa.close()
    if "uniform" in parts:
        res.add(f"uniform: {args.clients} clients continuous / serial generate", ">= 4", ratios["uniform"])
        res.details.update({k: v for k, v in detail.items() if k.startswith("uniform")})
        res.details["uniform_failed_requests"] = failed
        if token_mismatch:
            res.details["uniform_token_mismatch"] = token_mismatch
    if "http" in parts:
        res.add("1 client: HTTP (openai client) / gRPC latency", "<= 1.1", ratios["http"])
        res.details.update({k: v for k, v in detail.items() if k.endswith("latency_s")})
        res.details["http_grpc_text_mismatches"] = len(mismatches)
        if mismatches:
            res.details["http_grpc_first_mismatch"] = mismatches[0]


def run(args) -> C.Result:
    m = C.models(args)
    lo, hi = args.mixed_range
    res = C.Result(PROG, C.command_line(PROG),
                   f"{m.label}, {args.clients} clients; mixed: {args.mixed_requests} requests, max_new_tokens "
                   f"{lo}..{hi}, streamed; uniform: {args.uniform_prompts} prompts x {args.max_new_tokens}; "
                   f"http: {args.http_requests} x {args.http_max_new_tokens}")
    if "mixed" in args.parts:
        mixed(m, args, res)
    if {"uniform", "http"} & set(args.parts):
        uniform_and_http(m, args, res)
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=2)
    ap.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS),
                    help=f"which comparisons, comma separated (default {','.join(PARTS)})")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (mixed and uniform; also the "
                                                           "server's max_batch_size)")
    ap.add_argument("--mixed-requests", type=int, default=32, help="requests per mixed run (default 32: 2 per client)")
    ap.add_argument("--mixed-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 256),
                    metavar="LO,HI", help="mixed: max_new_tokens drawn uniformly from LO..HI (default 8,256)")
    ap.add_argument("--open-load", type=float, default=0.75,
                    help="mixed, open loop: arrival rate as a fraction of the request rate the static server "
                         "reached closed-loop in the same repeat (default 0.75; 0 skips the open loop)")
    ap.add_argument("--open-requests", type=int, default=24, help="mixed, open loop: requests per run (default 24)")
    ap.add_argument("--prompts", type=int, default=16, help="mixed: distinct prompts (request i sends prompt i mod N)")
    ap.add_argument("--seed", type=int, default=0, help="mixed: seeds the drawn lengths and the prompts")
    ap.add_argument("--uniform-prompts", type=int, default=8, help="uniform: distinct prompts, sent in rounds "
                                                                   "(>= 2 requests per client)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="uniform: new tokens per request")
    ap.add_argument("--http-requests", type=int, default=8, help="http vs grpc: requests of each kind per repeat")
    ap.add_argument("--http-max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.open_load < 0 or args.open_requests < 1:
        ap.error("--open-load wants a fraction >= 0 and --open-requests at least 1")
    if len(args.mixed_range) != 2 or not 1 <= args.mixed_range[0] <= args.mixed_range[1]:
        ap.error("--mixed-range wants LO,HI with 1 <= LO <= HI")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return run(args)


if __name__ == "__main__":
    main()
