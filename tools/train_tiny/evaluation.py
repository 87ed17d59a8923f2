"""The held-out loss the model card and the training report state, and the answer-only loss it is made of.
Kept apart from the loop because the tests recompute the shipped number with the same code."""
from __future__ import annotations

import random

import torch

from tools.train_tiny.batches import collate, make_batches


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled (answer) positions, and how many there are."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    lb = labels[:, 1:].reshape(-1)
    n = int((lb != -100).sum())
    return torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="sum"), n


@torch.no_grad()
def heldout_loss(model, encoded, pad_id: int, batch_tokens: int = 8192) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over the answer tokens of the held-out chat turns."""
    model.eval()
    total, count = 0.0, 0
    for idx in make_batches(encoded, batch_tokens, random.Random(0), shuffle=False):
        ids, mask, labels = collate(encoded, idx, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        s, n = answer_loss(logits, labels)
        total += float(s)
        count += n
    return total / max(count, 1), count
