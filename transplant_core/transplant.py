"""The transplant itself: plan (validate everything), commit (snapshot, copy), revert.

Nothing is mutated until the whole plan validates. A commit snapshots the tensors
it replaces, copies with `param.data.copy_()` so parameter identity survives (hooks,
optimisers and views stay attached), and restores the snapshot if anything fails
half way. Revert is a transplant whose donor is the snapshot.

What a plan does to one tensor is written once, in transplant_core.change (a full
copy of the donor's value, an alpha blend, or the current weight moved by low-rank
factors); `Plan.value` applies it, and the runtime, `apply`, the journal (which stores
the factors, not the product) and every engine go through it.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import change
from .arch import ModuleInfo, ModuleTable
from .change import lowrank_update  # noqa: F401 - part of this module's surface (tests, experiments)
from .checkpoint import DictTensors, TensorSource
from .errors import Incompatible, InvalidArgument, NonFiniteWeights
from .refs import ModuleRef


@dataclass(frozen=True)
class Plan:
    """A validated transplant: which modules, the donor values to install, alpha."""

    donor: str
    alpha: float
    modules: tuple[ModuleInfo, ...]
    values: dict[str, torch.Tensor] = field(repr=False)
    # modules whose donor values were cast to the target's dtype (cast=True):
    # {module: {"from", "to", "max_abs_error", "max_rel_error"}}
    casts: dict[str, dict] = field(default_factory=dict)
    # a low-rank plan: weight key -> (B, A), float32, B (out x r) holding the singular
    # values, A (r x in): the weight becomes W + alpha * B @ A (biases stay in `values`)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    # a low-rank plan: module -> share of the squared Frobenius norm of the weight
    # difference its factors hold (1.0 = exact)
    energy: dict[str, float] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """"module" (whole modules copied or blended) or "lowrank" (weights moved by factors)."""
        return "lowrank" if self.factors else "module"

    @property
    def ranks(self) -> dict[str, int]:
        """module -> rank of its factors (a low-rank plan)."""
        return {str(m.ref): int(self.factors[m.weight_key][0].shape[1]) for m in self.modules
                if m.weight_key in self.factors}

    @property
    def stored_bytes(self) -> int:
        """Bytes that describe the change: the factors and copied values (a full copy: the modules' bytes)."""
        ts = [self.values[k] for k in self.keys if k not in self.factors]
        ts += [t for ba in self.factors.values() for t in ba]
        return sum(t.numel() * t.element_size() for t in ts)

    def value(self, key: str, old: torch.Tensor) -> torch.Tensor:
        """What tensor `key` becomes when its current value is `old` (same dtype and device
        as `old`). May return the plan's own tensor (a full copy on the same device/dtype)."""
        if key in self.factors:
            return change.value(old, factors=self.factors[key], alpha=self.alpha)
        return change.value(old, self.values[key], alpha=self.alpha)

    @property
    def refs(self) -> list[ModuleRef]:
        return [m.ref for m in self.modules]

    @property
    def keys(self) -> list[str]:
        return [k for m in self.modules for k in m.keys]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules)


@dataclass(frozen=True)
class Snapshot:
    """The tensors a commit replaced, enough to undo it."""

    refs: tuple[ModuleRef, ...]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def as_source(self) -> DictTensors:
        return DictTensors(self.tensors, name="snapshot")


def plan(table: ModuleTable, donor: TensorSource, refs: list[ModuleRef], alpha: float = 1.0,
         known_finite: bool = False, cast: bool = False) -> Plan:
    """Validate a transplant of `refs` from `donor` into the model `table` describes.

    Every problem is collected before raising, so one error lists them all. Reads
    only the selected modules' tensors from the donor. `known_finite` skips the NaN/inf
    scan, only for values that passed it before (a generation's own stored tensors)."""
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0 or alpha != alpha:
        raise InvalidArgument(f"alpha must be a number in [0, 1] (1 = full copy), got {alpha!r}")
    if not refs:
        raise InvalidArgument("no modules selected; give module names or a task and K >= 1")
    modules = table.require(refs)
    problems: list[str] = []
    values: dict[str, torch.Tensor] = {}
    casts: dict[str, dict] = {}
    for m in modules:
        for key, shape in ((m.weight_key, m.weight_shape), (m.bias_key, m.bias_shape)):
            if key is None:
                continue
            if not donor.has(key):
                problems.append(f"{m.ref}: donor {donor.name} has no tensor {key}")
                continue
            d_shape, d_dtype = donor.meta(key)
            if tuple(d_shape) != tuple(shape):
                problems.append(f"{m.ref}: {key} shape target {list(shape)} vs donor {list(d_shape)}")
            elif d_dtype != m.dtype and not cast:
                problems.append(f"{m.ref}: {key} dtype target {m.dtype} vs donor {d_dtype}; pass --cast (cast: "
                                "true) to convert the donor's values, with the rounding error reported")
            elif d_dtype != m.dtype:
                orig = donor.get(key)
                values[key] = orig.to(getattr(torch, m.dtype))
                err = _cast_error(orig, values[key])
                prev = casts.setdefault(str(m.ref), {"from": d_dtype, "to": m.dtype, "max_abs_error": 0.0,
                                                     "max_rel_error": 0.0})
                prev["max_abs_error"] = max(prev["max_abs_error"], err[0])
                prev["max_rel_error"] = max(prev["max_rel_error"], err[1])
            else:
                values[key] = donor.get(key)
        if m.bias_key is None and donor.has(f"{m.path}.bias"):
            problems.append(f"{m.ref}: donor has a bias, target has none")
    if problems:
        raise Incompatible(f"cannot transplant from {donor.name}", problems)
    bad = [] if known_finite else [k for k, v in values.items() if not _all_finite(v)]
    if bad:
        raise NonFiniteWeights(f"donor {donor.name} has NaN or infinite values in {', '.join(bad)}; refusing to install them")
    return Plan(donor.name, float(alpha), tuple(modules), values, casts)


def _cast_error(orig: torch.Tensor, cast: torch.Tensor) -> tuple[float, float]:
    """(largest absolute error, that over the largest magnitude of the original) of a cast."""
    o = orig.double()
    err = (cast.double() - o).abs()
    scale = float(o.abs().max()) if o.numel() else 0.0
    m = float(err.max()) if err.numel() else 0.0
    return m, (m / scale if scale else 0.0)


def _all_finite(t: torch.Tensor) -> bool:
    """True if no element is NaN or infinite. One reduction: a finite sum proves every
    element finite (NaN and inf propagate); only a non-finite sum (which overflow can
    also cause) pays for the exact elementwise check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else t.dtype))):
        return True
    return bool(torch.isfinite(t).all())


def lowrank(p: Plan, current: TensorSource, rank: int | None = None, budget: int | None = None) -> Plan:
    """The low-rank version of a validated full-copy plan: each module's weight moves by
    the top singular directions of (donor - current), as factors B (out x r, scaled by
    the singular values) and A (r x in); biases are copied as before. Either `rank`, the
    same for every module (capped at the module's full rank), or `budget`, a number of
    factor parameters (r x (out + in) per module) shared across the modules by taking the
    singular directions with the most squared singular value per parameter first; a
    module that gets none is dropped from the plan. `current`: the weights the plan will
    be installed on (the live generation's, the target checkpoint's)."""
    if (rank is None) == (budget is None):
        raise InvalidArgument("a low-rank transplant needs a rank or a parameter budget (not both)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidArgument(f"rank must be an integer >= 1, got {rank!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise InvalidArgument(f"the parameter budget must be an integer >= 1, got {budget!r}")
    if p.factors:
        raise InvalidArgument("the plan is already low-rank")
    svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for m in p.modules:
        svd[str(m.ref)] = change.difference_svd(p.values[m.weight_key], current.get(m.weight_key))
    if rank is not None:
        ranks = {name: min(rank, int(s.numel())) for name, (_, s, _) in svd.items()}
    else:
        ranks = _share_budget({str(m.ref): (svd[str(m.ref)][1], sum(m.weight_shape)) for m in p.modules}, budget)
    # a module that gets no rank, or whose weight equals the donor's, is left out
    modules = tuple(m for m in p.modules if ranks[str(m.ref)] > 0 and bool(svd[str(m.ref)][1].any()))
    if not modules:
        raise InvalidArgument(f"nothing to move: the donor's weights equal the current ones in every selected module "
                              f"({', '.join(str(m.ref) for m in p.modules)})")
    factors, energy = {}, {}
    for m in modules:
        u, s, vh = svd[str(m.ref)]
        r = ranks[str(m.ref)]
        factors[m.weight_key] = change.truncate(u, s, vh, r)
        total = float((s.double() ** 2).sum())
        energy[str(m.ref)] = float((s[:r].double() ** 2).sum()) / total if total else 1.0
    keep = {k for m in modules for k in m.keys}
    values = {k: v for k, v in p.values.items() if k in keep and k not in factors}
    casts = {name: c for name, c in p.casts.items() if name in energy}
    return Plan(p.donor, p.alpha, modules, values, casts, factors, energy)


def _share_budget(spectra: dict[str, tuple[torch.Tensor, int]], budget: int) -> dict[str, int]:
    """Ranks per module within `budget` parameters: singular directions by squared
    singular value per parameter, largest first, each costing its module's out + in."""
    cheapest = min(cost for _, cost in spectra.values())
    if budget < cheapest:
        raise InvalidArgument(f"a parameter budget of {budget} holds no rank of any selected module "
                              f"(the cheapest rank costs {cheapest} parameters: out + in)")
    order = sorted(((float(s[i]) ** 2 / cost, -i, name) for name, (s, cost) in spectra.items()
                    for i in range(int(s.numel())) if float(s[i]) > 0), reverse=True)
    ranks = dict.fromkeys(spectra, 0)
    left = budget
    for _, neg_i, name in order:
        cost = spectra[name][1]
        if ranks[name] == -neg_i and cost <= left:
            ranks[name] += 1
            left -= cost
    return ranks


def commit(model: nn.Module, p: Plan) -> Snapshot:
    """Install the plan into `model` in place; return the snapshot that undoes it."""
    params = dict(model.named_parameters())
    missing = [k for k in p.keys if k not in params]
    if missing:
        raise InvalidArgument(f"model has no parameter(s) {', '.join(missing)}; was the plan made for another model?")
    snap = {k: params[k].detach().clone() for k in p.keys}
    done: list[str] = []
    try:
        with torch.no_grad():
            for k in p.keys:
                new = p.value(k, snap[k])
                done.append(k)
                params[k].data.copy_(new)
    except BaseException:
        with torch.no_grad():
            for k in done:
                params[k].data.copy_(snap[k])
        raise
    return Snapshot(tuple(p.refs), snap)


def revert(model: nn.Module, table: ModuleTable, snapshot: Snapshot) -> Snapshot:
    """Undo a commit through the same path: the snapshot is the donor, alpha 1."""
    return commit(model, plan(table, snapshot.as_source(), list(snapshot.refs), 1.0))


def fork(model: nn.Module, keys: list[str]) -> nn.Module:
    """A structural copy of `model` that shares every tensor except `keys`, which are
    cloned. Committing into the fork leaves `model` untouched: this is how the server
    builds a new generation while requests keep running on the old one."""
    keys = set(keys)
    memo: dict[int, object] = {}
    for k, p in model.named_parameters():
        if k not in keys:
            memo[id(p)] = p
    for _, b in model.named_buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def derive(model: nn.Module, p: Plan, share: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A new model with the plan installed, built without touching `model`.

    The result shares every tensor and every module off the path to the plan's
    parameters with `model`; only the modules on that path are shallow-copied, and
    the plan's parameters are new tensors, copied once from the plan's values. With
    `share`, values that need no blend or device move are used as they are: only for
    values nothing will ever write to (a checkpoint's tensors may be memory maps of
    a file that can change on disk; another live model's parameters may be mutated).
    Returns the new model and the tensors it replaced: `model`'s own, unchanged,
    which is all an undo needs when models are treated as immutable, as the
    server's generations are.

    Forward hooks registered later on a shared module would fire in both models; to
    attach hooks, use `fork(model, [])`, which copies the whole tree."""
    params = dict(model.named_parameters())
    missing = [k for k in p.keys if k not in params]
    if missing:
        raise InvalidArgument(f"model has no parameter(s) {', '.join(missing)}; was the plan made for another model?")
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k in p.keys:
            v = p.value(k, params[k].detach())
            if not share and k in p.values and v.data_ptr() == p.values[k].data_ptr():   # the plan's own tensor
                v = v.clone(memory_format=torch.contiguous_format)
            new[k] = v
    root = _shallow(model)
    copies: dict[str, nn.Module] = {"": root}
    for k in p.keys:
        path, _, leaf = k.rpartition(".")
        mod = _path_copy(copies, path)
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(new[k], requires_grad=old.requires_grad)
    return root, {k: params[k].detach() for k in p.keys}


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of one module object: own child, parameter, buffer and hook tables;
    the same children, tensors and hooks."""
    c = copy.copy(m)
    for attr, val in m.__dict__.items():
        if isinstance(val, (dict, set)):   # _modules, _parameters, _buffers, hook tables,
            c.__dict__[attr] = val.copy()  # _non_persistent_buffers_set
    return c


def _path_copy(copies: dict[str, nn.Module], path: str) -> nn.Module:
    if path in copies:
        return copies[path]
    parent_path, _, name = path.rpartition(".")
    parent = _path_copy(copies, parent_path)
    child = _shallow(parent._modules[name])
    parent._modules[name] = child
    copies[path] = child
    return child


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, hashed in place (no copy for a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if not t.numel():
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def checksums(model: nn.Module, keys: list[str] | None = None) -> dict[str, str]:
    """sha256 of each parameter (all, or the given keys): tests and the journal use
    these to prove which weights are live."""
    params = dict(model.named_parameters())
    return {k: tensor_digest(params[k]) for k in (keys if keys is not None else sorted(params))}


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in checksums(model).items():
        h.update(k.encode() + v.encode())
    return h.hexdigest()
