"""Checkpoints as users have them: Hugging Face cache folders (models--ORG--NAME with
snapshots/<commit>/<file> -> ../../blobs/<sha> links and refs/main), built here from
real tiny checkpoints, through the real CLI (in-process main, or a subprocess) and a
real server."""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from serverkit import ROOT, A, Clients, config, start
from server.cli import main
from tiny import make_model, save

COMMIT_OLD, COMMIT = "1" * 40, "a" * 40


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def hub_layout(src: Path, cache: Path, repo: str, commit: str = COMMIT, ref: str | None = COMMIT) -> Path:
    """Lay checkpoint folder `src` out as huggingface_hub does in `cache`: blobs by digest,
    a snapshot of relative links to them, refs/main naming `ref`. The snapshot's path."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", sha))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(ref)
    return snap


def drop_blob(snap: Path, name: str) -> None:
    """The blob `name` links to goes missing (an interrupted download, a pruned cache)."""
    (snap / name).resolve().unlink()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {"target": save(make_model("llama", 0), root / "target"),
            "donor": save(make_model("llama", 1), root / "donor"),
            "sharded": _sharded(root / "sharded")}


def _sharded(path: Path) -> Path:
    make_model("llama", 2).save_pretrained(path, max_shard_size="40KB")
    from transplant_core.zoo.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


# ---- (a) a missing blob ----------------------------------------------------------------

def test_a_missing_blob_is_one_error_naming_the_file(capsys, tmp_path, plain):
    cache = tmp_path / "hub"
    broken = hub_layout(plain["donor"], cache, "acme/broken")
    drop_blob(broken, "model.safetensors")
    shards = hub_layout(plain["sharded"], cache, "acme/sharded")
    shard = sorted(json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    drop_blob(shards, shard)
    t, out = plain["target"], tmp_path / "out"
    for snap, name in ((broken, "model.safetensors"), (shards, shard)):
        for argv in (["inspect", snap], ["inspect", snap.parent.parent], ["compat", t, snap],
                     ["apply", "--target", t, "--donor", snap, "--modules", "layers.0.mlp.up", "--out", out],
                     ["apply", "--target", snap, "--donor", t, "--modules", "layers.0.mlp.up", "--out", out]):
            code, _, err = run(capsys, *argv)
            assert code == 2 and "Traceback" not in err, (argv, code, err)
            assert f"{snap / name} is a symlink to ../../blobs/" in err and "which does not exist" in err, (argv, err)
            assert "Download the model again" in err and err.count("\n") == 1, err
            assert not out.exists() and not list(tmp_path.glob(".out.*"))      # nothing written


def test_serve_refuses_a_missing_blob_with_exit_2(tmp_path, plain):
    broken = hub_layout(plain["target"], tmp_path / "hub", "acme/broken")
    drop_blob(broken, "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(broken),
                        "--state-dir", str(tmp_path / "state"), "--grpc-listen", "127.0.0.1:0",
                        "--http-listen", "127.0.0.1:0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{broken / 'model.safetensors'} is a symlink to ../../blobs/" in r.stderr, r.stderr


def test_apply_refuses_a_dangling_link_among_the_target_files(capsys, tmp_path, plain):
    """Not a weight file: the copy of the target would fail half-way; refused before it starts."""
    target = tmp_path / "target"
    shutil.copytree(plain["target"], target)
    (target / "extra").mkdir()
    (target / "extra" / "notes.md").symlink_to(tmp_path / "gone.md")
    code, _, err = run(capsys, "apply", "--target", target, "--donor", plain["donor"], "--modules",
                       "layers.0.mlp.up", "--out", tmp_path / "out")
    assert code == 2 and "extra/notes.md is a symlink to" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# ---- (c) snapshots in the CLI --------------------------------------------------------------

def test_inspect_and_apply_resolve_a_cache_folder_to_its_snapshot(capsys, tmp_path, plain):
    cache = tmp_path / "hub"
    old = hub_layout(plain["donor"], cache, "acme/tiny-llama", commit=COMMIT_OLD)
    new = hub_layout(plain["target"], cache, "acme/tiny-llama", commit=COMMIT, ref=COMMIT_OLD)
    os.utime(new, (time.time() + 10, time.time() + 10))                 # newer, but refs/main names the old one
    repo = cache / "models--acme--tiny-llama"
    code, out, err = run(capsys, "inspect", repo, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["path"] == str(old.resolve()), err
    assert doc["snapshot"] == f"Hugging Face snapshot {COMMIT_OLD} of acme/tiny-llama (the one refs/main names)"
    code, out, _ = run(capsys, "inspect", repo)
    assert code == 0 and out.startswith(f"{repo} -> {old.resolve()} (Hugging Face snapshot {COMMIT_OLD}")
    (repo / "refs" / "main").unlink()                                     # no ref: the newest snapshot
    code, out, _ = run(capsys, "inspect", repo, "--json")
    assert code == 0 and json.loads(out)["path"] == str(new.resolve())
    assert "the newest of 2: no refs/main" in json.loads(out)["snapshot"]
    code, _, err = run(capsys, "inspect", cache)                          # the cache root: which models are in it
    assert code == 2 and "is a Hugging Face cache, not a checkpoint" in err and "models--acme--tiny-llama" in err, err

    dest = tmp_path / "merged"
    code, _, err = run(capsys, "apply", "--target", repo, "--donor", plain["donor"], "--modules", "layers.0.mlp.up",
                       "--out", dest)
    assert code == 0, err
    assert f"target {repo}: Hugging Face snapshot {COMMIT} of acme/tiny-llama" in err
    files = sorted(p.name for p in dest.iterdir())
    assert files == sorted([p.name for p in new.iterdir()] + ["transplant_manifest.json"])
    assert not any(p.is_symlink() for p in dest.iterdir())               # plain files, not links into the cache
    assert (dest / "config.json").read_bytes() == (new / "config.json").read_bytes()


# ---- (b) --out inside the target -----------------------------------------------------------

def test_apply_out_inside_the_target_is_refused(capsys, tmp_path, plain):
    target = tmp_path / "target"
    shutil.copytree(plain["target"], target)
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    d = plain["donor"]
    for out, extra in ((target / "merged", []), (target / "a" / "b", []), (target, ["--force"])):
        code, _, err = run(capsys, "apply", "--target", target, "--donor", d, "--modules", "layers.0.mlp.up",
                           "--out", out, *extra)
        assert code == 2 and "is inside the target folder" in err and "Traceback" not in err, (out, err)
    code, _, err = run(capsys, "apply", "--target", target, "--donor", d, "--modules", "layers.0.mlp.up",
                       "--out", tmp_path, "--force")
    assert code == 2 and "holds the target folder" in err, err
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before       # nothing changed
    assert not list(tmp_path.glob(".*"))


# ---- (a), (c) on the server ------------------------------------------------------------------

def test_server_on_a_snapshot_and_donors_from_a_hub_cache(tmp_path, plain, caplog):
    caplog.set_level(logging.INFO, logger="transplant")
    cache = tmp_path / "hub"                      # the donor root is a hub cache
    live = hub_layout(plain["target"], tmp_path / "models", "acme/live-model")
    hub_layout(plain["target"], cache, "acme/tiny-llama", commit=COMMIT_OLD, ref=COMMIT)
    chosen = hub_layout(plain["donor"], cache, "acme/tiny-llama", commit=COMMIT)
    hub_layout(plain["donor"], cache, "acme/Other+Model")    # + is no donor name character
    hub_layout(plain["donor"], cache, "bob/twin")
    hub_layout(plain["donor"], cache, "carol/twin")
    broken = hub_layout(plain["donor"], cache, "acme/broken")
    drop_blob(broken, "model.safetensors")
    escape = hub_layout(plain["donor"], cache, "evil/escape")              # a link out of the root
    (tmp_path / "secret.safetensors").write_bytes((escape / "model.safetensors").read_bytes())
    (escape / "model.safetensors").unlink()
    (escape / "model.safetensors").symlink_to(tmp_path / "secret.safetensors")
    rpc_only = cache / "nested"                   # inside the root, not a drop-in: for RegisterDonor
    hub_layout(plain["donor"], rpc_only, "acme/by-rpc")
    broken_rpc = hub_layout(plain["donor"], rpc_only, "acme/broken-rpc")
    drop_blob(broken_rpc, "model.safetensors")

    s = start(config(tmp_path, live, [cache]))     # the snapshot (its cache folder: see the CLI tests)
    c = Clients(s.grpc_port, s.token)
    try:
        assert s.runtime.cfg.model_name == "acme/live-model"              # not the commit hash
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]][0] == "acme/live-model"
        assert c.generate("hello", 2, model="acme/live-model").generation == 0

        donors = {d.name: d.path for d in c.admin("ListDonors", A.ListDonorsRequest()).donors}
        assert donors == {"tiny-llama": str(chosen.resolve()), "Other-Model": str(
            (cache / "models--acme--Other+Model" / "snapshots" / COMMIT).resolve()),
            "bob--twin": str((cache / "models--bob--twin" / "snapshots" / COMMIT).resolve()),
            "carol--twin": str((cache / "models--carol--twin" / "snapshots" / COMMIT).resolve())}, donors
        logs = "\n".join(r.getMessage() for r in caplog.records)
        assert f"registered donor tiny-llama ({chosen.resolve()}, watch; Hugging Face snapshot {COMMIT} of " \
               "acme/tiny-llama (the one refs/main names))" in logs, logs
        assert "symlinks lead outside the donor roots" in logs and "model.safetensors -> " in logs, logs
        assert "which does not exist" in logs

        time.sleep(3)                             # the watcher's own reads do not wake it again and again
        for _ in range(3):                        # passes (a file written in the root): not warned again
            s.runtime.donors._reconcile(0.0)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not registering")]
        assert sorted(w.split(":")[0] for w in warned) == sorted(
            f"not registering {p.resolve()}" for p in (broken, escape)), warned

        reg = c.admin("RegisterDonor", A.RegisterDonorRequest(path=str(rpc_only / "models--acme--by-rpc")))
        assert reg.name == "by-rpc" and reg.path == str((rpc_only / "models--acme--by-rpc" / "snapshots" / COMMIT).resolve())
        for path, why in ((broken_rpc, "which does not exist"), (broken_rpc.parent.parent, "which does not exist"),
                          (escape, "symlinks lead outside the donor roots")):
            with pytest.raises(grpc.RpcError) as e:
                c.admin("RegisterDonor", A.RegisterDonorRequest(name="x", path=str(path)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), e.value.details()
            assert "model.safetensors" in e.value.details()
        assert "x" not in {d.name for d in c.admin("ListDonors", A.ListDonorsRequest()).donors}
    finally:
        c.close()
        s.stop(2)
