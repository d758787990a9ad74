"""The body of a /v1 completions or chat completions call: what is accepted, checked
field by field (OpenAI's names, vLLM's ranges) and parsed into a Call; what is not
becomes an ApiError (OpenAI's JSON shape, an HTTP status). See server/api/openai.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_CHOICES = 8          # n x prompts per call
MAX_PROMPTS = 8
MAX_LOGPROBS = 20       # vLLM's default max_logprobs
# Parameters that change what OpenAI returns and that this server does not implement:
# refused unless given their neutral value, so no client silently gets something else
# (best_of > 1: as vLLM's v1 engine, which dropped it).
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
           "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "modalities": (None, ["text"])}
# OpenAI's sampling parameters, and vLLM's extras where OpenAI has none (vLLM's names and ranges)
SAMPLING = {"logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "top_k", "min_p", "min_tokens", "ignore_eos", "stop_token_ids"}
ACCEPTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
            "stop", "seed", "stream", "stream_options", "user", "store", "metadata"} | set(NEUTRAL) | SAMPLING


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


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


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(body: dict) -> list:
    """A string, a list of strings, token ids (a list of ints) or a list of such lists."""
    v = body.get("prompt")
    if isinstance(v, str) or _is_ids(v):
        return [v]
    if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(_is_ids(p) for p in v)):
        if len(v) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(v)}", "prompt")
        return v
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                        "token ids", "prompt")


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {v!r}", name)
    return v


def _sampling(body: dict, chat: bool) -> dict:
    """The SamplingParams fields beyond OpenAI's basic ones, checked (vLLM's ranges)."""
    out: dict = {}
    if chat:
        if _flag(body, "logprobs"):
            out["logprobs"] = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        elif body.get("top_logprobs") not in (None, 0):
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if "echo" in body:
            raise ApiError(400, "echo is a completions parameter (POST /v1/completions)", "echo")
    else:
        if "top_logprobs" in body:
            raise ApiError(400, "top_logprobs is a chat parameter; completions take logprobs: N", "top_logprobs")
        lp = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        if lp is not None:
            out["logprobs"] = lp
        if _flag(body, "echo"):
            out["prompt_logprobs"] = lp           # None: the prompt's text only
            out["echo"] = True
    for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                         ("min_p", 0.0, 1.0)):
        v = _number(body, name, 0.0, lo, hi)
        if v:
            out[name] = v
    rp = _number(body, "repetition_penalty", 1.0, 0.0, 2.0)
    if rp <= 0:
        raise ApiError(400, f"repetition_penalty must be in (0, 2], got {rp:g}", "repetition_penalty")
    if rp != 1.0:
        out["repetition_penalty"] = rp
    k = _integer(body, "top_k", 0, -1, 1 << 20)
    if k > 0:
        out["top_k"] = k
    mt = _integer(body, "min_tokens", 0, 0, 1 << 31)
    if mt:
        out["min_tokens"] = mt
    if _flag(body, "ignore_eos"):
        out["ignore_eos"] = True
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
                and len(ids) <= 64):
            raise ApiError(400, "stop_token_ids must be a list of up to 64 token ids", "stop_token_ids")
        if ids:
            out["stop_token_ids"] = tuple(ids)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 300:
            raise ApiError(400, "logit_bias must be an object of up to 300 {token id: bias}", "logit_bias")
        pairs = []
        for key, v in bias.items():
            if not str(key).isdigit() or isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or not -100 <= v <= 100:
                raise ApiError(400, f"logit_bias: {key!r}: {v!r}: expected a token id and a bias in [-100, 100]",
                               "logit_bias")
            pairs.append((int(key), float(v)))
        if pairs:
            out["logit_bias"] = tuple(sorted(pairs))
    return out


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
    sampling: dict                      # SamplingParams extras (logprobs, penalties, ...), and "echo"
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
    unsupported = [f"{name}={body[name]!r}" for name, neutral in NEUTRAL.items()
                   if name in body and body[name] not in neutral]
    if unknown or unsupported:                      # every one named, in one reply
        why = ([f"unrecognized request argument(s): {', '.join(unknown)}"] if unknown else []) + (
            [f"not supported by this server: {', '.join(unsupported)}"] if unsupported else [])
        raise ApiError(400, "; ".join(why), (unknown or [u.split("=")[0] for u in unsupported])[0])
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "model is required: the served model's name, or NAME@N for generation N (GET /v1/models)",
                       "model")
    sampling = _sampling(body, chat)
    least = 0 if sampling.get("echo") else 1         # echo with max_tokens 0: the prompt's logprobs only
    max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 31) if chat else None
    max_tokens = _integer(body, "max_tokens", max_tokens, least, 1 << 31)
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
    return Call(chat, body["model"], prompts, _messages(body) if chat else [], max_tokens, name, sampling,
                _number(body, "temperature", 1.0, 0.0, 2.0), _number(body, "top_p", 1.0, 0.0, 1.0), n,
                _stop(body), _integer(body, "seed", None, 0, (1 << 63) - 1), bool(body.get("stream", False)),
                bool((opts or {}).get("include_usage", False)))
