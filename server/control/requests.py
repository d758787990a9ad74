"""The one validation of a generate request, for gRPC and /v1 alike.

Owns: what a prompt (or its token ids, or chat messages rendered with the model's chat
template), a reply length, sampling parameters and a pin to a generation may be, and
the errors that say which field is wrong, named as the caller's API names it. Nothing
here queues anything: the runtime submits what this returns."""
from __future__ import annotations

import math

from transplant_core.errors import InvalidArgument, NotFound
from transplant_core.generation import SamplingParams

from ..engines import Request

MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 8, 64
CHAT_ROLES = ("system", "user", "assistant")


def _check_text(text: str, what: str, field: str) -> None:
    """Text a client sent must be Unicode that UTF-8 can hold: JSON lets a lone surrogate
    through ("\\ud800"), and the tokenizer would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at "
                              f"character {e.start}", field=field) from None


class Requests:
    """Validation against one server's model: its tokenizer, its configuration limits,
    its engine's context and its servable generations."""

    def __init__(self, cfg, tokenizer, gens, engine):
        self.cfg, self.tokenizer, self.gens, self.engine = cfg, tokenizer, gens, engine
        self.on_prompt = lambda ids: None      # drift (opt-in) keeps recent prompts' token ids, in memory

    def prepare(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop: list[str], deadline: float | None = None, alive=lambda: True, stream=None,
                messages: list[dict] | None = None, model: str = "", generation: int | None = None,
                pinned=None, names: dict | None = None, group=None, sampling: dict | None = None,
                prompt_ids: list[int] | None = None) -> Request:
        """The one validation of a generate request, for gRPC and /v1 alike: a prompt (or
        its token ids), or chat messages rendered with the model's chat template; pinned by
        `model` "NAME@N" or `generation`, or to `pinned` (a generations.Live); None: the
        generation live when it starts. `sampling`: SamplingParams' extras (checked for
        their form by the API; token ids here). `max_new_tokens` None: the default; 0 only
        with prompt logprobs (echo). Errors name the field as the caller's API calls it
        (`names` maps gRPC's names to the API's: {"max_new_tokens": "max_tokens"}).
        Nothing is queued."""
        cfg = self.cfg
        name = (names or {}).get

        def bad(msg: str, f: str):
            return InvalidArgument(msg.replace("{f}", name(f, f)), field=name(f, f))

        pinned = pinned or self.pin(model, generation)
        sampling = {k: v for k, v in (sampling or {}).items() if k != "echo"}
        vocab = len(self.tokenizer)
        if prompt_ids is not None:
            if messages or prompt:
                raise bad("give one of a prompt, its token ids or chat messages", "prompt")
            if not prompt_ids or not all(0 <= t < vocab for t in prompt_ids):
                raise bad(f"{{f}}: token ids must be in 0..{vocab - 1}", "prompt")
            prompt = self.tokenizer.decode(prompt_ids)
        elif messages:
            if prompt:
                raise bad("give a prompt or chat messages, not both", "prompt")
            for i, m in enumerate(messages):
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    _check_text(m["content"], f"messages[{i}].content", name("messages", "messages"))
            prompt = self.render_chat(messages, name("messages", "messages"))
        else:
            _check_text(prompt, name("prompt", "prompt"), name("prompt", "prompt"))
        if not prompt:
            raise bad("{f} is empty", "prompt")
        if len(prompt) > cfg.max_prompt_chars:
            raise bad(f"{{f}} has {len(prompt)} characters; the limit is {cfg.max_prompt_chars}", "prompt")
        n = cfg.default_max_new_tokens if max_new_tokens is None or (
            max_new_tokens == 0 and sampling.get("prompt_logprobs", None) is None) else max_new_tokens
        echo_only = n == 0 and "prompt_logprobs" in sampling
        if not echo_only and not 1 <= n <= (cfg.max_new_tokens_limit or n):    # no cap: the context decides
            raise bad(f"{{f}} must be in 1..{cfg.max_new_tokens_limit}, got {max_new_tokens}", "max_new_tokens")
        # vLLM's range and OpenAI's: one range on every engine and API
        if isinstance(temperature, bool) or not math.isfinite(temperature) or not 0 <= temperature <= 2:
            raise bad(f"{{f}} must be in [0, 2] (0 = greedy), got {temperature}", "temperature")
        if not math.isfinite(top_p) or not 0 <= top_p <= 1:
            raise bad(f"{{f}} must be in [0, 1] (0 or 1 = disabled), got {top_p}", "top_p")
        if len(stop) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise bad(f"at most {MAX_STOP_SEQUENCES} {{f}} sequences of 1..{MAX_STOP_CHARS} characters", "stop")
        for s in stop:
            _check_text(s, name("stop", "stop"), name("stop", "stop"))
        for f in ("stop_token_ids", "logit_bias"):
            bad_ids = [t for t in (t[0] if isinstance(t, tuple) else t for t in (sampling.get(f) or ()))
                       if not 0 <= t < vocab]
            if bad_ids:
                raise bad(f"{{f}}: {bad_ids[0]} is not a token id of this model (0..{vocab - 1})", f)
        if sampling.get("min_tokens", 0) > n:
            raise bad(f"{{f}} ({sampling['min_tokens']}) exceeds the reply's maximum of {n} tokens", "min_tokens")
        # as the tokenizer makes them (BOS where expected)
        ids = list(prompt_ids) if prompt_ids is not None else self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise bad("{f} has no tokens", "prompt")
        limit = self.engine.context_limit()
        if limit is not None and not max_new_tokens and len(ids) < limit:
            n = min(n, limit - len(ids))           # the default: what the context leaves room for
        if limit is not None and len(ids) + n > limit:
            which = "messages" if messages else "prompt"
            if len(ids) >= limit:
                raise bad(f"{{f}} has {len(ids)} tokens, more than the model's maximum context length of {limit} "
                          "tokens (prompt and reply together)", which)
            raise bad(f"the prompt ({len(ids)} tokens) plus {{f}} ({n}) exceed the model's maximum context length "
                      f"of {limit} tokens: ask for at most {limit - len(ids)}", "max_new_tokens")
        params = SamplingParams(n, float(temperature), float(top_p) if top_p > 0 else 1.0, seed, tuple(stop),
                                **sampling)
        self.on_prompt(ids)
        return Request(prompt, ids, params, deadline, alive, stream, pinned=pinned, group=group)

    def pin(self, model: str = "", generation: int | None = None, field: str = "model"):
        """The generation a request names: `model` is "" or the served name (the live
        generation) or "NAME@N"; `generation` pins by number. None: the live one."""
        name, at, num = (model or "").rpartition("@") if "@" in (model or "") else (model or "", "", "")
        if name and name != self.cfg.model_name:
            raise NotFound(f"model {name!r} is not served here; this server serves {self.cfg.model_name!r} "
                           f"(pin a generation with {self.cfg.model_name}@N)", field=field)
        if at:
            if not num.isdigit():
                raise InvalidArgument(f"model {model!r}: expected NAME@N with N a generation number", field=field)
            if generation is not None and generation != int(num):
                raise InvalidArgument(f"model {model!r} and generation {generation} disagree", field=field)
            generation = int(num)
        if generation is None:
            return None
        try:
            return self.gens.servable(generation)
        except NotFound as e:
            raise NotFound(str(e), field=field if at else "generation") from None

    def render_chat(self, messages: list[dict], field: str = "messages") -> str:
        """Chat messages as the model's own chat template renders them for a reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.cfg.model_name!r} has no chat template (chat_template in its "
                                  "tokenizer_config.json); send a plain prompt (/v1/completions) instead", field=field)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise InvalidArgument(f"messages[{i}]: role {role!r} is not one of {', '.join(CHAT_ROLES)}",
                                      field=field)
            if not isinstance(m.get("content"), str):
                raise InvalidArgument(f"messages[{i}]: content must be text", field=field)
        if not any(m["content"] for m in messages):
            raise InvalidArgument("messages are all empty", field=field)
        try:
            return self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                      tokenize=False, add_generation_prompt=True)
        except Exception as e:        # noqa: BLE001 - a template may raise on input it does not accept
            raise InvalidArgument(f"the model's chat template refused these messages: {e}", field=field) from None
