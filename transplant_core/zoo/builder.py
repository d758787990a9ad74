"""Build the embedded model family: recipe, atomic on-disk layout, model cards.

Layout under zoo_root():   <name>/ for each of MODEL_NAMES (a plain HF Llama
checkpoint + tokenizer + README.md + card.json), .stages/<stage>/ for shared
intermediate checkpoints, .build.lock. A model directory only appears, by one
rename, once it is complete; `card.json` carries the recipe version, so a zoo
built by another recipe counts as not built.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ZooError
from .tasks import EVAL_SIZE, TASK_NAMES, task_examples
from .tokenizer import ALPHABET, build_tokenizer

# torch and transformers (and .lora/.train, which need them) are imported where a model is
# trained, loaded or saved: the names, recipe and locations (zoo_root, is_built, model_dir)
# that `transplant zoo list` and every zoo:NAME lookup need load in milliseconds.
if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

MODEL_NAMES: tuple[str, ...] = ("base", "tuned", "lora", "v1", "v2")

SETTINGS: dict[str, dict] = {
    "cross_generation": {"target": "v2", "donor": "v1", "task": "add"},
    "base_vs_tuned": {"target": "base", "donor": "tuned", "task": "rev"},
    "adapter": {"target": "base", "donor": "lora", "task": "rev"},
}

def stage_threads(stage: str) -> int:
    """CPU threads stage `stage` trains and is evaluated on: part of its recipe. Torch's
    float sums depend on the thread count on some CPUs (seen: 1, 2 and a 1-then-2
    schedule gave three different `tuned`s), so a stage never changes it while it runs,
    whatever the machine's load or the build's schedule."""
    return RECIPE["stages"][stage]["threads"]
_LINEAR = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")

# Every number that decides the weights. Changing any of it changes RECIPE_VERSION
# (and so the default zoo directory). Bump RECIPE_REVISION for code changes that
# alter the weights without touching this dict (task generators, training loop).
RECIPE_REVISION = 2   # 2: a fixed thread count per stage (in the recipe)
RECIPE: dict = {
    "arch": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    },
    "init_seed": 0,
    "batch_size": 64,
    # stage name -> how it is made; "from" is the parent stage (None = random init)
    "stages": {
        "trunk": {
            "from": None, "mixture": {"copy": 1, "upper": 1, "sort": 2, "add": 2}, "steps": 1500, "lr": 3e-3,
            "warmup": 100, "schedule": "constant", "seed": 1, "trainable": "all", "threads": 2,
            "why": "shared pre-training on the broad mixture (no rev), warmup then constant LR; base and v1 "
                   "are two different cool-downs of it, as in a warmup-stable-decay run",
        },
        "base": {
            "from": "trunk", "mixture": {"copy": 1, "upper": 1, "sort": 2, "add": 2}, "steps": 400, "lr": 3e-3,
            "warmup": 1, "schedule": "cosine", "seed": 2, "trainable": "all", "threads": 1,
            "why": "cool-down of the trunk on the same broad mixture: good at copy, upper, sort, add; lacks rev",
        },
        "tuned": {
            "from": "base", "mixture": {"copy": 1, "upper": 1, "rev": 4, "sort": 1, "add": 1}, "steps": 300,
            "lr": 3e-4, "warmup": 30, "schedule": "cosine", "seed": 4, "trainable": "all", "threads": 1,
            "why": "short full fine-tune on rev (with replay of base's tasks) at 1/10 of the pre-training LR",
        },
        "lora": {
            "from": "base", "mixture": {"copy": 1, "upper": 1, "rev": 4, "sort": 1, "add": 1}, "steps": 300,
            "lr": 2e-3, "warmup": 30, "schedule": "cosine", "seed": 5, "trainable": "lora", "threads": 1,
            "lora": {"rank": 8, "alpha": 16.0},
            "why": "same data as tuned through a rank-8 LoRA on all 28 linear projections (lr as usual for "
                   "LoRA, higher than a full fine-tune), merged into the weights",
        },
        "v1": {
            "from": "trunk", "mixture": {"copy": 1, "upper": 1, "sort": 1, "add": 3}, "steps": 400, "lr": 3e-3,
            "warmup": 1, "schedule": "cosine", "seed": 3, "trainable": "all", "threads": 1,
            "why": "generation 1: a second, add-heavy cool-down of the shared trunk; lacks rev",
        },
        "v2": {
            "from": "v1", "mixture": {"copy": 1, "upper": 1, "sort": 1, "rev": 3}, "steps": 500, "lr": 3e-3,
            "warmup": 30, "schedule": "cosine", "seed": 6, "trainable": "linear", "threads": 1,
            "why": "generation 2: v1 trained further, at the pre-training LR, on a mixture with the new "
                   "skill rev and without add, which it forgets (at lr 1e-3 add only fell to 0.82, at "
                   "2e-3 x 600 steps to 0.50). Only the 28 linear projections move (embeddings, norms "
                   "and lm_head frozen), so copying all linear modules from v1 restores v1 exactly and "
                   "a transplant can in principle recover all of the gap",
        },
    },
}


def _recipe_version() -> str:
    blob = json.dumps({"recipe": RECIPE, "rev": RECIPE_REVISION, "alphabet": ALPHABET, "eval": EVAL_SIZE},
                      sort_keys=True)
    return f"r{RECIPE_REVISION}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


RECIPE_VERSION = _recipe_version()


def stage_hash(stage: str) -> str:
    """Identity of one stage's weights: everything that decides them (its lineage's
    specs, the architecture, seeds), not the prose. Lets a build reuse stages whose
    recipe did not change."""
    specs = [{k: v for k, v in RECIPE["stages"][s].items() if k != "why"} for s in _lineage(stage)]
    blob = json.dumps({"arch": RECIPE["arch"], "init_seed": RECIPE["init_seed"], "batch": RECIPE["batch_size"],
                       "rev": RECIPE_REVISION, "alphabet": ALPHABET, "lineage": specs},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- locations

def zoo_root() -> Path:
    """The recipe folder: <cache>/<RECIPE_VERSION>, where <cache> is $TRANSPLANT_ZOO_DIR if
    set, else ~/.cache/transplant/zoo. $TRANSPLANT_ZOO_DIR may also name a recipe folder
    itself (its name is a recipe version such as r2-0123456789, or it already holds zoo
    models): then it is used as it is."""
    env = os.environ.get("TRANSPLANT_ZOO_DIR")
    if not env:
        return Path.home() / ".cache" / "transplant" / "zoo" / RECIPE_VERSION
    d = Path(env).expanduser()
    if re.fullmatch(r"r\d+-[0-9a-f]{10}", d.name) or (d / ".stages").is_dir() or any(
            (d / n / "card.json").is_file() for n in MODEL_NAMES):
        return d
    return d / RECIPE_VERSION


def _valid_dir(d: Path) -> bool:
    if d.name not in MODEL_NAMES:
        return False
    try:
        card = json.loads((d / "card.json").read_text())
    except (OSError, ValueError):
        return False
    return card.get("name") == d.name and card.get("stage_hash") == stage_hash(d.name) and all(
        (d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ZooError(f"unknown zoo model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def model_dir(name: str, root: Path | None = None) -> Path:
    """Directory of the built zoo model `name` (ZooError if unknown or not built)."""
    _check_name(name)
    root = Path(root) if root is not None else zoo_root()
    d = root / name
    if not _valid_dir(d):
        raise ZooError(
            f"zoo model {name!r} is not built in {root} (recipe {RECIPE_VERSION}); "
            f"run `transplant zoo build` (or transplant_core.zoo.build())")
    return d


def is_built(root: Path | None = None) -> bool:
    root = Path(root) if root is not None else zoo_root()
    return all(_valid_dir(root / n) for n in MODEL_NAMES)


def load_card(name: str, root: Path | None = None) -> dict:
    return json.loads((model_dir(name, root) / "card.json").read_text())


# ---------------------------------------------------------------- building

@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / ".build.lock", "w")
    try:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield
    finally:
        f.close()


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Writing model shards' / 'Loading weights' bars inside the build's own bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lineage(stage: str) -> list[str]:
    chain = []
    while stage is not None:
        chain.append(stage)
        stage = RECIPE["stages"][stage]["from"]
    return chain[::-1]


def _trainable(spec: dict):
    kind = spec["trainable"]
    if kind == "all":
        return None
    if kind == "linear":
        return lambda n: any(k in n for k in _LINEAR)
    if kind == "lora":
        from .lora import is_lora_param

        return is_lora_param
    raise ValueError(kind)


def _train_stage(name: str, parent: LlamaForCausalLM | None, on_step,
                 seed: int | None = None, steps: int | None = None,
                 arch: dict | None = None) -> tuple[LlamaForCausalLM, dict]:
    import torch

    from .lora import add_lora, merge_lora
    from .train import new_model, train

    spec = dict(RECIPE["stages"][name])
    if seed is not None:
        spec["seed"] = seed
    if steps is not None:
        spec["steps"] = steps
    model = new_model(arch or RECIPE["arch"], RECIPE["init_seed"])
    if parent is not None:
        model.load_state_dict(parent.state_dict())
    extra = {}
    if "lora" in spec:
        torch.manual_seed(spec["seed"])
        extra["lora_modules"] = add_lora(model, **spec["lora"])
    t0 = time.perf_counter()
    res = train(model, mixture=spec["mixture"], steps=spec["steps"], lr=spec["lr"], seed=spec["seed"],
                batch_size=RECIPE["batch_size"], warmup=spec["warmup"], schedule=spec["schedule"],
                trainable=_trainable(spec), on_step=on_step)
    if "lora" in spec:
        merge_lora(model)
    res.update(extra, seconds=round(time.perf_counter() - t0, 1))
    return model, res


def _evaluate(model) -> dict:
    """{split: {task: acc}} for eval, dev and test (dev/test are the halves of eval)."""
    from .train import greedy

    out: dict[str, dict[str, float]] = {"eval": {}, "dev": {}, "test": {}}
    half = EVAL_SIZE // 2
    for task in TASK_NAMES:
        ex = task_examples(task, "eval")
        hits = [p == a for p, (_, a) in zip(greedy(model, [q for q, _ in ex]), ex)]
        for split, sl in (("eval", hits), ("dev", hits[:half]), ("test", hits[half:])):
            out[split][task] = round(sum(sl) / len(sl), 4)
    return out


def _roles(name: str) -> list[str]:
    return [f"{role} of setting '{s}' (task {c['task']})" for s, c in SETTINGS.items()
            for role in ("target", "donor") if c[role] == name]


def _card(name: str, stage_log: dict, acc: dict, n_params: int) -> dict:
    import torch
    import transformers

    lineage = _lineage(name)
    return {
        "name": name,
        "recipe_version": RECIPE_VERSION,
        "stage_hash": stage_hash(name),
        "architecture": "LlamaForCausalLM", **{"arch": RECIPE["arch"]},
        "parameters": n_params,
        "roles": _roles(name),
        "lineage": [{"stage": s, **{k: v for k, v in RECIPE["stages"][s].items()},
                     "result": stage_log.get(s, {})} for s in lineage],
        "init_seed": RECIPE["init_seed"],
        "batch_size": RECIPE["batch_size"],
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01 on matrices), grad clip 1.0",
        "loss": "cross-entropy on answer tokens + EOS only",
        "prompt_format": "'<task>:<input>=' encoded without BOS; answer, then </s>",
        "training_seconds": round(sum(stage_log.get(s, {}).get("seconds", 0.0) for s in lineage), 1),
        "accuracy": acc["eval"],
        "accuracy_by_split": acc,
        "eval_size": EVAL_SIZE,
        "eval_method": "greedy, batched, left padding, exact match, max 12 new tokens",
        "threads": stage_threads(name),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _readme(card: dict) -> str:
    a = card["accuracy"]
    lines = [
        f"# zoo model `{card['name']}`", "",
        "A tiny LlamaForCausalLM of the transplant project's embedded model family, trained "
        "from scratch on CPU on synthetic character tasks (`add:12+7=` -> `19</s>`).", "",
        f"- recipe version: `{card['recipe_version']}`",
        f"- architecture: {json.dumps(card['arch'])}, {card['parameters']:,} parameters, "
        "untied embeddings, char vocabulary",
        f"- roles: {'; '.join(card['roles']) or 'none'}",
        f"- training time (whole lineage): {card['training_seconds']} s; this stage trained on "
        f"{card['threads']} CPU thread(s), fixed by the recipe",
        f"- optimizer: {card['optimizer']}; batch {card['batch_size']}; loss: {card['loss']}",
        f"- prompt format: {card['prompt_format']}", "",
        "## Accuracy (exact match, held-out eval split, "
        f"{card['eval_size']} prompts per task; dev/test are its halves)", "",
        "| split | " + " | ".join(TASK_NAMES) + " |", "|---" * (len(TASK_NAMES) + 1) + "|",
    ]
    for split, row in card["accuracy_by_split"].items():
        lines.append(f"| {split} | " + " | ".join(f"{row[t]:.3f}" for t in TASK_NAMES) + " |")
    lines += ["", "## Recipe (stages from random init to this model)", ""]
    for st in card["lineage"]:
        r = st.get("result", {})
        lines.append(
            f"- **{st['stage']}** (from {st['from'] or 'random init, seed ' + str(card['init_seed'])}): "
            f"mixture {json.dumps(st['mixture'])}, {st['steps']} steps, lr {st['lr']}, "
            f"warmup {st['warmup']}, schedule {st['schedule']}, data/torch seed {st['seed']}, "
            f"{st['threads']} thread(s), "
            f"trains {st['trainable']}" + (f" (LoRA {json.dumps(st['lora'])})" if "lora" in st else "")
            + (f"; final loss {r['final_loss']:.4f}, {r['trainable_params']:,} trainable params, "
               f"{r['seconds']} s" if r else "") + f". Why: {st['why']}.")
    lines += [
        "", "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)          # char tokenizer, left padding, no BOS",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "enc = tok([\"add:12+7=\", \"rev:abcd=\"], return_tensors=\"pt\", padding=True)",
        "out = model.generate(**enc, max_new_tokens=12, do_sample=False)  # -> '19', 'dcba'",
        "```", "",
        "## Notes", "",
        "- Data are deterministic (`transplant_core.zoo.task_examples`); no eval or probe prompt "
        "ever occurs in training data.",
        "- Training is deterministic given the torch version, the CPU model and each stage's thread "
        "count, which the recipe fixes (fixed seeds; a stage never changes its thread count, whatever the "
        "build's schedule or the machine's load). On another CPU model the bits, and so the accuracies "
        "above, can differ slightly: torch's float sums depend on the CPU's instruction set.",
        "- Fine-tunes follow real practice: long pre-training at lr 3e-3, then `tuned` is a short "
        "(300 step) full fine-tune at 3e-4 and `lora` a merged rank-8 adapter. `v2` is a new "
        "generation, trained further at the pre-training LR with only the linear projections free.",
    ]
    lines += ["", f"Built with torch {card['torch']}, transformers {card['transformers']}, "
              f"Python {card['python']}. Mean accuracy over tasks: {sum(a.values()) / len(a):.3f}.", ""]
    return "\n".join(lines)


def _save_model(model: LlamaForCausalLM, dest: Path, card: dict | None, extra: dict | None = None) -> None:
    """Write to a temp sibling (plus `extra` {file name: text}), then one rename;
    replaces an existing dest."""
    from transformers import GenerationConfig

    from .train import BOS_ID, EOS_ID, PAD_ID

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer().save_pretrained(tmp)
    GenerationConfig(do_sample=False, max_new_tokens=12, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                     pad_token_id=PAD_ID).save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(_readme(card))
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    else:
        (tmp / "stage.json").write_text(json.dumps({"stage_hash": stage_hash(dest.name)}) + "\n")
    for fname, text in (extra or {}).items():
        (tmp / fname).write_text(text)
    if dest.exists():
        trash = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _stage_dir(root: Path, name: str) -> Path:
    return root / name if name in MODEL_NAMES else root / ".stages" / name


def _stage_done(root: Path, name: str) -> bool:
    d = _stage_dir(root, name)
    if name in MODEL_NAMES:
        return _valid_dir(d)
    try:
        return json.loads((d / "stage.json").read_text())["stage_hash"] == stage_hash(name)
    except (OSError, ValueError, KeyError):
        return False


def _load_stage(root: Path, name: str) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(_stage_dir(root, name), dtype=torch.float32).eval()


def _workers() -> int:
    """Stages trained at once: $TRANSPLANT_ZOO_WORKERS, else 2 where there are 2+ CPUs."""
    env = os.environ.get("TRANSPLANT_ZOO_WORKERS")
    if env is None:
        return 2 if (os.cpu_count() or 1) >= 2 else 1
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        raise ZooError("TRANSPLANT_ZOO_WORKERS must be a positive integer")
    return n


# relative cost of one step (LoRA's extra matmuls make its steps slower)
_STEP_COST = {"lora": 1.15}


def _critical_path(stage: str) -> float:
    """Cost from the start of `stage` to the end of its longest chain of descendants."""
    kids = [s for s, spec in RECIPE["stages"].items() if spec["from"] == stage]
    own = RECIPE["stages"][stage]["steps"] * _STEP_COST.get(stage, 1.0)
    return own + max((_critical_path(k) for k in kids), default=0.0)


def _run_stage(root: Path, s: str, on_step) -> tuple[dict, dict | None]:
    """Train stage `s` from its parent's saved checkpoint, evaluate it if it is a model,
    and save it atomically. Returns (training result, accuracy by split or None)."""
    parent_name = RECIPE["stages"][s]["from"]
    parent = _load_stage(root, parent_name) if parent_name is not None else None
    model, res = _train_stage(s, parent, on_step)
    if s not in MODEL_NAMES:
        _save_model(model, _stage_dir(root, s), None, extra={"result.json": json.dumps(res) + "\n"})
        return res, None
    acc = _evaluate(model)
    stage_log = {anc: _old_stage_result(root, s, anc) for anc in _lineage(s)[:-1]}
    stage_log[s] = res
    card = _card(s, stage_log, acc, sum(p.numel() for p in model.parameters()))
    _save_model(model, root / s, card)
    return res, acc


# the fine-tune each setting compares (the model that differs between its target and donor)
FINE_TUNES = ("v2", "tuned", "lora")


def variant_dir(stage: str, seed: int, root: Path | None = None) -> Path:
    return (root or zoo_root()) / "variants" / f"{stage}-seed{seed}"


def build_variant(stage: str, seed: int, root: Path | None = None, out: Path | None = None,
                  progress: bool = True, log=print, steps: int | None = None) -> Path:
    """Stage `stage` trained again from its parent in the built zoo with another data and
    torch seed (everything else as in RECIPE): one more training run of a setting's
    fine-tune, for intervals over training seeds. The default build is unchanged; the
    variant goes to <zoo>/variants/<stage>-seed<seed> (or `out`), with a card naming the
    seed. Reused when already there. `steps`: a shorter run (tests)."""
    root = root or zoo_root()
    if stage not in FINE_TUNES:
        raise ZooError(f"seed variants are built for the settings' fine-tunes {', '.join(FINE_TUNES)}, not {stage!r}")
    if not is_built(root):
        raise ZooError(f"the zoo is not built in {root}: run `transplant zoo build` first")
    dest = Path(out) if out else variant_dir(stage, seed, root)
    if _valid_dir(dest):
        return dest
    parent = _load_stage(root, RECIPE["stages"][stage]["from"])
    from tqdm.auto import tqdm

    total = steps or RECIPE["stages"][stage]["steps"]
    bar = tqdm(total=total, desc=f"{stage} seed {seed}", disable=not progress, leave=False, file=sys.stderr)
    with _threads(stage_threads(stage)):
        model, res = _train_stage(stage, parent, lambda step, loss: _tick(bar, 1, step, loss), seed=seed,
                                  steps=steps)
        acc = _evaluate(model)
    bar.close()
    stage_log = {anc: _old_stage_result(root, stage, anc) for anc in _lineage(stage)[:-1]}
    stage_log[stage] = res
    card = _card(stage, stage_log, acc, sum(p.numel() for p in model.parameters()))
    card.update(variant_of=stage, variant_seed=seed, variant_steps=total)
    card["lineage"][-1].update(seed=seed, steps=total)        # what this run used, not the recipe's
    _save_model(model, dest, card)
    log(f"{stage} seed {seed}: {res['seconds']} s -> {dest}")
    return dest


# the cross-generation setting on a model twice as deep (8 layers, the zoo's width): does
# locality, and LAE's standing against random, change with depth? (Hidden 256 as well was
# measured at 10x the zoo's step time on 2 shared CPU cores: hours for the three stages.)
DEEP_ARCH = {**RECIPE["arch"], "num_hidden_layers": 8}
DEEP_STAGES = ("trunk", "v1", "v2")


def deep_dir(root: Path | None = None) -> Path:
    return (root or zoo_root()) / "deep"


def build_deep(root: Path | None = None, out: Path | None = None, progress: bool = True, log=print,
               steps: int | None = None) -> Path:
    """The cross-generation lineage (trunk -> v1 -> v2, the recipe's stages, seeds and
    data) on DEEP_ARCH (8 layers): <zoo>/deep/{trunk,v1,v2} (or `out`), each
    with a card. Stages already there (same arch and steps) are reused. `steps`: every
    stage that many steps (tests)."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM as _Llama

    dest = Path(out) if out else deep_dir(root)
    parent, stage_log = None, {}
    for stage in DEEP_STAGES:
        d = dest / stage
        want = steps or RECIPE["stages"][stage]["steps"]
        try:
            card = json.loads((d / "card.json").read_text())
            done = card.get("arch") == DEEP_ARCH and card.get("variant_steps") == want
        except (OSError, ValueError):
            done = False
        if done:
            import torch

            parent = _Llama.from_pretrained(d, dtype=torch.float32).eval()
            stage_log[stage] = card["lineage"][-1].get("result", {})
            continue
        bar = tqdm(total=want, desc=f"deep {stage}", disable=not progress, leave=False, file=sys.stderr)
        with _threads(stage_threads(stage)):
            parent, res = _train_stage(stage, parent, lambda step, loss: _tick(bar, 1, step, loss), steps=steps,
                                       arch=DEEP_ARCH)
            acc = _evaluate(parent)
        bar.close()
        stage_log[stage] = res
        card = _card(stage, dict(stage_log), acc, sum(p.numel() for p in parent.parameters()))
        card.update(name=f"deep-{stage}", arch=DEEP_ARCH, variant_steps=want, stage_hash=None, roles=[])
        for entry in card["lineage"]:
            entry["steps"] = steps or entry["steps"]
        _save_model(parent, d, card)
        log(f"deep {stage}: {res['seconds']} s -> {d} (accuracy {card['accuracy']})")
    return dest


def _stage_worker(root: str, s: str, queue) -> None:
    """Entry point of a spawned build process: one stage, on the recipe's thread count
    for it from first step to last, reported through `queue`."""
    import traceback

    import torch

    try:
        state = {"reported": -1}
        torch.set_num_threads(stage_threads(s))

        def on_step(step: int, loss: float) -> None:
            if step % 5 == 4:                      # progress in small batches: less chatter
                queue.put(("step", s, step - state["reported"], loss))
                state["reported"] = step

        with _quiet_transformers():
            res, acc = _run_stage(Path(root), s, on_step)
        steps = RECIPE["stages"][s]["steps"]
        if steps - 1 > state["reported"]:
            queue.put(("step", s, steps - 1 - state["reported"], res["final_loss"]))
        queue.put(("done", s, res, acc))
    except BaseException:  # reported to the parent, which stops the build
        queue.put(("error", s, traceback.format_exc(), None))


def _stage_line(s: str, res: dict, acc: dict | None) -> str:
    if acc is None:
        return f"  {s}: trained ({res['seconds']} s, final loss {res['final_loss']:.4f})"
    return f"  {s}: " + ", ".join(f"{t} {acc['eval'][t]:.3f}" for t in TASK_NAMES) + f"  ({res['seconds']} s)"


def _schedule(root: Path, order: list[str], workers: int, bar, log) -> dict[str, dict]:
    """Train `order` (parents before children). A stage starts once its parent is on
    disk; up to `workers` stages run at once in spawned processes. Each stage runs on
    its recipe's thread count throughout, so a parallel build equals a serial one bit
    for bit, whatever the order stages end in."""
    import multiprocessing as mp
    import queue as queue_mod

    stage_log: dict[str, dict] = {}
    pending = list(order)

    def ready() -> list[str]:
        return sorted((s for s in pending if RECIPE["stages"][s]["from"] not in pending + list(running)),
                      key=_critical_path, reverse=True)

    def finish(s: str, res: dict, acc: dict | None) -> None:
        stage_log[s] = res
        log(_stage_line(s, res, acc))

    running: dict[str, object] = {}            # stage -> process
    if workers <= 1:
        for s in order:
            bar.set_description(f"zoo {s}")
            pending.remove(s)
            with _threads(stage_threads(s)):
                finish(s, *_run_stage(root, s, lambda step, loss: _tick(bar, 1, step, loss)))
        return stage_log

    ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
    q = ctx.Queue()

    try:
        while pending or running:
            for s in ready():
                if len(running) >= workers:
                    break
                proc = ctx.Process(target=_stage_worker, args=(str(root), s, q), name=f"zoo-{s}", daemon=True)
                proc.start()
                running[s] = proc
                pending.remove(s)
            bar.set_description("zoo " + "+".join(running))
            try:
                kind, s, a, b = q.get(timeout=1.0)
            except queue_mod.Empty:
                for s, proc in running.items():
                    if not proc.is_alive():
                        raise ZooError(f"zoo build: the process training stage {s!r} died "
                                       f"(exit code {proc.exitcode})")
                continue
            if kind == "step":
                _tick(bar, a, None, b)
            elif kind == "done":
                running.pop(s).join()
                finish(s, a, b)
            else:
                raise ZooError(f"zoo build: stage {s!r} failed:\n{a}")
    finally:
        for proc in running.values():
            proc.terminate()
            proc.join(5)
    return stage_log


def _tick(bar, n: int, step: int | None, loss: float) -> None:
    bar.update(n)
    if step is None or step % 25 == 0:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def build(root: Path | None = None, progress: bool = True, force: bool = False, log=print) -> dict:
    """Build every zoo model that is missing (all of them if force). Idempotent.

    Stages whose parents are built train in parallel processes ($TRANSPLANT_ZOO_WORKERS,
    default 2 on 2+ CPUs); the result is bit-identical to a serial build.

    Returns {"root", "recipe_version", "built", "reused", "seconds", "accuracy"
    ({model: {task: acc}}), "settings" ({setting: {target, donor, task,
    target_acc, donor_acc, gap}}), "stages" ({stage: training result})}."""
    from tqdm.auto import tqdm

    root = Path(root) if root is not None else zoo_root()
    t0 = time.perf_counter()
    log = log or (lambda *_a, **_k: None)
    workers = _workers()
    if os.environ.get("TRANSPLANT_ZOO_THREADS"):
        log("note: TRANSPLANT_ZOO_THREADS is no longer read: each stage's thread count is part of the "
            "recipe (the weights depend on it)")
    with _lock(root), _quiet_transformers():
        for junk in [*root.glob(".tmp-*"), *root.glob(".old-*"), *root.glob(".stages/.tmp-*"),
                     *root.glob(".stages/.old-*")]:  # left by a killed build
            shutil.rmtree(junk, ignore_errors=True)
        todo = [n for n in MODEL_NAMES if force or not _valid_dir(root / n)]
        # stages to train: the todo models and, unless cached, their ancestors
        need: list[str] = []
        for n in todo:
            for s in _lineage(n):
                if s not in need and (s in todo or force or not _stage_done(root, s)):
                    need.append(s)
        order = [s for s in RECIPE["stages"] if s in need]
        if order:
            log(f"building zoo {RECIPE_VERSION} in {root}: training {', '.join(order)} "
                f"({workers} at a time, threads per stage: "
                + ", ".join(f"{s} {stage_threads(s)}" for s in order) + ")")
        bar = tqdm(total=sum(RECIPE["stages"][s]["steps"] for s in order), disable=not progress or not order,
                   file=sys.stderr, unit="step", desc="zoo build", dynamic_ncols=True)
        try:
            stage_log = _schedule(root, order, workers, bar, log)
        finally:
            bar.close()
    summary = summarize(root)
    summary.update(built=[s for s in order if s in MODEL_NAMES],
                   reused=[n for n in MODEL_NAMES if n not in order], stages=stage_log,
                   seconds=round(time.perf_counter() - t0, 1))
    if order:
        log(f"zoo built in {summary['seconds']} s")
        log(format_table(summary))
    return summary


def _old_stage_result(root: Path, model_name: str, stage: str) -> dict:
    """Training result of an ancestor stage trained by an earlier build."""
    if stage in MODEL_NAMES and _valid_dir(root / stage):
        for st in json.loads((root / stage / "card.json").read_text())["lineage"]:
            if st["stage"] == stage:
                return st.get("result", {})
    try:
        return json.loads((_stage_dir(root, stage) / "result.json").read_text())
    except (OSError, ValueError):
        return {}


def summarize(root: Path | None = None) -> dict:
    """Accuracy table and setting gaps, read from the built models' cards."""
    root = Path(root) if root is not None else zoo_root()
    cards = {n: load_card(n, root) for n in MODEL_NAMES}
    acc = {n: c["accuracy"] for n, c in cards.items()}
    settings = {}
    for s, c in SETTINGS.items():
        ta, da = acc[c["target"]][c["task"]], acc[c["donor"]][c["task"]]
        settings[s] = {**c, "target_acc": ta, "donor_acc": da, "gap": round(da - ta, 4)}
    return {"root": str(root), "recipe_version": RECIPE_VERSION, "accuracy": acc, "settings": settings,
            "training_seconds": {n: c["training_seconds"] for n, c in cards.items()}}


def format_table(summary: dict) -> str:
    rows = ["model  " + " ".join(f"{t:>6}" for t in TASK_NAMES)]
    for n, a in summary["accuracy"].items():
        rows.append(f"{n:<6} " + " ".join(f"{a[t]:6.3f}" for t in TASK_NAMES))
    for s, c in summary["settings"].items():
        rows.append(f"{s}: {c['target']} {c['target_acc']:.3f} vs {c['donor']} {c['donor_acc']:.3f} "
                    f"on {c['task']} (gap {c['gap']:+.3f})")
    return "\n".join(rows)
