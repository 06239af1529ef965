"""The ``generic`` layout: this package's own (written by :func:`write_generic`); classes are the
scheme's merged classes::

    images/<stem>.png|.tif|.tiff      optional folder; if present, one image per stem
    inst_maps/<stem>.npy|.tif|.tiff|.png   int instance ids, 0 = background
    type_maps/<stem>.npy|.tif|.tiff|.png   class per pixel, 0 = background
    scheme.json                       optional; the class scheme the maps use

Instead of ``inst_maps`` + ``type_maps``, ``labels/<stem>.npz`` holding ``inst_map`` and
``type_map`` arrays is also read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError
from ..nuclei import check_consistency
from ..progress import progress_bar
from .files import (
    IMAGE_SUFFIXES, LABEL_SUFFIXES, check_pair_shapes, child_dir, file_check, files_by_stem,
    pair_stems, read_image, read_label_file,
)
from .tiles import Dataset, Tile, as_labels


def generic_tile(
    name: str, image: np.ndarray | None, image_path: Path | None, inst_map: Any, type_map: Any, label_path: Path,
    scheme: ClassScheme,
) -> Tile:
    """A tile of merged-class label maps: classes must be the scheme's and one per nucleus (LabelError otherwise)."""
    where = os.fspath(label_path)
    inst_map = as_labels(inst_map, "inst_map", np.int32, where)
    check_pair_shapes(image, image_path or label_path, inst_map, label_path)
    type_map = as_labels(type_map, "type_map", np.uint8, where)
    scheme.check_classes(type_map, source=where)
    check_consistency(inst_map, type_map, source=where)
    return Tile(name, image, inst_map, type_map, source=where)


def read_generic(root: str | os.PathLike, scheme: Any) -> Dataset:
    """A generic folder (see the module docstring), tiles paired by stem and read lazily."""
    root = Path(root)
    scheme = load_scheme(scheme)
    img_dir = child_dir(root, "images")
    images = files_by_stem(img_dir, IMAGE_SUFFIXES) if img_dir else None
    inst_dir, type_dir = child_dir(root, "inst_maps"), child_dir(root, "type_maps")
    npz_dir = child_dir(root, "labels")
    groups: dict[str, dict[str, Path]] = {}
    if inst_dir or type_dir:
        if not (inst_dir and type_dir):
            raise DatasetError("a generic folder needs both 'inst_maps' and 'type_maps' sub-folders", root)
        groups = {inst_dir.name: files_by_stem(inst_dir, LABEL_SUFFIXES), type_dir.name: files_by_stem(type_dir, LABEL_SUFFIXES)}
    elif npz_dir:
        groups = {npz_dir.name: files_by_stem(npz_dir, (".npz",))}
        if not groups[npz_dir.name]:
            raise DatasetError(
                f"a generic folder needs 'inst_maps' + 'type_maps' sub-folders or .npz files in '{npz_dir.name}' (found none)",
                root,
            )
    else:
        raise DatasetError("a generic folder needs 'inst_maps' + 'type_maps' (or 'labels/*.npz') sub-folders", root)
    if images is not None:
        groups[img_dir.name] = images
    if not any(groups.values()):
        raise DatasetError(f"no tiles: the folders {sorted(groups)} are empty", root)
    names = pair_stems(groups, root)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        image_path = images[name] if images is not None and with_image else None
        image = None if image_path is None else read_image(image_path)
        if inst_dir:
            ip, tp = groups[inst_dir.name][name], groups[type_dir.name][name]
            return generic_tile(name, image, image_path, read_label_file(ip), read_label_file(tp), ip, scheme)
        path = groups[npz_dir.name][name]
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("inst_map", "type_map") if k not in data.files]
                if missing:
                    raise DatasetError(f"missing key(s) {missing} (keys in file: {sorted(data.files)})", path)
                inst_map, type_map = data["inst_map"], data["type_map"]
        except DatasetError:
            raise
        except Exception as exc:  # see read_image
            raise DatasetError(f"cannot read label file: {exc}", path) from None
        return generic_tile(name, image, image_path, inst_map, type_map, path, scheme)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="generic", image_check=file_check(names, images)
    )


def write_generic(
    dataset_or_tiles: Iterable[Tile],
    out_dir: str | os.PathLike,
    *,
    scheme: Any = None,
    overwrite: bool = False,
    pbar: Any | None = None,
    kind: str = "dataset",
) -> Path:
    """Write tiles as a generic folder (``images/*.png``, ``inst_maps/*.npy``, ``type_maps/*.npy``, ``scheme.json``).

    The folder appears whole or not at all. Images are written when every tile has one
    (all or none). ``scheme`` defaults to the dataset's; it is checked against the type maps
    and saved so the folder opens without naming a scheme. The folder is marked as ``kind``
    output (see :mod:`napari_diffmix.outputs`); ``overwrite`` replaces only an earlier output
    of the same kind, never another folder.
    """
    import imageio.v3 as iio

    from ..atomic import atomic_dir
    from ..outputs import check_replace, write_marker

    out_dir = Path(out_dir)
    if scheme is None:
        scheme = getattr(dataset_or_tiles, "scheme", None)
    scheme = None if scheme is None else load_scheme(scheme)
    check_replace(out_dir, overwrite, [kind])
    total = len(dataset_or_tiles) if hasattr(dataset_or_tiles, "__len__") else None
    seen: set[str] = set()
    with_images: bool | None = None
    with atomic_dir(out_dir) as tmp, progress_bar(pbar, total, "write", unit="tile") as bar:
        for sub in ("inst_maps", "type_maps"):
            (tmp / sub).mkdir()
        for tile in dataset_or_tiles:
            if not isinstance(tile, Tile):
                raise DatasetError(f"write_generic needs Tile objects, got {type(tile).__name__}")
            if not tile.name or tile.name in seen or Path(tile.name).name != tile.name or tile.name.startswith("."):
                raise DatasetError(f"tile name {tile.name!r} is empty, repeated or not a plain file name")
            seen.add(tile.name)
            has_image = tile.image is not None
            if with_images is None:
                with_images = has_image
                if has_image:
                    (tmp / "images").mkdir()
            elif with_images != has_image:
                raise DatasetError(f"tile {tile.name!r}: either every tile has an image or none does")
            if scheme is not None:
                scheme.check_classes(tile.type_map, source=tile.source or tile.name)
            np.save(tmp / "inst_maps" / f"{tile.name}.npy", tile.inst_map)
            np.save(tmp / "type_maps" / f"{tile.name}.npy", tile.type_map)
            if has_image:
                iio.imwrite(tmp / "images" / f"{tile.name}.png", tile.image)
            bar.update(1)
        if not seen:
            raise DatasetError("nothing to write: no tiles")
        if scheme is not None:
            scheme.save(tmp / "scheme.json")
        write_marker(tmp, kind)
    return out_dir
