"""``diffmix score``: label fidelity of every item of a synthetic store (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_device_arguments

EPILOG = """examples:
  diffmix score synthetic.zarr --seg-model models/hovernet-consep
  diffmix score diffmix-demo/demo.zarr --seg-model demo        # the demo store, with the bundled demo model
  diffmix score synthetic.zarr --seg-model models/hovernet-consep --min-fidelity 0.6
  diffmix export synthetic.zarr --format hovernet --min-fidelity 0.6
  diffmix train-seg --data /data/CoNSeP/Train --synthetic synthetic.zarr --synthetic-min-fidelity 0.6 --out seg

A segmentation model (a 'diffmix train-seg' folder) predicts the nuclei of each rendered image;
the item's fidelity is the agreement with the label map it was rendered from (Dice, AJI, DQ/SQ/PQ,
F_d, type accuracy, per-class F1, rare-class recall). Scores go to the store's 'fidelity' array,
never into images or label maps. Re-running continues: items already scored by the same model on
the same pixels are skipped (Ctrl-C stops after the current item).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="label fidelity of each synthetic item: a segmentation model's prediction vs the item's label map",
        description="Score every finished item of a synthetic store by how well a segmentation model finds the "
        "nuclei of its label map in the rendered image; resumable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="store written by 'diffmix synthesize' or 'diffmix demo'")
    add_seg_model_arguments(p)
    p.add_argument("--rescore", action="store_true", help="score every item again (default: skip items already scored)")
    add_device_arguments(p)
    p.set_defaults(func=run)


def add_seg_model_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--seg-model``, ``--min-fidelity`` and the prediction window (shared with synthesize).

    No package import here: building the parser must not load numpy (``diffmix --help`` stays
    fast); None stands for :data:`napari_diffmix.fidelity_records.DEFAULT_MIN_FIDELITY`, which
    the help names (a test keeps the two equal)."""
    p.add_argument("--seg-model", type=Path, required=required,
                   help="segmentation model folder from 'diffmix train-seg', or 'demo' (the bundled demo model)")
    p.add_argument(
        "--min-fidelity", type=float, metavar="PQ",
        help="threshold recorded in the store: its TRAINING.md / train.sh leave out items below it (default 0.5)",
    )
    p.add_argument("--seg-window", type=int, default=256, help="prediction window in px (default 256)")


def load_scorer_from_args(args: argparse.Namespace):
    from ..fidelity import load_scorer
    from ..runtime import resolve_device

    return load_scorer(args.seg_model, device=str(resolve_device(args.device)), window=args.seg_window,
                       overlap=min(64, args.seg_window // 4))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..fidelity import DEFAULT_MIN_FIDELITY, score_store

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    scorer = load_scorer_from_args(args)
    threshold = DEFAULT_MIN_FIDELITY if args.min_fidelity is None else args.min_fidelity
    result = score_store(args.store, scorer, min_fidelity=threshold, rescore=args.rescore)
    s = result.attrs["summary"]
    print(f"scored {result.scored_now} item(s) in {result.seconds:.1f} s, {result.skipped} already scored; "
          f"{s['items_scored']} of {result.finished} finished items have a score")
    if s["items_scored"]:
        means = ", ".join(f"{k} {s[f'mean_{k}']:.3f}" for k in ("pq", "dice", "f_d", "rare_recall") if s.get(f"mean_{k}") is not None)
        print(f"mean fidelity: {means}")
    if result.stopped:
        why = f" by {result.signal}" if result.signal else ""
        print(f"stopped{why}; run the same command again to continue")
        import signal

        # As synthesize: 128 + the signal number when a signal left items unscored.
        return 128 + int(getattr(signal, result.signal)) if result.signal else 0
    from ..fidelity import training_fidelity
    from ..store import open_store

    fid = training_fidelity(open_store(args.store))
    if fid:
        print(f"training files: PQ >= {fid['threshold']:g} keeps {fid['kept']} of {fid['finished']} items "
              f"(diffmix export ... --min-fidelity {fid['threshold']:g})")
    return 0
