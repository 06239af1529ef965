"""What the trainers draw: the share of crops from each data group (originals, synthetic store,
extra label maps) follows the requested mix, whatever the sizes of the tiles and patches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_diffmix.data.crops import EXTRA, ORIGINAL, SYNTHETIC, CropStream, Source, group_shares
from napari_diffmix.errors import DatasetError


def _source(name: str, size: int, group: str, value: int = 0) -> Source:
    image = np.full((size, size, 3), value, np.uint8)
    inst = np.zeros((size, size), np.int32)
    return Source(name, image, inst, inst.astype(np.uint8), group)


def _pool(tile: int, n_tiles: int, patch: int, n_patches: int) -> list[Source]:
    # Originals are black, synthetic patches white: every drawn crop tells where it came from.
    return [_source(f"tile{i}", tile, ORIGINAL, 0) for i in range(n_tiles)] + [
        _source(f"syn{i}", patch, SYNTHETIC, 255) for i in range(n_patches)
    ]


def _drawn_share(stream: CropStream, batches: int) -> float:
    white = 0
    for _ in range(batches):
        images = stream.next(0.0)[0]
        white += int((images[:, 0, 0, 0] == 255).sum())
    return white / (batches * stream.batch)


def _within_binomial(realised: float, p: float, n: int, sds: float = 4.0) -> bool:
    return abs(realised - p) <= sds * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize(
    "tile, n_tiles, patch, crop",
    [
        (1000, 2, 256, 256),  # CoNSeP-like: 1000 px tiles, 256 px patches, the crop equal to the patch
        (128, 3, 64, 64),  # the demo's sizes
        (512, 1, 128, 64),  # patches larger than the crop
    ],
)
def test_requested_synthetic_share_is_what_is_drawn(tile, n_tiles, patch, crop):
    sources = _pool(tile, n_tiles, patch, 5)
    n = 4000
    for share in (0.3, 0.5, 0.9):
        stream = CropStream(sources, crop, 8, seed=3, shares={SYNTHETIC: share})
        realised = _drawn_share(stream, n // 8)
        assert _within_binomial(realised, share, n), (share, realised)
        assert stream.realised()[SYNTHETIC] == pytest.approx(realised)  # the stream's own count agrees with the pixels


def test_default_share_is_the_pixel_share_not_the_crop_positions():
    # Two 1000 px tiles and 12 patches of 256 px: 6.7 % of the pixels are synthetic. Drawn by
    # crop positions (the old stream) a patch equal to the crop would come up 1 in ~92,500 draws.
    sources = _pool(1000, 2, 256, 12)
    pixel_share = 12 * 256**2 / (12 * 256**2 + 2 * 1000**2)
    stream = CropStream(sources, 256, 8, seed=0)
    assert stream.shares[SYNTHETIC] == pytest.approx(pixel_share)
    n = 4000
    assert _within_binomial(_drawn_share(stream, n // 8), pixel_share, n)


def test_sources_within_a_group_are_drawn_by_area():
    big, small = _source("big", 300, ORIGINAL, 10), _source("small", 100, ORIGINAL, 20)
    stream = CropStream([big, small], 64, 50, seed=1)
    values = np.concatenate([stream.next(0.0)[0][:, 0, 0, 0] for _ in range(80)])
    p_small = 100**2 / (100**2 + 300**2)
    assert _within_binomial(float(np.mean(values == 20)), p_small, values.size)


def test_share_zero_and_one_and_only_synthetic():
    sources = _pool(128, 2, 64, 3)
    assert _drawn_share(CropStream(sources, 64, 16, seed=0, shares={SYNTHETIC: 0.0}), 20) == 0.0
    assert _drawn_share(CropStream(sources, 64, 16, seed=0, shares={SYNTHETIC: 1.0}), 20) == 1.0
    only = [s for s in sources if s.group == SYNTHETIC]
    assert CropStream(only, 64, 4, seed=0).shares == {SYNTHETIC: 1.0}


def test_bad_shares_are_refused_with_what_was_wrong():
    sources = _pool(128, 2, 64, 3)
    with pytest.raises(DatasetError, match="between 0 and 1, got 1.5"):
        group_shares(sources, {SYNTHETIC: 1.5})
    with pytest.raises(DatasetError, match="20% of the crops were asked to come from extra data, but the training pool has none"):
        group_shares(sources, {EXTRA: 0.2})
    only = [s for s in sources if s.group == SYNTHETIC]
    with pytest.raises(DatasetError, match="leave 70% of the crops to other data, but the training pool has only synthetic"):
        group_shares(only, {SYNTHETIC: 0.3})
    with pytest.raises(DatasetError, match=r"\(synthetic 0%\) leave 100% of the crops to other data"):
        group_shares(only, {SYNTHETIC: 0.0})
    assert group_shares(sources, {EXTRA: None, SYNTHETIC: None}) == group_shares(sources)


def test_state_round_trip_continues_the_same_crops_and_counts():
    sources = _pool(200, 2, 64, 4)
    a = CropStream(sources, 64, 4, seed=7, shares={SYNTHETIC: 0.4})
    for _ in range(5):
        a.next(0.0)
    saved = a.state()
    expected = [a.next(0.1) for _ in range(3)]
    b = CropStream(sources, 64, 4, seed=99, shares={SYNTHETIC: 0.4})
    b.set_state(saved)
    got = [b.next(0.1) for _ in range(3)]
    for x, y in zip(expected, got):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    assert b.drawn.tolist() == a.drawn.tolist() and b.drawn.sum() == 8 * 4
    # a checkpoint written before the per-group counts held the generator state alone
    c = CropStream(sources, 64, 4, seed=99, shares={SYNTHETIC: 0.4})
    c.set_state(saved["rng"])
    assert c.drawn.sum() == 0
    assert all(np.array_equal(u, v) for u, v in zip(c.next(0.1), expected[0]))
