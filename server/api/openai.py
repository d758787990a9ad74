"""The OpenAI-compatible API under /v1: completions, chat completions (both streamed as
server-sent events or not) and models. As thin as the gRPC servicers: parse and check
the body (server/api/openai_request.py), call the runtime, shape the reply. Errors use
OpenAI's JSON shape with the HTTP status the one error map (server/api/errors.py) gives.

Every reply names the generation that computed it: the `x-transplant-generation`
header, `generation` in the body and `system_fingerprint` ("gen-N"). All choices of one
call run on the same generation: the one `model` pins ("NAME@N"), else the generation
live when the call starts (a call that names no generation never fails because of a
swap). A stream's headers go out once the call has started, so an error before then is
a status code.
"""
from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from transplant_core.errors import InvalidArgument, NotFound

from .errors import NotReady, http_status_of, openai_error
from .openai_request import ApiError, Call, _messages, parse


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


# ---- the API ---------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class _Tagged:
    """Puts a row's (text delta, logprob entries) on the call's one queue, tagged with its
    choice index."""
    with_logprobs = True

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
            ids = prompt if isinstance(prompt, list) else None
            reqs.append(self.rt.prepare("" if ids else prompt, call.max_tokens, call.temperature, call.top_p, seed,
                                        call.stop, deadline, lambda: alive["ok"],
                                        _Tagged(q, i) if call.stream else None, messages=messages, pinned=pinned,
                                        names=names, sampling=call.sampling, prompt_ids=ids))
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
        tok, echo = self.rt.tokenizer, call.sampling.get("echo", False)
        choices = [dict(index=i, finish_reason=FINISH.get(c.finish_reason, "stop"),
                        **_spans(c, reqs[i].generation, gen),
                        **({"message": {"role": "assistant", "content": c.text},
                            "logprobs": chat_logprobs(tok, c, call.sampling.get("logprobs"))} if chat else
                           {"text": (reqs[i].prompt if echo else "") + c.text,
                            "logprobs": completion_logprobs(tok, c, reqs[i], call.sampling.get("logprobs"), echo)}))
                   for i, c in enumerate(results)]
        return Reply(200, {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                           "usage": _usage(results, call.n)}, headers=headers)

    def _events(self, call: Call, reqs, q: queue.SimpleQueue, meta: dict, alive: dict) -> Iterator[bytes]:
        """A streamed call's chunks. With logprobs, each chunk carries the entries of the
        tokens it brings (text held back for a stop sequence: on the next chunk), the
        finishing chunk the rest (the EOS that ended the row); with echo, the first
        chunk of a row is its prompt, with the prompt's logprobs."""
        obj = "chat.completion.chunk" if call.chat else "text_completion"
        tok, n_lp, echo = self.rt.tokenizer, call.sampling.get("logprobs"), call.sampling.get("echo", False)
        sent = [0] * len(reqs)                # output entries streamed per row
        offset = [0] * len(reqs)              # completions: the text offset the row's next entry has

        def logprobs(i: int, entries: list):
            if n_lp is None:
                return None
            sent[i] += len(entries)
            if call.chat:
                return chat_entries(tok, entries)
            lp, offset[i] = completion_entries(tok, output_entries(entries), offset[i])
            return lp

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False, spans=None,
                  lp=None) -> bytes:
            if call.chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish, **(spans or {}), "logprobs": lp}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp, **(spans or {})}
            return _sse({**meta, "object": obj, "choices": [choice]})

        started: set[int] = set()

        def first(i: int) -> Iterator[bytes]:
            """A row's first chunk goes out with its first token (as vLLM's server sends it),
            so a client that times the first chunk measures prefill: chat, the
            assistant-role chunk; completions with echo, the prompt (and its logprobs)."""
            if i in started:
                return
            started.add(i)
            if call.chat:
                yield chunk(i, None, role=True)
            elif echo:
                r, lp = reqs[i], None
                if n_lp is not None:
                    plps = r.prompt_logprobs if r.prompt_logprobs is not None else \
                        getattr(r.result, "prompt_logprobs", None)
                    lp, offset[i] = completion_entries(tok, list(zip(r.prompt_ids, plps or [None] * len(r.prompt_ids))))
                yield chunk(i, r.prompt, lp=lp)

        try:
            open_rows = len(reqs)
            while open_rows:
                i, item = q.get()
                if item is not None:
                    delta, entries = item
                    yield from first(i)
                    yield chunk(i, delta, lp=logprobs(i, entries))
                    continue
                open_rows -= 1
                r = reqs[i]
                try:
                    c = r.outcome()
                except Exception as e:          # noqa: BLE001 - becomes an error event, the stream ends
                    yield _sse(error_reply(e).body)
                    yield b"data: [DONE]\n\n"
                    return
                yield from first(i)
                yield chunk(i, None, FINISH.get(c.finish_reason, "stop"), spans=_spans(c, r.generation, meta["generation"]),
                            lp=logprobs(i, (c.logprobs or [])[sent[i]:]))
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


def _token_str(tok, i: int) -> str:
    return tok.decode([i])


def completion_logprobs(tok, c, req, n: int | None, echo: bool) -> dict | None:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (the top-N and
    the chosen token, as vLLM gives them) and text_offset; with echo, the prompt's tokens
    first (the first has none)."""
    if n is None:
        return None
    return completion_entries(tok, (prompt_entries(c, req) if echo else []) + output_entries(c.logprobs))[0]


def prompt_entries(c, req) -> list:
    return list(zip(req.prompt_ids, c.prompt_logprobs or [None] * len(req.prompt_ids)))


def output_entries(logprobs) -> list:
    """(token, entry) for a reply's tokens (the EOS or stop token that ended it included,
    as vLLM counts it)."""
    return [(e.token, e) for e in logprobs or []]


def completion_entries(tok, entries: list, at: int = 0) -> tuple[dict, int]:
    """Completions logprobs for (token, entry or None) pairs whose text starts at offset
    `at`; and the offset after them (a stream's next chunk goes on from there)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, e in entries:
        s = _token_str(tok, token)
        out["tokens"].append(s)
        out["text_offset"].append(at)
        at += len(s)
        out["token_logprobs"].append(None if e is None else e.logprob)
        if e is None:
            out["top_logprobs"].append(None)
            continue
        top = {_token_str(tok, t): lp for t, lp in e.top}
        top.setdefault(s, e.logprob)
        out["top_logprobs"].append(top)
    return out, at


def chat_logprobs(tok, c, n: int | None) -> dict | None:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if n is None:
        return None
    return chat_entries(tok, c.logprobs)


def chat_entries(tok, logprobs) -> dict:
    def one(t: int, lp: float) -> dict:
        s = _token_str(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "surrogatepass"))}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                        for e in logprobs or []]}


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
