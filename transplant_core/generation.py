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
    """Per-row sampling, with vLLM's parameters and order: logit_bias, min_tokens and the
    penalties change the logits, then greedy (temperature 0) or temperature, min_p,
    top_k, top_p and a draw. Logprobs are the model's own (raw) log-probabilities."""
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0                    # 0 (or -1): off
    min_p: float = 0.0
    presence_penalty: float = 0.0     # on output tokens
    frequency_penalty: float = 0.0    # on output tokens, per occurrence
    repetition_penalty: float = 1.0   # on prompt and output tokens (divides positive logits)
    min_tokens: int = 0               # no EOS, stop token or stop string before this many tokens
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None       # per output token: its logprob and the top-N (None: none)
    prompt_logprobs: int | None = None   # the same for each prompt token (echo)

    @property
    def shapes_logits(self) -> bool:
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # the N most likely tokens, most likely first


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str = "length"     # "eos", "stop", "length", "cancelled"
    spans: list[tuple[int, int, int]] | None = None   # (generation, start, end) where several computed it
    logprobs: list[TokenLogprob] | None = None         # per output token (and the EOS that ended it)
    prompt_logprobs: list[TokenLogprob | None] | None = None   # per prompt token; the first has none
    stop_token: int | None = None     # the EOS or stop token that ended it (not in token_ids)

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
    lp_sent: int = 0                  # logprob entries already streamed
    done: str | None = None
    prompt: tuple[int, ...] = ()      # for the repetition penalty
    counts: dict[int, int] = field(default_factory=dict)    # output token -> occurrences
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token: int | None = None

    def completion(self) -> Completion:
        return Completion(self.text, self.ids, self.prompt_tokens, self.done or "length", None, self.logprobs,
                          self.prompt_logprobs, self.stop_token)


def _new_row(p: SamplingParams, prompt: list[int]) -> _Row:
    return _Row(p, len(prompt), torch.Generator().manual_seed(p.seed) if p.seed is not None else None,
                prompt=tuple(prompt) if p.repetition_penalty != 1.0 else (),
                logprobs=[] if p.logprobs is not None else None)


def _shape(logits: torch.Tensor, r: _Row, eos_id: frozenset[int]) -> torch.Tensor:
    """vLLM's logits processors, in its order: logit_bias, min_tokens, then the penalties."""
    p, x = r.params, logits.float().clone()
    for tok, bias in p.logit_bias:
        if 0 <= tok < x.shape[-1]:
            x[tok] += bias
    if len(r.ids) < p.min_tokens:
        for tok in (set() if p.ignore_eos else eos_id) | set(p.stop_token_ids):
            if 0 <= tok < x.shape[-1]:
                x[tok] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt) | set(r.counts)), dtype=torch.long)
        if len(seen):
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if r.counts and (p.frequency_penalty or p.presence_penalty):
        toks = torch.tensor(list(r.counts), dtype=torch.long)
        n = torch.tensor(list(r.counts.values()), dtype=torch.float32)
        x[toks] -= p.frequency_penalty * n + p.presence_penalty
    return x


def _draw(x: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Temperature, min_p, top_k, top_p (vLLM's order), then one draw."""
    probs = torch.softmax(x.float() / p.temperature, dim=-1)
    cut = False
    if p.min_p > 0:
        probs, cut = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs), True
    if 0 < p.top_k < probs.shape[-1]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs, cut = torch.where(probs < kth, torch.zeros_like(probs), probs), True
    if cut:
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < p.top_p   # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    return _draw(logits, p, gen)


def _token_logprob(logits: torch.Tensor, tok: int, n: int) -> TokenLogprob:
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, min(n, lp.shape[-1])) if n > 0 else None
    return TokenLogprob(tok, float(lp[tok]), tuple(zip(top.indices.tolist(), top.values.tolist())) if top else ())


def _pick_rows(logits: torch.Tensor, rows: list[_Row], eos_id: frozenset[int]) -> list[int]:
    """Each row's next token from its logits [rows, vocab] (one argmax for the plain greedy
    rows); records its logprob where the row asks for them."""
    plain = [r.params.temperature <= 0 and not r.params.shapes_logits for r in rows]
    argmax = logits.argmax(-1).tolist() if any(plain) else None
    out = []
    for i, r in enumerate(rows):
        if r.done:
            out.append(None)
            continue
        if plain[i]:
            tok = argmax[i]
        else:
            x = _shape(logits[i], r, eos_id) if r.params.shapes_logits else logits[i]
            tok = int(torch.argmax(x)) if r.params.temperature <= 0 else _draw(x, r.params, r.generator)
        if r.logprobs is not None:
            r.logprobs.append(_token_logprob(logits[i], tok, r.params.logprobs))
        out.append(tok)
    return out


def _prompt_logprobs(logits: torch.Tensor, ids: list[int], width: int, n: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it (left padding: the row's
    tokens are its last len(ids) positions); the first token has none."""
    start = width - len(ids)
    return [None] + [_token_logprob(logits[start + t - 1], ids[t], n) for t in range(1, len(ids))]


def stop_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends a reply: the tokenizer's EOS and each `eos_token_id` the
    checkpoint's generation_config.json declares (Llama-3-Instruct's <|eot_id|>,
    Qwen2-Instruct's <|im_end|>: a list there)."""
    ids = set()
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (declared if isinstance(declared, (list, tuple)) else [declared]):
        if isinstance(v, int):
            ids.add(v)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens as the tokenizer makes them by default: with the BOS token for
    models that expect one (Llama, Gemma), as `model.generate` on its tokenizer's output."""
    return tokenizer(prompt)["input_ids"]


def _check_stop(row: _Row, eos_id: frozenset[int], tok: int, tokenizer) -> None:
    p = row.params
    if tok in eos_id and not p.ignore_eos:
        row.done, row.stop_token = "eos", tok
        return
    if tok in p.stop_token_ids:
        row.done, row.stop_token = "stop", tok
        return
    row.ids.append(tok)
    row.counts[tok] = row.counts.get(tok, 0) + 1
    row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
    if len(row.ids) >= p.min_tokens:
        for s in p.stop:
            at = row.text.find(s)
            if at >= 0:
                row.text, row.done = row.text[:at], "stop"
                return
    if len(row.ids) >= p.max_new_tokens:
        row.done = "length"


def _streamable(row: _Row) -> str:
    """New text that can no longer turn out to be the start of a stop sequence."""
    hold = 0 if row.done else max((len(s) - 1 for s in row.params.stop), default=0)
    end = max(row.sent, len(row.text) - hold)
    delta, row.sent = row.text[row.sent:end], end
    return delta


def _new_logprobs(row: _Row) -> list[TokenLogprob]:
    """The row's logprob entries not yet streamed (none where it asked for none)."""
    if not row.logprobs or row.lp_sent == len(row.logprobs):
        return []
    new, row.lp_sent = row.logprobs[row.lp_sent:], len(row.logprobs)
    return new


def cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword: `cache` in transformers >= 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model: nn.Module) -> dict:
    """Ask for the last position's logits only where the model supports it: the prompt
    pass then skips the LM head over every other position (a vocab x hidden matmul per
    prompt token, ~10% of a 300M model's prefill with a 32k vocabulary)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _spare(cache):
    """A prompt pass's cache moved into layers with spare room (no copy per decode step),
    where the cache is plain full attention and transformers has cache layers; else as is."""
    kv = _layers(cache)
    if kv is None or _layer_kind() is not _SpareLayers:
        return cache
    return _SpareLayers.cache([_SpareLayers.assemble([part], part[0].shape[2]) for part in kv])


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    params: SamplingParams | list[SamplingParams],
    on_text: Callable[[int, str, list[TokenLogprob], list | None], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> list[Completion]:
    """Decode a batch. `on_text(row, delta, logprobs, prompt_logprobs)` streams text as it
    becomes final (with the logprob entries of the tokens since the last call and the
    prompt's, where the row asks for them);
    `cancelled(row)` lets a caller drop a row (its client went away)."""
    n = len(prompts)
    plist = params if isinstance(params, list) else [params] * n
    ids = prompt_ids or [_prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    rows = [_new_row(p, x) for p, x in zip(plist, ids)]
    for r in rows:
        if r.params.max_new_tokens <= 0:
            r.done = "length"
    eos_id = stop_ids(model, tokenizer)
    cache_kw, extra = cache_argument(model), _last_logits_only(model)
    echo = any(r.params.prompt_logprobs is not None for r in rows)
    past, step_ids = None, input_ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    while not all(r.done for r in rows):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_kw: past}, **({} if echo and past is None else extra))
        if echo and past is None:
            for i, r in enumerate(rows):
                if r.params.prompt_logprobs is not None:
                    r.prompt_logprobs = _prompt_logprobs(out.logits[i], ids[i], width, r.params.prompt_logprobs)
        new = getattr(out, cache_kw, None)
        past = _spare(new) if past is None else new
        logits = out.logits[:, -1, :]
        for i, r in enumerate(rows):
            if not r.done and cancelled is not None and cancelled(i):
                r.done = "cancelled"
        toks = _pick_rows(logits, rows, eos_id)
        nxt = []
        for i, r in enumerate(rows):
            if toks[i] is None:
                nxt.append(pad)
                continue
            tok = toks[i]
            _check_stop(r, eos_id, tok, tokenizer)
            nxt.append(tok)
            if on_text is not None:
                delta = _streamable(r)
                if delta or r.done:
                    on_text(i, delta, _new_logprobs(r), r.prompt_logprobs)
        step_ids = torch.tensor(nxt, dtype=torch.long)[:, None]
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    return [r.completion() for r in rows]


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


# ---- continuous batching ---------------------------------------------------------------
# A DecodeBatch is a set of rows decoding together on ONE model, where rows join between
# steps and leave the moment they finish. Its KV cache is kept as per-layer (keys,
# values) [rows, heads, length, head_dim], left-padded, with a [rows, length] attention
# mask, in cache layers with spare room (transplant_core.kvcache: a decode step writes its
# column in place): a joining row is prefilled on its own (with the others that joined in
# the same round), then its cache is left-padded to the batch's length (or the batch's
# to its) and stacked below; a leaving row's slice is dropped, and columns that only
# padding still occupies are trimmed. Positions come from each row's own token count,
# so a row computes what it would alone, up to padding (masked, never attended to).


@dataclass
class Event:
    """What one row did in one call: new streamable text (with the logprob entries of its
    tokens since the last event, where the row asks for them), and its completion if it ended."""
    key: object
    delta: str
    completion: Completion | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list | None = None


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a transformers cache, or None where the cache is not
    plain full attention (sliding windows, quantised, ...): those cannot be spliced."""
    if cache is None or type(cache).__name__ != "DynamicCache":     # subclasses hold more state (MiniMax's
        return None                                                  # linear attention, ...): not ours to move
    if hasattr(cache, "layers"):                 # transformers >= 4.56
        if any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in cache.layers):
            return None
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):              # older transformers
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def _cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv) if "ddp_cache_data" in inspect.signature(DynamicCache).parameters \
        else DynamicCache.from_legacy_cache(tuple(kv))


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _kv(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer if isinstance(layer, tuple) else (layer.keys, layer.values)


class _CatLayers:
    """Transformers < 4.56 (no cache layers): (keys, values) tensors, grown by the model's
    own concatenation, spliced by concatenation."""

    @staticmethod
    def assemble(parts, length):
        return (torch.cat([_left_pad(k, length, 2) for k, _ in parts]),
                torch.cat([_left_pad(v, length, 2) for _, v in parts]))

    @staticmethod
    def select(layer, rows, start):
        sel = torch.tensor(rows)
        return tuple(t.index_select(0, sel)[:, :, start:].contiguous() for t in layer)

    @staticmethod
    def current(cache, layers):
        return _layers(cache)          # the model's steps replaced the tensors

    @staticmethod
    def cache(layers):
        return _cache(layers)


class _SpareLayers:
    """Cache layers with spare room (transplant_core.kvcache): no copy per decode step."""

    @staticmethod
    def assemble(parts, length):
        from .kvcache import SpareLayer

        return SpareLayer.assemble(parts, length)

    @staticmethod
    def select(layer, rows, start):
        return layer.select(rows, start)

    @staticmethod
    def current(cache, layers):
        return layers                  # grown in place

    @staticmethod
    def cache(layers):
        from .kvcache import cache

        return cache(layers)


def _layer_kind():
    try:
        from transformers.cache_utils import DynamicLayer  # noqa: F401  (transformers >= 4.56)
    except ImportError:
        return _CatLayers
    return _SpareLayers


class SpliceUnsupported(Exception):
    """The model's KV cache cannot be spliced (continuous batching needs a plain cache)."""


class DecodeBatch:
    def __init__(self, model: nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.keys: list[object] = []
        self.rows: list[_Row] = []
        self.layers: list | None = None        # per model layer: its cache layer (see _SpareLayers)
        self.cache = None                      # the transformers cache object over self.layers
        self.mask: torch.Tensor | None = None  # [rows, length]
        self.pos: torch.Tensor | None = None   # [rows, 1]: position of each row's next input token
        self.last: torch.Tensor | None = None  # [rows]: each row's next input token
        self._cache_kw, self._extra = cache_argument(model), _last_logits_only(model)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._eos = stop_ids(model, tokenizer)
        self._kind = _layer_kind()

    def __len__(self) -> int:
        return len(self.rows)

    def _emit(self, i: int, r: _Row, tok: int) -> Event:
        _check_stop(r, self._eos, tok, self.tokenizer)
        delta = _streamable(r)
        return Event(self.keys[i] if i < len(self.keys) else None, delta, r.completion() if r.done else None,
                     _new_logprobs(r), r.prompt_logprobs)

    def _sample_rows(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        return _pick_rows(logits, rows, self._eos)

    @torch.no_grad()
    def add(self, items: list[tuple[object, list[int], SamplingParams]]) -> list[Event]:
        """Prefill new rows (key, prompt ids, params) together and decode their first token;
        those that do not finish on it join the batch."""
        if not items:
            return []
        ids = [x[1] for x in items]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[self._pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(p.prompt_logprobs is not None for _, _, p in items)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: None}, **({} if echo else self._extra))
        kv = _layers(getattr(out, self._cache_kw, None))
        if kv is None:
            raise SpliceUnsupported(f"{type(self.model).__name__}'s KV cache is not a plain dynamic cache")
        rows = [_new_row(p, x) for _, x, p in items]
        for j, r in enumerate(rows):
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = _prompt_logprobs(out.logits[j], ids[j], width, r.params.prompt_logprobs)
            if r.params.max_new_tokens <= 0:
                r.done = "length"
        toks = self._sample_rows(out.logits[:, -1, :], rows)
        events, keep = [], []
        for j, ((key, _, _), r, tok) in enumerate(zip(items, rows, toks)):
            if tok is None:                          # max_new_tokens 0: the prompt only (echo)
                events.append(Event(key, "", r.completion()))
                continue
            _check_stop(r, self._eos, tok, self.tokenizer)
            delta = _streamable(r)
            events.append(Event(key, delta, r.completion() if r.done else None, _new_logprobs(r), r.prompt_logprobs))
            if not r.done:
                keep.append(j)
        if keep:
            sel = torch.tensor(keep)
            if len(keep) < len(items):
                kv = [(k.index_select(0, sel), v.index_select(0, sel)) for k, v in kv]
            self._merge([items[j][0] for j in keep], [rows[j] for j in keep], kv, mask.index_select(0, sel),
                        positions[sel, -1:] + 1, torch.tensor([toks[j] for j in keep], dtype=torch.long))
        return events

    def _merge(self, keys, rows, kv, mask, pos, last) -> None:
        """The new rows' cache `kv` (per layer) below the batch's, both left-padded to the longer."""
        if self.cache is None:
            length = mask.shape[1]
            layers = [self._kind.assemble([part], length) for part in kv]
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            layers = [self._kind.assemble([_kv(a), b], length)
                      for a, b in zip(self._kind.current(self.cache, self.layers), kv)]
            mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            pos, last = torch.cat([self.pos, pos]), torch.cat([self.last, last])
        cache = self._kind.cache(layers)         # all built before any is replaced: a failure changes nothing
        self.layers, self.cache, self.mask, self.pos, self.last = layers, cache, mask, pos, last
        self.keys, self.rows = self.keys + keys, self.rows + rows

    def remove(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices); frees the others' cache at once and trims
        columns that only padding occupies."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.keys, self.rows, self.layers, self.cache, self.mask, self.pos, self.last = [], [], None, None, None, None, None
            return
        sel = torch.tensor(keep)
        mask = self.mask.index_select(0, sel)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        layers = [self._kind.select(layer, keep, start) for layer in self._kind.current(self.cache, self.layers)]
        cache = self._kind.cache(layers)
        self.layers, self.cache = layers, cache
        self.mask, self.pos, self.last = mask[:, start:], self.pos.index_select(0, sel), self.last.index_select(0, sel)
        self.keys, self.rows = [self.keys[i] for i in keep], [self.rows[i] for i in keep]

    def cancel(self, which: Callable[[object], bool]) -> list[Event]:
        """Drop the rows whose key `which` says to; each ends as "cancelled"."""
        events, keep = [], []
        for i, (key, r) in enumerate(zip(self.keys, self.rows)):
            if which(key):
                r.done = "cancelled"
                events.append(Event(key, "", r.completion()))
            else:
                keep.append(i)
        self.remove(keep)
        return events

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One decode step for every row; rows that finish leave the batch."""
        if not self.rows:
            return []
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.pos,
                         use_cache=True, **{self._cache_kw: self.cache}, **self._extra)
        self.cache = getattr(out, self._cache_kw, None) or self.cache
        toks = self._sample_rows(out.logits[:, -1, :], self.rows)
        events, keep = [], []
        for i, (r, tok) in enumerate(zip(self.rows, toks)):
            events.append(self._emit(i, r, tok))
            if not r.done:
                keep.append(i)
        self.pos = self.pos + 1
        self.last = torch.tensor(toks, dtype=torch.long)
        self.remove(keep)
        return events
