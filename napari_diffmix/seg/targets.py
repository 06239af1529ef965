"""Training targets of the HoVer-Net branches, derived from the label maps.

- NP: nuclear pixel, 1 inside any nucleus;
- HV: horizontal and vertical distance of each nucleus pixel to its nucleus's centre of mass
  (rounded to a pixel, as HoVer-Net does), scaled per nucleus and per side so that the
  leftmost / topmost pixel is -1 and the rightmost / bottommost +1; 0 on background;
- TP: the class map itself.

The HV scaling uses each nucleus's bounding box: the extreme pixels of a nucleus along x are
its bounding box's first and last columns, so no per-nucleus loop is needed.
"""

from __future__ import annotations

import numpy as np

from ..nuclei import nuclei_props, remap_ids


def hv_targets(inst_map: np.ndarray) -> np.ndarray:
    """(2, H, W) float32: channel 0 horizontal (x), channel 1 vertical (y) maps in [-1, 1]."""
    compact, _ = remap_ids(inst_map)
    h, w = compact.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    props = nuclei_props(compact)
    if len(props) == 0:
        return out
    flat = compact.reshape(-1)
    fg = np.flatnonzero(flat)
    row = flat[fg] - 1  # compact ids are 1..N in order, so props row = id - 1
    coords = np.divmod(fg, w)  # (y, x)
    centre = np.floor(props.centroids + 0.5).astype(np.int64)
    for axis, channel in ((1, 0), (0, 1)):
        c = centre[row, axis]
        d = (coords[axis] - c).astype(np.float32)
        lo = (c - props.bboxes[row, axis]).astype(np.float32)  # distance to the first pixel
        hi = (props.bboxes[row, axis + 2] - 1 - c).astype(np.float32)  # ... and to the last
        scaled = np.where(d < 0, d / np.maximum(lo, 1), d / np.maximum(hi, 1))
        out[channel].reshape(-1)[fg] = scaled
    return out


def seg_targets(inst_map: np.ndarray, type_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(np (H, W) int64 0/1, hv (2, H, W) float32, tp (H, W) int64) for one crop."""
    return (np.asarray(inst_map) > 0).astype(np.int64), hv_targets(inst_map), np.asarray(type_map).astype(np.int64)
