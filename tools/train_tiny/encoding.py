"""Chat turns as the model sees them: token ids through the tokenizer's chat template, and which tokens carry
the loss (the answers and their ``</s>``, never the question). Training, evaluation and the shipped held-out
check all tokenize through here, so a held-out loss is measured on exactly what training optimised."""
from __future__ import annotations

import random

from tools.train_tiny.corpus import Example


def chat_messages(ex: Example) -> list[dict]:
    return [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]


def encode(tok, ex: Example, context: int) -> tuple[list[int], int] | None:
    """Token ids of the whole chat turn and where the answer starts; None if it does not fit."""
    prompt = tok.apply_chat_template(chat_messages(ex)[:1], tokenize=True)["input_ids"]
    full = tok.apply_chat_template(chat_messages(ex), tokenize=True)["input_ids"]
    if full[:len(prompt)] != prompt:
        raise RuntimeError(f"chat template prefix mismatch for {ex.key}")
    if len(full) > context:
        return None
    return full, len(prompt)


def encode_all(tok, examples: list[Example], context: int) -> list[tuple[list[int], int]]:
    out = []
    for ex in examples:
        enc = encode(tok, ex, context)
        if enc is not None:
            out.append(enc)
    return out


def encode_chat(tok, turns: list[Example], context: int, labelled: str = "all"):
    """One chat of several question/answer turns: ``(ids, start, spans)``, where ``spans`` are the ``[a, b)``
    token ranges of the assistant turns (answer tokens and ``</s>``) that carry the loss (``labelled``: "all"
    or "last"), and ``start`` is where the first labelled span starts; None if it does not fit ``context``."""
    msgs: list[dict] = []
    spans = []
    full: list[int] = []
    prev: list[int] = []
    for ex in turns:
        msgs += chat_messages(ex)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=True)["input_ids"]
        full = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
        if full[:len(prompt)] != prompt:
            return None
        if spans and prompt[:spans[-1][1]] != prev:
            return None
        spans.append((len(prompt), len(full)))
        prev = full
        if len(full) > context:
            return None
    if labelled == "last":
        spans = spans[-1:]
    return full, spans[0][0], spans


def multiturn_chats(examples: list[Example], count: int, seed: int, turns=(2, 3)) -> list[list[Example]]:
    """``count`` chats of 2-3 independent turns drawn (deterministically, by ``seed``) from ``examples``;
    the turns of one chat are about different subjects."""
    rng = random.Random(seed * 7919 + 17)
    chats = []
    for _ in range(count):
        n = rng.choice(turns)
        chat: list[Example] = []
        while len(chat) < n:
            ex = examples[rng.randrange(len(examples))]
            if all(ex.key != c.key for c in chat):
                chat.append(ex)
        chats.append(chat)
    return chats


def encode_multiturn(tok, examples: list[Example], frac: float, seed: int, context: int):
    """Multi-turn chats making up about ``frac`` of all training sequences (chats too long are dropped);
    returns (encoded, chats drawn, turn count of the chats kept)."""
    if frac <= 0:
        return [], 0, 0
    count = round(len(examples) * frac / (1 - frac))
    out, kept_turns = [], 0
    for chat in multiturn_chats(examples, count, seed):
        enc = encode_chat(tok, chat, context)
        if enc is not None:
            out.append(enc)
            kept_turns += len(chat)
    return out, count, kept_turns


def followup_heldout(tok, train_ex: list[Example], held_ex: list[Example], context: int, seed: int):
    """Second-turn check: each held-out turn asked after one (deterministically drawn) training turn; the loss
    is on the held-out (second) answer only."""
    rng = random.Random(seed + 99)
    out = []
    for ex in held_ex:
        first = train_ex[rng.randrange(len(train_ex))]
        enc = encode_chat(tok, [first, ex], context, labelled="last")
        if enc is not None:
            out.append(enc)
    return out


def answer_tokens(encoded) -> int:
    return sum(sum(b - a for a, b in e[2]) if len(e) == 3 else len(e[0]) - e[1] for e in encoded)
