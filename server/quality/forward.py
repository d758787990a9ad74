"""What a probe runs on: the forward path that serves the generation it measures.

ModelForward: the generation's own model object (the embedded engine serves with it):
accuracy from batched greedy decoding, likelihoods from its logits, exact.

EngineForward: the engine that holds the weights (vLLM: the runtime has no copy of the
model): greedy replies are requests to it, and likelihoods come from its prompt
logprobs (`echo`): the reference answer's log-probabilities are exact; the KL from the
parent is computed from the top-N distributions both sides report (vLLM gives at most
`max_logprobs`, 20 by default) with everything else merged into one "other" outcome:
that is the KL between the two distributions coarse-grained the same way, a lower bound
of the full KL (coarse-graining never increases it), equal to it where the top-N hold
nearly all the mass. The parent's top-N come from its latest measurement (kept in
memory, never journaled).

Requests through `EngineForward` pass the engine's gate like any other and must all run
on the generation being measured (a swap in between fails the measurement); with
`direct` (a candidate installed for the guard while the gate is shut) they bypass it."""
from __future__ import annotations

import math

from transplant_core.errors import NotFound, PreconditionFailed
from transplant_core.evaluate import EvalResult, evaluate
from transplant_core.generation import SamplingParams
from transplant_core.likelihood import AnswerScores, _rows, answer_scores
from transplant_core.tasks import Task, score

TOP = 20        # vLLM's default max_logprobs


class ModelForward:
    def __init__(self, model, gen: int | None = None):
        self.model, self.gen = model, gen

    def accuracy(self, tokenizer, task: Task, max_new_tokens: int) -> EvalResult:
        return evaluate(self.model, tokenizer, task, max_new_tokens)

    def scores(self, tokenizer, task: Task, parent, parent_top=None) -> AnswerScores:
        return answer_scores(self.model, tokenizer, task, parent=parent.model if parent is not None else None)


class EngineForward:
    def __init__(self, engine, gen: int | None, direct: bool = False, top: int = TOP):
        self.engine, self.gen, self.direct, self.top = engine, gen, direct, top

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list:
        out = []
        for r in self.engine.run_all(prompts, params, self.direct):
            try:
                c = r.outcome()
            except NotFound as e:           # pinned to a generation that stopped being live meanwhile
                raise PreconditionFailed(f"generation {self.gen} stopped being live while it was being probed; "
                                         "measured again on the next probe") from e
            if self.gen is not None and not self.direct and (r.generation != self.gen or c.spans):
                raise PreconditionFailed(f"generation {r.generation} went live while generation {self.gen} was "
                                         "being probed; measured again on the next probe")
            out.append(c)
        return out

    def accuracy(self, tokenizer, task: Task, max_new_tokens: int) -> EvalResult:
        ids = [tokenizer(p)["input_ids"] for p in task.prompts]
        outs = self._run(ids, SamplingParams(max_new_tokens=max_new_tokens))
        correct = [score(o.text, e.answer, e.scorer) for o, e in zip(outs, task.examples)]
        return EvalResult(task.name, correct, [o.text for o in outs])

    def scores(self, tokenizer, task: Task, parent, parent_top=None) -> AnswerScores:
        """Answer NLL from the engine's prompt logprobs; with the parent's top-N
        (`parent_top`, from its latest measurement) the coarse-grained KL (a lower bound)."""
        rows = _rows(tokenizer, task)
        outs = self._run([ids for ids, _ in rows], SamplingParams(max_new_tokens=0, prompt_logprobs=self.top))
        nll, tops, tokens = [], [], 0
        for (ids, start), o in zip(rows, outs):
            entries = (o.prompt_logprobs or [])[start:len(ids)]
            tops.append([{**dict(e.top), e.token: e.logprob} for e in entries])
            nll.append(-sum(e.logprob for e in entries) / len(entries) if entries else 0.0)
            tokens += len(entries)
        kl = None
        if parent_top is not None and len(parent_top) == len(tops):
            kl = [sum(coarse_kl(p, q) for p, q in zip(ps, qs)) / len(qs) if qs else 0.0
                  for ps, qs in zip(parent_top, tops)]
        return AnswerScores(nll, kl, tokens, top=tops)


def coarse_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) over the tokens both top-N lists name, plus one outcome for all the rest:
    a lower bound of the full KL (p and q: {token: logprob})."""
    both = [t for t in p if t in q]
    kl, p_in, q_in = 0.0, 0.0, 0.0
    for t in both:
        lp, lq = p[t], q[t]
        kl += math.exp(lp) * (lp - lq)
        p_in += math.exp(lp)
        q_in += math.exp(lq)
    # the pooled rest: float32 rounding of ~20 probabilities is ~1e-6, which bounds the rest from below
    p_rest, q_rest = max(1.0 - p_in, 0.0), max(1.0 - q_in, 1e-6)
    if p_rest > 1e-6:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)
