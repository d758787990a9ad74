"""Training and a small greedy evaluator for the zoo's tiny Llama models (CPU)."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..generation import cache_argument
from .tasks import TASK_NAMES, task_examples, train_stream
from .tokenizer import SPECIALS, VOCAB_SIZE, vocab

_VOCAB = vocab()
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (_VOCAB[s] for s in SPECIALS)


def encode(text: str) -> list[int]:
    """Same ids as `build_tokenizer()(text)["input_ids"]` (no BOS is added), but fast."""
    return [_VOCAB.get(c, UNK_ID) for c in text]


def new_model(arch: dict, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_attention_heads"],
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def collate(pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt answer </s>`; labels only on answer + EOS (pad/prompt = -100)."""
    seqs, labs = [], []
    for p, a in pairs:
        pi, ai = encode(p), encode(a) + [EOS_ID]
        seqs.append(pi + ai)
        labs.append([-100] * len(pi) + ai)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
    return ids, labels


def mixture_batches(mixture: dict[str, float], batch_size: int, seed: int) -> Iterable[list[tuple[str, str]]]:
    """Endless batches; each example's task drawn with probability ~ its weight."""
    tasks = [t for t in TASK_NAMES if mixture.get(t, 0) > 0]
    weights = [mixture[t] for t in tasks]
    streams = {t: train_stream(t, seed) for t in tasks}
    rng = random.Random(seed * 7919 + 17)
    while True:
        yield [next(streams[t]) for t in rng.choices(tasks, weights, k=batch_size)]


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine decay to lr * min_ratio ("cosine") or flat ("constant")."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(
    model: nn.Module,
    *,
    mixture: dict[str, float],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    warmup: int = 50,
    schedule: str = "cosine",
    weight_decay: float = 0.01,
    trainable: Callable[[str], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """AdamW + warmup/cosine on the parameters `trainable(name)` accepts (all if None).

    Returns {"steps", "final_loss" (mean of the last 50 steps), "trainable_params"}."""
    torch.manual_seed(seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad and (trainable is None or trainable(n))]
    params = [p for n, p in model.named_parameters() if n in set(names)]
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(names))
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )
    model.train()
    batches = iter(mixture_batches(mixture, batch_size, seed))
    recent: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, schedule=schedule)
        ids, labels = collate(next(batches))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if on_step is not None:
            on_step(step, recent[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": steps, "final_loss": sum(recent) / max(1, len(recent)), "trainable_params": sum(p.numel() for p in params)}


@torch.no_grad()
def greedy(model: nn.Module, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 512) -> list[str]:
    """Batched greedy decoding: left padding, KV cache, position_ids = cumsum(mask) - 1,
    stops at EOS. Returns the decoded continuations (without EOS)."""
    model.eval()
    out: list[str] = []
    inv = {i: c for c, i in _VOCAB.items()}
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(p) for p in prompts[start : start + batch_size]]
        n = max(map(len, chunk))
        ids = torch.full((len(chunk), n), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in chunk]
        cache, cache_kw = None, cache_argument(model)      # `cache` in transformers >= 5.2x, `past_key_values` before
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{cache_kw: cache})
            cache = getattr(res, cache_kw)
            nxt = res.logits[:, -1].argmax(-1)
            for i in range(len(chunk)):
                if not done[i]:
                    if nxt[i].item() == EOS_ID:
                        done[i] = True
                    else:
                        gen[i].append(nxt[i].item())
            if bool(done.all()):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
        # special tokens other than the final EOS stay visible, so they never match
        out += ["".join(inv[t] for t in g) for g in gen]
    return out


def accuracy(model: nn.Module, task: str, split: str = "eval", n: int | None = None) -> float:
    """Exact-match accuracy of greedy decoding on `task_examples(task, split, n)`."""
    ex = task_examples(task, split, n)
    preds = greedy(model, [p for p, _ in ex])
    return sum(pr == a for pr, (_, a) in zip(preds, ex)) / len(ex)


def accuracy_table(model: nn.Module, split: str = "eval", n: int | None = None) -> dict[str, float]:
    return {t: round(accuracy(model, t, split, n), 4) for t in TASK_NAMES}
