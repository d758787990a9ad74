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


def spawn(cfg: dict, tmp: Path) -> tuple[subprocess.Popen, int, Path]:
    """`transplant serve --config` in a child process on fixed free ports; waits for SERVING."""
    cfg = dict(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}")
    path = tmp / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp / "server.log", "ab")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    port = int(cfg["grpc_listen"].rsplit(":", 1)[1])
    wait_serving(port, proc)
    return proc, port, Path(cfg["state_dir"])


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


__all__ = ["A", "I", "Clients", "config", "start", "spawn", "wait_serving"]
