"""``diffmix stats``: nuclei and pixel counts per class of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_dataset_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="count nuclei and nucleus pixels per class in a dataset",
        description=(
            "Read a dataset (CoNSeP/GLySAC folder, generic folder, PanNuke-style .npy stacks, or 'demo') "
            "and print nuclei and pixel shares per class, merged by the class scheme."
        ),
    )
    add_dataset_arguments(p)
    p.add_argument("--per-tile", action="store_true", help="also print nuclei per class for every tile")
    p.add_argument("--json", metavar="OUT", type=Path, default=None, help="also write the statistics as JSON to OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..datasets import dataset_stats, open_dataset

    dataset = open_dataset(args.dataset, args.scheme, args.layout)
    stats = dataset_stats(dataset)
    where = dataset.root if dataset.root is not None else args.dataset
    print(f"{where}: {len(dataset)} tile(s), layout {dataset.layout}, scheme {dataset.scheme.name}")
    print(stats.table())
    if args.per_tile:
        print()
        print(stats.tile_table())
    if args.json is not None:
        write_json(args.json, stats.to_dict())
        print(f"wrote {args.json}")
    return 0
