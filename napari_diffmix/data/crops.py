"""Random training crops drawn by an explicit mix of source groups.

A training pool has groups: the original tiles, the patches of a synthetic store, the extra
balancing/enlarging label maps of ``diffmix labels``. Each draw picks a group by its share,
then a source of that group by its area, then a crop position uniformly. Drawing by crop
positions instead (every crop window equally likely) would never draw a patch the size of the
crop: it has one position, a 1000 px tile has 555,025 at 256 px.

The default share of a group is its share of the pixels; ``shares`` fixes some groups' shares
and the other groups split the rest by their pixels. The stream counts what it drew per group,
and that count goes into checkpoints with the generator state, so a resumed run draws the
crops and reports the shares an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DatasetError

ORIGINAL = "original"
SYNTHETIC = "synthetic"
EXTRA = "extra"


@dataclass
class Source:
    """One training tile: an RGB image paired with its label maps, and the group it belongs to."""

    name: str
    image: Any  # uint8 (H, W, 3) array, or a lazily read view with .shape and slicing
    inst_map: Any
    type_map: Any
    group: str = ORIGINAL

    @property
    def pixels(self) -> int:
        h, w = self.image.shape[:2]
        return int(h) * int(w)


def group_pixels(sources: Sequence[Source]) -> dict[str, int]:
    """Pixels per group, groups in order of first appearance."""
    out: dict[str, int] = {}
    for s in sources:
        out[s.group] = out.get(s.group, 0) + s.pixels
    return out


def group_shares(sources: Sequence[Source], requested: Mapping[str, float | None] | None = None) -> dict[str, float]:
    """The share of crops each group is drawn with.

    ``requested``: group -> share in [0, 1] (None: the default). Groups not requested split
    what is left in proportion to their pixels. DatasetError when the request cannot be met:
    a share for data that is not there, shares above 1 in all, or a rest with no data for it.
    """
    pixels = group_pixels(sources)
    fixed = {g: float(v) for g, v in (requested or {}).items() if v is not None}
    for g, v in fixed.items():
        if not 0.0 <= v <= 1.0:
            raise DatasetError(f"the {g} share of crops must be between 0 and 1, got {v:g}")
        if v > 0 and g not in pixels:
            raise DatasetError(f"{v:.0%} of the crops were asked to come from {g} data, but the training pool has none")
    total_fixed = sum(v for g, v in fixed.items() if g in pixels)
    if total_fixed > 1.0 + 1e-9:
        raise DatasetError(f"the shares asked for add up to {total_fixed:.0%} of the crops: {fixed}")
    free = {g: n for g, n in pixels.items() if g not in fixed}
    rest = max(0.0, 1.0 - total_fixed)
    if rest > 1e-9 and not free:
        asked = ", ".join(f"{g} {v:.0%}" for g, v in fixed.items())
        raise DatasetError(
            f"the shares asked for ({asked}) leave {rest:.0%} of the crops to other data, but the training pool has "
            f"only {', '.join(pixels)} data; ask for a share of 1 or add data"
        )
    shares = {}
    free_total = sum(free.values())
    for g, n in pixels.items():
        shares[g] = fixed[g] if g in fixed else rest * n / free_total
    return shares


def share_summary(requested: Mapping[str, float], realised: Mapping[str, float]) -> str:
    """'synthetic 30.4 % of the crops (asked 30.0 %)' for each group in ``realised``."""
    return "; ".join(f"{g} {v:.1%} of the crops (asked {requested.get(g, 0.0):.1%})" for g, v in realised.items())


def drawn_shares(stream: "CropStream", info: Any, device: Any) -> dict[str, float]:
    """Share of all crops drawn so far from each group but the originals, over all ranks (a
    collective under DDP, where ``info`` is the :class:`~napari_diffmix.runtime.DistInfo`).
    Every rank draws as many crops, so the mean of the ranks' shares is the pooled share."""
    from ..runtime import pooled_means

    local = {g: [v] for g, v in stream.realised().items() if g != ORIGINAL}
    return pooled_means(local, list(local), info, device)


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flip/rotation symmetries of the leading two axes (k in 0..7)."""
    a = np.rot90(a, k % 4, axes=(0, 1))
    return a[:, ::-1] if k >= 4 else a


class CropStream:
    """Endless random crops, one independent seeded stream per rank, drawn by group shares.

    ``shares``: group -> share of crops (see :func:`group_shares`); the default follows the
    pixels. Within a group a source is drawn in proportion to its area. The generator state
    and the per-group counts go into the checkpoint, so a resumed run draws exactly the crops
    it would have drawn.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        crop_size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        augment: bool = True,
        shares: Mapping[str, float | None] | None = None,
    ):
        self.sources = list(sources)
        self.crop = crop_size
        self.batch = batch_size
        self.augment = augment
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank, 0])))
        self.shares = group_shares(self.sources, shares)
        self.groups = list(self.shares)
        pixels = group_pixels(self.sources)
        self.p = np.array([self.shares[s.group] * s.pixels / pixels[s.group] for s in self.sources], float)
        self.p /= self.p.sum()
        self._group_of = np.array([self.groups.index(s.group) for s in self.sources])
        self.drawn = np.zeros(len(self.groups), np.int64)

    def next(self, cond_dropout: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(images (B,s,s,3) uint8, inst_maps (B,s,s), type_maps (B,s,s), keep (B,) bool)."""
        s, rng = self.crop, self.rng
        tiles = rng.choice(len(self.sources), size=self.batch, p=self.p)
        self.drawn += np.bincount(self._group_of[tiles], minlength=len(self.groups))
        images, insts, types = [], [], []
        for ti in tiles:
            src = self.sources[ti]
            y = int(rng.integers(0, src.image.shape[0] - s + 1))
            x = int(rng.integers(0, src.image.shape[1] - s + 1))
            k = int(rng.integers(0, 8)) if self.augment else 0
            images.append(dihedral(src.image[y : y + s, x : x + s], k))
            insts.append(dihedral(src.inst_map[y : y + s, x : x + s], k))
            types.append(dihedral(src.type_map[y : y + s, x : x + s], k))
        # Drawn even when the rate is 0 so the stream does not depend on the stage schedule.
        keep = rng.random(self.batch) >= cond_dropout
        return np.stack(images), np.stack(insts), np.stack(types), keep

    def realised(self) -> dict[str, float]:
        """Share of the crops drawn so far from each group (requested shares before the first draw)."""
        n = int(self.drawn.sum())
        if n == 0:
            return dict(self.shares)
        return {g: float(c) / n for g, c in zip(self.groups, self.drawn)}

    def describe(self) -> str:
        """One line for logs: each group's pixels and requested share."""
        pixels = group_pixels(self.sources)
        counts = {g: sum(1 for s in self.sources if s.group == g) for g in self.groups}
        return "; ".join(
            f"{g}: {counts[g]} source(s), {pixels[g] / 1e6:.2f} Mpx ({pixels[g] / sum(pixels.values()):.1%} of the pixels), "
            f"{self.shares[g]:.1%} of the crops"
            for g in self.groups
        )

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "drawn": dict(zip(self.groups, self.drawn.tolist()))}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "rng" not in state:  # a checkpoint from before the per-group counts: the generator state alone
            self.rng.bit_generator.state = dict(state)
            self.drawn[:] = 0
            return
        self.rng.bit_generator.state = dict(state["rng"])
        drawn = state.get("drawn", {})
        self.drawn[:] = [int(drawn.get(g, 0)) for g in self.groups]

    def reseed(self, seed: int, rank: int, step: int) -> None:
        """A fresh generator for a run resumed on another number of processes; the counts start
        again from this step, since the old ranks' counts are not this rank's."""
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank, 0, step])))
