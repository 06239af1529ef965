"""``diffmix train``: train, fine-tune or resume the label-conditioned diffusion model.

Every option defaults to "not given" so that a preset, or with ``--resume`` the run's own
saved config, supplies the value unless the user overrides it. Under ``torchrun`` the same
command trains with one process per GPU (or CPU process with gloo).

``--extra-labels LABELS_DIR ...`` adds the balancing/enlarging label maps that ``diffmix
labels`` wrote, each trained with the original image of the window it was cut from: the
folder's ``provenance.json`` names the source tile (matched by name among the training
datasets) and the window. Plan the maps from the same data the model trains on. The data
(datasets, ``--val``, ``--extra-labels``) is remembered in the run's ``data.json``, so
``--resume`` needs none of it again; ``--resume --extra-labels ...`` replaces the folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ._common import (
    PRECISIONS,
    SCHEME_HELP,
    add_device_arguments,
    add_layout_argument,
    export_only_paths,
    open_training_data,
    resumed_run_dir,
    saved_scheme,
)

EPILOG = """examples:
  diffmix train demo --preset demo --out runs/demo
  diffmix train /data/CoNSeP/Train --scheme consep --preset diffmix-consep --out runs/consep
  diffmix labels /data/CoNSeP/Train --scheme consep --out labels-consep   # balancing + enlarging maps
  diffmix train /data/CoNSeP/Train --scheme consep --extra-labels labels-consep --out runs/consep-mix
  diffmix train --resume --out runs/consep                     # continue after Ctrl-C / a crash
  diffmix train /data/CoNSeP/Train --scheme consep --preset diffmix-consep --init consep.pt --stages 4100:2e-5:0.2
  torchrun --nproc_per_node=4 -m napari_diffmix train /data/CoNSeP/Train --scheme consep --preset diffmix-consep
  diffmix train --export-only --resume --out runs/demo --export demo-model
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the label-conditioned diffusion model (presets, resume, torchrun DDP)",
        description="Train, fine-tune or resume the SDM diffusion model on H&E tiles with nuclei label maps.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="*", help="datasets: CoNSeP/GLySAC/generic folders, PanNuke npy, or 'demo' (the bundled tile's training split)")
    p.add_argument("--scheme", help=SCHEME_HELP)
    add_layout_argument(p, of="the datasets")
    p.add_argument(
        "--extra-labels", nargs="+", metavar="LABELS_DIR",
        help="`diffmix labels` output folders: train their balancing/enlarging maps as extra conditions, each with the "
             "original image of its window in the training tile its provenance.json names (remembered for --resume)",
    )
    p.add_argument(
        "--extra-share", type=float, metavar="S",
        help="share of the training crops drawn from the --extra-labels maps, 0-1 (default: their share of the "
             "training pixels); remembered for --resume",
    )
    p.add_argument("--val", nargs="*", help="held-out datasets whose label maps the sample grids render ('demo' = the demo's held-out split)")
    p.add_argument("--preset", choices=_preset_names(), help="training recipe (default: demo, or the run's own with --resume)")
    p.add_argument("--out", "-o", help="run folder: checkpoints, log.csv, samples, exported model (default: runs/<preset>)")
    p.add_argument("--config", help="a TrainConfig JSON file (e.g. a run's config.json) to start from")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--model", help="UNet preset name (demo, tiny, diffmix-consep, diffmix-glysac, diffmix-lizard) or a UNet config JSON file")
    g.add_argument("--init", help="fine-tune from this model (a native .safetensors or an official SDM/DiffMix .pt, read with the --model/preset architecture)")
    g.add_argument("--stages", help="stages as STEPS:LR:COND_DROPOUT,... e.g. 5900:1e-4:0,4100:2e-5:0.2")
    g.add_argument("--steps", type=int, help="total steps (stage lengths are scaled to it)")
    g.add_argument("--lr", type=float, help="learning rate for every stage")
    g.add_argument("--cond-dropout", type=float, help="fraction of samples trained with an all-zero condition, every stage")
    g.add_argument("--batch-size", type=int, help="samples per step and process")
    g.add_argument("--crop-size", type=int, help="random crop size in px")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--ema-rate", type=float, help="EMA decay (0.9999 published)")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, help="rate = min(rate, (1+k)/(10+k))")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no flips/rotations")
    g.add_argument("--timesteps", dest="num_timesteps", type=int, help="diffusion steps (1000)")
    g.add_argument("--noise-schedule", choices=("linear", "cosine"))
    g.add_argument("--guidance", type=float, help="default classifier-free guidance stored with the model and used for sample grids")
    h = p.add_argument_group("hardware")
    add_device_arguments(h, torchrun=True, default=None)
    h.add_argument("--precision", choices=PRECISIONS, help="autocast dtype (auto: bf16/fp16 on GPU, fp32 on CPU)")
    h.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward: less memory")
    h.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC activations (faster convolutions on CPUs and tensor cores)")
    h.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    h.add_argument("--seed", type=int)
    r = p.add_argument_group("checkpoints and monitoring")
    r.add_argument("--resume", nargs="?", const="auto", help="continue the run in --out (or from this checkpoint / run folder)")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps (also on Ctrl-C/SIGTERM and at the end)")
    r.add_argument("--keep", dest="keep_last", type=int, help="checkpoints to keep")
    r.add_argument("--log-every", type=int, help="log.csv row every N steps")
    r.add_argument("--sample-every", type=int, help="EMA sample grid PNG every N steps (0 = never)")
    r.add_argument("--sample-steps", type=int, help="sampler steps for the grids")
    r.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps in this invocation")
    r.add_argument("--export", help="where to write the EMA model (default: <out>/model.safetensors at the end of training)")
    r.add_argument("--export-only", action="store_true", help="do not train: export the EMA weights of --resume's checkpoint")
    p.set_defaults(func=run)


def _preset_names() -> tuple[str, ...]:
    return ("demo", "tiny", "diffmix-consep", "diffmix-glysac", "diffmix-lizard")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..errors import TrainingError
    from ..outputs import refuse_overlap
    from ..train import TrainConfig, export_checkpoint, train

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    out = Path(args.out) if args.out else None
    if args.export_only:
        path = export_checkpoint(*export_only_paths(args, out))
        print(f"exported EMA model to {path}")
        return 0

    # Base config: --config file > the resumed run's own config.json > preset.
    run_dir = resumed_run_dir(args, out)
    saved = None
    if args.config:
        saved = _read_config(Path(args.config))
    elif run_dir is not None and (run_dir / "config.json").is_file():
        saved = _read_config(run_dir / "config.json")
        if args.preset:
            raise TrainingError(f"--preset cannot change the recipe of the run in {run_dir}; override single options instead")
    overrides = {
        k: getattr(args, k)
        for k in ("batch_size", "crop_size", "weight_decay", "ema_rate", "ema_warmup", "augment", "num_timesteps",
                  "noise_schedule", "guidance", "device", "precision", "grad_checkpointing", "channels_last", "grad_clip",
                  "seed", "save_every", "keep_last", "log_every", "sample_every", "sample_steps", "init", "extra_share")
        if getattr(args, k) is not None
    }
    if args.threads is not None:
        overrides["num_threads"] = args.threads
    overrides["out_dir"] = str(out or run_dir or (saved.out_dir if saved is not None else Path("runs") / (args.preset or "demo")))
    if args.model:
        overrides["model"] = _read_json(Path(args.model), "UNet config") if args.model.endswith(".json") else args.model
    # The preset sees the overrides: its precision depends on the device chosen.
    config = dataclasses.replace(saved, **overrides) if saved is not None else TrainConfig.from_preset(args.preset or "demo", **overrides)
    config = dataclasses.replace(config, stages=_stages(config, args))
    config.validate()

    # The data a run was started with is remembered so that --resume needs no repetition.
    data_file = Path(config.out_dir) / "data.json"
    # Folders are stored absolute: a resumed run may start from another working directory.
    extra = [str(Path(d).resolve()) for d in args.extra_labels] if args.extra_labels else None
    specs = {"data": args.data, "val": args.val, "scheme": args.scheme, "layout": args.layout, "extra_labels": extra}
    if not args.data and args.resume is not None and data_file.is_file():
        specs = {"extra_labels": None, **json.loads(data_file.read_text(encoding="utf-8"))}
        if extra:
            specs["extra_labels"] = extra
    inputs = [*(specs["data"] or []), *(specs["val"] or []), *(specs["extra_labels"] or []), config.init]
    refuse_overlap(config.out_dir, inputs)
    if args.export:
        refuse_overlap(args.export, inputs, flag="--export")
    data, scheme, val = open_training_data(argparse.Namespace(**specs), run_scheme=saved_scheme(config.out_dir) if args.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:
        from ..atomic import write_json

        write_json(data_file, specs)
    result = train(config, data, scheme=scheme, val=val, resume=args.resume, max_steps=args.max_steps,
                   extra_labels=specs["extra_labels"])
    if result.interrupted:
        print(f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}. "
              f"Continue with: diffmix train --resume --out {config.out_dir}", file=sys.stderr)
    if result.realised_shares and int(os.environ.get("RANK", "0")) == 0:
        from ..data.crops import share_summary

        print(f"crops drawn: {share_summary(result.requested_shares, result.realised_shares)}")
    if args.export and not result.interrupted:
        print(f"exported EMA model to {export_checkpoint(result.checkpoint, args.export)}")
    elif result.model_path is not None:
        print(f"exported EMA model to {result.model_path}")
    return 0


def _stages(config, args):
    from ..errors import TrainingError
    from ..train import Stage

    stages = config.stages
    if args.stages:
        try:
            parts = [s.split(":") for s in args.stages.split(",")]
            stages = tuple(Stage(int(p[0]), float(p[1]), float(p[2]) if len(p) > 2 else 0.0) for p in parts)
        except (ValueError, IndexError):
            raise TrainingError(f"--stages {args.stages!r}: expected STEPS:LR[:COND_DROPOUT],... e.g. 5900:1e-4:0,4100:2e-5:0.2") from None
    if args.steps is not None:
        total = sum(s.steps for s in stages)
        if args.steps < 1:
            raise TrainingError(f"--steps must be >= 1, got {args.steps}")
        # Scale stage lengths, the last stage absorbing rounding.
        scaled = [round(s.steps * args.steps / total) for s in stages[:-1]] if total else [0] * (len(stages) - 1)
        scaled.append(args.steps - sum(scaled))
        stages = tuple(Stage(n, s.lr, s.cond_dropout) for n, s in zip(scaled, stages))
    if args.lr is not None:
        stages = tuple(Stage(s.steps, args.lr, s.cond_dropout) for s in stages)
    if args.cond_dropout is not None:
        stages = tuple(Stage(s.steps, s.lr, args.cond_dropout) for s in stages)
    return stages


def _read_config(path: Path):
    from ..train import TrainConfig

    data = _read_json(path, "training config")
    for key in ("scheme", "model_config"):
        data.pop(key, None)
    return TrainConfig.from_dict(data)


def _read_json(path: Path, what: str):
    from ..errors import TrainingError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read the {what} ({exc})") from None
