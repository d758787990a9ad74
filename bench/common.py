"""What every benchmark shares: arguments, models, a real in-process server, ratio
statistics, memory readings and the printed result."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import setup as bench_setup  # noqa: E402

# K = 8 modules spread over depth and over every kind, so their bytes are typical
KIND_CYCLE = ("mlp.up", "attn.q", "mlp.down", "attn.o", "mlp.gate", "attn.v", "attn.k", "mlp.up")


# ---- arguments and models ------------------------------------------------------------

def parser(prog: str, doc: str, preset: str = "large") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{prog}", description=doc.strip().split("\n\n")[0])
    ap.add_argument("--preset", default=preset, choices=sorted(bench_setup.PRESETS),
                    help=f"bench checkpoint pair (default {preset}); built on first use")
    ap.add_argument("--target", help="target model spec instead of the preset (checkpoint dir or zoo:NAME)")
    ap.add_argument("--donor", help="donor checkpoint dir instead of the preset's")
    ap.add_argument("--repeats", type=int, default=5, help="paired measurements; the ratio is their median")
    ap.add_argument("--quick", action="store_true", help="tiny preset, few repeats: seconds (the test suite)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return ap


@dataclass
class Models:
    target: str
    donor: str
    donor_root: Path
    label: str


def models(args) -> Models:
    """The target/donor pair the arguments name; the preset's pair is built if missing."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.preset = "tiny"
    if args.target or args.donor:
        from transplant_core.checkpoint import resolve_model_path

        if not (args.target and args.donor):
            raise SystemExit("give both --target and --donor (or neither, for the preset)")
        donor = resolve_model_path(args.donor)
        return Models(str(resolve_model_path(args.target)), str(donor), donor.parent,
                      f"{args.target} <- {args.donor}")
    p = bench_setup.ensure(args.preset)
    return Models(str(p["target"]), str(p["donor"]), p["donor_root"],
                  f"{args.preset} ({bench_setup.PRESETS[args.preset].params / 1e6:.0f}M params)")


def pick_modules(table, k: int) -> list[str]:
    """K module names spread evenly over the layers, cycling through the kinds."""
    layers = sorted({r.layer for r in table.refs()})
    names = []
    for i in range(k):
        layer = layers[(i * len(layers)) // k]
        kinds = [kd for kd in KIND_CYCLE if any(r.layer == layer and r.kind == kd for r in table.refs())] or \
            sorted(r.kind for r in table.refs() if r.layer == layer)
        kind = kinds[i % len(kinds)]
        name = f"layers.{layer}.{kind}"
        while name in names:   # fewer layers than K: take the next kind
            kind = kinds[(kinds.index(kind) + 1) % len(kinds)]
            name = f"layers.{layer}.{kind}"
        names.append(name)
    return names


def module_bytes(table, names: list[str]) -> int:
    from transplant_core.refs import ModuleRef

    return sum(table[ModuleRef.parse(n)].nbytes for n in names)


def prompts(n: int, seed: int = 0) -> list[str]:
    """Deterministic short prompts in the character alphabet (task-like, varied lengths)."""
    import random

    rng = random.Random(seed)
    forms = ("add:{a}+{b}=", "rev:{w}=", "sort:{w}=", "copy:{w}=", "upper:{w}=", "Q {w} {a}?")
    out = []
    for i in range(n):
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12)))
        out.append(forms[i % len(forms)].format(a=rng.randint(0, 999), b=rng.randint(0, 999), w=w))
    return out


# ---- a real server, in process -------------------------------------------------------

class Client:
    """Real stubs on a channel to the server (what tests/serverkit.Clients does)."""

    def __init__(self, port: int, token: str):
        import grpc

        from server.rpc import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

        self.A, self.I = admin_pb2, inference_pb2
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self._admin = admin_pb2_grpc.AdminStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")]

    def admin(self, method: str, req, timeout: float = 600):
        return getattr(self._admin, method)(req, metadata=self.md, timeout=timeout)

    def transplant(self, donor: str, modules: list[str]):
        return self.admin("Transplant", self.A.TransplantRequest(donor=donor, modules=modules, reason="bench"))

    def revert(self):
        return self.admin("Revert", self.A.RevertRequest(reason="bench"))

    def generate(self, prompt: str, n: int, timeout: float = 600):
        return self.inference.Generate(self.I.GenerateRequest(prompt=prompt, max_new_tokens=n), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


@contextmanager
def serving(m: Models, donor_name: str | None = "donor", **cfg) -> Iterator[tuple[object, Client]]:
    """The real server on loopback port 0 with the donor registered (unless donor_name is
    None); a throwaway state dir."""
    from server.app import create_server
    from server.config import load_config

    state = Path(tempfile.mkdtemp(prefix="state-", dir=bench_setup.bench_root()))
    conf = {"model": m.target, "donor_roots": [str(m.donor_root)], "state_dir": str(state),
            "grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "watch_donor_roots": False,
            "zoo_donors": False, "max_new_tokens_limit": 1024, **cfg}
    server = create_server(load_config(None, **conf))
    client = Client(server.grpc_port, server.token)
    try:
        if donor_name:
            client.admin("RegisterDonor", client.A.RegisterDonorRequest(name=donor_name, path=m.donor))
        yield server, client
    finally:
        client.close()
        server.stop(5)
        shutil.rmtree(state, ignore_errors=True)


# ---- statistics and output -------------------------------------------------------------

@dataclass
class Figure:
    """One compared figure: the ratio's median, min and max over paired repeats."""
    name: str
    target: str                  # e.g. "<= 0.05"
    ratios: list[float]
    unit: str = "x"
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    def met(self) -> bool | None:
        op, _, val = self.target.partition(" ")
        if op not in ("<=", ">=") or not self.ratios:
            return None
        return self.median <= float(val) if op == "<=" else self.median >= float(val)

    def row(self) -> dict:
        return {"figure": self.name, "target": self.target, "median": self.median,
                "min": min(self.ratios, default=float("nan")), "max": max(self.ratios, default=float("nan")),
                "n": len(self.ratios), "met": self.met(), "note": self.note}


@dataclass
class Result:
    bench: str
    command: str
    setting: str
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def add(self, *a, **kw) -> Figure:
        f = Figure(*a, **kw)
        self.figures.append(f)
        return f

    def to_dict(self) -> dict:
        return {"bench": self.bench, "command": self.command, "setting": self.setting,
                "figures": [f.row() for f in self.figures], "details": self.details,
                "loadavg": os.getloadavg(), "cpus": os.cpu_count()}


def fmt(v: float) -> str:
    if v != v:
        return "nan"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def emit(res: Result, args) -> Result:
    """Print the figures as a table (and the details), write JSON if asked."""
    print(f"\n== {res.bench}: {res.setting}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")
    print(f"{'figure':<44} {'target':>9} {'median':>8} {'min':>8} {'max':>8}  met")
    for f in res.figures:
        r = f.row()
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print(f"{f.name:<44} {f.target:>9} {fmt(r['median']):>8} {fmt(r['min']):>8} {fmt(r['max']):>8}  {met}"
              + (f"  ({f.note})" if f.note else ""))
    for k, v in res.details.items():
        print(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    print(f"  command: {res.command}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=2, default=str))
    sys.stdout.flush()
    return res


def command_line(prog: str) -> str:
    return " ".join([f"python -m bench.{prog}", *sys.argv[1:]])


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


# ---- memory --------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- load from another process -------------------------------------------------------

class Load:
    """`bench.loadgen` in a child process: start() returns once its clients are warm,
    go() releases them, result() waits for the records."""

    def __init__(self, port: int, clients: int, max_new_tokens: int, prompts: list[str],
                 requests: int = 0, duration: float = 0.0, tokens_range: tuple[int, int] | None = None,
                 seed: int = 0, stream: bool = False, texts: bool = False, rate: float = 0.0):
        """tokens_range, seed, stream, texts, rate: loadgen's --max-new-tokens-range (request
        i asks for a length drawn from lo..hi, seeded by (seed, i); max_new_tokens is then
        ignored), --seed, --stream (GenerateStream, records ttft), --texts and --rate (open
        loop: `requests` sent at Poisson times, `rate` per second)."""
        import subprocess

        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("OMP_NUM_THREADS", "1")     # the clients do no tensor work
        extra = []
        if tokens_range is not None:
            extra += ["--max-new-tokens-range", f"{tokens_range[0]},{tokens_range[1]}", "--seed", str(seed)]
        extra += ["--stream"] * stream + ["--texts"] * texts + (["--rate", str(rate)] if rate else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--clients", str(clients),
             "--max-new-tokens", str(max_new_tokens), "--requests", str(requests), "--duration", str(duration),
             *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        self.proc.stdin.write(json.dumps(prompts) + "\n")
        self.proc.stdin.flush()

    def ready(self) -> "Load":
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"load generator failed to start: {line!r}")
        return self

    def go(self) -> "Load":
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        return self

    def stop(self) -> dict:
        """End an open-ended load (neither requests nor duration given) and collect it."""
        self.proc.stdin.write("STOP\n")
        self.proc.stdin.flush()
        return self.result()

    def result(self) -> dict:
        out = self.proc.stdout.readline()
        self.proc.wait()
        if self.proc.returncode != 0 or not out:
            raise RuntimeError(f"load generator exited with {self.proc.returncode}")
        return json.loads(out)


def run_load(port: int, clients: int, max_new_tokens: int, prompts: list[str], requests: int = 0,
             duration: float = 0.0, during: Callable[[], object] | None = None, **load_options) -> dict:
    """Warm up, then run the load (and `during()` in this process while it runs);
    load_options: Load's tokens_range, seed, stream, texts."""
    load = Load(port, clients, max_new_tokens, prompts, requests, duration, **load_options).ready().go()
    if during is not None:
        during()
    return load.result()


def in_thread(fn: Callable[[], object]) -> object:
    """Run fn on a fresh thread and return its value. The server decodes and swaps on
    worker threads, and on a loaded machine torch's intra-op parallelism behaves very
    differently on the main thread than on others (measured here: a 2-row matmul 5x
    slower on the main thread), so in-process baselines run on a worker thread too."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="bench-baseline")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
