"""Every architecture in the table (and the generic fallback) is inspected and round-tripped."""
import pytest
import torch

from tiny import ARCH_CONFIGS, make_model
from transplant_core import transplant as tp
from transplant_core.arch import ARCHITECTURES, build_table
from transplant_core.checkpoint import ModelTensors
from transplant_core.refs import KINDS, ModuleRef, parse_refs
from transplant_core.errors import InvalidArgument

EXPECTED = {
    "llama": 7, "mistral": 7, "qwen2": 7, "gemma2": 7, "phi3": 4, "gpt2": 4, "gpt_neox": 4,
    "stablelm": 7, "opt": 6, "falcon": 4, "mixtral": 4,
}


def test_table_covers_the_promised_architectures():
    assert set(EXPECTED) <= set(ARCHITECTURES)
    for arch, spec in ARCHITECTURES.items():
        assert set(spec["modules"]) <= set(KINDS), arch


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_inspect_and_round_trip(arch):
    target, donor = make_model(arch, 0), make_model(arch, 1)
    table = build_table(target)
    if arch in EXPECTED:
        assert table.source == "table"
        assert len(table.modules) == 2 * EXPECTED[arch]
        assert all(r.kind in KINDS for r in table.modules)
    else:
        assert table.source == "discovered"
        assert len(table.modules) == 8           # BLOOM: qkv, dense, h_to_4h, 4h_to_h x 2 layers
    if arch == "mixtral":                        # experts and router: listed, not transplanted
        assert table.skipped and any("expert" in k for k in table.skipped) and any("gate" in k for k in table.skipped)
    elif arch in EXPECTED:
        assert table.skipped == (), table.skipped
    for info in table.modules.values():
        out_f, in_f = info.out_in
        mod = target.get_submodule(info.path)
        w = mod.weight
        assert tuple(w.shape) == info.weight_shape
        if arch == "gpt2":
            assert info.transposed and (w.shape[1], w.shape[0]) == (out_f, in_f)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = target(ids).logits.clone()
    sums = tp.checksums(target)
    refs = table.refs()[:3]
    snap = tp.commit(target, tp.plan(table, ModelTensors(donor, "donor"), refs))
    assert not torch.equal(target(ids).logits, before)
    changed = {k for k, v in tp.checksums(target).items() if v != sums[k]}
    # weights all differ; biases may be equal (both zero-initialised), so only a subset changes
    assert {table[r].weight_key for r in refs} <= changed <= {k for r in refs for k in table[r].keys}
    tp.revert(target, table, snap)
    assert torch.equal(target(ids).logits, before)
    assert tp.checksums(target) == sums


def test_module_ref_round_trip_and_errors():
    r = ModuleRef.parse("layers.3.mlp.down")
    assert r == ModuleRef(3, "mlp.down") and str(r) == "layers.3.mlp.down" and r.group == "ffn"
    assert ModuleRef.parse("layers.0.attn.qkv").group == "attention"
    with pytest.raises(InvalidArgument, match="layers.<index>.<kind>"):
        ModuleRef.parse("model.layers.0.q_proj")
    with pytest.raises(InvalidArgument, match="repeated"):
        parse_refs("layers.0.attn.q,layers.0.attn.q")
