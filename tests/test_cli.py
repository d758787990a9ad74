"""The offline CLI end to end on tiny checkpoints: real subprocess-free calls of main()."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.cli import main
from tiny import make_model, save
from transplant_core import transplant as tp


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("task") / "t.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"add:{i}+1=", "answer": str(i + 1)}) for i in range(6)) + "\n")
    return p


def test_inspect_json_is_one_document(capsys, tiny_dirs):
    code, out, _ = run(capsys, "inspect", str(tiny_dirs["target"]), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["arch"] == "llama" and doc["path"] == str(tiny_dirs["target"])
    assert len(doc["modules"]) == 14
    down = next(m for m in doc["modules"] if m["name"] == "layers.0.mlp.down")
    assert down["shape"] == [32, 64] and down["bytes"] == 32 * 64 * 4
    code, out, _ = run(capsys, "inspect", str(tiny_dirs["target"]))
    assert "layers.1.mlp.gate" in out and "14 transplantable modules" in out


def test_compat_exit_codes(capsys, tiny_dirs, tmp_path):
    code, out, _ = run(capsys, "compat", str(tiny_dirs["target"]), str(tiny_dirs["donor"]), "--json")
    assert code == 0 and json.loads(out)["ok"]
    other = save(make_model("gpt2", 0), tmp_path / "gpt2")
    code, out, _ = run(capsys, "compat", str(tiny_dirs["target"]), str(other))
    assert code == 1 and "NOT compatible" in out and "architecture: target is 'llama', donor is 'gpt2'" in out


def test_analyze_eval_apply(capsys, tiny_dirs, task_file, tmp_path):
    t, d = str(tiny_dirs["target"]), str(tiny_dirs["donor"])
    code, out, _ = run(capsys, "analyze", "--target", t, "--donor", d, "--task", str(task_file), "--k", "3",
                       "--plot", str(tmp_path / "s.png"), "--json", "--quiet")
    doc = json.loads(out)
    assert code == 0 and len(doc["modules"]) == 14 and len(doc["selected"]) == 3
    assert doc["modules"][0]["score"] >= doc["modules"][-1]["score"]
    assert (tmp_path / "s.png").stat().st_size > 1000
    code, out, _ = run(capsys, "eval", t, "--task", str(task_file), "--json", "--quiet")
    ev = json.loads(out)
    assert code == 0 and ev["n"] == 6 and 0 <= ev["accuracy"] <= 1 and ev["correct"] == round(ev["accuracy"] * 6)
    out_dir = tmp_path / "applied"
    code, out, _ = run(capsys, "apply", "--target", t, "--donor", d, "--task", str(task_file), "--k", "3",
                       "--out", str(out_dir), "--json", "--quiet")
    assert code == 0, out
    applied = json.loads(out)
    assert applied["modules"] == doc["selected"]
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    donor = AutoModelForCausalLM.from_pretrained(d)
    target = AutoModelForCausalLM.from_pretrained(t)
    manifest = json.loads((out_dir / "transplant_manifest.json").read_text())
    assert [m["name"] for m in manifest["modules"]] == doc["selected"] and manifest["command"]
    lp, dp, tp_ = dict(loaded.named_parameters()), dict(donor.named_parameters()), dict(target.named_parameters())
    moved = {k for m in manifest["modules"] for k in m["keys"]}
    for k in lp:
        assert torch.equal(lp[k], dp[k] if k in moved else tp_[k]), k
    assert tp.checksums(loaded, sorted(moved)) == manifest["sha256_saved"]
    # the output is never overwritten by accident
    code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.0.mlp.up", "--out", str(out_dir))
    assert code == 2 and "not empty" in err


def test_apply_errors(capsys, tiny_dirs, tmp_path):
    t, d = str(tiny_dirs["target"]), str(tiny_dirs["donor"])
    code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.7.mlp.up", "--out", str(tmp_path / "x"))
    assert code == 2 and "layers.7.mlp.up" in err
    code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--out", str(tmp_path / "x"))
    assert code == 2 and "either --modules" in err
    code, _, err = run(capsys, "apply", "--target", t, "--donor", str(tmp_path / "missing"), "--modules", "layers.0.mlp.up",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.0.mlp.up", "--alpha", "2",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "alpha" in err
    assert not (tmp_path / "x").exists()
