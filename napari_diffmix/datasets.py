"""Dataset readers and writers, patch grids and per-class statistics.

Seven on-disk layouts are read (``open_dataset`` detects which): this package's own and the
public releases below, plus the files other tools make (``hovernet``: HoVer-Net ``run_infer``
predictions, see :func:`read_hovernet`; ``lizard`` / ``conic``: the Lizard release and the CoNIC
patches, see :func:`read_lizard`, :func:`read_conic`; ``geojson``: QuPath GeoJSON with images,
see :func:`read_geojson_folder` and :mod:`napari_diffmix.geojson`).

``consep`` — CoNSeP / GLySAC releases (point at the folder holding ``Images`` and ``Labels``,
e.g. ``CoNSeP/Train``)::

    Images/<stem>.png|.tif|.tiff      H&E tile, RGB (an alpha channel is dropped)
    Labels/<stem>.mat                 inst_map (H, W), type_map (H, W) raw ids,
                                      inst_type (N, 1) raw id of nucleus 1..N, inst_centroid (x, y)
                                      (ids beyond N: see :func:`read_consep_labels`)

  Images and labels are paired by file stem, never by listing order. Raw type ids are merged
  into scheme classes exactly once, here. ``inst_type`` is the authority for each nucleus's
  class; ``type_map`` is cross-checked against it.

``generic`` — this package's own layout (written by :func:`write_generic`); classes are the
scheme's merged classes::

    images/<stem>.png|.tif|.tiff      optional folder; if present, one image per stem
    inst_maps/<stem>.npy|.tif|.tiff|.png   int instance ids, 0 = background
    type_maps/<stem>.npy|.tif|.tiff|.png   class per pixel, 0 = background
    scheme.json                       optional; the class scheme the maps use

  Instead of ``inst_maps`` + ``type_maps``, ``labels/<stem>.npz`` holding ``inst_map`` and
  ``type_map`` arrays is also read.

``pannuke`` — stacked arrays, memory-mapped::

    images.npy (N, H, W, 3) + masks.npy (N, H, W, C + 1)   PanNuke: channel c holds the
        instances of raw class c + 1, the last channel is background (may sit in sub-folders,
        as in the PanNuke fold archives)
    inst_maps.npy (N, H, W) + type_maps.npy (N, H, W) [+ images.npy]   merged classes

The path ``"demo"`` opens the bundled demo tile.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .classes import ClassScheme, load_scheme
from .data.tiles import Dataset, Tile, as_labels, as_rgb, note_once, tile_labels
from .errors import DatasetError, LabelError, SchemeError
from .nuclei import check_consistency, inst_types_from_maps, remap_ids, type_map_from
from .progress import progress_bar

log = logging.getLogger(__name__)

LAYOUTS = ("consep", "generic", "pannuke", "hovernet", "lizard", "conic", "geojson")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
# CoNSeP's type_map and inst_type agree pixel for pixel; allow a sliver of disagreement
# (annotation tools rasterise borders differently) but not a mislabelled file.
TYPE_MAP_TOLERANCE = 0.01


# -- file helpers --------------------------------------------------------------------------------
def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _child_dir(root: Path, name: str) -> Path | None:
    """Sub-folder of ``root`` called ``name``, case-insensitively (CoNSeP ships ``Images``)."""
    exact = root / name
    if exact.is_dir():
        return exact
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            found.setdefault(p.stem, []).append(p)
    clashes = {s: ps for s, ps in found.items() if len(ps) > 1}
    if clashes:
        s, ps = next(iter(sorted(clashes.items())))
        raise DatasetError(
            f"{len(clashes)} stem(s) have several files, e.g. {sorted(p.name for p in ps)}; keep one file per stem", folder
        )
    return {s: ps[0] for s, ps in found.items()}


def _pair(groups: dict[str, dict[str, Path]], root: Path) -> list[str]:
    """Stems present in every group (folder name -> stem -> path), or a DatasetError listing the unpaired."""
    all_stems = set().union(*groups.values())
    problems = []
    for folder, files in groups.items():
        missing = sorted(all_stems - set(files), key=_natural_key)
        if missing:
            problems.append(f"no {folder} file for {len(missing)} stem(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if problems:
        raise DatasetError("unpaired files (paired by file stem): " + "; ".join(problems), root)
    return sorted(all_stems, key=_natural_key)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for a file that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_png16(path: Path, colour_type: int) -> np.ndarray:
    """The samples of a 16-bit RGB (colour type 2) or RGBA (6) PNG, as uint16.

    Pillow holds RGB in 8 bits and keeps each sample's high byte, so a 16-bit PNG holding
    0..255 reads as zeros. Its PNG decoder also unpacks the little-endian variant of the same
    48/64-bit pixel, which keeps the other byte of each (big-endian) sample. Decoding twice,
    once per byte, and joining the two gives the samples exactly, while zlib, unfiltering and
    interlacing stay Pillow's own.
    """
    from PIL import Image

    mode = "RGB" if colour_type == 2 else "RGBA"
    planes = []
    for rawmode in (f"{mode};16B", f"{mode};16L"):
        with Image.open(path) as im:
            if im.mode != mode or not im.tile or any(t[3] != f"{mode};16B" for t in im.tile):
                raise DatasetError(f"cannot read 16-bit PNG: Pillow opened it as {im.mode} {[t[3] for t in im.tile]}", path)
            im.tile = [t._replace(args=rawmode) if hasattr(t, "_replace") else (*t[:3], rawmode) for t in im.tile]
            im.load()
            planes.append(np.asarray(im, dtype=np.uint16))
    return (planes[0] << 8) | planes[1]


def _decode_image(path: Path) -> np.ndarray:
    """Every pixel of an image file as its decoder gives it (any dtype, any channel count);
    a DatasetError naming the file if it is missing, truncated or not an image."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        png = _png_header(path)
        if png is not None and png[0] == 16 and png[1] in (2, 6):
            return _read_png16(path, png[1])
        if png == (16, 4):  # Pillow would widen grey + alpha to RGBA of high bytes
            raise DatasetError("grey with alpha (16-bit PNG), expected RGB (3 channels) or RGBA", path)
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError("image file does not exist", path) from None
    except Exception as exc:  # decoders raise many types; report the file, not a deep traceback
        raise DatasetError(f"cannot read image: {exc}", path) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image from PNG / TIFF / JPEG; alpha is dropped, grayscale is refused.

    16-bit files (PNG and TIFF) are read in full: values within 0..255 are taken as 8-bit, a
    wider range is scaled by 1/257 with a warning (see :func:`_to_8_bit`); notes come once per folder.
    """
    path = Path(path)
    return as_rgb(_decode_image(path), os.fspath(path), note_key=path.parent)


def image_problem(path: str | os.PathLike, shape: Sequence[int]) -> str | None:
    """Why :func:`read_image` would refuse ``path`` or not pair it with label maps of ``shape`` (H, W),
    as "what was found, what was expected"; None when the image fits.

    The file is decoded in full, as the reader will: a header can be whole while the pixel data
    are truncated or damaged, and the values of a 16-bit image decide how it is read.
    """
    path = Path(path)
    try:
        pixels = _decode_image(path)
        found = tuple(pixels.shape)
        if len(found) == 3 and found[0] in (3, 4) and found[2] not in (3, 4):
            found = (*found[1:], found[0])  # planar (C, H, W), as _as_rgb reads it
        if len(found) != 3 or found[2] not in (3, 4):
            what = "grey (1 channel)" if len(found) == 2 else f"{found[2]} channels" if len(found) == 3 else f"shape {found}"
            return f"{what}, expected RGB (3 channels) or RGBA"
        as_rgb(pixels, os.fspath(path), note_key=path.parent)
    except DatasetError as exc:
        return str(exc).removeprefix(f"{exc.path}: ")
    if tuple(found[:2]) != tuple(shape):
        return f"{found[0]}x{found[1]} px, expected {shape[0]}x{shape[1]} px (the size of its label maps)"
    return None


def _file_check(names: Sequence[str], files: dict[str, Path] | Callable[[str], Path | None] | None) -> Callable:
    """An ``image_check`` (see :meth:`Dataset.check_image`) for layouts with one image file per tile."""

    def check(i: int, shape: tuple[int, int]) -> tuple[str, str | None] | None:
        path = None if files is None else files(names[i]) if callable(files) else files.get(names[i])
        return None if path is None else (os.fspath(path), image_problem(path, shape))

    return check


def _stack_check(images: np.ndarray | None, path: Path | None) -> Callable:
    """An ``image_check`` for an ``images.npy`` stack: each image is read as the tile loader reads it."""

    def check(i: int, shape: tuple[int, int]) -> tuple[str, str | None] | None:
        if images is None:
            return None
        where = f"{path}[{i}]"
        try:
            image = _stack_image(images, i, path)
        except DatasetError as exc:
            return where, str(exc).removeprefix(f"{exc.path}: ")
        if image.shape[:2] != tuple(shape):
            return where, f"{image.shape[0]}x{image.shape[1]} px, expected {shape[0]}x{shape[1]} px (the size of its label maps)"
        return where, None

    return check


def _read_label_file(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")
    except Exception as exc:  # see read_image
        raise DatasetError(f"cannot read label map: {exc}", path) from None


def _check_pair_shapes(image: np.ndarray | None, image_path: Path | None, inst_map: np.ndarray, label_path: Path) -> None:
    if image is not None and image.shape[:2] != inst_map.shape[:2]:
        raise DatasetError(
            f"image {image_path.name} is {image.shape[:2]} but its labels {label_path.name} are {inst_map.shape[:2]}",
            label_path,
        )


# -- CoNSeP / GLySAC -----------------------------------------------------------------------------
def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except NotImplementedError:
        raise DatasetError("MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7", path) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for damaged files
        raise DatasetError(f"cannot read .mat file: {exc}", path) from None


def _id_column(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    """A per-nucleus ``.mat`` entry, (N, 1) or (N,) as MATLAB saves it, as int64 (N,)."""
    a = np.asarray(mat[key])
    if a.ndim > 2 or (a.ndim == 2 and 1 not in a.shape and a.size):
        raise DatasetError(f"{key} must be an (N, 1) column, one value per nucleus, got shape {a.shape}", path)
    a = a.reshape(-1)
    if a.size and (not np.issubdtype(a.dtype, np.number) or not np.all(np.mod(a, 1) == 0)):
        raise DatasetError(f"{key} holds non-integer values", path)
    return a.astype(np.int64)


def _present_ids(inst_map: np.ndarray) -> np.ndarray:
    ids = np.unique(inst_map)
    return ids[ids > 0]


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
    present = _present_ids(inst_map)
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
    from .nuclei import nuclei_props

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
    mat = _loadmat(mat_path)
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
        present = _present_ids(inst_map)
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
        present = _present_ids(inst_map)
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
        _check_pair_shapes(image, image_path, inst_map, mat_path)
    return Tile(name or mat_path.stem, image, inst_map, type_map, source=os.fspath(mat_path))


def read_consep(root: str | os.PathLike, scheme: Any) -> Dataset:
    """A CoNSeP/GLySAC folder (``Images`` + ``Labels``), tiles paired by stem and read lazily."""
    root = Path(root)
    scheme = load_scheme(scheme)
    img_dir, lab_dir = _child_dir(root, "Images"), _child_dir(root, "Labels")
    if img_dir is None or lab_dir is None:
        raise DatasetError("a CoNSeP/GLySAC folder needs 'Images' and 'Labels' sub-folders", root)
    images = _files_by_stem(img_dir, IMAGE_SUFFIXES)
    labels = _files_by_stem(lab_dir, (".mat",))
    if not images and not labels:
        raise DatasetError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {img_dir.name} and no .mat labels in {lab_dir.name}", root)
    names = _pair({img_dir.name: images, lab_dir.name: labels}, root)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        return read_consep_tile(images[name] if with_image else None, labels[name], scheme, name)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="consep", image_check=_file_check(names, images)
    )


# -- generic folders -----------------------------------------------------------------------------
def _generic_tile(
    name: str, image: np.ndarray | None, image_path: Path | None, inst_map: Any, type_map: Any, label_path: Path,
    scheme: ClassScheme,
) -> Tile:
    """A tile of merged-class label maps: classes must be the scheme's and one per nucleus (LabelError otherwise)."""
    where = os.fspath(label_path)
    inst_map = as_labels(inst_map, "inst_map", np.int32, where)
    _check_pair_shapes(image, image_path or label_path, inst_map, label_path)
    type_map = as_labels(type_map, "type_map", np.uint8, where)
    scheme.check_classes(type_map, source=where)
    check_consistency(inst_map, type_map, source=where)
    return Tile(name, image, inst_map, type_map, source=where)


def read_generic(root: str | os.PathLike, scheme: Any) -> Dataset:
    """A generic folder (see the module docstring), tiles paired by stem and read lazily."""
    root = Path(root)
    scheme = load_scheme(scheme)
    img_dir = _child_dir(root, "images")
    images = _files_by_stem(img_dir, IMAGE_SUFFIXES) if img_dir else None
    inst_dir, type_dir = _child_dir(root, "inst_maps"), _child_dir(root, "type_maps")
    npz_dir = _child_dir(root, "labels")
    groups: dict[str, dict[str, Path]] = {}
    if inst_dir or type_dir:
        if not (inst_dir and type_dir):
            raise DatasetError("a generic folder needs both 'inst_maps' and 'type_maps' sub-folders", root)
        groups = {inst_dir.name: _files_by_stem(inst_dir, LABEL_SUFFIXES), type_dir.name: _files_by_stem(type_dir, LABEL_SUFFIXES)}
    elif npz_dir:
        groups = {npz_dir.name: _files_by_stem(npz_dir, (".npz",))}
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
    names = _pair(groups, root)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        image_path = images[name] if images is not None and with_image else None
        image = None if image_path is None else read_image(image_path)
        if inst_dir:
            ip, tp = groups[inst_dir.name][name], groups[type_dir.name][name]
            return _generic_tile(name, image, image_path, _read_label_file(ip), _read_label_file(tp), ip, scheme)
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
        return _generic_tile(name, image, image_path, inst_map, type_map, path, scheme)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="generic", image_check=_file_check(names, images)
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

    from .atomic import atomic_dir
    from .outputs import check_replace, write_marker

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


# -- PanNuke-style stacks ------------------------------------------------------------------------
def _find_one(root: Path, filename: str, depth: int = 3) -> Path | None:
    hits = [p for p in root.glob(filename)]
    for level in range(1, depth + 1):
        if hits:
            break
        hits = [p for p in root.glob("/".join(["*"] * level) + "/" + filename) if p.is_file()]
    if len(hits) > 1:
        raise DatasetError(f"several {filename} files found ({sorted(map(str, hits))[:4]}); point at one fold", root)
    return hits[0] if hits else None


def _mmap(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # see read_image
        raise DatasetError(f"cannot read array: {exc}", path) from None


def _stack_image(images: np.ndarray, i: int, path: Path) -> np.ndarray:
    """Image ``i`` of an ``images.npy`` stack as (H, W, 3) uint8; PanNuke stores 0..255 as float64."""
    image = np.asarray(images[i])
    where = f"{path}[{i}]"
    if np.issubdtype(image.dtype, np.floating):
        nan = np.isnan(image)
        odd = nan if nan.any() else np.isinf(image)
        if odd.any():
            # NaN would become 0 with only a numpy warning: a black pixel in the training data.
            y, x = np.argwhere(odd)[0][:2]
            raise DatasetError(
                f"image {i} has {int(odd.sum())} {'NaN' if nan.any() else 'infinite'} pixel value(s) "
                f"(first at row {y}, column {x}); expected 0..255", path,
            )
        if image.size and (image.min() < 0 or image.max() > 255):
            raise DatasetError(f"image {i} has values outside 0..255", path)
        image = np.rint(image).astype(np.uint8)
    return as_rgb(image, where, note_key=path)


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
    inst_path, type_path = _find_one(root, "inst_maps.npy", 0), _find_one(root, "type_maps.npy", 0)
    if inst_path or type_path:
        if not (inst_path and type_path):
            raise DatasetError("stacked label maps need both inst_maps.npy and type_maps.npy", root)
        images_path = _find_one(root, "images.npy", 0)
        masks_path = None
        inst_maps, type_maps = _mmap(inst_path), _mmap(type_path)
        if inst_maps.ndim != 3 or type_maps.shape != inst_maps.shape:
            raise DatasetError(
                f"inst_maps.npy {inst_maps.shape} and type_maps.npy {type_maps.shape} must both be (N, H, W)", root
            )
        label_shape, label_file = inst_maps.shape, inst_path
    else:
        images_path, masks_path = _find_one(root, "images.npy"), _find_one(root, "masks.npy")
        if not (images_path and masks_path):
            raise DatasetError("a PanNuke-style folder needs images.npy and masks.npy (or inst_maps.npy and type_maps.npy)", root)
        masks = _mmap(masks_path)
        if masks.ndim != 4 or masks.shape[3] < 2:
            raise DatasetError(f"masks must be (N, H, W, C + 1) with a background channel last, got {masks.shape}", masks_path)
        label_shape, label_file = masks.shape[:3], masks_path
    images = None
    if images_path is not None:
        images = _mmap(images_path)
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
            image = _stack_image(images, i, images_path)
        if masks_path is None:
            return _generic_tile(names[i], image, images_path, inst_maps[i], type_maps[i], Path(where), scheme)
        m = np.asarray(masks[i])
        if np.issubdtype(m.dtype, np.floating) and not np.all(np.mod(m, 1) == 0):
            raise DatasetError(f"masks of tile {i} hold non-integer instance ids", masks_path)
        inst_map, raw = _masks_to_labels(m.astype(np.int64))
        inst_types = scheme.merge_raw(raw, source=where).astype(np.int32)
        return Tile(names[i], image, inst_map, type_map_from(inst_map, inst_types), source=where)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="pannuke",
        image_check=_stack_check(images, images_path),
    )


# -- HoVer-Net run_infer output -------------------------------------------------------------------
def image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from an image file's header (no pixels decoded), None if it cannot be read."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                return (shape[1], shape[2]) if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4) else shape[:2]
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # unreadable: the caller says what it needed
        return None


def read_hovernet_json_labels(json_path: str | os.PathLike, shape: Sequence[int], scheme: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map, type_map)`` of shape ``shape`` from a HoVer-Net ``run_infer`` ``json/<stem>.json``.

    The file holds ``{"mag": ..., "nuc": {"<id>": {"bbox": [[rmin, cmin], [rmax, cmax]],
    "centroid": [x, y], "contour": [[x, y], ...], "type": k, "type_prob": p}}}``; each contour
    (pixel indices of the outline, x first) is filled with its nucleus id, outline included.
    ``type`` is the model's class (used as it is; 0 or null = unclassed).
    """
    from .geojson import fill_polygon

    json_path = Path(json_path)
    scheme = load_scheme(scheme)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read HoVer-Net JSON: {exc}", json_path) from None
    if not isinstance(data, dict) or not isinstance(data.get("nuc"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"missing key 'nuc' (HoVer-Net lists its nuclei there; found {found})", json_path)
    inst_map = np.zeros(tuple(shape), np.int32)
    types = {}
    for key, nuc in data["nuc"].items():
        try:
            nid = int(key)
        except ValueError:
            raise DatasetError(f"nucleus key {key!r} is not an integer id", json_path) from None
        if not isinstance(nuc, dict) or "contour" not in nuc:
            raise DatasetError(f"nucleus {key}: missing key 'contour' (its outline as [x, y] points)", json_path)
        contour = np.asarray(nuc["contour"], dtype=np.float64)
        if contour.ndim != 2 or contour.shape[1] != 2 or contour.shape[0] < 1:
            raise DatasetError(f"nucleus {key}: contour must be a list of [x, y] points, got shape {contour.shape}", json_path)
        k = nuc.get("type")
        k = 0 if k is None else int(k)
        if not 0 <= k <= scheme.num_classes:
            raise SchemeError(
                f"{json_path}: nucleus {key} has type {k}, outside 0..{scheme.num_classes} of scheme {scheme.name!r}; "
                "pass the scheme the model was trained with"
            )
        rr, cc = fill_polygon(contour, inst_map.shape, convention="index")
        inst_map[rr, cc] = nid
        types[nid] = k
    lut = np.zeros(max(types, default=0) + 1, np.uint8)
    for nid, k in types.items():
        lut[nid] = k
    return inst_map, lut[inst_map]


def _hovernet_sources(root: Path) -> tuple[dict[str, Path], str]:
    """(stem -> file, "mat" | "json") of a run_infer output folder or its mat/ or json/ folder."""
    for sub, suffix in (("mat", ".mat"), ("json", ".json")):
        folder = root / sub if (root / sub).is_dir() else root if root.name.lower() == sub else None
        if folder is None:
            continue
        files = _files_by_stem(folder, (suffix,))
        if files:
            return files, sub
    for suffix, kind in ((".mat", "mat"), (".json", "json")):  # a folder of either, under another name
        files = _files_by_stem(root, (suffix,))
        if files:
            return files, kind
    raise DatasetError("a HoVer-Net output folder needs mat/*.mat or json/*.json (run_infer's output), or .mat or .json files", root)


def read_hovernet(root: str | os.PathLike, scheme: Any) -> Dataset:
    """Predictions without images: HoVer-Net ``run_infer`` output (the output folder, its ``mat/``
    or its ``json/``) or any folder of ``.mat`` label files. Classes are the model's, used as they
    are (``scheme`` must be the one the model was trained with). ``.json`` files carry no image
    size: it comes from ``mat/<stem>.mat``, ``overlay/<stem>.png`` or the tile's image beside them."""
    root = Path(root)
    scheme = load_scheme(scheme)
    files, kind = _hovernet_sources(root)
    names = sorted(files, key=_natural_key)
    base = root.parent if root.name.lower() in ("mat", "json") else root

    def load(i: int) -> Tile:
        name = names[i]
        path = files[name]
        if kind == "mat":
            inst_map, type_map = read_consep_labels(path, scheme) if _lists_ids(path) else _mat_as_classes(path, scheme)
            return Tile(name, None, inst_map, type_map, source=os.fspath(path))
        size = None
        images = [folder / f"{name}{s}" for folder in (base / "overlay", path.parent, base) for s in IMAGE_SUFFIXES]
        for candidate in [base / "mat" / f"{name}.mat", *images]:
            if candidate.suffix == ".mat" and candidate.is_file() and "inst_map" in mat_keys(candidate):
                size = as_labels(_loadmat(candidate)["inst_map"], "inst_map", np.int32, os.fspath(candidate)).shape
            elif candidate.suffix != ".mat":
                size = image_size(candidate)
            if size is not None:
                break
        if size is None:
            raise DatasetError(
                f"HoVer-Net .json files carry no image size; expected {base / 'mat' / (name + '.mat')}, "
                f"{base / 'overlay' / (name + '.png')} or the tile's image {name}.png beside it", path,
            )
        inst_map, type_map = read_hovernet_json_labels(path, size[:2], scheme)
        return Tile(name, None, inst_map, type_map, source=os.fspath(path))

    def beside(name: str) -> Path | None:
        # run_infer keeps no copy of its input tiles; they count where they sit beside its output.
        folders = [files[name].parent, base, base / "images", base / "Images", base / "imgs"]
        return next((f / (name + s) for f in folders for s in IMAGE_SUFFIXES if (f / (name + s)).is_file()), None)

    return Dataset.lazy(names, load, scheme, root=root, layout="hovernet", image_check=_file_check(names, beside))


def mat_keys(path: str | os.PathLike) -> list[str]:
    """The variable names of a ``.mat`` file, read from its header (empty if it cannot be read)."""
    from scipy.io import whosmat

    try:
        return [name for name, _, _ in whosmat(path)]
    except Exception:  # v7.3 or damaged: reading it reports why
        return []


def _lists_ids(path: Path) -> bool:
    keys = mat_keys(path)
    return "inst_uid" in keys or "id" in keys


def _mat_as_classes(path: Path, scheme: ClassScheme) -> tuple[np.ndarray, np.ndarray]:
    """A prediction ``.mat`` in CoNSeP's keys whose types are already the scheme's classes (no merge)."""
    identity = ClassScheme(scheme.name, scheme.names, scheme.colors)  # raw id k -> class k
    return read_consep_labels(path, identity)


# -- Lizard and CoNIC ----------------------------------------------------------------------------
def _check_lizard_scheme(scheme: ClassScheme, root: Path, what: str) -> None:
    from .classes import BUILTIN_SCHEMES, LIZARD

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
        labels.update(_files_by_stem(d, (".mat",)))
    image_dirs = [p for p in [root, *root.glob("*"), *root.glob("*/*")] if p.is_dir() and "image" in p.name.lower()]
    images: dict[str, Path] = {}
    for d in image_dirs:
        for stem, path in _files_by_stem(d, IMAGE_SUFFIXES).items():
            if stem in images:
                raise DatasetError(f"image {stem!r} is in two folders: {images[stem].parent} and {path.parent}", root)
            images[stem] = path
    names = _pair({"labels": labels, "images": images}, root) if images else sorted(labels, key=_natural_key)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        return read_consep_tile(images[name] if with_image and images else None, labels[name], scheme, name)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="lizard", image_check=_file_check(names, images)
    )


def read_conic(root: str | os.PathLike, scheme: Any) -> Dataset:
    """CoNIC patches: ``images.npy`` (N, 256, 256, 3) uint8 and ``labels.npy`` (N, 256, 256, 2)
    (channel 0 instance ids, channel 1 Lizard class 0..6 per pixel), memory-mapped. A nucleus's
    class is the majority of its pixels. ``counts.csv`` is not needed (it counts only the central
    224 px). Tiles are named ``00000``, ``00001``, ... in row order."""
    root = Path(root)
    scheme = load_scheme(scheme)
    _check_lizard_scheme(scheme, root, "CoNIC")
    labels_path = _find_one(root, "labels.npy", 1)
    if labels_path is None:
        raise DatasetError("a CoNIC folder needs labels.npy (N, H, W, 2) beside images.npy", root)
    labels = _mmap(labels_path)
    if labels.ndim != 4 or labels.shape[3] != 2:
        raise DatasetError(f"labels.npy must be (N, H, W, 2): instance ids then classes, got {labels.shape}", labels_path)
    images_path = labels_path.parent / "images.npy"
    images = _mmap(images_path) if images_path.is_file() else None
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
        present = _present_ids(inst_map)
        unclassed = present[inst_types[present] == 0]
        if unclassed.size:
            raise DatasetError(f"{unclassed.size} nuclei have class 0 in the class channel (ids {unclassed[:10].tolist()})", where)
        image = None
        if images is not None and with_image:
            image = _stack_image(images, i, images_path)
        return Tile(names[i], image, inst_map, type_map_from(inst_map, inst_types), source=where)

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="conic",
        image_check=_stack_check(images, images_path),
    )


# -- QuPath GeoJSON ------------------------------------------------------------------------------
def read_geojson_folder(root: str | os.PathLike, scheme: Any) -> Dataset:
    """QuPath GeoJSON (see :mod:`napari_diffmix.geojson`): ``<stem>.geojson`` with its image
    ``<stem>.png|.tif`` beside it or in ``images/`` (the image gives the size); classes by name."""
    from .geojson import SUFFIXES, labels_from_features, read_geojson

    root = Path(root)
    scheme = load_scheme(scheme)
    shapes = _files_by_stem(root, SUFFIXES)
    if not shapes:
        raise DatasetError("a GeoJSON folder needs <stem>.geojson files", root)
    images = _files_by_stem(root, IMAGE_SUFFIXES)
    img_dir = _child_dir(root, "images")
    if img_dir is not None:
        for stem, path in _files_by_stem(img_dir, IMAGE_SUFFIXES).items():
            images.setdefault(stem, path)
    missing = sorted(set(shapes) - set(images), key=_natural_key)
    if missing:
        raise DatasetError(
            f"GeoJSON carries no image size: no image beside {len(missing)} file(s) {missing[:10]} "
            f"(expected <stem>.png or .tif next to <stem>.geojson, or in images/)", root,
        )
    names = sorted(shapes, key=_natural_key)

    def load(i: int, with_image: bool = True) -> Tile:
        name = names[i]
        image = read_image(images[name]) if with_image else None
        size = image.shape[:2] if image is not None else image_size(images[name])
        if size is None:
            raise DatasetError("cannot read the image size", images[name])
        inst_map, type_map = labels_from_features(read_geojson(shapes[name]), size, scheme, source=shapes[name])
        return Tile(name, image, inst_map, type_map, source=os.fspath(shapes[name]))

    return Dataset.lazy(
        names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="geojson", image_check=_file_check(names, images)
    )


# -- opening -------------------------------------------------------------------------------------
def _first_mat(folder: Path) -> Path | None:
    mats = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".mat" and not p.name.startswith("."))
    return mats[0] if mats else None


def _is_lizard_mat(path: Path | None) -> bool:
    keys = mat_keys(path) if path is not None else []
    return "id" in keys and "class" in keys


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of a dataset folder (one of :data:`LAYOUTS`), else a DatasetError saying what was found."""
    root = Path(root)
    if not root.exists():
        raise DatasetError("dataset folder does not exist", root)
    if not root.is_dir():
        raise DatasetError("expected a dataset folder, got a file", root)
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DatasetError("dataset folder is empty", root)
    labels = _child_dir(root, "labels")
    if _child_dir(root, "images") and labels and any(p.suffix.lower() == ".mat" for p in labels.iterdir()):
        return "lizard" if _is_lizard_mat(_first_mat(labels)) else "consep"
    if _child_dir(root, "inst_maps") or _child_dir(root, "type_maps"):
        return "generic"
    if labels and any(p.suffix.lower() == ".npz" for p in labels.iterdir()):
        return "generic"
    if (root / "inst_maps.npy").is_file() or (root / "type_maps.npy").is_file() or _find_one(root, "masks.npy"):
        return "pannuke"
    if root.name.lower() == "labels" and _child_dir(root.parent, "images") and _first_mat(root) is not None:
        # Ground truth, not a folder of predictions: its raw types need the CoNSeP/GLySAC merge.
        raise DatasetError(f"point at the folder that holds Images and Labels: {root.parent}", root)
    if _find_one(root, "labels.npy", 1):
        return "conic"
    if any(p.suffix.lower() in (".geojson",) for p in entries):
        return "geojson"
    for sub, suffix in (("mat", ".mat"), ("json", ".json")):
        folder = root / sub
        if folder.is_dir() and any(p.suffix.lower() == suffix for p in folder.iterdir()):
            return "hovernet"  # run_infer's output folder
    if root.name.lower() == "json" and any(p.suffix.lower() == ".json" for p in entries):
        return "hovernet"
    mat = _first_mat(root)
    if mat is not None:
        return "lizard" if _is_lizard_mat(mat) else "hovernet"
    nested = [d for d in entries if d.is_dir() and "label" in d.name.lower()]
    for d in nested:
        inner = [d, *(p for p in d.iterdir() if p.is_dir())]
        if any(_is_lizard_mat(_first_mat(x)) for x in inner):
            return "lizard"  # Lizard_Labels/Labels/*.mat beside Lizard_Images1/
    if _child_dir(root, "images") and labels:
        raise DatasetError(f"'{labels.name}' holds neither .mat (CoNSeP/GLySAC) nor .npz label files", root)
    splits = sorted(p.name for p in entries if p.is_dir() and p.name.lower() in ("train", "test", "valid", "val"))
    if splits:
        raise DatasetError(f"this folder holds the splits {splits}; point at one of them, e.g. {root / splits[0]}", root)
    raise DatasetError(
        "cannot tell the dataset layout: expected Images/ + Labels/*.mat (CoNSeP/GLySAC), inst_maps/ + type_maps/ "
        "(generic), images.npy + masks.npy (PanNuke), images.npy + labels.npy (CoNIC), Lizard_Labels/Labels/*.mat "
        "(Lizard), mat/ or json/ (HoVer-Net output) or *.geojson (QuPath); "
        f"found {sorted(p.name for p in entries)[:10]}",
        root,
    )


def open_dataset(path: str | os.PathLike, scheme: Any = None, layout: str = "auto") -> Dataset:
    """Open a dataset folder (any layout in the module docstring) or ``"demo"``.

    ``scheme``: a built-in name (``consep``, ``glysac``, ``demo``), a scheme file, a dict or
    a :class:`ClassScheme`; None uses the folder's ``scheme.json``. A given scheme must match
    a ``scheme.json`` present in the folder.
    """
    if os.fspath(path) == "demo" and not Path("demo").exists():
        from .demo_data import demo_dataset

        ds = demo_dataset()
        if scheme is not None and load_scheme(scheme).names != ds.scheme.names:
            raise SchemeError(f"the demo dataset uses the {ds.scheme.name!r} scheme {list(ds.scheme.names)}, not {load_scheme(scheme).name!r}")
        return ds
    root = Path(path)
    if layout not in ("auto", *LAYOUTS):
        raise DatasetError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    elif not root.is_dir():
        raise DatasetError("dataset folder does not exist" if not root.exists() else "expected a dataset folder, got a file", root)
    saved = root / "scheme.json"
    if scheme is None and layout in ("lizard", "conic") and not saved.is_file():
        from .classes import LIZARD

        scheme = LIZARD  # both releases carry Lizard's six classes
    if scheme is None:
        if not saved.is_file():
            raise SchemeError(f"{root}: no class scheme given and no scheme.json in the folder; pass --scheme consep, glysac, lizard, demo or a scheme file")
        scheme = load_scheme(saved)
    else:
        scheme = load_scheme(scheme)
        if saved.is_file():
            stored = load_scheme(saved)
            if stored.names != scheme.names:
                raise SchemeError(
                    f"{saved}: the folder's labels use classes {list(stored.names)} but scheme {scheme.name!r} has "
                    f"{list(scheme.names)}; omit --scheme to use the folder's own"
                )
    reader = {
        "consep": read_consep, "generic": read_generic, "pannuke": read_pannuke, "hovernet": read_hovernet,
        "lizard": read_lizard, "conic": read_conic, "geojson": read_geojson_folder,
    }[layout]
    return reader(root, scheme)


# -- patches -------------------------------------------------------------------------------------
def patch_grid(height: int, width: int, size: int = 256, stride: int = 76, *, cover: bool = False) -> list[tuple[int, int]]:
    """Patch origins (y, x), row-major: every multiple of ``stride`` where a ``size`` patch fits.

    On a 1000x1000 tile the defaults give DiffMix's 10x10 grid 0, 76, ..., 684 (the last 60 px
    rows/columns are not covered, as published). ``cover=True`` adds a final origin at
    ``height - size`` / ``width - size`` when needed so every pixel lies in some patch.
    """
    height, width, size, stride = int(height), int(width), int(size), int(stride)
    if size <= 0 or stride <= 0:
        raise DatasetError(f"patch size and stride must be positive, got size={size}, stride={stride}")
    if size > height or size > width:
        raise DatasetError(f"patch size {size} is larger than the {height}x{width} tile")

    def origins(n: int) -> list[int]:
        o = list(range(0, n - size + 1, stride))
        if cover and o[-1] != n - size:
            o.append(n - size)
        return o

    return [(y, x) for y in origins(height) for x in origins(width)]


# -- statistics ----------------------------------------------------------------------------------
def class_counts(inst_map: np.ndarray, inst_types: Any, num_classes: int) -> np.ndarray:
    """Nuclei per class, shape (C + 1,), index 0 unused (0). Counts only ids present in the map."""
    inst_map = np.asarray(inst_map)
    types = np.asarray(inst_types)
    present = np.bincount(inst_map.reshape(-1), minlength=1) > 0
    present[0] = False
    ids = np.flatnonzero(present)
    if ids.size and ids[-1] >= types.size:
        raise LabelError(f"inst_map has nucleus id {ids[-1]} but inst_types only covers ids 0..{types.size - 1}")
    classes = types[ids]
    if classes.size and (classes.min() < 0 or classes.max() > num_classes):
        raise LabelError(f"nucleus classes {sorted(set(classes.tolist()) - set(range(num_classes + 1)))} are outside 0..{num_classes}")
    counts = np.bincount(classes, minlength=num_classes + 1).astype(np.int64)
    counts[0] = 0
    return counts


@dataclass(frozen=True)
class TileStats:
    """Counts for one tile (or a total): ``nuclei[k]`` nuclei and ``pixels[k]`` pixels of class k (0 = background)."""

    name: str
    nuclei: np.ndarray
    pixels: np.ndarray

    @property
    def total_nuclei(self) -> int:
        return int(self.nuclei[1:].sum())

    @property
    def nucleus_pixels(self) -> int:
        return int(self.pixels[1:].sum())

    @property
    def total_pixels(self) -> int:
        return int(self.pixels.sum())

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        n, p = self.total_nuclei, self.nucleus_pixels
        return {
            "name": self.name,
            "nuclei": n,
            "nucleus_pixels": p,
            "image_pixels": self.total_pixels,
            "classes": {
                name: {
                    "nuclei": int(self.nuclei[k]),
                    "nuclei_pct": _pct(self.nuclei[k], n),
                    "pixels": int(self.pixels[k]),
                    "pixels_pct": _pct(self.pixels[k], p),
                }
                for k, name in enumerate(names, start=1)
            },
        }


def _pct(part: Any, whole: Any) -> float:
    return round(100.0 * float(part) / float(whole), 2) if whole else 0.0


@dataclass(frozen=True)
class DatasetStats:
    """Per-tile and total nuclei / pixel counts per class. Pixel shares are of nucleus pixels."""

    scheme: ClassScheme
    per_tile: list[TileStats]
    total: TileStats

    def table(self) -> str:
        """Aligned text table: one row per class plus the total."""
        t = self.total
        names = list(self.scheme.names)
        width = max(len(n) for n in names + ["class", "total"])
        lines = [f"{'class':<{width}}  {'nuclei':>8}  {'% nuclei':>8}  {'pixels %':>8}"]
        for k, name in enumerate(names, start=1):
            lines.append(
                f"{name:<{width}}  {int(t.nuclei[k]):>8}  {_pct(t.nuclei[k], t.total_nuclei):>7.1f}%  "
                f"{_pct(t.pixels[k], t.nucleus_pixels):>7.1f}%"
            )
        full = 100.0 if t.total_nuclei else 0.0
        lines.append(f"{'total':<{width}}  {t.total_nuclei:>8}  {full:>7.1f}%  {100.0 if t.nucleus_pixels else 0.0:>7.1f}%")
        lines.append(
            f"{len(self.per_tile)} tile(s); nuclei cover {_pct(t.nucleus_pixels, t.total_pixels):.1f}% "
            f"of {t.total_pixels} image pixels"
        )
        return "\n".join(lines)

    def tile_table(self) -> str:
        """Aligned text table of nuclei per class, one row per tile."""
        names = list(self.scheme.names)
        width = max([len(s.name) for s in self.per_tile] + [len("tile"), len("total")])
        cols = [max(len(n), 7) for n in names]
        head = f"{'tile':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols)) + f"  {'nuclei':>7}"
        rows = [head]
        for s in [*self.per_tile, self.total]:
            rows.append(
                f"{s.name:<{width}}  " + "  ".join(f"{int(s.nuclei[k]):>{c}}" for k, c in enumerate(cols, start=1))
                + f"  {s.total_nuclei:>7}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        names = list(self.scheme.names)
        return {
            "scheme": self.scheme.name,
            "classes": names,
            "tiles": len(self.per_tile),
            "total": self.total.to_dict(names),
            "per_tile": [s.to_dict(names) for s in self.per_tile],
        }


def tile_stats(tile: Tile, scheme: ClassScheme) -> TileStats:
    c = scheme.num_classes
    scheme.check_classes(tile.type_map, source=tile.source or tile.name)
    pixels = np.bincount(tile.type_map.reshape(-1), minlength=c + 1).astype(np.int64)
    return TileStats(tile.name, class_counts(tile.inst_map, tile.inst_types, c), pixels)


def dataset_stats(dataset: Sequence[Tile], *, scheme: Any = None, pbar: Any | None = None) -> DatasetStats:
    """Nuclei count and pixel share per class, per tile and in total."""
    scheme = load_scheme(scheme if scheme is not None else getattr(dataset, "scheme", None) or _no_scheme())
    per_tile = []
    with progress_bar(pbar, len(dataset), "stats", unit="tile") as bar:
        for i in range(len(dataset)):
            per_tile.append(tile_stats(tile_labels(dataset, i), scheme))
            bar.update(1)
    c = scheme.num_classes
    nuclei = np.sum([s.nuclei for s in per_tile], axis=0) if per_tile else np.zeros(c + 1, np.int64)
    pixels = np.sum([s.pixels for s in per_tile], axis=0) if per_tile else np.zeros(c + 1, np.int64)
    return DatasetStats(scheme, per_tile, TileStats("total", nuclei, pixels))


def _no_scheme() -> Any:
    raise SchemeError("these tiles carry no class scheme; pass scheme=")
