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


# ---- issue 15: CLI frictions ---------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from server.cli.main import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cli(*argv, timeout=120, **kw):
    """`transplant ARGV...` in a child process, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout, **kw)


def parsers(p: argparse.ArgumentParser, path=("transplant",)):
    """Every parser of the CLI with its command path."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, q in a.choices.items():
                yield from parsers(q, path + (name,))


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_no_abbreviations_help_everywhere_and_no_idle_flags():
    tree = dict(parsers(build_parser()))
    assert ("transplant", "admin", "revert") in tree and ("transplant", "zoo", "list") in tree
    for path, p in tree.items():
        assert p.allow_abbrev is False, path
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}: no help text"
    for cmd in ("build", "list", "export-task"):              # zoo commands load no weights
        assert "--allow-pickle" not in options(tree[("transplant", "zoo", cmd)]), cmd
    assert "--allow-pickle" in options(tree[("transplant", "inspect")])
    plan, transplant = tree[("transplant", "admin", "plan")], tree[("transplant", "admin", "transplant")]
    assert not {"--eval", "--n"} & options(plan) and {"--eval", "--n"} <= options(transplant)
    # `--to` was an ambiguous prefix of --token/--token-file; a prefix is no longer accepted at all
    args = build_parser().parse_args(["admin", "revert", "--to", "1"])
    assert args.to == 1 and args.token is None
    r = cli("admin", "revert", "--tok", "x")
    assert r.returncode == 2 and "unrecognized arguments: --tok" in r.stderr and "ambiguous" not in r.stderr
    r = cli("admin", "plan", "--donor", "x", "--eval", "zoo:add")
    assert r.returncode == 2 and "unrecognized arguments: --eval" in r.stderr


def test_connection_options_before_or_after_the_action():
    ap = build_parser()
    for argv in (["admin", "--address", "h:1", "--timeout", "3", "status"],
                 ["admin", "status", "--address", "h:1", "--timeout", "3"]):
        a = ap.parse_args(argv)
        assert (a.address, a.timeout, a.token, a.token_file, a.tls_ca) == ("h:1", 3.0, None, None, None), argv
    a = ap.parse_args(["admin", "status"])
    assert (a.address, a.timeout) == ("127.0.0.1:50051", 600.0)
    a = ap.parse_args(["admin", "--token", "early", "revert", "--to", "2", "--address", "h:2"])
    assert (a.token, a.address, a.to) == ("early", "h:2", 2)


def test_unreachable_server_names_the_address_and_the_fix():
    from serverkit import free_port

    address = f"127.0.0.1:{free_port()}"
    r = cli("admin", "status", "--address", address, "--token", "t", "--timeout", "10")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot reach a transplant server at {address}" in r.stderr
    assert "transplant serve" in r.stderr and "--address" in r.stderr


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from serverkit import config, start

    root = tmp_path_factory.mktemp("served")
    save(make_model("llama", 0), root / "target")
    save(make_model("llama", 1), root / "donors" / "other")
    s = start(config(root, root / "target", [root / "donors"], watch_donor_roots=False))
    yield s, root
    s.stop(2)


def test_admin_against_a_running_server(live_server):
    s, root = live_server
    conn = ["--address", f"127.0.0.1:{s.grpc_port}", "--token", s.token]
    r = cli("admin", *conn, "status", "--json")                     # options before the action
    assert r.returncode == 0, r.stderr
    assert int(json.loads(r.stdout)["live_generation"]) == 0
    r = cli("admin", "register-donor", root / "donors" / "other", "--name", "other", *conn)   # ... and after
    assert r.returncode == 0 and "registered other" in r.stdout, r.stderr
    r = cli("admin", "transplant", "--donor", "other", "--modules", "layers.0.mlp.up", *conn)
    assert r.returncode == 0 and r.stdout.startswith("generation 1 (transplant from other) is live"), r.stdout + r.stderr
    r = cli("admin", "transplant", "--donor", "other", "--modules", "layers.1.mlp.up", *conn)
    assert r.returncode == 0 and r.stdout.startswith("generation 2 (transplant from other) is live"), r.stderr
    r = cli("admin", "revert", "--to", "1", *conn)                  # `--to` is not a prefix of --token
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("generation 3 (revert to generation 1) is live (parent 2,"), r.stdout
    r = cli("admin", "status", "--json", *conn)
    assert int(json.loads(r.stdout)["live_generation"]) == 3
    # a task file outside the task roots: the fix is a server flag, said as such
    outside = root / "t.jsonl"
    outside.write_text(json.dumps({"prompt": "add:1+1=", "answer": "2"}) + "\n")
    r = cli("admin", "eval", "--task", outside, *conn)
    assert r.returncode == 2 and "outside the task roots" in r.stderr, r.stderr
    assert "start the server with --task-root DIR" in r.stderr and "Traceback" not in r.stderr


def test_closed_stdout_is_not_an_error(tiny_dirs):
    """`transplant inspect ... | head -1`: the reader leaves; no traceback, status 141 or 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra in ([], ["--json"]):
        p = subprocess.Popen([sys.executable, "-m", "server.cli", "inspect", str(tiny_dirs["target"]), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        p.stdout.close()                     # before the child writes anything: every write fails
        err = p.stderr.read().decode()
        assert p.wait(60) in (0, 141), err
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m server.cli inspect "{tiny_dirs["target"]}" | head -1'],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_apply_output_honours_the_umask(capsys, tiny_dirs, tmp_path):
    t, d = str(tiny_dirs["target"]), str(tiny_dirs["donor"])
    out_dir = tmp_path / "shared"
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.0.mlp.up",
                           "--out", str(out_dir), "--quiet")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o750
    files = list(out_dir.iterdir())
    assert {"model.safetensors", "config.json", "transplant_manifest.json"} <= {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == (0o750 if f.is_dir() else 0o640), f


def test_offline_commands_do_not_import_torch():
    """`transplant --help` and `transplant zoo list` used to import torch and transformers
    (6-10 s on 2 cores); building the parser and listing the zoo needs neither."""
    code = ("import json, sys\n"
            "import server.cli as c\n"
            "c.build_parser().format_help()\n"
            "rc = c.main(['zoo', 'list', '--json'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers', 'grpc') if m in sys.modules)\n"
            "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stderr.strip().splitlines()[-1])
    assert doc == {"rc": 0, "heavy": []}, r.stderr
    listed = json.loads(r.stdout)
    assert "v2" in listed["models"] and "add" in listed["tasks"] and "cross_generation" in listed["settings"]
    r = cli("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "admin" in r.stdout


def test_editable_install_is_a_plain_path_entry(tmp_path):
    """The project is a flat layout whose root is the import root: the editable install
    adds that root to sys.path (setuptools' static .pth), so setuptools has no reason
    for its 'Editable installation ... folders with the same name' warning on every setup."""
    pytest.importorskip("setuptools", minversion="68")
    code = ("import sys, warnings\n"
            "warnings.simplefilter('always')\n"
            "from setuptools import build_meta\n"
            "print(build_meta.build_editable(sys.argv[1]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Editable installation" not in r.stderr and "may take precedence" not in r.stderr, r.stderr
    import zipfile

    with zipfile.ZipFile(tmp_path / r.stdout.strip().splitlines()[-1]) as whl:
        pth = [n for n in whl.namelist() if n.endswith(".pth")]
        assert len(pth) == 1 and whl.read(pth[0]).decode().strip() == str(ROOT)


def test_selectors_offline(capsys, tiny_dirs, task_file, tmp_path):
    """--selector on analyze and apply; `all` compares them at --k and uses the best; the
    CLI's list of selectors is the core's (kept apart so --help needs no torch)."""
    from server.cli.common import SELECTOR_CHOICES
    from transplant_core.selectors import SELECTORS

    assert SELECTOR_CHOICES == SELECTORS + ("all",)
    t, d = str(tiny_dirs["target"]), str(tiny_dirs["donor"])
    code, out, _ = run(capsys, "analyze", "--target", t, "--donor", d, "--task", str(task_file), "--k", "3",
                       "--selector", "all", "--json", "--quiet")
    doc = json.loads(out)
    comp = doc["comparison"]
    assert code == 0 and doc["selector"] == comp["chosen"] == comp["selectors"][0]["selector"]
    assert doc["selected"] == comp["selectors"][0]["modules"] and comp["why"]
    assert [r["loss"] for r in comp["selectors"]] == sorted(r["loss"] for r in comp["selectors"])
    code, out, _ = run(capsys, "analyze", "--target", t, "--donor", d, "--task", str(task_file), "--k", "3",
                       "--selector", "dw", "--json", "--quiet")
    dw = json.loads(out)
    assert code == 0 and dw["selector"] == "dw" and dw["selected"] == next(
        r["modules"] for r in comp["selectors"] if r["selector"] == "dw")
    code, out, _ = run(capsys, "apply", "--target", t, "--donor", d, "--task", str(task_file), "--k", "3",
                       "--selector", "dw", "--out", str(tmp_path / "o"), "--json", "--quiet")
    assert code == 0 and json.loads(out)["modules"] == dw["selected"]
    assert json.loads((tmp_path / "o" / "transplant_manifest.json").read_text())["selection"]["method"] == "dw"
    code, _, err = run(capsys, "analyze", "--target", t, "--donor", d, "--task", str(task_file),
                       "--selector", "all", "--quiet")
    assert code == 2 and "give --k" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_copies_the_target_and_rewrites_only_the_changed_bytes(capsys, tmp_path, dtype):
    """A target saved the way hub repositories are (sharded with an index, a model card,
    custom files, a subfolder): every file but the shards holding changed tensors is
    byte-identical in the output, those shards differ only in the changed tensors' bytes
    (same header, dtype, offsets), and the output loads with from_pretrained."""
    from safetensors import safe_open

    from tiny import build_tokenizer

    tdir, ddir = tmp_path / "target", tmp_path / "donor"
    make_model("llama", 0).to(dtype).save_pretrained(tdir, max_shard_size="20KB")
    build_tokenizer().save_pretrained(tdir)
    (tdir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A model card\n")
    (tdir / "params.json").write_text('{"dim": 32}\n')
    (tdir / "1_Pooling").mkdir()
    (tdir / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    cfg = json.loads((tdir / "config.json").read_text())
    (tdir / "config.json").write_text(json.dumps(dict(cfg, custom_note="kept as written"), indent=3))
    (tdir / "consolidated.safetensors").write_bytes(b"not read: the index names the weight files")
    make_model("llama", 1).to(dtype).save_pretrained(ddir)
    build_tokenizer().save_pretrained(ddir)
    shards = sorted(p.name for p in tdir.glob("*.safetensors"))
    assert len(shards) >= 3 and (tdir / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    code, text, err = run(capsys, "apply", "--target", str(tdir), "--donor", str(ddir), "--modules",
                          "layers.1.mlp.up,layers.1.attn.q", "--out", str(out), "--json", "--quiet")
    assert code == 0, err
    man = json.loads((out / "transplant_manifest.json").read_text())
    moved = {k for m in man["modules"] for k in m["keys"]}
    files = {p.relative_to(tdir) for p in tdir.rglob("*") if p.is_file()}
    assert {p.relative_to(out) for p in out.rglob("*") if p.is_file()} == files | {Path("transplant_manifest.json")}
    index = json.loads((tdir / "model.safetensors.index.json").read_text())["weight_map"]
    changed_files = {index[k] for k in moved}
    assert sorted(man["rewritten_files"]) == sorted(changed_files) and len(changed_files) < len(shards)
    for rel in files:
        if str(rel) not in changed_files:
            assert (out / rel).read_bytes() == (tdir / rel).read_bytes(), rel
    for name in changed_files:
        with safe_open(str(tdir / name), "pt") as t, safe_open(str(out / name), "pt") as o, \
                safe_open(str(ddir / "model.safetensors"), "pt") as d:
            assert t.metadata() == o.metadata() and list(t.keys()) == list(o.keys())
            for k in t.keys():
                want = d.get_tensor(k) if k in moved else t.get_tensor(k)
                assert o.get_tensor(k).dtype == dtype and torch.equal(o.get_tensor(k), want), k
        head = 8 + int.from_bytes((tdir / name).read_bytes()[:8], "little")
        assert (out / name).read_bytes()[:head] == (tdir / name).read_bytes()[:head]   # same header
    loaded = AutoModelForCausalLM.from_pretrained(out)
    donor, target = AutoModelForCausalLM.from_pretrained(ddir), AutoModelForCausalLM.from_pretrained(tdir)
    lp, dp, tp_ = dict(loaded.named_parameters()), dict(donor.named_parameters()), dict(target.named_parameters())
    for k in lp:
        assert torch.equal(lp[k], dp[k] if k in moved else tp_[k]), k
    assert tp.checksums(loaded, sorted(moved)) == man["sha256_saved"]


def test_models_that_are_not_what_they_seem_are_refused_by_name(capsys, tmp_path, tiny_dirs):
    """A bare LlamaModel (no head), a checkpoint missing its lm_head, a BERT encoder and a
    remote-code checkpoint: every command refuses them with one clean line, exit 2."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel, LlamaModel

    from tiny import build_tokenizer, make_config

    bare = tmp_path / "bare"
    LlamaModel(make_config("llama")).save_pretrained(bare)
    build_tokenizer().save_pretrained(bare)
    headless = save(make_model("llama", 0, tie_word_embeddings=False), tmp_path / "headless")
    w = load_file(headless / "model.safetensors")
    del w["lm_head.weight"]
    save_file(w, headless / "model.safetensors", metadata={"format": "pt"})
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(bert)
    remote = save(make_model("llama", 0), tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (remote / "config.json").write_text(json.dumps(cfg))
    t = str(tiny_dirs["target"])
    cases = {bare: "not a causal language model", headless: "lm_head.weight", bert: "not a causal language model",
             remote: "never runs a checkpoint's code"}
    for path, why in cases.items():
        for argv in (["inspect", str(path)], ["compat", t, str(path)], ["eval", str(path), "--task", "zoo:copy"],
                     ["apply", "--target", t, "--donor", str(path), "--modules", "layers.0.mlp.up",
                      "--out", str(tmp_path / "x")]):
            code, out, err = run(capsys, *argv)
            assert code == 2 and why in err and "Traceback" not in err, (path.name, argv[0], code, err)


def test_broken_safetensors_and_trainer_pickles_are_named_not_crashed(capsys, tmp_path, tiny_dirs):
    import shutil

    t = str(tiny_dirs["target"])
    for name, mangle in (("truncated", lambda b: b[:len(b) // 2]),
                         ("huge-header", lambda b: (1 << 40).to_bytes(8, "little") + b[8:])):
        d = tmp_path / name
        shutil.copytree(tiny_dirs["donor"], d)
        (d / "model.safetensors").write_bytes(mangle((d / "model.safetensors").read_bytes()))
        code, _, err = run(capsys, "compat", t, str(d))
        assert code == 2 and f"{d / 'model.safetensors'} is not a valid safetensors file" in err, err
        assert "Traceback" not in err and "SafetensorError" not in err
    trainer = tmp_path / "trainer"
    shutil.copytree(tiny_dirs["donor"], trainer)
    (trainer / "training_args.bin").write_bytes(b"\x80\x04not a model")     # a Trainer folder's pickle
    (trainer / "optimizer.pt").write_bytes(b"\x80\x04not a model")
    code, out, err = run(capsys, "inspect", str(trainer), "--allow-pickle")
    assert code == 0, err


def test_a_bf16_target_takes_an_fp32_donor_only_with_cast(capsys, tmp_path):
    """Loaded as stored; a dtype difference is listed by compat but stays transplantable
    with --cast, which reports the rounding error per module in the output and manifest."""
    from safetensors import safe_open

    from transplant_core.checkpoint import load_model

    tdir = save(make_model("llama", 0).to(torch.bfloat16), tmp_path / "bf16")
    cfg = json.loads((tdir / "config.json").read_text())
    (tdir / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float32", dtype="float32")))
    assert load_model(str(tdir))[0].dtype == torch.bfloat16           # as stored, not as config says
    ddir = save(make_model("llama", 1), tmp_path / "fp32")
    code, out, _ = run(capsys, "compat", str(tdir), str(ddir))
    assert "dtype target bfloat16 vs donor float32 (transplantable with --cast" in out
    argv = ["apply", "--target", str(tdir), "--donor", str(ddir), "--modules", "layers.0.mlp.up", "--quiet"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "no"))
    assert code == 2 and "pass --cast" in err
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "yes"), "--cast", "--json")
    assert code == 0, err
    doc = json.loads(out)
    c = doc["casts"]["layers.0.mlp.up"]
    assert c["from"] == "float32" and c["to"] == "bfloat16" and 0 < c["max_rel_error"] < 2 ** -7
    assert json.loads((tmp_path / "yes" / "transplant_manifest.json").read_text())["casts"] == doc["casts"]
    key = "model.layers.0.mlp.up_proj.weight"
    with safe_open(str(tmp_path / "yes" / "model.safetensors"), "pt") as o, \
            safe_open(str(ddir / "model.safetensors"), "pt") as d:
        assert o.get_tensor(key).dtype == torch.bfloat16
        assert torch.equal(o.get_tensor(key), d.get_tensor(key).to(torch.bfloat16))


def test_moe_experts_and_router_are_reported_as_skipped(capsys, tmp_path):
    a = save(make_model("mixtral", 0), tmp_path / "a")
    b = save(make_model("mixtral", 1), tmp_path / "b")
    code, out, _ = run(capsys, "compat", str(a), str(b))
    assert code == 0 and "skipped, not transplantable (per layer):" in out and "expert" in out
    code, out, _ = run(capsys, "inspect", str(a), "--json")
    doc = json.loads(out)
    assert {m["name"].split(".", 2)[2] for m in doc["modules"]} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    assert any("expert" in k for k in doc["not_transplantable"])


def test_apply_rank_writes_the_weights_the_runtime_would_install(capsys, tiny_dirs, tmp_path):
    from safetensors import safe_open

    from transplant_core.checkpoint import Checkpoint
    from transplant_core.refs import ModuleRef

    t, d, out = str(tiny_dirs["target"]), str(tiny_dirs["donor"]), tmp_path / "low"
    code, stdout, _ = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.0.mlp.down,layers.1.attn.q",
                          "--rank", "3", "--out", str(out), "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["unit"] == "lowrank" and doc["ranks"] == {"layers.0.mlp.down": 3, "layers.1.attn.q": 3}
    assert doc["stored_bytes"] == 3 * (32 + 64) * 4 + 3 * (32 + 32) * 4 and all(0 < e < 1 for e in doc["energy"].values())
    manifest = json.loads((out / "transplant_manifest.json").read_text())
    assert manifest["unit"] == "lowrank" and manifest["lowrank"]["ranks"] == doc["ranks"]
    tgt, don = Checkpoint.open(t), Checkpoint.open(d)
    p = tp.lowrank(tp.plan(tgt.table, don.tensors, [ModuleRef.parse(m) for m in doc["ranks"]]), tgt.tensors, rank=3)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            old = tgt.tensors.get(k)
            want = p.value(k, old) if k in p.keys else old
            assert tp.tensor_digest(f.get_tensor(k)) == tp.tensor_digest(want), k      # Plan.value: one definition
    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None
    code, stdout, _ = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.*.mlp.*", "--budget", "700",
                          "--out", str(tmp_path / "budget"), "--json")
    doc = json.loads(stdout)
    assert code == 0 and 0 < sum(r * 96 for r in doc["ranks"].values()) <= 700
    for extra, msg in ((["--rank", "2", "--budget", "100"], "not both"), (["--rank", "-1"], ">= 1"),
                       (["--budget", "10"], "holds no rank")):
        code, _, err = run(capsys, "apply", "--target", t, "--donor", d, "--modules", "layers.0.mlp.up", *extra,
                           "--out", str(tmp_path / "bad"))
        assert code == 2 and msg in err, err
    assert not (tmp_path / "bad").exists()
