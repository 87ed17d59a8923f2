"""Prefill, then one token at a time: sampling, stop handling and the stream of token events."""
from __future__ import annotations

import threading
import time
from typing import Iterator, Optional, Sequence

import torch

from .config import SamplingParams
from .events import TokenEvent
from .model import MoEModel
from .stats import Stats


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


def generate(model: MoEModel, tokenizer, ids: list[int], start: int, params: SamplingParams,
             eos_ids: set[int], stats: Stats, cancel: Optional[threading.Event] = None,
             fed: Optional[list[int]] = None) -> Iterator[TokenEvent]:
    """Generate after ``ids`` (whose first ``start`` tokens are already in the KV cache).

    ``fed`` (if given) is extended with every token whose K/V now sit in the cache, so a caller can reuse
    them for the next turn. Each sampled token is fed through the model too (EOS included): the chat
    template of the next turn starts with exactly these tokens, and every generated token gets routed.
    """
    dev = model.device
    gen = None
    if not params.is_greedy:
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % (1 << 62)))
    t0 = time.perf_counter()
    if cancel is not None and cancel.is_set():       # stopped while it waited for the engine: no prefill
        yield TokenEvent("done", "", None, 0, 0.0, finish_reason="cancelled", prompt_tokens=len(ids))
        return
    stats.begin_answer()
    context = [len(ids)]           # tokens of context the current step needs (for the out-of-memory message)
    try:
        try:
            yield from _decode(model, tokenizer, ids, start, params, eos_ids, stats, cancel, fed, gen, t0, context)
            return
        except torch.OutOfMemoryError:
            pass           # leave the except block first: its traceback would keep the turn's tensors alive
        model.free_scratch()
        yield TokenEvent("notice", f"out of GPU memory at {context[0]} tokens of context: "
                                   f"lower --max-context or --cache-size")
        yield TokenEvent("done", "", None, 0, time.perf_counter() - t0, finish_reason="oom", prompt_tokens=len(ids))
    finally:
        stats.end_answer()


def _decode(model: MoEModel, tokenizer, ids: list[int], start: int, params: SamplingParams, eos_ids: set[int],
            stats: Stats, cancel, fed, gen, t0: float, context: list[int]) -> Iterator[TokenEvent]:
    dev = model.device
    logits = model.forward(torch.tensor(ids[start:], dtype=torch.long, device=dev), pos=start)
    if fed is not None:
        fed.extend(ids[start:])
    stats.end_prefill(len(ids) - start)
    stream = TextStream(tokenizer, params.stop)
    pos = len(ids)
    step = torch.empty(1, dtype=torch.long, device=dev)
    finish = "length"
    for i in range(params.max_new_tokens):
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        step.copy_(sample(logits, params, gen))
        tok = int(step.item())                         # the one deliberate sync per token: the host needs the id
        is_eos = tok in eos_ids
        delta, stopped = ("", False) if is_eos else stream.push(tok)
        if not is_eos:
            if i == 0:
                stats.first_token_sent()
            yield TokenEvent("token", delta, tok, i, time.perf_counter() - t0)
        if pos >= model.max_seq:
            finish = "context"
            break
        context[0] = pos + 1
        logits = model.forward(step, pos=pos)
        pos += 1
        if fed is not None:
            fed.append(tok)
        stats.end_token()
        if is_eos:
            if i == 0:
                stats.first_token_sent()
            yield TokenEvent("token", "", tok, i, time.perf_counter() - t0)
            finish = "eos"
            break
        if stopped:
            finish = "stop"
            break
    rest = stream.flush() if finish != "stop" else ""
    if rest:
        yield TokenEvent("token", rest, None, params.max_new_tokens, time.perf_counter() - t0)
    yield TokenEvent("done", "", None, 0, time.perf_counter() - t0, finish_reason=finish, prompt_tokens=len(ids))
