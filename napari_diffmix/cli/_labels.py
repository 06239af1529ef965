"""``diffmix labels``: plan and write class-balanced synthetic label-map patches."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._common import add_dataset_arguments, add_plan_arguments, plan_spec


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
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier 'diffmix labels' output in --out (never another folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import atomic_dir, write_json, write_text
    from ..datasets import Tile, open_dataset, write_generic
    from ..errors import DatasetError
    from ..mixing import MixCache, iter_items, plan_balanced_set
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
    cache = MixCache(dataset)
    plan = plan_balanced_set(dataset, plan_spec(args, scheme), cache=cache)
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
