"""Fleet faults, each reproduced with three real replicas and a real etcd, every replica
behind its own TCP proxy (tests/netproxy.py) so one can be cut alone, and SIGSTOP for a
hung one: what a Transplant call reports must be what is true.

  - a reply lost after etcd applied the append: the call resolves it (landed), or
    reports UNKNOWN naming the record, and the same idempotency key resolves it later;
  - a canary that hangs: the call says the generation is pending in its canary phase
    (the CLI exits 3), the phase has a deadline (revert, or re-pick a live canary), and
    a replica silent a few seconds is never picked as a canary."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

import serverkit
from bench.fleet import EtcdProcess
from netproxy import Proxy
from serverkit import A, Clients

if shutil.which("etcd") is None:       # a missing etcd is a failure, not a skip: setup --test installs it
    raise RuntimeError("etcd is not installed: bash deploy/setup.sh --test (Debian's etcd-server)")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fleet-faults-token-0123456789"


class Replica:
    def __init__(self, name: str, cfg: dict, tmp: Path, proxy: Proxy):
        self.name, self.cfg, self.tmp, self.proxy = name, cfg, tmp, proxy
        self.proc, self.port, _ = serverkit.spawn(cfg, tmp)
        self.c = Clients(self.port, TOKEN)

    def live(self) -> int:
        return self.c.admin("GetStatus", A.GetStatusRequest(), timeout=10).live_generation

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.c.close()


def _fleet(tmp: Path, etcd, proxies: dict, **spec) -> dict:
    reps = {}
    for name in ("a", "b", "c"):
        d = tmp / name
        d.mkdir(exist_ok=True)
        cfg = serverkit.config(d, "zoo:v2", [], watch_donor_roots=False, probes=[],
                               admin_token_file=str(tmp / "token"),
                               fleet={"etcd": proxies[name].endpoint, "name": "faults", "store": str(tmp / "store"),
                                      "replica": name, "canaries": 1, "probe_window_s": 1.0, "lease_ttl_s": 4,
                                      "tick_s": 0.3, "etcd_timeout_s": 2.0, "rollout_timeout_s": 8, "cut_off_s": 4,
                                      "store_sweep_s": 2, "store_sweep_grace_s": 30, **spec})
        reps[name] = Replica(name, cfg, d, proxies[name])
    return reps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "token").write_text(TOKEN + "\n")
    etcd = EtcdProcess(tmp).start()
    proxies = {n: Proxy(etcd.port) for n in "abc"}
    state = {"reps": _fleet(tmp, etcd, proxies, canary_timeout_s=14), "tmp": tmp, "etcd": etcd, "proxies": proxies}
    try:
        yield state
    finally:
        for r in state["reps"].values():
            r.stop()
        for p in proxies.values():
            p.close()
        etcd.stop()


def head(rep) -> int:
    return rep.c.admin("GetFleet", A.GetFleetRequest(), timeout=10).head


def converge(reps, gen: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.live() == gen for r in reps):
            return
        time.sleep(0.2)
    raise AssertionError(f"not all replicas serve {gen}: {[(r.name, r.live()) for r in reps]}")


def settle(reps) -> int:
    """Wait until every replica serves the fleet's head and its rollout is decided."""
    g = head(reps["b"])
    converge(reps.values(), g)
    return g


def transplant(rep, module: str, key: str = "", timeout: float = 120):
    return rep.c.admin("Transplant", A.TransplantRequest(donor="v1", modules=[module], idempotency_key=key),
                       timeout=timeout)


def cli_transplant(rep, module: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server.cli", "admin", "--address", f"127.0.0.1:{rep.port}",
                           "--token", TOKEN, "transplant", "--donor", "v1", "--modules", module],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_lost_reply_to_an_append_that_landed_is_resolved_as_landed(world):
    """etcd applies b's append and the reply is lost: b fences the transaction off, reads
    the log, finds its record and carries on. Before: UNAVAILABLE "nothing changed"
    while the generation was head and live on the other replicas."""
    reps = world["reps"]
    g0 = settle(reps)
    reps["b"].proxy.set("lose_txn_reply")
    res = transplant(reps["b"], "layers.0.mlp.up", key="landed-1")
    assert reps["b"].proxy.txns >= 1 and reps["b"].proxy.mode == "pass"
    assert res.generation.id == g0 + 1 and res.rollout.live_here, res
    converge(reps.values(), g0 + 1)
    assert head(reps["a"]) == g0 + 1                   # one generation, not two


def test_an_unknown_outcome_says_so_and_its_key_resolves_it(world):
    """Every reply to b is lost from its append on: the call answers UNKNOWN naming the
    record (it landed: the others install it); once b hears etcd again, the same call
    with the same key returns that generation (replayed), and no second one is made."""
    reps = world["reps"]
    g0 = settle(reps)
    reps["b"].proxy.set("mute_after_txn")
    try:
        with pytest.raises(grpc.RpcError) as e:
            transplant(reps["b"], "layers.1.mlp.up", key="unknown-1")
        assert e.value.code() == grpc.StatusCode.UNKNOWN, e.value.details()
        assert f"generation {g0 + 1}" in e.value.details() and "idempotency key" in e.value.details()
        converge([reps["a"], reps["c"]], g0 + 1)         # it had landed
    finally:
        reps["b"].proxy.set("pass")
    converge(reps.values(), g0 + 1)
    again = transplant(reps["b"], "layers.1.mlp.up", key="unknown-1")
    assert again.replayed and again.generation.id == g0 + 1 and again.rollout.live_here
    assert sorted(again.rollout.serving) == ["a", "b", "c"] and again.rollout.replicas == 3
    assert head(reps["a"]) == g0 + 1
    gens = reps["a"].c.admin("ListGenerations", A.ListGenerationsRequest()).generations
    assert [g.idempotency_key for g in gens if g.idempotency_key == "unknown-1"] == ["unknown-1"]


def test_a_cut_off_replica_answers_getfleet_at_once_and_heals_without_tracebacks(world):
    """b's etcd is black-holed past its lease: GetFleet answers from what b last read
    (at most one etcd timeout for the call that finds out, then at once); after the heal
    b takes a new lease and reports again, with no traceback in its log."""
    reps = world["reps"]
    settle(reps)
    b = reps["b"]
    b.proxy.set("blackhole")
    try:
        time.sleep(6)                                     # past the 4 s lease
        t0 = time.monotonic()
        f = b.c.admin("GetFleet", A.GetFleetRequest(), timeout=10)
        assert not f.etcd_reachable and time.monotonic() - t0 < 3.0
        t0 = time.monotonic()
        b.c.admin("GetFleet", A.GetFleetRequest(), timeout=10)
        assert time.monotonic() - t0 < 0.5
        assert b.live() == head(reps["a"])               # still serving
    finally:
        b.proxy.set("pass")
    deadline = time.monotonic() + 30
    while not b.c.admin("GetFleet", A.GetFleetRequest()).etcd_reachable:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    while "b" not in {r.name for r in reps["a"].c.admin("GetFleet", A.GetFleetRequest()).replicas}:
        assert time.monotonic() < deadline, "b did not report again"
        time.sleep(0.3)
    logtext = (b.tmp / "server.log").read_text()
    assert "lease not found" not in logtext and "Traceback" not in logtext, logtext[-3000:]


def health(rep) -> str:
    return rep.c.admin("GetStatus", A.GetStatusRequest(), timeout=10).health


def test_a_cut_off_replica_stops_serving_a_generation_the_fleet_reverted(world):
    """b is cut off from etcd (its peers still reach it and it them) while the fleet
    reverts the generation b serves: past cut_off_s b learns it from a peer and reports
    NOT_SERVING (gRPC health, /health, metrics, GetFleet says why), so a load balancer
    stops sending it traffic; healed, it serves again and catches up. With every replica
    cut off (etcd itself down), nobody stops serving."""
    import urllib.request

    reps = world["reps"]
    settle(reps)
    res = transplant(reps["c"], "layers.2.mlp.gate")
    g = res.generation.id
    converge(reps.values(), g)
    b = reps["b"]
    http = json.loads(sorted(b.tmp.glob("cfg-*.json"))[-1].read_text())["http_listen"]
    b.proxy.set("blackhole")
    try:
        back = reps["c"].c.admin("Revert", A.RevertRequest(), timeout=60)
        converge([reps["a"], reps["c"]], back.generation.id)
        deadline = time.monotonic() + 30
        while health(b) != "NOT_SERVING":
            assert time.monotonic() < deadline, "b kept serving a reverted generation"
            time.sleep(0.3)
        assert b.live() == g
        f = b.c.admin("GetFleet", A.GetFleetRequest())
        assert f"reverted generation {g}" in f.fenced and not f.etcd_reachable
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{http}/health", timeout=5)
        assert e.value.code == 503
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "transplant_fleet_fenced 1.0" in text and "transplant_fleet_etcd_reachable 0.0" in text
    finally:
        b.proxy.set("pass")
    converge(reps.values(), back.generation.id)
    deadline = time.monotonic() + 30
    while health(b) != "SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    for r in reps.values():                       # etcd unreachable for everyone: all keep serving
        r.proxy.set("blackhole")
    try:
        time.sleep(8)
        assert [health(r) for r in reps.values()] == ["SERVING"] * 3
    finally:
        for r in reps.values():
            r.proxy.set("pass")
    settle(reps)


def test_a_replica_silent_for_seconds_is_not_picked_as_canary(world):
    """a (first by name, the canary so far) is stopped; 2.5 s later its lease (4 s) may
    not have expired but it has missed its renewals: b and c are picked among, b goes
    live, the rollout is promoted without a; a catches up when it comes back."""
    reps = world["reps"]
    g0 = settle(reps)
    reps["a"].signal(signal.SIGSTOP)
    try:
        time.sleep(2.5)
        res = transplant(reps["b"], "layers.2.mlp.up")
        assert res.rollout.live_here and list(res.rollout.canaries) == ["b"], res.rollout
        converge([reps["b"], reps["c"]], g0 + 1)
    finally:
        reps["a"].signal(signal.SIGCONT)
    converge(reps.values(), g0 + 1)


def test_a_hung_canary_is_pending_not_ok_and_its_deadline_reverts_the_fleet(world):
    """a is stopped just before the transplant, so it is still picked as the canary: the
    call returns after rollout_timeout_s saying the generation is pending in its canary
    phase on a and live on none (the CLI exits 3; before: "is live", exit 0). At the
    14 s canary deadline the fleet reverts it, and writes are not blocked."""
    reps = world["reps"]
    g0 = settle(reps)
    reps["a"].signal(signal.SIGSTOP)
    try:
        r = cli_transplant(reps["b"], "layers.3.mlp.up")
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"generation {g0 + 1}" in r.stdout and "NOT live on this server" in r.stdout, r.stdout
        assert "canaries a" in r.stdout and "live on 0 of" in r.stdout, r.stdout
        objects = sorted((world["tmp"] / "store" / "objects").iterdir())
        with pytest.raises(grpc.RpcError) as e:          # refused while the head is in its canary phase ...
            transplant(reps["c"], "layers.0.mlp.gate")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "canary phase" in e.value.details()
        assert sorted((world["tmp"] / "store" / "objects").iterdir()) == objects   # ... and wrote nothing
        deadline = time.monotonic() + 30
        while head(reps["b"]) != g0 + 2:                 # the revert the deadline makes
            assert time.monotonic() < deadline, "the canary deadline did not revert the rollout"
            time.sleep(0.3)
        f = reps["c"].c.admin("GetFleet", A.GetFleetRequest())
        gens = {g.id: g for g in reps["c"].c.admin("ListGenerations", A.ListGenerationsRequest()).generations}
        rev = json.loads(gens[g0 + 2].selection_json)
        assert gens[g0 + 2].kind == "revert" and rev["why"] == "canary" and "deadline" in rev["error"], rev
        assert f.head == g0 + 2
        converge([reps["b"], reps["c"]], g0 + 2)
        res = transplant(reps["c"], "layers.3.mlp.up")   # not blocked: a, silent now, is not picked
        assert res.rollout.live_here and res.generation.id == g0 + 3
    finally:
        reps["a"].signal(signal.SIGCONT)
    converge(reps.values(), g0 + 3)


def report_naming(asked, name: str, digest: str, deadline: float):
    """Replica `name`'s report in GetFleet (asked of `asked`) once its error names `digest`."""
    while True:
        rep = {r.name: r for r in asked.c.admin("GetFleet", A.GetFleetRequest()).replicas}.get(name)
        if rep is not None and digest in rep.error:
            return rep
        assert time.monotonic() < deadline, f"{name}'s report does not name the missing object {digest}"
        time.sleep(0.3)


def test_a_missing_object_is_retried_and_the_newest_verifiable_generation_served(world):
    """a was away for two generations; one object of the newer is missing from the shared
    store: a installs the older one (which it can verify), reports the newer's missing
    digest (GetFleet names it), retries with backoff and no traceback, and installs it
    once the object is back. Before: it stayed on what it had, refused the record for
    good, and never retried after the object was restored."""
    reps = world["reps"]
    g0 = settle(reps)
    a = reps["a"]
    mark = (a.tmp / "server.log").stat().st_size
    a.signal(signal.SIGSTOP)
    store = world["tmp"] / "store" / "objects"
    try:
        time.sleep(2.5)
        transplant(reps["c"], "layers.1.mlp.gate")
        g2 = transplant(reps["c"], "layers.3.mlp.gate").generation
        converge([reps["b"], reps["c"]], g2.id)
        digest = next(iter(g2.checksums.values()))
        (store / f"{digest}.safetensors").rename(world["tmp"] / "away.safetensors")
    finally:
        a.signal(signal.SIGCONT)
    try:
        deadline = time.monotonic() + 30
        while a.live() != g0 + 1:
            assert time.monotonic() < deadline, "a did not install the generation it can verify"
            time.sleep(0.3)
        rep = report_naming(reps["b"], "a", digest, deadline)
        assert rep.error_generation == g2.id and rep.behind == 1 and rep.live_generation == g0 + 1
        assert health(a) == "SERVING"
    finally:
        (world["tmp"] / "away.safetensors").rename(store / f"{digest}.safetensors")
    converge(reps.values(), g2.id, timeout=90)            # retried once the object is back
    assert "Traceback" not in (a.tmp / "server.log").read_text()[mark:]


def test_a_replica_restarted_on_its_state_dir_without_a_live_object_serves_what_it_can_verify(world):
    """a restarts on its own state directory after the object of the generation it served
    went missing from the shared store. Before: it refused to start (exit 2). Now it
    starts SERVING on the newest generation it can verify, its report names the missing
    digest, and it installs the head once the object is back."""
    reps = world["reps"]
    settle(reps)
    g1 = transplant(reps["b"], "layers.2.mlp.up").generation
    converge(reps.values(), g1.id)
    a = reps["a"]
    a.stop()
    store = world["tmp"] / "store" / "objects"
    digest = next(d for d in g1.checksums.values() if (store / f"{d}.safetensors").exists())
    (store / f"{digest}.safetensors").rename(world["tmp"] / "away.safetensors")
    try:
        mark = (a.tmp / "server.log").stat().st_size
        reps["a"] = a = Replica("a", a.cfg, a.tmp, a.proxy)      # the same state directory
        assert a.proc.poll() is None and health(a) == "SERVING" and a.live() < g1.id
        rep = report_naming(reps["b"], "a", digest, time.monotonic() + 30)
        # (the error names the last generation it tried: every one from the head down that names the object)
        assert g1.id >= rep.error_generation > rep.live_generation == a.live()
    finally:
        (world["tmp"] / "away.safetensors").rename(store / f"{digest}.safetensors")
    converge(reps.values(), g1.id, timeout=90)            # retried once the object is back
    assert "Traceback" not in (a.tmp / "server.log").read_text()[mark:]


def test_objects_no_record_names_are_swept_once_old(world):
    """The shared store's objects that no record of the fleet log names (a transplant that
    lost the race, a crash before its append) move to orphans/ once older than the
    grace period; a young one (an append may be on its way) and every named one stay."""
    store = world["tmp"] / "store" / "objects"
    named = sorted(store.iterdir())
    old, young = store / f"{'a' * 64}.safetensors", store / f"{'b' * 64}.safetensors"
    for f in (old, young):
        f.write_bytes(named[0].read_bytes())
    os.utime(old, (time.time() - 120, time.time() - 120))
    deadline = time.monotonic() + 30
    while old.exists():
        assert time.monotonic() < deadline, "the old orphan was not swept"
        time.sleep(0.3)
    assert (world["tmp"] / "store" / "orphans" / old.name).exists()
    assert young.exists() and all(f.exists() for f in named)
    young.unlink()


def test_past_the_deadline_a_stuck_canary_is_replaced(world):
    """With on_canary_timeout: repick, the stuck canary is replaced by a replica heard
    from recently, which installs it; the rollout is promoted and the rest install it."""
    for r in world["reps"].values():
        r.stop()
    world["reps"] = reps = _fleet(world["tmp"], world["etcd"], world["proxies"], canary_timeout_s=10,
                                  on_canary_timeout="repick")
    g0 = settle(reps)
    reps["a"].signal(signal.SIGSTOP)
    try:
        res = transplant(reps["b"], "layers.0.mlp.down")
        assert not res.rollout.live_here and list(res.rollout.canaries) == ["a"], res.rollout
        converge([reps["b"], reps["c"]], g0 + 1, timeout=40)
        f = reps["b"].c.admin("GetFleet", A.GetFleetRequest())
        assert f.rollout.generation == g0 + 1 and f.rollout.phase == "promoted" and "a" not in f.rollout.canaries
    finally:
        reps["a"].signal(signal.SIGCONT)
    converge(reps.values(), g0 + 1)


class EtcdCluster:
    """Three etcd members on loopback, one cluster."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.client = [serverkit.free_port() for _ in range(3)]
        self.peer = [serverkit.free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.endpoint = "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client)

    def start(self, i: int | None = None) -> "EtcdCluster":
        cluster = ",".join(f"m{j}=http://127.0.0.1:{self.peer[j]}" for j in range(3))
        for j in ([i] if i is not None else range(3)):
            url, peer = f"http://127.0.0.1:{self.client[j]}", f"http://127.0.0.1:{self.peer[j]}"
            self.procs[j] = subprocess.Popen(
                [shutil.which("etcd"), "--name", f"m{j}", "--data-dir", str(self.tmp / f"m{j}"),
                 "--listen-client-urls", url, "--advertise-client-urls", url, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", cluster,
                 "--initial-cluster-state", "new", "--initial-cluster-token", "faults"],
                stdout=open(self.tmp / f"m{j}.log", "ab"), stderr=subprocess.STDOUT)
        from server.fleet.etcd import Etcd, Unavailable

        e, deadline = Etcd(self.endpoint, 2.0), time.monotonic() + 60
        while True:                              # a leader, and a write through it
            try:
                e.put("/ready", "1")
                return self
            except Unavailable:
                assert time.monotonic() < deadline, "the etcd cluster did not form"
                time.sleep(0.3)

    def stop(self, i: int | None = None) -> None:
        for j in ([i] if i is not None else list(self.procs)):
            p = self.procs.pop(j, None)
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=20)


def test_a_cluster_of_three_keeps_the_fleet_writable_with_a_member_down(tmp_path):
    """`fleet.etcd` names every member; with the first member (the one requests went to)
    stopped, reads, transactions, leases and the watch fail over to the others, and a
    replica on the cluster still takes transplants. Before: a list was refused with an
    opaque urllib message, and one endpoint down meant no writes."""
    from server.fleet.etcd import Etcd, parse_endpoints

    with pytest.raises(ValueError, match="empty endpoint"):
        parse_endpoints("etcd://127.0.0.1:1,,127.0.0.1:2")
    with pytest.raises(ValueError, match="twice"):
        parse_endpoints("etcd://127.0.0.1:1,127.0.0.1:1")
    assert parse_endpoints("etcd://a:1,http://b:2,c:3") == [("a", 1), ("b", 2), ("c", 3)]
    cluster = EtcdCluster(tmp_path).start()
    (tmp_path / "token").write_text(TOKEN + "\n")
    rep = None
    try:
        cfg = serverkit.config(tmp_path / "r", "zoo:v2", [], watch_donor_roots=False, probes=[],
                               admin_token_file=str(tmp_path / "token"),
                               fleet={"etcd": cluster.endpoint, "name": "cluster", "store": str(tmp_path / "store"),
                                      "replica": "r", "canaries": 0, "lease_ttl_s": 4, "tick_s": 0.3,
                                      "etcd_timeout_s": 2.0, "rollout_timeout_s": 20})
        (tmp_path / "r").mkdir()
        proc, port, _ = serverkit.spawn(cfg, tmp_path / "r")
        rep = Clients(port, TOKEN)
        assert rep.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.mlp.up"])).rollout.live_here
        cluster.stop(0)
        e = Etcd(cluster.endpoint, 2.0)
        lease = e.grant(5)
        assert e.put("/k", "v", lease=lease) > 0 and e.get("/k").value == b"v" and e.keepalive(lease) > 0
        ok, _ = e.txn([], [{"requestPut": {"key": "L2s=", "value": "dg=="}}])
        assert ok
        res = rep.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.mlp.up"]))
        assert res.rollout.live_here and res.generation.id == 2
        f = rep.admin("GetFleet", A.GetFleetRequest())
        assert f.etcd_reachable and f.head == 2
    finally:
        if rep is not None:
            rep.close()
            proc.terminate()
            proc.wait(timeout=30)
        cluster.stop()


def test_the_policy_never_falls_back_to_a_reverted_generation_nor_repicks_a_stuck_canary():
    """Pure policy: with the head unbuildable, the fallback skips generations the fleet
    reverted; a re-pick takes replicas never tried as canaries, and none left is None."""
    from server.fleet import rollout

    recs = {0: {"id": 0, "kind": "load", "parent": None}, 1: {"id": 1, "kind": "transplant", "parent": 0},
            2: {"id": 2, "kind": "transplant", "parent": 1}, 3: {"id": 3, "kind": "revert", "parent": 2}}
    decided = {1: {"phase": "promoted"}, 2: {"phase": "promoted"}}
    assert rollout.target(recs, 0, "r", decided) == 3
    assert rollout.target(recs, 0, "r", decided, unbuildable={3}) == 1      # not 2: the fleet reverted it
    assert rollout.reverted(recs, {**decided, 1: {"phase": "failed"}}) == {1, 2}
    assert rollout.replace_stuck(["a"], ["a"], ["a", "b", "c"], 1) == ["b"]
    assert rollout.replace_stuck(["b"], ["b"], ["a", "b", "c"], 1, tried=["a", "b"]) == ["c"]
    assert rollout.replace_stuck(["c"], ["c"], ["a", "b", "c"], 1, tried=["a", "b", "c"]) is None
