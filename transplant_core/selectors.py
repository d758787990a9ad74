"""Ways to rank modules for a transplant: the paper's LAE and the alternatives the
experiment measures against it.

Every selector scores every compatible module (higher = transplant first) from
evidence gathered on the diagnostic (probe) prompts, for a decoding length L; the
top-K by score is the selection (ties broken by name, as selection.top_k does).
None takes a gradient step; none looks at the evaluation questions.

  lae       paper-exact LAE: both models decode greedily on their own; score is
            mean |a_donor - a_target| over prompts and steps t < L (lae.py)
  lae_tf    LAE with the donor teacher-forced on the target's tokens
  lae_kind  LAE divided by the mean LAE score of the module's kind (q, k, ..., down):
            per-kind normalisation, so kinds with large activations do not crowd out
            the others
  dw        ||W_donor - W_target||_F (bias included): no activations at all
  dwx       mean |(W_donor - W_target) x| over the target's own module inputs x at
            the answer positions (the target reads prompt + the donor's answer): how
            much swapping this module alone changes its output on task inputs
  taylor    first-order predicted drop of the target's loss on the donor's answers
            when the module is swapped: -<dLoss/dW, W_donor - W_target> (one backward
            pass; no weight is changed)
  swap      measured drop of that loss when this module alone is transplanted
  loo       measured rise of that loss when this module alone is left out of a
            transplant of every compatible module
  greedy    forward selection on that loss: repeatedly add the module whose
            transplant, together with those already chosen, lowers it most; the order
            of addition is the ranking (O(M^2) forward passes for M modules; after
            `greedy_steps` modules the rest follow in `swap` order)
  greedy_keep  greedy on that loss plus the target's loss on its OWN answers to
            prompts of the tasks it should keep (the retention tasks' probe prompts):
            trades task gain against damage elsewhere; equals greedy without them
  layer     whole layers (Bandarkar et al. 2024, layer swapping): every layer's
            modules together, layers in order of the measured drop of that loss when
            the whole layer alone is transplanted; within a layer, `swap` order
  layer_ends  whole layers by position, as Bandarkar et al. choose them: the bottom
            and top layers first (0, last, 1, last-1, ...), within a layer `dw` order;
            no evidence is read

"The donor's answers" are the donor's own greedy continuations of the probe prompts
(its first L tokens, and its EOS when it stops within L): no gold labels are used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import lae
from . import transplant as tp
from .arch import ModuleTable
from .checkpoint import ModelTensors
from .errors import InvalidArgument
from .generation import SamplingParams, generate
from .refs import ModuleRef

Scores = dict[ModuleRef, float]

DESCRIPTIONS = {
    "lae": "paper-exact LAE (free-running decoding, |delta mean|h|| at the last position)",
    "lae_tf": "LAE, donor teacher-forced on the target's tokens",
    "lae_kind": "LAE normalised by the mean score of the module's kind",
    "dw": "Frobenius norm of the weight difference (no activations)",
    "dwx": "weight difference applied to the target's own inputs on the donor's answers",
    "taylor": "first-order predicted loss drop on the donor's answers",
    "swap": "measured loss drop when the module alone is transplanted",
    "loo": "measured loss rise when the module alone is left out of a full transplant",
    "greedy": "forward selection on the loss of the donor's answers",
    "greedy_keep": "forward selection on that loss plus the target's loss on its own answers to other tasks",
    "layer": "whole layers, by the measured loss drop of transplanting the layer alone (layer swapping)",
    "layer_ends": "whole layers by position, bottom and top first (layer swapping as Bandarkar et al. 2024 choose)",
}
SELECTORS = tuple(DESCRIPTIONS)
LENGTH_FREE = ("dw", "layer_ends")      # selectors whose scores do not depend on the decoding length


def check_names(names) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip() and n.strip() != "random"))
    if "all" in names:
        return SELECTORS
    bad = [n for n in names if n not in DESCRIPTIONS]
    if bad:
        raise InvalidArgument(f"unknown selector(s) {', '.join(bad)}; use any of {', '.join(SELECTORS)} or all "
                              "(the random control always runs)")
    return names


@dataclass
class Evidence:
    """What selectors read: both models, the compatible modules, the probe prompts.
    Profiles and the donor's answers are computed once, at the longest length, and cut
    to each shorter L (greedy decoding to L is a prefix of decoding further)."""

    target: nn.Module
    donor: nn.Module
    tokenizer: object
    table: ModuleTable
    prompts: list[str]
    max_len: int
    greedy_steps: int | None = None
    keep_prompts: list[str] = field(default_factory=list)   # other tasks' prompts (greedy_keep)
    _cache: dict = field(default_factory=dict, repr=False)

    def _once(self, key: str, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def free_target(self) -> lae.Profile:
        return self._once("ft", lambda: lae.profile_free(self.target, self.tokenizer, self.table, self.prompts,
                                                         self.max_len))

    def free_donor(self) -> lae.Profile:
        return self._once("fd", lambda: lae.profile_free(self.donor, self.tokenizer, self.table, self.prompts,
                                                         self.max_len))

    def forced_donor(self) -> lae.Profile:
        t = self.free_target()
        return self._once("fd_tf", lambda: lae.profile_forced(self.donor, self.tokenizer, self.table, self.prompts,
                                                              t.tokens, t.valid))

    def donor_answers(self, length: int) -> list[list[int]]:
        """The donor's first `length` tokens per probe prompt, with EOS if it stopped within them."""
        eos = self.tokenizer.eos_token_id
        out = []
        for toks in self.free_donor().tokens:
            stopped = len(toks) < self.max_len          # finished by EOS, not by the budget
            out.append(list(toks[:length]) + ([eos] if stopped and len(toks) < length else []))
        return out

    def keep_answers(self, length: int) -> list[list[int]]:
        """The target's own first `length` tokens (and EOS) on the keep prompts."""
        def make():
            comps = generate(self.target, self.tokenizer, self.keep_prompts, SamplingParams(max_new_tokens=self.max_len))
            return [c.token_ids for c in comps]
        eos = self.tokenizer.eos_token_id
        return [list(t[:length]) + ([eos] if len(t) < min(length, self.max_len) else [])
                for t in self._once("keep", make)]

    def donor_source(self) -> ModelTensors:
        return self._once("src", lambda: ModelTensors(self.donor, "donor"))

    def refs(self) -> list[ModuleRef]:
        return self.table.refs()


def _head(p: lae.Profile, length: int) -> lae.Profile:
    return lae.Profile({r: a[:, :length] for r, a in p.acts.items()}, p.valid[:, :length], p.tokens)


# ---- activation selectors (the paper's family) ------------------------------------------

def score_lae(ev: Evidence, length: int) -> Scores:
    return lae.score_profiles(_head(ev.free_target(), length), _head(ev.free_donor(), length))


def score_lae_tf(ev: Evidence, length: int) -> Scores:
    return lae.score_profiles(_head(ev.free_target(), length), _head(ev.forced_donor(), length))


def score_lae_kind(ev: Evidence, length: int) -> Scores:
    s = score_lae(ev, length)
    kinds: dict[str, list[float]] = {}
    for r, v in s.items():
        kinds.setdefault(r.kind, []).append(v)
    mean = {k: sum(v) / len(v) for k, v in kinds.items()}
    return {r: (v / mean[r.kind] if mean[r.kind] > 0 else 0.0) for r, v in s.items()}


# ---- weight selectors -------------------------------------------------------------------

def _delta(ev: Evidence, ref: ModuleRef) -> tuple[torch.Tensor, torch.Tensor | None]:
    info, src = ev.table[ref], ev.donor_source()
    t = dict(ev.target.named_parameters())
    dw = src.get(info.weight_key).float() - t[info.weight_key].detach().float()
    db = src.get(info.bias_key).float() - t[info.bias_key].detach().float() if info.bias_key else None
    return dw, db


def score_dw(ev: Evidence, length: int | None = None) -> Scores:
    out = {}
    for r in ev.refs():
        dw, db = _delta(ev, r)
        out[r] = float(torch.sqrt(dw.pow(2).sum() + (db.pow(2).sum() if db is not None else 0.0)))
    return out


# ---- selectors on the donor's answers ----------------------------------------------------

@dataclass
class _Batch:
    ids: torch.Tensor        # [B, T]
    mask: torch.Tensor       # [B, T]
    positions: torch.Tensor  # [B, T]
    labels: torch.Tensor     # [B, T]: the token position t predicts, -100 where none


def _answer_batch(tokenizer, prompts: list[str], answers: list[list[int]]) -> _Batch:
    """prompt (left-padded) + answer (right-padded); position t is labelled with token t+1
    wherever that token belongs to the answer."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    width, tail = max(map(len, p_ids)), max(map(len, answers))
    rows, masks, labels = [], [], []
    for p, a in zip(p_ids, answers):
        fill = tail - len(a)
        rows.append([pad] * (width - len(p)) + p + a + [pad] * fill)
        masks.append([0] * (width - len(p)) + [1] * (len(p) + len(a)) + [0] * fill)
        labels.append([-100] * (width - 1) + a + [-100] * (fill + 1))
    mask = torch.tensor(masks)
    return _Batch(torch.tensor(rows), mask, (mask.cumsum(-1) - 1).clamp(min=0), torch.tensor(labels))


def _loss(model: nn.Module, b: _Batch) -> torch.Tensor:
    logits = model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False).logits
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=-100)


@contextlib.contextmanager
def transplanted(ev: Evidence, refs: list[ModuleRef]):
    """The target with `refs` copied from the donor; restored bitwise on exit."""
    if not refs:
        yield
        return
    snap = tp.commit(ev.target, tp.plan(ev.table, ev.donor_source(), list(refs)))
    try:
        yield
    finally:
        tp.revert(ev.target, ev.table, snap)


def _batch(ev: Evidence, length: int) -> _Batch:
    return ev._once(f"batch{length}", lambda: _answer_batch(ev.tokenizer, ev.prompts, ev.donor_answers(length)))


@torch.no_grad()
def _loss_with(ev: Evidence, b: _Batch, refs: list[ModuleRef]) -> float:
    with transplanted(ev, refs):
        return float(_loss(ev.target, b))


def score_dwx(ev: Evidence, length: int) -> Scores:
    b = _batch(ev, length)
    at = b.labels != -100          # positions that produce an answer token
    n = at.sum().clamp(min=1)
    totals: Scores = {}
    handles = []

    def hook_for(ref: ModuleRef):
        dw, db = _delta(ev, ref)
        info = ev.table[ref]

        def hook(_mod, inp, _out):
            x = inp[0].detach().float()[at]                     # [N, in]
            y = x @ dw if info.transposed else x @ dw.T          # Conv1D stores (in, out)
            if db is not None:
                y = y + db
            totals[ref] = float(y.abs().mean(-1).sum() / n)
        return hook

    try:
        for ref in ev.refs():
            handles.append(ev.target.get_submodule(ev.table[ref].path).register_forward_hook(hook_for(ref)))
        with torch.no_grad():
            ev.target(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return totals


def score_taylor(ev: Evidence, length: int) -> Scores:
    b = _batch(ev, length)
    params = dict(ev.target.named_parameters())
    keys = [k for r in ev.refs() for k in ev.table[r].keys]
    with torch.enable_grad():
        grads = torch.autograd.grad(_loss(ev.target, b), [params[k] for k in keys], allow_unused=True)
    g = dict(zip(keys, grads))
    src = ev.donor_source()
    out = {}
    for r in ev.refs():
        dot = 0.0
        for k in ev.table[r].keys:
            if g[k] is not None:
                dot += float((g[k].float() * (src.get(k).float() - params[k].detach().float())).sum())
        out[r] = -dot
    return out


def score_swap(ev: Evidence, length: int) -> Scores:
    b = _batch(ev, length)
    base = _loss_with(ev, b, [])
    return {r: base - _loss_with(ev, b, [r]) for r in ev.refs()}


def score_loo(ev: Evidence, length: int) -> Scores:
    b = _batch(ev, length)
    refs = ev.refs()
    full = _loss_with(ev, b, refs)
    return {r: _loss_with(ev, b, [x for x in refs if x != r]) - full for r in refs}


def _keep_batch(ev: Evidence, length: int) -> _Batch | None:
    if not ev.keep_prompts:
        return None
    return ev._once(f"keep{length}", lambda: _answer_batch(ev.tokenizer, ev.keep_prompts, ev.keep_answers(length)))


def score_greedy(ev: Evidence, length: int, keep: bool = False) -> Scores:
    task = _batch(ev, length)
    other = _keep_batch(ev, length) if keep else None
    batches = [task] + ([other] if other is not None else [])
    refs = ev.refs()
    steps = min(len(refs), ev.greedy_steps or len(refs))
    chosen: list[ModuleRef] = []
    trace: list[float] = []
    with contextlib.ExitStack() as stack:
        for _ in range(steps):
            rest = [r for r in refs if r not in chosen]
            # on top of those already in place
            losses = {r: sum(_loss_with(ev, b, [r]) for b in batches) for r in rest}
            best = min(rest, key=lambda r: (losses[r], r))
            stack.enter_context(transplanted(ev, [best]))
            chosen.append(best)
            trace.append(losses[best])
    ev._cache[f"{'greedy_keep' if keep else 'greedy'}_trace{length}"] = trace
    if len(chosen) < len(refs):
        swap = score_swap(ev, length)
        chosen += sorted((r for r in refs if r not in chosen), key=lambda r: (-swap[r], r))
    return {r: float(len(refs) - i) for i, r in enumerate(chosen)}


def _by_layer(refs: list[ModuleRef], layer_key, module_key) -> Scores:
    """Scores that put whole layers first (by `layer_key`, higher first), modules within a
    layer by `module_key` (higher first): the top-K holds whole layers and part of one."""
    order = sorted(refs, key=lambda r: (-layer_key(r.layer), -module_key(r), r))
    return {r: float(len(order) - i) for i, r in enumerate(order)}


def score_layer(ev: Evidence, length: int) -> Scores:
    b = _batch(ev, length)
    refs = ev.refs()
    base = _loss_with(ev, b, [])
    drop = {layer: base - _loss_with(ev, b, [r for r in refs if r.layer == layer]) for layer in {r.layer for r in refs}}
    swap = score_swap(ev, length)
    return _by_layer(refs, drop.__getitem__, swap.__getitem__)


def score_layer_ends(ev: Evidence, length: int | None = None) -> Scores:
    refs = ev.refs()
    layers = sorted({r.layer for r in refs})
    ends = [x for pair in zip(layers, reversed(layers)) for x in pair]
    order = list(dict.fromkeys(ends))[:len(layers)]             # 0, last, 1, last-1, ...
    pos = {layer: len(order) - i for i, layer in enumerate(order)}
    dw = score_dw(ev)
    return _by_layer(refs, pos.__getitem__, dw.__getitem__)


SCORERS: dict[str, Callable[[Evidence, int], Scores]] = {
    "lae": score_lae, "lae_tf": score_lae_tf, "lae_kind": score_lae_kind, "dw": score_dw, "dwx": score_dwx,
    "taylor": score_taylor, "swap": score_swap, "loo": score_loo, "greedy": score_greedy,
    "greedy_keep": lambda ev, length: score_greedy(ev, length, keep=True),
    "layer": score_layer, "layer_ends": score_layer_ends,
}


def scores(name: str, ev: Evidence, length: int) -> Scores:
    """Scores of every compatible module under selector `name` at decoding length `length`."""
    if name not in SCORERS:
        check_names([name])
    return SCORERS[name](ev, length)
