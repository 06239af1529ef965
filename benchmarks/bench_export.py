"""Batch synthesis throughput: items/s and the share of time spent outside the sampler.

Target: label work (balancing/enlarging maps, condition tensors, SDEdit crops) plus writing
the store (zarr chunks, provenance, done flags, final attributes) < 5 % of the total time.

Runs ``SynthesisJob`` on the bundled demo tile (its training split) with a randomly
initialised model of the given preset (weights do not change the cost), the product's
default sampling (the fast DPM-Solver++ settings, SDEdit strength 0.55, batched CFG), and prints the
timings the job records. Run by hand::

    python benchmarks/bench_export.py [--preset demo] [--size 128] [--items 16] [--batch-size 8]
                                      [--device auto] [--precision auto] [--steps 15] [--strength 0.55]
                                      [--threads N]

Measured (shared 2-core AMD EPYC with avx512_bf16, demo preset, 128 px, 2 threads, precision auto = bf16,
2026-11-25, nothing else running): 0.36 % of the time in label work and writing (0.10 + 0.25 %);
1.39 s per item. An earlier fp32 run, with a training run on the other core, took 9.2 s per item.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from napari_diffmix.classes import DEMO
from napari_diffmix.datasets import Dataset, open_dataset, write_generic
from napari_diffmix.demo_data import demo_split
from napari_diffmix.mixing import MixCache, plan_balanced_set
from napari_diffmix.model.checkpoint import save_model
from napari_diffmix.model.samplers import FAST_SETTINGS
from napari_diffmix.runtime import PRECISIONS
from napari_diffmix.model.unet import SDMUNet, UNetConfig
from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob

TARGET_OVERHEAD = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="UNet preset (demo: the bundled model's size; tiny for a quick look)")
    ap.add_argument("--size", type=int, default=128, help="patch size in px (default 128)")
    ap.add_argument("--items", type=int, default=16, help="synthetic patches (default 16)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=FAST_SETTINGS["steps"])
    ap.add_argument("--strength", type=float, default=0.55)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="network precision (default auto, as the product)")
    ap.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's; on a shared machine 1 is steadier)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_generic(Dataset([demo_split().train], DEMO), tmp / "data")
        dataset = open_dataset(data)
        torch.manual_seed(0)
        config = UNetConfig.preset(args.preset, cond_channels=DEMO.condition_channels)
        model_path = tmp / "model.safetensors"
        save_model(SDMUNet(config), model_path, scheme=DEMO, default_guidance=3.0)
        cache = MixCache(dataset)
        t0 = time.perf_counter()
        plan = plan_balanced_set(dataset, patches=args.items, patch_size=args.size, stride=args.size // 2, cache=cache)
        t_plan = time.perf_counter() - t0
        cfg = SynthesisConfig(
            steps=args.steps, strength=args.strength, batch_size=args.batch_size, device=args.device,
            precision=args.precision, threads=args.threads,
        )
        job = SynthesisJob(dataset, plan, model_path, tmp / "bench.zarr", cfg, cache=cache)
        result = job.run()
        t = result.timings
        store_mb = sum(p.stat().st_size for p in (tmp / "bench.zarr").rglob("*") if p.is_file()) / 2**20

    steps_run = int(args.strength * args.steps + 1e-9)
    overhead = (t["labels"] + t["writing"]) / t["total"]
    unaccounted = t["total"] - t["labels"] - t["writing"] - t["sampling"]
    print(f"device {job.device}, preset {args.preset} ({sum(p.numel() for p in job.model.parameters()) / 1e6:.2f} M params), "
          f"{args.items} items of {args.size} px, batch {args.batch_size}, dpm++2m {args.steps} steps "
          f"(SDEdit {args.strength}: {steps_run} run), {torch.get_num_threads()} threads")
    print(f"plan (not in the job's total): {t_plan:.2f} s")
    print(f"total {t['total']:.2f} s  ->  {result.items_per_s:.3f} items/s  ({t['total'] / args.items:.2f} s/item)")
    for key in ("sampling", "labels", "writing"):
        print(f"  {key:<9} {t[key]:8.3f} s  {100 * t[key] / t['total']:6.2f} %")
    print(f"  {'other':<9} {unaccounted:8.3f} s  {100 * unaccounted / t['total']:6.2f} %  (model load, store setup, checks)")
    print(f"outside sampling (labels + writing): {100 * overhead:.2f} % (target < {100 * TARGET_OVERHEAD:.0f} %): "
          f"{'OK' if overhead < TARGET_OVERHEAD else 'MISSED'}")
    print(f"store size {store_mb:.2f} MiB ({store_mb / args.items * 1024:.0f} KiB/item)")


if __name__ == "__main__":
    main()
