"""Plan, commit, revert on real tiny models: round trips are bitwise, bad input changes nothing."""
import pytest
import torch
from safetensors.torch import save_file

from tiny import make_model, save
from transplant_core import transplant as tp
from transplant_core.arch import build_table
from transplant_core.checkpoint import Checkpoint, CheckpointTensors, DictTensors, ModelTensors, load_model
from transplant_core.compat import check
from transplant_core.errors import Incompatible, InvalidArgument, NonFiniteWeights, NotFound, UnsafeCheckpoint
from transplant_core.generation import greedy
from transplant_core.refs import ModuleRef

PROMPTS = ["abc", "hello there", "add:12+7="]


def outputs(model, tokenizer):
    return [c.token_ids for c in greedy(model, tokenizer, PROMPTS, 8)]


def test_round_trip_is_bitwise(tokenizer):
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits0 = target(ids).logits.clone()
    sums = tp.checksums(target)
    snap = tp.commit(target, tp.plan(table, ModelTensors(donor), [ModuleRef(0, "mlp.down"), ModuleRef(1, "attn.q")]))
    assert not torch.equal(target(ids).logits, logits0)
    tp.revert(target, table, snap)
    assert torch.equal(target(ids).logits, logits0)
    assert tp.checksums(target) == sums


def test_parameter_identity_survives(tokenizer):
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    before = {k: id(p) for k, p in target.named_parameters()}
    tp.commit(target, tp.plan(table, ModelTensors(donor), table.refs()))
    assert {k: id(p) for k, p in target.named_parameters()} == before


def test_all_linear_modules_reproduce_the_donor_exactly(tokenizer):
    """Donor = target with only its linear modules re-drawn: copying all of them gives the donor."""
    target = make_model("llama", 0)
    donor = make_model("llama", 0)
    table = build_table(target)
    torch.manual_seed(7)
    with torch.no_grad():
        for info in table.modules.values():
            donor.get_submodule(info.path).weight.normal_(0, 0.2)
    assert outputs(target, tokenizer) != outputs(donor, tokenizer)
    tp.commit(target, tp.plan(table, ModelTensors(donor), table.refs()))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(target(ids).logits, donor(ids).logits)
    assert outputs(target, tokenizer) == outputs(donor, tokenizer)


def test_alpha_blends_and_reverts():
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    ref = ModuleRef(0, "mlp.up")
    key = table[ref].weight_key
    w_t = dict(target.named_parameters())[key].detach().clone()
    w_d = dict(donor.named_parameters())[key].detach().clone()
    snap = tp.commit(target, tp.plan(table, ModelTensors(donor), [ref], alpha=0.25))
    assert torch.allclose(dict(target.named_parameters())[key], 0.75 * w_t + 0.25 * w_d, atol=1e-6)
    tp.revert(target, table, snap)
    assert torch.equal(dict(target.named_parameters())[key], w_t)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "1"])
def test_bad_alpha_refused(alpha):
    target, donor = make_model("llama", 0), make_model("llama", 1)
    with pytest.raises(InvalidArgument, match="alpha"):
        tp.plan(build_table(target), ModelTensors(donor), [ModuleRef(0, "mlp.up")], alpha=alpha)


def _unchanged(model, sums):
    return tp.checksums(model) == sums


def test_bad_inputs_leave_the_model_unchanged():
    target = make_model("llama", 0)
    table = build_table(target)
    sums = tp.checksums(target)
    wide = make_model("llama", 1, intermediate_size=96)
    with pytest.raises(InvalidArgument, match="unknown module.*layers.9.mlp.up"):
        tp.plan(table, ModelTensors(make_model("llama", 1)), [ModuleRef(9, "mlp.up")])
    with pytest.raises(Incompatible) as e:
        tp.plan(table, ModelTensors(wide, "wide"), [ModuleRef(0, "mlp.up"), ModuleRef(0, "mlp.down")])
    assert len(e.value.mismatches) == 2 and "shape target [64, 32] vs donor [96, 32]" in str(e.value)
    nan = {k: v.detach().clone() for k, v in make_model("llama", 1).named_parameters()}
    nan[table[ModuleRef(1, "attn.v")].weight_key][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="NaN"):
        tp.plan(table, DictTensors(nan, "nan-donor"), [ModuleRef(1, "attn.v")])
    gpt2 = make_model("gpt2", 1)
    with pytest.raises(Incompatible):
        tp.plan(table, ModelTensors(gpt2, "gpt2"), [ModuleRef(0, "mlp.down")])
    assert _unchanged(target, sums)


def test_failure_half_way_restores_the_snapshot():
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    sums = tp.checksums(target)
    p = tp.plan(table, ModelTensors(donor), table.refs()[:4])
    last = p.keys[-1]
    broken = tp.Plan(p.donor, p.alpha, p.modules, {**p.values, last: torch.zeros(3)})   # wrong shape at the end
    with pytest.raises(RuntimeError):
        tp.commit(target, broken)
    assert _unchanged(target, sums)


def test_fork_shares_all_but_the_swapped_tensors():
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    refs = [ModuleRef(0, "mlp.down")]
    p = tp.plan(table, ModelTensors(donor), refs)
    child = tp.fork(target, p.keys)
    tp.commit(child, p)
    tparams, cparams = dict(target.named_parameters()), dict(child.named_parameters())
    for k in tparams:
        shared = tparams[k].data_ptr() == cparams[k].data_ptr()
        assert shared == (k not in p.keys), k
    ids = torch.tensor([[4, 5, 6]])
    assert not torch.equal(child(ids).logits, target(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_derive_equals_commit_and_leaves_the_parent_alone(arch):
    """derive = fork + commit without touching the parent: same outputs as an in-place
    commit, the parent bitwise unchanged, every other tensor and module shared."""
    target, donor = make_model(arch, 0), make_model(arch, 1)
    table = build_table(target)
    refs = [table.refs()[0], table.refs()[-1]]
    p = tp.plan(table, ModelTensors(donor), refs)
    sums = tp.checksums(target)
    child, replaced = tp.derive(target, p)
    assert tp.checksums(target) == sums                                  # parent untouched
    reference = make_model(arch, 0)
    tp.commit(reference, tp.plan(table, ModelTensors(donor), refs))
    assert tp.checksums(child) == tp.checksums(reference)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert torch.equal(child(ids).logits, reference(ids).logits)
    assert not torch.equal(child(ids).logits, target(ids).logits)
    tparams, cparams = dict(target.named_parameters()), dict(child.named_parameters())
    for k in tparams:
        assert (tparams[k].data_ptr() == cparams[k].data_ptr()) == (k not in p.keys), k
    for k in p.keys:                          # the undo is the parent's own tensors
        assert replaced[k].data_ptr() == tparams[k].data_ptr()
        assert cparams[k].data_ptr() != p.values[k].data_ptr()          # copied, not aliased
    # modules off the swapped paths are the very same objects; those on it are copies
    swapped = {k.rpartition(".")[0] for k in p.keys}
    for name, mod in child.named_modules():
        on_path = any(s == name or s.startswith(name + ".") or name == "" for s in swapped)
        assert (mod is target.get_submodule(name)) == (not on_path), name
    # a revert is a derive whose donor is the replaced tensors: bitwise the parent again
    back, _ = tp.derive(child, tp.plan(table, DictTensors(replaced), refs), share=True)
    assert tp.checksums(back) == sums
    assert torch.equal(back(ids).logits, target(ids).logits)


def test_derive_share_and_alpha():
    target, donor = make_model("llama", 0), make_model("llama", 1)
    table = build_table(target)
    refs = [ModuleRef(1, "attn.o")]
    values = {k: v.clone() for k, v in dict(donor.named_parameters()).items()}
    p = tp.plan(table, DictTensors(values), refs)
    shared, _ = tp.derive(target, p, share=True)
    k = p.keys[0]
    assert dict(shared.named_parameters())[k].data_ptr() == values[k].data_ptr()
    half, _ = tp.derive(target, tp.plan(table, DictTensors(values), refs, alpha=0.5))
    want = torch.lerp(dict(target.named_parameters())[k].detach(), values[k], 0.5)
    assert torch.equal(dict(half.named_parameters())[k].detach(), want)
    with pytest.raises(InvalidArgument, match="no parameter"):
        tp.derive(make_model("gpt2", 0), p)


def test_non_finite_check_catches_what_a_sum_alone_would_miss():
    target = make_model("llama", 0)
    table = build_table(target)
    ref = ModuleRef(0, "mlp.up")
    key = table[ref].weight_key
    base = dict(target.named_parameters())
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = base[key].detach().clone()
        t[3, 2] = bad
        with pytest.raises(NonFiniteWeights):
            tp.plan(table, DictTensors({key: t}), [ref])
    # huge but finite values whose float32 sum overflows are accepted
    big = torch.full_like(base[key], 3e38)
    assert tp.plan(table, DictTensors({key: big}), [ref]).values[key].data_ptr() == big.data_ptr()


def test_tensor_digest_hashes_the_bytes():
    import hashlib

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tp.tensor_digest(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert tp.tensor_digest(t.t()) == hashlib.sha256(t.t().contiguous().numpy().tobytes()).hexdigest()
    b = t.to(torch.bfloat16)
    assert tp.tensor_digest(b) == hashlib.sha256(b.view(torch.int16).numpy().tobytes()).hexdigest()
    assert tp.tensor_digest(torch.empty(0)) == hashlib.sha256(b"").hexdigest()


def test_checkpoint_is_read_lazily_and_compat_lists_everything(tmp_path, tiny_dirs):
    ck = Checkpoint.open(str(tiny_dirs["donor"]))
    model, tok, path = load_model(str(tiny_dirs["target"]))
    report = check(build_table(model), ck.table)
    assert report.ok and len(report.compatible) == 14
    other = Checkpoint.open(str(save(make_model("llama", 2, intermediate_size=96, vocab_size=80), tmp_path / "wide")))
    bad = check(build_table(model), other.table)
    assert not bad.ok and not bad.usable
    text = "\n".join(bad.to_dict()["mismatches"])
    assert "vocabulary size: target 74, donor 80" in text
    assert text.count("weight shape") == 6          # up, gate, down x 2 layers
    p = tp.plan(build_table(model), ck.tensors, [ModuleRef(1, "mlp.gate")])
    assert p.nbytes == 64 * 32 * 4


def test_missing_path_and_pickle_refused(tmp_path, tiny_dirs):
    with pytest.raises(NotFound, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((tiny_dirs["target"] / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        CheckpointTensors(pk)
    assert CheckpointTensors(pk, allow_pickle=True).has("x")
    save_file({"a": torch.ones(2)}, str(tmp_path / "w.safetensors"))
