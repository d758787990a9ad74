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
                   on_text=lambda i, d, lp, plp: streamed.append(d))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.find(stop)]
    assert "".join(streamed) == out.text


def test_cancelled_rows_stop(tokenizer):
    model = make_model("llama", 6)
    out = generate(model, tokenizer, ["ab", "cd"], SamplingParams(max_new_tokens=20),
                   cancelled=lambda i: i == 1)
    assert out[1].finish_reason == "cancelled" and out[1].token_ids == []


def test_greedy_replies_equal_model_generate_with_bos_and_several_eos_ids(tmp_path):
    """A real-format checkpoint whose tokenizer adds BOS and whose generation_config.json
    declares two EOS ids: the prompt is tokenized as the tokenizer does (BOS first) and
    either id ends the reply, exactly as transformers' own `generate`."""
    import json as _json

    from tokenizers import Tokenizer, processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from tiny import make_model
    from transplant_core.generation import SamplingParams, generate, stop_ids
    from transplant_core.zoo.tokenizer import build_tokenizer

    zoo = build_tokenizer()
    raw = Tokenizer.from_str(zoo.backend_tokenizer.to_str())
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", zoo.bos_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    path = tmp_path / "m"
    model = make_model("llama", 3)
    prompts = ["add:12+30=", "copy:hello="]
    free = generate(model, tok, prompts, SamplingParams(max_new_tokens=12))
    other = free[0].token_ids[3]                           # a token the first reply makes at step 4
    model.generation_config.eos_token_id = [zoo.eos_token_id, other]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert _json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [zoo.eos_token_id, other]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    assert tok("abc")["input_ids"][0] == tok.bos_token_id
    assert stop_ids(model, tok) == {zoo.eos_token_id, other}
    ours = generate(model, tok, prompts, SamplingParams(max_new_tokens=12))
    for p, c in zip(prompts, ours):
        enc = tok(p, return_tensors="pt")
        assert c.prompt_tokens == enc["input_ids"].shape[1]            # BOS counted
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        while ref and ref[-1] in (zoo.eos_token_id, other, tok.pad_token_id):
            ref.pop()                                      # generate keeps the stop token; we do not
        assert c.token_ids == ref, p
    assert ours[0].finish_reason == "eos" and len(ours[0].token_ids) == 3
