"""A fleet: three real `transplant serve` processes coordinated through a real etcd
(Debian's etcd-server, started here on loopback), sharing one tensor store.

Replica a is the canary (the first by name) and the only one with probes (zoo:copy,
guarded); b and c have none, so a transplant the guard would refuse still gets past
the replica it is sent to, and only the canary can stop it."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

import serverkit
from bench.fleet import EtcdProcess as EtcdServer   # etcd on free loopback ports, its own data dir
from serverkit import A, Clients

if shutil.which("etcd") is None:       # a missing etcd is a failure, not a skip: setup --test installs it
    raise RuntimeError("etcd is not installed: bash deploy/setup.sh --test (Debian's etcd-server)")
FLEET = "test"
TOKEN = "fleet-test-token-0123456789"


class Replica:
    def __init__(self, name: str, cfg: dict, tmp: Path):
        self.name, self.cfg, self.tmp = name, cfg, tmp
        self.start()

    def start(self) -> None:
        self.proc, self.port, self.state = serverkit.spawn(self.cfg, self.tmp)
        self.http = json.loads(sorted(self.tmp.glob("cfg-*.json"))[-1].read_text())["http_listen"]
        self.c = Clients(self.port, TOKEN)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.c.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.c.close()

    def live(self) -> int:
        return self.c.admin("GetStatus", A.GetStatusRequest(), timeout=10).live_generation

    def journal(self) -> dict[int, dict]:
        recs = [json.loads(line) for line in (self.state / "journal.jsonl").read_text().splitlines()]
        return {r["id"]: r for r in recs if r.get("type") == "generation"}

    def alert(self, body: dict) -> dict:
        req = urllib.request.Request(f"http://{self.http}/alerts", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, broken_root):
    tmp = tmp_path_factory.mktemp("fleet")
    etcd = EtcdServer(tmp).start()
    (tmp / "token").write_text(TOKEN + "\n")
    reps = {}
    try:
        for name in ("a", "b", "c"):
            d = tmp / name
            d.mkdir()
            probes = [{"task": "zoo:copy", "examples": 48, "interval_s": 3600, "guard": True}] if name == "a" else []
            cfg = serverkit.config(d, "zoo:v2", [broken_root], watch_donor_roots=False, probes=probes,
                                   admin_token_file=str(tmp / "token"),
                                   fleet={"etcd": etcd.endpoint, "name": FLEET, "store": str(tmp / "store"),
                                          "replica": name, "canaries": 1, "probe_window_s": 1.0, "lease_ttl_s": 4,
                                          "tick_s": 0.3, "rollout_timeout_s": 60})
            reps[name] = Replica(name, cfg, d)
        yield etcd, reps
    finally:
        for r in reps.values():
            r.stop()
        etcd.stop()


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory):
    return serverkit.broken_donor(tmp_path_factory.mktemp("donors"))


def converge(reps, gen: int, timeout: float = 60) -> float:
    """Seconds until every replica serves `gen`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(r.live() == gen for r in reps):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"not all replicas serve {gen}: {[(r.name, r.live()) for r in reps]}")


def head(rep) -> int:
    return rep.c.admin("GetFleet", A.GetFleetRequest(), timeout=10).head


def transplant(rep, modules: str, donor: str = "v1"):
    return rep.c.admin("Transplant", A.TransplantRequest(donor=donor, modules=modules.split(",")), timeout=120)


def test_a_transplant_sent_to_one_replica_reaches_all_three(fleet):
    _, reps = fleet
    b, c = reps["b"], reps["c"]
    before = head(c)
    res = transplant(c, "layers.0.mlp.down")
    gen = res.generation.id
    assert gen == before + 1 and res.generation.live
    took = converge(reps.values(), gen, timeout=30)
    for r in reps.values():              # every answer tagged with the same fleet-wide id
        assert {r.c.generate("abc", 4).generation for _ in range(3)} == {gen}
        assert [g.id for g in r.c.admin("ListGenerations", A.ListGenerationsRequest()).generations][-1] == gen
    f = b.c.admin("GetFleet", A.GetFleetRequest())
    assert f.enabled and f.head == gen and f.etcd_reachable
    assert f.rollout.phase == "promoted" and list(f.rollout.canaries) == ["a"]
    assert sorted(f.rollout.serving) == ["a", "b", "c"]
    assert {x.name: x.live_generation for x in f.replicas} == {"a": gen, "b": gen, "c": gen}
    # the same record on every replica, the canary first
    recs = {r.name: r.journal()[gen] for r in reps.values()}
    assert len({json.dumps({k: v for k, v in x.items() if k != "skipped"}, sort_keys=True)
                for x in recs.values()}) == 1
    assert recs["a"]["replica"] == "c" and recs["a"]["rollout"]["canaries"] == ["a"]
    print(f"all three serve generation {gen} {took:.1f} s after the Transplant call returned")


def test_a_lowrank_transplant_reaches_every_replica_as_factors(fleet):
    """b appends a low-rank generation: its factors go to the shared store, and a (the
    canary) and c rebuild the weights from them, to the digests b recorded."""
    etcd, reps = fleet
    b = reps["b"]
    res = b.c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.mlp.*"], rank=4), timeout=120)
    gen = res.generation.id
    assert set(res.generation.ranks.values()) == {4} and len(res.generation.ranks) == 3
    converge(reps.values(), gen, timeout=30)
    recs = {r.name: r.journal()[gen] for r in reps.values()}
    assert len({json.dumps({k: v for k, v in x.items() if k != "skipped"}, sort_keys=True)
                for x in recs.values()}) == 1
    rec = recs["a"]
    assert len(rec["derived"]) == 3 and set(rec["derived"]) <= set(rec["state"].values())
    objects = {p.stem for p in (Path(b.cfg["fleet"]["store"]) / "objects").iterdir()}
    assert {d for x in rec["derived"].values() for d in (x["B"], x["A"])} <= objects
    assert not set(rec["derived"]) & objects                 # the weights themselves were never stored
    texts = {r.name: [r.c.generate(p, 8).text for p in ("add:12+30=", "rev:abc=")] for r in reps.values()}
    assert texts["a"] == texts["b"] == texts["c"]
    # c misses a low-rank generation: the next one's weights name it, and c rebuilds them from its factors
    c = reps["c"]
    c.stop()
    low = b.c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.mlp.*"], rank=2), timeout=120)
    after = transplant(b, "layers.3.attn.o").generation.id
    c.start()
    converge(reps.values(), after, timeout=60)
    journal = c.journal()
    assert journal[low.generation.id]["skipped"] and journal[low.generation.id]["derived"]
    assert not journal[after].get("skipped")
    assert [c.c.generate(p, 8).text for p in ("add:12+30=", "rev:abc=")] == \
        [b.c.generate(p, 8).text for p in ("add:12+30=", "rev:abc=")]


def test_two_transplants_at_once_exactly_one_wins(fleet):
    _, reps = fleet
    b, c = reps["b"], reps["c"]
    start = head(b)
    barrier, out = threading.Barrier(2), {}

    def send(rep, modules):
        barrier.wait()
        try:
            out[rep.name] = transplant(rep, modules).generation.id
        except grpc.RpcError as e:
            out[rep.name] = e

    ts = [threading.Thread(target=send, args=(b, "layers.1.mlp.down")),
          threading.Thread(target=send, args=(c, "layers.2.mlp.down"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    won = [n for n, v in out.items() if isinstance(v, int)]
    lost = [v for v in out.values() if not isinstance(v, int)]
    assert len(won) == 1 and len(lost) == 1, out
    assert out[won[0]] == start + 1
    assert lost[0].code() == grpc.StatusCode.ABORTED
    assert f"generation {start + 1}" in lost[0].details() and "appended first" in lost[0].details()
    converge(reps.values(), start + 1)
    assert head(b) == start + 1                  # nothing else was appended


def test_an_alert_on_one_replica_reverts_the_fleet_once(fleet):
    _, reps = fleet
    a, b, c = reps["a"], reps["b"], reps["c"]
    gen = head(a)
    parent = a.journal()[gen]["parent"]
    alert = {"alerts": [{"status": "firing", "fingerprint": "fp-1", "labels": {
        "alertname": "TransplantQualityRegression", "generation": str(gen), "task": "zoo:copy"}}]}
    answers = []
    ts = [threading.Thread(target=lambda r=r: answers.append(r.alert(alert))) for r in (b, c)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    actions = sorted(d["decisions"][0]["action"] for d in answers)
    assert actions == ["none", "reverted"], answers
    new = next(d["decisions"][0]["generation"] for d in answers if d["decisions"][0]["action"] == "reverted")
    assert new == gen + 1
    converge(reps.values(), new)
    # repeats, on any replica, and the resolved notification change nothing
    again = a.alert(alert)["decisions"][0]
    assert again["action"] == "none" and "not the fleet's head" in again["reason"]
    resolved = {"alerts": [dict(alert["alerts"][0], status="resolved")]}
    assert b.alert(resolved)["decisions"][0]["action"] == "none"
    assert head(a) == new                          # decisions are taken before the reply: nothing appended
    for r in reps.values():
        rec = r.journal()[new]
        assert rec["kind"] == "revert" and rec["reverted_to"] == parent and rec["selection"]["why"] == "alert"
        assert rec["selection"]["fingerprint"] == "fp-1"
        assert sum(1 for x in r.journal().values() if x.get("selection", {}).get("why") == "alert") == 1


def test_a_canary_whose_probes_regress_is_reverted_before_the_others_install_it(fleet, broken_root):
    _, reps = fleet
    a, c = reps["a"], reps["c"]
    start = head(c)
    c.c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_root / "broken")))
    with pytest.raises(grpc.RpcError) as e:          # c has no probes: its own guard lets it through
        transplant(c, "layers.*.mlp.down", donor="broken")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "canary a could not install" in e.value.details() and "guard refused" in e.value.details()
    bad, back = start + 1, start + 2
    converge(reps.values(), back)
    for r in reps.values():
        j = r.journal()
        assert j[bad]["kind"] == "transplant" and j[bad].get("skipped") is True, r.name   # never live anywhere
        assert j[back]["kind"] == "revert" and j[back]["reverted_to"] == start
        assert j[back]["selection"]["why"] == "canary" and j[back]["selection"]["canary"] == "a"
        assert j[back]["state"] == j[start]["state"]
    deadline = time.monotonic() + 10                 # the reports follow the installs
    while True:
        f = a.c.admin("GetFleet", A.GetFleetRequest())
        settled = sorted(f.rollout.serving) == ["a", "b", "c"] and all(x.error == "" for x in f.replicas)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert f.head == back and sorted(f.rollout.serving) == ["a", "b", "c"]
    assert all(x.error == "" for x in f.replicas), f.replicas


def test_with_etcd_down_replicas_serve_and_writes_are_unavailable(fleet):
    etcd, reps = fleet
    gen = head(reps["a"])
    etcd.stop()
    try:
        for r in reps.values():
            assert r.c.generate("abc", 4).generation == gen
            health = r.c.admin("GetStatus", A.GetStatusRequest()).health
            assert health == "SERVING"
        with pytest.raises(grpc.RpcError) as e:
            transplant(reps["b"], "layers.3.mlp.down")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and etcd.endpoint in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            reps["c"].c.admin("Revert", A.RevertRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        f = reps["a"].c.admin("GetFleet", A.GetFleetRequest())
        assert not f.etcd_reachable and etcd.endpoint in f.etcd_error
        assert all(r.live() == gen for r in reps.values())
    finally:
        etcd.start()
    deadline = time.monotonic() + 30
    while not reps["b"].c.admin("GetFleet", A.GetFleetRequest()).etcd_reachable:
        assert time.monotonic() < deadline, "the replicas did not see etcd come back"
        time.sleep(0.3)
    res = transplant(reps["b"], "layers.3.mlp.down")
    converge(reps.values(), res.generation.id)


def test_a_replica_killed_mid_rollout_catches_up_and_the_others_carry_on(fleet):
    _, reps = fleet
    a, b, c = reps["a"], reps["b"], reps["c"]
    start = head(a)
    done = {}
    t = threading.Thread(target=lambda: done.update(r=transplant(c, "layers.0.attn.q")))
    t.start()
    deadline = time.monotonic() + 30
    while head(a) == start:                          # appended: the canary phase has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.kill9()
    t.join()
    gen = done["r"].generation.id
    converge([a, c], gen)
    f = a.c.admin("GetFleet", A.GetFleetRequest())
    deadline = time.monotonic() + 15                 # b's lease expires: it drops out of the view
    while "b" in {x.name for x in f.replicas}:
        assert time.monotonic() < deadline, "a dead replica's report did not expire"
        time.sleep(0.5)
        f = a.c.admin("GetFleet", A.GetFleetRequest())
    b.start()                                        # same state directory
    converge([a, b, c], gen, timeout=30)
    assert b.c.generate("abc", 4).generation == gen
    assert b.journal()[gen]["state"] == a.journal()[gen]["state"]


def test_a_replica_of_another_model_is_refused_by_name(fleet, tmp_path):
    etcd, reps = fleet
    cfg = serverkit.config(tmp_path, "zoo:v1", [], watch_donor_roots=False, probes=[],
                           admin_token_file=str(reps["a"].tmp.parent / "token"),
                           fleet={"etcd": etcd.endpoint, "name": FLEET, "store": str(tmp_path / "store"),
                                  "replica": "intruder"})
    with pytest.raises(RuntimeError, match="server exited"):
        serverkit.spawn(cfg, tmp_path)
    log = (tmp_path / "server.log").read_text()
    assert "is not fleet test's" in log and "zoo:v1" in log and "Traceback" not in log
    assert "intruder" not in {x.name for x in reps["a"].c.admin("GetFleet", A.GetFleetRequest()).replicas}


# ---- the parts without servers -------------------------------------------------------------

def test_rollout_policy():
    from server.fleet import rollout as R

    assert R.pick_canaries(1, ["c", "a", "b"]) == ["a"]
    assert R.pick_canaries(0.5, ["c", "a", "b"]) == ["a", "b"]          # a fraction, rounded up
    assert R.pick_canaries(0, ["a", "b"]) == [] and R.pick_canaries(5, ["b"], origin="a") == ["a", "b"]
    t = {"id": 3, "parent": 2, "kind": "transplant", "rollout": {"canaries": ["a"]}}
    recs = {2: {"id": 2, "kind": "revert"}, 3: t}
    assert R.target(recs, 1, "a", {}) == 3                 # the canary installs the head at once
    assert R.target(recs, 1, "b", {}) == 2                 # the rest wait, but take what came before
    assert R.target(recs, 2, "b", {3: {"phase": "promoted"}}) == 3
    assert R.target(recs, 2, "a", {3: {"phase": "failed"}}) is None
    reps = {"a": {"live": 2, "error": {"generation": 3, "message": "the guard refused"}}}
    v = R.judge(t, reps, None, 0.0, 5.0)
    assert v.action == "fail" and v.failed == "a" and "guard refused" in v.why
    reps = {"a": {"live": 3}}
    assert R.judge(t, reps, None, 0.0, 5.0).action == "wait"
    assert R.judge(t, reps, 10.0, 12.0, 5.0).action == "wait"
    assert R.judge(t, reps, 10.0, 15.5, 5.0).action == "promote"
    assert R.judge(t, {}, None, 0.0, 5.0).waiting_for == ["a"]      # a canary that does not report holds it


def test_etcd_client_parts():
    from server.fleet.etcd import _Chunked, parse_endpoint, prefix_end

    assert parse_endpoint("etcd://10.0.0.1:2379") == ("10.0.0.1", 2379)
    assert parse_endpoint("http://etcd:2379") == ("etcd", 2379)
    for bad in ("etcd://host", "ftp://h:1", "etcd://h:1/x"):
        with pytest.raises(ValueError, match="etcd://HOST:PORT"):
            parse_endpoint(bad)
    assert prefix_end("/a/") == "/a0"
    c = _Chunked()
    body = b'{"x":1}\n{"y":2}\n'
    wire = b"%x\r\n%s\r\n" % (5, body[:5]) + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
    got = [line for i in range(len(wire)) for line in c.feed(wire[i:i + 1])]     # byte by byte
    assert got == [b'{"x":1}', b'{"y":2}']


def test_fleet_configuration_errors(tmp_path):
    import argparse

    from server.cli.serve import config_from_args, register
    from transplant_core.errors import InvalidArgument

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    with pytest.raises(InvalidArgument, match="--fleet-name needs --fleet etcd://HOST:PORT"):
        config_from_args(ap.parse_args(["serve", "--fleet-name", "x"]))
    with pytest.raises(InvalidArgument, match="etcd://HOST:PORT"):
        config_from_args(ap.parse_args(["serve", "--fleet", "localhost", "--fleet-name", "x", "--fleet-store", "/s"]))
    with pytest.raises(InvalidArgument, match="fleet.store"):
        config_from_args(ap.parse_args(["serve", "--fleet", "etcd://h:2379", "--fleet-name", "x"]))
    cfg = config_from_args(ap.parse_args(["serve", "--fleet", "etcd://h:2379", "--fleet-name", "x",
                                          "--fleet-store", str(tmp_path), "--replica-name", "r1"]))
    assert cfg.fleet.name == "x" and cfg.fleet.replica == "r1" and cfg.fleet.canaries == 1
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"fleet": {"etcd": "etcd://h:1", "name": "n", "store": "/s", "canaries": 2}}))
    cfg = config_from_args(ap.parse_args(["serve", "--config", str(f), "--replica-name", "r2"]))
    assert cfg.fleet.canaries == 2 and cfg.fleet.replica == "r2" and cfg.fleet.etcd == "etcd://h:1"


def test_a_bad_object_in_the_store_is_reported_and_the_rollout_stops(fleet):
    """A record whose tensor object does not match its digest (a corrupted store): the
    canary refuses it, names the object, and the fleet reverts before anyone serves it."""
    from server.fleet.etcd import Etcd
    from server.fleet.log import FleetLog

    etcd, reps = fleet
    a = reps["a"]
    log = FleetLog(Etcd(etcd.endpoint), FLEET)
    head = log.head()
    recs, _ = log.records(head - 1)
    h = recs[head]
    key = "model.layers.1.mlp.up_proj.weight"
    digest = "0" * 64
    store = Path(a.cfg["fleet"]["store"]) / "objects"
    shutil.copy(next(store.glob("*.safetensors")), store / f"{digest}.safetensors")   # bytes of another tensor
    bad = dict(h, id=head + 1, parent=head, kind="transplant", donor="corrupt", modules=["layers.1.mlp.up"],
               checksums={key: digest}, state={**h["state"], key: digest}, replica="test",
               rollout={"canaries": ["a"]}, selection={"method": "explicit"}, reverted_to=None)
    log.append(bad)
    back = head + 2
    converge(reps.values(), back)
    for r in reps.values():
        j = r.journal()
        assert j[head + 1].get("skipped") is True and j[back]["selection"]["why"] == "canary", r.name
        assert "does not match its digest" in j[back]["selection"]["error"]
        assert j[back]["state"] == h["state"]
