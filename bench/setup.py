"""Random Llama-shaped checkpoints for the benchmarks, saved as safetensors in the bench
cache (`$TRANSPLANT_BENCH_DIR`, default ~/.cache/transplant/bench), never in git.

    python -m bench.setup                 # the 300M-parameter "large" pair (~2.5 GB, ~1 min)
    python -m bench.setup --preset tiny   # seconds; what the test suite uses

Every preset uses the project's character tokenizer (vocabulary 74), so generated
token ids always decode to text and zoo models share ids with these. The realistic
size therefore comes from depth and width, not from the vocabulary: in "large",
24 layers of hidden 1024 / intermediate 2816 put 308M of its 308.6M parameters in
the 168 transplantable linear modules (in a 7B Llama, embeddings are ~3% of the
weights too), so swap bytes, decode cost and memory scale like production.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int

    def arch(self) -> dict:
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.heads, max_position_embeddings=512,
                    tie_word_embeddings=False)

    @property
    def params(self) -> int:
        linear = self.layers * (4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate)
        return linear + self.layers * 2 * self.hidden + self.hidden + 2 * 74 * self.hidden   # vocab 74


PRESETS = {
    "tiny": Preset(64, 128, 2, 4),          # the test suite: seconds
    "small": Preset(256, 704, 4, 4),        # zoo scale (~3M): soak default
    "large": Preset(1024, 2816, 24, 16),    # 308M: the realistic one
}
SEEDS = {"target": 0, "donor": 1}


def bench_root() -> Path:
    return Path(os.environ.get("TRANSPLANT_BENCH_DIR") or Path.home() / ".cache" / "transplant" / "bench")


def preset_dir(preset: str) -> Path:
    return bench_root() / preset


def model_paths(preset: str) -> dict[str, Path]:
    """{'target': dir, 'donor': dir, 'donor_root': dir}; the donor lies under a donor root."""
    d = preset_dir(preset)
    return {"target": d / "target", "donor": d / "donors" / "donor", "donor_root": d / "donors"}


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        and (path / "tokenizer.json").is_file() and (path / ".complete").is_file()


def is_ready(preset: str) -> bool:
    p = model_paths(preset)
    return _complete(p["target"]) and _complete(p["donor"])


def make_checkpoint(preset: str, seed: int, out: Path) -> Path:
    """Random init with a fixed seed, written atomically (tmp dir, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from transplant_core.zoo.tokenizer import VOCAB_SIZE, build_tokenizer

    hf_logging.disable_progress_bar()
    tok = build_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB_SIZE, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               **PRESETS[preset].arch())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"preset": preset, "seed": seed}))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def ensure(preset: str, quiet: bool = False) -> dict[str, Path]:
    """Build the preset's target and donor if missing; return their paths."""
    paths = model_paths(preset)
    for role in ("target", "donor"):
        if not _complete(paths[role]):
            t0 = time.perf_counter()
            make_checkpoint(preset, SEEDS[role], paths[role])
            if not quiet:
                print(f"built {preset} {role} ({PRESETS[preset].params / 1e6:.1f}M params) at {paths[role]} "
                      f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.setup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="which pair to build (repeatable; default: large and small)")
    args = ap.parse_args(argv)
    for preset in args.preset or ["large", "small"]:
        paths = ensure(preset)
        print(f"{preset}: target {paths['target']}, donor {paths['donor']}")


if __name__ == "__main__":
    main()
