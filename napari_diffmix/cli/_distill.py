"""``diffmix distill``: distil a model into a few-step student (napari_diffmix.distill).

Options default to "not given" so that the preset, or with ``--resume`` the run's own saved
config and data, supply them. Under ``torchrun`` one process per GPU (or CPU process) distils.
"""

from __future__ import annotations

import argparse
import dataclasses
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
  diffmix distill demo --teacher napari_diffmix/resources/models/demo/demo.safetensors --out runs/demo-fast
  diffmix distill /data/CoNSeP/Train --scheme consep --teacher consep.safetensors --steps-to 4 --out runs/consep-4
  diffmix distill /data/CoNSeP/Train --teacher ema_0.9999_010000.pt --teacher-preset diffmix-consep --out runs/c4
  diffmix distill --resume --out runs/demo-fast            # continue after Ctrl-C / a crash
  torchrun --nproc_per_node=4 -m napari_diffmix distill /data/CoNSeP/Train --teacher consep.safetensors --out runs/c4
  diffmix distill --export-only --resume --out runs/demo-fast --export demo-fast.safetensors
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a model into a few-step student (one network pass per step, guidance folded in)",
        description="Train a student that renders in --steps-to steps what the teacher renders with guided DPM-Solver++ "
                    "in --teacher-steps; the student file records its sampler, steps and teacher, and renderers use them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="*", help="datasets whose label maps the student learns on ('demo' = the bundled tile's training split)")
    p.add_argument("--teacher", help="the model to distil: a native .safetensors or an official .pt (with --teacher-preset)")
    p.add_argument("--teacher-preset", help="architecture of an official .pt teacher (diffmix-consep, diffmix-glysac, diffmix-lizard)")
    p.add_argument("--scheme", help=SCHEME_HELP)
    add_layout_argument(p, of="the datasets")
    p.add_argument("--extra-labels", nargs="+", metavar="LABELS_DIR", help="`diffmix labels` output folders: more label maps to learn on")
    p.add_argument("--val", nargs="*", help="held-out datasets for the sample grids")
    p.add_argument("--preset", choices=("demo", "tiny"), help="distillation recipe (default: demo, or the run's own with --resume); demo is the bundled "
                        "student's first stage, README 3b gives the two that follow")
    p.add_argument("--out", "-o", help="run folder (default: runs/distill)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=("progressive",),
                   help="progressive: one DDIM step of the student lands on the teacher's state (the only method: "
                        "consistency distillation was measured against it and stays further from the teacher, README 3b)")
    g.add_argument("--steps-to", type=int, help="the student's sampling steps (default 4)")
    g.add_argument("--teacher-steps", type=int, help="the teacher's DPM-Solver++ steps, a multiple of --steps-to (default 12)")
    g.add_argument("--guidance", type=float, help="the teacher's CFG scale folded into the student (default: the teacher's)")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--lr", type=float)
    g.add_argument("--items", type=int, help="label-map crops per step (each gives --steps-to training pairs)")
    g.add_argument("--crop-size", type=int)
    g.add_argument("--crop-cycle", type=int, nargs="+", metavar="SIZE",
                   help="crop sizes taken in turn, step by step, each step with the pixels of --items crops of --crop-size")
    g.add_argument("--ema-rate", type=float)
    g.add_argument("--chain-weight", type=float,
                   help="weight of a loss on the student's whole run against the teacher's image (default 0: pairs only)")
    g.add_argument("--chain-from", type=int, help="the step from which the --chain-weight loss is on (default 0)")
    h = p.add_argument_group("hardware")
    add_device_arguments(h, torchrun=True, default=None)
    h.add_argument("--precision", choices=PRECISIONS, help="the student's training autocast (auto: fp32 on CPUs)")
    h.add_argument("--teacher-precision", choices=PRECISIONS, help="the teacher's sampling precision (auto: bf16 where native)")
    h.add_argument("--seed", type=int)
    r = p.add_argument_group("checkpoints and monitoring")
    r.add_argument("--resume", nargs="?", const="auto", help="continue the run in --out (or from this checkpoint / run folder)")
    r.add_argument("--save-every", type=int)
    r.add_argument("--log-every", type=int)
    r.add_argument("--sample-every", type=int, help="student sample grid PNG every N steps (0 = at the end only)")
    r.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps in this invocation")
    r.add_argument("--export", help="where to write the student (default: <out>/model.safetensors at the end)")
    r.add_argument("--export-only", action="store_true", help="do not train: export the student of --resume's checkpoint")
    p.set_defaults(func=run)


_OVERRIDES = ("teacher", "teacher_preset", "method", "steps_to", "teacher_steps", "guidance", "chain_weight", "chain_from",
              "steps", "lr", "items", "crop_size", "crop_cycle", "ema_rate", "device", "precision", "teacher_precision", "seed", "save_every", "log_every",
              "sample_every")


def run(args: argparse.Namespace) -> int:
    from ..distill import DistillConfig, distill, export_distill_checkpoint
    from ..errors import TrainingError
    from ..outputs import refuse_overlap

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    out = Path(args.out) if args.out else None
    if args.export_only:
        print(f"exported the student to {export_distill_checkpoint(*export_only_paths(args, out))}")
        return 0

    run_dir = resumed_run_dir(args, out)
    saved = None
    if run_dir is not None and (run_dir / "config.json").is_file():
        if args.preset:
            raise TrainingError(f"--preset cannot change the recipe of the run in {run_dir}; override single options instead")
        data = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(DistillConfig)}
        saved = DistillConfig.from_dict({k: v for k, v in data.items() if k in fields})
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if args.threads is not None:
        overrides["num_threads"] = args.threads
    overrides["out_dir"] = str(out or run_dir or Path("runs") / "distill")
    # The preset sees the overrides: its precision depends on the device chosen.
    config = dataclasses.replace(saved, **overrides) if saved is not None else DistillConfig.from_preset(args.preset or "demo", **overrides)
    config.validate()

    data_file = Path(config.out_dir) / "data.json"
    extra = [str(Path(d).resolve()) for d in args.extra_labels] if args.extra_labels else None
    specs = {"data": args.data, "val": args.val, "scheme": args.scheme, "layout": args.layout, "extra_labels": extra}
    if not args.data and args.resume is not None and data_file.is_file():
        specs = json.loads(data_file.read_text(encoding="utf-8"))
    refuse_overlap(config.out_dir, [*(specs["data"] or []), *(specs["val"] or []), *(specs["extra_labels"] or []), config.teacher])
    data, scheme, val = open_training_data(argparse.Namespace(**specs),
                                           run_scheme=saved_scheme(config.out_dir) if args.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:
        from ..atomic import write_json

        write_json(data_file, specs)
    result = distill(config, data, scheme=scheme, val=val, resume=args.resume, max_steps=args.max_steps,
                     extra_labels=specs["extra_labels"])
    if result.interrupted:
        print(f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}. "
              f"Continue with: diffmix distill --resume --out {config.out_dir}", file=sys.stderr)
        return 0
    if args.export:
        print(f"exported the student to {export_distill_checkpoint(result.checkpoint, args.export)}")
    elif result.model_path is not None:
        print(f"exported the student to {result.model_path}")
    return 0
