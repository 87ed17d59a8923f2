"""Padded batches from encoded chat turns. Shared by the training loop and the held-out loss, which must pad
and label alike for the losses to be comparable."""
from __future__ import annotations

import random

import torch


def make_batches(encoded, batch_tokens: int, rng: random.Random, shuffle: bool = True):
    """Length-bucketed batches of about ``batch_tokens`` (padded) tokens; order shuffled by ``rng``."""
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)
    # sort within large windows so padding stays small but batches still mix subjects
    window = 64 * max(1, batch_tokens // 256)
    order = [i for s in range(0, len(order), window)
             for i in sorted(order[s:s + window], key=lambda j: len(encoded[j][0]))]
    batches, cur, longest = [], [], 0
    for i in order:
        n = len(encoded[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(encoded, idx: list[int], pad_id: int):
    n = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        toks, start = encoded[i][:2]
        ids[r, :len(toks)] = torch.tensor(toks)
        mask[r, :len(toks)] = 1
        # label[t] is the token at t, predicted from t-1 (transformers shifts); answer tokens and </s> only
        spans = encoded[i][2] if len(encoded[i]) == 3 else [(start, len(toks))]
        for a, b in spans:
            labels[r, a:b] = torch.tensor(toks[a:b])
    return ids, mask, labels
