"""The decoder's CPU fast paths: oneDNN's matmul for large float32 linear layers
(transplant_core.kernels) and KV cache layers with spare room (transplant_core.kvcache).
Both must compute what transformers' own path computes (within float32 rounding for the
kernel, exactly for the cache) and stay correct under transplants, copies and autograd."""
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tiny import make_model, save
from transplant_core import generation, transplant as tp
from transplant_core.arch import build_table
from transplant_core.checkpoint import DictTensors, load_model
from transplant_core.errors import InvalidArgument
from transplant_core.generation import DecodeBatch, SamplingParams, SpliceUnsupported, cache_argument, generate
from transplant_core.kernels import ENV, MIN_ELEMENTS, OneDNNLinear, use_onednn
from transplant_core.kvcache import SPARE, SpareLayer
from transplant_core.refs import ModuleRef

# q/k/v/o are 512 x 512 (262,144 weight elements: below the threshold, they stay on torch's
# kernel); gate/up/down are 512 x 1024 (524,288: at it, they move to oneDNN)
WIDE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    return save(make_model("llama", 0, **WIDE), d / "target"), save(make_model("llama", 1, **WIDE), d / "donors" / "donor")


def onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key == "mkldnn::_linear_pointwise")


def plain_copy(model: nn.Module) -> nn.Module:
    """The same weights (shared) with every linear layer back on torch's kernel."""
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, OneDNNLinear):
            m.__class__ = nn.Linear
    return ref


def test_large_linear_layers_load_on_onednn_and_compute_what_torch_computes(wide, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model, tok, _ = load_model(str(wide[0]))
    fast = sorted(n for n, m in model.named_modules() if isinstance(m, OneDNNLinear))
    assert fast == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("down", "gate", "up")]
    assert all(type(m) is nn.Linear for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n not in fast)        # attention and the 74-token head
    x = tok(["the quick brown fox", "add:1+2="], return_tensors="pt", padding=True)
    with torch.no_grad():
        calls = onednn_calls(lambda: model(**x))
        got = model(**x).logits
        want = plain_copy(model)(**x).logits
    assert calls == 6                                             # the kernel really ran, once per layer
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_kernel_can_be_turned_off_and_a_bad_choice_is_named(wide, monkeypatch):
    monkeypatch.setenv(ENV, "")                                   # empty, as in env templates: the default
    assert any(isinstance(m, OneDNNLinear) for m in load_model(str(wide[0]))[0].modules())
    monkeypatch.setenv(ENV, "torch")
    model, _, _ = load_model(str(wide[0]))
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())
    monkeypatch.setenv(ENV, "mkl")
    with pytest.raises(InvalidArgument, match=f"{ENV} must be 'onednn' or 'torch', not 'mkl'"):
        load_model(str(wide[0]))


def test_a_transplanted_model_keeps_the_kernel_and_reads_the_new_weights(wide, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model, tok, _ = load_model(str(wide[0]))
    donor, _, _ = load_model(str(wide[1]))
    table = build_table(model)
    refs = [ModuleRef(1, "mlp.down"), ModuleRef(0, "mlp.gate")]
    plan = tp.plan(table, DictTensors(dict(donor.named_parameters())), refs)
    child, _ = tp.derive(model, plan)
    assert isinstance(child.model.layers[1].mlp.down_proj, OneDNNLinear)
    assert child.model.layers[1].mlp.down_proj is not model.model.layers[1].mlp.down_proj
    ref = plain_copy(model)                                       # the same change on torch's kernel
    with torch.no_grad():
        for k in plan.keys:
            ref.get_parameter(k).copy_(donor.get_parameter(k))
    x = tok(["sort:dcba="], return_tensors="pt")
    with torch.no_grad():
        got, want, before = child(**x).logits, ref(**x).logits, model(**x).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got - before).abs().max() > 1e-2                       # the new weights are what ran


def test_autograd_and_other_dtypes_fall_back_to_torch(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 512)
    use_onednn(nn.Sequential(lin))
    assert isinstance(lin, OneDNNLinear) and lin.in_features * lin.out_features >= MIN_ELEMENTS
    x = torch.randn(3, 1024, requires_grad=True)
    assert onednn_calls(lambda: lin(x).sum().backward()) == 0      # no backward in the kernel: torch's
    g = x.grad.clone()
    x.grad = None
    nn.functional.linear(x, lin.weight, lin.bias).sum().backward()
    assert torch.equal(g, x.grad)
    with torch.no_grad():
        assert onednn_calls(lambda: lin(x)) == 1
        half = nn.Linear(1024, 512).to(torch.bfloat16)
        use_onednn(nn.Sequential(half))
        xb = x.detach().to(torch.bfloat16)
        assert onednn_calls(lambda: half(xb)) == 0
        assert torch.equal(half(xb), nn.functional.linear(xb, half.weight, half.bias))
    strided = OneDNNLinear(1024, 512)                              # a bias oneDNN would misread: torch's
    strided.bias = nn.Parameter(torch.randn(1024)[::2])
    with torch.no_grad():
        assert onednn_calls(lambda: strided(x)) == 0
        assert torch.equal(strided(x), nn.functional.linear(x, strided.weight, strided.bias))
    small = nn.Linear(128, 384)
    assert use_onednn(nn.Sequential(small)) == 0 and type(small) is nn.Linear


def test_decoding_on_the_kernel_matches_the_model_on_torchs_within_rounding(wide, monkeypatch):
    """Greedy tokens can differ only where two logits tie within float32 rounding: each
    token the fast model picks is within 1e-3 of the best logit on torch's kernel."""
    monkeypatch.delenv(ENV, raising=False)
    model, tok, _ = load_model(str(wide[0]))
    ref = plain_copy(model)
    prompts = ["hello", "the quick brown fox", "add:1+2=", "Q"]
    out = generate(model, tok, prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for p, c in zip(prompts, out):
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            logits = ref(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1]
        picked = logits.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert (logits.max(1).values - picked).max() < 1e-3


# ---- the KV cache with spare room -------------------------------------------------------------

def test_a_spare_layer_writes_in_place_until_full_then_grows_keeping_its_contents():
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 8)          # values may be wider than keys
    layer = SpareLayer.assemble([(k, v)], 5)
    ref_k, ref_v, buf = k, v, layer._k.data_ptr()
    for step in range(SPARE + 3):
        nk, nv = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 8)
        ref_k, ref_v = torch.cat([ref_k, nk], 2), torch.cat([ref_v, nv], 2)
        got_k, got_v = layer.update(nk, nv)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        assert (layer._k.data_ptr() == buf) == (step < SPARE)       # no copy until the room runs out
        assert layer.get_seq_length() == 6 + step


@pytest.mark.parametrize("op", ["crop", "reorder_cache", "batch_select_indices", "batch_repeat_interleave",
                                "reset", "offload_prefetch"])
def test_transformers_own_layer_methods_work_on_a_spare_layer(op):
    """What beam search, assisted decoding or offloading do to a cache layer leaves a
    SpareLayer equal to transformers' DynamicLayer, before and after the next updates."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 8)
    ours, theirs = SpareLayer.assemble([(k, v)], 6), DynamicLayer()
    theirs.update(k, v)
    for layer in (ours, theirs):
        {"crop": lambda: layer.crop(-2), "reorder_cache": lambda: layer.reorder_cache(torch.tensor([2, 0, 0])),
         "batch_select_indices": lambda: layer.batch_select_indices(torch.tensor([1, 2])),
         "batch_repeat_interleave": lambda: layer.batch_repeat_interleave(2), "reset": layer.reset,
         "offload_prefetch": lambda: (layer.offload(), layer.prefetch())}[op]()
    assert ours.get_seq_length() == theirs.get_seq_length()
    rows = {"batch_select_indices": 2, "batch_repeat_interleave": 6}.get(op, 3)
    for _ in range(SPARE + 2):                                       # past a reallocation
        nk, nv = torch.randn(rows, 2, 1, 4), torch.randn(rows, 2, 1, 8)
        a, b = ours.update(nk, nv), theirs.update(nk, nv)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    kept = ours.select([0], 1)
    assert torch.equal(kept.keys, theirs.keys[[0], :, 1:])


def test_a_cache_with_more_state_than_keys_and_values_is_left_to_the_model(tokenizer):
    """MiniMax's cache (full and linear attention layers) is a DynamicCache subclass whose
    linear layers hold no keys: generate keeps the model's own cache, the continuous
    batch refuses it by name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transplant_core.zoo.tokenizer import VOCAB_SIZE

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("minimax", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                               num_experts_per_tok=1, max_position_embeddings=128, vocab_size=VOCAB_SIZE,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = tokenizer("hello")["input_ids"]
    got = generate(model, tokenizer, ["hello"], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert got.token_ids == own_cache_greedy(model, ids, 6)
    with pytest.raises(SpliceUnsupported, match="MiniMaxForCausalLM's KV cache is not a plain dynamic cache"):
        DecodeBatch(model, tokenizer).add([(0, ids, SamplingParams(max_new_tokens=3))])


def test_joining_and_leaving_rows_splice_spare_layers_exactly():
    torch.manual_seed(0)
    a = (torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4))
    b = (torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4))
    layer = SpareLayer.assemble([a, b], 7)
    pad = torch.zeros(3, 2, 3, 4)
    assert torch.equal(layer.keys, torch.cat([a[0], torch.cat([pad, b[0]], 2)]))
    assert torch.equal(layer.values, torch.cat([a[1], torch.cat([pad, b[1]], 2)]))
    kept = layer.select([4, 1], 2)
    assert torch.equal(kept.keys, layer.keys[[4, 1], :, 2:]) and torch.equal(kept.values, layer.values[[4, 1], :, 2:])


def own_cache_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own cache (DynamicCache: concatenation per step)."""
    kw = cache_argument(model)
    with torch.no_grad():
        out, toks = model(torch.tensor([ids]), use_cache=True), []
        for _ in range(n):
            toks.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([toks[-1:]]), use_cache=True, **{kw: getattr(out, kw)})
    return toks


@pytest.mark.parametrize("kind", ["spare", "cat"])
def test_the_continuous_batch_equals_transformers_own_cache(kind, tokenizer, monkeypatch):
    """Rows joining, leaving and decoding past several reallocations give the tokens of
    transformers' own cache, and a decode step with room left copies no cache. `cat`: the
    splicing kept for transformers without cache layers (< 4.56), run on this one."""
    if kind == "cat":
        monkeypatch.setattr(generation, "_layer_kind", lambda: generation._CatLayers)
    model = make_model("llama", 3)
    prompts, lengths = ["hello", "the quick brown fox", "zz", "sort:dcba="], (80, 9, 45, 70)
    b, got, pending, step, in_place = DecodeBatch(model, tokenizer), {}, [0, 1, 2, 3], 0, 0
    while pending or len(b):
        if pending and step % 4 == 0:
            i = pending.pop(0)
            events = b.add([(i, tokenizer(prompts[i])["input_ids"],
                             SamplingParams(max_new_tokens=lengths[i], ignore_eos=True))])
        elif kind == "cat":
            events = b.step()
        else:
            before, rows = [layer._k.data_ptr() for layer in b.layers], len(b)
            events = b.step()
            if len(b) == rows:
                in_place += [layer._k.data_ptr() for layer in b.layers] == before
        got.update({e.key: e.completion for e in events if e.completion is not None})
        step += 1
    assert in_place >= 60 or kind == "cat"      # of the ~70 steps with no row joining or leaving
    for i, p in enumerate(prompts):
        assert got[i].token_ids == own_cache_greedy(model, tokenizer(p)["input_ids"], lengths[i])


def test_the_server_on_the_kernel_answers_each_generation_s_own_text_under_swaps(wide, tmp_path, monkeypatch):
    """The embedded server on a model whose MLPs run on oneDNN: gRPC and the official openai
    client send greedy requests while transplants of those MLPs and reverts run; none
    fails, and every reply equals its reported generation's own greedy text (the
    generation's model, on the same kernel)."""
    from serverkit import Clients, config, load_during_swaps, start

    from server.rpc import admin_pb2 as A
    from transplant_core.generation import greedy

    monkeypatch.delenv(ENV, raising=False)
    s = start(config(tmp_path, wide[0], [wide[1].parent], watch_donor_roots=False, probes=[]))
    c = Clients(s.grpc_port, s.token)
    try:
        c.admin("RegisterDonor", A.RegisterDonorRequest(name="donor", path=str(wide[1])))
        prompts = ["hello", "the quick brown", "add:1+2=", "Q", "sort:dcba="]
        results, errors = load_during_swaps(s, c, 3, prompts, n=10, donor="donor", modules=("layers.*.mlp.*",),
                                            grpc_clients=3, http_clients=2, per_swap=4)
        assert not errors, errors[:3]
        gens = sorted({r["generation"] for r in results})
        assert len(gens) >= 3 and {r["api"] for r in results} == {"grpc", "http"}, gens
        texts = {}
        for g in gens:
            model = s.runtime.gens.materialize(g)
            assert isinstance(model.model.layers[1].mlp.down_proj, OneDNNLinear)
            texts[g] = {p: greedy(model, s.runtime.tokenizer, [p], 10)[0].text for p in prompts}
            for r in results:
                if r["generation"] == g:
                    assert r["text"] == texts[g][r["prompt"]] and not r["spans"], (g, r)
        assert any(texts[gens[0]][p] != texts[gens[1]][p] for p in prompts)   # a mix would have been caught
    finally:
        c.close()
        s.stop(2)
