"""``diffmix demo-data``: write the bundled demo dataset as a generic folder and print its classes."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  diffmix demo-data --out diffmix-demo-data            # the 512x512 IHC tile + labels, class table
  diffmix demo-data --out demo-split --split           # train (x < 384) and held-out (x >= 384) crops
  diffmix stats diffmix-demo-data                      # read it back like any generic dataset
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo-data",
        help="write the bundled demo dataset (no download) and print its class statistics",
        description=(
            "Write the demo dataset (scikit-image's immunohistochemistry tile with classically derived nuclei "
            "labels; classes other, epithelial, stromal) as a generic dataset folder: images/, inst_maps/, "
            "type_maps/ and scheme.json."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", "-o", type=Path, default=Path("diffmix-demo-data"), help="output folder (default: diffmix-demo-data)")
    p.add_argument(
        "--split",
        action="store_true",
        help="write the train crop (columns 0-383) and the held-out crop (columns 384-511) as two tiles",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import dataset_stats, write_generic
    from ..demo_data import demo_dataset, demo_split_dataset

    dataset = demo_split_dataset() if args.split else demo_dataset()
    out = write_generic(dataset, args.out, overwrite=args.overwrite)
    stats = dataset_stats(dataset)
    print(f"wrote {len(dataset)} tile(s) ({', '.join(dataset.names)}) to {out}, scheme {dataset.scheme.name}")
    print(stats.table())
    if args.split:
        print()
        print(stats.tile_table())
    return 0
