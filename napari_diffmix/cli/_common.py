"""Arguments several ``diffmix`` commands share, defined once (no command of its own)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

# datasets.LAYOUTS plus "auto"; spelled out so that building the parser imports no numpy/scipy.
LAYOUT_CHOICES = ("auto", "consep", "generic", "pannuke", "hovernet", "lizard", "conic", "geojson")
# runtime.PRECISIONS, spelled out for the same reason.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# model.samplers.SAMPLERS, spelled out for the same reason.
SAMPLER_CHOICES = ("dpm++2m", "ddim", "ddpm", "unipc", "ddim-logsnr")
SCHEME_HELP = "class scheme: consep, glysac, lizard, demo or a JSON/YAML file (default: the dataset's scheme.json)"

_MAPS_HELP = (
    "kinds of synthetic patch: --balance (rare-class insertion), --enlarge (nucleus shifts); "
    "both flags make both kinds, as DiffMix does; add --combined to apply both maps to every patch instead. "
    "Default: --balance --enlarge"
)


def add_layout_argument(p: Any, flag: str = "--layout", of: str = "the dataset") -> None:
    p.add_argument(flag, default="auto", choices=LAYOUT_CHOICES, help=f"layout of {of} (default: auto, detected)")


def add_dataset_arguments(
    p: argparse.ArgumentParser, dataset_help: str = "dataset folder (CoNSeP/GLySAC, generic, PanNuke), or 'demo' for the bundled demo tile"
) -> None:
    """The positional ``dataset`` with ``--scheme`` and ``--layout`` (what ``open_dataset`` takes)."""
    p.add_argument("dataset", help=dataset_help)
    p.add_argument("--scheme", help=SCHEME_HELP)
    add_layout_argument(p)


def add_device_arguments(group: Any, *, threads: bool = True, torchrun: bool = False, default: str | None = "auto") -> None:
    """``--device`` (and ``--threads``) in an argument group.

    ``default=None`` leaves "not given" visible to commands that fill gaps from a saved config.
    """
    per_rank = "; under torchrun one GPU per rank" if torchrun else ""
    group.add_argument("--device", default=default, help=f"auto, cpu, cuda, cuda:N or mps (default: auto{per_rank})")
    if threads:
        group.add_argument("--threads", type=int, help="CPU threads for PyTorch")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The label-plan options of :func:`napari_diffmix.mixing.plan_balanced_set` (read back by :func:`plan_spec`)."""
    kinds = p.add_argument_group("label maps", _MAPS_HELP)
    kinds.add_argument("--balance", action="store_true", help="make balancing patches")
    kinds.add_argument("--enlarge", action="store_true", help="make enlarging patches")
    kinds.add_argument("--combined", action="store_true", help="apply balancing and enlarging to every patch")
    g = p.add_argument_group("plan")
    goal = g.add_mutually_exclusive_group()
    goal.add_argument("--patches", type=int, metavar="N", help="number of synthetic patches (default: as many as the original grid)")
    goal.add_argument("--target-share", type=float, metavar="PCT", help="add patches until every class holds at least PCT %% of the nuclei")
    g.add_argument(
        "--rare", nargs="+", metavar="CLASS",
        help="rare class names or ids (default: the scheme's); several share the targets, rarest first by nuclei count",
    )
    g.add_argument("--patch-size", type=int, default=256, help="patch size in px (default 256)")
    g.add_argument("--stride", type=int, default=76, help="patch grid stride in px (default 76: 10x10 patches per 1000 px tile)")
    g.add_argument("--max-variants", type=int, default=4, help="with --target-share: re-balancings of each tile to draw from (default 4)")
    b = p.add_argument_group("balancing rules (published defaults)")
    b.add_argument("--border", type=int, default=30, help="px: nuclei with a centroid this close to the tile edge stay (default 30)")
    b.add_argument("--target-fraction", type=float, default=0.8, help="share of eligible major nuclei drawn as targets (default 0.8)")
    b.add_argument("--dilation", type=int, default=2, help="px the target grows before the fit test (default 2)")
    b.add_argument("--fit-ratio", type=float, default=2.3, help="dilated target area >= RATIO x donor area (default 2.3)")
    e = p.add_argument_group("enlarging rules (published defaults)")
    e.add_argument("--band", type=int, default=32, help="px: nuclei touching this outer band stay (default 32)")
    e.add_argument("--shift-range", type=int, nargs=2, default=(-15, 14), metavar=("LOW", "HIGH"), help="inclusive shift range in px (default -15 14)")
    e.add_argument("--shift-prob", type=float, default=0.3, help="chance of a shift along each axis (default 0.3)")


def plan_maps(args: argparse.Namespace) -> list[str]:
    """The ``maps`` of a plan from --balance / --enlarge / --combined."""
    if args.combined:
        return ["balance+enlarge"]
    if args.balance or args.enlarge:
        return [m for m, on in (("balance", args.balance), ("enlarge", args.enlarge)) if on]
    return ["balance", "enlarge"]


def plan_spec(args: argparse.Namespace, scheme: Any):
    """The :class:`~napari_diffmix.mixing.PlanSpec` of :func:`add_plan_arguments`'s options and --seed."""
    from ..mixing import BalanceParams, EnlargeParams, PlanSpec

    rare = rare_ids(scheme, args.rare)
    return PlanSpec(
        patches=args.patches, target_share=args.target_share, maps=tuple(plan_maps(args)),
        rare=None if rare is None else tuple(rare), patch_size=args.patch_size, stride=args.stride,
        balance=BalanceParams(args.border, args.target_fraction, args.dilation, args.fit_ratio),
        enlarge=EnlargeParams(args.band, tuple(args.shift_range), args.shift_prob),
        seed=args.seed, max_variants=args.max_variants,
    )


def rare_ids(scheme: Any, values: Sequence[str] | None) -> list[int] | None:
    """Class ids from --rare names or ids (None: the scheme's own rare classes)."""
    from ..errors import SchemeError

    if values is None:
        return None
    ids = []
    for v in values:
        if v.isdigit():
            k = int(v)
            if not 1 <= k <= scheme.num_classes:
                raise SchemeError(f"--rare {v}: class ids of scheme {scheme.name!r} are 1..{scheme.num_classes}")
            ids.append(k)
        else:
            ids.append(scheme.class_id(v))
    return ids


# ---- training data and run folders (diffmix train, diffmix distill)


def saved_scheme(out_dir):
    """The class scheme in a run folder's config.json (None when there is none)."""
    path = Path(out_dir) / "config.json"
    if path.is_file():
        scheme = json.loads(path.read_text(encoding="utf-8")).get("scheme")
        if scheme:
            from ..classes import ClassScheme

            return ClassScheme.from_dict(scheme)
    return None


def export_only_paths(args: argparse.Namespace, out: Path | None) -> tuple[Path | str, Path]:
    """(checkpoint or run folder, model file) of ``--export-only``: ``--resume``'s checkpoint or
    ``--out``; ``--export`` or the run folder's ``model.safetensors``."""
    from ..errors import TrainingError

    source = args.resume if args.resume not in (None, "auto") else out
    if source is None:
        raise TrainingError("--export-only needs a checkpoint: --resume CKPT or --out RUN_FOLDER")
    return source, Path(args.export) if args.export else (run_dir_of(Path(source)) or Path(".")) / "model.safetensors"


def resumed_run_dir(args: argparse.Namespace, out: Path | None) -> Path | None:
    """The run folder ``--resume`` continues (None without ``--resume``)."""
    from ..errors import TrainingError

    if args.resume is None:
        return None
    run_dir = out if args.resume == "auto" else run_dir_of(Path(args.resume))
    if run_dir is None:
        raise TrainingError("--resume without a checkpoint path needs --out RUN_FOLDER")
    return run_dir


def run_dir_of(path: Path) -> Path | None:
    """The run folder a --resume argument (a run folder or one of its checkpoints) names."""
    if path.is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def open_training_data(args, run_scheme=None):
    """(training tiles, scheme, validation tiles) for the positional datasets and --val.

    ``demo`` means the bundled tile's training split; its held-out split becomes the
    validation set unless ``--val`` names one.
    """
    from ..classes import load_scheme
    from ..datasets import open_dataset
    from ..errors import DatasetError, SchemeError

    if not args.data:
        raise DatasetError("no training data given: name dataset folders, or 'demo' for the bundled tile")
    scheme = load_scheme(args.scheme) if args.scheme else run_scheme

    def opened(spec):
        if spec == "demo":
            from ..classes import DEMO
            from ..demo_data import demo_split

            return demo_split(), DEMO
        ds = open_dataset(spec, scheme=scheme, layout=args.layout)
        return ds, ds.scheme

    data, val = [], None
    for spec in args.data:
        tiles, ds_scheme = opened(spec)
        if spec == "demo":
            tiles, val = tiles.train, tiles.held_out if val is None else val
        if scheme is None:
            scheme = ds_scheme
        elif ds_scheme.names != scheme.names:
            raise SchemeError(f"dataset {spec!r} uses classes {list(ds_scheme.names)}, the model {list(scheme.names)}: one scheme per model")
        data.append(tiles)
    if args.val:
        val = []
        for spec in args.val:
            tiles, _ = opened(spec)
            val.append(tiles.held_out if spec == "demo" else tiles)
    return data, scheme, val
