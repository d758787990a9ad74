"""Model specs, safe loading, and lazy access to checkpoint tensors.

A model spec is a local checkpoint directory or `zoo:NAME`. Weights load from
safetensors only; pickle files (.bin, .pt, .pth) are refused unless the caller opts
in. Nothing is fetched from a hub and remote code is never trusted.

Donors are read lazily: `CheckpointTensors` memory-maps the safetensors files and
reads only the tensors asked for, so registering a donor costs its metadata, not its
weights.

Hugging Face cache folders are checkpoints as users have them: a snapshot
(`models--ORG--NAME/snapshots/<commit>`) is an ordinary checkpoint folder whose files are
symlinks into `../../blobs/`; the repository folder `models--ORG--NAME` stands for the
snapshot `refs/main` names (else the newest). A symlink whose file is missing (a blob not
downloaded) is refused by name.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import kernels
from .arch import ModuleTable, build_table
from .errors import InvalidArgument, NotFound, UnsafeCheckpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PREFIX = "models--"          # huggingface_hub's folder for a model repository: models--ORG--NAME

log = logging.getLogger("transplant.checkpoint")


class TensorSource(Protocol):
    """Anything that can hand out tensors by parameter key: a checkpoint, a live
    model, a snapshot. The transplant reads donors only through this."""

    name: str

    def has(self, key: str) -> bool: ...
    def meta(self, key: str) -> tuple[tuple[int, ...], str]: ...
    def get(self, key: str) -> torch.Tensor: ...


def resolve_model_path(spec: str) -> Path:
    if spec.startswith("zoo:"):
        from . import zoo  # the embedded family; imported lazily (it pulls in training code)

        try:
            return zoo.model_dir(spec[4:])
        except zoo.ZooError as e:
            raise NotFound(str(e)) from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise NotFound(f"model path {str(path)!r} does not exist; give a checkpoint directory or zoo:NAME")
    if not (path / "config.json").exists() and hub_folder(path):
        path, why = hub_snapshot(path)
        log.info("%s is a Hugging Face cache folder: using snapshot %s (%s)", spec, path.name, why)
    if path.is_dir():
        refuse_dangling([f for f in path.iterdir() if f.is_symlink()])
    if not path.is_dir() or not (path / "config.json").is_file():
        repos = sorted(p.name for p in path.glob(HUB_PREFIX + "*") if hub_folder(p)) if path.is_dir() else []
        if repos:        # the hub cache root (~/.cache/huggingface/hub) rather than one model in it
            raise InvalidArgument(f"{str(path)!r} is a Hugging Face cache, not a checkpoint: give one model's folder "
                                  f"({', '.join(repos[:6])}{', ...' if len(repos) > 6 else ''}) "
                                  "or one of its snapshots/<commit>")
        raise InvalidArgument(f"{str(path)!r} is not a checkpoint directory (no config.json in it)")
    return path.resolve()


def hub_repo(path: Path) -> str | None:
    """The repository id (ORG/NAME, or NAME) of a Hugging Face cache folder models--ORG--NAME
    or of one of its snapshots; None for any other path. (Repository ids cannot hold "--".)"""
    path = Path(path)
    folder = path if hub_folder(path) else path.parent.parent if path.parent.name == "snapshots" else None
    if folder is not None and folder.name.startswith(HUB_PREFIX) and len(folder.name) > len(HUB_PREFIX):
        return folder.name[len(HUB_PREFIX):].replace("--", "/")
    return None


def hub_folder(path: Path) -> bool:
    """Whether `path` is a Hugging Face cache folder models--ORG--NAME (not one of its snapshots)."""
    path = Path(path)
    return path.name.startswith(HUB_PREFIX) and len(path.name) > len(HUB_PREFIX) and (path / "snapshots").is_dir()


def hub_snapshot(repo: Path) -> tuple[Path, str]:
    """(the snapshot of cache folder models--ORG--NAME to use, why that one): the commit
    refs/main names, else the most recently written snapshot."""
    snaps = Path(repo) / "snapshots"
    have = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime_ns, p.name)) \
        if snaps.is_dir() else []
    if not have:
        raise InvalidArgument(f"{repo} is a Hugging Face cache folder without a snapshot (snapshots/ is empty); "
                              "download the model again")
    try:
        ref = (Path(repo) / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if re.fullmatch(r"[0-9a-f]{40}", ref) and (snaps / ref).is_dir():
        return snaps / ref, "the one refs/main names"
    why = f"refs/main names {ref[:40]!r}, which is not there" if ref else "no refs/main"
    return have[-1], f"the newest of {len(have)}: {why}"


def describe_hub(path: Path) -> str | None:
    """What a snapshot folder is, for people (None: not a snapshot): "Hugging Face snapshot
    <commit> of ORG/NAME (why this one)"."""
    path = Path(path)
    repo = hub_repo(path)
    if repo is None or path.parent.name != "snapshots":
        return None
    chosen, why = hub_snapshot(path.parent.parent)
    return f"Hugging Face snapshot {path.name} of {repo}" + (f" ({why})" if chosen.name == path.name else "")


def refuse_dangling(files) -> None:
    """A symlink whose target is missing (a Hugging Face snapshot whose blob was never
    downloaded or was deleted) is refused by name, before anything opens it."""
    bad = [f for f in files if Path(f).is_symlink() and not Path(f).exists()]
    if bad:
        links = "; ".join(f"{f} is a symlink to {os.readlink(f)}, which does not exist" for f in bad[:4])
        raise InvalidArgument(f"{links}{f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''}: a Hugging Face snapshot "
                              "with a missing blob? Download the model again (or replace the link by the file)")


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint dir: safetensors, or pickle when allowed. Only the
    model's own: the files its index names, else model.safetensors when present (Mistral
    repositories also carry consolidated.safetensors, the same weights under other names)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgument(f"{index} is not a safetensors index (weight_map): {e}") from None
        refuse_dangling([path / n for n in names])
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise NotFound(f"{index} names weight files that are not there: {', '.join(missing)}")
        return [path / n for n in names]
    refuse_dangling([f for f in path.iterdir() if f.suffix in (".safetensors",) + PICKLE_SUFFIXES])
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    # a Trainer folder's training_args.bin, optimizer.pt and rng_state.pth are not weights
    pk = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES
                and p.name.startswith(("pytorch_model", "model", "consolidated")))
    if pk and not allow_pickle:
        raise UnsafeCheckpoint(
            f"{path} has only pickle weights ({', '.join(p.name for p in pk)}); pickle can run code on load. "
            "Convert it to safetensors, or opt in with --allow-pickle (allow_pickle in the server config)"
        )
    if not pk:
        raise NotFound(f"{path} has no weight files (*.safetensors)")
    return pk


def load_model(spec: str, allow_pickle: bool = False, dtype: torch.dtype | None = None):
    """(model, tokenizer, path) for a spec; the model is in eval mode on the CPU, its large
    float32 linear layers on oneDNN's matmul unless TRANSPLANT_LINEAR_KERNEL=torch
    (transplant_core.kernels)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # our own progress is shown where work is long
    fast = kernels.wanted()             # a bad TRANSPLANT_LINEAR_KERNEL is refused before the load
    path = resolve_model_path(spec)
    files = weight_files(path, allow_pickle)
    check_causal_lm(path)
    dtype = dtype or stored_dtype(files)     # as stored, not as config.json's torch_dtype says
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False,
            use_safetensors=files[0].suffix == ".safetensors", dtype=dtype or "auto", output_loading_info=True,
        )
    except ValueError as e:
        raise _clean(path, e) from None
    problems = [f"{what}: {', '.join(keys[:8])}{f' (+{len(keys) - 8} more)' if len(keys) > 8 else ''}"
                for what, keys in (("missing (would be randomly initialised)", sorted(info.get("missing_keys", []))),
                                   ("unexpected (would be ignored)", sorted(info.get("unexpected_keys", []))),
                                   ("of another shape", [str(k[0]) if isinstance(k, tuple) else str(k)
                                                         for k in info.get("mismatched_keys", [])]))
                if keys]
    if problems:
        raise InvalidArgument(f"{path} does not hold the weights of its {type(model).__name__}: "
                              + "; ".join(problems) + ". Refusing it rather than serving random weights")
    model.eval()
    if fast:
        kernels.use_onednn(model)
    return model, load_tokenizer(path, spec), path


def load_tokenizer(path: Path, spec: str = ""):
    """The checkpoint's tokenizer, padded on the left (batched generation), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.startswith("zoo:") and not getattr(tokenizer, "chat_template", None):
        from .zoo.tokenizer import CHAT_TEMPLATE      # a family built before it had one

        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The floating dtype most of a checkpoint's weights are stored in (None: pickle)."""
    import math
    import struct

    counts: dict[torch.dtype, int] = {}
    for f in files:
        if f.suffix != ".safetensors":
            return None
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return None
        for k, v in header.items():
            dt = _ST_TORCH.get(v.get("dtype")) if k != "__metadata__" and isinstance(v, dict) else None
            if dt is not None and dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + math.prod(v.get("shape", [])) * (torch.finfo(dt).bits // 8)
    return max(counts, key=counts.get) if counts else None


def parse_dtype(name: str | None) -> torch.dtype | None:
    """--dtype float32|bfloat16|float16 (None: as stored)."""
    if not name:
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument(f"dtype {name!r}: choose float32, bfloat16 or float16 (default: as stored)")
    return getattr(torch, name)


def _open_safetensors(f: Path):
    """safe_open, with a broken file (truncated, a header claiming more than the file
    holds) refused by name as bad input rather than a library error."""
    import struct

    from safetensors import safe_open

    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"it is truncated: the tensors end at byte {8 + n + end}, the file has {size}")
        return safe_open(str(f), framework="pt")
    except Exception as e:       # noqa: BLE001 - struct, JSON, key and safetensors errors alike
        raise InvalidArgument(f"{f} is not a valid safetensors file: {e}") from None


def _clean(path: Path, e: Exception) -> Exception:
    """transformers' errors for checkpoints we never load, as one clean sentence."""
    msg = str(e)
    try:
        custom = "auto_map" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        custom = False
    if custom or "trust_remote_code" in msg or "custom code" in msg:
        return UnsafeCheckpoint(f"{path} needs its own Python code to load (auto_map in config.json: "
                                "trust_remote_code). transplant never runs a checkpoint's code; use a checkpoint of "
                                "an architecture transformers ships")
    return InvalidArgument(f"{path}: transformers cannot load it: {msg.splitlines()[0] if msg else type(e).__name__}")


def check_causal_lm(path: Path) -> None:
    """Refuse a checkpoint whose config does not describe a causal language model (an
    encoder such as BERT, a bare LlamaModel without its head)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path}/config.json cannot be read: {e}") from None
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise InvalidArgument(f"{path} is a {', '.join(archs)}, not a causal language model (no language-model "
                              "head): transplant serves and edits models that generate text (…ForCausalLM)")


def skeleton(path: Path) -> nn.Module:
    """The model's module tree on the meta device: structure without memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_causal_lm(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ValueError as e:
        raise _clean(path, e) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


class CheckpointTensors:
    """Lazy, read-only tensors of a checkpoint directory (safetensors memory maps)."""

    def __init__(self, path: Path, allow_pickle: bool = False, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        for f in weight_files(self.path, allow_pickle):
            if f.suffix == ".safetensors":
                h = _open_safetensors(f)
                self._handles[str(f)] = h
                for k in h.keys():
                    self._where[k] = str(f)
            else:
                self._pickled = self._pickled or {}
                self._pickled.update(torch.load(f, map_location="cpu", weights_only=True))
        if self._pickled:
            self._where.update({k: "" for k in self._pickled})

    def _key(self, key: str) -> str | None:
        if key in self._where:
            return key
        # older checkpoints omit the base-model prefix (GPT-2's "h.0..." for "transformer.h.0...")
        short = key.split(".", 1)[1] if "." in key else key
        return short if short in self._where else None

    def has(self, key: str) -> bool:
        return self._key(key) is not None

    def locate(self, key: str) -> tuple[str, str]:
        """(the safetensors file holding `key`, its name there)."""
        k = self._key(key)
        if k is None or not self._where[k]:
            raise NotFound(f"tensor {key!r} is not in a safetensors file of checkpoint {self.name}")
        return self._where[k], k

    @property
    def all_safetensors(self) -> bool:
        return self._pickled is None

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        k = self._key(key)
        if k is None:
            raise NotFound(f"tensor {key!r} is not in checkpoint {self.name}")
        if self._pickled is not None and k in self._pickled:
            t = self._pickled[k]
            return tuple(t.shape), str(t.dtype).removeprefix("torch.")
        sl = self._handles[self._where[k]].get_slice(k)
        return tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())

    def get(self, key: str) -> torch.Tensor:
        k = self._key(key)
        if k is None:
            raise NotFound(f"tensor {key!r} is not in checkpoint {self.name}")
        if self._pickled is not None and k in self._pickled:
            return self._pickled[k]
        t = read_tensor(self._where[k], k)
        return t if t is not None else self._handles[self._where[k]].get_tensor(k)

    def shapes(self, model_keys: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: self.meta(k) for k in model_keys if self.has(k)}


_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_HEADERS: dict[tuple[str, int, int], tuple[int, dict]] = {}


def read_tensor(path: str, key: str) -> torch.Tensor | None:
    """One tensor of a safetensors file read with plain reads into its own memory (None:
    a dtype this does not know; the caller maps the file instead). A memory map would
    also count the file's pages as the process's resident memory while they are read."""
    import struct

    st = os.stat(path)
    cache_key = (path, st.st_mtime_ns, st.st_size)
    if cache_key not in _HEADERS:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            _HEADERS[cache_key] = (8 + n, json.loads(f.read(n)))
    base, header = _HEADERS[cache_key]
    h = header.get(key)
    dtype = _ST_TORCH.get(h["dtype"]) if h else None
    if dtype is None:
        return None
    start, end = h["data_offsets"]
    out = torch.empty(tuple(h["shape"]), dtype=dtype)
    buf = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None
    if buf is None or buf.nbytes != end - start:
        return None if buf is not None else out
    with open(path, "rb", buffering=0) as f:
        f.seek(base + start)
        view, got = memoryview(buf), 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise InvalidArgument(f"{path} is truncated: tensor {key} ends past the end of the file")
            got += n
    return out


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ModelTensors:
    """The parameters of an in-memory model, as a tensor source."""

    def __init__(self, model: nn.Module, name: str = "model"):
        self.name = name
        self._params = dict(model.named_parameters())

    def has(self, key: str) -> bool:
        return key in self._params

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        p = self._params[key]
        return tuple(p.shape), str(p.dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._params:
            raise NotFound(f"tensor {key!r} is not in {self.name}")
        return self._params[key].detach()


class DictTensors(ModelTensors):
    """A plain {key: tensor} mapping (a snapshot) as a tensor source."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "snapshot"):
        self.name = name
        self._params = dict(tensors)


@dataclass
class Checkpoint:
    """A checkpoint on disk, described without loading its weights."""

    path: Path
    config: dict
    table: ModuleTable
    tensors: CheckpointTensors

    @classmethod
    def open(cls, spec: str, allow_pickle: bool = False) -> "Checkpoint":
        path = resolve_model_path(spec)
        tensors = CheckpointTensors(path, allow_pickle, name=spec)
        skel = skeleton(path)
        keys = [k for k, _ in skel.named_parameters()]
        # the head must be there (a model saved without it would generate from random
        # weights); other keys may be stored under another layout that transformers
        # converts on load (Mixtral's per-expert tensors), which a full load checks
        head = skel.get_output_embeddings()
        head_keys = [k for k, p in skel.named_parameters() if head is not None and any(p is q for q in head.parameters())]
        missing = [k for k in head_keys if not tensors.has(k)]
        if missing:
            raise InvalidArgument(f"{path} does not hold the weights of its {type(skel).__name__}: missing "
                                  f"{', '.join(missing[:8])}{f' (+{len(missing) - 8} more)' if len(missing) > 8 else ''}"
                                  "; refusing it rather than using random weights")
        table = build_table(skel, tensors.shapes(keys))
        config = json.loads((path / "config.json").read_text())
        return cls(path, config, table, tensors)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files on disk (0 if the folder has gone since it was opened)."""
        try:
            return sum(f.stat().st_size for f in weight_files(self.path, allow_pickle=True))
        except (OSError, InvalidArgument, NotFound):
            return 0
