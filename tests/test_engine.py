"""Continuous batching: rows that join and leave between decode steps compute exactly
what they compute alone, and a short request never waits for a long one."""
import time

import pytest
import torch

from server.engines import Request
from server.engines.embedded import ContinuousEngine
from server.generations import Live
from server.engines.static import Scheduler
from tiny import make_model
from transplant_core.generation import DecodeBatch, SamplingParams, SpliceUnsupported, generate

PROMPTS = ["hello", "abc", "add:1+2=", "the quick brown fox jumps", "zz", "Q", "sort:dcba=", "x y z"]


def staggered(model, tok, jobs):
    """Run (prompt, params) jobs through one DecodeBatch, a new one joining every third
    step (two at once now and then), and return their completions by index."""
    b, got, pending, step = DecodeBatch(model, tok), {}, list(range(len(jobs))), 0
    while pending or len(b):
        if pending and step % 3 == 0:
            take, pending = pending[:1 + (step % 6 == 0)], pending[1 + (step % 6 == 0):]
            events = b.add([(i, tok(jobs[i][0], add_special_tokens=False)["input_ids"], jobs[i][1]) for i in take])
        else:
            events = b.step()
        for e in events:
            if e.completion is not None:
                got[e.key] = e.completion
        step += 1
    return [got[i] for i in range(len(jobs))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_rows_joining_and_leaving_compute_what_they_compute_alone(arch, tokenizer):
    torch.manual_seed(0)
    model = make_model(arch, 0).eval()
    jobs = [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, (5, 40, 9, 30, 1, 12, 25, 3))]
    jobs += [(p, SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=7 + i))   # sampled rows too
             for i, p in enumerate(PROMPTS[:4])]
    jobs += [(PROMPTS[4], SamplingParams(max_new_tokens=15, repetition_penalty=1.4, frequency_penalty=0.5,
                                         presence_penalty=0.3, logprobs=3, prompt_logprobs=2)),      # per-row extras
             (PROMPTS[5], SamplingParams(max_new_tokens=15, temperature=1.0, top_k=5, min_p=0.05, seed=3,
                                         logit_bias=((7, 3.0),), min_tokens=4, ignore_eos=True)),
             (PROMPTS[6], SamplingParams(max_new_tokens=15, stop_token_ids=(9, 11), logprobs=0))]
    alone = [generate(model, tokenizer, [p], params)[0] for p, params in jobs]
    together = staggered(model, tokenizer, jobs)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    for a, b in zip(together, alone):                # logprobs too, up to padding's rounding
        assert (a.logprobs is None) == (b.logprobs is None) and (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for x, y in zip((a.logprobs or []) + (a.prompt_logprobs or [])[1:], (b.logprobs or []) + (b.prompt_logprobs or [])[1:]):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_a_cache_that_cannot_be_spliced_is_refused(arch, tokenizer):
    """Sliding-window cache layers (Mistral with sliding_window set, Gemma-2) cannot be
    concatenated row by row: the runtime then batches whole requests (Runtime._batching)."""
    with pytest.raises(SpliceUnsupported):
        DecodeBatch(make_model(arch, 0).eval(), tokenizer).add([(0, [5, 6], SamplingParams(max_new_tokens=3))])


class _Gens:
    def __init__(self, model):
        self.live = Live(0, model)


def long_prompt(model, tok, n):
    """A prompt the tiny random model decodes for all n tokens without emitting EOS."""
    for p in PROMPTS + [f"{c}{c}" for c in "abcdefghijklmnop"]:
        if generate(model, tok, [p], SamplingParams(max_new_tokens=n))[0].finish_reason == "length":
            return p
    raise AssertionError("no prompt decodes to length on this model: pick another prompt list")


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_a_short_request_does_not_wait_for_a_long_one(engine, tokenizer):
    """A short request that arrives while a long one decodes: continuous batching admits it
    at the next step and it finishes long before the long one; static batching (the
    comparison) makes it wait for the whole long batch."""
    model = make_model("llama", 0).eval()
    p = long_prompt(model, tokenizer, 120)
    steps = []
    kw = dict(on_step=steps.append)
    eng = (ContinuousEngine(_Gens(model), tokenizer, 8, 16, **kw) if engine == "continuous"
           else Scheduler(_Gens(model), tokenizer, 8, 16, 0, **kw))
    eng.start()
    try:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        long = eng.submit(Request(p, ids, SamplingParams(max_new_tokens=120)))
        deadline = time.monotonic() + 60
        decoding = (lambda: len(steps) >= 3) if engine == "continuous" else (lambda: long.first_token is not None)
        while not decoding() and time.monotonic() < deadline:   # the long row is decoding
            time.sleep(0.001)
        assert decoding() and not long.done.is_set()
        short = eng.submit(Request("hello", tokenizer("hello", add_special_tokens=False)["input_ids"],
                                   SamplingParams(max_new_tokens=2)))
        short.done.wait(60)
        long_still_running = not long.done.is_set()
        long.done.wait(60)
        assert long.result.completion_tokens == 120 and long.result.finish_reason == "length"
        assert short.result is not None and short.result.completion_tokens <= 2
        if engine == "continuous":
            assert long_still_running                                # it finished first
            assert max(steps) == 2                                   # it ran beside the long row
            assert short.result.token_ids == generate(model, tokenizer, ["hello"], SamplingParams(max_new_tokens=2))[0].token_ids
        else:
            assert not long_still_running and max(steps) == 1       # it waited for the whole long batch
    finally:
        eng.stop()


def test_rows_of_two_generations_decode_side_by_side_each_on_its_own(tokenizer):
    """Requests pinned to two generations at once: two sub-batches stepped in turn, each
    row equal to its generation's model alone."""
    a, b = make_model("llama", 0).eval(), make_model("llama", 1).eval()
    eng = ContinuousEngine(_Gens(a), tokenizer, 16, 64)
    eng.start()
    try:
        reqs = []
        for i, p in enumerate(PROMPTS * 2):
            pin = Live(1, b) if i % 2 else None
            reqs.append(eng.submit(Request(p, tokenizer(p, add_special_tokens=False)["input_ids"],
                                           SamplingParams(max_new_tokens=16), pinned=pin)))
        for r in reqs:
            assert r.done.wait(60) and r.error is None
        for i, r in enumerate(reqs):
            m = b if i % 2 else a
            assert r.generation == i % 2
            assert r.result.token_ids == generate(m, tokenizer, [r.prompt], SamplingParams(max_new_tokens=16))[0].token_ids
    finally:
        eng.stop()


def _req(tok, prompt: str, n: int = 8, alive=lambda: True, **kw) -> Request:
    return Request(prompt, tok(prompt, add_special_tokens=False)["input_ids"], SamplingParams(max_new_tokens=n),
                   alive=alive, **kw)


class _Raises:
    """A client check that raises on its `after`-th call (a broken connection object)."""

    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls >= self.after:
            raise RuntimeError("the client's connection object broke")
        return True


@pytest.mark.parametrize("engine", ["continuous", "static"])
@pytest.mark.parametrize("after", [1, 4])
def test_every_request_the_loop_held_is_finished_when_a_step_fails(engine, after, tokenizer):
    """A failure while the loop holds requests (before their batch exists: after=1; in
    the cancel check between steps: after=4) finishes every one of them with the error,
    and the engine goes on serving the next request."""
    model = make_model("llama", 0).eval()
    eng = (ContinuousEngine(_Gens(model), tokenizer, 8, 16) if engine == "continuous"
           else Scheduler(_Gens(model), tokenizer, 8, 16, 0))
    eng.start()
    try:
        bad = _req(tokenizer, long_prompt(model, tokenizer, 40), 40, alive=_Raises(after))
        others = [_req(tokenizer, p, 40) for p in PROMPTS[:3]]
        for r in [bad, *others]:
            eng.submit(r)
        for r in [bad, *others]:
            assert r.done.wait(60), "a request the engine took was never finished"
        with pytest.raises(RuntimeError, match="connection object broke"):
            bad.outcome()
        after_ = eng.submit(_req(tokenizer, "hello", 4))
        assert after_.done.wait(60) and after_.error is None and after_.result.completion_tokens >= 1
        assert eng.healthy()
    finally:
        eng.stop()


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_stop_finishes_what_waits_and_a_call_is_queued_whole_or_not_at_all(engine, tokenizer):
    """The choices of one call are queued together or refused together (QueueFull, nothing
    queued); at stop, every request still waiting learns why (NotReady), none waits forever."""
    from server.engines.base import QueueFull
    from server.api.errors import NotReady

    model = make_model("llama", 0).eval()
    eng = (ContinuousEngine(_Gens(model), tokenizer, 1, 2) if engine == "continuous"
           else Scheduler(_Gens(model), tokenizer, 1, 2, 0))
    with pytest.raises(QueueFull):
        eng.submit_many([_req(tokenizer, p) for p in PROMPTS[:3]])     # 3 choices, room for 2
    assert eng.depth == 0
    waiting = eng.submit_many([_req(tokenizer, p) for p in PROMPTS[:2]])
    assert eng.depth == 2 and all(r.group is waiting[0].group for r in waiting)
    eng.stop()                                                     # never started: nothing decoded them
    for r in waiting:
        assert r.done.is_set()
        with pytest.raises(NotReady, match="stopping"):
            r.outcome()
