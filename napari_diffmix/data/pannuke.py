"""The ``pannuke`` layout: stacked arrays, memory-mapped::

    images.npy (N, H, W, 3) + masks.npy (N, H, W, C + 1)   PanNuke: channel c holds the
        instances of raw class c + 1, the last channel is background (may sit in sub-folders,
        as in the PanNuke fold archives)
    inst_maps.npy (N, H, W) + type_maps.npy (N, H, W) [+ images.npy]   merged classes
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import load_scheme
from ..errors import DatasetError
from ..nuclei import remap_ids, type_map_from
from .files import (
    find_one, mmap_array, stack_check, stack_image,
)
from .generic import generic_tile
from .tiles import Dataset, Tile


def _masks_to_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke (H, W, C + 1) instance channels -> (inst_map, raw inst_types with raw class = channel + 1)."""
    h, w, channels = masks.shape
    inst_map = np.zeros((h, w), dtype=np.int64)
    raw_types = [0]
    for c in range(channels - 1):  # the last channel is background
        ch = masks[..., c]
        nz = ch > 0
        if not nz.any():
            continue
        ids, inverse = np.unique(ch[nz], return_inverse=True)
        inst_map[nz] = len(raw_types) + inverse
        raw_types.extend([c + 1] * ids.size)
    inst_map, raw = remap_ids(inst_map, np.asarray(raw_types, dtype=np.int32))
    return inst_map, raw


def read_pannuke(root: str | os.PathLike, scheme: Any) -> Dataset:
    """Stacked ``.npy`` arrays (see the module docstring), memory-mapped; tiles named ``00000``, ``00001``, ..."""
    root = Path(root)
    scheme = load_scheme(scheme)
    inst_path, type_path = find_one(root, "inst_maps.npy", 0), find_one(root, "type_maps.npy", 0)
    if inst_path or type_path:
        if not (inst_path and type_path):
            raise DatasetError("stacked label maps need both inst_maps.npy and type_maps.npy", root)
        images_path = find_one(root, "images.npy", 0)
        masks_path = None
        inst_maps, type_maps = mmap_array(inst_path), mmap_array(type_path)
        if inst_maps.ndim != 3 or type_maps.shape != inst_maps.shape:
            raise DatasetError(
                f"inst_maps.npy {inst_maps.shape} and type_maps.npy {type_maps.shape} must both be (N, H, W)", root
            )
        label_shape, label_file = inst_maps.shape, inst_path
    else:
        images_path, masks_path = find_one(root, "images.npy"), find_one(root, "masks.npy")
        if not (images_path and masks_path):
            raise DatasetError("a PanNuke-style folder needs images.npy and masks.npy (or inst_maps.npy and type_maps.npy)", root)
        masks = mmap_array(masks_path)
        if masks.ndim != 4 or masks.shape[3] < 2:
            raise DatasetError(f"masks must be (N, H, W, C + 1) with a background channel last, got {masks.shape}", masks_path)
        label_shape, label_file = masks.shape[:3], masks_path
    images = None
    if images_path is not None:
        images = mmap_array(images_path)
        if images.ndim != 4 or images.shape[3] not in (3, 4):
            raise DatasetError(f"images must be (N, H, W, 3), got {images.shape}", images_path)
        if images.shape[:3] != tuple(label_shape):
            raise DatasetError(
                f"images.npy holds {images.shape[:3]} (N, H, W) but {label_file.name} holds {tuple(label_shape)}", root
            )
    n = label_shape[0]
    if n == 0:
        raise DatasetError(f"{label_file.name} holds no tiles", root)
    names = [f"{i:05d}" for i in range(n)]

    def load(i: int, with_image: bool = True) -> Tile:
        where = f"{label_file}[{i}]"
        image = None
        if images is not None and with_image:
            image = stack_image(images, i, images_path)
        if masks_path is None:
            return generic_tile(names[i], image, images_path, inst_maps[i], type_maps[i], Path(where), scheme)
        m = np.asarray(masks[i])
        if np.issubdtype(m.dtype, np.floating) and not np.all(np.mod(m, 1) == 0):
            raise DatasetError(f"masks of tile {i} hold non-integer instance ids", masks_path)
        inst_map, raw = _masks_to_labels(m.astype(np.int64))
        inst_types = scheme.merge_raw(raw, source=where).astype(np.int32)
        return Tile(names[i], image, inst_map, type_map_from(inst_map, inst_types), source=where)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="pannuke",
        image_check=stack_check(images, images_path),
    )
