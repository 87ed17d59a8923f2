"""Question forms held out for the builtins: every builtin is trained (the demo must know them all), so what is
held out is how the question is asked. "What does the built-in function zip() do?" was answered with another
docstring while "What does len do?" worked: these forms, none of them a training form, measure whether an answer
survives a phrasing it was not taught (``heldout_phrasing.jsonl``, its loss in the training report)."""
from __future__ import annotations

import torch

from tools.train_tiny.corpus import Example, build_items

HELD_FORMS = ["What does the built-in function {n}() do?", "What does {n} do?", "What is {n}() used for?"]


def build_phrasing_heldout() -> list[Example]:
    """Each builtin (function or class) asked in each held-out form, answered with its training answer."""
    return [Example(f"phrasing:{item.name}:{i}", form.format(n=item.name), item.answer)
            for item in build_items() if item.kind in ("builtin", "builtin_type")
            for i, form in enumerate(HELD_FORMS)]


@torch.no_grad()
def answered(model, tok, examples: list[Example], tokens: int = 12, batch: int = 64) -> list[str]:
    """The questions whose greedy answer does not begin with their answer's first ``tokens`` tokens (all of it
    when shorter, then ``</s>``): the held-out phrasings a person would see answered wrongly. Greedy decoding
    writes that prefix exactly when every prefix token is the argmax after the ones before it, so one batched
    forward over question + expected prefix decides it (the same as ``generate``, without 12 steps each)."""
    rows = []
    for ex in examples:
        prompt = tok.apply_chat_template([{"role": "user", "content": ex.question}], tokenize=True,
                                         add_generation_prompt=True)["input_ids"]
        want = tok(" " + ex.answer, add_special_tokens=False)["input_ids"][:tokens]
        rows.append((list(prompt), want if len(want) == tokens else want + [tok.eos_token_id]))
    wrong = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        width = max(len(p) + len(w) for p, w in part)
        ids = torch.full((len(part), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, (p, w) in enumerate(part):
            ids[r, :len(p) + len(w)] = torch.tensor(p + w)
            mask[r, :len(p) + len(w)] = 1
        best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)       # [B, T]
        for r, (p, w) in enumerate(part):
            if best[r, len(p) - 1:len(p) + len(w) - 1].tolist() != w:
                wrong.append(examples[i + r].question)
    return wrong
