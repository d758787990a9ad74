"""The transplant plugin inside vLLM's own OpenAI server (`VLLM_PLUGINS=transplant`, the
`vllm.endpoint_plugins` entry point) against plain vLLM, three comparisons:

1. serving: plain `vllm serve` vs `vllm serve` + the plugin on the same checkpoint
   (float32), vLLM's own benchmark client (`vllm bench serve`, random prompts,
   ignore_eos) at 8 and 16 concurrent: output tokens/s (target >= 0.98x) and p99 time
   to first token (target <= 1.05x).
2. host memory: resident memory of the server's whole process tree (API server, engine
   core, workers: the sum of VmRSS read from /proc) after start-up and one request, with
   the plugin minus without, over the model's weight bytes. Target <= 0.05.
3. swap: K=8 modules (whole fused groups) transplanted and reverted through the Admin API
   of the plugin server (idle: no running request to wait for), wall time at the client
   and the swap_seconds the runtime reports, and the swap's own pause (how long requests
   were held once none ran: transplant_swap_pause_seconds; the staging before it, hashing
   and writing the new tensors durably, holds no request); against what an operator does without
   transplant: `transplant apply` onto a new checkpoint and a new plain vLLM server on it,
   timed from its start to its first completion. Targets: swap / new server <= 0.01,
   swap <= 100 ms. The ratio takes each plugin server's first transplant, whose tensors
   are new to its store (what a new donor costs); later transplants of the same modules
   find them stored and are reported on their own.
4. the guard's pause: one more plugin server with a guarded probe (zoo:add, likelihood,
   `--trial-examples`, default 16) whose transplants are each first installed with the
   gate shut and probed through vLLM; how long requests were held (our
   transplant_guard_trial_seconds) and the guarded transplant against the unguarded one.

    python -m bench.plugin                # 300M Llama, 64 prompts x 64 tokens, 2 repeats
    python -m bench.plugin --quick        # small model (3M), 16 prompts x 16 tokens, 8 concurrent, 1 repeat

Each server and each client run in their own process; one server at a time (two vLLM
engines would share the 2 cores): per repeat a plain server on the target, a plugin
server on the target and a plain server on the merged checkpoint, each started afresh in
an order that alternates per repeat; figures are paired by repeat index. Each timed
server's start-up (Popen to its first completion, /health polled every 0.1 s) is in the
details for all three. The plugin's config names the preset's donor root (scanned before
the server says SERVING, so donor "donor" is registered) and a fresh state directory.
The details also give PSS (shared pages counted once), not a figure: it moves with
whatever else on the machine maps the same libraries.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import common as C
from .vs_vllm import ROOT, _env, _free_port, client

PROG = "plugin"
WORKER = "server.engines.vllm_worker.TransplantWorker"
KINDS = ("vllm", "plugin", "merged")


# ---- modules, weights --------------------------------------------------------------------

def pick_groups(table, k: int) -> list[str]:
    """K module names made of whole fused groups (vLLM loads q/k/v and gate/up together):
    whole layers from the first, then single-module groups (largest first) of the next."""
    from server.engines.vllm_swap import complete_groups

    names: list = []
    for layer in sorted({r.layer for r in table.refs()}):
        refs = sorted(r for r in table.refs() if r.layer == layer)
        if len(names) + len(refs) <= k:
            names += refs
        else:
            for r in sorted(refs, key=lambda r: -table[r].nbytes):
                group = [g for g in complete_groups(table, [r]) if g not in names]
                if group and len(names) + len(group) <= k:
                    names += group
        if len(names) >= k:
            break
    return [str(r) for r in names]


# ---- /proc ---------------------------------------------------------------------------------

def tree_pids(root: int) -> list[int]:
    """root and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> dict:
    """Sum of VmRSS (and of Pss, which counts shared pages once) over root's process tree."""
    pids = tree_pids(root)
    return {"rss": sum(_kb(f"/proc/{p}/status", "VmRSS") for p in pids),
            "pss": sum(_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids), "processes": len(pids)}


# ---- servers -----------------------------------------------------------------------------------

class Server:
    """Plain `vllm serve` (vLLM's api_server module) on `model`, served as "bench", in its own
    process group; with `plugin` (our config) the transplant plugin is loaded too."""

    def __init__(self, model: str, max_len: int, tmp: Path, plugin: dict | None = None):
        self.port, self.tmp, self.plugin = _free_port(), tmp, plugin
        env = _env()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "bench", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len",
               str(max_len), "--enforce-eager", "--seed", "0", "--max-num-seqs", "16", "--disable-log-stats"]
        if plugin is not None:
            self.grpc_port = _free_port()
            self.http_port = _free_port()
            cfg = dict(plugin, grpc_listen=f"127.0.0.1:{self.grpc_port}", http_listen=f"127.0.0.1:{self.http_port}")
            path = tmp / f"transplant-{self.port}.json"
            path.write_text(json.dumps(cfg))
            self.state = Path(cfg["state_dir"])
            env.update(VLLM_PLUGINS="transplant", TRANSPLANT_CONFIG=str(path))
            cmd += ["--worker-extension-cls", WORKER]
        else:
            env.pop("VLLM_PLUGINS", None)
        self.log = tmp / f"server-{self.port}.log"
        self.t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait(self, timeout: float = 600) -> float:
        """Poll /health every 0.1 s; seconds from Popen to the first 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode} before it served:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:                # not listening yet: poll again
                pass
            time.sleep(0.1)
        raise SystemExit(f"the server did not come up:\n{self.tail()}")

    def complete(self, prompt: str = "copy:abc=", n: int = 1) -> tuple[dict, dict]:
        """One greedy /v1/completions request: (reply, headers)."""
        body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read()), dict(r.headers)

    def admin_http(self, method: str, doc: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/transplant/v1/{method}",
                                     data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{method} answered {e.code}: {e.read()[:2000]!r}") from None

    def wait_plugin(self, timeout: float = 120) -> None:
        """The admin token exists and the runtime says SERVING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tok = self.state / "admin_token"
            if tok.is_file() and tok.read_text().strip():
                self.token = tok.read_text().strip()
                if self.admin_http("GetStatus", {}).get("health") == "SERVING":
                    return
            time.sleep(0.2)
        raise SystemExit(f"the plugin did not report SERVING:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL to whatever is left, and wait until
        none of it is left (the next server must not share the cores with it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---- swaps ---------------------------------------------------------------------------------------

def swaps(srv: Server, names: list[str], pairs: int, via: str) -> list[dict]:
    """`pairs` transplant + revert pairs of `names` from "donor" through the Admin API (gRPC or
    the JSON routes on vLLM's port): wall seconds at the client and the reported swap_seconds.
    After the first transplant, one completion checks its x-transplant-generation label."""
    recs = []
    c = C.Client(srv.grpc_port, srv.token) if via == "grpc" else None
    try:
        if c is not None:
            c.admin("GetStatus", c.A.GetStatusRequest())          # the channel is connected before timing

        def call(kind: str) -> dict:
            t0 = time.perf_counter()
            if c is not None:
                r = c.transplant("donor", names) if kind == "transplant" else c.revert()
                wall = time.perf_counter() - t0
                return {"kind": kind, "wall": wall, "server": r.swap_seconds, "generation": int(r.generation.id)}
            doc = srv.admin_http("Transplant", {"donor": "donor", "modules": names, "reason": "bench"}) \
                if kind == "transplant" else srv.admin_http("Revert", {"reason": "bench"})
            wall = time.perf_counter() - t0
            return {"kind": kind, "wall": wall, "server": float(doc.get("swap_seconds", 0.0)),
                    "generation": int(doc["generation"]["id"])}

        for i in range(pairs):
            a = call("transplant")
            if i == 0:
                _, headers = srv.complete()
                got = {k.lower(): v for k, v in headers.items()}.get("x-transplant-generation")
                if got is None or int(got) != a["generation"]:
                    raise SystemExit(f"after transplant to generation {a['generation']} a completion was labelled "
                                     f"{got!r}")
            recs += [a, call("revert")]
    finally:
        if c is not None:
            c.close()
    return recs


def metrics(srv: Server) -> dict[str, float]:
    """Our /metrics (the plugin's own HTTP port) as {sample name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def pause_means(srv: Server) -> dict[str, float]:
    """Mean transplant_swap_pause_seconds per kind: how long each swap held requests once
    none was running (the workers' loads, the commit, the label, the resume)."""
    got = metrics(srv)
    return {k: got[f'transplant_swap_pause_seconds_sum{{kind="{k}"}}'] /
            got[f'transplant_swap_pause_seconds_count{{kind="{k}"}}'] for k in ("transplant", "revert")}


def guard_trial(m, names: list[str], max_len: int, tmp: Path, args) -> dict:
    """A plugin server with a guarded probe (zoo:add, likelihood, a margin no candidate
    reaches: the pause is measured, not the verdict): each transplant is first installed
    with the gate shut and probed through vLLM. The pause, from our /metrics
    (transplant_guard_trial_seconds), and the transplant's time at the client."""
    plugin = {"model": m.target, "state_dir": str(tmp / "state-guard"), "donor_roots": [str(m.donor_root)],
              "zoo_donors": False, "guard": {"nll_margin": 1000.0},
              "probes": [{"task": "zoo:add", "examples": args.trial_examples, "guard": True,
                          "statistic": "likelihood", "interval_s": 86400}]}
    srv = Server(m.target, max_len, tmp, plugin)
    try:
        srv.wait()
        srv.complete()
        srv.wait_plugin()
        recs = swaps(srv, names, 2, args.admin)
        got = metrics(srv)
    finally:
        srv.stop()
    n = got.get("transplant_guard_trial_seconds_count", 0)
    if n != 2:
        raise SystemExit(f"expected 2 guard trials, /metrics says {n}")
    walls = [r["wall"] for r in recs if r["kind"] == "transplant"]
    return {"trial_s": [got["transplant_guard_trial_seconds_sum"] / n], "first_wall": walls[:1],
            "transplant_ms": [round(w * 1e3, 1) for w in walls]}


# ---- the run ---------------------------------------------------------------------------------------

def run(args) -> C.Result:
    if args.quick and not (args.target or args.donor):
        args.preset = "small"           # not tiny: vLLM's CPU attention has no kernel for its head_dim of 16
    args.quick = False
    m = C.models(args)
    from transplant_core.checkpoint import Checkpoint

    ckpt = Checkpoint.open(m.target)
    table, wbytes = ckpt.table, ckpt.weight_bytes          # weight bytes: the checkpoint's weight files
    names = pick_groups(table, args.k)
    conc = args.concurrency
    res = C.Result(PROG, C.command_line(PROG),
                   f"{m.label}, float32, {args.prompts} prompts x {args.tokens} tokens, vLLM's benchmark client; "
                   f"K={len(names)}, {args.swaps} transplant+revert pairs per server over {args.admin}")
    from .vllm import merged_checkpoint, merged_dir

    t0 = time.perf_counter()
    merged, reused = merged_checkpoint(m, names, merged_dir(args, m, f"merged-plugin-k{len(names)}"))
    details: dict = {"modules": names, "module_bytes": C.module_bytes(table, names), "weight_bytes": wbytes,
                     "merged_checkpoint": {"path": str(merged), "reused": reused,
                                           "write_s": round(time.perf_counter() - t0, 1)}}
    max_len = 32 + args.tokens + 8
    bench_runs: dict = {(k, c): [] for k in ("vllm", "plugin") for c in conc}
    mem: dict = {"vllm": [], "plugin": []}
    first_s: dict = {k: [] for k in KINDS}
    health_s: dict = {k: [] for k in KINDS}
    swap_recs: list[list[dict]] = []
    pauses: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-plugin-") as d:
        tmp = Path(d)
        for i in range(args.repeats):
            for kind in (KINDS if i % 2 == 0 else KINDS[::-1]):
                plugin = None
                if kind == "plugin":      # the donor root is scanned before SERVING: "donor" is registered
                    plugin = {"model": m.target, "state_dir": str(tmp / f"state-{i}"),
                              "donor_roots": [str(m.donor_root)], "probes": [], "zoo_donors": False}
                srv = Server(str(merged) if kind == "merged" else m.target, max_len, tmp, plugin)
                try:
                    health_s[kind].append(srv.wait())
                    _, headers = srv.complete()
                    first_s[kind].append(time.perf_counter() - srv.t0)
                    labelled = any(k.lower() == "x-transplant-generation" for k in headers)
                    if labelled != (kind == "plugin"):
                        raise SystemExit(f"{kind} server: x-transplant-generation "
                                         f"{'present' if labelled else 'missing'}")
                    if kind == "merged":
                        continue
                    if kind == "plugin":
                        srv.wait_plugin()
                    mem[kind].append(tree_memory(srv.proc.pid))        # after start-up and one request
                    client(srv.port, m.target, min(8, args.prompts), 4, 4)              # warm-up
                    for c in conc:
                        bench_runs[(kind, c)].append(client(srv.port, m.target, args.prompts, c, args.tokens))
                    if kind == "plugin":
                        swap_recs.append(swaps(srv, names, args.swaps, args.admin))
                        pauses.append(pause_means(srv))
                finally:
                    srv.stop()

        trial = guard_trial(m, names, max_len, tmp, args) if args.trial_examples else None

    # -- figures
    for c in conc:
        ours, base = bench_runs[("plugin", c)], bench_runs[("vllm", c)]
        res.add(f"plugin / vLLM tokens/s, {c} concurrent", ">= 0.98",
                [a["output_throughput"] / b["output_throughput"] for a, b in zip(ours, base)])
        res.add(f"plugin / vLLM p99 TTFT, {c} concurrent", "<= 1.05",
                [a["p99_ttft_ms"] / b["p99_ttft_ms"] for a, b in zip(ours, base)])
    f = res.add("RSS (plugin - vLLM) / weight bytes", "<= 0.05",
                [(a["rss"] - b["rss"]) / wbytes for a, b in zip(mem["plugin"], mem["vllm"])])
    if f.met() is False:
        f.note = "not met"
    trans = [[r for r in recs if r["kind"] == "transplant"] for recs in swap_recs]
    revs = [[r for r in recs if r["kind"] == "revert"] for recs in swap_recs]
    stored = [[r["wall"] for r in t[1:]] or [t[0]["wall"]] for t in trans]   # tensors already in the store
    # the swap an operator makes with a new donor writes its tensors: the first of each server
    res.add("transplant (new tensors) / new vLLM server", "<= 0.01",
            [t[0]["wall"] / n for t, n in zip(trans, first_s["merged"])])
    res.add("revert / new vLLM server", "<= 0.01",
            [C.median([r["wall"] for r in rv]) / n for rv, n in zip(revs, first_s["merged"])])
    res.add("transplant (new tensors), ms", "<= 100", [t[0]["wall"] * 1e3 for t in trans], unit="ms")
    res.add("transplant (tensors already stored), ms", "<= 100", [x * 1e3 for s in stored for x in s], unit="ms")
    res.add("revert, ms", "<= 100", [r["wall"] * 1e3 for rv in revs for r in rv], unit="ms")
    res.add("transplant: the swap's pause (requests held once none runs), ms", "<= 100",
            [p["transplant"] * 1e3 for p in pauses], unit="ms")
    res.add("revert: the swap's pause, ms", "<= 100", [p["revert"] * 1e3 for p in pauses], unit="ms")
    res.add("transplant, reported swap_seconds, ms", "report", [r["server"] * 1e3 for t in trans for r in t],
            unit="ms")
    res.add("revert, reported swap_seconds, ms", "report", [r["server"] * 1e3 for rv in revs for r in rv],
            unit="ms")

    if trial is not None:
        res.add(f"guard trial ({args.trial_examples} probe examples): requests held, ms", "report",
                [x * 1e3 for x in trial["trial_s"]], unit="ms")
        res.add("guarded / unguarded transplant (new tensors) at the client", "report",
                [g / t[0]["wall"] for g, t in zip(trial["first_wall"], trans)])
        details["guard_trial"] = trial
    ms = lambda xs: [round(x * 1e3, 1) for x in xs]   # noqa: E731
    details.update({
        "memory_mib": {k: [{x: (round(v / 2**20, 1) if x != "processes" else v) for x, v in r.items()} for r in rs]
                       for k, rs in mem.items()},
        "start_to_first_completion_s": {k: [round(x, 2) for x in v] for k, v in first_s.items()},
        "start_to_health_s": {k: [round(x, 2) for x in v] for k, v in health_s.items()},
        "transplant_ms": [ms([r["wall"] for r in t]) for t in trans],
        "transplant_server_ms": [ms([r["server"] for r in t]) for t in trans],
        "revert_ms": [ms([r["wall"] for r in rv]) for rv in revs],
        "revert_server_ms": [ms([r["server"] for r in rv]) for rv in revs],
        **{f"{k}@{c}": [{x: round(v, 2) for x, v in r.items()} for r in rs] for (k, c), rs in bench_runs.items()},
    })
    res.details.update(details)
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16],
                    help="concurrent requests of vLLM's client, comma separated (default 8,16)")
    ap.add_argument("--k", type=int, default=8, help="modules per transplant, whole fused groups (default 8)")
    ap.add_argument("--swaps", type=int, default=5, help="transplant+revert pairs per plugin server (default 5)")
    ap.add_argument("--trial-examples", type=int, default=16,
                    help="probe examples of the guard-trial server (0: skip it; default 16)")
    ap.add_argument("--admin", choices=("grpc", "http"), default="grpc",
                    help="the Admin API the swaps go through: gRPC, or JSON on vLLM's port (default grpc)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.prompts, args.tokens, args.concurrency, args.swaps = 1, 16, 16, [8], 3
        args.trial_examples = min(args.trial_examples, 4)
    return run(args)


if __name__ == "__main__":
    main()
