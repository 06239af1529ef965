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
            "and print nuclei and pixel shares per class, merged by the class scheme. Every tile's image file "
            "is checked too: RGB (or RGBA) and the size of its label maps, read from the file headers; "
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
        self.shapes: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        tile = self.dataset.labels(i)
        self.shapes[tile.name] = tile.shape
        return tile


def image_files(dataset) -> dict[str, Path] | None:
    """Each tile's image file, for the layouts that keep one file per tile (CoNSeP/GLySAC, generic);
    None for the others (PanNuke stacks are checked when opened, the demo lives in memory)."""
    from ..datasets import IMAGE_SUFFIXES, _child_dir, _files_by_stem

    if dataset.root is None or dataset.layout not in ("consep", "generic"):
        return None
    folder = _child_dir(dataset.root, "images")
    return {} if folder is None else _files_by_stem(folder, IMAGE_SUFFIXES)


def check_images(images: dict[str, Path], shapes: dict[str, tuple[int, int]], root) -> None:
    """A DatasetError listing every tile whose image the readers would refuse or whose size differs from its labels."""
    from ..datasets import image_problem
    from ..errors import DatasetError

    problems = []
    for name, shape in shapes.items():
        problem = image_problem(images[name], shape)
        if problem is not None:
            problems.append(f"{images[name]}: {problem}")
    if problems:
        raise DatasetError(
            f"{len(problems)} of {len(shapes)} tile image(s) do not fit (expected 8-bit RGB the size of the tile's "
            "label maps; --no-check-images skips this check):\n  " + "\n  ".join(problems),
            root,
        )


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
    images = image_files(dataset) if args.check_images else None
    if images == {}:
        print("images: none (label maps only)")
    elif images:
        check_images(images, labels.shapes, where)
        print(f"images: {len(images)} checked (RGB, the size of their label maps)")
    if args.json is not None:
        write_json(args.json, stats.to_dict())
        print(f"wrote {args.json}")
    return 0
