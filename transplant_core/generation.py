"""Batched decoding with a KV cache and per-request sampling.

One loop serves evaluation, activation analysis and the server's batches: rows are
left-padded, positions come from the attention mask, each row has its own sampling
parameters (greedy when temperature is 0), its own seeded generator, its own token
budget and stop sequences. A row that finishes (EOS, budget, stop sequence or
cancellation) is fed padding until the whole batch is done.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str = "length"     # "eos", "stop", "length", "cancelled"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Row:
    params: SamplingParams
    prompt_tokens: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0                     # characters already streamed
    done: str | None = None


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < p.top_p   # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def _check_stop(row: _Row, eos_id: int | None, tok: int, tokenizer) -> None:
    if eos_id is not None and tok == eos_id:
        row.done = "eos"
        return
    row.ids.append(tok)
    row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
    for s in row.params.stop:
        at = row.text.find(s)
        if at >= 0:
            row.text, row.done = row.text[:at], "stop"
            return
    if len(row.ids) >= row.params.max_new_tokens:
        row.done = "length"


def _streamable(row: _Row) -> str:
    """New text that can no longer turn out to be the start of a stop sequence."""
    hold = 0 if row.done else max((len(s) - 1 for s in row.params.stop), default=0)
    end = max(row.sent, len(row.text) - hold)
    delta, row.sent = row.text[row.sent:end], end
    return delta


def cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword: `cache` in transformers >= 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model: nn.Module) -> dict:
    """Ask for the last position's logits only where the model supports it: the prompt
    pass then skips the LM head over every other position (a vocab x hidden matmul per
    prompt token, ~10% of a 300M model's prefill with a 32k vocabulary)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    params: SamplingParams | list[SamplingParams],
    on_text: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> list[Completion]:
    """Decode a batch. `on_text(row, delta)` streams text as it becomes final;
    `cancelled(row)` lets a caller drop a row (its client went away)."""
    n = len(prompts)
    plist = params if isinstance(params, list) else [params] * n
    ids = prompt_ids or [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    rows = [_Row(p, len(x), torch.Generator().manual_seed(p.seed) if p.seed is not None else None)
            for p, x in zip(plist, ids)]
    for r in rows:
        if r.params.max_new_tokens <= 0:
            r.done = "length"
    eos_id = tokenizer.eos_token_id
    cache_kw, extra = cache_argument(model), _last_logits_only(model)
    past, step_ids = None, input_ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    any_greedy = any(r.params.temperature <= 0 for r in rows)
    while not all(r.done for r in rows):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_kw: past}, **extra)
        past, logits = getattr(out, cache_kw, None), out.logits[:, -1, :]
        argmax = logits.argmax(-1).tolist() if any_greedy else None   # one op for all greedy rows
        nxt = []
        for i, r in enumerate(rows):
            if not r.done and cancelled is not None and cancelled(i):
                r.done = "cancelled"
            if r.done:
                nxt.append(pad)
                continue
            tok = argmax[i] if r.params.temperature <= 0 else _sample(logits[i], r.params, r.generator)
            _check_stop(r, eos_id, tok, tokenizer)
            nxt.append(tok)
            if on_text is not None:
                delta = _streamable(r)
                if delta or r.done:
                    on_text(i, delta)
        step_ids = torch.tensor(nxt, dtype=torch.long)[:, None]
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    return [Completion(r.text, r.ids, r.prompt_tokens, r.done or "length") for r in rows]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
           progress: Callable[[int], None] | None = None) -> list[Completion]:
    """Greedy completions for many prompts, in batches."""
    out: list[Completion] = []
    p = SamplingParams(max_new_tokens=max_new_tokens)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        out.extend(generate(model, tokenizer, chunk, p))
        if progress:
            progress(len(chunk))
    return out
