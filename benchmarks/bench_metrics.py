"""Throughput of the per-image + pooled metrics on 1000x1000 tiles with ~600 nuclei.

Target: >= 5 images/s on 2 CPU cores (the CoNSeP test set, 14 tiles, in under 3 s).
Run by hand: ``python benchmarks/bench_metrics.py [--images 10] [--size 1000] [--nuclei 600]``.

Measured (shared 2-core AMD EPYC, a training job on the other core, 2026-11-25): 7.3 images/s
wall clock, 11.8 images/s by CPU time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_diffmix.metrics import evaluate_image
from napari_diffmix.nuclei import instance_edges
from napari_diffmix.phantom import make_phantom

TARGET_IMAGES_PER_S = 5.0


def synthetic_maps(size: int, n_nuclei: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom label maps: touching nuclei in 4 classes."""
    tile = make_phantom(size, size, n_nuclei=n_nuclei, num_classes=4, seed=seed)
    return tile.inst_map, tile.type_map


def perturb(inst: np.ndarray, types: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A plausible prediction: shifted, eroded, 5 % nuclei dropped, 10 % reclassified."""
    rng = np.random.default_rng(seed)
    n = int(inst.max())
    keep = rng.random(n + 1) > 0.05
    keep[0] = False
    pred = np.roll(inst, (1, -1), axis=(0, 1))
    pred = np.where(keep[pred] & ~instance_edges(pred), pred, 0).astype(np.int32)
    lut = np.zeros(n + 1, np.int64)
    lut[inst.ravel()] = types.ravel()
    swap = rng.random(n + 1) < 0.1
    lut[swap] = rng.integers(1, 5, int(swap.sum()))
    lut[0] = 0
    return pred, lut[pred].astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--nuclei", type=int, default=600)
    args = ap.parse_args()

    data = []
    for i in range(args.images):
        inst, types = synthetic_maps(args.size, args.nuclei, seed=i)
        data.append((inst, types, *perturb(inst, types, seed=100 + i)))
    n_true = np.mean([len(np.unique(d[0])) - 1 for d in data])
    evaluate_image(*data[0][::2], *data[0][1::2])  # warm-up (imports, allocator)

    t0, c0 = time.perf_counter(), time.process_time()
    results = [evaluate_image(ti, pi, tt, pt, name=str(k)) for k, (ti, tt, pi, pt) in enumerate(data)]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    rate = args.images / dt
    print(f"{args.images} images {args.size}x{args.size}, {n_true:.0f} nuclei each (mean)")
    print(f"mean PQ {np.mean([r.pq for r in results]):.3f}, AJI {np.mean([r.aji for r in results]):.3f}")
    print(f"{rate:.1f} images/s ({1000 * dt / args.images:.1f} ms/image wall, {1000 * dc / args.images:.1f} ms/image CPU); "
          f"target {TARGET_IMAGES_PER_S} images/s -> ratio {rate / TARGET_IMAGES_PER_S:.2f}")
    # On a shared machine the wall clock includes other processes' time; CPU time does not.
    print(f"CPU-time rate {args.images / dc:.1f} images/s -> ratio {args.images / dc / TARGET_IMAGES_PER_S:.2f}")


if __name__ == "__main__":
    main()
