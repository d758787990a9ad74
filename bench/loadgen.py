"""A closed-loop load generator in its own process, so client threads never compete
with the server for its interpreter lock: C clients, each sending its next Generate
as soon as the previous one returns.

Protocol with the parent (bench.common.Load): after one warm-up request per client
it prints READY, waits for a line on stdin, runs (a given number of requests, a given
time, or with neither until a second line arrives), and prints one JSON line: wall
time and one record per request (start offset, latency, tokens, status)."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time


def run(port: int, clients: int, max_new_tokens: int, prompts: list[str], requests: int, duration: float,
        wait_for_go: bool = True) -> dict:
    import grpc

    from server.rpc import inference_pb2 as I
    from server.rpc import inference_pb2_grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [inference_pb2_grpc.InferenceStub(ch) for ch in channels]

    def call(stub, prompt):
        return stub.Generate(I.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens), timeout=900)

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
            try:
                r = call(stub, prompts[i % len(prompts)])
                rec.update(ok=True, tokens=r.completion_tokens, generation=r.generation)
            except grpc.RpcError as e:
                rec.update(ok=False, tokens=0, code=str(e.code()), details=e.details())
            rec["latency"] = time.perf_counter() - start
            with lock:
                records.append(rec)

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
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--requests", type=int, default=0, help="stop after this many requests in all")
    ap.add_argument("--duration", type=float, default=0.0, help="or after this many seconds")
    args = ap.parse_args()
    prompts = json.loads(sys.stdin.readline())
    out = run(args.port, args.clients, args.max_new_tokens, prompts, args.requests, args.duration)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
