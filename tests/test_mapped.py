"""The vLLM paths' base model: weights left in the checkpoint's files (memory-mapped,
pages given back), equal to the loaded model's, for every architecture in the table;
and the KL an engine's top-N logprobs allow (a lower bound of the full KL)."""
from __future__ import annotations

import math

import pytest
import torch

from server.quality.forward import coarse_kl
from tiny import ARCH_CONFIGS, make_model, save
from transplant_core import transplant as tp
from transplant_core.arch import build_table
from transplant_core.checkpoint import load_model
from transplant_core.errors import UnsafeCheckpoint
from transplant_core.mapped import NotMappable, mapped_model, release


def _resident(path) -> int:
    """Resident bytes of this process's maps of `path`."""
    total, here = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0] and len(head) >= 5:
            here = line.rstrip().endswith(str(path))
        elif here and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


CONVERTED = ("gpt_neox", "mixtral")     # transformers renames / fuses their tensors on load


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_a_mapped_model_has_the_loaded_weights_and_table(tmp_path, arch):
    path = save(make_model(arch, seed=3), tmp_path / arch)
    if arch in CONVERTED:        # not in place: refused by name (the server then holds a copy, and says so)
        with pytest.raises(NotMappable, match="one for one"):
            mapped_model(path)
        return
    loaded, _, _ = load_model(str(path))
    m = mapped_model(path)
    assert tp.checksums(m) == tp.checksums(loaded)
    assert build_table(m).modules.keys() == build_table(loaded).modules.keys()
    assert not any(p.is_meta for p in m.parameters())


def test_pages_read_are_given_back_and_read_again_from_the_file(tmp_path):
    path = save(make_model("llama", seed=1, hidden_size=256, intermediate_size=1024), tmp_path / "m")
    weights = path / "model.safetensors"
    m = mapped_model(path)
    sums = tp.checksums(m)                         # reads every page
    assert _resident(weights) > 0.9 * weights.stat().st_size
    release(m)
    assert _resident(weights) < 0.05 * weights.stat().st_size
    assert tp.checksums(m) == sums                 # the same values, read again
    k = "model.layers.0.mlp.down_proj.weight"
    release(m)
    tp.tensor_digest(dict(m.named_parameters())[k])
    one = _resident(weights)
    release(m, k)
    assert _resident(weights) < one


def test_pickle_only_checkpoints_are_refused_in_place(tmp_path):
    model = make_model("llama")
    path = save(model, tmp_path / "pk")
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        mapped_model(path)
    with pytest.raises(NotMappable, match="pickle"):      # allowed: not in place (the server holds a copy)
        mapped_model(path, allow_pickle=True)


def test_the_coarse_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.log_softmax(torch.randn(64, generator=g) * 3, -1)
        q = torch.log_softmax(p + torch.randn(64, generator=g), -1)
        exact = float((p.exp() * (p - q)).sum())
        full = coarse_kl(dict(enumerate(p.tolist())), dict(enumerate(q.tolist())))
        assert math.isclose(full, exact, rel_tol=1e-4, abs_tol=1e-7)   # (float32 logprobs)
        for n in (1, 5, 20):
            top_p = {int(t): float(p[t]) for t in p.topk(n).indices}
            top_q = {int(t): float(q[t]) for t in q.topk(n).indices}
            assert coarse_kl(top_p, top_q) <= exact + 1e-9
