"""Running a trained HoVer-Net on tiles of any size.

Large tiles are cut into overlapping windows; window outputs are blended with weights that
fall off towards each window's border, so seams carry no edge artefacts. The blended
probability and HV maps of the whole tile then go through the post-processing once
(its normalisations are global to the tile, as in HoVer-Net).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import DatasetError
from ..progress import progress_bar
from .model import HoVerNet
from .postprocess import PostprocessConfig, postprocess


@dataclass
class SegMaps:
    """Blended network outputs for one tile."""

    np_prob: np.ndarray  # (H, W) foreground probability
    hv: np.ndarray  # (2, H, W)
    tp_prob: np.ndarray  # (C + 1, H, W)


def _origins(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    out = list(range(0, size - window, step))
    out.append(size - window)
    return out


def _ramp(n: int, overlap: int) -> np.ndarray:
    # Weight 1 in the middle, falling linearly over half the overlap to a small positive
    # value at the border (positive so that tile borders, covered once, still count).
    edge = max(overlap // 2, 1)
    i = np.arange(n)
    return np.clip(np.minimum(i + 1, n - i) / edge, 1.0 / edge, 1.0).astype(np.float32)


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DatasetError(f"the network needs uint8 RGB images (H, W, 3), got {image.dtype} {image.shape}")
    return image


@torch.inference_mode()
def predict_maps(
    model: HoVerNet, image: np.ndarray, *, window: int = 256, overlap: int = 64, batch_size: int = 4
) -> SegMaps:
    """NP probability, HV maps and TP probabilities of one RGB tile."""
    image = _check_image(image)
    if window < 16 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 16 and 0 <= overlap < window, got {window}, {overlap}")
    device = next(model.parameters()).device
    model.eval()
    h, w = image.shape[:2]
    wh, ww = min(window, h), min(window, w)
    step = window - overlap
    boxes = [(y, x) for y in _origins(h, wh, step) for x in _origins(w, ww, step)]
    weight = _ramp(wh, overlap)[:, None] * _ramp(ww, overlap)[None, :]
    c = model.config.num_classes + 1
    acc = np.zeros((1 + 2 + c, h, w), dtype=np.float32)
    norm = np.zeros((h, w), dtype=np.float32)
    x_all = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        x = torch.stack([x_all[:, y : y + wh, xx : xx + ww] for y, xx in chunk]).to(device)
        out = model(x)
        maps = torch.cat([out["np"].softmax(1)[:, 1:], out["hv"], out["tp"].softmax(1)], dim=1).float().cpu().numpy()
        for (y, xx), m in zip(chunk, maps):
            acc[:, y : y + wh, xx : xx + ww] += m * weight
            norm[y : y + wh, xx : xx + ww] += weight
    acc /= norm
    return SegMaps(acc[0], acc[1:3], acc[3:])


def segment(
    model: HoVerNet,
    image: np.ndarray,
    *,
    window: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    postprocess_config: PostprocessConfig = PostprocessConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map int32, type_map uint8) for one RGB tile."""
    maps = predict_maps(model, image, window=window, overlap=overlap, batch_size=batch_size)
    return postprocess(maps.np_prob, maps.hv, maps.tp_prob, postprocess_config)


def predict_tiles(model: HoVerNet, tiles: Iterable[Any], *, pbar: Any = None, **kwargs: Any):
    """Yield a predicted :class:`~napari_diffmix.datasets.Tile` (image kept) for each input tile."""
    from ..datasets import Tile

    total = len(tiles) if hasattr(tiles, "__len__") else None
    with progress_bar(pbar, total, "predict", unit="tile") as bar:
        for tile in tiles:
            if tile.image is None:
                raise DatasetError(f"tile {tile.name!r} has no image to segment", getattr(tile, "source", None))
            inst_map, type_map = segment(model, tile.image, **kwargs)
            yield Tile(tile.name, tile.image, inst_map, type_map)
            bar.update(1)


def predict_to_folder(
    model: HoVerNet,
    tiles: Iterable[Any],
    out_dir: str | os.PathLike,
    scheme: Any,
    *,
    overwrite: bool = False,
    pbar: Any = None,
    **kwargs: Any,
) -> Path:
    """Segment every tile and write a generic dataset folder (images, inst/type maps, scheme)."""
    from ..datasets import write_generic

    from tqdm.auto import tqdm

    # Streamed: one tile in memory at a time; the predict bar is the only one shown.
    predicted = predict_tiles(model, tiles, pbar=pbar, **kwargs)
    return write_generic(predicted, out_dir, scheme=scheme, overwrite=overwrite, pbar=tqdm(disable=True), kind="predict")

