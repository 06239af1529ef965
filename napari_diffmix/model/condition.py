"""The model's condition: a label map as SDM's semantic input tensor.

Layout for a scheme with C classes (C + 2 channels, float 0/1):
channel 0 = background, channels 1..C = one-hot nucleus class, channel C + 1 = instance
edges (``napari_diffmix.nuclei.instance_edges``: 1 where the instance id differs from a
4-neighbour), so CoNSeP gives 6 channels and GLySAC 5. Classifier-free guidance's "empty"
condition is all zeros (not a background-only map).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..classes import ClassScheme
from ..errors import LabelError
from ..nuclei import instance_edges

__all__ = ["make_condition", "condition_batch", "null_condition_like"]


def _num_classes(num_classes: int | ClassScheme) -> int:
    n = num_classes.num_classes if isinstance(num_classes, ClassScheme) else int(num_classes)
    if n < 1:
        raise LabelError(f"num_classes must be at least 1, got {n}")
    return n


def _check_maps(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int, where: str) -> None:
    for name, arr in (("inst_map", inst_map), ("type_map", type_map)):
        if arr.ndim != 2:
            raise LabelError(f"{where}{name} must be 2-D (H, W), got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise LabelError(f"{where}{name} must hold integer ids, got dtype {arr.dtype}")
    if inst_map.shape != type_map.shape:
        raise LabelError(f"{where}inst_map {inst_map.shape} and type_map {type_map.shape} differ in shape")
    if type_map.size:
        lo, hi = int(type_map.min()), int(type_map.max())
        if lo < 0 or hi > num_classes:
            bad = np.unique(type_map[(type_map < 0) | (type_map > num_classes)])
            raise LabelError(
                f"{where}type_map has class id(s) {bad[:10].tolist()} outside 0..{num_classes} "
                f"(the model's scheme has {num_classes} classes)"
            )


def make_condition(
    inst_map: np.ndarray, type_map: np.ndarray, num_classes: int | ClassScheme
) -> torch.Tensor:
    """Condition tensor (C + 2, H, W) float32 for one label map; see the module docstring."""
    inst_map, type_map = np.asarray(inst_map), np.asarray(type_map)
    c = _num_classes(num_classes)
    _check_maps(inst_map, type_map, c, "")
    return _condition(inst_map, type_map, c)


def _condition(inst_map: np.ndarray, type_map: np.ndarray, c: int) -> torch.Tensor:
    cond = np.empty((c + 2, *type_map.shape), dtype=np.float32)
    cond[: c + 1] = np.arange(c + 1)[:, None, None] == type_map[None]
    cond[c + 1] = instance_edges(inst_map)
    return torch.from_numpy(cond)


def condition_batch(
    inst_maps: Sequence[np.ndarray] | np.ndarray,
    type_maps: Sequence[np.ndarray] | np.ndarray,
    num_classes: int | ClassScheme,
) -> torch.Tensor:
    """Conditions (N, C + 2, H, W) for a stack or sequence of equally sized label maps."""
    if len(inst_maps) != len(type_maps):
        raise LabelError(f"{len(inst_maps)} inst_maps but {len(type_maps)} type_maps")
    if len(inst_maps) == 0:
        raise LabelError("condition_batch needs at least one label map")
    c = _num_classes(num_classes)
    shape = np.shape(inst_maps[0])
    out = []
    for i, (inst_map, type_map) in enumerate(zip(inst_maps, type_maps)):
        inst_map, type_map = np.asarray(inst_map), np.asarray(type_map)
        _check_maps(inst_map, type_map, c, f"label map {i}: ")
        if inst_map.shape != shape:
            raise LabelError(f"label map {i} is {inst_map.shape}, label map 0 is {shape}; a batch needs one size")
        out.append(_condition(inst_map, type_map, c))
    return torch.stack(out)


def null_condition_like(cond: torch.Tensor) -> torch.Tensor:
    """The all-zero condition of classifier-free guidance, shaped like ``cond``."""
    return torch.zeros_like(cond)
