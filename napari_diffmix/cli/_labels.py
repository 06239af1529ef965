"""``diffmix labels``: plan and write class-balanced synthetic label-map patches."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._common import add_dataset_arguments, add_plan_arguments, plan_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "labels",
        help="synthesise class-balanced label-map patches (balancing and enlarging maps)",
        description=(
            "Plan a synthetic set of label-map patches that raises rare nuclei classes (GradMix-style balancing "
            "maps, DiffMix enlarging maps), print the class distribution before and after, and write the patches "
            "as a generic dataset folder with per-patch provenance and the plan (plan.json) for image synthesis."
        ),
    )
    add_dataset_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (required unless --dry-run)")
    add_plan_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="plan seed; the same seed gives identical patches (default 0)")
    b = p.add_argument_group("balancing rules (published defaults)")
    b.add_argument("--border", type=int, default=30, help="px: nuclei with a centroid this close to the tile edge stay (default 30)")
    b.add_argument("--target-fraction", type=float, default=0.8, help="share of eligible major nuclei drawn as targets (default 0.8)")
    b.add_argument("--dilation", type=int, default=2, help="px the target grows before the fit test (default 2)")
    b.add_argument("--fit-ratio", type=float, default=2.3, help="dilated target area >= RATIO x donor area (default 2.3)")
    e = p.add_argument_group("enlarging rules (published defaults)")
    e.add_argument("--band", type=int, default=32, help="px: nuclei touching this outer band stay (default 32)")
    e.add_argument("--shift-range", type=int, nargs=2, default=(-15, 14), metavar=("LOW", "HIGH"), help="inclusive shift range in px (default -15 14)")
    e.add_argument("--shift-prob", type=float, default=0.3, help="chance of a shift along each axis (default 0.3)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier 'diffmix labels' output in --out (never another folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import atomic_dir, write_json, write_text
    from ..datasets import Tile, open_dataset, write_generic
    from ..errors import DatasetError
    from ..mixing import BalanceParams, EnlargeParams, MixCache, iter_items, plan_balanced_set
    from ..outputs import check_replace, refuse_overlap
    from ..progress import progress_bar

    out: Path | None = args.out
    if out is None and not args.dry_run:
        raise DatasetError("--out is required (or pass --dry-run to only print the plan)")
    if out is not None and not args.dry_run:
        refuse_overlap(out, [args.dataset, args.scheme])
        check_replace(out, args.overwrite, ["labels"])

    dataset = open_dataset(args.dataset, args.scheme, args.layout)
    scheme = dataset.scheme
    balance = BalanceParams(args.border, args.target_fraction, args.dilation, args.fit_ratio)
    enlarge = EnlargeParams(args.band, tuple(args.shift_range), args.shift_prob)
    cache = MixCache(dataset)
    plan = plan_balanced_set(dataset, **plan_kwargs(args, scheme), balance=balance, enlarge=enlarge, cache=cache)
    where = dataset.root if dataset.root is not None else args.dataset
    rare_names = ", ".join(scheme.class_name(k) for k in plan.rare)
    print(f"{where}: {len(dataset)} tile(s), scheme {scheme.name}, rare: {rare_names}; plan seed {plan.seed}")
    print(plan.table())
    missed = args.target_share is not None and not plan.reached  # a stated goal: scripts must see it missed
    if args.dry_run:
        return 1 if missed else 0

    records: list[dict] = []
    synthetic = np.zeros_like(plan.original_counts)

    def tiles():
        for i, inst_map, type_map, prov in iter_items(plan, dataset, cache=cache):
            y, x = prov["origin"]
            name = f"{i:06d}_{prov['tile_name']}_y{y}_x{x}"
            prov["name"] = name
            records.append(prov)
            for k, cname in enumerate(scheme.names, start=1):
                synthetic[k] += prov["nuclei"][cname]
            yield Tile(name, None, inst_map, type_map, source=f"plan item {i}")

    if not plan.items:
        print("nothing to write: the plan has no patches" + ("" if plan.reached else " (the goal cannot be reached)"))
        return 0 if plan.reached else 1
    with atomic_dir(out) as tmp, progress_bar(None, len(plan.items), "labels", unit="patch") as bar:
        write_generic(tiles(), tmp, scheme=scheme, overwrite=True, pbar=bar, kind="labels")
        write_json(tmp / "provenance.json", {"plan_seed": plan.seed, "patches": records})
        plan.save(tmp / "plan.json")
        write_text(tmp / "summary.txt", plan.table(synthetic) + "\n")
    print()
    print(plan.table(synthetic))
    print(f"wrote {len(records)} label-map patches to {os.fspath(out)} (generic layout; provenance.json, plan.json)")
    if missed:
        print(f"diffmix labels: --target-share {args.target_share:g} NOT reached: {plan.reason}", file=sys.stderr)
        return 1
    return 0
