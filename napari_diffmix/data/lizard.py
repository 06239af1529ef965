"""The ``lizard`` and ``conic`` layouts: the Lizard release (``.mat`` labels with ``id`` and
``class``, images in their own folders) and the CoNIC patches (``images.npy`` + ``labels.npy``),
both in Lizard's six classes (:data:`napari_diffmix.classes.LIZARD`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError, SchemeError
from ..nuclei import inst_types_from_maps, type_map_from
from .files import (
    IMAGE_SUFFIXES, file_check, files_by_stem, find_one, mat_keys, mmap_array, natural_key,
    pair_stems, present_ids, stack_check, stack_image,
)
from .consep import read_consep_tile
from .tiles import Dataset, Tile, as_labels


def is_lizard_mat(path: Path | None) -> bool:
    keys = mat_keys(path) if path is not None else []
    return "id" in keys and "class" in keys


def _check_lizard_scheme(scheme: ClassScheme, root: Path, what: str) -> None:
    from ..classes import BUILTIN_SCHEMES, LIZARD

    if scheme.name in BUILTIN_SCHEMES and scheme != LIZARD:
        raise SchemeError(
            f"{root}: {what} labels use Lizard's six classes (1 neutrophil ... 6 connective); "
            f"scheme {scheme.name!r} would misread them: use --scheme lizard or a scheme file whose merge maps Lizard's ids"
        )


def read_lizard(root: str | os.PathLike, scheme: Any) -> Dataset:
    """The Lizard release: ``.mat`` labels (``inst_map``, ``id``, ``class``, ``bbox``, ``centroid``)
    in a ``Labels`` folder (e.g. ``Lizard_Labels/Labels``) and images in folders whose name says
    ``image`` (``Lizard_Images1``, ``Lizard_Images2``), paired by stem; no image folder = labels only."""
    root = Path(root)
    scheme = load_scheme(scheme)
    _check_lizard_scheme(scheme, root, "Lizard")
    label_dirs = [p.parent for p in root.glob("**/*.mat") if len(p.relative_to(root).parts) <= 3]
    label_dirs = sorted(set(label_dirs))
    if not label_dirs:
        raise DatasetError("a Lizard folder needs .mat labels (Lizard_Labels/Labels/*.mat)", root)
    labels: dict[str, Path] = {}
    for d in label_dirs:
        labels.update(files_by_stem(d, (".mat",)))
    image_dirs = [p for p in [root, *root.glob("*"), *root.glob("*/*")] if p.is_dir() and "image" in p.name.lower()]
    images: dict[str, Path] = {}
    for d in image_dirs:
        for stem, path in files_by_stem(d, IMAGE_SUFFIXES).items():
            if stem in images:
                raise DatasetError(f"image {stem!r} is in two folders: {images[stem].parent} and {path.parent}", root)
            images[stem] = path
    names = pair_stems({"labels": labels, "images": images}, root) if images else sorted(labels, key=natural_key)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        return read_consep_tile(images[name] if with_image and images else None, labels[name], scheme, name)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="lizard", image_check=file_check(names, images)
    )


def read_conic(root: str | os.PathLike, scheme: Any) -> Dataset:
    """CoNIC patches: ``images.npy`` (N, 256, 256, 3) uint8 and ``labels.npy`` (N, 256, 256, 2)
    (channel 0 instance ids, channel 1 Lizard class 0..6 per pixel), memory-mapped. A nucleus's
    class is the majority of its pixels. ``counts.csv`` is not needed (it counts only the central
    224 px). Tiles are named ``00000``, ``00001``, ... in row order."""
    root = Path(root)
    scheme = load_scheme(scheme)
    _check_lizard_scheme(scheme, root, "CoNIC")
    labels_path = find_one(root, "labels.npy", 1)
    if labels_path is None:
        raise DatasetError("a CoNIC folder needs labels.npy (N, H, W, 2) beside images.npy", root)
    labels = mmap_array(labels_path)
    if labels.ndim != 4 or labels.shape[3] != 2:
        raise DatasetError(f"labels.npy must be (N, H, W, 2): instance ids then classes, got {labels.shape}", labels_path)
    images_path = labels_path.parent / "images.npy"
    images = mmap_array(images_path) if images_path.is_file() else None
    if images is not None and (images.ndim != 4 or images.shape[:3] != labels.shape[:3] or images.shape[3] not in (3, 4)):
        raise DatasetError(f"images.npy {images.shape} must be (N, H, W, 3) matching labels.npy {labels.shape}", images_path)
    names = [f"{i:05d}" for i in range(labels.shape[0])]

    def load(i: int, with_image: bool = True) -> Tile:
        where = f"{labels_path}[{i}]"
        lab = np.asarray(labels[i])
        inst_map = as_labels(lab[..., 0], "instance channel", np.int32, where)
        raw = as_labels(lab[..., 1], "class channel", np.int32, where)
        merged = scheme.merge_raw(raw, source=where)
        inst_types = inst_types_from_maps(inst_map, merged)
        present = present_ids(inst_map)
        unclassed = present[inst_types[present] == 0]
        if unclassed.size:
            raise DatasetError(f"{unclassed.size} nuclei have class 0 in the class channel (ids {unclassed[:10].tolist()})", where)
        image = None
        if images is not None and with_image:
            image = stack_image(images, i, images_path)
        return Tile(names[i], image, inst_map, type_map_from(inst_map, inst_types), source=where)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="conic",
        image_check=stack_check(images, images_path),
    )
