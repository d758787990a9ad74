"""Starting real servers for tests: in-process on port 0, or as a subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from server.rpc import admin_pb2 as A
from server.rpc import admin_pb2_grpc, inference_pb2 as I, inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def config(tmp: Path, target: Path, roots: list[Path], **kw) -> dict:
    return {"model": str(target), "donor_roots": [str(r) for r in roots], "state_dir": str(tmp / "state"),
            "grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "batch_wait_ms": 5,
            "eval_examples": 8, "probe_prompts": 8, **kw}


def start(cfg: dict):
    from server.app import create_server
    from server.config import load_config

    return create_server(load_config(None, **cfg))


class Clients:
    def __init__(self, port: int, token: str, credentials=None):
        target = f"127.0.0.1:{port}" if credentials is None else f"localhost:{port}"
        self.channel = (grpc.secure_channel(target, credentials) if credentials
                        else grpc.insecure_channel(target))
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self._admin = admin_pb2_grpc.AdminStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")]

    def admin(self, method: str, req, timeout: float = 120):
        return getattr(self._admin, method)(req, metadata=self.md, timeout=timeout)

    def generate(self, prompt: str, n: int = 8, **kw):
        return self.inference.Generate(I.GenerateRequest(prompt=prompt, max_new_tokens=n, **kw), timeout=60)

    def close(self):
        self.channel.close()


def broken_donor(root: Path) -> Path:
    """zoo:v2 with its FFN down projections replaced by noise, saved as root/broken:
    transplanting them breaks every task (what the guard and alerts must catch)."""
    import torch

    from transplant_core.checkpoint import load_model

    model, tok, _ = load_model("zoo:v2")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.normal_(0, 0.5)
    model.save_pretrained(root / "broken")
    tok.save_pretrained(root / "broken")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cfg: dict, tmp: Path, wait: bool = True) -> tuple[subprocess.Popen, int, Path]:
    """`transplant serve --config` in a child process on fixed free ports; waits for SERVING
    (unless not `wait`). The HTTP port is in the returned process's `http_port`."""
    cfg = dict(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}")
    path = tmp / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp / "server.log", "ab")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    port = int(cfg["grpc_listen"].rsplit(":", 1)[1])
    proc.http_port = int(cfg["http_listen"].rsplit(":", 1)[1])
    if wait:
        wait_serving(port, proc)
    return proc, port, Path(cfg["state_dir"])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    out, todo = [], [pid]
    while todo:
        kids = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


def wait_serving(port: int, proc=None, timeout: float = 90) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("server did not become SERVING")


def wait_for(cond, timeout: float = 60, what: str = "the condition", every: float = 0.01):
    """Poll `cond` until it is true (returns its value) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def load_during_swaps(s, c, swaps: int, prompts: list[str], n: int = 10, donor: str = "base",
                      modules=("layers.*",), grpc_clients: int = 5, http_clients: int = 3, pinned: int = 0,
                      per_swap: int = 4):
    """Greedy clients on both APIs (gRPC, and the official openai client over /v1) while
    `swaps` transplant/revert pairs run. `pinned` of the gRPC clients name the generation
    live when they send. Between swaps, waits until `per_swap` replies came back (no
    sleeps). Returns (results, errors): results are dicts with api, prompt, generation,
    text, spans [(gen, start, end)] and pinned (the generation asked for, or None)."""
    import threading

    import openai

    results, errors, stop = [], [], threading.Event()
    lock = threading.Lock()

    def record(**kw):
        with lock:
            results.append(kw)

    def grpc_client(i):
        cl = Clients(s.grpc_port, s.token)
        k = 0
        while not stop.is_set():
            p = prompts[(i + k) % len(prompts)]
            pin = s.runtime.gens.live.id if i < pinned else None
            try:
                r = cl.generate(p, n, **({} if pin is None else {"generation": pin}))
                record(api="grpc", prompt=p, generation=r.generation, text=r.text, pinned=pin,
                       spans=[(x.generation, x.start, x.end) for x in r.spans])
            except grpc.RpcError as e:
                errors.append(("grpc", pin, e.code(), e.details()))
            k += 1
        cl.close()

    def http_client(i):
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0, timeout=60)
        k = 0
        while not stop.is_set():
            p = prompts[(i + k) % len(prompts)]
            try:
                r = cl.completions.create(model=s.runtime.cfg.model_name, prompt=p, max_tokens=n, temperature=0)
                ch = r.choices[0]
                spans = [(x["generation"], x["start"], x["end"]) for x in (ch.model_extra or {}).get("generation_spans") or []]
                assert r.system_fingerprint == f"gen-{r.model_extra['generation']}"
                record(api="http", prompt=p, generation=r.model_extra["generation"], text=ch.text, pinned=None,
                       spans=spans)
            except openai.APIError as e:
                errors.append(("http", None, getattr(e, "status_code", None), str(e)))
            k += 1

    threads = [threading.Thread(target=grpc_client, args=(i,)) for i in range(grpc_clients)]
    threads += [threading.Thread(target=http_client, args=(i,)) for i in range(http_clients)]
    for t in threads:
        t.start()
    try:
        def replies(k):
            seen = len(results)
            wait_for(lambda: len(results) >= seen + k or errors, 120, f"{k} more replies")

        replies(per_swap)
        for _ in range(swaps):
            c.admin("Transplant", A.TransplantRequest(donor=donor, modules=list(modules)))
            replies(per_swap)
            c.admin("Revert", A.RevertRequest())
            replies(per_swap)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return results, errors


__all__ = ["A", "I", "Clients", "config", "start", "spawn", "wait_serving", "wait_for", "load_during_swaps",
           "descendants", "alive"]
