"""Dataset readers and writers, patch grids and per-class statistics.

Three on-disk layouts are read (``open_dataset`` detects which):

``consep`` — CoNSeP / GLySAC releases (point at the folder holding ``Images`` and ``Labels``,
e.g. ``CoNSeP/Train``)::

    Images/<stem>.png|.tif|.tiff      H&E tile, RGB (an alpha channel is dropped)
    Labels/<stem>.mat                 inst_map (H, W), type_map (H, W) raw ids,
                                      inst_type (N, 1) raw id of nucleus 1..N, inst_centroid (x, y)

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

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

import numpy as np

from .classes import ClassScheme, load_scheme
from .errors import DatasetError, LabelError, SchemeError
from .nuclei import check_consistency, inst_types_from_maps, remap_ids, type_map_from
from .progress import progress_bar

LAYOUTS = ("consep", "generic", "pannuke")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
# CoNSeP's type_map and inst_type agree pixel for pixel; allow a sliver of disagreement
# (annotation tools rasterise borders differently) but not a mislabelled file.
TYPE_MAP_TOLERANCE = 0.01


# -- tiles ---------------------------------------------------------------------------------------
def _as_rgb(image: Any, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # planar (C, H, W) TIFF
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DatasetError(f"image is not RGB: shape {image.shape}, expected (H, W, 3)", where)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.size and (image.min() < 0 or image.max() > 255):
            raise DatasetError(f"image must be 8-bit RGB (uint8), got {image.dtype}", where)
        image = image.astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def _as_labels(a: Any, name: str, dtype: type, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise DatasetError(f"{name} must be 2-D (H, W), got shape {a.shape}", where)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DatasetError(f"{name} must hold integer ids, got dtype {a.dtype}", where)
    if np.issubdtype(a.dtype, np.floating) and a.size and not np.all(np.mod(a, 1) == 0):
        raise DatasetError(f"{name} holds non-integer values", where)
    if a.size:
        lo, hi = a.min(), a.max()
        top = np.iinfo(dtype).max
        if lo < 0 or hi > top:
            raise DatasetError(f"{name} values must lie in 0..{top}, got {lo}..{hi}", where)
    return np.ascontiguousarray(a, dtype=dtype)


@dataclass(eq=False)  # arrays have no single truth value; tiles compare by identity
class Tile:
    """One labelled tile: RGB image (or None for a label-only map) with its label maps.

    Construction validates and normalises: RGBA images lose alpha, label maps become int32 /
    uint8, and all shapes must agree (else :class:`DatasetError` naming ``source``).
    """

    name: str
    image: np.ndarray | None
    inst_map: np.ndarray
    type_map: np.ndarray
    source: str | None = None

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.image is not None:
            self.image = _as_rgb(self.image, where)
        self.inst_map = _as_labels(self.inst_map, "inst_map", np.int32, where)
        self.type_map = _as_labels(self.type_map, "type_map", np.uint8, where)
        if self.type_map.shape != self.inst_map.shape:
            raise DatasetError(f"inst_map {self.inst_map.shape} and type_map {self.type_map.shape} differ in shape", where)
        if self.image is not None and self.image.shape[:2] != self.inst_map.shape:
            raise DatasetError(
                f"image {self.image.shape[:2]} and label maps {self.inst_map.shape} differ in shape", where
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.inst_map.shape  # type: ignore[return-value]

    @property
    def inst_types(self) -> np.ndarray:
        """Class per instance id (majority of ``type_map`` within each nucleus)."""
        return inst_types_from_maps(self.inst_map, self.type_map)

    def crop(self, y: int, x: int, h: int, w: int) -> "Tile":
        """A copy of the window ``[y:y+h, x:x+w]`` (instance ids kept), named ``<name>_y<y>_x<x>``."""
        H, W = self.shape
        if not (0 <= y and 0 <= x and h > 0 and w > 0 and y + h <= H and x + w <= W):
            raise DatasetError(f"crop y={y} x={x} h={h} w={w} does not fit inside the {H}x{W} tile", self.source or self.name)
        win = (slice(y, y + h), slice(x, x + w))
        return Tile(
            f"{self.name}_y{y}_x{x}",
            None if self.image is None else self.image[win].copy(),
            self.inst_map[win].copy(),
            self.type_map[win].copy(),
            self.source,
        )


class Dataset(Sequence[Tile]):
    """Named tiles sharing one class scheme. ``dataset[i]`` loads tile ``i`` (lazily for files);
    :meth:`labels` loads only its label maps (no image is decoded).

    ``Dataset(tiles, scheme)`` wraps tiles in memory; readers use :meth:`lazy`.
    """

    def __init__(self, tiles: Iterable[Tile], scheme: Any, *, root: str | os.PathLike | None = None, layout: str = "memory"):
        tiles = list(tiles)
        self.scheme: ClassScheme = load_scheme(scheme)
        for t in tiles:
            if not isinstance(t, Tile):
                raise DatasetError(f"Dataset holds Tile objects, got {type(t).__name__}")
            self.scheme.check_classes(t.type_map, source=t.source or t.name)
        self._init(list(t.name for t in tiles), tiles.__getitem__, lambda i: _without_image(tiles[i]), root, layout)

    @classmethod
    def lazy(
        cls,
        names: Sequence[str],
        loader: Callable[[int], Tile],
        scheme: Any,
        *,
        labels_loader: Callable[[int], Tile] | None = None,
        root: str | os.PathLike | None = None,
        layout: str,
    ) -> "Dataset":
        """A dataset whose tile ``i`` is read by ``loader(i)`` on access.

        ``labels_loader(i)``: tile ``i`` without its image (``image`` None), read without
        decoding the image; default ``loader(i)`` with the image dropped.
        """
        ds = cls.__new__(cls)
        ds.scheme = load_scheme(scheme)
        ds._init(list(names), loader, labels_loader or (lambda i: _without_image(loader(i))), root, layout)
        return ds

    def _init(
        self, names: list[str], loader: Callable[[int], Tile], labels_loader: Callable[[int], Tile], root: Any, layout: str
    ) -> None:
        dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
        if dupes:
            raise DatasetError(f"tile names must be unique; repeated: {dupes[:10]}", root)
        self._names = names
        self._loader = loader
        self._labels_loader = labels_loader
        self.root = None if root is None else Path(root)
        self.layout = layout

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _index(self, i: int) -> int:
        n = len(self)
        k = int(i)
        if not -n <= k < n:
            raise IndexError(f"tile index {i} out of range for a dataset of {n} tiles")
        return k % n

    @overload
    def __getitem__(self, i: int) -> Tile: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tile]: ...
    def __getitem__(self, i: int | slice) -> Tile | list[Tile]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self._loader(self._index(i))

    def labels(self, i: int) -> Tile:
        """Tile ``i`` with its label maps only (``image`` None): planning and statistics need no pixels."""
        return self._labels_loader(self._index(i))

    def __iter__(self) -> Iterator[Tile]:
        for k in range(len(self)):
            yield self._loader(k)

    def __repr__(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return f"Dataset({len(self)} tiles, layout {self.layout!r}, scheme {self.scheme.name!r}{where})"


def _without_image(tile: Tile) -> Tile:
    return tile if tile.image is None else Tile(tile.name, None, tile.inst_map, tile.type_map, tile.source)


def tile_labels(tiles: Sequence[Tile], i: int) -> Tile:
    """Tile ``i``'s label maps: :meth:`Dataset.labels` (no image decoded) for a Dataset, else ``tiles[i]``."""
    return tiles.labels(i) if isinstance(tiles, Dataset) else tiles[i]


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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image from PNG / TIFF / JPEG; alpha is dropped, grayscale is refused."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            image = iio.imread(path, plugin="pillow")
    except FileNotFoundError:
        raise DatasetError("image file does not exist", path) from None
    except Exception as exc:  # decoders raise many types; report the file, not a deep traceback
        raise DatasetError(f"cannot read image: {exc}", path) from None
    return _as_rgb(image, os.fspath(path))


def image_problem(path: str | os.PathLike, shape: Sequence[int]) -> str | None:
    """Why :func:`read_image` would refuse ``path`` or not pair it with label maps of ``shape`` (H, W),
    as "what was found, what was expected"; None when the image fits.

    Judged from the file's header where that settles it (Pillow and tifffile decode no pixels):
    the reader accepts 8-bit RGB or RGBA, planar TIFF included. Files whose header leaves it
    open (TIFFs of wider integers, whose values decide; multi-frame files) are read in full.
    """
    path = Path(path)
    found: tuple[int, ...] | None = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]  # what tifffile.imread returns
                if series.dtype == np.uint8:
                    found = tuple(series.shape)
        else:
            from PIL import Image, ImageMode

            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) == 1:
                    mode = im.palette.mode if im.mode == "P" else im.mode  # the reader applies the palette
                    bands = len(ImageMode.getmode(mode).bands)
                    found = (im.height, im.width) + ((bands,) if bands > 1 else ())
        if found is None:
            found = read_image(path).shape
    except DatasetError as exc:
        return str(exc).removeprefix(f"{exc.path}: ")
    except FileNotFoundError:
        return "image file does not exist"
    except Exception as exc:  # see read_image
        return f"cannot read image: {exc}"
    if len(found) == 3 and found[0] in (3, 4) and found[2] not in (3, 4):
        found = (*found[1:], found[0])  # planar (C, H, W), as _as_rgb reads it
    if len(found) != 3 or found[2] not in (3, 4):
        what = "grey (1 channel)" if len(found) == 2 else f"{found[2]} channels" if len(found) == 3 else f"shape {found}"
        return f"{what}, expected RGB (3 channels) or RGBA"
    if tuple(found[:2]) != tuple(shape):
        return f"{found[0]}x{found[1]} px, expected {shape[0]}x{shape[1]} px (the size of its label maps)"
    return None


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


def read_consep_labels(mat_path: str | os.PathLike, scheme: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map int32, type_map uint8)`` of a CoNSeP/GLySAC ``.mat``, raw types merged by ``scheme`` (exactly once).

    ``inst_type`` decides each nucleus's class; a ``type_map`` in the file is cross-checked
    against it (or, without ``inst_type``, gives each nucleus its majority class).
    """
    mat_path = Path(mat_path)
    scheme = load_scheme(scheme)
    where = os.fspath(mat_path)
    mat = _loadmat(mat_path)
    keys = sorted(k for k in mat if not k.startswith("__"))
    if "inst_map" not in mat:
        raise DatasetError(f"missing key 'inst_map' (keys in file: {keys})", mat_path)
    if "inst_type" not in mat and "type_map" not in mat:
        raise DatasetError(f"missing key 'inst_type' (and no 'type_map' to derive classes from; keys in file: {keys})", mat_path)
    inst_map = _as_labels(mat["inst_map"], "inst_map", np.int32, where)
    raw_type_map = None
    if "type_map" in mat:
        raw_type_map = _as_labels(mat["type_map"], "type_map", np.int32, where)
        if raw_type_map.shape != inst_map.shape:
            raise DatasetError(f"inst_map {inst_map.shape} and type_map {raw_type_map.shape} differ in shape", mat_path)
    if "inst_type" in mat:
        raw = np.asarray(mat["inst_type"])
        if raw.ndim > 2 or (raw.ndim == 2 and 1 not in raw.shape and raw.size):
            raise DatasetError(f"inst_type must be an (N, 1) column of raw type ids, got shape {raw.shape}", mat_path)
        raw = raw.reshape(-1)
        if raw.size and (not np.issubdtype(raw.dtype, np.number) or not np.all(np.mod(raw, 1) == 0)):
            raise DatasetError("inst_type holds non-integer values", mat_path)
        top = int(inst_map.max()) if inst_map.size else 0
        if top > raw.size:
            raise DatasetError(f"inst_map has nucleus id {top} but inst_type lists only {raw.size} nuclei", mat_path)
        inst_types = np.zeros(raw.size + 1, dtype=np.int32)
        inst_types[1:] = scheme.merge_raw(raw.astype(np.int64), source=mat_path)
        present = np.flatnonzero(np.bincount(inst_map.reshape(-1), minlength=inst_types.size) > 0)
        present = present[present > 0]
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
                raise DatasetError(
                    f"type_map disagrees with inst_type at {bad} of {labelled} nucleus pixels "
                    f"({100 * bad / max(labelled, 1):.1f} %, tolerance {100 * TYPE_MAP_TOLERANCE:g} %); "
                    "the file's labels are inconsistent or belong to another scheme",
                    mat_path,
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

    return Dataset.lazy(names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="consep")


# -- generic folders -----------------------------------------------------------------------------
def _generic_tile(
    name: str, image: np.ndarray | None, image_path: Path | None, inst_map: Any, type_map: Any, label_path: Path,
    scheme: ClassScheme,
) -> Tile:
    """A tile of merged-class label maps: classes must be the scheme's and one per nucleus (LabelError otherwise)."""
    where = os.fspath(label_path)
    inst_map = _as_labels(inst_map, "inst_map", np.int32, where)
    _check_pair_shapes(image, image_path or label_path, inst_map, label_path)
    type_map = _as_labels(type_map, "type_map", np.uint8, where)
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

    return Dataset.lazy(names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="generic")


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
    image = np.asarray(images[i])
    if np.issubdtype(image.dtype, np.floating):  # PanNuke stores 0..255 as float64
        if image.size and (image.min() < 0 or image.max() > 255):
            raise DatasetError(f"image {i} has values outside 0..255", path)
        image = np.rint(image).astype(np.uint8)
    return image


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
            image = _as_rgb(_stack_image(images, i, images_path), f"{images_path}[{i}]")
        if masks_path is None:
            return _generic_tile(names[i], image, images_path, inst_maps[i], type_maps[i], Path(where), scheme)
        m = np.asarray(masks[i])
        if np.issubdtype(m.dtype, np.floating) and not np.all(np.mod(m, 1) == 0):
            raise DatasetError(f"masks of tile {i} hold non-integer instance ids", masks_path)
        inst_map, raw = _masks_to_labels(m.astype(np.int64))
        inst_types = scheme.merge_raw(raw, source=where).astype(np.int32)
        return Tile(names[i], image, inst_map, type_map_from(inst_map, inst_types), source=where)

    return Dataset.lazy(names, load, scheme, labels_loader=lambda i: load(i, False), root=root, layout="pannuke")


# -- opening -------------------------------------------------------------------------------------
def detect_layout(root: str | os.PathLike) -> str:
    """``consep``, ``generic`` or ``pannuke`` for a dataset folder, else a DatasetError saying what was found."""
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
        return "consep"
    if _child_dir(root, "inst_maps") or _child_dir(root, "type_maps"):
        return "generic"
    if labels and any(p.suffix.lower() == ".npz" for p in labels.iterdir()):
        return "generic"
    if (root / "inst_maps.npy").is_file() or (root / "type_maps.npy").is_file() or _find_one(root, "masks.npy"):
        return "pannuke"
    if _child_dir(root, "images") and labels:
        raise DatasetError(f"'{labels.name}' holds neither .mat (CoNSeP/GLySAC) nor .npz label files", root)
    splits = sorted(p.name for p in entries if p.is_dir() and p.name.lower() in ("train", "test", "valid", "val"))
    if splits:
        raise DatasetError(f"this folder holds the splits {splits}; point at one of them, e.g. {root / splits[0]}", root)
    raise DatasetError(
        "cannot tell the dataset layout: expected Images/ + Labels/*.mat (CoNSeP/GLySAC), inst_maps/ + type_maps/ "
        f"(generic) or images.npy + masks.npy (PanNuke); found {sorted(p.name for p in entries)[:10]}",
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
    if scheme is None:
        if not saved.is_file():
            raise SchemeError(f"{root}: no class scheme given and no scheme.json in the folder; pass --scheme consep, glysac, demo or a scheme file")
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
    reader = {"consep": read_consep, "generic": read_generic, "pannuke": read_pannuke}[layout]
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
