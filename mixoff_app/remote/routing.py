"""The routing a backend returns with an answer, in each engine's documented form, as rows of
token -> expert layer -> experts.

- vLLM 0.21 (docs/training/routed_experts_replay.md) and our /v1: ``prompt_routed_experts`` [prompt, layers, k]
  on the response and ``routed_experts`` [generated, layers, k] on the choice, JSON lists.
- vLLM after it (protocol.py's ``ChatCompletionResponseChoice.routed_experts``): one base64 ``.npy`` string on the
  choice, [prompt + generated - 1, layers, k] (the last token is never fed back), split here at the prompt.
- SGLang (docs/basic_usage/openai_api_completions: "Returning Routed Experts"): ``sgl_ext.routed_experts`` on the
  choice, base64 int32, flat, logically [prompt + generated - 1, layers, k]; the response names neither layers
  nor k, so ``top_k`` must come from elsewhere (a known model's shape), or the routing stays unread.

Nothing is guessed: a field that does not decode to whole expert ids of one shape is reported as absent, with why.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Optional

Rows = tuple[tuple[tuple[int, ...], ...], ...]


@dataclass(frozen=True)
class AnswerRouting:
    prompt: Optional[Rows] = None         # per prompt token (None: not returned)
    generated: Optional[Rows] = None      # per generated token that went through the model
    form: str = ""                        # which documented form it came in
    problem: str = ""                     # why a field that was there could not be read

    @property
    def shape(self) -> Optional[tuple[int, int]]:
        """(expert layers, top-k) of the rows, if any."""
        rows = self.generated or self.prompt
        return (len(rows[0]), len(rows[0][0])) if rows else None


def _rows(value: Any) -> Optional[Rows]:
    """Nested lists [T][L][k] of expert ids >= 0 (vLLM's -1 marks a position it could not route: kept as -1)."""
    if not isinstance(value, list):
        return None
    if not value:
        return ()
    out = []
    for tok in value:
        if not isinstance(tok, list) or not tok or len(tok) != len(value[0]):
            return None
        row = []
        for ex in tok:
            if (not isinstance(ex, list) or len(ex) != len(value[0][0]) or not ex
                    or not all(isinstance(e, int) and not isinstance(e, bool) and e >= -1 for e in ex)):
                return None
            row.append(tuple(ex))
        out.append(tuple(row))
    return tuple(out)


def _split(flat_rows: Rows, prompt_tokens: int) -> tuple[Rows, Rows]:
    return flat_rows[:prompt_tokens], flat_rows[prompt_tokens:]


def _npy_rows(text: str) -> Rows:
    import numpy as np
    arr = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    if arr.ndim != 3 or arr.dtype.kind not in "iu":
        raise ValueError(f"an array of shape {arr.shape} and type {arr.dtype}, not [tokens, layers, k] integers")
    return tuple(tuple(tuple(int(e) for e in ex) for ex in tok) for tok in arr.tolist())


def _int32_rows(text: str, tokens: int, top_k: int) -> Rows:
    import numpy as np
    flat = np.frombuffer(base64.b64decode(text, validate=True), dtype="<i4")
    if tokens < 1 or flat.size % (tokens * top_k):
        raise ValueError(f"{flat.size} expert ids do not split into {tokens} tokens of top-{top_k} per layer")
    return tuple(tuple(tuple(ex) for ex in tok) for tok in flat.reshape(tokens, -1, top_k).tolist())


def read_routing(body: dict, prompt_tokens: Optional[int], completion_tokens: Optional[int] = None,
                 top_k: Optional[int] = None) -> AnswerRouting:
    """The routing in a whole response, or in a stream's final chunk. ``prompt_tokens`` (from ``usage``) splits
    the single-array forms; SGLang's flat ids cover prompt + completion - 1 positions of ``top_k`` per layer."""
    choice = (body.get("choices") or [{}])[0]
    choice = choice if isinstance(choice, dict) else {}
    gen, prompt = choice.get("routed_experts"), body.get("prompt_routed_experts")
    sgl = (choice.get("sgl_ext") or {}).get("routed_experts") if isinstance(choice.get("sgl_ext"), dict) else None
    try:
        if isinstance(gen, list) or isinstance(prompt, list):
            g, p = _rows(gen), _rows(prompt)
            if (gen is not None and g is None) or (prompt is not None and p is None):
                return AnswerRouting(form="lists", problem="the routing lists are not [tokens][layers][k] expert ids")
            if g and p and (len(g[0]), len(g[0][0])) != (len(p[0]), len(p[0][0])):
                return AnswerRouting(form="lists", problem="the prompt's and the answer's routing differ in shape")
            return AnswerRouting(p, g, "lists")
        if isinstance(gen, str) or isinstance(sgl, str):
            if prompt_tokens is None:
                return AnswerRouting(form="one array", problem="the routing came without usage.prompt_tokens to "
                                                               "split it at the prompt")
            if isinstance(gen, str):
                p, g = _split(_npy_rows(gen), prompt_tokens)
                return AnswerRouting(p, g, "npy")
            if not top_k:
                return AnswerRouting(form="sglang", problem="SGLang returns expert ids without the layer count or "
                                                            "top-k, and this model's shape is not known here")
            if completion_tokens is None:
                return AnswerRouting(form="sglang", problem="the routing came without usage.completion_tokens")
            p, g = _split(_int32_rows(sgl, prompt_tokens + completion_tokens - 1, top_k), prompt_tokens)
            return AnswerRouting(p, g, "sglang")
    except (ValueError, binascii.Error) as exc:
        return AnswerRouting(form="encoded", problem=f"the routing did not decode: {exc}")
    return AnswerRouting()
