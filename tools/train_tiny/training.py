"""The training loop: one run from flags to a written checkpoint and its report.

The router is trained with transformers' load-balancing loss. ``--locality-coef`` adds an optional
temporal-consistency penalty (total variation between consecutive tokens' routing distributions); it is off by
default: without it the shipped model already routes with clear locality, and with 0.1 routing becomes far
stickier than Mixtral's.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from mixoff_app.tiny import train_tokenizer
from tools.train_tiny.batches import collate, make_batches
from tools.train_tiny.checkpoint import build_model, load_shipped, model_config, save_checkpoint
from tools.train_tiny.corpus import build_examples
from tools.train_tiny.encoding import answer_tokens, encode_all, encode_multiturn, followup_heldout
from tools.train_tiny.evaluation import answer_loss, heldout_loss
from tools.train_tiny.heldout import PHRASING_HELDOUT_FILE, SCOPE_HELDOUT_FILE, write_heldout
from tools.train_tiny.hyperparameters import DEFAULTS
from tools.train_tiny.phrasing import answered, build_phrasing_heldout
from tools.train_tiny.scope import build_scope_examples


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def locality_penalty(router_logits, mask: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance between consecutive tokens' routing distributions (real tokens only)."""
    b, t = mask.shape
    pair = (mask[:, 1:] * mask[:, :-1]).float()                      # [B, T-1]
    total = 0.0
    for rl in router_logits:
        p = rl.float().softmax(-1).view(b, t, -1)                     # [B, T, E]
        tv = 0.5 * (p[:, 1:] - p[:, :-1]).abs().sum(-1)              # [B, T-1]
        total = total + (tv * pair).sum() / pair.sum().clamp(min=1)
    return total / len(router_logits)


def _cosine(step: int, total: int, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * prog))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    train_ex, held_ex = build_examples(args.seed, args.heldout_frac)
    scope_train, scope_held = build_scope_examples() if args.scope_repeat > 0 else ([], [])
    train_all = train_ex + scope_train * args.scope_repeat
    if args.init_from:          # continue from a trained checkpoint: its tokenizer and weights
        base, tok = load_shipped(args.init_from)
    else:
        base, tok = None, train_tokenizer([f"{e.question}\n{e.answer}" for e in train_all], args.vocab_size)
    tok.model_max_length = args.context
    single_enc = encode_all(tok, train_all, args.context)
    held_enc = encode_all(tok, held_ex, args.context)
    scope_held_enc = encode_all(tok, scope_held, args.context)
    phrasing_held = build_phrasing_heldout()
    phrasing_enc = encode_all(tok, phrasing_held, args.context)
    multi_enc, multi_drawn, multi_turns = encode_multiturn(tok, train_all, args.multiturn_frac,
                                                           args.seed, args.context)
    train_enc = single_enc + multi_enc
    follow_enc = followup_heldout(tok, train_ex, held_ex, args.context, args.seed)
    n_train_tok = sum(len(e[0]) for e in train_enc)
    n_ans_tok = answer_tokens(train_enc)
    log(f"data: {len(train_ex)} train turns ({len(single_enc)} fit) + {len(multi_enc)} multi-turn chats "
        f"({multi_drawn} drawn, {multi_turns} turns), {n_train_tok} tokens, {n_ans_tok} answer tokens; "
        f"{len(held_ex)} held-out turns ({len(held_enc)} fit, {len(follow_enc)} as second turns); vocab {len(tok)}; "
        f"prep {time.time() - t0:.0f}s")

    cfg = model_config(args, tok)
    if base is not None:
        model = base
        model.config.router_aux_loss_coef, model.config.output_router_logits = args.aux_coef, False
    else:
        model = build_model(cfg, args.aux_coef)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    rng = random.Random(args.seed)
    pad = tok.pad_token_id
    step, epoch, total_steps = 0, 0, args.steps
    t_train = time.time()
    history = []
    batches: list = []
    ema = None
    while step < total_steps:
        if not batches:
            batches = make_batches(train_enc, args.batch_tokens, rng)
            epoch += 1
        idx = batches.pop()
        model.train()
        ids, mask, labels = collate(train_enc, idx, pad)
        lr = args.lr * _cosine(step, total_steps, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        s, n = answer_loss(res.logits, labels)
        lm = s / max(n, 1)
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
        aux = load_balancing_loss_func(res.router_logits, cfg.num_experts, cfg.top_k, mask)
        loc = locality_penalty(res.router_logits, mask) if args.locality_coef > 0 else torch.zeros(())
        loss = lm + args.aux_coef * aux + args.locality_coef * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        lm_value = lm.item()
        ema = lm_value if ema is None else 0.98 * ema + 0.02 * lm_value
        elapsed = time.time() - t_train
        if step % args.log_every == 0 or step == total_steps:
            log(f"step {step}/{total_steps} epoch {epoch} lr {lr:.2e} loss {lm_value:.3f} (ema {ema:.3f}) "
                f"aux {float(aux):.3f} loc {float(loc):.3f} {elapsed:.0f}s")
            history.append({"step": step, "loss_ema": round(ema, 4), "aux": round(float(aux), 4),
                            "locality_tv": round(float(loc), 4), "seconds": round(elapsed)})
        if args.eval_every and step % args.eval_every == 0:
            hl, _ = heldout_loss(model, held_enc, pad)
            log(f"step {step} held-out loss {hl:.4f}")
    train_seconds = time.time() - t_train

    # The reported held-out loss is that of the shipped (fp16) weights, evaluated in fp32 as the test does.
    model.to(torch.float16).to(torch.float32)
    hl, n_held_tok = heldout_loss(model, held_enc, pad)
    tl, n_tl_tok = heldout_loss(model, train_enc[:len(held_enc)], pad)
    fl, n_follow_tok = heldout_loss(model, follow_enc, pad)
    sl, n_scope_tok = heldout_loss(model, scope_held_enc, pad) if scope_held_enc else (float("nan"), 0)
    pl, n_phrasing_tok = heldout_loss(model, phrasing_enc, pad)
    phrasing_wrong = answered(model, tok, phrasing_held)
    log(f"final: train-subset loss {tl:.4f}, held-out loss {hl:.4f} over {n_held_tok} answer tokens, "
        f"held-out second-turn loss {fl:.4f} over {n_follow_tok}, held-out phrasings {pl:.4f} over {n_phrasing_tok}")
    report = {
        "command": args.command, "seed": args.seed, "python": sys.version.split()[0],
        "torch": torch.__version__, "threads": args.threads, "steps": step, "epochs": epoch,
        "wall_seconds": round(time.time() - t0), "train_seconds": round(train_seconds),
        "parameters": n_params,
        "hyperparameters": {k: getattr(args, k) for k in DEFAULTS},
        "data": {"train_turns": len(train_ex), "train_turns_fit": len(single_enc), "train_tokens": n_train_tok,
                 "train_answer_tokens": n_ans_tok, "train_single_turn_sequences": len(single_enc),
                 "train_multiturn_sequences": len(multi_enc), "train_multiturn_drawn": multi_drawn,
                 "train_multiturn_turns": multi_turns,
                 "heldout_turns": len(held_ex), "heldout_turns_fit": len(held_enc),
                 "heldout_answer_tokens": n_held_tok, "heldout_second_turn_fit": len(follow_enc),
                 "heldout_second_turn_answer_tokens": n_follow_tok, "vocab_size": len(tok)},
        "train_loss_subset": round(tl, 4), "train_loss_ema": round(ema, 4), "heldout_loss": round(hl, 4),
        "heldout_loss_definition": "mean next-token cross-entropy (nats) over answer tokens incl. </s> of the "
                                   "held-out chat turns, fp16 weights evaluated in fp32",
        "heldout_second_turn_loss": round(fl, 4),
        "scope": {"repeat": args.scope_repeat, "train_turns": len(scope_train), "heldout_turns": len(scope_held),
                  "heldout_answer_tokens": n_scope_tok,
                  "heldout_loss": round(sl, 4) if scope_held_enc else None,
                  "heldout_loss_definition": "the same, over the held-out greetings and out-of-scope questions "
                                             "(whole question forms unseen in training), heldout_scope.jsonl"},
        "phrasing": {"heldout_turns": len(phrasing_held), "heldout_turns_fit": len(phrasing_enc),
                     "heldout_answer_tokens": n_phrasing_tok, "heldout_loss": round(pl, 4),
                     "greedy_right": len(phrasing_held) - len(phrasing_wrong), "greedy_wrong": phrasing_wrong,
                     "greedy_definition": "greedy answers (fp16 weights in fp32) that begin with the answer's first "
                                          "12 tokens (all of it and </s> when shorter)",
                     "heldout_loss_definition": "the same, over every builtin asked in question forms no training "
                                                "turn uses (tools/train_tiny/phrasing.py), heldout_phrasing.jsonl"},
        "heldout_second_turn_loss_definition": "the same, over the held-out answers asked as the second turn of a "
                                               "chat whose first turn is a (seeded) training turn",
        "history": history,
    }
    save_checkpoint(model, tok, cfg, out, {"mixoff_tiny_chat": {"seed": args.seed, "heldout_loss": round(hl, 4)}})
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_heldout(out, held_ex)
    if scope_held:
        write_heldout(out, scope_held, SCOPE_HELDOUT_FILE)
    write_heldout(out, phrasing_held, PHRASING_HELDOUT_FILE)
    log(f"wrote {out}")
    return report
