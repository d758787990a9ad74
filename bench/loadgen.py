"""A closed-loop load generator in its own process, so client threads never compete
with the server for its interpreter lock: C clients, each sending its next Generate
as soon as the previous one returns.

Protocol with the parent (bench.common.Load): after one warm-up request per client
it prints READY, waits for a line on stdin, runs (a given number of requests, a given
time, or with neither until a second line arrives), and prints one JSON line: wall
time and one record per request (start offset, latency, tokens, status).

Options for mixed workloads (off by default, which keeps the behaviour above):
`--max-new-tokens-range LO,HI` gives request i its own max_new_tokens, drawn uniformly
from LO..HI by a generator seeded with (`--seed`, i), so two runs with the same seed send
the same lengths with the same prompts whatever client picks request i up (warm-up
requests then ask for LO tokens); `--stream` sends GenerateStream instead of Generate and
records each request's time to first token (`ttft`: from sending to the first chunk
with text; None if no chunk had any) and when each chunk with text arrived
(`chunk_times`, seconds after sending); `--texts` also records each reply's text."""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time


def drawn_length(seed: int, i: int, lo: int, hi: int) -> int:
    """Request i's max_new_tokens in range mode: uniform in lo..hi, a function of (seed, i)
    only, so it does not depend on how many requests run or which client sends which."""
    return random.Random(seed * 1_000_003 + i).randint(lo, hi)


def arrival_times(seed: int, rate: float, n: int) -> list[float]:
    """Open loop: n send times (seconds after GO), a Poisson process of `rate` per second;
    the first request goes at once."""
    rng = random.Random(seed * 7_919 + 17)
    out, t = [], 0.0
    for i in range(n):
        out.append(round(t, 4))
        t += rng.expovariate(rate)
    return out


def run(port: int, clients: int, max_new_tokens: int, prompts: list[str], requests: int, duration: float,
        wait_for_go: bool = True, tokens_range: tuple[int, int] | None = None, seed: int = 0,
        stream: bool = False, texts: bool = False, rate: float = 0.0) -> dict:
    import grpc

    from server.rpc import inference_pb2 as I
    from server.rpc import inference_pb2_grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [inference_pb2_grpc.InferenceStub(ch) for ch in channels]

    def length(i: int | None) -> int:
        if tokens_range is None:
            return max_new_tokens
        return tokens_range[0] if i is None else drawn_length(seed, i, *tokens_range)

    def call(stub, prompt, i: int | None = None) -> dict:
        """One request (i None: a warm-up): tokens, generation, and in stream mode ttft."""
        req = I.GenerateRequest(prompt=prompt, max_new_tokens=length(i))
        if not stream:
            r = stub.Generate(req, timeout=900)
            return {"tokens": r.completion_tokens, "generation": r.generation, **({"text": r.text} if texts else {})}
        start, parts, times, last = time.perf_counter(), [], [], None
        for chunk in stub.GenerateStream(req, timeout=900):
            if chunk.text:
                times.append(round(time.perf_counter() - start, 4))
                parts.append(chunk.text)
            last = chunk
        return {"tokens": last.completion_tokens if last is not None else 0,
                "generation": last.generation if last is not None else 0, "ttft": times[0] if times else None,
                "chunk_times": times, **({"text": "".join(parts)} if texts else {})}

    warm = [threading.Thread(target=call, args=(s, prompts[i % len(prompts)])) for i, s in enumerate(stubs)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    stop = threading.Event()
    if wait_for_go:
        print("READY", flush=True)
        sys.stdin.readline()
        if not requests and not duration:
            threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    records: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(10 ** 9))
    t0 = time.perf_counter()
    deadline = t0 + duration if duration else None

    def client(stub) -> None:
        while True:
            with lock:
                i = next(counter)
            if (requests and i >= requests) or (deadline and time.perf_counter() >= deadline) or stop.is_set():
                return
            start = time.perf_counter()
            rec = {"i": i, "start": start - t0}
            if tokens_range is not None:
                rec["max_new_tokens"] = length(i)
            try:
                rec.update(ok=True, **call(stub, prompts[i % len(prompts)], i))
            except grpc.RpcError as e:
                rec.update(ok=False, tokens=0, code=str(e.code()), details=e.details())
            rec["latency"] = time.perf_counter() - start
            with lock:
                records.append(rec)

    def timed(i: int, at: float) -> None:
        """Open loop: request i, sent at `at` seconds after GO."""
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        start = time.perf_counter()
        rec = {"i": i, "start": start - t0, "scheduled": at}
        if tokens_range is not None:
            rec["max_new_tokens"] = length(i)
        try:
            rec.update(ok=True, **call(stubs[i % len(stubs)], prompts[i % len(prompts)], i))
        except grpc.RpcError as e:
            rec.update(ok=False, tokens=0, code=str(e.code()), details=e.details())
        rec["latency"] = time.perf_counter() - start
        with lock:
            records.append(rec)

    if rate:
        threads = [threading.Thread(target=timed, args=(i, at))
                   for i, at in enumerate(arrival_times(seed, rate, requests))]
    else:
        threads = [threading.Thread(target=client, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for ch in channels:
        ch.close()
    return {"wall": wall, "records": sorted(records, key=lambda r: r["i"])}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="per request (required unless a range is given)")
    ap.add_argument("--max-new-tokens-range", metavar="LO,HI",
                    help="instead: request i's max_new_tokens drawn uniformly from LO..HI, seeded by (--seed, i)")
    ap.add_argument("--seed", type=int, default=0, help="for --max-new-tokens-range")
    ap.add_argument("--stream", action="store_true", help="GenerateStream instead of Generate; records ttft")
    ap.add_argument("--texts", action="store_true", help="record each reply's text")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open loop: send --requests requests at Poisson arrival times, RATE per second")
    ap.add_argument("--requests", type=int, default=0, help="stop after this many requests in all")
    ap.add_argument("--duration", type=float, default=0.0, help="or after this many seconds")
    args = ap.parse_args()
    tokens_range = None
    if args.max_new_tokens_range:
        lo, _, hi = args.max_new_tokens_range.partition(",")
        tokens_range = (int(lo), int(hi))
        if not 1 <= tokens_range[0] <= tokens_range[1]:
            ap.error(f"--max-new-tokens-range wants 1 <= LO <= HI, got {args.max_new_tokens_range}")
    elif args.max_new_tokens < 1:
        ap.error("give --max-new-tokens N or --max-new-tokens-range LO,HI")
    if args.rate < 0 or (args.rate and args.requests < 1):
        ap.error("--rate wants a positive rate and --requests N")
    prompts = json.loads(sys.stdin.readline())
    out = run(args.port, args.clients, args.max_new_tokens, prompts, args.requests, args.duration,
              tokens_range=tokens_range, seed=args.seed, stream=args.stream, texts=args.texts, rate=args.rate)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
