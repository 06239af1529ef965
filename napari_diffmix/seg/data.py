"""Training data for the segmentation network: dataset tiles plus an optional synthetic store.

The synthetic store is the zarr (v3) group the export step writes: arrays ``images``
(N, H, W, 3) uint8, ``inst_maps`` (N, H, W) int32, ``type_maps`` (N, H, W) uint8 and ``done``
(N,) bool (only finished items are used). :func:`open_synthetic_store` is the one place that
knows this layout, so it can be swapped for the export module's reader. Items are read
lazily, crop by crop, so a store larger than memory is fine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import SchemeError, StoreError

STORE_ARRAYS = {"images": (4, np.uint8), "inst_maps": (3, None), "type_maps": (3, None), "done": (1, np.bool_)}


class _ItemView:
    """Item ``index`` of a stacked array, sliced on demand (``shape`` and ``[...]`` only)."""

    def __init__(self, array: Any, index: int):
        self.array = array
        self.index = index
        self.shape = tuple(array.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.array[(self.index, *key)])


@dataclass
class SyntheticItem:
    """One finished store item; its arrays are read when sliced."""

    name: str
    image: _ItemView
    inst_map: _ItemView
    type_map: _ItemView


class SyntheticStore(Sequence[SyntheticItem]):
    """The finished items of a synthetic zarr store, named ``synthetic_<index>``."""

    def __init__(self, path: Path, arrays: dict[str, Any], indices: np.ndarray, scheme: ClassScheme | None):
        self.path = path
        self.arrays = arrays
        self.indices = indices
        self.scheme = scheme

    @property
    def names(self) -> list[str]:
        return [f"synthetic_{i:06d}" for i in self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, k: int) -> SyntheticItem:  # type: ignore[override]
        i = int(self.indices[k])
        a = self.arrays
        return SyntheticItem(f"synthetic_{i:06d}", _ItemView(a["images"], i), _ItemView(a["inst_maps"], i), _ItemView(a["type_maps"], i))

    def tile(self, k: int):
        """Item ``k`` fully read, as a :class:`napari_diffmix.datasets.Tile` (for evaluation)."""
        from ..datasets import Tile

        item = self[k]
        sl = (slice(None), slice(None))
        return Tile(item.name, item.image[sl], item.inst_map[sl], item.type_map[sl], source=f"{self.path}[{self.indices[k]}]")


def _read_done(done: Any) -> np.ndarray:
    try:
        return np.asarray(done[:], dtype=bool)
    except Exception:  # a chunk torn by a crashed writer: read flag by flag, unreadable = not done
        out = np.zeros(done.shape[0], dtype=bool)
        for i in range(done.shape[0]):
            try:
                out[i] = bool(done[i])
            except Exception:
                pass
        return out


def open_synthetic_store(path: str | os.PathLike, scheme: Any = None) -> SyntheticStore:
    """Open a synthetic store for reading; StoreError if it is missing, malformed or empty.

    If the store records a class scheme (``attrs["scheme"]``) it must name the same classes
    as ``scheme``.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: synthetic store does not exist")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"; report, not a traceback
        raise StoreError(f"{path}: not a readable zarr store ({type(exc).__name__}: {exc})") from None
    arrays = {}
    for key, (ndim, dtype) in STORE_ARRAYS.items():
        if key not in group:
            raise StoreError(f"{path}: the store has no '{key}' array (found {sorted(group.array_keys())}); expected {sorted(STORE_ARRAYS)}")
        arr = group[key]
        if arr.ndim != ndim or (dtype is not None and arr.dtype != dtype) or (dtype is None and arr.dtype.kind not in "iu"):
            raise StoreError(f"{path}: '{key}' is {arr.dtype} with shape {arr.shape}; expected {ndim} dims of {dtype or 'integers'}")
        arrays[key] = arr
    n, h, w = arrays["inst_maps"].shape
    if arrays["images"].shape != (n, h, w, 3) or arrays["type_maps"].shape != (n, h, w) or arrays["done"].shape != (n,):
        raise StoreError(
            f"{path}: array shapes disagree: images {arrays['images'].shape}, inst_maps {arrays['inst_maps'].shape}, "
            f"type_maps {arrays['type_maps'].shape}, done {arrays['done'].shape}"
        )
    indices = np.flatnonzero(_read_done(arrays["done"]))
    if indices.size == 0:
        raise StoreError(f"{path}: no finished items in the store (done is all False); run the synthesis first")
    stored = group.attrs.get("scheme")
    store_scheme = None
    if stored is not None:
        try:
            store_scheme = load_scheme(stored)
        except SchemeError as exc:
            raise StoreError(f"{path}: the store's class scheme is invalid: {exc}") from None
    if scheme is not None and store_scheme is not None:
        wanted = load_scheme(scheme)
        if wanted.names != store_scheme.names:
            raise SchemeError(
                f"{path}: the synthetic store uses classes {list(store_scheme.names)}, the training data {list(wanted.names)}"
            )
    return SyntheticStore(path, arrays, indices, store_scheme)


def is_synthetic_store(path: str | os.PathLike) -> bool:
    """True for a zarr v3 group folder (how `diffmix evaluate` tells stores from dataset folders)."""
    return (Path(path) / "zarr.json").is_file()


def open_tiles(path: str | os.PathLike, scheme: Any = None, layout: str = "auto", *, allow_images: bool = False):
    """Tiles at ``path`` as a :class:`~napari_diffmix.datasets.Dataset`.

    A zarr store (``zarr.json`` inside) gives its finished items; anything else goes to
    :func:`~napari_diffmix.datasets.open_dataset`. With ``allow_images`` an image file or a
    folder of image files (no labels) also works; their label maps are empty.
    """
    from ..datasets import IMAGE_SUFFIXES, Dataset, Tile, open_dataset, read_image

    path = Path(path)
    if is_synthetic_store(path):
        store = open_synthetic_store(path, scheme)
        use = store.scheme if scheme is None else load_scheme(scheme)
        if use is None:
            raise SchemeError(f"{path}: the store records no class scheme; pass --scheme")
        return Dataset.lazy(store.names, store.tile, use, root=path, layout="zarr")
    if allow_images:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        if files and files[0].suffix.lower() in IMAGE_SUFFIXES:

            def load(i: int) -> Tile:
                image = read_image(files[i])
                empty = np.zeros(image.shape[:2], np.int32)
                return Tile(files[i].stem, image, empty, empty.astype(np.uint8), source=str(files[i]))

            return Dataset.lazy([f.stem for f in files], load, scheme, root=path, layout="images")
    return open_dataset(path, scheme, layout)
