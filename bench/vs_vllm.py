"""`transplant serve` against plain vLLM (its own OpenAI server, `python -m
vllm.entrypoints.openai.api_server`), measured the way vLLM users measure a serving
endpoint: vLLM's own benchmark client (`vllm bench serve`, random prompts, ignore_eos),
at 8 and 16 concurrent requests, output tokens/s and p99 time to first token. Three
servers on the same checkpoint, float32: plain vLLM, `transplant serve` on the embedded
engine, `transplant serve --engine vllm`. Targets: embedded >= 0.9x vLLM's tokens/s (on a
quiet machine), the vLLM engine >= 0.98x.

    python -m bench.vs_vllm               # 300M Llama, 64 prompts x 64 tokens, 2 repeats (~25 min on 2 cores)
    python -m bench.vs_vllm --quick       # small model (3M), 16 prompts x 16 tokens, 1 repeat

Each server and each client run in their own process; one server at a time (two vLLM
engines would share the 2 cores), started afresh per repeat in an order that alternates,
and paired by repeat index. Ratios are ours / plain vLLM's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C

PROG = "vs_vllm"
ROOT = Path(__file__).resolve().parent.parent
CLIENT = """
import contextlib, io, json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p)
with contextlib.redirect_stdout(io.StringIO()):
    r = main(p.parse_args(json.loads(sys.argv[1])))
print(json.dumps({k: r[k] for k in ("completed", "failed", "output_throughput", "p99_ttft_ms", "mean_ttft_ms")}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it served")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:                # not listening yet: poll again
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1",
                VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_LOGGING_LEVEL="ERROR", PYTHONPATH=str(ROOT))


def start(kind: str, model: str, max_len: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    log = open(tmp / f"{kind}.log", "ab")
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len",
               str(max_len), "--enforce-eager", "--seed", "0", "--max-num-seqs", "16", "--disable-log-stats"]
        health = "/health"
    else:
        cfg = {"model": model, "served_model_name": "bench", "state_dir": str(tmp / f"state-{kind}-{port}"),
               "grpc_listen": f"127.0.0.1:{_free_port()}", "http_listen": f"127.0.0.1:{port}", "probes": [],
               "watch_donor_roots": False, "zoo_donors": False, "max_batch_size": 16, "max_queue": 256,
               "engine": "vllm" if kind == "ours-vllm" else "embedded",
               "vllm": {"max_model_len": max_len}, "donor_roots": [str(tmp / "donors")]}
        path = tmp / f"{kind}-{port}.json"
        path.write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(path), "--log-level", "WARNING"]
        health = "/health"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
    _wait_http(port, proc, health)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def client(port: int, tokenizer: str, prompts: int, concurrency: int, tokens: int, input_len: int = 32,
           logprobs: int | None = None) -> dict:
    """vLLM's benchmark client in its own process against the server on `port` (served as
    "bench"): random prompts, ignore_eos; its figures (every request must complete)."""
    argv = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", "bench", "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len",
            str(input_len), "--random-output-len", str(tokens), "--num-prompts", str(prompts), "--max-concurrency",
            str(concurrency), "--ignore-eos", "--disable-tqdm", "--seed", "0"]
    if logprobs is not None:
        argv += ["--logprobs", str(logprobs)]
    r = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(argv)], capture_output=True, text=True,
                       env=_env(), timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"vllm bench serve failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["failed"] or res["completed"] != prompts:
        raise SystemExit(f"vllm bench serve: {res['failed']} of {prompts} requests failed")
    return res


def run(args) -> C.Result:
    m = C.models(args)
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, float32, {args.prompts} prompts x {args.tokens} tokens, "
                                               "vLLM's benchmark client")
    kinds, conc = ("vllm", *args.servers.split(",")), (8, 16)
    got: dict = {(k, c): [] for k in kinds for c in conc}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.repeats):
            for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                proc, port = start(kind, m.target, 32 + args.tokens + 8, tmp)
                try:
                    client(port, m.target, min(8, args.prompts), 4, 4)              # warm-up
                    for c in conc:
                        got[(kind, c)].append(client(port, m.target, args.prompts, c, args.tokens))
                finally:
                    stop(proc)
    for c in conc:
        base = got[("vllm", c)]
        for kind, target in (("ours-embedded", ">= 0.9"), ("ours-vllm", ">= 0.98")):
            if kind not in kinds:
                continue
            ours = got[(kind, c)]
            res.add(f"{kind} / vLLM tokens/s, {c} concurrent", target,
                    [a["output_throughput"] / b["output_throughput"] for a, b in zip(ours, base)])
            res.add(f"{kind} / vLLM p99 TTFT, {c} concurrent", "report",
                    [a["p99_ttft_ms"] / b["p99_ttft_ms"] for a, b in zip(ours, base)])
    res.details.update({f"{k}@{c}": [{x: round(v, 2) for x, v in r.items()} for r in rs]
                        for (k, c), rs in got.items()})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--servers", default="ours-embedded,ours-vllm",
                    help="which of ours to compare with plain vLLM (comma-separated: ours-embedded, ours-vllm)")
    args = ap.parse_args(argv)
    names = [x.strip() for x in args.servers.split(",") if x.strip()]
    bad = sorted(set(names) - {"ours-embedded", "ours-vllm"})
    if bad or not names:
        ap.error(f"--servers: {'unknown ' + ', '.join(bad) if bad else 'none named'} (ours-embedded, ours-vllm)")
    args.servers = ",".join(dict.fromkeys(names))        # each once, in the order given
    if args.quick:                     # the small preset: vLLM's CPU attention has no kernel for tiny's head_dim
        args.quick, args.preset, args.repeats, args.prompts, args.tokens = False, "small", 1, 16, 16
    return run(args)


if __name__ == "__main__":
    main()
