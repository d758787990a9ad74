"""The OpenAI-compatible API through the official `openai` client over real HTTP, and
its gRPC parity: chat, streaming, pinning, every bad input."""
import json
import threading
import time
import urllib.request

import grpc
import openai
import pytest
import torch

from serverkit import A, I, Clients, config, start
from tiny import make_model, save
from transplant_core.generation import SamplingParams, generate

PROMPT = "hello"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("oai")
    save(make_model("llama", 0), root / "target")
    save(make_model("llama", 1), root / "donors" / "other")
    plain = save(make_model("llama", 2), root / "plain")            # a model without a chat template
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    return root


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oai-state")
    s = start(config(tmp, models / "target", [models / "donors"], watch_donor_roots=False, servable_generations=2,
                     max_new_tokens_limit=128))
    c = Clients(s.grpc_port, s.token)
    c.admin("RegisterDonor", A.RegisterDonorRequest(name="other", path=str(models / "donors" / "other")))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="unused", max_retries=0)
    yield s, c, client
    c.close()
    s.stop(2)


def alone(s, prompt, n, gen=None):
    """What a generation computes for `prompt` on its own, greedy."""
    rt = s.runtime
    model = (rt.gens.live if gen is None else rt.gens.servable(gen)).model
    return generate(model, rt.tokenizer, [prompt], SamplingParams(max_new_tokens=n))[0]


def test_completions_match_grpc_and_name_the_generation(served):
    s, c, client = served
    g = c.generate(PROMPT, 12)
    raw = client.completions.with_raw_response.create(model="target", prompt=PROMPT, max_tokens=12, temperature=0)
    r = raw.parse()
    live = s.runtime.gens.live.id
    assert raw.headers["x-transplant-generation"] == str(live) and r.model_extra["generation"] == live
    assert r.system_fingerprint == f"gen-{live}" and r.object == "text_completion" and r.model == "target"
    assert r.choices[0].text == g.text == alone(s, PROMPT, 12).text
    # usage as vLLM counts it: the EOS that ended the reply is one of its tokens (gRPC counts text tokens)
    eos = g.finish_reason == I.FINISH_REASON_EOS
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == g.completion_tokens + eos
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if g.completion_tokens == 12 else "stop")


def test_streamed_completions_and_chat_equal_the_unstreamed(served):
    s, c, client = served
    want = client.completions.create(model="target", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="target", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.choices[0].text
    assert chunks[-2].choices[0].finish_reason == want.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert all(ch.model_extra["generation"] == s.runtime.gens.live.id for ch in chunks)
    # the zoo-style chat template renders one user message as the plain prompt
    msgs = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="target", messages=msgs, max_tokens=20, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want.choices[0].text
    parts = list(client.chat.completions.create(model="target", messages=msgs, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want.choices[0].text
    assert [p.choices[0].delta.role for p in parts].count("assistant") == 1
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_n_seed_stop_and_text_parts(served):
    s, c, client = served
    kw = dict(model="target", prompt="abc", max_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and [x.index for x in a.choices] == [0, 1, 2]
    assert len({x.text for x in a.choices}) > 1                      # choice i samples with seed + i
    assert a.usage.prompt_tokens == 3                                # the prompt counted once
    text = alone(s, "abc", 16).text
    stop = text[3:5]
    r = client.completions.create(model="target", prompt="abc", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]
    chat = client.chat.completions.create(model="target", messages=[{"role": "user", "content": parts}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == text


def test_pinning_on_both_apis_and_models_list(served, models):
    s, c, client = served
    before = alone(s, PROMPT, 12).text
    base = s.runtime.gens.live.id
    t = c.admin("Transplant", A.TransplantRequest(donor="other", modules=["layers.*"])).generation.id
    after = alone(s, PROMPT, 12, t).text
    assert before != after
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "target" and f"target@{base}" in ids and f"target@{t}" in ids
    assert client.models.retrieve(f"target@{base}").model_extra["generation"] == base
    pinned = client.completions.create(model=f"target@{base}", prompt=PROMPT, max_tokens=12, temperature=0)
    live = client.completions.create(model="target", prompt=PROMPT, max_tokens=12, temperature=0)
    assert (pinned.choices[0].text, pinned.model_extra["generation"]) == (before, base)
    assert (live.choices[0].text, live.model_extra["generation"]) == (after, t)
    g = c.inference.Generate(I.GenerateRequest(prompt=PROMPT, max_new_tokens=12, model=f"target@{base}"), timeout=60)
    assert (g.text, g.generation) == (before, base)
    g = c.inference.Generate(I.GenerateRequest(prompt=PROMPT, max_new_tokens=12, generation=base), timeout=60)
    assert (g.text, g.generation) == (before, base)
    chat = c.inference.Generate(I.GenerateRequest(messages=[I.ChatMessage(role="user", content=PROMPT)],
                                                  max_new_tokens=12, model="target"), timeout=60)
    assert (chat.text, chat.generation) == (after, t)
    # servable_generations=2: two more swaps push `base` out; pinning it is then a clear 404
    for _ in range(2):
        c.admin("Revert", A.RevertRequest())
    with pytest.raises(openai.NotFoundError, match=f"generation {base} is no longer servable"):
        client.completions.create(model=f"target@{base}", prompt=PROMPT, max_tokens=4)
    with pytest.raises(grpc.RpcError) as e:
        c.inference.Generate(I.GenerateRequest(prompt=PROMPT, model=f"target@{base}"), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no longer servable" in e.value.details()


def post(port, path, body: bytes, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


J = lambda **kw: json.dumps({"model": "target", **kw}).encode()       # noqa: E731


@pytest.mark.parametrize("body, status, words, param", [
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", "body"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "not served here", "model"),
    (J(model="target@99", prompt="x"), 404, "generation 99 does not exist", "model"),
    (J(model="target@x", prompt="x"), 400, "NAME@N", "model"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model is required", "model"),
    (J(prompt=""), 400, "prompt is empty", "prompt"),
    (J(prompt=[1.5]), 400, "a list of token ids", "prompt"),
    (J(prompt=[10 ** 9]), 400, "token ids must be in", "prompt"),
    (J(prompt=[[1], "x"]), 400, "a list of lists of token ids", "prompt"),
    (J(prompt="x", max_tokens=-1), 400, "max_tokens", "max_tokens"),
    (J(prompt="x", max_tokens=100000), 400, "max_tokens must be in 1..128", "max_tokens"),
    (J(prompt="x" * 100, max_tokens=60), 400, "plus max_tokens (60) exceed the model's maximum context length of "
                                              "128 tokens: ask for at most 28", "max_tokens"),
    (J(prompt="x" * 130, max_tokens=4), 400, "prompt has 130 tokens, more than the model's maximum context "
                                             "length of 128", "prompt"),
    (b'{"model": "target", "prompt": "x", "temperature": NaN}', 400, "temperature", "temperature"),
    (J(prompt="x", temperature=3), 400, "in [0, 2]", "temperature"),
    (b'{"model": "target", "prompt": "x", "top_p": Infinity}', 400, "top_p", "top_p"),
    (J(prompt="x", n=0), 400, "n must be", "n"),
    (J(prompt="x", seed=-1), 400, "seed", "seed"),
    (J(prompt="x", best_of=2), 400, "not supported by this server: best_of=2", "best_of"),
    (J(prompt="x", frobnicate=1, tools=[{}], suffix="s"), 400,
     "unrecognized request argument(s): frobnicate; not supported by this server: suffix='s', tools=[{}]", "frobnicate"),
    (J(prompt="x", logprobs=21), 400, "logprobs must be an integer in [0, 20]", "logprobs"),
    (J(prompt="x", top_logprobs=2), 400, "top_logprobs is a chat parameter", "top_logprobs"),
    (J(prompt="x", echo=1), 400, "echo must be true or false", "echo"),
    (J(prompt="x", max_tokens=0), 400, "max_tokens must be an integer in [1,", "max_tokens"),
    (J(prompt="x", repetition_penalty=0), 400, "repetition_penalty must be in (0, 2]", "repetition_penalty"),
    (J(prompt="x", presence_penalty=3), 400, "presence_penalty must be a number in [-2, 2]", "presence_penalty"),
    (J(prompt="x", top_k=-2), 400, "top_k", "top_k"),
    (J(prompt="x", min_p=1.5), 400, "min_p", "min_p"),
    (J(prompt="x", logit_bias={"a": 1}), 400, "expected a token id and a bias", "logit_bias"),
    (J(prompt="x", logit_bias={"100000": 1}), 400, "100000 is not a token id of this model", "logit_bias"),
    (J(prompt="x", stop_token_ids=[-1]), 400, "stop_token_ids must be a list", "stop_token_ids"),
    (J(prompt="x", stop_token_ids=[10 ** 6]), 400, "is not a token id of this model", "stop_token_ids"),
    (J(prompt="x", min_tokens=9, max_tokens=4), 400, "min_tokens (9) exceeds the reply's maximum of 4", "min_tokens"),
    (J(prompt="x", ignore_eos="yes"), 400, "ignore_eos must be true or false", "ignore_eos"),
    (b'{"model": "target", "prompt": "add:\\ud800="}', 400, "lone surrogate", "prompt"),
    (b'{"model": "target", "prompt": ["ok", "\\udfff"]}', 400, "lone surrogate", "prompt"),
    (b'{"model": "target", "prompt": "x", "stop": ["\\ud800"]}', 400, "lone surrogate", "stop"),
    (J(prompt="x", stop=[""]), 400, "stop sequences", "stop"),
    (J(prompt="x", stop=["a"] * 9), 400, "stop sequences", "stop"),
])
def test_bad_completions_get_openai_errors_and_change_nothing(served, body, status, words, param):
    s, c, client = served
    live = s.runtime.gens.live.id
    code, doc = post(s.http_port, "/v1/completions", body)
    assert code == status and words in doc["error"]["message"], doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["param"] == param, doc
    assert "max_new_tokens" not in doc["error"]["message"]            # this API's names only
    if status == 404:
        assert doc["error"]["code"] == "model_not_found"
    assert s.runtime.gens.live.id == live
    assert client.completions.create(model="target", prompt="x", max_tokens=2, temperature=0).choices


def test_every_domain_error_has_an_http_status():
    """ABORTED (a fleet conflict: another record won the log's head) is a 409, not a 500."""
    from server.api.errors import STATUS, http_status_of
    from server.fleet.log import Conflict

    assert http_status_of(Conflict("another record won")) == 409
    assert all(http_status_of(cls("x")) != 500 for cls in STATUS)


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"),
    ([{"role": "tool", "content": "x"}], "role 'tool' is not one of system, user, assistant"),
    ([{"role": "user", "content": ""}], "all empty"),
    ([{"role": "user", "content": 5}], "content must be text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": "add:\ud800="}], "messages[0].content is not valid Unicode: a lone surrogate"),
    ([{"role": "user", "content": "x" * 200}], "more than the model's maximum context length of 128"),
])
def test_bad_chat_messages(served, messages, words):
    s, _, _ = served
    code, doc = post(s.http_port, "/v1/chat/completions", json.dumps({"model": "target", "messages": messages}).encode())
    assert code == 400 and words in doc["error"]["message"], doc
    assert doc["error"]["param"] == "messages", doc


def test_body_limit_is_413_and_unknown_routes_404(served):
    s, _, client = served
    code, doc = post(s.http_port, "/v1/completions", b'{"model": "target", "prompt": "' + b"x" * (1 << 20) + b'"}')
    assert code == 413 and "limit" in doc["error"]["message"]
    code, doc = post(s.http_port, "/alerts", b"x" * (50 << 20), {"Authorization": f"Bearer {s.token}"})
    assert code == 413 and f"limit is {1 << 20}" in doc["error"]     # 50 MB: read away, answered, not reset
    code, doc = post(s.http_port, "/v1/embeddings", b"{}")
    assert code == 404
    assert client.completions.create(model="target", prompt="x", max_tokens=2).choices


def test_no_chat_template_is_a_400_that_says_so(models, tmp_path):
    s = start(config(tmp_path, models / "plain", [models / "donors"], watch_donor_roots=False))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model="plain", prompt="hi", max_tokens=3).choices
    finally:
        s.stop(2)


def test_key_queue_deadline_and_loading(models, tmp_path):
    """401 without the inference key (gRPC too), 429 when the queue is full, 504 past the
    deadline, 503 while the model loads."""
    from server.app import Server
    from server.config import load_config

    key = tmp_path / "key"
    key.write_text("k" * 32)
    s = start(config(tmp_path, models / "target", [models / "donors"], watch_donor_roots=False,
                     inference_key_file=str(key), max_queue=1, max_batch_size=1, max_new_tokens_limit=256))
    base = f"http://127.0.0.1:{s.http_port}/v1"
    try:
        with pytest.raises(openai.AuthenticationError, match="inference API key is wrong"):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        code, doc = post(s.http_port, "/v1/completions", b"{}")
        assert code == 401 and "needs an inference API key" in doc["error"]["message"]
        c = Clients(s.grpc_port, s.token)
        with pytest.raises(grpc.RpcError) as e:
            c.generate(PROMPT, 2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = c.inference.Generate(I.GenerateRequest(prompt=PROMPT, max_new_tokens=2), timeout=30,
                                  metadata=[("authorization", "Bearer " + "k" * 32)])
        assert ok.completion_tokens >= 1
        c.close()
        client = openai.OpenAI(base_url=base, api_key="k" * 32, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="target", prompt="the quick brown fox", max_tokens=100, temperature=1,
                                      seed=1, extra_headers={"x-request-timeout": "0.001"})
        assert e.value.status_code == 504
        codes, lock = [], threading.Lock()

        def one():
            try:
                client.completions.create(model="target", prompt="the quick brown fox", max_tokens=100,
                                          temperature=1.0, seed=3)
                code = 200
            except openai.APIStatusError as err:
                code = err.status_code
            with lock:
                codes.append(code)
        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    finally:
        s.stop(2)
    loading = Server(load_config(None, **config(tmp_path / "l", models / "target", [models / "donors"],
                                                watch_donor_roots=False))).listen()
    try:
        code, doc = post(loading.http_port, "/v1/completions", json.dumps({"model": "target", "prompt": "x"}).encode())
        assert code == 503 and "loading" in doc["error"]["message"]
    finally:
        loading.grpc.stop(0)
        loading.http.stop()


def test_draining_is_503_while_running_calls_finish(models, tmp_path):
    """On stop the server drains: a call that was running completes, a new one gets 503."""
    from test_engine import long_prompt

    s = start(config(tmp_path, models / "target", [models / "donors"], watch_donor_roots=False,
                     max_new_tokens_limit=256))
    p = long_prompt(s.runtime.gens.live.model, s.runtime.tokenizer, 100)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="x", max_retries=0)
    got = {}
    running = threading.Thread(target=lambda: got.update(r=client.completions.create(
        model="target", prompt=p, max_tokens=100, temperature=0)))
    running.start()
    while s.runtime.scheduler.idle():
        time.sleep(0.001)
    stopper = threading.Thread(target=s.stop, args=(30,))
    stopper.start()
    try:
        while s.runtime.serving:
            time.sleep(0.001)
        code, doc = post(s.http_port, "/v1/completions", json.dumps({"model": "target", "prompt": "x"}).encode())
        assert code == 503 and "draining" in doc["error"]["message"]
    finally:
        running.join(60)
        stopper.join(60)
    assert got["r"].choices[0].finish_reason == "length" and got["r"].usage.completion_tokens == 100


def test_role_chunk_goes_out_with_the_first_token(served):
    """A client that times the first chunk measures prefill: the assistant-role chunk is
    not sent before the request has produced its first token. The engine's first delivery
    is held until the client has a chunk (or 3 s pass): a role chunk sent early arrives
    while it is held."""
    s, _, client = served
    got_chunk, order = threading.Event(), []
    orig = s.runtime.scheduler._deliver

    def held(events):
        if not order:
            order.append("chunk before any token" if got_chunk.wait(3) else "token first")
        return orig(events)

    s.runtime.scheduler._deliver = held
    try:
        stream = client.chat.completions.create(model="target", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=8, temperature=0, stream=True)
        first = next(iter(stream))
        got_chunk.set()
        list(stream)
    finally:
        del s.runtime.scheduler._deliver
    assert first.choices[0].delta.role == "assistant" and order == ["token first"], order


def test_tokenize_detokenize_and_version_as_vllm_has_them(served):
    s, _, _ = served
    code, doc = post(s.http_port, "/tokenize", json.dumps({"model": "target", "prompt": "add:1+2="}).encode())
    want = s.runtime.tokenizer("add:1+2=")["input_ids"]
    assert code == 200 and doc == {"count": len(want), "max_model_len": 128, "tokens": want, "token_strs": None}
    code, chat = post(s.http_port, "/tokenize", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    assert code == 200 and chat["tokens"] == s.runtime.tokenizer(
        s.runtime.render_chat([{"role": "user", "content": "hi"}]))["input_ids"]
    code, doc = post(s.http_port, "/detokenize", json.dumps({"model": "target", "tokens": want}).encode())
    assert code == 200 and doc == {"prompt": s.runtime.tokenizer.decode(want)}
    for path, body, param in [("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"prompt": "x", "frob": 1}, "frob"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens"), ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/tokenize", {"model": "nope", "prompt": "x"}, "model")]:
        code, doc = post(s.http_port, path, json.dumps(body).encode())
        assert code in (400, 404) and doc["error"]["param"] == param, (path, body, doc)
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/version", timeout=10) as r:
        assert json.loads(r.read())["version"]


def _forward_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_logprobs_and_echo_equal_a_direct_forward_pass(served):
    """Completions logprobs=N with echo (what loglikelihood evaluation sends) and chat
    logprobs/top_logprobs: every token's logprob and its top-N equal the model's own
    log-softmax over one teacher-forced forward pass."""
    s, _, client = served
    rt, model = s.runtime, s.runtime.gens.live.model
    want = alone(s, PROMPT, 6)
    ids = rt.tokenizer(PROMPT)["input_ids"] + want.token_ids + ([want.stop_token] if want.stop_token is not None else [])
    lp = _forward_logprobs(model, ids)
    r = client.completions.create(model="target", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    ch, got = r.choices[0], r.choices[0].logprobs
    assert ch.text == PROMPT + want.text
    assert got.tokens == [rt.tokenizer.decode([t]) for t in ids] and got.token_logprobs[0] is None
    assert got.text_offset == [sum(len(x) for x in got.tokens[:i]) for i in range(len(ids))]
    for t in range(1, len(ids)):
        assert got.token_logprobs[t] == pytest.approx(float(lp[t - 1, ids[t]]), abs=1e-4), t
        top = torch.topk(lp[t - 1], 3)
        assert all(got.top_logprobs[t][rt.tokenizer.decode([i])] == pytest.approx(float(v), abs=1e-4)
                   for i, v in zip(top.indices.tolist(), top.values.tolist()))
    # usage counts the EOS too; without echo the logprobs are the reply's alone
    plain = client.completions.create(model="target", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    n_prompt = len(rt.tokenizer(PROMPT)["input_ids"])
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(got.token_logprobs[n_prompt:], abs=1e-5)
    assert plain.usage.completion_tokens == len(ids) - n_prompt
    # echo with max_tokens 0: the prompt's logprobs only
    only = client.completions.create(model="target", prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == PROMPT and only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [float(lp[t - 1, ids[t]]) for t in range(1, n_prompt)], abs=1e-4)
    # chat
    msgs = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="target", messages=msgs, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    text = rt.render_chat(msgs)
    reply = generate(model, rt.tokenizer, [text], SamplingParams(max_new_tokens=6))[0]
    full = rt.tokenizer(text)["input_ids"] + reply.token_ids + ([reply.stop_token] if reply.stop_token is not None else [])
    lp, start = _forward_logprobs(model, full), len(full) - len(reply.token_ids) - (reply.stop_token is not None)
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == [rt.tokenizer.decode([t]) for t in full[start:]]
    for t, e in enumerate(content):
        assert e.logprob == pytest.approx(float(lp[start + t - 1, full[start + t]]), abs=1e-4)
        top = torch.topk(lp[start + t - 1], 2)
        assert [x.token for x in e.top_logprobs] == [rt.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert bytes(e.bytes).decode() == e.token


def test_streamed_logprobs_arrive_with_their_tokens(served):
    """Streamed with logprobs, each chunk carries the entries of the tokens it brings, in
    order, and all the chunks together equal the unstreamed reply's logprobs (the EOS on
    the finishing chunk); with echo, the row's first chunk is the prompt with its
    logprobs; a stop sequence's held-back text keeps its tokens' entries for later."""
    s, _, client = served
    kw = dict(model="target", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})         # 8 tokens: more than a stop sequence holds back
    for extra in ({}, {"echo": True}, {"stop": ["zzzz"]}):
        whole = client.completions.create(**kw, **extra).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(**kw, **extra, stream=True)]
        lps = [c.logprobs for c in chunks if c.logprobs is not None]
        assert "".join(c.text for c in chunks) == whole.text, extra
        assert sum((x.tokens for x in lps), []) == whole.logprobs.tokens, extra
        assert sum((x.token_logprobs for x in lps), []) == pytest.approx(whole.logprobs.token_logprobs,
                                                                         abs=1e-6, nan_ok=True), extra
        assert sum((x.text_offset for x in lps), []) == whole.logprobs.text_offset, extra
        assert sum((x.top_logprobs for x in lps), []) == whole.logprobs.top_logprobs, extra
        streamed_text = [c for c in chunks if c.text]
        assert len(streamed_text) > 1 and all(c.logprobs.tokens for c in streamed_text[1:]), extra
        if extra.get("echo"):
            assert chunks[0].text == PROMPT and chunks[0].logprobs.token_logprobs[0] is None
    msgs = [{"role": "user", "content": PROMPT}]
    ck = dict(model="target", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ck).choices[0].logprobs.content
    chunks = [c.choices[0] for c in client.chat.completions.create(**ck, stream=True) if c.choices]
    streamed = sum((c.logprobs.content for c in chunks if c.logprobs is not None), [])
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    assert all(c.logprobs.content for c in chunks if c.delta.content)


def _id(rt, token: str) -> int:
    return rt.tokenizer.convert_tokens_to_ids(token)


def _reference(model, tok, ids, n, rp=1.0, fp=0.0, pp=0.0, min_tokens=0, stop=(), bias=()):
    """Greedy decoding written out: vLLM's logits processors in its order, one full
    forward pass per token (no cache)."""
    from transplant_core.generation import stop_ids

    eos, out = stop_ids(model, tok), []
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([ids + out])).logits[0, -1].float().clone()
        for t, b in bias:
            x[t] += b
        if len(out) < min_tokens:
            x[list(eos | set(stop))] = float("-inf")
        for t in set(ids) | set(out):
            x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
        for t in set(out):
            x[t] -= fp * out.count(t) + pp
        t = int(x.argmax())
        if t in eos or t in stop:
            break
        out.append(t)
    return out


def test_sampling_extras_match_a_written_out_reference(served):
    """repetition/frequency/presence penalties, min_tokens, stop_token_ids, logit_bias,
    ignore_eos, top_k, min_p and token-id prompts, through the official client."""
    s, _, client = served
    rt, model = s.runtime, s.runtime.gens.live.model
    loops = "the quick brown fox"                 # greedy repeats itself here: the penalties bite
    ids = rt.tokenizer(loops)["input_ids"]
    greedy_ids = alone(s, loops, 12).token_ids

    def served_ids(prompt=loops, **kw):
        extra = {k: kw.pop(k) for k in list(kw) if k in ("repetition_penalty", "min_tokens", "stop_token_ids",
                                                         "ignore_eos", "top_k", "min_p")}
        r = client.completions.create(model="target", prompt=prompt, temperature=kw.pop("temperature", 0),
                                      extra_body=extra, logprobs=0, **kw)
        toks = [_id(rt, t) for t in r.choices[0].logprobs.tokens]
        return r, [t for t in toks]

    changed = 0
    for kw, ref in [
        (dict(repetition_penalty=2.0, max_tokens=12), dict(rp=2.0)),
        (dict(frequency_penalty=2.0, presence_penalty=1.0, max_tokens=12), dict(fp=2.0, pp=1.0)),
        (dict(repetition_penalty=1.6, frequency_penalty=1.5, max_tokens=12), dict(rp=1.6, fp=1.5)),
        (dict(min_tokens=4, stop_token_ids=[greedy_ids[0]], max_tokens=12), dict(min_tokens=4, stop=(greedy_ids[0],))),
        (dict(logit_bias={str(greedy_ids[1]): -100}, max_tokens=12), dict(bias=((greedy_ids[1], -100.0),))),
    ]:
        r, got = served_ids(**kw)
        want = _reference(model, rt.tokenizer, ids, 12, **ref)
        assert got[:len(want)] == want, (kw, got, want)
        changed += want != greedy_ids[:len(want)]
    assert changed >= 4, "the parameters must change the reply here, or the comparison shows nothing"
    r, got = served_ids(stop_token_ids=[greedy_ids[0]], max_tokens=8)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
    r, _ = served_ids(prompt="abc", ignore_eos=True, max_tokens=30)        # greedy ends at EOS after 11
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"
    for kw in (dict(top_k=1), dict(min_p=1.0)):               # sampling that can only pick the top token
        r, got = served_ids(prompt=PROMPT, temperature=1.0, seed=5, max_tokens=8, **kw)
        assert r.choices[0].text == alone(s, PROMPT, 8).text, kw
    # token ids as the prompt: the same as the text; a list of lists is one choice each
    ids = rt.tokenizer(PROMPT)["input_ids"]
    by_ids = client.completions.create(model="target", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == alone(s, PROMPT, 8).text
    two = client.completions.create(model="target", prompt=[ids, ids[:2]], max_tokens=4, temperature=0)
    assert [c.text for c in two.choices] == [alone(s, PROMPT, 4).text, alone(s, rt.tokenizer.decode(ids[:2]), 4).text]
