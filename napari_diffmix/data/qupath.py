"""The ``geojson`` layout: QuPath GeoJSON files with their images, see
:func:`read_geojson_folder` and :mod:`napari_diffmix.geojson`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from ..classes import load_scheme
from ..errors import DatasetError
from .files import (
    IMAGE_SUFFIXES, child_dir, file_check, files_by_stem, image_size, natural_key, read_image,
)
from .tiles import Dataset, Tile


def read_geojson_folder(root: str | os.PathLike, scheme: Any) -> Dataset:
    """QuPath GeoJSON (see :mod:`napari_diffmix.geojson`): ``<stem>.geojson`` with its image
    ``<stem>.png|.tif`` beside it or in ``images/`` (the image gives the size); classes by name."""
    from ..geojson import SUFFIXES, labels_from_features, read_geojson

    root = Path(root)
    scheme = load_scheme(scheme)
    shapes = files_by_stem(root, SUFFIXES)
    if not shapes:
        raise DatasetError("a GeoJSON folder needs <stem>.geojson files", root)
    images = files_by_stem(root, IMAGE_SUFFIXES)
    img_dir = child_dir(root, "images")
    if img_dir is not None:
        for stem, path in files_by_stem(img_dir, IMAGE_SUFFIXES).items():
            images.setdefault(stem, path)
    missing = sorted(set(shapes) - set(images), key=natural_key)
    if missing:
        raise DatasetError(
            f"GeoJSON carries no image size: no image beside {len(missing)} file(s) {missing[:10]} "
            f"(expected <stem>.png or .tif next to <stem>.geojson, or in images/)", root,
        )
    names = sorted(shapes, key=natural_key)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        image = read_image(images[name]) if with_image else None
        size = image.shape[:2] if image is not None else image_size(images[name])
        if size is None:
            raise DatasetError("cannot read the image size", images[name])
        inst_map, type_map = labels_from_features(read_geojson(shapes[name]), size, scheme, source=shapes[name])
        return Tile(name, image, inst_map, type_map, source=os.fspath(shapes[name]))

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="geojson", image_check=file_check(names, images)
    )
