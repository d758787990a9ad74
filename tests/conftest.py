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
