"""Sampling a token from logits, and turning tokens into text with stop strings: what each answer of the
scheduler's step loop (``scheduler.py``) uses between two steps."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import SamplingParams


def sample(logits: torch.Tensor, p: SamplingParams, gen: Optional[torch.Generator]) -> torch.Tensor:
    """logits [1, V] float32 -> token id [1] on the same device (no host sync here)."""
    if p.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        srt, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(srt, dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(dim=-1) - probs >= p.top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, srt)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


class TextStream:
    """Incremental detokenization with stop strings: text is released only once no stop string can
    still begin inside it, and never in the middle of a multi-byte character.

    Each step decodes only a short window (the tokens since the last complete character, plus a few
    before them as context, so tokenizers that strip a leading space decode the same text as a full
    decode): constant work per token, however long the answer."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0          # ids[prefix:read] is context already turned into text
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return "", False                  # an incomplete character (or nothing visible) so far
        self.text += now[len(before):]
        self.prefix, self.read = max(self.read - 4, 0), len(self.ids)
        text = self.text
        for s in self.stop:
            j = text.find(s, max(0, self.emitted - len(s)))
            if j >= 0:
                self.text = text[:j]
                delta = self.text[self.emitted:]
                self.emitted = len(self.text)
                return delta, True
        safe = len(text) - self.hold
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
