"""Alert webhook semantics, the guard, and the end-to-end rollback through a real
Prometheus and Alertmanager started from the files in deploy/."""
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

import serverkit
from serverkit import A, Clients, config, free_port, start
from tiny import make_model, save
from transplant_core import transplant as tp

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def post(port, body, token=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def alert(gen, status="firing", name="TransplantQualityRegression", fp="abc123"):
    return {"version": "4", "status": status, "receiver": "transplant-rollback", "groupLabels": {},
            "alerts": [{"status": status, "labels": {"alertname": name, "generation": str(gen), "task": "zoo:copy"},
                        "annotations": {}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": fp}]}


def live_sums(s):
    gens = s.runtime.gens
    return tp.checksums(gens.live.model, sorted(gens.records[0].checksums))


@pytest.fixture()
def tiny_server(tmp_path):
    save(make_model("llama", 0), tmp_path / "target")
    save(make_model("llama", 1), tmp_path / "donors" / "other")
    s = start(config(tmp_path, tmp_path / "target", [tmp_path / "donors"], watch_donor_roots=False))
    c = Clients(s.grpc_port, s.token)
    c.admin("RegisterDonor", A.RegisterDonorRequest(name="other", path=str(tmp_path / "donors" / "other")))
    yield s, c
    c.close()
    s.stop(1)


def test_webhook_reverts_the_live_generation_once(tiny_server):
    s, c = tiny_server
    port, token = s.http_port, s.token
    sums0 = live_sums(s)
    assert post(port, alert(0), None)[0] == 401
    assert post(port, alert(0), "wrong-token-wrong-token")[0] == 401
    assert post(port, None, token, raw=b"{not json")[0] == 400
    assert post(port, {"alerts": "nope"}, token)[0] == 400
    code, body = post(port, alert(0), token)
    assert code == 200 and body["decisions"][0]["action"] == "none" and "nothing to revert" in body["decisions"][0]["reason"]
    c.admin("Transplant", A.TransplantRequest(donor="other", modules=["layers.*.mlp.*"]))
    assert live_sums(s) != sums0
    for doc, why in ((alert(1, status="resolved"), "not firing"), (alert(1, name="Other"), "not a rollback alert"),
                     (alert(7), "not live"), ({"alerts": [{"status": "firing", "labels": {"alertname": "TransplantQualityRegression"}}]},
                                              "no numeric 'generation'")):
        code, body = post(port, doc, token)
        assert code == 200 and body["decisions"][0]["action"] == "none" and why in body["decisions"][0]["reason"], body
    assert s.runtime.gens.live.id == 1
    code, body = post(port, alert(1, fp="fp-1"), token)
    assert code == 200 and body["decisions"][0]["action"] == "reverted" and body["decisions"][0]["generation"] == 2
    assert live_sums(s) == sums0
    rec = s.runtime.gens.records[2]
    assert rec.reason == "alert" and rec.selection["fingerprint"] == "fp-1" and rec.reverted_to == 0
    code, body = post(port, alert(1, fp="fp-1"), token)        # a repeat of the same alert
    assert code == 200 and body["decisions"][0]["action"] == "none"
    assert sorted(s.runtime.gens.records) == [0, 1, 2]


def _scrape(port) -> dict:
    """/metrics as {(name, {labels}): value}, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(x.name, frozenset(x.labels.items())): x.value for f in text_string_to_metric_families(text) for x in f.samples}


def _sample(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())))


def _scrape_until(port, what, cond, timeout=60):
    """Scrape until `cond(metrics)` holds (returns those metrics), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _scrape(port)
        if cond(m):
            return m
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s")


def test_a_failing_probe_withdraws_its_quality_until_one_succeeds(tmp_path):
    """A periodic probe that fails in the engine (CUDA out of memory on the copy probe's
    batch) is counted by reason, and its task's quality leaves /metrics, so the last good
    value is not what Prometheus sees; the other task's probe keeps exporting, and the
    next good probe brings the series back."""
    import torch

    save(make_model("llama", 0), tmp_path / "target")
    s = start(config(tmp_path, tmp_path / "target", [], watch_donor_roots=False, eval_max_new_tokens=4,
                     probes=[{"task": "zoo:copy", "examples": 12, "interval_s": 0.5},
                             {"task": "zoo:rev", "examples": 8, "interval_s": 0.5}]))
    copy, rev = {"task": "zoo:copy", "generation": "0"}, {"task": "zoo:rev", "generation": "0"}
    acc, fails = "transplant_quality_accuracy", "transplant_quality_probe_failures_total"
    last = "transplant_quality_last_success_timestamp_seconds"
    series = [acc, "transplant_quality_samples", "transplant_quality_measured_timestamp_seconds"]

    def out_of_memory(module, args, kwargs):
        if kwargs["input_ids"].shape[0] == 12:           # the copy probe's rows, not rev's 8
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def failures(m):
        return _sample(m, fails, task="zoo:copy", reason="OutOfMemoryError") or 0

    try:
        m = _scrape(s.http_port)
        assert all(_sample(m, n, **copy) is not None for n in series) and _sample(m, acc, **rev) is not None
        assert _sample(m, "transplant_quality_probe_interval_seconds", task="zoo:copy") == 0.5
        assert _sample(m, last, task="zoo:copy") == _sample(m, "transplant_quality_measured_timestamp_seconds", **copy)
        assert not any(k[0] == fails for k in m)
        hook = s.runtime.gens.live.model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
        try:
            m = _scrape_until(s.http_port, "failed copy probe", lambda m: failures(m) >= 1)
            assert all(_sample(m, n, **copy) is None for n in series)   # withdrawn before it is counted
            frozen = _sample(m, last, task="zoo:copy")
            _scrape_until(s.http_port, "repeated failures", lambda m: failures(m) >= 3)
            # rev's next good probe re-exports every task: the first scrape after it
            seen = time.time()
            m = _scrape_until(s.http_port, "a good rev probe", lambda m: _sample(m, last, task="zoo:rev") > seen)
            assert all(_sample(m, n, **copy) is None for n in series), "rev's export brought copy's last good one back"
            assert _sample(m, last, task="zoo:copy") == frozen and _sample(m, acc, **rev) is not None
            assert not any(k[0] == fails and dict(k[1])["task"] == "zoo:rev" for k in m)
        finally:
            hook.remove()
        m = _scrape_until(s.http_port, "copy quality back", lambda m: _sample(m, acc, **copy) is not None)
        assert _sample(m, last, task="zoo:copy") > frozen and failures(m) >= 3
        assert _sample(m, acc, **copy) == s.runtime.quality.latest(0, "zoo:copy").accuracy
    finally:
        s.stop(1)


# ---- with the embedded family: real task quality ----------------------------------------------

@pytest.fixture(scope="module")
def broken_donor(tmp_path_factory):
    return serverkit.broken_donor(tmp_path_factory.mktemp("donors"))


def zoo_config(tmp_path, roots, **kw):
    return config(tmp_path, "zoo:v2", roots, watch_donor_roots=False, eval_examples=48, **kw)


def test_guard_refuses_a_harmful_transplant(tmp_path, broken_donor):
    s = start(zoo_config(tmp_path, [broken_donor], probes=[{"task": "zoo:copy", "examples": 48, "guard": True}]))
    c = Clients(s.grpc_port, s.token)
    try:
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        sums = live_sums(s)
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "guard refused" in e.value.details()
        assert live_sums(s) == sums and s.runtime.gens.live.id == 0
        events = [r for r in s.runtime.gens.journal.records if r.get("type") == "event"]
        assert events[-1]["reason"] == "guard" and events[-1]["violations"][0]["task"] == "zoo:copy"
        # a low-rank move is judged the same way: at full rank it is the broken weights
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"], rank=10_000))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "guard refused" in e.value.details()
        assert live_sums(s) == sums and s.runtime.gens.live.id == 0 and not s.runtime.gens.records[0].derived
        # a harmless change (one module from the sibling v1) goes through
        ok = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.attn.q"]))
        assert ok.generation.id == 1
        # and a low-rank one, probed before and after it went live like any generation
        low = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.attn.*"], rank=4))
        assert low.generation.id == 2 and set(low.generation.ranks.values()) == {4}
        assert {(q.task, q.generation) for q in low.generation.quality} >= {("zoo:copy", 2)}
    finally:
        c.close()
        s.stop(1)


def test_guard_in_revert_mode_takes_it_back(tmp_path, broken_donor):
    s = start(zoo_config(tmp_path, [broken_donor], probes=[{"task": "zoo:copy", "examples": 48, "guard": True}],
                         guard={"mode": "revert"}))
    c = Clients(s.grpc_port, s.token)
    try:
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        sums = live_sums(s)
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "reverted generation 1" in e.value.details()
        g = s.runtime.gens
        assert g.live.id == 2 and g.records[2].reason == "guard" and live_sums(s) == sums
    finally:
        c.close()
        s.stop(1)


def _prometheus_config(tmp, http_port, am_port):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{http_port}"]
    cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r["for"] = "0s"
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    cfg["rule_files"] = [str(tmp / "alerts.yml")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    return tmp / "prometheus.yml"


def _alertmanager_config(tmp, http_port, token_file):
    cfg = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1m")
    hook = cfg["receivers"][0]["webhook_configs"][0]
    hook["url"] = f"http://127.0.0.1:{http_port}/alerts"
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(cfg))
    return tmp / "alertmanager.yml"


def _binary(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `bash deploy/setup.sh --test` installs it")
    return path


def _query(port, q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_alert_fires_and_the_server_rolls_back(tmp_path, broken_donor, capsys):
    s = start(zoo_config(tmp_path, [broken_donor],
                         probes=[{"task": "zoo:copy", "examples": 48, "interval_s": 1.0, "guard": False}]))
    c = Clients(s.grpc_port, s.token)
    am_port, prom_port = free_port(), free_port()
    procs = []
    try:
        logs = open(tmp_path / "monitoring.log", "wb")
        procs.append(subprocess.Popen(
            [_binary("prometheus-alertmanager"), f"--config.file={_alertmanager_config(tmp_path, s.http_port, s.cfg.token_file)}",
             f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            stdout=logs, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [_binary("prometheus"), f"--config.file={_prometheus_config(tmp_path, s.http_port, am_port)}",
             f"--storage.tsdb.path={tmp_path / 'prom'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _query(prom_port, 'up{job="transplant"} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus never scraped the server: " + (tmp_path / "monitoring.log").read_text()[-2000:])
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        sums0 = live_sums(s)
        res = c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"]))
        t_swap = time.monotonic()
        bad = res.generation.id
        g = s.runtime.gens
        harmed = s.runtime.quality.latest(bad, "zoo:copy").accuracy
        base = s.runtime.quality.latest(0, "zoo:copy").accuracy
        assert base - harmed > 0.10, (base, harmed)          # the swap really harms the probed task
        # no further call: Prometheus evaluates the rule, Alertmanager posts, the server reverts
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and g.live.id == bad:
            time.sleep(0.1)
        t_revert = time.monotonic()
        assert g.live.id != bad, "no rollback within 120 s: " + (tmp_path / "monitoring.log").read_text()[-3000:]
        rec = g.records[g.live.id]
        assert rec.kind == "revert" and rec.reason == "alert" and rec.reverted_to == 0 and rec.selection["fingerprint"]
        assert live_sums(s) == sums0
        # the quality metric recovers: the new live generation scores like the parent
        deadline = time.monotonic() + 30
        series = []
        while time.monotonic() < deadline:
            series = _query(prom_port, f'transplant_quality_accuracy{{task="zoo:copy",generation="{rec.id}"}}')
            if series:
                break
            time.sleep(0.5)
        assert series and float(series[0]["value"][1]) == pytest.approx(base)
        # the alert resolves (the reverted generation scores like the parent) and Alertmanager
        # sends the resolved notice (send_resolved, group_interval 1s): it changes nothing
        reg = s.runtime.metrics.registry
        ignored = lambda: reg.get_sample_value("transplant_alerts_received_total", {"outcome": "ignored"}) or 0  # noqa: E731
        deadline = time.monotonic() + 120
        while ignored() < 1:
            assert time.monotonic() < deadline, "the resolved notice never reached the server"
            time.sleep(0.5)
        assert g.live.id == rec.id and sum(r.reason == "alert" for r in g.records.values()) == 1
        with capsys.disabled():
            print(f"\n[alerting e2e] harmful swap (copy {base:.3f} -> {harmed:.3f}) to automatic revert: "
                  f"{t_revert - t_swap:.1f} s")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        c.close()
        s.stop(1)
