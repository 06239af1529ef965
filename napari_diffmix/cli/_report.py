"""``diffmix report``: one self-contained HTML page about a synthetic store."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  diffmix report synthetic.zarr --out report.html
  diffmix report synthetic.zarr --out report.html --seg-model models/hovernet-consep --items 6

The page embeds its figures (PNG, base64): class counts before / planned / after, the label-fidelity
histogram, the best and worst items by fidelity (label map | render | predicted nuclei), the settings
and the model provenance. Open it in any browser; it needs no other file and no network.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="a self-contained HTML report of a synthetic store (class counts, fidelity, best/worst items)",
        description="Write an HTML page with embedded PNG figures about a synthetic store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="store written by 'diffmix synthesize' or 'diffmix demo'")
    p.add_argument("--out", "-o", type=Path, required=True, help="HTML file to write, e.g. report.html")
    p.add_argument("--seg-model", type=Path, help="segmentation model that predicts the montage's nuclei, or 'demo' (default: the one that scored the store)")
    p.add_argument("--items", type=int, default=4, help="best and worst items shown (default 4 each)")
    p.add_argument("--metric", default="pq", help="fidelity metric that orders the items (default pq)")
    p.add_argument("--device", default="cpu", help="device for the montage's predictions (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import StoreError
    from ..fidelity_records import METRICS
    from ..report import build_report

    if args.metric not in METRICS:
        raise StoreError(f"unknown fidelity metric {args.metric!r}; choose one of {', '.join(METRICS)}")
    if args.items < 1:
        raise StoreError(f"--items must be at least 1, got {args.items}")
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise StoreError(f"{args.out}: the report is an HTML file; name it *.html")
    if args.out.exists() and not args.overwrite:
        raise StoreError(f"{args.out}: already exists; pass --overwrite to replace it")
    path = build_report(args.store, args.out, seg_model=args.seg_model, items=args.items, metric=args.metric, device=args.device)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, self-contained); open it in a browser")
    return 0
