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


# ---- low-rank transplants --------------------------------------------------------------

def _pair_table():
    target, donor = make_model("llama", 0), make_model("llama", 1)
    return target, donor, build_table(target)


def test_lowrank_moves_each_weight_by_its_top_singular_directions():
    target, donor, table = _pair_table()
    refs = [ModuleRef(0, "mlp.down"), ModuleRef(1, "attn.q")]
    full = tp.plan(table, ModelTensors(donor), refs)
    p = tp.lowrank(full, ModelTensors(target), rank=3)
    assert p.unit == "lowrank" and p.ranks == {"layers.0.mlp.down": 3, "layers.1.attn.q": 3}
    params, dparams = dict(target.named_parameters()), dict(donor.named_parameters())
    for m in p.modules:
        b, a = p.factors[m.weight_key]
        out, inp = m.weight_shape
        assert b.shape == (out, 3) and a.shape == (3, inp) and b.dtype == a.dtype == torch.float32
        delta = dparams[m.weight_key].detach() - params[m.weight_key].detach()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]                       # Eckart-Young: the best rank-3 move
        assert torch.allclose(b @ a, best, atol=1e-5)
        assert p.energy[str(m.ref)] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    # the factors are a fraction of the modules' bytes
    assert p.stored_bytes < p.nbytes / 2
    before = tp.checksums(target)
    snap = tp.commit(target, p)
    for m in p.modules:
        b, a = p.factors[m.weight_key]
        assert torch.allclose(params[m.weight_key].detach(), snap.tensors[m.weight_key] + b @ a, atol=1e-5)
    tp.revert(target, table, snap)
    assert tp.checksums(target) == before                        # bitwise


def test_lowrank_at_full_rank_reaches_the_donor_and_blends_with_alpha():
    target, donor, table = _pair_table()
    ref = ModuleRef(0, "mlp.up")
    info = table[ref]
    p = tp.lowrank(tp.plan(table, ModelTensors(donor), [ref]), ModelTensors(target), rank=10_000)
    assert p.ranks[str(ref)] == min(info.weight_shape) and p.energy[str(ref)] == pytest.approx(1.0)
    want = dict(donor.named_parameters())[info.weight_key].detach()
    old = dict(target.named_parameters())[info.weight_key].detach().clone()
    assert torch.allclose(p.value(info.weight_key, old), want, atol=1e-5)
    half = tp.lowrank(tp.plan(table, ModelTensors(donor), [ref], alpha=0.5), ModelTensors(target), rank=10_000)
    assert torch.allclose(half.value(info.weight_key, old), (old + want) / 2, atol=1e-5)


def test_lowrank_budget_is_shared_by_singular_value_per_parameter():
    target, donor, table = _pair_table()
    refs = table.refs()
    full = tp.plan(table, ModelTensors(donor), refs)
    budget = 3000
    p = tp.lowrank(full, ModelTensors(target), budget=budget)
    used = sum(r * sum(table[ModuleRef.parse(name)].weight_shape) for name, r in p.ranks.items())
    assert 0 < used <= budget and all(r > 0 for r in p.ranks.values())
    cheapest = min(sum(table[r].weight_shape) for r in refs)
    assert budget - used < cheapest or len(p.ranks) == len(refs)
    # no direction left out is worth more per parameter than the least one taken
    svs = {str(r): torch.linalg.svd(full.values[table[r].weight_key].float()
                                    - dict(target.named_parameters())[table[r].weight_key].detach(),
                                    full_matrices=False)[1] for r in refs}
    cost = {str(r): sum(table[r].weight_shape) for r in refs}
    taken = min(float(svs[n][i]) ** 2 / cost[n] for n, r in p.ranks.items() for i in range(r))
    skipped = [float(svs[n][p.ranks.get(n, 0)]) ** 2 / cost[n] for n in svs
               if p.ranks.get(n, 0) < svs[n].numel() and cost[n] <= budget - used]
    assert all(v <= taken + 1e-9 for v in skipped)
    assert {str(m.ref) for m in p.modules} == set(p.ranks)          # modules given no rank are dropped


@pytest.mark.parametrize("kw, msg", [({}, "rank or a parameter budget"), ({"rank": 2, "budget": 10}, "not both"),
                                     ({"rank": 0}, "rank must be"), ({"rank": 1.5}, "rank must be"),
                                     ({"budget": -3}, "budget must be"), ({"budget": 5}, "holds no rank")])
def test_lowrank_bad_arguments_are_refused(kw, msg):
    target, donor, table = _pair_table()
    full = tp.plan(table, ModelTensors(donor), [ModuleRef(0, "mlp.down")])
    with pytest.raises(InvalidArgument, match=msg):
        tp.lowrank(full, ModelTensors(target), **kw)


def test_lowrank_update_is_the_same_bits_whatever_the_thread_count():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(96, 80, generator=g)
    b, a = torch.randn(96, 7, generator=g), torch.randn(7, 80, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tp.lowrank_update(old, b, a, 0.7)
        torch.set_num_threads(max(2, threads))
        two = tp.lowrank_update(old, b, a, 0.7)
    finally:
        torch.set_num_threads(threads)
    assert tp.tensor_digest(one) == tp.tensor_digest(two)
    assert torch.allclose(one, old + 0.7 * (b @ a), atol=1e-4)
    half = tp.lowrank_update(old.bfloat16(), b, a)
    assert half.dtype == torch.bfloat16
    with pytest.raises(InvalidArgument, match="do not fit"):
        tp.lowrank_update(old, a, b)


def test_lowrank_of_equal_weights_has_nothing_to_move():
    target, _, table = _pair_table()
    same = make_model("llama", 0)
    with pytest.raises(InvalidArgument, match="nothing to move"):
        tp.lowrank(tp.plan(table, ModelTensors(same), [ModuleRef(0, "mlp.down")]), ModelTensors(target), rank=2)
