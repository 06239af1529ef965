"""``diffmix export``: a synthetic store in a downstream training format (HoVer-Net, PanNuke)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  diffmix export synthetic.zarr --format hovernet                  # -> synthetic-hovernet/train/*.npy
  diffmix export synthetic.zarr --format hovernet --valid /data/CoNSeP/Test --out hv
  diffmix export synthetic.zarr --format pannuke --originals skip  # synthetic patches only

hovernet: one .npy per patch, H x W x 5 (RGB, instance ids, class ids), the layout of HoVer-Net's
extract_patches.py; set config.py's train_dir_list to OUT/train (see STORE/training/TRAINING.md).
pannuke: images.npy, masks.npy (PanNuke channels), inst_maps.npy, type_maps.npy, scheme.json.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a synthetic store for downstream training (HoVer-Net patches, PanNuke-style arrays)",
        description="Write the finished items of a synthetic store (plus its original patches) in a training format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="store written by 'diffmix synthesize' or 'diffmix demo'")
    p.add_argument("--format", "-f", required=True, choices=("hovernet", "pannuke"), help="output format")
    p.add_argument("--out", "-o", type=Path, help="output folder (default: STORE-<format> next to the store)")
    p.add_argument(
        "--originals", default="auto", choices=("auto", "include", "skip"),
        help="original patches: those the store includes or references (auto, default), required (include) or none (skip)",
    )
    p.add_argument("--valid", help="hovernet: held-out dataset cut into store-sized patches for valid/")
    p.add_argument("--valid-stride", type=int, help="hovernet: stride of the --valid patches (default: the patch size)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same format (never another folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import StoreError
    from ..export import export_store, open_store

    store = open_store(args.store)
    out = args.out or args.store.with_name(f"{args.store.name.removesuffix('.zarr')}-{args.format}")
    kwargs = {"originals": args.originals, "overwrite": args.overwrite}
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
