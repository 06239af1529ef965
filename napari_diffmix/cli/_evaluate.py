"""``diffmix evaluate``: score predicted nuclei against ground truth (HoVer-Net metrics)."""

from __future__ import annotations

import argparse

from ._common import add_layout_argument

EPILOG = """examples:
  diffmix evaluate runs/pred /data/CoNSeP/Test --scheme consep --out results.json --out results.csv
  diffmix evaluate synthetic.zarr reference.zarr --scheme consep
  diffmix evaluate hovernet_out/mat /data/CoNSeP/Test     # HoVer-Net run_infer output; classes as the model gives them

Per image: Dice, AJI, AJI+, DQ/SQ/PQ (IoU > 0.5). Pooled over all tiles: nuclei paired by
centroid (Hungarian, within 12 px), F_d, type accuracy and per-class F1 (HoVer-Net's
compute_stats). Tiles are paired by name; every ground-truth tile needs a prediction.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score predictions against ground truth: per-class F1, F_d, Dice, AJI, AJI+, DQ, SQ, PQ",
        description="Compare predicted nuclei (instances + classes) with ground truth, tile by tile.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred", help="predictions: a dataset folder (e.g. from 'diffmix predict', HoVer-Net's mat/ or json/ output) or a zarr store")
    p.add_argument("gt", help="ground truth: a dataset folder (CoNSeP/GLySAC, generic, PanNuke, Lizard, CoNIC, GeoJSON) or a zarr store")
    p.add_argument("--scheme", help="class scheme: consep, glysac, lizard, demo or a JSON/YAML file (default: GT's scheme.json, "
                   "else PRED's, else the one GT's path names, e.g. .../CoNSeP/Test)")
    add_layout_argument(p, "--pred-layout", of="PRED")
    add_layout_argument(p, "--gt-layout", of="GT")
    p.add_argument("--out", "-o", action="append", default=[], help="write results to .json or .csv (repeatable)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU above which instances match for DQ/SQ/PQ (default: 0.5)")
    p.add_argument("--radius", type=float, default=12.0, help="centroid pairing radius in px for F_d / F1 (default: 12)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import DatasetError
    from ..metrics import evaluate
    from ..seg.data import open_tiles

    for out in args.out:
        if Path(out).suffix.lower() not in (".json", ".csv"):
            raise DatasetError("results file must end in .json or .csv", out)
    if not 0.0 <= args.iou < 1.0:
        raise DatasetError(f"--iou must be in [0, 1), got {args.iou}")
    if args.radius <= 0:
        raise DatasetError(f"--radius must be positive, got {args.radius}")
    scheme = args.scheme
    if scheme is None and not (Path(args.gt) / "scheme.json").is_file() and (Path(args.pred) / "scheme.json").is_file():
        scheme = str(Path(args.pred) / "scheme.json")  # e.g. CoNSeP ground truth vs 'diffmix predict' output
    if scheme is None and not (Path(args.gt) / "scheme.json").is_file() and not (Path(args.gt) / "zarr.json").is_file():
        from ..classes import scheme_named_by_path

        named = scheme_named_by_path(args.gt)  # e.g. HoVer-Net's mat/ output against .../CoNSeP/Test
        if named is not None:
            print(f"note: no --scheme and no scheme.json; using {named.name!r}, which the path {args.gt} names")
            scheme = named
    gt = open_tiles(args.gt, scheme, args.gt_layout)
    pred = open_tiles(args.pred, gt.scheme, args.pred_layout)
    if pred.scheme.names != gt.scheme.names:
        raise DatasetError(f"predictions use classes {list(pred.scheme.names)}, the ground truth {list(gt.scheme.names)}", args.pred)
    result = evaluate(pred, gt, gt.scheme.names, match_iou=args.iou, radius=args.radius)
    if result.ignored:
        print(f"note: {len(result.ignored)} prediction tile(s) without ground truth ignored: {list(result.ignored)[:5]}")
    print(result.table())
    for out in args.out:
        print(f"wrote {result.write(out)}")
    return 0
