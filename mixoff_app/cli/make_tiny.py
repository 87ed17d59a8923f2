"""``make-tiny OUT``: write the deterministic random tiny Mixtral checkpoint."""
from __future__ import annotations


def run(args) -> int:
    from ..outputs import check_new_folder, new_folder
    from ..tiny import make_tiny
    check_new_folder(args.out, args.force)
    with new_folder(args.out) as tmp:
        make_tiny(tmp, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("make-tiny", help="write the deterministic random tiny Mixtral checkpoint")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace the contents of a non-empty output folder")
    t.set_defaults(func=run)
