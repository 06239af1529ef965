"""The ``consep`` layout: the CoNSeP / GLySAC releases (point at the folder holding ``Images``
and ``Labels``, e.g. ``CoNSeP/Train``)::

    Images/<stem>.png|.tif|.tiff      H&E tile, RGB (an alpha channel is dropped)
    Labels/<stem>.mat                 inst_map (H, W), type_map (H, W) raw ids,
                                      inst_type (N, 1) raw id of nucleus 1..N, inst_centroid (x, y)
                                      (ids beyond N: see :func:`read_consep_labels`)

Images and labels are paired by file stem, never by listing order. Raw type ids are merged
into scheme classes exactly once, here. ``inst_type`` is the authority for each nucleus's
class; ``type_map`` is cross-checked against it. The Lizard and HoVer-Net readers read their
``.mat`` files with :func:`read_consep_labels` too."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError, SchemeError
from ..nuclei import inst_types_from_maps, remap_ids, type_map_from
from .files import (
    IMAGE_SUFFIXES, check_pair_shapes, child_dir, file_check, files_by_stem, loadmat, pair_stems,
    present_ids, read_image,
)
from .tiles import Dataset, Tile, as_labels, note_once

log = logging.getLogger(__name__)


# CoNSeP's type_map and inst_type agree pixel for pixel; allow a sliver of disagreement
# (annotation tools rasterise borders differently) but not a mislabelled file.
TYPE_MAP_TOLERANCE = 0.01


def _id_column(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    """A per-nucleus ``.mat`` entry, (N, 1) or (N,) as MATLAB saves it, as int64 (N,)."""
    a = np.asarray(mat[key])
    if a.ndim > 2 or (a.ndim == 2 and 1 not in a.shape and a.size):
        raise DatasetError(f"{key} must be an (N, 1) column, one value per nucleus, got shape {a.shape}", path)
    a = a.reshape(-1)
    if a.size and (not np.issubdtype(a.dtype, np.number) or not np.all(np.mod(a, 1) == 0)):
        raise DatasetError(f"{key} holds non-integer values", path)
    return a.astype(np.int64)


def _listed_labels(mat: dict[str, Any], inst_map: np.ndarray, scheme: ClassScheme, path: Path, keys: list[str]) -> np.ndarray:
    """Class per pixel for files that list their nuclei's ids next to their classes.

    HoVer-Net's ``run_infer`` output (``inst_uid`` + ``inst_type``): classes are the model's own
    (already merged, e.g. 1..4 for the CoNSeP model) and used as they are; ids it leaves out
    (instances whose contour had < 3 points) and type 0 stay as unclassed detections (class 0).
    No ``inst_type`` means an instance-only model: every nucleus is unclassed.
    Lizard (``id`` + ``class``): raw Lizard classes, merged by ``scheme``; every nucleus needs one.
    """
    hovernet = "inst_uid" in mat
    id_key, type_key = ("inst_uid", "inst_type") if hovernet else ("id", "class")
    uid = _id_column(mat, id_key, path)
    if type_key in mat:
        raw = _id_column(mat, type_key, path)
    elif hovernet:
        raw = np.zeros_like(uid)
    else:
        raise DatasetError(f"missing key 'class' (Lizard lists each nucleus's class beside 'id'; keys in file: {keys})", path)
    if raw.size != uid.size:
        raise DatasetError(f"{id_key} lists {uid.size} nuclei but {type_key} {raw.size}; expected one {type_key} per id", path)
    if np.unique(uid).size != uid.size or (uid.size and uid.min() <= 0):
        raise DatasetError(f"{id_key} must list distinct nucleus ids >= 1", path)
    if hovernet:
        if raw.size and (raw.min() < 0 or raw.max() > scheme.num_classes):
            raise SchemeError(
                f"{path}: inst_type holds class ids {sorted(set(raw.tolist()) - set(range(scheme.num_classes + 1)))[:10]} "
                f"outside 0..{scheme.num_classes} of scheme {scheme.name!r}; pass the scheme the model was trained with"
            )
        classes = raw
    else:
        classes = scheme.merge_raw(raw, source=path).astype(np.int64)
    present = present_ids(inst_map)
    top = int(max(uid.max(initial=0), present.max(initial=0)))
    lut = np.full(top + 1, -1, np.int64)
    lut[0] = 0
    lut[uid] = classes
    unlisted = present[lut[present] < 0]
    if unlisted.size and not hovernet:
        raise DatasetError(f"inst_map has {unlisted.size} nuclei whose id 'id' does not list (ids {unlisted[:10].tolist()})", path)
    unclassed = present[lut[present] == 0]
    if unclassed.size and not hovernet:
        raise DatasetError(f"'class' gives {unclassed.size} nuclei class 0 (background): ids {unclassed[:10].tolist()}", path)
    lut[lut < 0] = 0
    return lut[inst_map]


def _centroids_agree(inst_map: np.ndarray, listed_xy: np.ndarray, tol: float = 2.0) -> bool:
    """Whether the nuclei of ``inst_map`` (in id order) sit at ``listed_xy`` ((N, 2), x then y)."""
    from ..nuclei import nuclei_props

    props = nuclei_props(inst_map)
    xy = np.asarray(listed_xy, np.float64).reshape(-1, 2)
    if xy.shape[0] != len(props):
        return False
    return bool(np.all(np.hypot(props.centroids[:, 1] - xy[:, 0], props.centroids[:, 0] - xy[:, 1]) <= tol))


def read_consep_labels(mat_path: str | os.PathLike, scheme: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map int32, type_map uint8)`` of a labelled ``.mat``, raw types merged by ``scheme`` (exactly once).

    CoNSeP/GLySAC convention (``inst_map``, ``type_map``, ``inst_type`` (N, 1), ``inst_centroid``):
    ``inst_type`` decides each nucleus's class; a ``type_map`` is cross-checked against it (or,
    without ``inst_type``, gives each nucleus its majority class). An all-zero ``type_map``
    (predictions saved without one) is ignored. Ids need not run 1..N: when ``inst_map`` holds
    exactly as many distinct ids as ``inst_type`` lists, ``inst_type`` is read in the order of the
    sorted ids and the ids are renumbered 1..N, provided ``type_map`` or ``inst_centroid`` confirms
    that order; anything else is refused as ambiguous.

    Files that list their ids (HoVer-Net output ``inst_uid``, Lizard ``id``): see :func:`_listed_labels`;
    older HoVer-Net output's ``inst_type`` of (N, 2) rows ``[id, type]`` (no ``type_map``) is read the same way.
    """
    mat_path = Path(mat_path)
    scheme = load_scheme(scheme)
    where = os.fspath(mat_path)
    mat = loadmat(mat_path)
    keys = sorted(k for k in mat if not k.startswith("__"))
    if "inst_map" not in mat:
        raise DatasetError(f"missing key 'inst_map' (keys in file: {keys})", mat_path)
    inst_map = as_labels(mat["inst_map"], "inst_map", np.int32, where)
    pairs = np.asarray(mat.get("inst_type", np.zeros((0, 1))))
    if "inst_uid" not in mat and "type_map" not in mat and pairs.ndim == 2 and pairs.shape[1] == 2 and pairs.shape[0] != 2:
        # HoVer-Net's run_infer before inst_uid (2020) saved inst_type as (N, 2) rows [id, type].
        # (2, 2) is left alone: it could be a transposed 2-nucleus column.
        mat = {**mat, "inst_uid": pairs[:, :1], "inst_type": pairs[:, 1:]}
    if "inst_uid" in mat or "id" in mat:
        return inst_map, as_labels(_listed_labels(mat, inst_map, scheme, mat_path, keys), "type_map", np.uint8, where)
    raw_type_map = None
    if "type_map" in mat:
        raw_type_map = as_labels(mat["type_map"], "type_map", np.int32, where)
        if raw_type_map.shape != inst_map.shape:
            raise DatasetError(f"inst_map {inst_map.shape} and type_map {raw_type_map.shape} differ in shape", mat_path)
        if not raw_type_map.any() and inst_map.any():
            # Prediction tools save an empty type_map beside inst_type; it carries no classes.
            raw_type_map = None
    if "inst_type" not in mat and raw_type_map is None:
        why = "the type_map is all zero" if "type_map" in mat else "no 'type_map'"
        raise DatasetError(f"missing key 'inst_type' ({why} to derive classes from; keys in file: {keys})", mat_path)
    if "inst_type" in mat:
        raw = _id_column(mat, "inst_type", mat_path)
        present = present_ids(inst_map)
        top = int(present[-1]) if present.size else 0
        relabelled = False
        if top > raw.size:
            head = f"inst_map has nucleus id {top} but inst_type lists only {raw.size} nuclei"
            if present.size != raw.size:
                raise DatasetError(
                    f"{head}, and the map holds {present.size} distinct ids, so inst_type cannot be matched to them", mat_path
                )
            centroids = mat.get("inst_centroid")
            if raw_type_map is None and (centroids is None or not _centroids_agree(inst_map, centroids)):
                raise DatasetError(
                    f"{head}; the {present.size} distinct ids may be listed in sorted order, but neither a type_map nor "
                    "inst_centroid confirms that order", mat_path
                )
            inst_map, _ = remap_ids(inst_map)  # ids in sorted order -> 1..N, matching inst_type's rows
            relabelled = True
        inst_types = np.zeros(raw.size + 1, dtype=np.int32)
        inst_types[1:] = scheme.merge_raw(raw, source=mat_path)
        present = present_ids(inst_map)
        unclassed = present[inst_types[present] == 0]
        if unclassed.size:
            raise DatasetError(
                f"inst_type gives raw type 0 (background) to {unclassed.size} nuclei present in inst_map "
                f"(ids {unclassed[:10].tolist()})",
                mat_path,
            )
        type_map = type_map_from(inst_map, inst_types)
        if raw_type_map is not None:
            merged = scheme.merge_raw(raw_type_map, source=mat_path)
            bad = int(np.count_nonzero(merged != type_map))
            labelled = int(np.count_nonzero(inst_map))
            if bad > TYPE_MAP_TOLERANCE * max(labelled, 1):
                order = " (inst_type read in the order of the sorted ids)" if relabelled else ""
                raise DatasetError(
                    f"type_map disagrees with inst_type{order} at {bad} of {labelled} nucleus pixels "
                    f"({100 * bad / max(labelled, 1):.1f} %, tolerance {100 * TYPE_MAP_TOLERANCE:g} %); "
                    "the file's labels are inconsistent or belong to another scheme",
                    mat_path,
                )
        if relabelled:
            note_once(
                ("relabel", os.fspath(mat_path.parent)),
                f"{mat_path}: nucleus ids up to {top} for {raw.size} nuclei; read inst_type in the order of the sorted ids "
                f"and renumbered them 1..{raw.size} (checked against the {'type_map' if raw_type_map is not None else 'inst_centroid'}); "
                f"other files in {mat_path.parent} like it are read the same way", log,
            )
    else:
        merged = scheme.merge_raw(raw_type_map, source=mat_path)
        type_map = type_map_from(inst_map, inst_types_from_maps(inst_map, merged))
    return inst_map, type_map


def read_consep_tile(
    image_path: str | os.PathLike | None, mat_path: str | os.PathLike, scheme: Any, name: str | None = None
) -> Tile:
    """One CoNSeP/GLySAC tile (labels by :func:`read_consep_labels`); ``image_path`` None reads the labels only."""
    mat_path = Path(mat_path)
    inst_map, type_map = read_consep_labels(mat_path, scheme)
    image = None
    if image_path is not None:
        image_path = Path(image_path)
        image = read_image(image_path)
        check_pair_shapes(image, image_path, inst_map, mat_path)
    return Tile(name or mat_path.stem, image, inst_map, type_map, source=os.fspath(mat_path))


def read_consep(root: str | os.PathLike, scheme: Any) -> Dataset:
    """A CoNSeP/GLySAC folder (``Images`` + ``Labels``), tiles paired by stem and read lazily."""
    root = Path(root)
    scheme = load_scheme(scheme)
    img_dir, lab_dir = child_dir(root, "Images"), child_dir(root, "Labels")
    if img_dir is None or lab_dir is None:
        raise DatasetError("a CoNSeP/GLySAC folder needs 'Images' and 'Labels' sub-folders", root)
    images = files_by_stem(img_dir, IMAGE_SUFFIXES)
    labels = files_by_stem(lab_dir, (".mat",))
    if not images and not labels:
        raise DatasetError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {img_dir.name} and no .mat labels in {lab_dir.name}", root)
    names = pair_stems({img_dir.name: images, lab_dir.name: labels}, root)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        return read_consep_tile(images[name] if with_image else None, labels[name], scheme, name)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="consep", image_check=file_check(names, images)
    )
