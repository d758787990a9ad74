import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle torch threads must not spin on a shared CPU
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    from transplant_core.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Two tiny llama checkpoints on disk (target seed 0, donor seed 1)."""
    from tiny import make_model, save

    root = tmp_path_factory.mktemp("tiny")
    return {"target": save(make_model("llama", 0), root / "target"),
            "donor": save(make_model("llama", 1), root / "donor")}


_RSS_LOG = os.environ.get("TRANSPLANT_TEST_RSS_LOG")   # a file: each test's id and the run's peak memory


if _RSS_LOG:
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(nodeid, location):
        """Where a suite's memory goes: after each test, this process's resident and peak
        memory (MB) and the whole machine's use (children included)."""
        import resource

        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        used = (int(mem["MemTotal"].split()[0]) - int(mem["MemAvailable"].split()[0])) >> 10
        with open(_RSS_LOG, "a") as f:
            f.write(f"{nodeid}\trss={rss}\tpeak={peak}\tmachine_used={used}\n")
