"""Serving throughput: tokens per second through the server with 1, 4 and 16 concurrent
clients against in-process `model.generate` (transformers) run one request at a time
on the same prompts. Targets: single-client overhead <= 10% (ratio >= 0.9), and with
16 clients >= 4x the serial in-process throughput (dynamic batching).

    python -m bench.throughput            # 300M Llama, 8 prompts x 8 tokens, 2 repeats (~8 min)
    python -m bench.throughput --quick    # tiny model, seconds

Greedy decoding on both sides, so both produce the same tokens (checked and printed).
The serial baseline runs on the server's own model object, on a worker thread like the
server's scheduler (see common.in_thread), request by request interleaved with the
single-client server requests, so drifting machine load hits both alike. With 4 and 16
clients the load comes from a separate process (bench.loadgen), each client sending at
least two requests (the prompts in rounds): steady-state batching.
"""
from __future__ import annotations

import time

from . import common as C

PROG = "throughput"


def serial_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) for HF generate, one prompt at a time."""
    import torch

    eos = tokenizer.eos_token_id
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tokenizer(p)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            new = out[0, ids.shape[1]:].tolist()
            tokens += new.index(eos) if eos in new else len(new)
    return tokens, time.perf_counter() - t0


def batch_stats(server) -> tuple[float, float]:
    reg = server.runtime.metrics.registry
    return (reg.get_sample_value("transplant_batch_size_sum") or 0.0,
            reg.get_sample_value("transplant_batch_size_count") or 0.0)


def served(server, clients: int, prompts: list[str], max_new_tokens: int) -> dict:
    """Each client sends at least two requests (the prompts in rounds), so what is
    measured is steady-state batching, not how one burst happens to arrive."""
    rounds = max(1, -(-2 * clients // len(prompts)))
    s0, n0 = batch_stats(server)
    out = C.run_load(server.grpc_port, clients, max_new_tokens, prompts, requests=rounds * len(prompts))
    s1, n1 = batch_stats(server)
    recs = out["records"]
    return {"tokens": sum(r["tokens"] for r in recs), "seconds": out["wall"], "rounds": rounds,
            "failed": sum(not r["ok"] for r in recs), "mean_batch": (s1 - s0) / max(n1 - n0, 1)}


def serial_and_one_client(server, client, prompts: list[str], max_new_tokens: int) -> tuple[int, float, int, float]:
    """In-process generate and one server client, request by request, interleaved, so
    the machine's drifting load hits both alike: (tokens, s) serial, (tokens, s) server."""
    model, tok = server.runtime.gens.live.model, server.runtime.tokenizer
    ns = ts = nc = tc = 0
    for p in prompts:
        n, t = C.in_thread(lambda: serial_generate(model, tok, [p], max_new_tokens))
        ns, ts = ns + n, ts + t
        t0 = time.perf_counter()
        nc += client.generate(p, max_new_tokens).completion_tokens
        tc += time.perf_counter() - t0
    return ns, ts, nc, tc


def run(args) -> C.Result:
    m = C.models(args)
    ps = C.prompts(args.requests)
    res = C.Result(PROG, C.command_line(PROG),
                   f"{m.label}, {len(ps)} prompts x {args.max_new_tokens} new tokens, batch wait {args.batch_wait_ms} ms")
    levels = [c for c in args.clients if c > 1]
    ratios: dict[int, list[float]] = {c: [] for c in [1, *levels]}
    detail: dict[str, list] = {"serial_tok_s": [], **{f"c{c}_tok_s": [] for c in ratios},
                               **{f"c{c}_mean_batch": [] for c in levels}}
    failed = 0
    with C.serving(m, max_batch_size=max(args.clients), batch_wait_ms=args.batch_wait_ms) as (server, client):
        serial_and_one_client(server, client, ps[:1], 2)                     # warm-up
        for _ in range(args.repeats):
            n_ser, t_ser, n1, t1 = serial_and_one_client(server, client, ps, args.max_new_tokens)
            serial = n_ser / t_ser
            detail["serial_tok_s"].append(round(serial, 2))
            detail["c1_tok_s"].append(round(n1 / t1, 2))
            ratios[1].append((n1 / t1) / serial)
            for c in levels:
                r = served(server, c, ps, args.max_new_tokens)
                failed += r["failed"]
                if r["tokens"] != n_ser * r["rounds"]:
                    res.details.setdefault("token_mismatch", []).append({"clients": c, "server": r["tokens"],
                                                                         "serial": n_ser * r["rounds"]})
                ratios[c].append((r["tokens"] / r["seconds"]) / serial)
                detail[f"c{c}_tok_s"].append(round(r["tokens"] / r["seconds"], 2))
                detail[f"c{c}_mean_batch"].append(round(r["mean_batch"], 2))
    for c in ratios:
        target = ">= 0.9" if c == 1 else ">= 4" if c == 16 else "report"
        res.add(f"server {c} client{'s' if c > 1 else ''} / serial generate (tok/s)", target, ratios[c])
    res.details.update(detail)
    res.details["failed_requests"] = failed
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=2)
    ap.add_argument("--requests", type=int, default=8, help="distinct prompts (servers with many clients send them "
                                                            "in rounds, >= 2 requests per client)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16],
                    help="concurrency levels, comma separated (default 1,4,16)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="server batch_wait_ms (its default: 10)")
    ap.add_argument("--regroup-max-ms", type=float, help="override server.engines.static.REGROUP_MAX_S (0: regrouping off, "
                                                        "the scheduler before the fix)")
    args = ap.parse_args(argv)
    if args.regroup_max_ms is not None:
        import server.engines.static

        server.engines.static.REGROUP_MAX_S = args.regroup_max_ms / 1000
    if args.quick:
        args.repeats, args.max_new_tokens = 1, min(args.max_new_tokens, 8)
    return run(args)


if __name__ == "__main__":
    main()
