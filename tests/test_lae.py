"""Activation analysis: the score formula, both step-alignment rules, hooks always removed."""
import pytest
import torch

from tiny import make_model
from transplant_core import lae
from transplant_core.arch import build_table
from transplant_core.errors import InvalidArgument
from transplant_core.refs import ModuleRef
from transplant_core.selection import by_pattern, random_k, top_k

PROMPTS = ["abc", "hello", "add:1+2=", "zz top"]


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules()) + len(model._forward_pre_hooks)


def test_identical_models_score_zero(tokenizer):
    m = make_model("llama", 0)
    for alignment in lae.ALIGNMENTS:
        a = lae.analyze(m, make_model("llama", 0), tokenizer, build_table(m), PROMPTS, 6, alignment)
        # free: the same computation twice, exactly 0; forced: one full pass vs incremental
        # decoding, equal up to float rounding
        tol = 0.0 if alignment == "free" else 1e-6
        assert max(a.scores.values()) <= tol
        assert a.valid_steps > 0


def test_only_the_changed_module_and_those_downstream_score(tokenizer):
    target = make_model("llama", 0)
    donor = make_model("llama", 0)
    table = build_table(target)
    with torch.no_grad():
        donor.get_submodule(table[ModuleRef(1, "mlp.down")].path).weight.mul_(3.0)
    a = lae.analyze(target, donor, tokenizer, table, PROMPTS, 6, "teacher_forced")
    # teacher forcing: identical inputs, so everything before layer 1's down projection is identical
    upstream = [r for r in table.refs() if r.layer == 0 or r.kind != "mlp.down"]
    assert all(a.scores[r] < 1e-6 for r in upstream)
    assert a.ranking()[0][0] == ModuleRef(1, "mlp.down") and a.scores[ModuleRef(1, "mlp.down")] > 1e-3


def test_score_is_mean_abs_difference_over_valid_steps(tokenizer):
    """Hand-computed: the score of one module equals the formula applied to the recorded profiles."""
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    t = lae.profile_free(target, tokenizer, table, PROMPTS, 5)
    d = lae.profile_free(donor, tokenizer, table, PROMPTS, 5)
    ref = ModuleRef(0, "attn.q")
    valid = t.valid & d.valid
    diffs = [abs(float(d.acts[ref][i, s]) - float(t.acts[ref][i, s]))
             for i in range(len(PROMPTS)) for s in range(5) if valid[i, s]]
    assert lae.score_profiles(t, d)[ref] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    a = lae.analyze(target, donor, tokenizer, table, PROMPTS, 5, "free", batch_size=3)  # batches of 3 + 1
    assert a.scores[ref] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4)


def test_activation_is_last_token_mean_abs(tokenizer):
    model = make_model("llama", 0)
    table = build_table(model)
    ref = ModuleRef(0, "mlp.up")
    seen = []
    h = model.get_submodule(table[ref].path).register_forward_hook(lambda m, i, o: seen.append(o[:, -1, :]))
    try:
        p = lae.profile_free(model, tokenizer, table, ["hello"], 3)
    finally:
        h.remove()
    for step in range(3):
        assert float(p.acts[ref][0, step]) == pytest.approx(float(seen[step][0].abs().mean()), rel=1e-6)


def test_forced_step_matches_free_decoding_of_the_same_model(tokenizer):
    """Teacher-forcing a model on its own greedy tokens reproduces its free-running profile."""
    m = make_model("llama", 2)
    table = build_table(m)
    free = lae.profile_free(m, tokenizer, table, PROMPTS, 6)
    forced = lae.profile_forced(m, tokenizer, table, PROMPTS, free.tokens, free.valid)
    for ref in table.refs():
        assert torch.allclose(free.acts[ref] * free.valid, forced.acts[ref] * free.valid, atol=1e-5)


def test_hooks_removed_on_success_and_on_error(tokenizer):
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    lae.analyze(target, donor, tokenizer, table, PROMPTS, 3)
    assert _hooks(target) == 0 and _hooks(donor) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with lae.recording(target, table):
            assert _hooks(target) > 0
            raise RuntimeError("boom")
    assert _hooks(target) == 0
    with pytest.raises(InvalidArgument):
        lae.analyze(target, donor, tokenizer, table, PROMPTS, 3, alignment="sideways")


def test_selection():
    scores = {ModuleRef(0, "attn.q"): 0.5, ModuleRef(1, "mlp.up"): 0.9, ModuleRef(0, "mlp.down"): 0.5}
    assert top_k(scores, 2) == [ModuleRef(1, "mlp.up"), ModuleRef(0, "attn.q")]
    assert top_k(scores, 1, allowed={ModuleRef(0, "mlp.down")}) == [ModuleRef(0, "mlp.down")]
    with pytest.raises(InvalidArgument, match="between 1 and 3"):
        top_k(scores, 4)
    assert by_pattern(list(scores), "layers.*.mlp.*") == [ModuleRef(0, "mlp.down"), ModuleRef(1, "mlp.up")]
    with pytest.raises(InvalidArgument, match="no module matches"):
        by_pattern(list(scores), "layers.9.*")
    assert random_k(list(scores), 2, seed=1) == random_k(list(scores), 2, seed=1)
