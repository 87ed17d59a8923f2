"""Request bodies -> what the engine takes. Unknown fields are ignored; a field we read but cannot honour
(n > 1, tools, images, logprobs) is refused with OpenAI's error shape and the field's name."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Union

from ..config import ConfigError, SamplingParams
from ..messages import MessageError, Turn, conversation
from .errors import ApiError, invalid, unsupported

MAX_STOP = 4              # OpenAI's limit on stop sequences
# Nesting a request body may have: OpenAI's bodies nest under 10 levels (a content part's image_url is 5), tool
# schemas some more; far past that a body can only exhaust the stack of the parser or of what reads it.
MAX_DEPTH = 64


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Turn, ...]          # normalised by messages.py's rule
    params: SamplingParams
    stream: bool
    include_usage: bool
    routed_experts: bool = False        # return_routed_experts: the answer carries its routing (vLLM's fields)


@dataclass(frozen=True)
class CompletionRequest:
    prompt: Union[str, tuple[int, ...]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    routed_experts: bool = False


def parse_json(raw: bytes) -> dict:
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")
    too_deep = ApiError(400, f"The JSON body of your request is nested more than {MAX_DEPTH} levels deep; "
                             f"requests to this server need far fewer.", code="invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except RecursionError:          # deeper than the interpreter's stack: the parser gave up
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). Send a JSON object with "
                            f"`Content-Type: application/json`.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not a JSON {type(body).__name__}.",
                       code="invalid_json")
    if _depth(body) > MAX_DEPTH:    # parsed, but deep enough to exhaust the stack of whatever reads it next
        raise too_deep
    return body


def _depth(value: object) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if items is None:
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in items if isinstance(x, (dict, list)))
    return deepest


# ---- fields -------------------------------------------------------------------------------------
def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(f"'{name}' must be a number, not {json.dumps(v)[:40]}.", name)
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo:g} and {hi:g}, not {v:g}.", name)
    return float(v)


def _int(body: dict, name: str, lo: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"'{name}' must be a whole number, not {json.dumps(v)[:40]}.", name)
    if lo is not None and v < lo:
        raise invalid(f"'{name}' must be at least {lo}, not {v}.", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be true or false, not {json.dumps(v)[:40]}.", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings.", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' takes at most {MAX_STOP} sequences, not {len(stops)}.", "stop")
    return tuple(s for s in stops if s)


def _refuse_unsupported(body: dict) -> None:
    n = _int(body, "n", lo=1)
    if n is not None and n > 1:
        raise unsupported(f"n = {n} is not supported: this server generates one answer per request (n = 1); "
                          f"send {n} requests instead.", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(f"'{name}' is not supported: this model has no tool or function calling.", name,
                              code="unsupported_parameter")
    choice = body.get("tool_choice", body.get("function_call"))
    if choice not in (None, "none", "auto"):
        raise unsupported("'tool_choice' is not supported: this model has no tool or function calling.",
                          "tool_choice", code="unsupported_parameter")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise unsupported("log probabilities are not supported by this server.", "logprobs",
                          code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise unsupported("'response_format' other than {\"type\": \"text\"} is not supported: JSON mode needs "
                          "constrained decoding, which this server does not do.", "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise unsupported(f"'{name}' is not supported by this server; leave it out or set it to 0.", name)
    if body.get("logit_bias"):
        raise unsupported("'logit_bias' is not supported by this server.", "logit_bias",
                          code="unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("only text output is supported: set 'modalities' to [\"text\"] or leave it out.",
                          "modalities")


def _sampling(body: dict, default_max_tokens: int) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    name = "max_completion_tokens" if _present(body, "max_completion_tokens") else "max_tokens"
    max_tokens = _int(body, name, lo=1)
    seed = _int(body, "seed")
    if seed is not None and not -2**63 <= seed < 2**63:
        raise invalid(f"'seed' must fit in 64 bits, not {seed}.", "seed")
    try:
        # top_p -> 0 keeps only the most likely token: greedy, without an empty nucleus.
        return SamplingParams(max_new_tokens=max_tokens or default_max_tokens, temperature=temperature,
                              top_p=top_p or 1.0, greedy=temperature == 0 or top_p == 0, stop=_stop(body),
                              seed=seed)
    except ConfigError as exc:
        raise invalid(str(exc)) from None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("'stream_options' must be an object such as {\"include_usage\": true}.", "stream_options")
    return stream, stream and bool(opts and opts.get("include_usage") is True)


# ---- chat ---------------------------------------------------------------------------------------
def _messages(body: dict) -> tuple[Turn, ...]:
    """The conversation by the one rule (messages.py), its refusals in OpenAI's shape with the field's name."""
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("'messages' is required: a list of {\"role\", \"content\"} objects.", "messages",
                      code="missing_required_parameter")
    try:
        return tuple(conversation(msgs))
    except MessageError as exc:
        msg = str(exc)
        msg = msg[:1].upper() + msg[1:]
        if exc.unsupported:
            raise unsupported(msg, exc.where or "messages") from None
        raise invalid(msg, exc.where) from None


def parse_chat(body: dict, default_max_tokens: int) -> ChatRequest:
    messages = _messages(body)
    _refuse_unsupported(body)
    stream, include_usage = _stream(body)
    return ChatRequest(messages, _sampling(body, default_max_tokens), stream, include_usage,
                       _bool(body, "return_routed_experts"))


# ---- completions --------------------------------------------------------------------------------
def _prompt(body: dict) -> Union[str, tuple[int, ...]]:
    p = body.get("prompt")
    if p is None:
        raise invalid("'prompt' is required: a string (or a list of token ids).", "prompt",
                      code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                        # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return tuple(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise unsupported(f"a batch of {len(p)} prompts is not supported: send one prompt per request.", "prompt")
    raise invalid("'prompt' must be a string, or a list of token ids.", "prompt")


def parse_completion(body: dict, default_max_tokens: int) -> CompletionRequest:
    prompt = _prompt(body)
    _refuse_unsupported(body)
    if body.get("echo"):
        raise unsupported("'echo' is not supported by this server.", "echo", code="unsupported_parameter")
    if body.get("suffix"):
        raise unsupported("'suffix' (fill-in-the-middle) is not supported by this model.", "suffix",
                          code="unsupported_parameter")
    best_of = _int(body, "best_of", lo=1)
    if best_of is not None and best_of > 1:
        raise unsupported(f"best_of = {best_of} is not supported: one answer is generated per request.", "best_of")
    stream, include_usage = _stream(body)
    return CompletionRequest(prompt, _sampling(body, default_max_tokens), stream, include_usage,
                             _bool(body, "return_routed_experts"))
