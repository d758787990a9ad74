"""The OpenAI-compatible API under /v1: completions, chat completions (both streamed as
server-sent events or not) and models. As thin as the gRPC servicers: parse and check
the body, call the runtime, shape the reply. Errors use OpenAI's JSON shape with the
HTTP status the one error map (server/errors.py) gives.

Every reply names the generation that computed it: the `x-transplant-generation`
header, `generation` in the body and `system_fingerprint` ("gen-N"). All choices of one
call run on the same generation: the one `model` pins ("NAME@N"), else the generation
live when the call starts (a call that names no generation never fails because of a
swap). A stream's headers go out once the call has started, so an error before then is
a status code.
"""
from __future__ import annotations

import json
import math
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from transplant_core.errors import InvalidArgument, NotFound

from .errors import NotReady, http_status_of, openai_error

MAX_CHOICES = 8          # n x prompts per call
MAX_PROMPTS = 8
# Parameters that change what OpenAI returns and that this server does not implement:
# refused unless given their neutral value, so no client silently gets something else.
NEUTRAL = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
           "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none"),
           "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "modalities": (None, ["text"])}
ACCEPTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
            "stop", "seed", "stream", "stream_options", "user", "store", "metadata"} | set(NEUTRAL)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Reply:
    status: int
    body: dict | None = None                          # JSON
    stream: Iterator[bytes] | None = None             # server-sent events
    headers: dict | None = None


# the runtime's (gRPC's) field names as this API calls them
NAMES = {"max_new_tokens": "max_tokens", "generation": "model"}


def error_reply(e: BaseException) -> Reply:
    if isinstance(e, ApiError):
        return Reply(e.status, openai_error(e.status, str(e), e.param, e.code))
    status = http_status_of(e)
    msg = str(e) if status != 500 else f"internal error: {type(e).__name__}; see the server log"
    param = getattr(e, "field", None)
    param = NAMES.get(param, param)
    code = "model_not_found" if isinstance(e, NotFound) and param == "model" else None
    return Reply(status, openai_error(status, msg, param, code))


# ---- checking a body -------------------------------------------------------------------

def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return v
    raise ApiError(400, f"stop must be a string or a list of strings, got {v!r}", "stop")


def _prompts(body: dict) -> list[str]:
    v = body.get("prompt")
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        if len(v) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(v)}", "prompt")
        return v
    raise ApiError(400, "prompt must be a string or a non-empty list of strings (token id arrays are not "
                        "supported)", "prompt")


def _messages(body: dict) -> list[dict]:
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):          # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        out.append({"role": m.get("role"), "content": content})
    return out


@dataclass
class Call:
    chat: bool
    model: str
    prompts: list[str]                  # completions
    messages: list[dict]                # chat
    max_tokens: int
    max_tokens_name: str                # the field it came from (chat: max_completion_tokens or max_tokens)
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse(body, chat: bool) -> Call:
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", "body")
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "model is required: the served model's name, or NAME@N for generation N (GET /v1/models)",
                       "model")
    max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 31) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens, 1, 1 << 31) or 0
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise ApiError(400, "stream_options may only hold include_usage", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    prompts = [] if chat else _prompts(body)
    if n * max(1, len(prompts)) > MAX_CHOICES:
        raise ApiError(400, f"n x prompts may be at most {MAX_CHOICES}", "n")
    name = "max_completion_tokens" if chat and body.get("max_tokens") is None and \
        body.get("max_completion_tokens") is not None else "max_tokens"
    return Call(chat, body["model"], prompts, _messages(body) if chat else [], max_tokens, name,
                _number(body, "temperature", 1.0, 0.0, 2.0), _number(body, "top_p", 1.0, 0.0, 1.0), n,
                _stop(body), _integer(body, "seed", None, 0, (1 << 63) - 1), bool(body.get("stream", False)),
                bool((opts or {}).get("include_usage", False)))


# ---- the API ---------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class _Tagged:
    """Puts a row's text deltas on the call's one queue, tagged with its choice index."""

    def __init__(self, q: queue.SimpleQueue, index: int):
        self.q, self.index = q, index

    def put(self, delta) -> None:
        self.q.put((self.index, delta))


class OpenAIApi:
    def __init__(self, runtime, timeout_s: float = 600.0):
        self.rt = runtime
        self.timeout_s = timeout_s

    def _ready(self) -> None:
        if not self.rt.ready.is_set():
            raise NotReady("the server is loading its model; retry shortly")
        if not self.rt.serving:
            raise NotReady("the server is draining or not serving; retry on another replica")

    def models(self, model_id: str | None = None) -> Reply:
        self._ready()
        name, live = self.rt.cfg.model_name, self.rt.gens.live.id
        data = [{"id": name, "object": "model", "created": int(self.rt.started), "owned_by": "transplant",
                 "generation": live, "live": True}]
        data += [{"id": f"{name}@{g}", "object": "model", "created": int(self.rt.gens.records[g].created),
                  "owned_by": "transplant", "generation": g, "live": g == live}
                 for g in self.rt.gens.servable_ids()]
        if model_id is None:
            return Reply(200, {"object": "list", "data": data})
        for d in data:
            if d["id"] == model_id:
                return Reply(200, d)
        raise ApiError(404, f"model {model_id!r} is not served here (GET /v1/models lists what is)", "model",
                       "model_not_found")

    def version(self) -> Reply:
        """GET /version, as vLLM's server answers it."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("transplant")
        except PackageNotFoundError:
            v = "unknown"
        return Reply(200, {"version": v})

    def tokenize(self, body) -> Reply:
        """POST /tokenize {"model", "prompt" | "messages", "add_special_tokens"}: the prompt's
        token ids as the server's tokenizer makes them (chat: as the template renders the
        messages), in vLLM's shape."""
        self._ready()
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", "body")
        unknown = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
        if unknown:
            raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
        if body.get("model") is not None:
            self.rt.pin(body["model"])
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise ApiError(400, "add_special_tokens must be true or false", "add_special_tokens")
        if "messages" in body:
            text, field = self.rt.render_chat(_messages(body)), "messages"
        elif isinstance(body.get("prompt"), str):
            text, field = body["prompt"], "prompt"
        else:
            raise ApiError(400, "give prompt (a string) or messages", "prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{field} is not valid Unicode: a lone surrogate at character {e.start}", field)
        ids = self.rt.tokenizer(text, add_special_tokens=special)["input_ids"]
        return Reply(200, {"count": len(ids), "max_model_len": self.rt.scheduler.context_limit(), "tokens": ids,
                           "token_strs": None})

    def detokenize(self, body) -> Reply:
        """POST /detokenize {"model", "tokens": [int, ...]}: the text, in vLLM's shape."""
        self._ready()
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", "body")
        if body.get("model") is not None:
            self.rt.pin(body["model"])
        ids, vocab = body.get("tokens"), len(self.rt.tokenizer)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens must be a list of token ids (integers)", "tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is not a token id of this model (0..{vocab - 1})", "tokens")
        return Reply(200, {"prompt": self.rt.tokenizer.decode(ids)})

    def create(self, body, chat: bool, timeout_s: float | None = None) -> Reply:
        """POST /v1/completions (chat=False) or /v1/chat/completions (chat=True)."""
        self._ready()
        call = parse(body, chat)
        pinned = self.rt.pin(call.model)          # None: whatever is live when the call starts
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        q: queue.SimpleQueue = queue.SimpleQueue()
        alive = {"ok": True}
        sources = [(p, None) for p in call.prompts] if not chat else [("", call.messages)]
        names = dict(NAMES, max_new_tokens=call.max_tokens_name, **({"prompt": "messages"} if chat else {}))
        reqs = []
        for i in range(len(sources) * call.n):          # every row checked before any is queued
            prompt, messages = sources[i // call.n]
            seed = None if call.seed is None else call.seed + i % call.n
            reqs.append(self.rt.prepare(prompt, call.max_tokens, call.temperature, call.top_p, seed, call.stop,
                                        deadline, lambda: alive["ok"], _Tagged(q, i) if call.stream else None,
                                        messages=messages, pinned=pinned, names=names))
        self.rt.submit(reqs)                       # the rows start together, on one generation
        try:
            first = reqs[0]
            if call.stream:
                first.admitted.wait(max(0.0, deadline - time.monotonic()))
            else:
                for r in reqs:
                    r.done.wait(max(0.0, deadline - time.monotonic()) + 5)
            if first.generation is None:          # refused before it started: a status code
                first.outcome()
                raise TimeoutError("the call did not start before its deadline")
        except BaseException:
            alive["ok"] = False
            raise
        gen = first.generation
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.rt.cfg.model_name, "system_fingerprint": f"gen-{gen}", "generation": gen}
        headers = {"x-transplant-generation": str(gen)}
        if call.stream:
            return Reply(200, stream=self._events(call, reqs, q, meta, alive), headers=headers)
        try:
            results = [r.outcome() for r in reqs]
        finally:
            alive["ok"] = False           # a row that failed: the others stop too
        choices = [dict(index=i, finish_reason=FINISH.get(c.finish_reason, "stop"),
                        **_spans(c, reqs[i].generation, gen),
                        **({"message": {"role": "assistant", "content": c.text}} if chat else
                           {"text": c.text, "logprobs": None}))
                   for i, c in enumerate(results)]
        return Reply(200, {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                           "usage": _usage(results, call.n)}, headers=headers)

    def _events(self, call: Call, reqs, q: queue.SimpleQueue, meta: dict, alive: dict) -> Iterator[bytes]:
        obj = "chat.completion.chunk" if call.chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False, spans=None) -> bytes:
            if call.chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish, **(spans or {})}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None, **(spans or {})}
            return _sse({**meta, "object": obj, "choices": [choice]})

        roled: set[int] = set()

        def role(i: int) -> Iterator[bytes]:
            """Chat: the assistant-role chunk goes out with a row's first token (as vLLM's
            server sends it), so a client that times the first chunk measures prefill."""
            if call.chat and i not in roled:
                roled.add(i)
                yield chunk(i, None, role=True)

        try:
            open_rows = len(reqs)
            while open_rows:
                i, delta = q.get()
                if delta is not None:
                    yield from role(i)
                    yield chunk(i, delta)
                    continue
                open_rows -= 1
                r = reqs[i]
                try:
                    c = r.outcome()
                except Exception as e:          # noqa: BLE001 - becomes an error event, the stream ends
                    yield _sse(error_reply(e).body)
                    yield b"data: [DONE]\n\n"
                    return
                yield from role(i)
                yield chunk(i, None, FINISH.get(c.finish_reason, "stop"), spans=_spans(c, r.generation, meta["generation"]))
            if call.include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage([r.result for r in reqs], call.n)})
            yield b"data: [DONE]\n\n"
        finally:
            alive["ok"] = False      # the client left (or we are done): rows still running are cancelled


def _spans(c, gen: int | None = None, label: int | None = None) -> dict:
    """A choice that another generation than the reply's `label` computed (in part, or
    wholly: `gen`) says which tokens each sampled."""
    if c.spans:
        return {"generation_spans": [{"generation": g, "start": a, "end": b} for g, a, b in c.spans]}
    if gen is not None and gen != label:
        return {"generation_spans": [{"generation": gen, "start": 0, "end": c.completion_tokens}]}
    return {}


def _usage(results, n: int) -> dict:
    """As vLLM counts: each prompt once, and the EOS token that ended a reply is one of its tokens."""
    prompt = sum(results[j].prompt_tokens for j in range(0, len(results), n))
    completion = sum(c.completion_tokens + (c.finish_reason == "eos") for c in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def check_key(headers, key: str | None, check_bearer: Callable) -> None:
    if key is None:
        return
    verdict = check_bearer(headers.get("Authorization"), key)
    if verdict == "missing":
        raise ApiError(401, "this server needs an inference API key: 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    if verdict is not None:
        raise ApiError(401, "the inference API key is wrong", code="invalid_api_key")


__all__ = ["ApiError", "OpenAIApi", "Reply", "error_reply", "check_key", "InvalidArgument"]
