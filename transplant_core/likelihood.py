"""Quality from likelihoods: how a model scores a task's reference answers (teacher-forced),
and how far a changed model's next-token distributions moved from its parent's.

For each example, one forward pass over the prompt's tokens as generation makes them
(with the BOS token where the tokenizer adds one), then the answer's tokens (encoded on
their own, no special tokens) and the end of the reply (the tokenizer's EOS):
- answer NLL: minus the mean log-probability of the answer's tokens, in nats per token
  (lower is better; 0 = the model is sure of every token);
- KL(parent || model): at each answer position, sum_v p_parent(v) (log p_parent(v) -
  log p_model(v)), averaged over the positions: how far the change moved the next-token
  distribution where the answer is written. It needs no label: the positions are only
  where to look, and any text in their place works.
Rows are batched with right padding under an attention mask (a causal model's logits at
a row's own positions do not see its padding); log-softmax in float32."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import Task


@dataclass
class AnswerScores:
    nll: list[float]                 # per example, nats per answer token
    kl: list[float] | None = None    # per example, KL(parent || model) per answer position (with a parent)
    tokens: int = 0                  # answer tokens scored, all examples
    top: list | None = None          # per example, per answer position: {token: logprob} (an engine's top-N)


def _rows(tokenizer, task: Task) -> list[tuple[list[int], int]]:
    """(prompt + answer + EOS token ids, where the answer starts) per example."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for e in task.examples:
        prompt = tokenizer(e.prompt)["input_ids"]
        answer = tokenizer(e.answer, add_special_tokens=False)["input_ids"] + eos
        out.append((prompt + answer, len(prompt)))
    return out


@torch.no_grad()
def _answer_logprobs(model, rows: list[tuple[list[int], int]], pad: int) -> list[torch.Tensor]:
    """Per row, log-softmax [answer tokens, vocab] at the positions that predict them."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], dtype=torch.long)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return [torch.log_softmax(logits[i, start - 1:len(ids) - 1].float(), dim=-1) for i, (ids, start) in enumerate(rows)]


def answer_scores(model, tokenizer, task: Task, parent=None, batch_size: int = 16) -> AnswerScores:
    """The answer NLL of every example under `model` and, with `parent`, the KL from the
    parent's next-token distributions to the model's at the answer positions."""
    rows = _rows(tokenizer, task)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, kl, tokens = [], [] if parent is not None else None, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        mine = _answer_logprobs(model, chunk, pad)
        theirs = _answer_logprobs(parent, chunk, pad) if parent is not None else None
        for j, ((ids, start), lp) in enumerate(zip(chunk, mine)):
            answer = torch.tensor(ids[start:], dtype=torch.long)
            if not len(answer):                  # an empty answer and no EOS: nothing to score
                nll.append(0.0)
                if theirs is not None:
                    kl.append(0.0)
                continue
            nll.append(float(-lp.gather(1, answer[:, None]).mean()))
            tokens += len(answer)
            if theirs is not None:
                q = theirs[j]
                kl.append(float((q.exp() * (q - lp)).sum(-1).mean()))
    return AnswerScores(nll, kl, tokens)


@torch.no_grad()
def prompt_kl(model, parent, prompts: list[list[int]], pad: int = 0, batch_size: int = 16) -> list[float]:
    """Per prompt (token ids), KL(parent || model) of the next-token distribution at each
    of its positions (the last one: the reply's first token), averaged over them. Needs no
    answer and no label: drift on whatever text is given."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [p for p in prompts[i:i + batch_size] if p]
        if not chunk:
            continue
        width = max(len(p) for p in chunk)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in chunk], dtype=torch.long)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], dtype=torch.long)
        mine = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        theirs = torch.log_softmax(parent(input_ids=ids, attention_mask=mask).logits.float(), -1)
        per = (theirs.exp() * (theirs - mine)).sum(-1)                  # [rows, positions]
        out += [float(per[j, :len(p)].mean()) for j, p in enumerate(chunk)]
    return out
