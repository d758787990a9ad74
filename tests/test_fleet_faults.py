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
                                      "tick_s": 0.3, "etcd_timeout_s": 2.0, "rollout_timeout_s": 8, **spec})
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
