"""Instance-level operations on nuclei label maps (pure numpy / scipy).

Data contract: ``inst_map`` int32 (H, W), 0 = background, 1..N nuclei (ids need not be
contiguous); ``type_map`` uint8, ``type_map == inst_types[inst_map]``. ``inst_types`` is an
integer array indexed by instance id: ``inst_types[i]`` is the class of nucleus ``i``,
``inst_types[0] == 0`` and unused ids hold 0.

Edit verbs
----------
``move_nucleus``, ``rotate_nucleus``, ``flip_nucleus``, ``duplicate_nucleus``,
``delete_nucleus``, ``retype_nucleus`` and ``paste_mask`` are pure: they return a new
``(inst_map, inst_types)`` pair (int32 arrays) and never modify their inputs. Rebuild the
type map with :func:`type_map_from` when you need it.

Occlusion rule: the edited (or pasted) nucleus is drawn on top. Pixels it covers are taken
from whichever nuclei held them; a nucleus left with no pixels disappears and its
``inst_types`` entry is set to 0. Pixels that would fall outside the map are clipped, so a
nucleus moved (or pasted) entirely off the map disappears the same way. The old position of
a moved/rotated/flipped nucleus becomes background (pixels it had taken earlier are not
given back).

Cost: each verb copies the map once and scans it once to find the nucleus (``duplicate`` and
``paste_mask`` without ``nid`` scan once more for the next free id, ``max + 1``); the
geometry works on the nucleus's own pixels or its bounding box. Only when the edit covers
other nuclei is the map scanned again, once per covered nucleus, to see whether it survived.

Bad ids (absent from the map) raise :class:`~napari_diffmix.errors.LabelError` naming the id.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from scipy import ndimage

from .errors import DatasetError, LabelError

# Nearest-neighbour rounding that treats x.5 - 1e-16 as x.5: coordinates computed with
# cos/sin of right angles must shift every pixel by the same amount or the shape tears.
_ROUND_EPS = 1e-7
MAX_CLASS = 254


def instance_edges(inst_map: np.ndarray) -> np.ndarray:
    """Boolean map, True where the instance id differs from a 4-neighbour.

    Both sides of a boundary are marked (nucleus/background and nucleus/nucleus), which is
    the edge channel SDM feeds the model next to the one-hot classes.
    """
    inst_map = np.asarray(inst_map)
    edges = np.zeros(inst_map.shape, dtype=bool)
    dy = inst_map[1:, :] != inst_map[:-1, :]
    dx = inst_map[:, 1:] != inst_map[:, :-1]
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    return edges


def changed_mask(
    ref_inst: np.ndarray, ref_types: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, margin: int = 0
) -> np.ndarray:
    """Boolean map of the pixels whose nucleus or class differs between a reference label map
    and the current one, grown by ``margin`` px (4-connected steps).

    What a masked re-render redraws: the margin lets the surroundings of an edited nucleus
    blend into the kept image.
    """
    shapes = {np.shape(a) for a in (ref_inst, ref_types, inst_map, type_map)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise LabelError(f"the reference and current label maps must be 2-D maps of one shape, got {sorted(shapes)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise LabelError(f"margin must be an integer >= 0, got {margin!r}")
    changed = (np.asarray(ref_inst) != np.asarray(inst_map)) | (np.asarray(ref_types) != np.asarray(type_map))
    if margin > 0 and changed.any():
        changed = ndimage.binary_dilation(changed, iterations=int(margin))
    return changed


# -- validation helpers --------------------------------------------------------------------------
def _where(source: str | os.PathLike | None) -> str:
    return f"{os.fspath(source)}: " if source is not None else ""


def _label_array(a: Any, name: str, source: str | os.PathLike | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise LabelError(_where(source) + f"{name} must be a 2-D (H, W) array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise LabelError(_where(source) + f"{name} must hold integers, got dtype {a.dtype}")
    return a


def _nonnegative(a: np.ndarray, name: str, source: str | os.PathLike | None = None) -> None:
    if a.size and a.min() < 0:
        raise LabelError(_where(source) + f"{name} has negative values (min {a.min()}); 0 is background")


def _types_array(inst_types: Any) -> np.ndarray:
    t = np.asarray(inst_types)
    if t.ndim != 1 or not (np.issubdtype(t.dtype, np.integer) or t.size == 0):
        raise LabelError(f"inst_types must be a 1-D integer array indexed by instance id, got shape {t.shape}, dtype {t.dtype}")
    return t


def _types_copy(inst_types: Any, min_len: int) -> np.ndarray:
    t = _types_array(inst_types)
    out = np.zeros(max(t.size, min_len), dtype=np.int32)
    out[: t.size] = t
    return out


def _check_class(cls: Any) -> int:
    try:
        k = int(cls)
    except (TypeError, ValueError):
        raise LabelError(f"class {cls!r} is not an integer class id") from None
    if k != cls or not 1 <= k <= MAX_CLASS:
        raise LabelError(f"class {cls!r} is not a nucleus class id (1..{MAX_CLASS}); use delete_nucleus to remove a nucleus")
    return k


def _check_id(nid: Any) -> int:
    try:
        k = int(nid)
    except (TypeError, ValueError):
        raise LabelError(f"nucleus id {nid!r} is not an integer") from None
    if k != nid or k <= 0:
        raise LabelError(f"nucleus id {nid!r} is not a valid id (ids are integers >= 1; 0 is background)")
    return k


def _round(v: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5 + _ROUND_EPS).astype(np.int64)


def _locate(inst_map: np.ndarray, nid: int) -> np.ndarray:
    """Flat indices of nucleus ``nid`` (one scan of the map)."""
    flat = np.flatnonzero(inst_map.reshape(-1) == nid)
    if flat.size == 0:
        raise LabelError(f"nucleus id {nid} is not in the inst_map")
    return flat


def _compact(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels 1..N in id order, original ids (N,)) for any id range, without a sort when ids are small."""
    flat = inst_map.reshape(-1)
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[inst_map], ids
    uniq, inverse = np.unique(flat, return_inverse=True)
    if uniq[0] != 0:
        inverse = inverse + 1
    ids = uniq[uniq > 0]
    return inverse.reshape(inst_map.shape).astype(np.int32), ids


# -- maps <-> types ------------------------------------------------------------------------------
def inst_types_from_maps(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """Per-instance class (int32, indexed by id) by majority vote of the nucleus's type pixels.

    Background-typed pixels inside a nucleus do not vote; a nucleus whose pixels are all
    background-typed gets class 0. Ties go to the lower class id.
    """
    inst_map = _label_array(inst_map, "inst_map")
    type_map = _label_array(type_map, "type_map")
    if inst_map.shape != type_map.shape:
        raise LabelError(f"inst_map {inst_map.shape} and type_map {type_map.shape} differ in shape")
    _nonnegative(inst_map, "inst_map")
    _nonnegative(type_map, "type_map")
    if inst_map.size == 0:
        return np.zeros(1, dtype=np.int32)
    compact, ids = _compact(inst_map)
    n, c = ids.size, int(type_map.max()) + 1
    votes = np.bincount(
        compact.reshape(-1).astype(np.int64) * c + type_map.reshape(-1), minlength=(n + 1) * c
    ).reshape(n + 1, c)
    votes[:, 0] = 0
    out = np.zeros(int(ids[-1]) + 1 if n else 1, dtype=np.int32)
    out[ids] = votes[1:].argmax(axis=1)
    return out


def type_map_from(inst_map: np.ndarray, inst_types: Any) -> np.ndarray:
    """``inst_types[inst_map]`` as a uint8 type map."""
    inst_map = _label_array(inst_map, "inst_map")
    types = _types_array(inst_types)
    if types.size and (types.min() < 0 or types.max() > 255):
        raise LabelError(f"inst_types values must be classes 0..255, got {types.min()}..{types.max()}")
    top = int(inst_map.max()) if inst_map.size else 0
    _nonnegative(inst_map, "inst_map")
    if top >= types.size:
        raise LabelError(f"inst_map has nucleus id {top} but inst_types only covers ids 0..{types.size - 1}")
    return types.astype(np.uint8)[inst_map]


def check_consistency(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    inst_types: Any = None,
    source: str | os.PathLike | None = None,
) -> None:
    """Raise :class:`LabelError` (with counts and example ids) unless the maps honour the contract.

    Checks: 2-D integer arrays of one shape, no negative values, background pixels typed 0,
    every nucleus pixel typed 1..C, and one class per nucleus (``inst_types[inst_map]`` when
    ``inst_types`` is given, else a single class within each nucleus).
    """
    inst_map = _label_array(inst_map, "inst_map", source)
    type_map = _label_array(type_map, "type_map", source)
    where = _where(source)
    if inst_map.shape != type_map.shape:
        raise LabelError(where + f"inst_map {inst_map.shape} and type_map {type_map.shape} differ in shape")
    _nonnegative(inst_map, "inst_map", source)
    _nonnegative(type_map, "type_map", source)
    fg = inst_map != 0
    typed_bg = np.count_nonzero(type_map[~fg])
    if typed_bg:
        raise LabelError(where + f"type_map gives a class to {typed_bg} background pixel(s) (inst_map == 0)")
    untyped = fg & (type_map == 0)
    if untyped.any():
        ids = np.unique(inst_map[untyped])
        raise LabelError(
            where + f"{np.count_nonzero(untyped)} nucleus pixel(s) in {ids.size} nuclei have class 0 "
            f"(ids {_id_list(ids)}); every nucleus needs a class 1..C"
        )
    if inst_types is None:
        expected = type_map_from(inst_map, inst_types_from_maps(inst_map, type_map))
        what = "nuclei mix several classes"
    else:
        try:
            expected = type_map_from(inst_map, inst_types)
        except LabelError as exc:
            raise LabelError(where + str(exc)) from None
        what = "type_map disagrees with inst_types"
    bad = type_map != expected
    if bad.any():
        ids = np.unique(inst_map[bad])
        raise LabelError(where + f"{what}: {np.count_nonzero(bad)} pixel(s) in {ids.size} nuclei (ids {_id_list(ids)})")


def _id_list(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (", ..." if ids.size > limit else "")


def remap_ids(inst_map: np.ndarray, inst_types: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Renumber nuclei 1..N keeping their order by old id; ``inst_types`` follows (None stays None)."""
    inst_map = _label_array(inst_map, "inst_map")
    _nonnegative(inst_map, "inst_map")
    if inst_map.size == 0:
        return inst_map.astype(np.int32), None if inst_types is None else np.zeros(1, np.int32)
    compact, ids = _compact(inst_map)
    if inst_types is None:
        return compact, None
    types = _types_array(inst_types)
    if ids.size and ids[-1] >= types.size:
        raise LabelError(f"inst_map has nucleus id {ids[-1]} but inst_types only covers ids 0..{types.size - 1}")
    new_types = np.zeros(ids.size + 1, dtype=np.int32)
    new_types[1:] = types[ids]
    return compact, new_types


# -- properties ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NucleiProps:
    """Per-nucleus measurements, one row per nucleus present, in id order.

    ``centroids`` are (y, x) floats; ``bboxes`` are (y0, x0, y1, x1) with exclusive ends;
    ``classes`` are 0 when no ``inst_types`` was given.
    """

    ids: np.ndarray
    centroids: np.ndarray
    areas: np.ndarray
    bboxes: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)

    def row(self, nid: int) -> int:
        """Row of nucleus ``nid`` in these arrays."""
        k = int(np.searchsorted(self.ids, nid))
        if k >= self.ids.size or self.ids[k] != nid:
            raise LabelError(f"nucleus id {nid} is not in the inst_map")
        return k


def nuclei_props(inst_map: np.ndarray, inst_types: Any = None) -> NucleiProps:
    """Ids, centroids, areas, bounding boxes and classes of every nucleus in one pass."""
    inst_map = _label_array(inst_map, "inst_map")
    _nonnegative(inst_map, "inst_map")
    if inst_map.size == 0 or not inst_map.any():
        e = np.zeros(0, dtype=np.int64)
        return NucleiProps(e.astype(np.int32), np.zeros((0, 2)), e, np.zeros((0, 4), np.int64), e.astype(np.int32))
    compact, ids = _compact(inst_map)
    n = ids.size
    h, w = inst_map.shape
    flat = compact.reshape(-1)
    areas = np.bincount(flat, minlength=n + 1)[1:]
    # Row sums per label: weights repeat per row, so sum label counts within each row instead of a full y grid.
    sum_y = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)[1:]
    sum_x = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)[1:]
    centroids = np.stack([sum_y / areas, sum_x / areas], axis=1)
    slices = ndimage.find_objects(compact)
    bboxes = np.array([(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in slices], dtype=np.int64)
    if inst_types is None:
        classes = np.zeros(n, dtype=np.int32)
    else:
        types = _types_array(inst_types)
        if ids[-1] >= types.size:
            raise LabelError(f"inst_map has nucleus id {ids[-1]} but inst_types only covers ids 0..{types.size - 1}")
        classes = types[ids].astype(np.int32)
    return NucleiProps(ids.astype(np.int32), centroids, areas.astype(np.int64), bboxes, classes)


# -- edit verbs ----------------------------------------------------------------------------------
def _redraw(
    inst_map: np.ndarray,
    inst_types: Any,
    nid: int,
    cls: int,
    ys: np.ndarray,
    xs: np.ndarray,
    erase: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Copy the map, clear ``erase`` (flat indices), draw ``nid`` at (ys, xs) on top, apply the occlusion rule."""
    h, w = inst_map.shape
    out = np.array(inst_map, dtype=np.int32, order="C")
    fv = out.reshape(-1)
    if erase is not None:
        fv[erase] = 0
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = ys[inside] * w + xs[inside]
    covered = fv[flat]
    fv[flat] = nid
    types = _types_copy(inst_types, nid + 1)
    types[nid] = cls if flat.size else 0
    for k in np.unique(covered):
        if k != 0 and k != nid and not np.any(fv == k):
            types[k] = 0
    return out, types


def _pixels(inst_map: np.ndarray, nid: Any) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    inst_map = _label_array(inst_map, "inst_map")
    nid = _check_id(nid)
    flat = _locate(inst_map, nid)
    ys, xs = np.divmod(flat, inst_map.shape[1])
    return nid, flat, ys, xs


def _class_of(inst_types: Any, nid: int) -> int:
    types = _types_array(inst_types)
    return int(types[nid]) if nid < types.size else 0


def move_nucleus(inst_map: np.ndarray, inst_types: Any, nid: int, dy: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """Shift nucleus ``nid`` by (dy, dx) pixels (rounded); its old position becomes background."""
    nid, flat, ys, xs = _pixels(inst_map, nid)
    dy, dx = int(_round(dy)), int(_round(dx))
    return _redraw(inst_map, inst_types, nid, _class_of(inst_types, nid), ys + dy, xs + dx, erase=flat)


def rotate_nucleus(inst_map: np.ndarray, inst_types: Any, nid: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate nucleus ``nid`` about its centroid, counter-clockwise as displayed (y down).

    Nearest-neighbour resampling of the nucleus mask keeps the area within rounding; if the
    resampling splits a connected nucleus, only its largest piece is kept.
    """
    nid, flat, ys, xs = _pixels(inst_map, nid)
    cy, cx = ys.mean(), xs.mean()
    y0, x0 = ys.min(), xs.min()
    local = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
    local[ys - y0, xs - x0] = True
    radius = int(np.ceil(np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max()))) + 1
    gy, gx = np.mgrid[int(cy) - radius : int(cy) + radius + 2, int(cx) - radius : int(cx) + radius + 2]
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    # Inverse mapping: each output pixel samples the source pixel it came from.
    ry, rx = gy - cy, gx - cx
    sy = _round(cy + c * ry + s * rx) - y0
    sx = _round(cx - s * ry + c * rx) - x0
    valid = (sy >= 0) & (sy < local.shape[0]) & (sx >= 0) & (sx < local.shape[1])
    rotated = np.zeros(gy.shape, dtype=bool)
    rotated[valid] = local[sy[valid], sx[valid]]
    eight = np.ones((3, 3), dtype=bool)
    labels, n = ndimage.label(rotated, structure=eight)
    if n > 1 and ndimage.label(local, structure=eight)[1] == 1:
        rotated = labels == (np.argmax(np.bincount(labels.reshape(-1))[1:]) + 1)
    ry_out, rx_out = np.nonzero(rotated)
    return _redraw(
        inst_map, inst_types, nid, _class_of(inst_types, nid), ry_out + gy[0, 0], rx_out + gx[0, 0], erase=flat
    )


def flip_nucleus(inst_map: np.ndarray, inst_types: Any, nid: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror nucleus ``nid`` about its centroid: axis 0 flips up/down, axis 1 left/right."""
    if axis not in (0, 1):
        raise LabelError(f"flip axis must be 0 (up/down) or 1 (left/right), got {axis!r}")
    nid, flat, ys, xs = _pixels(inst_map, nid)
    if axis == 0:
        ys = int(_round(2 * ys.mean())) - ys
    else:
        xs = int(_round(2 * xs.mean())) - xs
    return _redraw(inst_map, inst_types, nid, _class_of(inst_types, nid), ys, xs, erase=flat)


def _next_id(inst_map: np.ndarray) -> int:
    return int(inst_map.max()) + 1 if inst_map.size else 1


def duplicate_nucleus(
    inst_map: np.ndarray, inst_types: Any, nid: int, center_yx: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Copy nucleus ``nid`` (same class) so its centroid lands on ``center_yx``; the copy gets id ``max + 1``."""
    nid, _flat, ys, xs = _pixels(inst_map, nid)
    new = _next_id(np.asarray(inst_map))
    oy = int(_round(center_yx[0] - ys.mean()))
    ox = int(_round(center_yx[1] - xs.mean()))
    return _redraw(inst_map, inst_types, new, _class_of(inst_types, nid), ys + oy, xs + ox)


def delete_nucleus(inst_map: np.ndarray, inst_types: Any, nid: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove nucleus ``nid`` (its pixels become background, its class 0)."""
    nid, flat, _ys, _xs = _pixels(inst_map, nid)
    out = np.array(inst_map, dtype=np.int32, order="C")
    out.reshape(-1)[flat] = 0
    types = _types_copy(inst_types, nid + 1)
    types[nid] = 0
    return out, types


def retype_nucleus(inst_map: np.ndarray, inst_types: Any, nid: int, new_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Give nucleus ``nid`` class ``new_class`` (1..254); the shape is unchanged."""
    new_class = _check_class(new_class)
    inst_map = _label_array(inst_map, "inst_map")
    nid = _check_id(nid)
    _locate(inst_map, nid)
    types = _types_copy(inst_types, nid + 1)
    types[nid] = new_class
    return np.array(inst_map, dtype=np.int32, order="C"), types


def paste_mask(
    inst_map: np.ndarray,
    inst_types: Any,
    mask: np.ndarray,
    center_yx: tuple[float, float],
    cls: int,
    nid: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a nucleus ``mask`` with its centroid on ``center_yx`` as class ``cls``.

    ``nid=None`` gives the nucleus a new id (``max + 1``). With an ``nid``, that nucleus (if
    present) is replaced: its old pixels become background and the pasted mask takes its id,
    which is how a balancing edit swaps a nucleus for a rare-class donor.
    """
    inst_map = _label_array(inst_map, "inst_map")
    cls = _check_class(cls)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise LabelError(f"mask must be a 2-D boolean array, got shape {mask.shape}")
    my, mx = np.nonzero(mask)
    if my.size == 0:
        raise LabelError("mask is empty: nothing to paste")
    erase = None
    if nid is None:
        nid = _next_id(inst_map)
    else:
        nid = _check_id(nid)
        erase = np.flatnonzero(inst_map.reshape(-1) == nid)
    oy = int(_round(center_yx[0] - my.mean()))
    ox = int(_round(center_yx[1] - mx.mean()))
    return _redraw(inst_map, inst_types, nid, cls, my + oy, mx + ox, erase=erase)


# -- nuclei bank ---------------------------------------------------------------------------------
class NucleiBank:
    """Nucleus masks (tight bool crops) with their class, area and source map index.

    Built from label maps with :meth:`from_maps`; the balancing step queries it for donors
    of a class and size, and the napari plugin offers it as a palette of real shapes.
    """

    def __init__(self, masks: Iterable[np.ndarray], classes: Iterable[int], sources: Iterable[int] | None = None):
        self._masks = [np.ascontiguousarray(m, dtype=bool) for m in masks]
        for m in self._masks:
            m.flags.writeable = False
        self.classes = np.asarray(list(classes), dtype=np.int32)
        n = len(self._masks)
        self.sources = np.zeros(n, np.int32) if sources is None else np.asarray(list(sources), dtype=np.int32)
        if self.classes.size != n or self.sources.size != n:
            raise LabelError(f"NucleiBank: {n} masks but {self.classes.size} classes and {self.sources.size} sources")
        if any(m.ndim != 2 for m in self._masks):
            raise LabelError("NucleiBank: every mask must be 2-D")
        self.areas = np.array([np.count_nonzero(m) for m in self._masks], dtype=np.int64)
        if n and self.areas.min() == 0:
            raise LabelError(f"NucleiBank: mask {int(np.argmin(self.areas))} is empty")
        for arr in (self.classes, self.sources, self.areas):
            arr.flags.writeable = False

    @classmethod
    def from_maps(cls, maps: Iterable[Any], *, border: int = 0) -> "NucleiBank":
        """Collect every classed nucleus of ``(inst_map, inst_types)`` pairs (or objects with those attributes).

        ``border > 0`` skips nuclei with a pixel within ``border`` px of the map edge (cut
        or border-adjacent nuclei are poor donors). Nuclei of class 0 are skipped.
        """
        border = int(border)
        if border < 0:
            raise LabelError(f"border must be >= 0 px, got {border}")
        masks, classes, sources = [], [], []
        for index, item in enumerate(maps):
            inst_map, inst_types = (item.inst_map, item.inst_types) if hasattr(item, "inst_map") else item
            inst_map = _label_array(inst_map, "inst_map")
            props = nuclei_props(inst_map, inst_types)
            h, w = inst_map.shape
            for nid, (y0, x0, y1, x1), k in zip(props.ids, props.bboxes, props.classes):
                if k == 0 or (border and (y0 < border or x0 < border or y1 > h - border or x1 > w - border)):
                    continue
                masks.append(inst_map[y0:y1, x0:x1] == nid)
                classes.append(k)
                sources.append(index)
        return cls(masks, classes, sources)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        counts = {int(k): int(v) for k, v in zip(*np.unique(self.classes, return_counts=True))}
        return f"NucleiBank({len(self)} nuclei, per class {counts})"

    def mask(self, i: int) -> np.ndarray:
        """Read-only tight boolean mask of entry ``i``."""
        return self._masks[i]

    def query(
        self,
        cls: int | None = None,
        min_area: int | None = None,
        max_area: int | None = None,
        *,
        source: int | None = None,
    ) -> np.ndarray:
        """Indices of entries of class ``cls`` (None: any) with ``min_area <= area <= max_area``."""
        keep = np.ones(len(self), dtype=bool)
        if cls is not None:
            keep &= self.classes == cls
        if min_area is not None:
            keep &= self.areas >= min_area
        if max_area is not None:
            keep &= self.areas <= max_area
        if source is not None:
            keep &= self.sources == source
        return np.flatnonzero(keep)

    def sample(
        self,
        cls: int | None,
        rng: np.random.Generator | int | None,
        *,
        min_area: int | None = None,
        max_area: int | None = None,
        source: int | None = None,
        exclude: Iterable[int] = (),
    ) -> int | None:
        """A random matching entry index (uniform), or None when nothing matches."""
        idx = self.query(cls, min_area, max_area, source=source)
        excluded = np.fromiter(exclude, dtype=np.int64)
        if excluded.size:
            idx = idx[~np.isin(idx, excluded)]
        if idx.size == 0:
            return None
        return int(idx[np.random.default_rng(rng).integers(idx.size)])

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to an ``.npz`` file atomically."""
        from .atomic import atomic_path

        shapes = np.array([m.shape for m in self._masks], dtype=np.int64).reshape(-1, 2)
        flat = np.concatenate([m.reshape(-1) for m in self._masks]) if self._masks else np.zeros(0, bool)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, format=np.array("diffmix-nuclei-bank-1"), shapes=shapes, pixels=np.packbits(flat),
                n_pixels=np.array(flat.size), classes=self.classes, sources=self.sources,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NucleiBank":
        """Read a bank written by :meth:`save`."""
        if not os.path.isfile(path):
            raise DatasetError("nuclei bank file does not exist", path)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"cannot read nuclei bank: {exc}", path) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DatasetError("not a napari-diffmix nuclei bank (expected an .npz archive)", path)
        with data:
            if "format" not in data.files or str(data["format"]) != "diffmix-nuclei-bank-1":
                raise DatasetError("not a napari-diffmix nuclei bank (missing or unknown 'format')", path)
            try:
                shapes, classes, sources = data["shapes"], data["classes"], data["sources"]
                flat = np.unpackbits(data["pixels"], count=int(data["n_pixels"])).astype(bool)
            except (KeyError, ValueError, zipfile.BadZipFile) as exc:
                raise DatasetError(f"nuclei bank is corrupt: {exc}", path) from None
        ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
        if ends.size and ends[-1] != flat.size:
            raise DatasetError("nuclei bank is corrupt (mask sizes do not add up)", path)
        starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
        masks = [flat[a:b].reshape(s) for a, b, s in zip(starts, ends, shapes)]
        return cls(masks, classes, sources)


# -- many edits in one pass ----------------------------------------------------------------------
def nucleus_masks(inst_map: np.ndarray, props: NucleiProps) -> list[np.ndarray]:
    """Tight boolean mask of every nucleus in ``props`` (its bounding-box crop), in row order.

    Masks are taken from ``inst_map`` as it is now, so pass the props of that map.
    """
    inst_map = _label_array(inst_map, "inst_map")
    return [inst_map[y0:y1, x0:x1] == nid for nid, (y0, x0, y1, x1) in zip(props.ids.tolist(), props.bboxes.tolist())]


def _present(inst_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` still have a pixel in the map (one scan)."""
    if ids.size == 0:
        return np.zeros(0, dtype=bool)
    flat = inst_map.reshape(-1)
    top = int(ids.max())
    if top <= 4 * flat.size + 1024:
        counts = np.bincount(flat, minlength=top + 1)
        return counts[ids] > 0
    return np.isin(ids, flat)


def draw_nuclei(
    inst_map: np.ndarray,
    inst_types: Any,
    stamps: Iterable[tuple[int, int, np.ndarray, tuple[int, int]]],
    *,
    erase: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Many edits in one pass: erase nuclei, then draw nucleus masks in order, each on top.

    ``erase`` ids become background (class 0 unless redrawn). Each stamp ``(nid, cls, mask,
    (y0, x0))`` draws the boolean ``mask`` with its top-left pixel at ``(y0, x0)`` as nucleus
    ``nid`` of class ``cls``; a stamp covers everything drawn before it, including earlier
    stamps. This is the module's occlusion rule applied to a batch: covered pixels change
    hands, pixels off the map are clipped, and any nucleus left with no pixels disappears
    (``inst_types`` entry 0). Redrawing an id that is still on the map without erasing it
    first adds pixels to that nucleus.

    Pure like the edit verbs (returns new arrays), but the map is copied and scanned a fixed
    number of times however many stamps there are, so a thousand edits cost about as much as
    one verb call.
    """
    inst_map = _label_array(inst_map, "inst_map")
    _nonnegative(inst_map, "inst_map")
    h, w = inst_map.shape
    out = np.array(inst_map, dtype=np.int32, order="C")
    fv = out.reshape(-1)
    erase_ids = np.unique(np.fromiter((_check_id(e) for e in erase), dtype=np.int64))
    if erase_ids.size:
        top = max(int(fv.max(initial=0)), int(erase_ids[-1]))
        if top <= 4 * fv.size + 1024:
            lut = np.zeros(top + 1, dtype=bool)
            lut[erase_ids] = True
            fv[lut[fv]] = 0
        else:
            fv[np.isin(fv, erase_ids)] = 0
    flats, nids, classes = [], [], []
    for nid, cls, mask, (y0, x0) in stamps:
        nid, cls = _check_id(nid), _check_class(cls)
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise LabelError(f"stamp for nucleus {nid}: mask must be a 2-D boolean array, got shape {mask.shape}")
        my, mx = np.nonzero(mask)
        my = my + int(y0)
        mx = mx + int(x0)
        inside = (my >= 0) & (my < h) & (mx >= 0) & (mx < w)
        flats.append(my[inside] * w + mx[inside])
        nids.append(nid)
        classes.append(cls)
    stamped = np.asarray(nids, dtype=np.int64)
    top = max(int(stamped.max(initial=0)), int(erase_ids.max(initial=0)))
    types = _types_copy(inst_types, top + 1)
    types[erase_ids] = 0
    if not flats:
        return out, types
    sizes = np.fromiter((f.size for f in flats), dtype=np.int64, count=len(flats))
    flat = np.concatenate(flats)
    ids = np.repeat(stamped, sizes).astype(np.int32)
    if flat.size:
        # Later stamps win: after a stable sort by pixel, the last entry of each run is the top one.
        order = np.argsort(flat, kind="stable")
        sf = flat[order]
        last = np.ones(sf.size, dtype=bool)
        last[:-1] = sf[1:] != sf[:-1]
        keep = order[last]
        flat, ids = flat[keep], ids[keep]
    covered = fv[flat]
    fv[flat] = ids
    # A nucleus stamped twice keeps the class of its last stamp.
    _, last_rev = np.unique(stamped[::-1], return_index=True)
    last_stamp = stamped.size - 1 - last_rev
    types[stamped[last_stamp]] = np.asarray(classes, dtype=np.int32)[last_stamp]
    candidates = np.unique(np.concatenate([covered[covered > 0], stamped]).astype(np.int64))
    gone = candidates[~_present(out, candidates)]
    types[gone] = 0
    return out, types


def nuclei_bboxes(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, bboxes)`` of the nuclei present, in id order: the cheap part of :func:`nuclei_props`
    (no centroids or areas), for code that runs per patch thousands of times."""
    inst_map = _label_array(inst_map, "inst_map")
    _nonnegative(inst_map, "inst_map")
    top = int(inst_map.max()) if inst_map.size else 0
    if top == 0:
        return np.zeros(0, np.int32), np.zeros((0, 4), np.int64)
    if top <= 4 * inst_map.size + 1024:
        slices = ndimage.find_objects(inst_map if inst_map.dtype == np.int32 else inst_map.astype(np.int32))
        ids = np.array([k + 1 for k, s in enumerate(slices) if s is not None], dtype=np.int32)
        boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in slices if s is not None]
        return ids, np.array(boxes, dtype=np.int64).reshape(-1, 4)
    props = nuclei_props(inst_map)
    return props.ids, props.bboxes
