"""``diffmix stats``: nuclei and pixel counts per class of a dataset, and a check of its images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ._common import add_dataset_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="count nuclei and nucleus pixels per class in a dataset and check its images",
        description=(
            "Read a dataset (CoNSeP/GLySAC folder, generic folder, PanNuke-style .npy stacks, HoVer-Net output, "
            "Lizard, CoNIC, QuPath GeoJSON, or 'demo') "
            "and print nuclei and pixel shares per class, merged by the class scheme. Every tile's image "
            "(files, .npy stacks, images beside HoVer-Net output) is decoded too, as training will read it: "
            "RGB (or RGBA), whole (not truncated), no NaN, the size of its label maps; "
            "all tiles that fail are listed in one error."
        ),
    )
    add_dataset_arguments(p)
    p.add_argument("--per-tile", action="store_true", help="also print nuclei per class for every tile")
    p.add_argument("--json", metavar="OUT", type=Path, default=None, help="also write the statistics as JSON to OUT")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="read the label maps only; skip the image check")
    p.set_defaults(func=run)


class _LabelShapes(Sequence):
    """``dataset``'s label maps as :func:`~napari_diffmix.datasets.dataset_stats` reads them, noting each
    tile's (H, W) so that the image check needs no second read of the labels."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.shapes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        tile = self.dataset.labels(i)
        self.shapes[i] = tile.shape
        return tile


def check_images(dataset, shapes: dict[int, tuple[int, int]], root) -> int:
    """Decode every tile's image (:meth:`~napari_diffmix.datasets.Dataset.check_image`); the number
    decoded, or a DatasetError listing every tile whose image the readers would refuse or whose
    size differs from its labels. A header alone misses truncated files and NaN pixels."""
    from ..errors import DatasetError

    problems, checked = [], 0
    for i in range(len(dataset)):
        result = dataset.check_image(i, shapes.get(i))
        if result is None:
            continue
        checked += 1
        where, problem = result
        if problem is not None:
            problems.append(f"{where}: {problem}")
    if problems:
        raise DatasetError(
            f"{len(problems)} of {checked} tile image(s) do not fit (expected 8-bit RGB the size of the tile's "
            "label maps; --no-check-images skips this check):\n  " + "\n  ".join(problems),
            root,
        )
    return checked


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..datasets import dataset_stats, open_dataset

    dataset = open_dataset(args.dataset, args.scheme, args.layout)
    labels = _LabelShapes(dataset)
    stats = dataset_stats(labels, scheme=dataset.scheme)
    where = dataset.root if dataset.root is not None else args.dataset
    print(f"{where}: {len(dataset)} tile(s), layout {dataset.layout}, scheme {dataset.scheme.name}")
    print(stats.table())
    if args.per_tile:
        print()
        print(stats.tile_table())
    if args.check_images and dataset.checks_images:
        checked = check_images(dataset, labels.shapes, where)
        if checked == 0:
            print("images: none (label maps only)")
        else:
            without = f"; {len(dataset) - checked} tile(s) have no image" if checked < len(dataset) else ""
            print(f"images: {checked} decoded (8-bit RGB, the size of their label maps){without}")
    if args.json is not None:
        write_json(args.json, stats.to_dict())
        print(f"wrote {args.json}")
    return 0
