"""A fleet of three replicas (real `transplant serve` processes, a real etcd): time from
a Transplant call to every replica serving the new generation, against one standalone
server's own swap of the same modules, and against what operators do today without the
runtime: write the merged checkpoint (`transplant apply`) and restart the three replicas
onto it one at a time (a rolling restart, each back to SERVING before the next stops).

    python -m bench.fleet                # 300M Llama, K=8, 3 repeats (~6 min)
    python -m bench.fleet --quick        # tiny model, ~1 min

Fleet: the Transplant goes to replica c; a is the canary (`canaries: 1`) with no probe
window (`probe_window_s: 0`), so the figure is the mechanism's own cost: append to the
log, the canary installs and reports, promotion, the other two install. "All serving"
is when GetStatus on each replica says the new generation is live (polled every 20
ms). Each repeat then reverts (through the fleet, untimed) so the next transplants the
same bytes. Single: the same Transplant on a standalone server (in this process),
wall time of the call. Rolling restart: three standalone server processes; each repeat
restarts them onto the other checkpoint (merged, then the original: the same work),
SIGTERM (drain) to SERVING again, one after the other. `transplant apply` is timed
once and reported beside it. Needs etcd (Debian's etcd-server: deploy/setup.sh --test).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import common as C
from . import setup as bench_setup

PROG = "fleet"
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-fleet-token-0123456789"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """etcd on free loopback ports with its own data directory; stop() then start() keeps the data."""

    def __init__(self, work: Path, binary: str | None = None):
        self.binary = binary or shutil.which("etcd")
        if not self.binary:
            raise SystemExit("etcd is not installed: bash deploy/setup.sh --test (Debian's etcd-server)")
        self.dir = work / "etcd"
        self.log = work / "etcd.log"
        self.port, self.peer = free_port(), free_port()
        self.endpoint = f"etcd://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "EtcdProcess":
        url, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t", "--data-dir", str(self.dir), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/v3/kv/range", b'{"key":"eA=="}'), timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        raise RuntimeError(f"etcd did not start (see {self.log})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class ServerProcess:
    """`transplant serve --config` in a child process on free ports; start() waits for SERVING."""

    def __init__(self, cfg: dict, work: Path, name: str):
        self.cfg, self.work, self.name = dict(cfg), work, name
        self.proc = None

    def start(self, **changes) -> float:
        self.cfg.update(changes, grpc_listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}")
        path = self.work / f"{self.name}.json"
        path.write_text(json.dumps(self.cfg))
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(path)],
                                     stdout=open(self.work / f"{self.name}.log", "ab"), stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)
        self.port = int(self.cfg["grpc_listen"].rsplit(":", 1)[1])
        self.client = C.Client(self.port, TOKEN)
        self._wait_serving()
        return time.perf_counter() - t0

    def _wait_serving(self, timeout: float = 600) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.client.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited (see {self.work / (self.name + '.log')})")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    return
            except grpc.RpcError:      # not listening yet
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server {self.name} did not become SERVING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.client.close()

    def live(self) -> int:
        return self.client.admin("GetStatus", self.client.A.GetStatusRequest(), timeout=30).live_generation


def until_all(reps: list[ServerProcess], gen: int, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if all(r.live() == gen for r in reps):
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"generation {gen} did not reach every replica: {[(r.name, r.live()) for r in reps]}")


def run(args) -> C.Result:
    m = C.models(args)
    from transplant_core.workflow import open_model

    table = open_model(m.target).table
    modules = C.pick_modules(table, args.k)
    nbytes = C.module_bytes(table, modules)
    res = C.Result(PROG, C.command_line(PROG), f"{m.label}, 3 replicas, K={args.k} modules ({nbytes / 1e6:.1f} MB)")
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=bench_setup.bench_root()))
    (work / "token").write_text(TOKEN + "\n")
    base = {"model": m.target, "donor_roots": [str(m.donor_root)], "watch_donor_roots": False, "zoo_donors": False,
            "probes": [], "admin_token_file": str(work / "token")}
    etcd = EtcdProcess(work).start()
    reps: list[ServerProcess] = []
    fleet_s, rpc_s, single_s, restart_s = [], [], [], []
    try:
        for name in ("a", "b", "c"):
            r = ServerProcess(dict(base, state_dir=str(work / name), fleet={
                "etcd": etcd.endpoint, "name": "bench", "store": str(work / "store"), "replica": name,
                "canaries": 1, "probe_window_s": 0, "tick_s": 0.2}), work, name)
            r.start()
            reps.append(r)
        c = reps[2]
        c.client.admin("RegisterDonor", c.client.A.RegisterDonorRequest(name="donor", path=m.donor))
        with C.serving(m) as (_single, client):
            for rep in range(args.repeats):
                def fleet_once():
                    t0 = time.perf_counter()
                    gen = c.client.transplant("donor", modules).generation.id
                    t_rpc = time.perf_counter()
                    t_all = until_all(reps, gen)
                    fleet_s.append(t_all - t0)
                    rpc_s.append(t_rpc - t0)
                    back = c.client.revert().generation.id
                    until_all(reps, back)

                def single_once():
                    single_s.append(C.seconds(lambda: client.transplant("donor", modules)))
                    client.revert()

                for fn in ((fleet_once, single_once) if rep % 2 == 0 else (single_once, fleet_once)):
                    fn()
                print(f"  repeat {rep + 1}/{args.repeats}: fleet (all three serving) {fleet_s[-1]:.2f} s "
                      f"(call returned after {rpc_s[-1]:.2f} s), one server's swap {single_s[-1]:.3f} s", flush=True)
        for r in reps:
            r.stop()
        reps = []
        # today's way: the merged checkpoint, then a rolling restart of three standalone replicas
        merged = work / "merged"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", "apply", "--target", m.target, "--donor", m.donor,
                        "--modules", ",".join(modules), "--out", str(merged)], check=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
        apply_s = time.perf_counter() - t0
        for name in ("a", "b", "c"):
            r = ServerProcess(dict(base, state_dir=str(work / f"plain-{name}")), work, f"plain-{name}")
            r.start()
            reps.append(r)
        for rep in range(args.repeats):
            onto = str(merged) if rep % 2 == 0 else m.target
            t0 = time.perf_counter()
            for r in reps:
                r.stop()
                r.start(model=onto, state_dir=str(work / f"plain-{r.name}-{rep}"))
            restart_s.append(time.perf_counter() - t0)
            print(f"  repeat {rep + 1}/{args.repeats}: rolling restart of 3 replicas {restart_s[-1]:.1f} s", flush=True)
    finally:
        for r in reps:
            r.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    n = min(len(fleet_s), len(restart_s))
    res.add("fleet: transplant to all 3 serving / one server's swap", "report",
            [f / s for f, s in zip(fleet_s, single_s)])
    res.add("fleet: transplant to all 3 serving / rolling restart of 3", "report",
            [f / s for f, s in zip(fleet_s[:n], restart_s[:n])])
    res.add("fleet: transplant to all 3 serving / (apply + rolling restart)", "report",
            [f / (apply_s + s) for f, s in zip(fleet_s[:n], restart_s[:n])])
    res.details.update({"fleet_all_serving_s": [round(x, 3) for x in fleet_s],
                        "fleet_call_returned_s": [round(x, 3) for x in rpc_s],
                        "single_swap_s": [round(x, 4) for x in single_s],
                        "rolling_restart_s": [round(x, 2) for x in restart_s], "apply_s": round(apply_s, 2),
                        "modules": modules, "bytes": nbytes})
    return C.emit(res, args)


def main(argv=None) -> C.Result:
    ap = C.parser(PROG, __doc__)
    ap.set_defaults(repeats=3)
    ap.add_argument("--k", type=int, default=8, help="modules per transplant (default 8)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return run(args)


if __name__ == "__main__":
    main()
