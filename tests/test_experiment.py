"""`transplant experiment`: the arithmetic against hand-computed values, and a tiny run
end to end on mechanics-only models (random weights; the donor is the target with
every linear module perturbed, so transplanting all of them turns the target into
the donor exactly)."""
import copy
import json

import numpy as np
import pytest
import torch

from server.cli import main
from tiny import make_model, save
from transplant_core.experiment import stats as S
from transplant_core import lae
from transplant_core import selectors as sel
from transplant_core import transplant as tp
from transplant_core.arch import build_table
from transplant_core.errors import InvalidArgument
from transplant_core.evaluate import evaluate
from transplant_core.experiment import ExperimentConfig, check_methods, resolve_ks
from transplant_core.experiment.sweep import Evaluator, State, Sweep, extras_table, lowrank_rank
from transplant_core.selection import top_k
from transplant_core.tasks import Example, Task, load_task

L_SHORT, L_LONG = 2, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- arithmetic -----------------------------------------------------------------------------

def test_tir_recovery_retention_points_by_hand():
    boot = S.Boot.make(4, 500)
    target, donor, after = [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]     # 0.25, 0.75, 0.50
    assert S.accuracy_stat(after, boot)["value"] == 0.5
    assert S.tir_stat(after, target, boot)["value"] == 2.0                # 0.50 / 0.25
    assert S.recovery_stat(after, target, donor, boot)["value"] == 50.0   # 100 (0.50-0.25)/(0.75-0.25)
    assert S.recovery_stat(donor, target, donor, boot)["value"] == 100.0
    assert S.recovery_stat([0, 0, 0, 0], target, donor, boot)["value"] == -50.0
    assert S.retention_stat([1, 0, 0, 0], [1, 1, 0, 0], boot)["value"] == 0.5   # 0.25 / 0.50
    assert S.difference_stat(after, target, boot)["value"] == 0.25


def test_undefined_is_none_never_zero_or_infinite():
    boot = S.Boot.make(4, 500)
    zero = [0, 0, 0, 0]
    t = S.tir_stat([1, 1, 0, 0], zero, boot)
    assert t["value"] is None and t["ci95"] is None and t["undefined_resamples"] == 500
    r = S.recovery_stat([1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], boot)      # baselines tie
    assert r["value"] is None and r["ci95"] is None
    assert S.retention_stat([1, 0], [0, 0], S.Boot.make(2, 100))["value"] is None
    # defined point, some resamples undefined (target resampled to all zeros): left out and counted
    r = S.tir_stat([1, 1, 1, 1], [1, 0, 0, 0], boot)
    assert r["value"] == 4.0 and 0 < r["undefined_resamples"] < 500 and np.isfinite(r["ci95"]).all()


def test_bootstrap_intervals_by_hand():
    # n = 2, [1, 0]: resampled means are 0, .5, 1 with probabilities 1/4, 1/2, 1/4 -> 95% interval [0, 1]
    assert S.accuracy_stat([1, 0], S.Boot.make(2, 4000))["ci95"] == [0.0, 1.0]
    # constant vectors have a degenerate interval
    assert S.accuracy_stat([1] * 10, S.Boot.make(10, 300))["ci95"] == [1.0, 1.0]
    # large n: close to the normal approximation p +- 1.96 sqrt(p (1-p) / n)
    x = [1] * 120 + [0] * 280
    ci = S.accuracy_stat(x, S.Boot.make(400, 4000))["ci95"]
    half = 1.96 * (0.3 * 0.7 / 400) ** 0.5
    assert abs(ci[0] - (0.3 - half)) < 0.01 and abs(ci[1] - (0.3 + half)) < 0.01
    # paired: a difference of identical vectors is exactly 0 in every resample
    assert S.difference_stat(x, x, S.Boot.make(400, 500))["ci95"] == [0.0, 0.0]
    # fractional vectors (the random control's mean over draws) are resampled the same way
    assert S.accuracy_stat([0.5, 0.5], S.Boot.make(2, 100))["ci95"] == [0.5, 0.5]
    # the percentile index rule is metrics.bootstrap_ci's: sorted[int(.025 m)], sorted[int(.975 m)]
    assert S.percentile_interval(np.arange(100.0)) == (2.0, 97.0)


def test_spread_over_draws():
    sp = S.spread([0.1, 0.3, None])
    assert sp["mean"] == pytest.approx(0.2) and sp["min"] == 0.1 and sp["max"] == 0.3
    assert sp["sd"] == pytest.approx(np.std([0.1, 0.3], ddof=1)) and sp["undefined_draws"] == 1


def test_config_validation():
    base = dict(target="a", donor="b", task="zoo:rev")
    with pytest.raises(InvalidArgument, match="neither a positive integer"):
        ExperimentConfig(**base, ks=("0",)).validate()
    with pytest.raises(InvalidArgument, match="unknown selector"):
        ExperimentConfig(**base, selectors=("magic",)).validate()
    with pytest.raises(InvalidArgument, match="each length"):
        ExperimentConfig(**base, max_new_tokens=(0,)).validate()
    assert resolve_ks(("1", "4", "all", "99"), 14) == ([1, 4, 14], ["K=99 dropped: only 14 compatible modules"])
    cfg = ExperimentConfig(**base, selectors=("greedy", "random")).validate()
    assert cfg.methods == ("lae", "dw", "greedy")
    assert "--selectors lae,dw,greedy" in cfg.command()


# ---- the tiny models ------------------------------------------------------------------------

PROMPTS = [f"{t}:{w}=" for t in ("rev", "copy", "sort") for w in ("abc", "bdfh", "xyz", "klmn", "pqr", "wxyz",
                                                                 "aceg", "mno")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """Target, donor (target + noise on every linear module) and task files whose answers
    are chosen from the models' own outputs, so both baselines are known and differ."""
    root = tmp_path_factory.mktemp("exp")
    target = make_model("llama", 0)
    donor = copy.deepcopy(target)
    table = build_table(target)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for info in table.modules.values():
            w = donor.get_submodule(info.path).weight
            w.add_(torch.randn(w.shape, generator=g) * 0.5)
    tdir, ddir = save(target, root / "target"), save(donor, root / "donor")
    def outputs(model, prompts):   # alternately the output at the short and at the long length
        task = Task("p", tuple(Example(p, "") for p in prompts))
        short, long = (evaluate(model, tokenizer, task, L).outputs for L in (L_SHORT, L_LONG))
        return [s if i % 2 else x for i, (s, x) in enumerate(zip(short, long))]

    t_out, d_out = outputs(target, PROMPTS), outputs(donor, PROMPTS)
    # first 8: the target's answer; next 12: the donor's; the rest: nobody's
    answers = t_out[:8] + d_out[8:20] + ["@@@"] * (len(PROMPTS) - 20)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(PROMPTS, answers)))
    retain = root / "retain.jsonl"   # the target's own outputs on other prompts
    retain.write_text("".join(json.dumps({"prompt": p + "x", "answer": a}) + "\n"
                              for p, a in zip(PROMPTS, outputs(target, [p + "x" for p in PROMPTS]))))
    zero = root / "zero.jsonl"       # the target never right, the donor sometimes: TIR undefined
    zero.write_text("".join(json.dumps({"prompt": p, "answer": d if d != t else "@@@"}) + "\n"
                            for p, t, d in zip(PROMPTS, t_out, d_out)))
    return {"target": target, "donor": donor, "tdir": tdir, "ddir": ddir, "task": task, "retain": retain,
            "zero": zero, "table": table, "root": root}


def _acc(model, tokenizer, task: Task, L: int) -> np.ndarray:
    return np.array(evaluate(model, tokenizer, task, L).correct, dtype=float)


@pytest.fixture(scope="module")
def run_doc(pair, tokenizer):
    out = pair["root"] / "report"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["experiment", "--target", str(pair["tdir"]), "--donor", str(pair["ddir"]),
                     "--task", str(pair["task"]), "--retain", str(pair["retain"]), "--n-retain", "8", "--ks", "1,2,all,50",
                     "--max-new-tokens", f"{L_SHORT},{L_LONG}", "--seeds", "3", "--selectors", "lae,dw,swap,greedy,lowrank,layer,ties,dare,graft",
                     "--n-probe", "6", "--n-boot", "300", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    return json.loads(buf.getvalue()), out


def test_report_files_and_structure(run_doc):
    doc, out = run_doc
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    for name in ("curves", "selectors", "retention", "front", "scores", "selector_scores"):
        for L in (L_SHORT, L_LONG):
            assert (out / f"{name}_L{L}.png").stat().st_size > 2000
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == doc["rows"] and saved["best_k"] == doc["best_k"]     # --json = the same results
    assert doc["command"].startswith("transplant experiment --target ") and "--ks 1,2,all,50" in doc["command"]
    assert {"torch", "transformers", "python", "transplant"} <= set(doc["versions"])
    st = doc["setting"]
    assert st["compatible_modules"] == 14 and st["target_restored_bitwise"] is True
    assert st["dropped_ks"] == ["K=50 dropped: only 14 compatible modules"]
    assert st["splits"] == {"dev": 12, "test": 12, "probe": 6, "keep": 4,
                            "probe_source": "first questions of the dev half"}
    methods = {r["method"] for r in doc["rows"]}
    assert methods == {"lae", "dw", "swap", "greedy", "lowrank", "layer", "ties", "dare", "graft", "random"}
    assert {(r["L"], r["k"]) for r in doc["rows"]} == {(L, k) for L in (L_SHORT, L_LONG) for k in (1, 2, 14)}
    for r in doc["rows"]:
        if r["method"] == "lowrank":
            assert len(r["modules"]) == 14 and r["rank"] == lowrank_rank(build_table(make_model("llama")), r["k"])
        elif r["method"] in ("ties", "dare", "graft"):     # units: every module, a share of entries set by K
            assert len(r["modules"]) == 14 and r["density"] == (None if r["k"] == 14 else r["k"] / 14)
        elif r["method"] != "random":
            assert len(r["modules"]) == r["k"] and sum(r["composition"].values()) == r["k"]
        else:
            assert len(r["modules"]) == 3 and all(len(d) == r["k"] for d in r["modules"])
    report = (out / "report.md").read_text()
    for heading in ("### Baselines", "### Best K chosen on dev, reported on test (held out)",
                    "### Best K on the full set (in-sample, as the paper chooses it)", "### Sweep over K",
                    "### Composition of the top-K (attention / FFN modules)", "## What was hoped for, as measured",
                    "## Reproduce", f"## Max new tokens {L_SHORT}", f"## Max new tokens {L_LONG}",
                    "### Recovery against retention: the front"):
        assert heading in report
    assert "![curves, max new tokens 3](curves_L3.png)" in report


def test_numbers_match_hand_computed(run_doc, pair, tokenizer):
    doc, _ = run_doc
    full = load_task(str(pair["task"]))
    dev, test = full.split()
    retain = load_task(str(pair["retain"])).split()[1].head(8)      # the test half's first 8
    for L in (L_SHORT, L_LONG):
        t_dev, t_test = _acc(pair["target"], tokenizer, dev, L), _acc(pair["target"], tokenizer, test, L)
        d_dev, d_test = _acc(pair["donor"], tokenizer, dev, L), _acc(pair["donor"], tokenizer, test, L)
        b = doc["baselines"][str(L)]
        assert b["target"]["dev"]["value"] == t_dev.mean() and b["target"]["test"]["value"] == t_test.mean()
        assert b["donor"]["dev"]["value"] == d_dev.mean() and b["donor"]["test"]["value"] == d_test.mean()
        t_full, d_full = np.concatenate([t_dev, t_test]).mean(), np.concatenate([d_dev, d_test]).mean()
        assert t_full > 0 and d_full != t_full, "the fixture must give defined TIR and Recovery"
        # retention tasks are scored at the longest length whatever L is
        assert b["retain_target"][str(pair["retain"])]["value"] == _acc(pair["target"], tokenizer, retain,
                                                                         L_LONG).mean()
        # K = all turns the target into the donor exactly
        row = next(r for r in doc["rows"] if r["method"] == "lae" and r["L"] == L and r["k"] == 14)
        f = row["split"]["full"]
        assert f["accuracy"]["value"] == pytest.approx(d_full)
        assert f["tir"]["value"] == pytest.approx(d_full / t_full)
        assert f["recovery"]["value"] == pytest.approx(100.0)
        lo, hi = f["recovery"]["ci95"]
        assert lo <= 100.0 <= hi
        r_after = _acc(pair["donor"], tokenizer, retain, L_LONG).mean()
        r_before = _acc(pair["target"], tokenizer, retain, L_LONG).mean()
        assert row["retention"][str(pair["retain"])]["retention"]["value"] == pytest.approx(r_after / r_before)
        r_dev = load_task(str(pair["retain"])).split()[0].head(8)
        d_dev, t_dev = (_acc(m, tokenizer, r_dev, L_LONG).mean() for m in (pair["donor"], pair["target"]))
        assert row["retention"][str(pair["retain"])]["retention_dev"] == (
            None if t_dev == 0 else pytest.approx(d_dev / t_dev))


def test_a_row_matches_an_independent_transplant(run_doc, pair, tokenizer):
    doc, _ = run_doc
    row = next(r for r in doc["rows"] if r["method"] == "greedy" and r["L"] == L_LONG and r["k"] == 2)
    model = copy.deepcopy(pair["target"])
    from transplant_core.checkpoint import ModelTensors
    from transplant_core.refs import parse_refs

    tp.commit(model, tp.plan(pair["table"], ModelTensors(pair["donor"]), parse_refs(row["modules"])))
    dev, test = load_task(str(pair["task"])).split()
    acc_dev, acc_test = _acc(model, tokenizer, dev, L_LONG), _acc(model, tokenizer, test, L_LONG)
    t = np.concatenate([_acc(pair["target"], tokenizer, x, L_LONG) for x in (dev, test)]).mean()
    d = np.concatenate([_acc(pair["donor"], tokenizer, x, L_LONG) for x in (dev, test)]).mean()
    a = np.concatenate([acc_dev, acc_test]).mean()
    assert row["split"]["dev"]["accuracy"]["value"] == acc_dev.mean()
    assert row["split"]["test"]["accuracy"]["value"] == acc_test.mean()
    assert row["split"]["full"]["recovery"]["value"] == pytest.approx(100 * (a - t) / (d - t))


def test_best_k_is_chosen_on_dev_and_reported_on_test(run_doc):
    doc, _ = run_doc
    for b in doc["best_k"]:
        rows = [r for r in doc["rows"] if r["method"] == b["method"] and r["L"] == b["L"]]
        best_dev = max(r["split"]["dev"]["accuracy"]["value"] for r in rows)
        chosen = next(r for r in rows if r["k"] == b["held_out"]["k"])
        assert chosen["split"]["dev"]["accuracy"]["value"] == best_dev
        assert all(r["k"] >= chosen["k"] for r in rows if r["split"]["dev"]["accuracy"]["value"] == best_dev)
        assert b["held_out"]["accuracy"] == chosen["split"]["test"]["accuracy"]
        safe = [r for r in rows if all(v["retention_dev"] is None or v["retention_dev"] >= 0.95
                                       for v in r["retention"].values())]
        if safe:
            pick = next(r for r in safe if r["k"] == b["held_out_safe"]["k"])
            assert pick["split"]["dev"]["accuracy"]["value"] == max(r["split"]["dev"]["accuracy"]["value"] for r in safe)
            assert b["held_out_safe"]["recovery"] == pick["split"]["test"]["recovery"]
        else:
            assert b["held_out_safe"] is None
        paper = next(r for r in rows if r["k"] == b["in_sample"]["k"])
        assert paper["split"]["full"]["accuracy"]["value"] == max(r["split"]["full"]["accuracy"]["value"] for r in rows)


def test_random_row_is_the_mean_of_its_draws(run_doc):
    doc, _ = run_doc
    for r in (r for r in doc["rows"] if r["method"] == "random"):
        dr = r["draws"]["full"]["accuracy"]
        assert r["split"]["full"]["accuracy"]["value"] == pytest.approx(dr["mean"])
        assert dr["min"] <= dr["mean"] <= dr["max"]


def test_undefined_tir_shown_as_such(pair, tmp_path, capsys):
    code = main(["experiment", "--target", str(pair["tdir"]), "--donor", str(pair["ddir"]), "--task", str(pair["zero"]),
                 "--retain", "none", "--ks", "1,all", "--max-new-tokens", str(L_LONG), "--seeds", "2",
                 "--n-probe", "4", "--n-boot", "200", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "TIR undefined" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["baselines"][str(L_LONG)]["target"]["full"]["value"] == 0.0
    assert all(r["split"]["full"]["tir"]["value"] is None for r in doc["rows"])
    assert all(r["split"]["full"]["recovery"]["value"] is not None for r in doc["rows"])
    assert "| undefined |" in (tmp_path / "report.md").read_text()


# ---- the pieces the experiment is built from ------------------------------------------------

def test_lae_selector_is_paper_exact_at_every_length(pair, tokenizer):
    """Scores cut from one profile at the longest length equal lae.analyze at each length."""
    prompts = PROMPTS[:6]
    ev = sel.Evidence(pair["target"], pair["donor"], tokenizer, pair["table"], prompts, 5)
    for L in (1, 3, 5):
        ref = lae.analyze(pair["target"], pair["donor"], tokenizer, pair["table"], prompts, L, "free").scores
        got = sel.scores("lae", ev, L)
        assert all(got[r] == pytest.approx(ref[r], rel=1e-5, abs=1e-7) for r in ref)
        ref_tf = lae.analyze(pair["target"], pair["donor"], tokenizer, pair["table"], prompts, L,
                             "teacher_forced").scores
        got_tf = sel.scores("lae_tf", ev, L)
        assert all(got_tf[r] == pytest.approx(ref_tf[r], rel=1e-4, abs=1e-6) for r in ref_tf)


def test_selectors_leave_the_target_bitwise_unchanged(pair, tokenizer):
    before = tp.model_digest(pair["target"])
    ev = sel.Evidence(pair["target"], pair["donor"], tokenizer, pair["table"], PROMPTS[:4], 3, greedy_steps=3,
                      keep_prompts=[p + "x" for p in PROMPTS[4:8]])
    for name in sel.SELECTORS:
        s = sel.scores(name, ev, 2)
        assert set(s) == set(pair["table"].modules) and all(np.isfinite(v) for v in s.values())
    assert tp.model_digest(pair["target"]) == before
    # greedy's first pick is the best single swap
    assert top_k(sel.scores("greedy", ev, 2), 1) == top_k(sel.scores("swap", ev, 2), 1)


def test_cutting_tokens_equals_decoding_shorter(pair, tokenizer):
    task = load_task(str(pair["task"]))
    dev, test = task.split()
    bare = Task("other", tuple(Example(e.prompt + "x", "") for e in dev.examples))
    # answers: the donor's own 4-token outputs, so right at 4 tokens and wrong when cut shorter
    other = Task("other", tuple(Example(e.prompt, o) for e, o in
                                zip(bare.examples, evaluate(pair["donor"], tokenizer, bare, 4).outputs)))
    evaluator = Evaluator(tokenizer, {"dev": dev, "test": test, "other": other}, [1, 2, 4], batch_size=64)
    out = evaluator(pair["donor"])
    every = Task("every", dev.examples + test.examples + other.examples)   # the same batch, the same arithmetic
    n = len(dev) + len(test)
    for L in (1, 2, 4):
        ref = evaluate(pair["donor"], tokenizer, every, L).correct
        assert list(out[L]["dev"]) + list(out[L]["test"]) == ref[:n]
        # a retention block is scored at the longest length, whatever L
        assert list(out[L]["other"]) == evaluate(pair["donor"], tokenizer, every, 4).correct[n:]
        assert all(out[L]["other"])


def test_extras_copy_norms_and_embeddings_too(pair, tokenizer):
    """+x: with every linear module AND the differing non-linear parameters copied, the
    target computes exactly what the donor does; everything reverts bitwise."""
    from transplant_core.checkpoint import ModelTensors

    target, donor = copy.deepcopy(pair["target"]), copy.deepcopy(pair["donor"])
    with torch.no_grad():
        donor.model.norm.weight.mul_(1.5)
        donor.model.layers[1].input_layernorm.weight.add_(0.3)
        donor.model.embed_tokens.weight.mul_(0.8)
    table = pair["table"]
    extras = extras_table(table, target, donor)
    assert sorted(str(r) for r in extras.refs()) == ["layers.1.x.input_layernorm", "layers.2.x.model_embed_tokens",
                                                     "layers.2.x.model_norm"]
    task = load_task(str(pair["task"]))
    dev, test = task.split()
    evaluator = Evaluator(tokenizer, {"dev": dev, "test": test}, [L_LONG], batch_size=64)
    before = tp.model_digest(target)
    sweep = Sweep(target, table, extras, ModelTensors(donor), evaluator)
    everything = sweep(State(frozenset(table.refs()), extras=True))[L_LONG]
    want = evaluator(donor)[L_LONG]
    assert (everything["dev"] == want["dev"]).all() and (everything["test"] == want["test"]).all()
    assert tp.model_digest(target) == before
    assert check_methods(["greedy+x", "random", "lae"]) == ("greedy+x", "lae")
    with pytest.raises(InvalidArgument, match="unknown selector"):
        check_methods(["nope+x"])


def test_lowrank_moves_each_module_by_rank_r(pair):
    from transplant_core.checkpoint import ModelTensors
    from transplant_core.experiment.sweep import LowRank

    table, target, donor = pair["table"], copy.deepcopy(pair["target"]), pair["donor"]
    # tiny llama, per layer: q, o 32x32; k, v 16x32 (2 KV heads); gate, up 64x32; down 32x64
    total = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)        # 18432 numbers in 14 modules
    per_rank = 2 * (2 * 64 + 2 * 48 + 3 * 96)                    # 1024 numbers per unit of rank
    assert (total, per_rank) == (18432, 1024)
    # K=1: 1.29 -> 1; K=7: 9.0 -> 9; K=13: 16.7 -> 16; K=14 (all): the full copy
    assert [lowrank_rank(table, k) for k in (1, 7, 13, 14)] == [1, 9, 16, None]
    lr = LowRank(table, target, ModelTensors(donor))
    ref = table.refs()[0]
    key = table[ref].weight_key
    w_t, w_d = dict(target.named_parameters())[key].detach(), dict(donor.named_parameters())[key].detach()
    src = lr.source([ref], 3)
    assert torch.linalg.matrix_rank(src.get(key) - w_t, atol=1e-5) == 3
    assert torch.allclose(lr.source([ref], 32).get(key), w_d, atol=1e-5)     # full rank: the donor's weight
    before = tp.model_digest(target)
    snap = tp.commit(target, tp.plan(table, src, [ref]))
    tp.revert(target, table, snap)
    assert tp.model_digest(target) == before


def test_the_front_marks_what_nothing_beats_and_choose_respects_the_floor():
    from transplant_core.front import Point, choose, ks_up_to, pareto

    pts = [Point(1, 31.0, 1.0), Point(2, 62.0, 0.5), Point(4, 62.0, 0.6), Point(8, 80.0, 0.0), Point(14, 96.0, 0.0),
           Point(20, None, 1.0)]
    assert [p.k for p in pareto(pts)] == [1, 4, 14]
    best, why = choose(pts, 0.55)
    assert best.k == 4 and best.chosen and "K=4" in why          # 2 and 4 tie on Recovery: the higher retention
    best, _ = choose(pts, 0.0)
    assert best.k == 14
    none, why = choose([Point(1, 10.0, 0.2)], 0.9)
    assert none is None and "no K keeps retention" in why
    assert ks_up_to(1) == [1] and ks_up_to(28) == [1, 2, 3, 4, 6, 8, 11, 15, 21, 28]


def test_layer_selectors_take_whole_layers_first(pair, tokenizer):
    table = pair["table"]                                     # tiny llama: 2 layers of 7 modules
    ev = sel.Evidence(pair["target"], pair["donor"], tokenizer, table, PROMPTS[:6], 3)
    ends = sel.scores("layer_ends", ev, 2)
    assert {r.layer for r in top_k(ends, 7)} == {0}           # the bottom layer first
    order = top_k(ends, 14)
    assert [r.layer for r in order] == [0] * 7 + [1] * 7
    dw = sel.scores("dw", ev, 2)
    assert order[:7] == sorted(order[:7], key=lambda r: (-dw[r], r))      # within a layer: dw order
    measured = sel.scores("layer", ev, 2)
    top = top_k(measured, 7)
    assert len({r.layer for r in top}) == 1                   # one whole layer
    b = sel._batch(ev, 2)
    losses = {layer: sel._loss_with(ev, b, [r for r in table.refs() if r.layer == layer]) for layer in (0, 1)}
    assert top[0].layer == min(losses, key=losses.get)        # the layer whose swap lowers the loss most


def test_sparse_units_keep_the_share_they_are_given(pair, tokenizer):
    from transplant_core import sparse
    from transplant_core.checkpoint import ModelTensors

    table, target, donor = pair["table"], copy.deepcopy(pair["target"]), pair["donor"]
    assert sparse.unit_density(table, 7) == 0.5 and sparse.unit_density(table, 14) is None
    sp = sparse.Sparse(table, target, ModelTensors(donor))
    keys = [table[r].weight_key for r in table.refs()]
    d = {k: sp.delta(k) for k in keys}
    ties = sp.kept("ties", 0.25, 0, keys)
    for k in keys:                                            # the largest quarter of each weight's entries
        kept = ties[k] != 0
        assert abs(kept.float().mean().item() - 0.25) < 0.01
        assert d[k].abs()[kept].min() >= d[k].abs()[~kept].max()
    dare = sp.kept("dare", 0.25, 0, keys)
    assert all(torch.allclose(dare[k][dare[k] != 0], d[k][dare[k] != 0] * 4) for k in keys)
    share = sum(int((dare[k] != 0).sum()) for k in keys) / sum(d[k].numel() for k in keys)
    assert abs(share - 0.25) < 0.02
    assert all(torch.equal(dare[k], sp.kept("dare", 0.25, 0, [k])[k]) for k in keys)   # seeded per tensor
    ev = sel.Evidence(target, donor, tokenizer, table, PROMPTS[:6], 3)
    before = tp.model_digest(target)
    for kind in ("graft", "stitch"):
        trace = []
        sp.learned[sparse.learned_key(kind, 2, 0.1)] = sparse.learn(ev, 2, kind, sp, steps=15, trace=trace,
                                                                    init_density=0.1)
        assert len(trace) == 15 and trace[-1] < trace[0]           # the relaxed objective went down
        assert tp.model_digest(target) == before and all(p.grad is None for p in target.parameters())
        kept = sp.kept(kind, 0.1, 2, keys)
        share = sum(int((kept[k] != 0).sum()) for k in keys) / sum(d[k].numel() for k in keys)
        assert abs(share - 0.1) < 0.01
        assert all(torch.equal(kept[k][kept[k] != 0], d[k][kept[k] != 0]) for k in keys)   # kept as they are
