"""``diffmix labels``: plan and write class-balanced synthetic label-map patches."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

_KIND_HELP = (
    "kinds of synthetic patch: --balance (rare-class insertion), --enlarge (nucleus shifts); "
    "both flags make both kinds, as DiffMix does; add --combined to apply both maps to every patch instead. "
    "Default: --balance --enlarge"
)


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
    p.add_argument("dataset", help="dataset folder, or 'demo' for the bundled demo tile")
    p.add_argument("--out", type=Path, default=None, help="output folder (required unless --dry-run)")
    p.add_argument(
        "--scheme", default=None, help="class scheme: consep, glysac, demo or a JSON/YAML file (default: the folder's scheme.json)"
    )
    p.add_argument("--layout", default="auto", choices=("auto", "consep", "generic", "pannuke"), help="dataset layout (default: detect)")
    kinds = p.add_argument_group("maps", _KIND_HELP)
    kinds.add_argument("--balance", action="store_true", help="make balancing patches")
    kinds.add_argument("--enlarge", action="store_true", help="make enlarging patches")
    kinds.add_argument("--combined", action="store_true", help="apply balancing and enlarging to every patch")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--patches", type=int, default=None, metavar="N", help="number of synthetic patches")
    goal.add_argument(
        "--target-share", type=float, default=None, metavar="PCT",
        help="add patches until every class holds at least PCT %% of the nuclei (default goal: as many patches as the original set)",
    )
    p.add_argument(
        "--rare", nargs="+", default=None, metavar="CLASS",
        help="rare class names or ids (default: the scheme's); several share the targets, rarest first by nuclei count",
    )
    p.add_argument("--patch-size", type=int, default=256, help="patch size in px (default 256)")
    p.add_argument("--stride", type=int, default=76, help="patch grid stride in px (default 76: 10x10 patches per 1000 px tile)")
    p.add_argument("--seed", type=int, default=0, help="plan seed; the same seed gives identical patches (default 0)")
    p.add_argument("--max-variants", type=int, default=4, help="with --target-share: re-balancings of each tile to draw from (default 4)")
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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)


def _rare_ids(scheme, values):
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


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import atomic_dir, write_json, write_text
    from ..datasets import Tile, open_dataset, write_generic
    from ..errors import DatasetError
    from ..mixing import BalanceParams, EnlargeParams, MixCache, iter_items, plan_balanced_set
    from ..progress import progress_bar

    out: Path | None = args.out
    if out is None and not args.dry_run:
        raise DatasetError("--out is required (or pass --dry-run to only print the plan)")
    if out is not None and not args.dry_run:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise DatasetError("output exists and is not empty; pass --overwrite to replace it", out)
        src = Path(args.dataset)
        if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
            raise DatasetError("--out must not be the dataset folder or one of its parents", out)

    dataset = open_dataset(args.dataset, args.scheme, args.layout)
    scheme = dataset.scheme
    if args.combined:
        maps = ["balance+enlarge"]
    elif args.balance or args.enlarge:
        maps = [m for m, on in (("balance", args.balance), ("enlarge", args.enlarge)) if on]
    else:
        maps = ["balance", "enlarge"]
    balance = BalanceParams(args.border, args.target_fraction, args.dilation, args.fit_ratio)
    enlarge = EnlargeParams(args.band, tuple(args.shift_range), args.shift_prob)
    cache = MixCache(dataset)
    plan = plan_balanced_set(
        dataset, patches=args.patches, target_share=args.target_share, maps=maps, rare=_rare_ids(scheme, args.rare),
        patch_size=args.patch_size, stride=args.stride, balance=balance, enlarge=enlarge, seed=args.seed,
        max_variants=args.max_variants, cache=cache,
    )
    where = dataset.root if dataset.root is not None else args.dataset
    rare_names = ", ".join(scheme.class_name(k) for k in plan.rare)
    print(f"{where}: {len(dataset)} tile(s), scheme {scheme.name}, rare: {rare_names}; plan seed {plan.seed}")
    print(plan.table())
    if args.dry_run:
        return 0

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
        write_generic(tiles(), tmp, scheme=scheme, overwrite=True, pbar=bar)
        write_json(tmp / "provenance.json", {"plan_seed": plan.seed, "patches": records})
        plan.save(tmp / "plan.json")
        write_text(tmp / "summary.txt", plan.table(synthetic) + "\n")
    print()
    print(plan.table(synthetic))
    print(f"wrote {len(records)} label-map patches to {os.fspath(out)} (generic layout; provenance.json, plan.json)")
    return 0
