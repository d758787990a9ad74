"""Quality from likelihoods: each probe example's reference-answer NLL and the KL from the
parent's next-token distributions, computed on the model the server serves with, and a
guard on them that sees a regression the accuracy guard, with as few probe examples,
cannot tell from noise."""
from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
import torch

from serverkit import A, Clients, config, start
from transplant_core import likelihood as L
from transplant_core.checkpoint import load_model
from transplant_core.tasks import load_task


@pytest.fixture(scope="module")
def noisy_donor(tmp_path_factory):
    """zoo:v2 with noise (sd 0.25) added to its FFN down projections, saved as root/noisy:
    transplanting them makes copy a little worse: two misses in 8 probe examples."""
    root = tmp_path_factory.mktemp("noisy")
    model, tok, _ = load_model("zoo:v2")
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn_like(w) * 0.25)
    model.save_pretrained(root / "noisy")
    tok.save_pretrained(root / "noisy")
    return root


def test_answer_likelihood_and_kl_equal_a_direct_computation():
    model, tok, _ = load_model("zoo:v2")
    parent, _, _ = load_model("zoo:v1")
    task = load_task("zoo:add", n=5)
    got = L.answer_scores(model, tok, task, parent=parent, batch_size=3)      # batched, right-padded
    assert len(got.nll) == len(got.kl) == 5
    for i, e in enumerate(task.examples):
        prompt = tok(e.prompt)["input_ids"]
        answer = tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            lq = torch.log_softmax(parent(ids).logits[0].float(), -1)
        at = range(len(prompt) - 1, len(prompt) + len(answer) - 1)          # the positions predicting the answer
        nll = -sum(float(lp[t, answer[k]]) for k, t in enumerate(at)) / len(answer)
        kl = sum(float((lq[t].exp() * (lq[t] - lp[t])).sum()) for t in at) / len(answer)
        assert got.nll[i] == pytest.approx(nll, rel=1e-5, abs=1e-7)
        assert got.kl[i] == pytest.approx(kl, rel=1e-5, abs=1e-7)
    same = L.answer_scores(model, tok, task, parent=model)
    assert max(same.kl) < 1e-6 and same.nll == pytest.approx(got.nll, rel=1e-5)


def _server(tmp_path, root, statistic: str):
    probe = {"task": "zoo:copy", "examples": 8, "guard": True, "statistic": statistic}
    s = start(config(tmp_path, "zoo:v2", [root], watch_donor_roots=False, probes=[probe],
                     guard={"nll_margin": 0.05, "kl_budget": 0.05}))
    c = Clients(s.grpc_port, s.token)
    c.admin("RegisterDonor", A.RegisterDonorRequest(name="noisy", path=str(root / "noisy")))
    return s, c


def _metric(port: int, name: str, task: str, gen: int) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = f'{name}{{generation="{gen}",task="{task}"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(want)), None)
    return None if line is None else float(line.split()[-1])


@pytest.mark.parametrize("statistic", ["likelihood", "kl"])
def test_a_likelihood_guard_refuses_what_the_accuracy_guard_lets_through(tmp_path, noisy_donor, statistic):
    req = A.TransplantRequest(donor="noisy", modules=["layers.*.mlp.down"])
    s, c = _server(tmp_path / statistic, noisy_donor, statistic)
    try:
        with pytest.raises(grpc.RpcError) as e:
            c.admin("Transplant", req)
        said = "answer NLL rose" if statistic == "likelihood" else "of KL from its parent"
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and said in e.value.details()
        assert s.runtime.gens.live.id == 0
        event = [r for r in s.runtime.gens.journal.records if r.get("type") == "event"][-1]
        assert event["reason"] == "guard" and event["violations"][0]["statistic"] == statistic
    finally:
        c.close()
        s.stop(1)
    # the accuracy guard, on the same 8 examples, cannot tell the one miss from noise
    s, c = _server(tmp_path / "accuracy", noisy_donor, "accuracy")
    try:
        g = c.admin("Transplant", req).generation
        shadow = next(q for q in g.quality if q.phase == "shadow" and q.task == "zoo:copy")
        assert g.id == 1 and shadow.correct < 8                         # it did get worse
        post = next(q for q in g.quality if q.phase == "post_swap" and q.task == "zoo:copy")
        base = next(q for q in c.admin("ListGenerations", A.ListGenerationsRequest()).generations[0].quality
                    if q.task == "zoo:copy")
        assert post.HasField("answer_nll") and post.answer_nll > base.answer_nll + 0.05 and post.kl > 0.05
        # journaled with the generation, exported for Prometheus
        rec = next(q for q in s.runtime.gens.records[1].quality if q["phase"] == "post_swap")
        assert rec["answer_nll"] == pytest.approx(post.answer_nll) and rec["kl"] == pytest.approx(post.kl)
        assert _metric(s.http_port, "transplant_quality_answer_nll", "zoo:copy", 1) == pytest.approx(post.answer_nll)
        assert _metric(s.http_port, "transplant_quality_kl", "zoo:copy", 1) == pytest.approx(post.kl)
        st = c.admin("GetStatus", A.GetStatusRequest())                # and in the status
        q = next(x for x in st.quality if x.task == "zoo:copy")
        assert q.generation == 1 and q.answer_nll == pytest.approx(post.answer_nll) and q.kl == pytest.approx(post.kl)
        assert json.dumps(rec)                                          # plain numbers
    finally:
        c.close()
        s.stop(1)


def _series(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {ln.split(" ")[0]: float(ln.split(" ")[-1]) for ln in text.splitlines() if ln.startswith(name)}


def test_drift_on_recent_prompts_is_opt_in_and_never_written(tmp_path):
    prompts = [f"copy: zqx{w}" for w in ("ab", "cde", "fgh", "ijkl", "mno", "pqrs")]
    swap = A.TransplantRequest(donor="v1", modules=["layers.1.mlp.down"])
    s = start(config(tmp_path / "off", "zoo:v2", [], watch_donor_roots=False, probes=[]))
    c = Clients(s.grpc_port, s.token)
    try:                                            # off by default: nothing kept, nothing measured
        for p in prompts:
            c.generate(p, 4)
        c.admin("Transplant", swap)
        assert not s.runtime.drift._prompts and s.runtime.follower.drift is None
        assert not _series(s.http_port, "transplant_drift_kl{")
    finally:
        c.close()
        s.stop(1)
    s = start(config(tmp_path / "on", "zoo:v2", [], watch_donor_roots=False, probes=[],
                     drift={"enabled": True, "sample": 4}))
    c = Clients(s.grpc_port, s.token)
    try:
        for p in prompts:
            c.generate(p, 4)
        assert _series(s.http_port, "transplant_drift_sample_prompts") == {"transplant_drift_sample_prompts": 4.0}
        g = c.admin("Transplant", swap).generation
        s.runtime.follower.drift.join(60)
        got = _series(s.http_port, "transplant_drift_kl{")
        tok = s.runtime.tokenizer
        recent = [tok(p)["input_ids"] for p in prompts[-4:]]          # the last `sample` served
        want = L.prompt_kl(s.runtime.gens.live.model, s.runtime.gens.materialize(0), recent)
        assert got == {f'transplant_drift_kl{{generation="{g.id}"}}': pytest.approx(sum(want) / 4, rel=1e-5)}
        assert 0 < got[f'transplant_drift_kl{{generation="{g.id}"}}']
    finally:
        c.close()
        s.stop(1)
    for f in tmp_path.rglob("*"):                  # the prompts were never written anywhere
        if f.is_file():
            assert b"zqx" not in f.read_bytes(), f


@pytest.mark.parametrize("statistic", ["likelihood", "kl"])
def test_a_retention_floor_on_likelihood_or_kl(tmp_path, statistic):
    """The plan's retention on `statistic` is what a direct computation on the generation
    it makes gives: exp(-(NLL rise)) or exp(-KL from the live model), on the retained task's
    selection prompts; the journal says which statistic chose K."""
    import math

    s = start(config(tmp_path, "zoo:v2", [], watch_donor_roots=False, probes=[]))
    c = Clients(s.grpc_port, s.token)
    try:
        args = dict(donor="v1", task="zoo:add", k=8, selector="dw", probe_prompts=32, retention_floor=0.5,
                    retain=["zoo:rev"], retention_statistic=statistic)
        plan = c.admin("PlanTransplant", A.TransplantRequest(**args))
        best = next(p for p in plan.front if p.chosen)
        assert all(0 < p.retention <= 1.0 + 1e-6 for p in plan.front) and best.retention >= 0.5
        r = c.admin("Transplant", A.TransplantRequest(**args))
        sel = json.loads(r.generation.selection_json)
        assert sel["front"]["statistic"] == statistic and sel["k"] == best.k
        rt = s.runtime
        rev = rt.selection_task("zoo:rev", 32)
        live, parent = rt.gens.live.model, rt.gens.materialize(0)
        if statistic == "likelihood":
            rise = (sum(L.answer_scores(live, rt.tokenizer, rev).nll) - sum(L.answer_scores(parent, rt.tokenizer, rev).nll)) / 32
            want = math.exp(-rise)
        else:
            want = math.exp(-sum(L.answer_scores(live, rt.tokenizer, rev, parent=parent).kl) / 32)
        assert best.retention == pytest.approx(want, rel=1e-4)
        with pytest.raises(grpc.RpcError) as e:
            c.admin("PlanTransplant", A.TransplantRequest(**dict(args, retention_statistic="perplexity")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "retention_statistic" in e.value.details()
    finally:
        c.close()
        s.stop(1)


def test_drift_is_refused_on_the_vllm_engine_with_the_reason():
    """vLLM holds one generation's weights at a time: drift (both generations' full
    distributions on sampled traffic) cannot be measured there, and the config says so."""
    from pydantic import ValidationError

    from server.config import ServeConfig

    with pytest.raises(ValidationError, match="only one of them is installed at a time"):
        ServeConfig(engine="vllm", drift={"enabled": True})
    assert ServeConfig(engine="vllm").drift.enabled is False
