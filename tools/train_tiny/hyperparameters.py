"""The trainer's defaults in one place: the CLI turns each into a flag and the training report records them
all, so a report always says every setting a checkpoint was trained with."""
from __future__ import annotations

from mixoff_app.presets import from_name

SHAPE = from_name("tiny")      # the shipped model's shape; the CLI's flags override it
DEFAULTS = dict(seed=1234, vocab_size=SHAPE.vocab_size, hidden=SHAPE.hidden_size, layers=SHAPE.num_layers,
                heads=SHAPE.num_heads, kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                intermediate=SHAPE.intermediate_size, experts=SHAPE.num_experts, top_k=SHAPE.top_k,
                context=SHAPE.max_position_embeddings, batch_tokens=4096, lr=2e-3,
                min_lr_frac=0.1, warmup=100, weight_decay=0.05, aux_coef=0.01, locality_coef=0.0,
                heldout_frac=0.05, steps=700, multiturn_frac=0.0, scope_repeat=0, init_from="")
