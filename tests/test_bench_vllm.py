"""bench.vllm runs on its quick setting (the small preset: vLLM's CPU attention has no
kernel for the tiny one's head_dim) and reports finite figures. Not a timed test: no
figure is compared with its target here.

It runs in its own process, as `python -m bench.vllm --quick` (vLLM starts its engine
processes with spawn, which re-imports the main module). vLLM is part of the test setup
(`bash deploy/setup.sh --test`): a missing vLLM fails this test; TRANSPLANT_NO_VLLM=1
skips it on a machine that deliberately has no vLLM."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("TRANSPLANT_NO_VLLM") == "1":
    pytest.skip("TRANSPLANT_NO_VLLM=1", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(1200)


def test_bench_vllm_runs_quick(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail(f"vLLM is not installed in {sys.executable} (bash deploy/setup.sh --test installs it; "
                    "TRANSPLANT_NO_VLLM=1 skips this test)")
    out = tmp_path / "r.json"
    env = dict(os.environ, TRANSPLANT_BENCH_DIR=str(tmp_path / "bench"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    p = subprocess.run([sys.executable, "-m", "bench.vllm", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1100)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "median" in p.stdout
    data = json.loads(out.read_text())
    assert data["bench"] == "vllm" and data["figures"][0]["target"] == "<= 0.05"
    names = {f["figure"] for f in data["figures"]}
    assert {"vLLM swap / new engine (first token)", "vLLM / embedded tok/s, 16 clients"} <= names
    for f in data["figures"]:
        assert f["n"] >= 1 and all(math.isfinite(f[k]) and f[k] > 0 for k in ("median", "min", "max")), f
    d = data["details"]
    assert d["failed_requests"] == {"drain": 0, "freeze": 0, "tok_s": 0}
    assert d["modules_sent_to_vllm"] >= len(d["modules"])


@pytest.mark.parametrize("name", ["logprobs", "vs_vllm"])
def test_benches_with_vllms_client_run_quick(tmp_path, name):
    """bench.logprobs and bench.vs_vllm (vLLM's benchmark client; plain vLLM's own server)
    on their quick settings: every request completes, the figures are finite."""
    out = tmp_path / "r.json"
    env = dict(os.environ, TRANSPLANT_BENCH_DIR=str(tmp_path / "bench"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1100)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    data = json.loads(out.read_text())
    assert data["bench"] == name and all(math.isfinite(f["median"]) for f in data["figures"])


def test_bench_plugin_runs_quick(tmp_path):
    """bench.plugin on its quick setting (small preset; plain vLLM, vLLM + the transplant
    plugin, a plain vLLM on the merged checkpoint): every request completes, swaps go
    through the plugin's Admin API, a guarded plugin server's transplants are each tried
    first (two trials counted on its /metrics), the figures are finite."""
    out = tmp_path / "r.json"
    env = dict(os.environ, TRANSPLANT_BENCH_DIR=str(tmp_path / "bench"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "bench.plugin", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1100)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    data = json.loads(out.read_text())
    assert data["bench"] == "plugin" and all(math.isfinite(f["median"]) for f in data["figures"])
    names = {f["figure"] for f in data["figures"]}
    assert {"plugin / vLLM tokens/s, 8 concurrent", "RSS (plugin - vLLM) / weight bytes",
            "transplant (new tensors) / new vLLM server", "transplant: the swap's pause (requests held once none "
            "runs), ms", "guard trial (4 probe examples): requests held, ms"} <= names
    d = data["details"]
    assert len(d["modules"]) == 8 and len(d["transplant_ms"][0]) == len(d["revert_ms"][0]) >= 1
    assert all(r["completed"] == 16 and r["failed"] == 0 for k in ("vllm@8", "plugin@8") for r in d[k])
