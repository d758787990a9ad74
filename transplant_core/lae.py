"""Layer-wise activation evaluation (LAE): which modules behave most differently.

For every module m and decoding step t we record a_m(t) = mean |h_m(t)| over the
module's output at the LAST token position, run forward-only with greedy decoding,
and score s(m) = mean over prompts and valid steps of |a*_m(t) - a_m(t)| (donor
minus target).

Step alignment (the paper leaves it open), two rules:
- "free" (default, paper-exact): each model decodes greedily on its own; step t is
  the forward pass that produces the t-th new token (step 0 is the prompt's last
  position). A step counts for a prompt only while BOTH models are still decoding
  it: steps after either model emitted EOS are excluded.
- "teacher_forced": the target decodes greedily; the donor reads the prompt plus
  the target's tokens in one forward pass, and position (prompt end - 1 + t) is its
  step t. Both see identical inputs, so differences come from the modules alone.

Hooks are registered in a context manager and always removed, exceptions included.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .arch import ModuleTable
from .errors import InvalidArgument
from .generation import SamplingParams, generate
from .refs import ModuleRef

ALIGNMENTS = ("free", "teacher_forced")


@dataclass
class Profile:
    """Activations per module: [prompts, steps], and which entries are real."""

    acts: dict[ModuleRef, torch.Tensor]
    valid: torch.Tensor          # bool [prompts, steps]
    tokens: list[list[int]]      # generated token ids per prompt (EOS excluded)


@contextlib.contextmanager
def recording(model: nn.Module, table: ModuleTable, all_positions: bool = False) -> Iterator[dict[ModuleRef, list]]:
    """Record each module's mean |output| at the last position (or every position)
    for every forward call while the context is open."""
    store: dict[ModuleRef, list] = {ref: [] for ref in table.modules}
    handles = []
    batch = [0]

    def remember_batch(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch[0] = ids.shape[0]

    def hook_for(ref: ModuleRef):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            if out.dim() == 2:   # some models (OPT) flatten [batch * positions, features]
                out = out.reshape(batch[0], -1, out.shape[-1])
            h = out if all_positions else out[:, -1:, :]
            store[ref].append(h.detach().abs().float().mean(-1))   # [batch, positions]
        return hook

    try:
        handles.append(model.register_forward_pre_hook(remember_batch, with_kwargs=True))
        for ref, info in table.modules.items():
            handles.append(model.get_submodule(info.path).register_forward_hook(hook_for(ref)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _steps(store: dict[ModuleRef, list], n_steps: int) -> dict[ModuleRef, torch.Tensor]:
    out = {}
    for ref, calls in store.items():
        a = torch.cat(calls, dim=1)[:, :n_steps]          # [batch, steps]
        if a.shape[1] < n_steps:
            a = torch.nn.functional.pad(a, (0, n_steps - a.shape[1]))
        out[ref] = a
    return out


def _valid(completions, n_steps: int) -> torch.Tensor:
    """Step t is valid while the row was still decoding: the step that produced EOS
    counts, the padding after it does not."""
    v = torch.zeros(len(completions), n_steps, dtype=torch.bool)
    for i, c in enumerate(completions):
        live = len(c.token_ids) + (1 if c.finish_reason == "eos" else 0)
        v[i, :min(live, n_steps)] = True
    return v


@torch.no_grad()
def profile_free(model, tokenizer, table: ModuleTable, prompts: list[str], max_new_tokens: int) -> Profile:
    with recording(model, table) as store:
        comps = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return Profile(_steps(store, max_new_tokens), _valid(comps, max_new_tokens), [c.token_ids for c in comps])


@torch.no_grad()
def profile_forced(model, tokenizer, table: ModuleTable, prompts: list[str], tokens: list[list[int]],
                   valid: torch.Tensor) -> Profile:
    """Run `model` once over prompt + given tokens and read position (prompt end - 1 + t)."""
    n_steps = valid.shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(x) for x in p_ids)
    # left-pad prompts to one width, right-pad continuations: step t sits at width-1+t for every row
    rows, masks = [], []
    for p, t in zip(p_ids, tokens):
        t = t[:n_steps - 1]
        tail = n_steps - 1 - len(t)
        rows.append([pad] * (width - len(p)) + p + t + [pad] * tail)
        masks.append([0] * (width - len(p)) + [1] * (len(p) + len(t)) + [0] * tail)
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with recording(model, table, all_positions=True) as store:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    acts = {ref: calls[0][:, width - 1: width - 1 + n_steps] for ref, calls in store.items()}
    return Profile(acts, valid.clone(), [list(t) for t in tokens])


def score_profiles(target: Profile, donor: Profile) -> dict[ModuleRef, float]:
    valid = target.valid & donor.valid
    denom = valid.sum().clamp(min=1).float()
    return {ref: float(((donor.acts[ref] - target.acts[ref]).abs() * valid).sum() / denom)
            for ref in target.acts}


@dataclass
class Analysis:
    scores: dict[ModuleRef, float]
    alignment: str
    prompts: int
    max_new_tokens: int
    valid_steps: int

    def ranking(self) -> list[tuple[ModuleRef, float]]:
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_dict(self) -> dict:
        return {"alignment": self.alignment, "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                "valid_steps": self.valid_steps,
                "modules": [{"name": str(r), "score": s} for r, s in self.ranking()]}


def analyze(target, donor, tokenizer, table: ModuleTable, prompts: list[str], max_new_tokens: int = 16,
            alignment: str = "free", batch_size: int = 64,
            progress: Callable[[int], None] | None = None) -> Analysis:
    """Score every module of `table` (a table both models share) on `prompts`."""
    if alignment not in ALIGNMENTS:
        raise InvalidArgument(f"unknown alignment {alignment!r}; use one of {', '.join(ALIGNMENTS)}")
    if not prompts:
        raise InvalidArgument("activation analysis needs at least one prompt")
    if max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    totals = {ref: 0.0 for ref in table.modules}
    n_valid = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        t = profile_free(target, tokenizer, table, chunk, max_new_tokens)
        if alignment == "free":
            d = profile_free(donor, tokenizer, table, chunk, max_new_tokens)
        else:
            d = profile_forced(donor, tokenizer, table, chunk, t.tokens, t.valid)
        valid = t.valid & d.valid
        n = int(valid.sum())
        for ref, s in score_profiles(t, d).items():
            totals[ref] += s * n
        n_valid += n
        if progress:
            progress(len(chunk))
    scores = {ref: v / max(n_valid, 1) for ref, v in totals.items()}
    return Analysis(scores, alignment, len(prompts), max_new_tokens, n_valid)
