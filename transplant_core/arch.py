"""Which linear modules a model has, under normalised names.

Architecture knowledge is data (architectures.json); a model type that is not in
the table falls back to discovering the leaf linear modules of its decoder layers.
The table is built from a module tree (possibly on the meta device, so a donor's
structure costs no memory) plus a tensor source that knows shapes and dtypes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn

from .errors import InvalidArgument
from .refs import ModuleRef


def _load_table() -> dict[str, dict]:
    raw = json.loads(resources.files(__package__).joinpath("architectures.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


ARCHITECTURES = _load_table()


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class ModuleInfo:
    ref: ModuleRef
    path: str                      # module path inside the model, e.g. model.layers.0.mlp.down_proj
    weight_key: str
    weight_shape: tuple[int, ...]  # as stored
    dtype: str
    bias_key: str | None = None
    bias_shape: tuple[int, ...] | None = None
    transposed: bool = False       # Conv1D stores (in, out)

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.weight_key,) + ((self.bias_key,) if self.bias_key else ())

    @property
    def out_in(self) -> tuple[int, int]:
        """(out_features, in_features), whatever the storage layout."""
        a, b = self.weight_shape
        return (b, a) if self.transposed else (a, b)

    @property
    def numel(self) -> int:
        n = self.weight_shape[0] * self.weight_shape[1]
        return n + (self.bias_shape[0] if self.bias_shape else 0)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class ModuleTable:
    arch: str                      # model_type, e.g. "llama"
    source: str                    # "table" or "discovered"
    layers_path: str
    vocab_size: int | None
    modules: dict[ModuleRef, ModuleInfo] = field(default_factory=dict)
    # weight matrices of the decoder layers no module kind covers (MoE experts and router),
    # as paths relative to a layer: listed by inspect and compat, never transplanted
    skipped: tuple[str, ...] = ()
    # groups of kinds an engine keeps fused in one parameter (vLLM: q/k/v, gate/up), from
    # the architecture table: a swap sends each group whole
    fused: tuple[tuple[str, ...], ...] = ()

    def __contains__(self, ref: ModuleRef) -> bool:
        return ref in self.modules

    def __getitem__(self, ref: ModuleRef) -> ModuleInfo:
        return self.modules[ref]

    def refs(self) -> list[ModuleRef]:
        return sorted(self.modules)

    @property
    def num_layers(self) -> int:
        return 1 + max((r.layer for r in self.modules), default=-1)

    def require(self, refs: list[ModuleRef]) -> list[ModuleInfo]:
        unknown = [str(r) for r in refs if r not in self.modules]
        if unknown:
            kinds = sorted({r.kind for r in self.modules})
            raise InvalidArgument(
                f"unknown module(s) {', '.join(unknown)} for this {self.arch} model "
                f"({self.num_layers} layers, kinds {', '.join(kinds)}); `transplant inspect MODEL` lists them"
            )
        return [self.modules[r] for r in refs]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _table_layout(model: nn.Module, model_type: str) -> tuple[str, dict[str, str]] | None:
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        return None
    layers = _get(model, spec["layers"])
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    first = layers[0]
    if not all(_is_linear(_get(first, rel) or nn.Identity()) for rel in spec["modules"].values()):
        return None  # a variant the table does not describe: discover instead
    return spec["layers"], dict(spec["modules"])


def _discovered_layout(model: nn.Module) -> tuple[str, dict[str, str]]:
    """The longest ModuleList whose items hold linear modules is the decoder stack."""
    best: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(_is_linear(m) for m in mod[0].modules()):
            if best is None or len(mod) > best[0]:
                best = (len(mod), name)
    if best is None:
        raise InvalidArgument(f"{type(model).__name__}: found no decoder layers with linear modules")
    layers = model.get_submodule(best[1])
    rels = {n: n for n, m in layers[0].named_modules() if n and _is_linear(m)}
    return best[1], rels


def build_table(model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], str]] | None = None) -> ModuleTable:
    """Describe `model`'s transplantable modules.

    `shapes` maps parameter keys to (shape, dtype name); by default they are read off
    the model's own parameters (pass a checkpoint's for a meta-device skeleton)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if shapes is None:
        shapes = {k: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for k, p in model.named_parameters()}
    layout = _table_layout(model, model_type)
    source = "table" if layout else "discovered"
    layers_path, rels = layout or _discovered_layout(model)
    conv1d = bool(ARCHITECTURES.get(model_type, {}).get("conv1d"))
    modules: dict[ModuleRef, ModuleInfo] = {}
    for i, layer in enumerate(model.get_submodule(layers_path)):
        for kind, rel in rels.items():
            mod = _get(layer, rel)
            if mod is None or not _is_linear(mod):
                continue
            path = f"{layers_path}.{i}.{rel}"
            wkey, bkey = f"{path}.weight", f"{path}.bias"
            if wkey not in shapes:
                continue
            ref = ModuleRef(i, kind)
            modules[ref] = ModuleInfo(
                ref=ref, path=path, weight_key=wkey, weight_shape=shapes[wkey][0], dtype=shapes[wkey][1],
                bias_key=bkey if bkey in shapes else None,
                bias_shape=shapes[bkey][0] if bkey in shapes else None,
                transposed=conv1d or type(mod).__name__ == "Conv1D",
            )
    covered = {k for m in modules.values() for k in m.keys}
    prefix = f"{layers_path}.0."
    skipped = tuple(sorted(k[len(prefix):] for k, p in model.named_parameters()     # the model's own layout
                           if k.startswith(prefix) and p.dim() >= 2 and f"{k}" not in covered))
    fused = tuple(tuple(g) for g in ARCHITECTURES[model_type].get("fused", ())) if layout else ()
    return ModuleTable(model_type, source, layers_path, getattr(config, "vocab_size", None), modules, skipped, fused)
