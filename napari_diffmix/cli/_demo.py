"""``diffmix demo``: the whole DiffMix pipeline on the bundled demo, and ``diffmix demo-data``:
write the bundled demo dataset as a generic folder and print its classes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_device_arguments

EPILOG = """examples:
  diffmix demo-data --out diffmix-demo-data            # the 512x512 IHC tile + labels, class table
  diffmix demo-data --out demo-split --split           # train (x < 384) and held-out (x >= 384) crops
  diffmix stats diffmix-demo-data                      # read it back like any generic dataset
"""

DEMO_EPILOG = """examples:
  diffmix demo                                  # ./diffmix-demo/: demo.zarr, demo-montage.png, data/
  diffmix demo --patches 32 --patch-size 256    # more and larger patches (slower)
  diffmix demo --compare                        # + the miniature experiment: held-out rare-class F1 with and without the synthetic set
  napari diffmix-demo/demo.zarr                 # look at the result

Re-running continues an interrupted demo; changed settings replace the previous demo store.

--compare scores the demo store with the bundled demo segmentation model, then trains the small
segmentation network on the demo's training split alone, with every synthetic item and with the
better half of them by label fidelity (or those reaching --min-fidelity), once per seed, and
measures each model on the held-out strip: ./diffmix-demo/experiment/ gets demo-compare.json,
report.html and the models.
"""

DEMO_STORE = "demo.zarr"
DEMO_MONTAGE = "demo-montage.png"
DEMO_COMPARE = "experiment"  # not "compare": the printed 'diffmix compare' example writes there
DEMO_DATA = "data"
MONTAGE_ROWS = 6


def register(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser(
        "demo",
        help="run DiffMix on the bundled demo: balanced label maps -> rendered images -> zarr store + montage",
        description=(
            "The bundled demo end to end, offline, in a few minutes on a laptop CPU: the demo tile's label maps "
            "(training split), balancing and enlarging maps that raise the rare class, images rendered by the bundled "
            "demo model with the fast sampler (SDEdit from the original patches), a zarr store with provenance and "
            "training instructions, and a PNG montage (original | edited label map | rendered)."
        ),
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", "-o", type=Path, default=Path("diffmix-demo"), help="output folder (default: ./diffmix-demo)")
    d.add_argument("--model", "-m", type=Path, help="diffusion model (default: the bundled demo model)")
    d.add_argument("--patches", type=int, default=8, help="synthetic patches, half balancing, half enlarging (default 8)")
    d.add_argument("--patch-size", type=int, default=128, help="patch size in px (default 128)")
    d.add_argument("--stride", type=int, default=64, help="patch grid stride in px (default 64)")
    d.add_argument("--steps", type=int, help="DPM-Solver++ steps of the whole schedule (default: the fast sampler's, 15)")
    d.add_argument("--strength", type=float, help="SDEdit strength (default 0.55, DiffMix)")
    d.add_argument("--from-noise", action="store_true", help="render from pure noise instead of SDEdit from the original patch")
    d.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    d.add_argument("--batch-size", type=int, default=4, help="patches per sampler call (default 4)")
    d.add_argument("--seed", type=int, default=0, help="seed of the plan and the noise (default 0)")
    add_device_arguments(d)
    d.add_argument("--overwrite", action="store_true", help="replace another napari-diffmix store or demo data folder in --out (never a folder this tool did not write)")
    c = d.add_argument_group("the miniature experiment (--compare)")
    c.add_argument("--compare", action="store_true",
                   help="then train the small segmentation network without / with the synthetic set (unfiltered, filtered by "
                        "label fidelity) and report the held-out F1 per class, mean ± sd over the seeds")
    c.add_argument("--compare-steps", type=int, help="training steps of each run (default 150)")
    c.add_argument("--compare-batch-size", type=int, help="crops per training step (default 8)")
    c.add_argument("--seeds", type=int, nargs="+", help="one run per seed and training pool (default 0 1 2)")
    c.add_argument("--synthetic-share", type=float, metavar="S",
                   help="share of the training crops drawn from the synthetic items, 0-1 (default: their share of the training pixels)")
    c.add_argument("--seg-model", default="demo", help="segmentation model that scores the synthetic items (default: demo, the bundled one)")
    c.add_argument("--min-fidelity", type=float, metavar="PQ",
                   help="the filtered pool keeps the items whose label fidelity reaches PQ (default: the median PQ of the items, the better half)")
    d.set_defaults(func=run_demo)

    p = subparsers.add_parser(
        "demo-data",
        help="write the bundled demo dataset (no download) and print its class statistics",
        description=(
            "Write the demo dataset (scikit-image's immunohistochemistry tile with classically derived nuclei "
            "labels; classes other, epithelial, stromal) as a generic dataset folder: images/, inst_maps/, "
            "type_maps/ and scheme.json."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", "-o", type=Path, default=Path("diffmix-demo-data"), help="output folder (default: diffmix-demo-data)")
    p.add_argument(
        "--split",
        action="store_true",
        help="write the train crop (columns 0-383) and the held-out crop (columns 384-511) as two tiles",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo-data output (never another folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import dataset_stats, write_generic
    from ..demo_data import demo_dataset, demo_split_dataset

    dataset = demo_split_dataset() if args.split else demo_dataset()
    out = write_generic(dataset, args.out, overwrite=args.overwrite, kind="demo-data")
    stats = dataset_stats(dataset)
    print(f"wrote {len(dataset)} tile(s) ({', '.join(dataset.names)}) to {out}, scheme {dataset.scheme.name}")
    print(stats.table())
    if args.split:
        print()
        print(stats.tile_table())
    return 0


# -- diffmix demo ---------------------------------------------------------------------------------
def _demo_data(out: Path, overwrite: bool) -> tuple[Path, Path]:
    """Write (once) the demo's training and held-out tiles as generic folders under ``out/data``."""
    from ..classes import DEMO
    from ..datasets import Dataset, open_dataset, write_generic
    from ..demo_data import demo_split
    from ..outputs import check_replace

    split = demo_split()
    paths = []
    for tile, name in ((split.train, "train"), (split.held_out, "held-out")):
        folder = out / DEMO_DATA / name
        if folder.exists():
            try:
                names = open_dataset(folder).names
            except Exception:  # any unreadable folder is "not the demo's"
                names = None
            if names == [tile.name]:
                paths.append(folder)
                continue
            check_replace(folder, overwrite, ["demo-data"])
        write_generic(Dataset([tile], DEMO), folder, overwrite=True, kind="demo-data")
        paths.append(folder)
    return paths[0], paths[1]


def _store_owner(path: Path) -> str | None:
    """``created_by`` of an existing store, None when ``path`` holds none."""
    if not (path / "zarr.json").is_file():
        return None
    import zarr

    try:
        return str(zarr.open_group(str(path), mode="r").attrs.get("created_by"))
    except Exception:  # unreadable: treat as foreign
        return "unknown"


def montage(store_path: Path, dataset, rows: int = MONTAGE_ROWS, gap: int = 4):
    """uint8 RGB montage: one row per item (balancing and enlarging items alternate), columns
    original patch | edited label map | rendered image."""
    import numpy as np

    from ..store import open_store
    from ..train import label_preview

    store = open_store(store_path)
    scheme = store.scheme
    done = np.flatnonzero(store.done_mask())
    by_kind: dict[str, list[int]] = {}
    for i in done:
        by_kind.setdefault("+".join(store.provenance(int(i)).get("maps", [])), []).append(int(i))
    order = [i for group in zip(*by_kind.values()) for i in group] if by_kind else []
    order += [int(i) for i in done if int(i) not in order]
    chosen = order[:rows]
    if not chosen:
        return None
    h, w = store.patch_shape
    grid = np.full((len(chosen) * (h + gap) - gap, 3 * w + 2 * gap, 3), 255, np.uint8)
    for r, i in enumerate(chosen):
        item = store.item(i)
        y, x = item.provenance["origin"]
        original = dataset[int(item.provenance["tile"])].image[y : y + h, x : x + w]
        panels = (original, label_preview(item.inst_map, item.type_map, scheme), item.image)
        for c, panel in enumerate(panels):
            grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = panel
    return grid


def _shares(counts) -> list[float]:
    total = sum(int(v) for v in counts[1:])
    return [100.0 * int(v) / total if total else 0.0 for v in counts[1:]]


def run_demo(args: argparse.Namespace) -> int:
    import os

    from ..atomic import save_png
    from ..classes import DEMO
    from ..datasets import open_dataset
    from ..errors import DiffMixError
    from ..export import TRAIN_SH, TRAINING_DIR, TRAINING_MD
    from ..mixing import MixCache, PlanSpec, plan_balanced_set
    from ..model.checkpoint import require_bundled_model
    from ..outputs import refuse_overlap
    from ..seg.checkpoint import resolve_seg_model
    from ..synthesize import SynthesisJob, check_model_fits
    from ._synthesize import check_memory, check_model, job_summary, sampling_config

    out: Path = args.out
    compare_given = [f for f in ("compare_steps", "compare_batch_size", "seeds", "synthetic_share", "min_fidelity") if getattr(args, f) is not None]
    if compare_given and not args.compare:
        raise DiffMixError(f"--{compare_given[0].replace('_', '-')} is an option of --compare; add --compare")
    model = args.model if args.model is not None else require_bundled_model("pass --model")
    config = sampling_config(args, originals="reference")
    info = check_model(model, config)
    check_model_fits(info, DEMO, args.patch_size)  # the demo data's scheme: refused before anything is written
    check_memory(info, args.patch_size, config)
    seg_model = resolve_seg_model(args.seg_model) if args.compare else None  # "demo": the bundled folder, not ./demo
    for replaced in (out / DEMO_DATA, out / DEMO_STORE, out / DEMO_MONTAGE, out / DEMO_COMPARE):
        refuse_overlap(replaced, [model, seg_model])
    train_dir, held_out_dir = _demo_data(out, args.overwrite)
    dataset = open_dataset(train_dir)
    cache = MixCache(dataset)
    spec = PlanSpec(patches=args.patches, patch_size=args.patch_size, stride=args.stride, seed=args.seed)
    plan = plan_balanced_set(dataset, spec, cache=cache)
    store = out / DEMO_STORE
    owner = _store_owner(store)
    replace = args.overwrite or owner == "demo"
    job = SynthesisJob(
        dataset, plan, model, store, config, overwrite=replace, created_by="demo", cache=cache, model_info=info,
    )
    print(f"diffmix demo: {len(plan)} synthetic {plan.patch_size} px patches from the demo tile's training split; model {model}")
    result = job.run()
    if int(os.environ.get("RANK", "0")) != 0:
        return result.exit_code
    print(job_summary(job, result))
    if not result.complete:
        return result.exit_code
    grid = montage(store, dataset)
    montage_path = out / DEMO_MONTAGE
    save_png(montage_path, grid)
    names = plan.scheme.names
    before, after = _shares(result.counts["before"]), _shares(result.counts["after"])
    width = max(len(n) for n in names)
    print("\nclass shares of nuclei, original -> original + synthetic:")
    for k, name in enumerate(names):
        print(f"  {name:<{width}}  {before[k]:5.1f} % -> {after[k]:5.1f} %")
    print("\nfiles:")
    print(f"  {store}  {result.total} synthetic patches (images, inst_maps, type_maps, provenance)")
    print(f"  {store / TRAINING_DIR / TRAINING_MD}  how to train on original + synthetic data ({TRAIN_SH} next to it)")
    print(f"  {montage_path}  rows of original patch | edited label map | rendered image")
    print(f"  {train_dir}, {held_out_dir}  the demo's training and held-out tiles")
    print("\nnext:")
    print(f"  napari {store}          # open the store (napari-diffmix reader), or File > Open in napari")
    print(f"  bash {store / TRAINING_DIR / TRAIN_SH}   # train the segmentation network on original + synthetic data")
    print(f"  diffmix compare --data {train_dir} --synthetic {store} --test {held_out_dir} --out {out / 'compare'}"
          f" --crop-size {plan.patch_size}")
    if not args.compare:
        print("  diffmix demo --compare   # the miniature experiment: held-out rare-class F1 with and without the synthetic set, 3 seeds")
        return 0
    return _run_compare(args, store, seg_model, out / DEMO_COMPARE)


def _run_compare(args: argparse.Namespace, store: Path, seg_model: Path, out: Path) -> int:
    from ..demo_experiment import COMPARE_JSON, COMPARE_REPORT, DEMO_COMPARE_SEEDS, DEMO_COMPARE_STEPS, DEMO_SEG_BATCH, run_demo_compare

    print("\ndiffmix demo --compare: the miniature DiffMix experiment")
    result = run_demo_compare(
        store, out, seeds=args.seeds or DEMO_COMPARE_SEEDS, steps=args.compare_steps or DEMO_COMPARE_STEPS,
        seg_model=seg_model, min_fidelity=args.min_fidelity, batch_size=args.compare_batch_size or DEMO_SEG_BATCH,
        synthetic_share=args.synthetic_share, threads=args.threads,
    )
    if result.interrupted:
        print("stopped; run the same command again to continue (finished runs are kept)")
        return 130
    s = result.settings
    print(f"\nheld-out strip of the demo tile, F1 per class and PQ, mean ± sd over seeds {', '.join(map(str, s['seeds']))} "
          f"({s['steps']} steps each, batch {s['batch_size']}, {s['crop_size']} px crops):")
    print(result.table())
    print(result.machine_line())
    print(f"\n  {out / COMPARE_JSON}  every run's metrics, the means and sds, the settings")
    print(f"  {out / COMPARE_REPORT}  the same as a page (open it in a browser)")
    return 0
