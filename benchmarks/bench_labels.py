"""Speed of label synthesis: balancing maps on 1000x1000 tiles and enlarging maps on 256 px patches.

Targets (2 CPU cores): <= 0.5 s per balancing map of a 1000x1000 tile with ~1,300 nuclei
(donors from a multi-tile pool, as in a CoNSeP-sized dataset), and >= 200 enlarging maps/s
on 256 px patches. The published GradMix script spends minutes per tile.
Run by hand: ``python benchmarks/bench_labels.py [--tiles 27] [--repeat 3] [--maps 1000]``.

Measured (shared 2-core AMD EPYC, a training job on the other core, 2026-11-25): 0.074 s per
balancing map with 600 nuclei, 0.084 s with 1,299; 419 enlarging maps/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_diffmix.datasets import patch_grid
from napari_diffmix.mixing import BalanceParams, DonorPool, balance_map, enlarge_map
from napari_diffmix.phantom import make_phantom

TARGET_BALANCE_S = 0.5
TARGET_ENLARGE_PER_S = 200.0
RARE_SHARE = 0.04  # CoNSeP's 'other' class


def make_tiles(n_tiles: int, size: int, n_nuclei: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phantom tiles (touching nuclei) with a ~4 % rare class 1."""
    probs = (RARE_SHARE, (1 - RARE_SHARE) / 2, (1 - RARE_SHARE) / 2)
    tiles = []
    for i in range(n_tiles):
        t = make_phantom(size, size, n_nuclei=n_nuclei, class_probs=probs, seed=seed + i)
        tiles.append((t.inst_map, t.inst_types))
    return tiles


def bench_balance(n_nuclei: int, n_tiles: int, repeat: int) -> float:
    # A few distinct phantoms, cycled to a CoNSeP-sized pool (27 training tiles): the pool size,
    # not the donors' variety, sets the cost of the donor search.
    distinct = make_tiles(min(n_tiles, 4), 1000, n_nuclei, seed=100 * n_nuclei)
    tiles = [distinct[i % len(distinct)] for i in range(n_tiles)]
    params = BalanceParams()
    pool = DonorPool.from_maps(tiles, border=params.border, classes=[1])
    inst, types = tiles[0]
    n = int(np.count_nonzero(np.bincount(inst.reshape(-1))[1:]))
    times, edits = [], 0
    for r in range(repeat):
        t0 = time.perf_counter()
        res = balance_map(inst, types, 1, params=params, donors=pool, tile_index=0, rng=r)
        times.append(time.perf_counter() - t0)
        edits = len(res.record.edits)
    best = min(times)
    print(
        f"balancing map 1000x1000, {n} nuclei, {pool.count(1)} donors from {n_tiles} tiles: "
        f"{best:.3f} s (best of {repeat}; {edits} nuclei replaced)  target <= {TARGET_BALANCE_S} s  "
        f"ratio {TARGET_BALANCE_S / best:.1f}x"
    )
    return best


def bench_enlarge(n_maps: int) -> float:
    inst, types = make_tiles(1, 1000, 1300, seed=7)[0]
    patches = [np.ascontiguousarray(inst[y : y + 256, x : x + 256]) for y, x in patch_grid(1000, 1000)]
    enlarge_map(patches[0], types, rng=0)  # warm-up
    t0 = time.perf_counter()
    moved = 0
    for i in range(n_maps):
        moved += enlarge_map(patches[i % len(patches)], types, rng=i).shifts.shape[0]
    rate = n_maps / (time.perf_counter() - t0)
    print(
        f"enlarging maps 256x256 (~{1300 * 256 * 256 // 10**6} nuclei each, {moved / n_maps:.1f} shifted on average): "
        f"{rate:.0f} maps/s on one core  target >= {TARGET_ENLARGE_PER_S:.0f}/s  ratio {rate / TARGET_ENLARGE_PER_S:.1f}x"
    )
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=27, help="tiles in the donor pool (default 27, as CoNSeP train)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--maps", type=int, default=1000, help="enlarging maps to time (default 1000)")
    args = ap.parse_args()
    bench_balance(600, args.tiles, args.repeat)
    bench_balance(1300, args.tiles, args.repeat)
    bench_enlarge(args.maps)


if __name__ == "__main__":
    main()
