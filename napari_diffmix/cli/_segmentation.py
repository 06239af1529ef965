"""``diffmix train-seg``, ``diffmix predict`` and ``diffmix compare``: the downstream
HoVer-Net-style nuclei segmentation and classification network."""

from __future__ import annotations

import argparse
import os
import sys

from ._common import SCHEME_HELP, PRECISIONS, add_device_arguments, add_layout_argument

TRAIN_EPILOG = """examples:
  diffmix train-seg --data /data/CoNSeP/Train --scheme consep --out models/hovernet --steps 20000
  diffmix train-seg --data /data/CoNSeP/Train --scheme consep --synthetic synthetic.zarr --out models/hovernet+syn
  diffmix train-seg --out models/hovernet --resume          # continue after Ctrl-C / a crash (same data and settings)
  diffmix train-seg --out models/hovernet --resume --steps 40000   # train a finished model further
  torchrun --nproc_per_node=4 -m napari_diffmix train-seg --data /data/CoNSeP/Train --scheme consep --out models/h

The model folder is also the checkpoint: it is rewritten atomically every --checkpoint-every
steps, at the end and on Ctrl-C / SIGTERM, with train_state.pt (optimizer, step, history, RNG
states) beside the weights. --resume continues from it and ends with the weights an
uninterrupted run would have had; the run's data, scheme and settings are reused unless given.
"""

PREDICT_EPILOG = """examples:
  diffmix predict models/hovernet /data/CoNSeP/Test --out runs/pred
  diffmix predict models/hovernet slide_tiles/ --out runs/pred     # a folder of PNG/TIFF images
"""

COMPARE_EPILOG = """examples:
  diffmix compare --data /data/CoNSeP/Train --synthetic synthetic.zarr --test /data/CoNSeP/Test \\
      --scheme consep --steps 20000 --out runs/compare

Trains the same model twice (same seed, settings and step budget): on the data alone and on
the data plus the synthetic store; both predict the test set; prints per-class F1 and every
other metric for both runs and their difference. OUT/report.html shows the same on one
self-contained page (per-class F1 side by side, rare class first).
"""


# Training options default to "not given" (None) so that --resume can tell them from the
# run's own settings; _configs fills in these defaults (SegTrainConfig's and the preset).
TRAIN_OPTIONS = (
    "steps", "batch_size", "crop_size", "lr", "weight_decay", "seed", "checkpoint_every", "device", "precision", "synthetic_share",
)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--preset", choices=("tiny", "demo", "small", "base"), help="network size (default: small; demo: the bundled demo model's)")
    g.add_argument("--width", type=int, help="base channel width (overrides the preset's)")
    g.add_argument("--steps", type=int, help="training steps in all (default: 2000)")
    g.add_argument("--batch-size", type=int, help="crops per step and process (default: 8)")
    g.add_argument("--crop-size", type=int, help="training crop size in px (default: 256)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--seed", type=int, help="seed for weights and crops (default: 0)")
    g.add_argument("--checkpoint-every", type=int, help="save the model and its training state every N steps (default: 500)")
    g.add_argument(
        "--synthetic-share", type=float, metavar="S",
        help="share of the training crops drawn from the --synthetic store, 0-1 (default: its share of the training "
             "pixels; DiffMix's recipe, every patch alike: synthetic patches / all patches)",
    )
    h = p.add_argument_group("hardware")
    add_device_arguments(h, default=None)
    h.add_argument(
        "--precision", choices=PRECISIONS,
        help="autocast dtype (default: auto: bf16, or fp16 with loss scaling, on GPU; fp32 on CPU)",
    )


def _predict_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--window", type=int, default=256, help="sliding window size in px (default: 256)")
    g.add_argument("--overlap", type=int, default=64, help="window overlap in px (default: 64)")
    g.add_argument("--infer-batch", type=int, default=4, help="windows per forward pass (default: 4)")


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
        "train-seg",
        help="train the downstream HoVer-Net on a dataset (optionally + a synthetic store)",
        description="Train a compact HoVer-Net (NP, HV and TP branches) for nuclei segmentation and classification.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--data", help="training dataset folder (CoNSeP/GLySAC, generic, PanNuke) or 'demo'")
    t.add_argument("--scheme", help=SCHEME_HELP)
    add_layout_argument(t, of="--data")
    t.add_argument("--synthetic", help="synthetic zarr store to add to the training pool (alone if --data is not given)")
    t.add_argument(
        "--synthetic-min-fidelity", type=float, metavar="PQ",
        help="use only the synthetic items whose label fidelity ('diffmix score') reaches PQ",
    )
    t.add_argument("--out", "-o", required=True, help="model folder to write (model.safetensors, config.json, train_state.pt)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    again.add_argument(
        "--resume", action="store_true",
        help="continue the run saved in --out (or extend it with a larger --steps); a new run if --out is empty",
    )
    _model_args(t)
    t.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "predict",
        help="segment and classify nuclei in tiles with a trained model",
        description="Run a trained segmentation model on tiles; writes a generic dataset folder.",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder from 'diffmix train-seg'")
    p.add_argument("tiles", help="dataset folder, zarr store, image file or folder of images")
    p.add_argument("--out", "-o", required=True, help="output folder (images/, inst_maps/, type_maps/, scheme.json)")
    p.add_argument("--scheme", help="class scheme to parse labels in TILES with, if any (default: the folder's, else the model's)")
    add_layout_argument(p, of="TILES")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_device_arguments(p, threads=False)
    _predict_args(p)
    p.set_defaults(func=run_predict)

    c = subparsers.add_parser(
        "compare",
        help="train baseline vs baseline + synthetic with one budget and compare per-class F1",
        description="Measure what a synthetic store adds: two identical training runs, one test set.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--data", required=True, help="training dataset folder or 'demo'")
    c.add_argument("--synthetic", required=True, help="synthetic zarr store added in the second run")
    c.add_argument("--test", required=True, help="test dataset folder with ground truth")
    c.add_argument("--scheme", help="class scheme (default: the training dataset's)")
    add_layout_argument(c, of="--data")
    add_layout_argument(c, "--test-layout", of="--test")
    c.add_argument("--out", "-o", required=True, help="folder for both models, predictions and results")
    c.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    _model_args(c)
    _predict_args(c)
    c.set_defaults(func=run_compare)


def _configs(args: argparse.Namespace, num_classes: int, saved: dict | None = None):
    """(SegConfig, SegTrainConfig) from the options; ``saved``, a resumed model folder's
    config.json, supplies what the options leave out instead of the defaults."""
    import dataclasses

    from ..errors import DiffMixError
    from ..seg.model import SegConfig
    from ..seg.train import SegTrainConfig

    if saved is not None and args.preset is None and args.width is None:
        model_config = SegConfig.from_dict(saved["model"])
    else:
        overrides = {} if args.width is None else {"width": args.width}
        try:
            model_config = SegConfig.preset(args.preset or "small", num_classes, **overrides)
        except ValueError as exc:
            raise DiffMixError(str(exc)) from None
    base = SegTrainConfig.from_dict(saved["training"]["train"]) if saved is not None else SegTrainConfig()
    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    if args.threads is not None:
        given["num_threads"] = args.threads
    return model_config, dataclasses.replace(base, **given)


def _predict_kwargs(args: argparse.Namespace) -> dict:
    from ..errors import DiffMixError

    if args.window < 16 or not 0 <= args.overlap < args.window or args.infer_batch < 1:
        raise DiffMixError(
            f"need --window >= 16, 0 <= --overlap < --window and --infer-batch >= 1; got {args.window}, {args.overlap}, {args.infer_batch}"
        )
    return {"window": args.window, "overlap": args.overlap, "batch_size": args.infer_batch}


def _saved_run(out: str) -> dict | None:
    """config.json of the model folder --resume continues (None: nothing there yet)."""
    from pathlib import Path

    from ..seg.checkpoint import CONFIG, read_seg_meta

    folder = Path(out)
    return read_seg_meta(folder) if (folder / CONFIG).is_file() else None


def run_train(args: argparse.Namespace) -> int:
    import logging

    from ..classes import ClassScheme, load_scheme
    from ..datasets import open_dataset
    from ..errors import DiffMixError, SchemeError
    from ..outputs import refuse_overlap
    from ..seg.data import open_synthetic_store
    from ..seg.train import train_segmentation

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    saved = _saved_run(args.out) if args.resume else None
    if saved is not None:
        # What the run was trained on, unless given again (then it must be the same data).
        was = saved.get("training", {})
        if args.data is None and args.synthetic is None:
            args.data, args.synthetic = was.get("data"), was.get("synthetic")
            if args.layout == "auto":
                args.layout = was.get("layout") or "auto"
        if args.scheme is None:
            args.scheme = ClassScheme.from_dict(saved["scheme"], source=f"{args.out}/config.json")
    if args.data is None and args.synthetic is None:
        raise DiffMixError("give --data, --synthetic or both: there is nothing to train on")
    refuse_overlap(args.out, [args.data, args.synthetic])
    data = None if args.data is None else open_dataset(args.data, args.scheme, args.layout)
    scheme = data.scheme if data is not None else (load_scheme(args.scheme) if args.scheme else None)
    min_fid = getattr(args, "synthetic_min_fidelity", None)
    if min_fid is not None and args.synthetic is None:
        raise DiffMixError("--synthetic-min-fidelity needs --synthetic")
    store = None if args.synthetic is None else open_synthetic_store(args.synthetic, scheme, min_fidelity=min_fid)
    if store is not None and store.selection is not None:
        print(f"{args.synthetic}: label fidelity {store.selection.text()}")
    scheme = scheme or store.scheme
    if scheme is None:
        raise SchemeError(f"{args.synthetic}: the store records no class scheme; pass --scheme")
    model_config, train_config = _configs(args, scheme.num_classes, saved)
    result = train_segmentation(
        data,
        scheme=scheme,
        synthetic=store,
        model_config=model_config,
        config=train_config,
        out_dir=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        record={"data": args.data, "synthetic": args.synthetic, "layout": args.layout,
                **({} if store is None or store.selection is None else {"synthetic_fidelity": store.selection.to_dict()})},
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (and saves)
        return 0
    if result.interrupted:
        print(f"stopped at step {result.steps} of {train_config.steps}; the model and its training state are saved. "
              f"Continue with: diffmix train-seg --out {args.out} --resume", file=sys.stderr)
    if result.realised_shares:
        from ..data.crops import share_summary

        print(f"crops drawn: {share_summary(result.requested_shares, result.realised_shares)}")
    loss = f", final loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    steps = f"steps {result.start_step}-{result.steps}" if result.start_step else f"{result.steps} steps"
    print(f"trained {steps} in {result.elapsed_s:.0f} s{loss}; model saved to {result.out_dir}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..seg.checkpoint import load_seg_model
    from ..seg.data import open_tiles
    from ..outputs import refuse_overlap
    from ..runtime import resolve_device
    from ..seg.predict import predict_to_folder

    kwargs = _predict_kwargs(args)
    refuse_overlap(args.out, [args.tiles, args.model])
    model, info = load_seg_model(args.model, resolve_device(args.device))
    has_own = (Path(args.tiles) / "scheme.json").is_file()
    scheme = args.scheme if args.scheme else (None if has_own else info.scheme)
    # Only the images are used; the scheme just lets the reader parse any labels present.
    tiles = open_tiles(args.tiles, scheme, args.layout, allow_images=True)
    out = predict_to_folder(model, tiles, args.out, info.scheme, overwrite=args.overwrite, **kwargs)
    print(f"wrote {len(tiles)} predicted tile(s) to {out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..datasets import open_dataset
    from ..outputs import refuse_overlap
    from ..seg.compare import compare
    from ..seg.data import open_synthetic_store

    refuse_overlap(args.out, [args.data, args.test, args.synthetic])
    data = open_dataset(args.data, args.scheme, args.layout)
    test = open_dataset(args.test, args.scheme if args.scheme else data.scheme, args.test_layout)
    store = open_synthetic_store(args.synthetic, data.scheme)  # fail before any training
    model_config, train_config = _configs(args, data.scheme.num_classes)
    result = compare(
        data,
        store,
        test,
        args.out,
        scheme=data.scheme,
        model_config=model_config,
        config=train_config,
        overwrite=args.overwrite,
        predict_kwargs=_predict_kwargs(args),
    )
    print(result.table())
    print(result.shares_line())
    from ..report import comparison_report
    from ..seg.compare import REPORT

    report = comparison_report(result, result.out_dir / REPORT)
    print(f"wrote {result.out_dir / 'compare.json'} and {report} (open it in a browser)")
    return 0
