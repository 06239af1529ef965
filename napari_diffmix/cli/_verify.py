"""``diffmix verify``: decode and check every finished item of a synthetic store."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a synthetic store: every finished item decodes, matches its label contract and the store's settings",
        description=(
            "Decode every item a store marks finished (and its included originals) and check that all three chunks are "
            "there and readable, that the label maps are consistent and that the item was rendered with the store's "
            "settings. Exit 0 when all pass, 1 when items are damaged (running the synthesis command again renders "
            "exactly those anew), 2 when the store itself cannot be opened."
        ),
    )
    p.add_argument("store", type=Path, help="store written by 'diffmix synthesize' or 'diffmix demo'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synthesize import verify_store

    check = verify_store(args.store)
    print(check.summary())
    return 0 if check.ok else 1
