"""Tiles and datasets: the data model every reader returns and every job consumes.

A :class:`Tile` is one labelled tile (RGB image, or None for a label-only map, with its
``inst_map`` and ``type_map``), checked and normalised when made; a :class:`Dataset` is named
tiles sharing one class scheme, loaded lazily by the readers of :mod:`napari_diffmix.datasets`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError
from ..nuclei import inst_types_from_maps

log = logging.getLogger(__name__)
_NOTED: set[Any] = set()


def note_once(key: Any, message: str, logger: logging.Logger = log) -> None:
    """Log ``message`` at info level the first time ``key`` is seen (once per folder, not per
    tile), through ``logger`` (the reader's own)."""
    if key not in _NOTED:
        _NOTED.add(key)
        logger.info(message)


def as_rgb(image: Any, where: str, note_key: Any = None) -> np.ndarray:
    """(H, W, 3) uint8 from RGB or RGBA pixels (planar too); wider integers as :func:`_to_8_bit` says.
    ``note_key`` groups the notes about wide images (a folder, a stack); default ``where``."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # planar (C, H, W) TIFF
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DatasetError(f"image is not RGB: shape {image.shape}, expected (H, W, 3)", where)
    if image.dtype != np.uint8:
        image = _to_8_bit(image[..., :3], where, where if note_key is None else note_key)
    return np.ascontiguousarray(image[..., :3])


def _to_8_bit(image: np.ndarray, where: str, note_key: Any) -> np.ndarray:
    """uint8 pixels from an integer image wider than 8 bits.

    All values within 0..255: taken as they are (tools that write 8-bit data into 16-bit files
    mean those values); said once per ``note_key`` at info level. A uint16 image using more
    of its range is scaled by 1/257, which maps 65535 to 255 and undoes the usual 8 -> 16-bit
    widening (v * 257) exactly; said once per ``note_key`` as a warning, since data of fewer
    bits stored in 16 (12-bit scans) comes out dark and should be converted by the user.
    Floats and wider integers have no agreed full range and are refused.
    """
    if image.dtype == bool or not np.issubdtype(image.dtype, np.integer):
        raise DatasetError(f"image must be 8-bit RGB (uint8) or 16-bit, got {image.dtype}", where)
    if image.size == 0:
        return image.astype(np.uint8)
    lo, hi = int(image.min()), int(image.max())
    bits = 8 * image.dtype.itemsize
    if lo < 0:
        raise DatasetError(f"image has negative values (down to {lo}); expected 8-bit RGB, 0..255", where)
    if hi <= 255:
        note_once(("8-bit values", note_key), f"{where}: {bits}-bit image holding only 0..255: read as 8-bit values "
                   "(so are further such images here)")
        return image.astype(np.uint8)
    if image.dtype != np.uint16:
        raise DatasetError(
            f"image must be 8-bit RGB (uint8) or 16-bit; got {image.dtype} with values up to {hi}: convert it to 8-bit RGB", where
        )
    if ("16-bit scaled", note_key) not in _NOTED:
        _NOTED.add(("16-bit scaled", note_key))
        log.warning(
            "%s: 16-bit image with values up to %d: scaled to 8 bits as round(value / 257) (65535 -> 255); "
            "if its data do not span 0..65535 (12-bit scans), convert it to 8-bit RGB yourself. "
            "Further 16-bit images here are scaled without a message.", where, hi,
        )
    # round(v / 257) in integers: 257 is odd, so no value lies half-way.
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)


def as_labels(a: Any, name: str, dtype: type, where: str) -> np.ndarray:
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
            self.image = as_rgb(self.image, where)
        self.inst_map = as_labels(self.inst_map, "inst_map", np.int32, where)
        self.type_map = as_labels(self.type_map, "type_map", np.uint8, where)
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

    def windows(self, size: int) -> list["Tile"]:
        """Every ``size`` x ``size`` window that fits, side by side, rows first (none if the tile is smaller)."""
        H, W = self.shape
        return [self.crop(y, x, size, size) for y in range(0, H - size + 1, size) for x in range(0, W - size + 1, size)]


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
        image_check: Callable[[int, tuple[int, int]], tuple[str, str | None] | None] | None = None,
    ) -> "Dataset":
        """A dataset whose tile ``i`` is read by ``loader(i)`` on access.

        ``labels_loader(i)``: tile ``i`` without its image (``image`` None), read without
        decoding the image; default ``loader(i)`` with the image dropped. ``image_check``:
        see :meth:`check_image` (:func:`_file_check`, :func:`_stack_check` make one).
        """
        ds = cls.__new__(cls)
        ds.scheme = load_scheme(scheme)
        ds._init(list(names), loader, labels_loader or (lambda i: _without_image(loader(i))), root, layout)
        ds._image_check = image_check
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
        self._image_check: Callable[[int, tuple[int, int]], tuple[str, str | None] | None] | None = None
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

    @property
    def checks_images(self) -> bool:
        """Whether :meth:`check_image` can judge this dataset's images (False: in memory, the demo)."""
        return self._image_check is not None

    def check_image(self, i: int, shape: Sequence[int] | None = None) -> tuple[str, str | None] | None:
        """Decode tile ``i``'s image as the reader will: ``(where it is read from, why it does not
        fit or None)``, or None when the tile has no image (a label-only layout or tile). ``shape``
        (H, W) is the size of its label maps (read when not given)."""
        if self._image_check is None:
            return None
        k = self._index(i)
        return self._image_check(k, tuple(shape) if shape is not None else self.labels(k).shape)

    def __repr__(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return f"Dataset({len(self)} tiles, layout {self.layout!r}, scheme {self.scheme.name!r}{where})"


def _without_image(tile: Tile) -> Tile:
    return tile if tile.image is None else Tile(tile.name, None, tile.inst_map, tile.type_map, tile.source)


def tile_labels(tiles: Sequence[Tile], i: int) -> Tile:
    """Tile ``i``'s label maps: :meth:`Dataset.labels` (no image decoded) for a Dataset, else ``tiles[i]``."""
    return tiles.labels(i) if isinstance(tiles, Dataset) else tiles[i]
