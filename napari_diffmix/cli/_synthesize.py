"""``diffmix synthesize``: a class-balanced synthetic dataset rendered into a resumable zarr store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import PRECISIONS, SAMPLER_CHOICES, add_dataset_arguments, add_device_arguments, add_plan_arguments, plan_spec

EPILOG = """examples:
  diffmix synthesize /data/CoNSeP/Train --scheme consep --model consep.safetensors --out consep-synthetic.zarr
  diffmix synthesize demo --model demo.safetensors --out demo.zarr --patch-size 128 --stride 64 --patches 16
  diffmix synthesize /data/CoNSeP/Train --scheme consep --model m.safetensors --out s.zarr --target-share 15
  diffmix synthesize /data/CoNSeP/Train --scheme consep --model m.safetensors --out s.zarr --plan labels/plan.json
  diffmix synthesize /data/CoNSeP/Train --scheme consep --model ema_0.9999_010000.pt --preset diffmix-consep --out s.zarr
  torchrun --nproc_per_node=4 -m napari_diffmix synthesize /data/CoNSeP/Train --scheme consep --model m.safetensors --out s.zarr

Re-running the same command after Ctrl-C, a crash or a full disk continues where it stopped
and gives the same store as an uninterrupted run. Then: diffmix export STORE --format hovernet,
or see STORE/training/TRAINING.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synthesize",
        help="render a class-balanced synthetic set (balancing/enlarging maps -> diffusion images) into a zarr store",
        description=(
            "Plan synthetic patches that balance the rare nuclei classes (balancing and enlarging label maps), render "
            "an H&E image for every label map with the diffusion model (by default DiffMix's SDEdit from the original "
            "patch, with the fast DPM-Solver++ sampler) and write everything to a resumable zarr store with "
            "provenance and training instructions (training/TRAINING.md, training/train.sh)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataset_arguments(p, "training dataset folder (CoNSeP/GLySAC, generic, PanNuke) or 'demo'")
    p.add_argument("--model", "-m", type=Path, help="diffusion model (.safetensors from 'diffmix train'; default: the bundled demo model)")
    p.add_argument("--preset", help="architecture of an official guided-diffusion .pt checkpoint, e.g. diffmix-consep, diffmix-glysac, diffmix-lizard")
    p.add_argument("--out", "-o", required=True, type=Path, help="output store folder, e.g. synthetic.zarr")
    p.add_argument("--plan", type=Path, help="use a plan.json written by 'diffmix labels' instead of planning here")
    add_plan_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="solver (default: a distilled student's own, else dpm++2m, the fast sampler)")
    s.add_argument("--steps", type=int, help="respaced steps of the whole schedule (default: a student's own, else the fast sampler's, 15)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--strength", type=float, help="SDEdit: noise the original patch to this share of the schedule (default 0.55, DiffMix)")
    s.add_argument("--from-noise", action="store_true", help="sample from pure noise instead of SDEdit from the original patch")
    s.add_argument("--seed", type=int, default=0, help="seed of the plan (unless --plan) and of every item's noise (default 0)")
    s.add_argument("--batch-size", type=int, default=8, help="items per sampler call (default 8)")
    h = p.add_argument_group("hardware")
    add_device_arguments(h, torchrun=True)
    h.add_argument(
        "--precision", choices=PRECISIONS,
        help="network precision (default auto: bf16 on GPUs and CPUs with avx512_bf16/AMX, fp16 on older GPUs, "
             "otherwise fp32; fp32 gives results that do not depend on the hardware)",
    )
    o = p.add_argument_group("store")
    orig = o.add_mutually_exclusive_group()
    orig.add_argument("--include-originals", dest="originals", action="store_const", const="include",
                      help="copy the original patches into the store (a self-contained training set)")
    orig.add_argument("--reference-originals", dest="originals", action="store_const", const="reference",
                      help="record the dataset the original patches come from (default for datasets on disk)")
    orig.add_argument("--no-originals", dest="originals", action="store_const", const="none", help="leave the original patches out")
    o.add_argument("--resume", action="store_true", help="only continue an existing store (error if there is none)")
    o.add_argument("--overwrite", action="store_true", help="replace a store made with other settings (never a folder that is not a store)")
    o.add_argument("--dry-run", action="store_true", help="check the inputs, print the plan and write nothing")
    from ._score import add_seg_model_arguments

    add_seg_model_arguments(p.add_argument_group("label fidelity (scored as items are written; see 'diffmix score')"), required=False)
    p.set_defaults(func=run, originals="auto")


def build_plan(args: argparse.Namespace, dataset, *, cache=None):
    """The plan from ``--plan`` or from the planning flags."""
    from ..mixing import Plan, plan_balanced_set

    if args.plan is not None:
        given = [f for f, v in (("--balance", args.balance), ("--enlarge", args.enlarge), ("--combined", args.combined),
                                ("--patches", args.patches is not None), ("--target-share", args.target_share is not None),
                                ("--rare", args.rare is not None)) if v]
        if given:
            from ..errors import DiffMixError

            raise DiffMixError(f"--plan gives the label plan; drop {', '.join(given)} (or plan here without --plan)")
        return Plan.load(args.plan)
    return plan_balanced_set(dataset, plan_spec(args, dataset.scheme), cache=cache)


def sampling_config(args: argparse.Namespace, **fixed):
    """The :class:`~napari_diffmix.synthesize.SynthesisConfig` of the sampling options (checked as it is built);
    options a command lacks or leaves unset keep the config's defaults. ``fixed``: further config fields."""
    from ..synthesize import SynthesisConfig

    given = {k: getattr(args, k, None) for k in ("sampler", "steps", "strength", "precision")}
    return SynthesisConfig(
        **{k: v for k, v in given.items() if v is not None}, guidance=args.guidance,
        init="noise" if args.from_noise else "original", seed=args.seed, batch_size=args.batch_size,
        device=args.device, threads=args.threads, **fixed,
    )


def check_model(path: Path, config, preset: str | None = None):
    """Refuse a model file or device that cannot work before any dataset is read or anything written: the job
    would only find out after planning, which can take minutes. Reads the file's header and hash, not the weights;
    returns its :class:`~napari_diffmix.model.checkpoint.ModelInfo` for
    :func:`~napari_diffmix.synthesize.check_model_fits` and the job (the hash takes seconds for a large model)."""
    from ..model.checkpoint import read_info
    from ..runtime import resolve_device

    info = read_info(path, preset=preset)
    resolve_device(config.device)
    return info


def check_memory(info, patch_size: int, config):
    """Refuse, before planning, a batch that will not fit the device's free memory (see
    :func:`~napari_diffmix.render.estimate_synthesis_memory`); the estimate otherwise."""
    from ..runtime import resolve_device
    from ..render import check_synthesis_memory, estimate_synthesis_memory

    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return check_synthesis_memory(estimate_synthesis_memory(info.config, patch_size, config.batch_size, device, config.precision))


def run(args: argparse.Namespace) -> int:
    from ..datasets import open_dataset
    from ..mixing import MixCache
    from ..model.checkpoint import require_bundled_model
    from ..synthesize import SynthesisJob, check_model_fits, check_store_out

    rank = int(os.environ.get("RANK", "0"))
    model = args.model if args.model is not None else require_bundled_model("pass --model")
    check_store_out(args.out, [args.dataset, model, args.plan, args.scheme])  # before minutes of planning
    config = sampling_config(args, originals=args.originals)
    info = check_model(model, config, args.preset)
    if info.distilled:  # a student renders with its own sampler and steps unless told otherwise
        import dataclasses

        own = {k: v for k, v in info.default_sampling().items() if getattr(args, k) is None}
        config = dataclasses.replace(config, **own, guidance=1.0 if args.guidance is None else args.guidance)
    info.check_sampling(config.sampler, config.steps, config.guidance)
    dataset = open_dataset(args.dataset, args.scheme, args.layout)
    if args.plan is None:  # a --plan file loads at once and the job checks its patch size
        check_model_fits(info, dataset.scheme, args.patch_size)
        memory = check_memory(info, args.patch_size, config)
    cache = MixCache(dataset)
    plan = build_plan(args, dataset, cache=cache)
    if args.plan is not None:
        memory = check_memory(info, plan.patch_size, config)
    scorer = None
    if args.seg_model is not None:
        from ._score import load_scorer_from_args

        scorer = load_scorer_from_args(args)
    job = SynthesisJob(
        dataset, plan, model, args.out, config, overwrite=args.overwrite, resume=args.resume, cache=cache,
        preset=args.preset, model_info=info, scorer=scorer, min_fidelity=args.min_fidelity,
    )
    if rank == 0:
        print(f"{args.dataset}: {len(dataset)} tile(s), scheme {dataset.scheme.name}; model {model}")
        print(plan.table())
        init = f"SDEdit from the original patch, strength {config.strength}" if config.init == "original" else "from noise"
        print(f"sampling: {config.sampler}, {config.steps} steps, guidance {job.guidance:g}, {init}, seed {config.seed}, "
              f"batch {config.batch_size}; originals: {job.originals_mode}")
        print(f"memory: {memory.text()}")
    if args.dry_run:
        return 0
    result = job.run()
    if rank != 0:
        return result.exit_code
    print(job_summary(job, result))
    return result.exit_code


def job_summary(job, result) -> str:
    """What a finished (or stopped) run tells the user."""
    lines = []
    if job.message:
        lines.append(job.message)
    t = result.timings
    rate = f", {result.items_per_s:.2f} items/s" if result.rendered else ""
    lines.append(f"rendered {result.rendered} item(s) in {t.get('total', 0):.0f} s{rate}; {result.done} of {result.total} done")
    if "scoring" in t:
        share = 100.0 * t["scoring"] / max(t.get("sampling", 0.0), 1e-9)
        lines.append(f"label fidelity scored as items were written: {t['scoring']:.1f} s ({share:.0f} % of the sampling time); "
                     f"see 'diffmix export ... --min-fidelity'")
    if result.counts:
        import numpy as np

        lines.append(job.plan.table(np.asarray(result.counts["synthetic"])))
    if result.complete:
        lines.append(f"store: {result.store}  (training instructions: {result.store / 'training' / 'TRAINING.md'})")
        lines.append(f"open it in napari: napari {result.store}")
    else:
        why = f" by {result.signal}" if result.signal else ""
        lines.append(f"stopped{why}: {result.total - result.done} item(s) left; run the same command again to resume")
    return "\n".join(lines)
