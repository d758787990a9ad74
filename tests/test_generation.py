"""The decode loop: equals HF generate on greedy, honours seeds, budgets and stop sequences."""
import torch

from tiny import make_model
from transplant_core.generation import SamplingParams, generate, greedy


def test_greedy_matches_transformers_generate(tokenizer):
    model = make_model("llama", 3)
    prompts = ["abc", "hello world", "x"]
    ours = greedy(model, tokenizer, prompts, 10)
    for p, c in zip(prompts, ours):
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        want = ref[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in want:
            want = want[:want.index(tokenizer.eos_token_id)]
        assert c.token_ids == want


def test_batched_equals_alone(tokenizer):
    model = make_model("llama", 4)
    prompts = ["a", "a much longer prompt here", "mid size"]
    batch = greedy(model, tokenizer, prompts, 12)
    alone = [greedy(model, tokenizer, [p], 12)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]


def test_sampling_is_seeded_and_budgets_are_per_row(tokenizer):
    model = make_model("llama", 5)
    ps = [SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=11),
          SamplingParams(max_new_tokens=3, temperature=1.0, seed=12)]
    a = generate(model, tokenizer, ["abc", "abc"], ps)
    b = generate(model, tokenizer, ["abc", "abc"], ps)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len(a[1].token_ids) <= 3
    c = generate(model, tokenizer, ["abc"], [SamplingParams(max_new_tokens=6, temperature=1.0, seed=99)])
    assert c[0].finish_reason in ("eos", "length", "stop")


def test_stop_sequence_trims_and_streams_consistently(tokenizer):
    model = make_model("llama", 6)
    full = greedy(model, tokenizer, ["hello"], 12)[0].text
    assert len(full) >= 4
    stop = full[2:4]
    streamed = []
    out = generate(model, tokenizer, ["hello"], SamplingParams(max_new_tokens=12, stop=(stop,)),
                   on_text=lambda i, d: streamed.append(d))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.find(stop)]
    assert "".join(streamed) == out.text


def test_cancelled_rows_stop(tokenizer):
    model = make_model("llama", 6)
    out = generate(model, tokenizer, ["ab", "cd"], SamplingParams(max_new_tokens=20),
                   cancelled=lambda i: i == 1)
    assert out[1].finish_reason == "cancelled" and out[1].token_ids == []
