"""``diffmix export``: a synthetic store in a downstream training format (HoVer-Net, PanNuke), or a
store or dataset as QuPath GeoJSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import SCHEME_HELP, add_layout_argument

EPILOG = """examples:
  diffmix export synthetic.zarr --format hovernet                  # -> synthetic-hovernet/train/*.npy
  diffmix export synthetic.zarr --format hovernet --valid /data/CoNSeP/Test --out hv
  diffmix export synthetic.zarr --format pannuke --originals skip  # synthetic patches only
  diffmix export /data/CoNSeP/Test --format geojson --scheme consep --out consep-qupath
  diffmix export runs/pred --format geojson                        # 'diffmix predict' output for review in QuPath

hovernet: one .npy per patch, H x W x 5 (RGB, instance ids, class ids), the layout of HoVer-Net's
extract_patches.py; set config.py's train_dir_list to OUT/train (see STORE/training/TRAINING.md).
pannuke: images.npy, masks.npy (PanNuke channels), inst_maps.npy, type_maps.npy, scheme.json.
geojson: per tile or item, NAME.geojson (a QuPath FeatureCollection: one Polygon detection per nucleus,
classified by the scheme's class name and colour) with NAME.png beside it, and scheme.json; for stores
and datasets of any layout. The folder reads back as a dataset (layout geojson), e.g. after review in QuPath.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a synthetic store for downstream training (HoVer-Net patches, PanNuke-style arrays) or as QuPath GeoJSON",
        description="Write the finished items of a synthetic store (plus its original patches) in a training format, "
        "or a store or dataset as QuPath GeoJSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="store written by 'diffmix synthesize' or 'diffmix demo' (geojson: or a dataset folder)")
    p.add_argument("--format", "-f", required=True, choices=("hovernet", "pannuke", "geojson"), help="output format")
    p.add_argument("--out", "-o", type=Path, help="output folder (default: STORE-<format> next to the store)")
    p.add_argument(
        "--originals", default="auto", choices=("auto", "include", "skip"),
        help="original patches: those the store includes or references (auto, default), required (include) or none (skip)",
    )
    p.add_argument("--valid", help="hovernet: held-out dataset cut into store-sized patches for valid/")
    p.add_argument("--valid-stride", type=int, help="hovernet: stride of the --valid patches (default: the patch size)")
    p.add_argument(
        "--min-fidelity", type=float, metavar="PQ",
        help="leave out the synthetic items whose label fidelity (PQ of a segmentation model's prediction against the "
             "item's label map, written by 'diffmix score') is below PQ; every finished item must be scored",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same format (never another folder)")
    p.add_argument("--scheme", help="geojson from a dataset: " + SCHEME_HELP)
    add_layout_argument(p, of="a geojson export's input dataset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import StoreError
    from ..export import export_store
    from ..store import open_store

    if args.format == "geojson":
        return _export_geojson(args)
    if args.scheme is not None or args.layout != "auto":
        raise StoreError("--scheme and --layout apply to --format geojson only (stores record their scheme)")
    store = open_store(args.store)
    out = args.out or args.store.with_name(f"{args.store.name.removesuffix('.zarr')}-{args.format}")
    kwargs = {"originals": args.originals, "overwrite": args.overwrite, "min_fidelity": args.min_fidelity}
    if args.min_fidelity is not None:
        from ..fidelity_records import select_items

        print(f"label fidelity: {select_items(store, args.min_fidelity).text()}")
    if args.format == "hovernet":
        kwargs.update(valid=args.valid, valid_stride=args.valid_stride)
    elif args.valid is not None:
        raise StoreError("--valid applies to --format hovernet only")
    path = export_store(store, out, args.format, **kwargs)
    if args.format == "hovernet":
        n = len(list((path / "train").glob("*.npy")))
        extra = f", {len(list((path / 'valid').glob('*.npy')))} in valid/" if (path / "valid").is_dir() else ""
        print(f"wrote {n} training patches to {path / 'train'}{extra} (HoVer-Net layout: RGB, instances, types)")
    else:
        print(f"wrote stacked arrays to {path} (images.npy, masks.npy, inst_maps.npy, type_maps.npy, scheme.json)")
    if store.attrs.get("status") != "complete":
        print(f"note: the store is not complete ({int(store.done_mask().sum())} of {len(store)} items); only finished items were exported")
    return 0


def _export_geojson(args: argparse.Namespace) -> int:
    """A store's finished items (after the originals it includes or references, unless --originals
    skip) or a dataset's tiles, one FeatureCollection each."""
    from itertools import chain

    from ..errors import StoreError
    from ..store import open_store, referenced_dataset, referenced_originals
    from ..geojson import export_geojson
    from ..seg.data import is_synthetic_store, open_tiles

    if args.valid is not None or args.valid_stride is not None:
        raise StoreError("--valid applies to --format hovernet only")
    if args.min_fidelity is not None:
        raise StoreError("--min-fidelity applies to --format hovernet and pannuke (training formats) only")
    src = args.store
    out = args.out or src.with_name(f"{src.name.removesuffix('.zarr')}-geojson")
    tiles = open_tiles(src, args.scheme, args.layout)
    inputs, note = [src], ""
    if is_synthetic_store(src):
        store = open_store(src)
        inputs.append(referenced_dataset(store))
        originals = None
        if args.originals != "skip":
            included = store.originals
            originals = included.items() if included is not None else referenced_originals(store)
            if originals is None and args.originals == "include":
                raise StoreError(f"{src}: the store neither includes nor references original patches")
        items = tiles if originals is None else chain(originals, tiles)
        note = f" ({len(tiles)} synthetic items{'' if originals is None else ' after the original patches'})"
    else:
        items = tiles
    path = export_geojson(items, out, tiles.scheme, inputs=inputs, overwrite=args.overwrite)
    n = len(list(path.glob("*.geojson")))
    print(f"wrote {n} GeoJSON FeatureCollections to {path}{note}; QuPath: File > Import objects, or drag NAME.geojson onto NAME.png")
    return 0
