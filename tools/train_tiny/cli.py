"""Train the embedded demo model: a small Mixtral that answers questions about Python from Python's own docs.

    python -m tools.train_tiny                      # train, write assets/tiny-chat/, report held-out loss
    python -m tools.train_tiny --measure            # routing locality of the shipped model on held-out chat
    python -m tools.train_tiny --transcripts        # greedy answers to the model card's questions

The data is text every Python install has: the language reference topics (``pydoc_data.topics``) and
the docstrings of the builtins and the standard library (``inspect.getdoc``), shaped into chat turns
("What does the built-in function len do?" -> the docstring). Everything is ordered deterministically
and seeded, so one seed on one Python version gives one checkpoint. Training uses transformers'
``MixtralForCausalLM`` (training is not the runtime); the checkpoint is written in Hugging Face format
with the hub's per-expert tensor names, in fp16.

The router is trained with transformers' load-balancing loss. ``--locality-coef`` adds an optional
temporal-consistency penalty (total variation between consecutive tokens' routing distributions); it is
off by default: without it the shipped model already routes with clear locality (see the model card),
and with 0.1 routing becomes far stickier than Mixtral's.

``--multiturn-frac F`` (default 0, which is how the shipped model was trained) adds multi-turn chats so that they
make up about F of the training sequences: each is 2-3 independent training turns (drawn with the seed, different
subjects) rendered with the chat template in one sequence, the loss on every assistant turn (answer and ``</s>``);
chats longer than the context are dropped. The held-out split and its single-turn loss are unchanged; the report
adds a second-turn held-out loss (each held-out turn asked after a seeded training turn, loss on the second
answer only). ``--transcripts`` also prints three two-turn chats.

``--scope-repeat N`` (default 0) adds greetings and questions outside Python's documentation ("Hello there",
"Write a short poem about ...", "What is the capital of France?"), each answered with one short fixed sentence
that says it is a small demo model of Python's documentation and suggests what to ask; they are repeated N
times in the training set (and drawn into the multi-turn chats like any turn). Whole question forms are held
out (``heldout_scope.jsonl``); the report adds their loss. ``--transcripts`` also prints such answers.

Every run also reports held-out phrasings (``phrasing.py``): each builtin asked in three question forms no
training turn uses ("What does the built-in function zip() do?", ...), their loss and how many greedy answers
begin right (``heldout_phrasing.jsonl``).

``--init-from DIR`` continues training from a trained checkpoint (its tokenizer and weights) instead of a new
tokenizer and random weights: how the shipped model learned its scope answers without a full retrain.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys

from tools.train_tiny.checkpoint import ASSET_DIR
from tools.train_tiny.corpus import build_examples, build_items
from tools.train_tiny.hyperparameters import DEFAULTS
from tools.train_tiny.locality import measure
from tools.train_tiny.scope import build_scope_examples
from tools.train_tiny.training import train
from tools.train_tiny.transcripts import transcripts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ASSET_DIR), help="checkpoint folder (default: assets/tiny-chat)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", action="store_true", help="routing locality of the checkpoint in --out; no training")
    p.add_argument("--transcripts", action="store_true", help="greedy answers to the card's questions; no training")
    p.add_argument("--cache-k", type=int, default=4, help="LRU slots per layer for --measure")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="plain fp32 compute (default: bf16 autocast on CPU, fp32 master weights and optimizer)")
    p.add_argument("--data-stats", action="store_true", help="print data counts and examples, then exit")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args(argv)
    args.command = "python -m tools.train_tiny " + " ".join(shlex.quote(a) for a in argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        measure(args)
    elif args.transcripts:
        transcripts(args)
    elif args.data_stats:
        tr, he = build_examples(args.seed, args.heldout_frac)
        kinds: dict[str, int] = {}
        for it in build_items():
            kinds[it.kind] = kinds.get(it.kind, 0) + 1
        st, sh = build_scope_examples()
        print(json.dumps({"train_turns": len(tr), "heldout_turns": len(he), "items_by_kind": kinds,
                          "scope_train_turns": len(st), "scope_heldout_turns": len(sh)}, indent=2))
        r = random.Random(0)
        for ex in r.sample(tr, 8):
            print(f"--- {ex.key}\nQ: {ex.question}\nA: {ex.answer}\n")
    else:
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
