"""Every command README.md shows, run as shown, so the README cannot drift from the CLI.

Offline commands run in a scratch folder (their `out/` lands there). `transplant serve`
(plain) runs for real on its default ports with its state under a scratch
XDG_STATE_HOME, and the admin, generate, curl and Python examples run against it. Lines
that name a user's own files or services (`--config server.yaml --model /models/v2`, a
fleet's etcd, the setup commands CI itself runs) are checked by the CLI's own parser."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serverkit import wait_serving

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PLACEHOLDERS = ("/models/", "server.yaml", "replica.yaml", "etcd://", "--engine vllm")
pytestmark = pytest.mark.timeout(1500)


def blocks(lang: str) -> list[str]:
    return [b for lg, b in re.findall(r"```([a-z]*)\n(.*?)```", README, re.S) if lg == lang]


def commands() -> list[str]:
    """Every command line of the bash blocks (continuations joined, comments dropped)."""
    out = []
    for b in blocks("bash"):
        text = b.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()       # README comments: two spaces, then #
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line) if "'" not in line and '"' not in line else line)
    return out


def run(cmd: str, cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_readme_command_runs_as_shown(tmp_path):
    cmds = commands()
    assert len(cmds) > 25
    env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp_path / "state"),
               PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    setup = [c for c in cmds if c.startswith("bash deploy/setup.sh")]
    assert setup and all(".venv/bin/" in c for c in setup)          # what CI runs (.ci/run)
    from server.cli.main import build_parser

    parser = build_parser()
    for c in cmds:                                                   # every transplant line parses
        for part in c.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0].rsplit("/", 1)[-1] == "transplant":      # (not VLLM_PLUGINS=transplant)
                parser.parse_args(words[1:])
    placeholder = [c for c in cmds if any(p in c for p in PLACEHOLDERS) and c not in setup]
    assert placeholder, "the config/fleet examples are parsed above"
    offline = [c for c in cmds if re.match(r"transplant (inspect|compat|analyze|eval|apply|experiment)\b", c)]
    for c in offline:
        r = run(c, tmp_path, env)
        assert r.returncode == 0, (c, r.stderr[-2000:])
    assert (tmp_path / "out" / "scores.png").is_file() and (tmp_path / "out" / "v2-plus-add" / "config.json").is_file()

    serve = subprocess.Popen(["transplant", "serve"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "serve.log", "wb"), start_new_session=True)
    try:
        wait_serving(50051, serve, timeout=300)
        online = [c for c in cmds if c not in offline and c not in setup and c not in placeholder
                  and not c.startswith("transplant serve")]
        for c in online:
            if c == "transplant admin watch":                       # interactive: its first screen
                p = subprocess.Popen(["bash", "-c", c], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
                time.sleep(5)
                # SIGTERM: a shell started in the background (CI under `&`) hands its children
                # SIGINT ignored, so Ctrl-C's signal would not reach the view
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    out, err = p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    out, err = p.communicate()
                assert "generation" in out.lower(), (out, err)
                continue
            r = run(c, tmp_path, env)
            assert r.returncode == 0, (c, r.stdout[-1000:], r.stderr[-2000:])
            if c.startswith("curl"):
                assert '"generation"' in r.stdout or "data: [DONE]" in r.stdout, (c, r.stdout)
        for code in blocks("python"):
            r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
