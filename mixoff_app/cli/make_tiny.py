"""``make-tiny OUT``: write the deterministic random tiny Mixtral checkpoint."""
from __future__ import annotations


def run(args) -> int:
    from ..tiny import make_tiny
    out = make_tiny(args.out, seed=args.seed)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("make-tiny", help="write the deterministic random tiny Mixtral checkpoint")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run)
