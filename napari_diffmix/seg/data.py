"""Training data for the segmentation network: dataset tiles plus an optional synthetic store.

The synthetic store is opened with :func:`napari_diffmix.store.open_store`, which knows its
layout; only finished items (``done``) are used. Items are read lazily, crop by crop, so a
store larger than memory is fine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import SchemeError, StoreError
from ..store import IMAGES, INST_MAPS, TYPE_MAPS, SyntheticStore, open_store

log = logging.getLogger(__name__)


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


class SyntheticItems(Sequence[SyntheticItem]):
    """The finished items of a synthetic store, named ``synthetic_<index>``."""

    def __init__(self, store: SyntheticStore, indices: np.ndarray, scheme: ClassScheme | None):
        self.store = store
        self.path = store.path
        self.indices = indices
        self.scheme = scheme
        self.selection = None  # the fidelity filter that chose ``indices`` (napari_diffmix.fidelity.Selection)

    @property
    def patch_shape(self) -> tuple[int, int]:
        return self.store.patch_shape

    @property
    def names(self) -> list[str]:
        return [f"synthetic_{i:06d}" for i in self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, k: int) -> SyntheticItem:  # type: ignore[override]
        i = int(self.indices[k])
        g = self.store.group
        return SyntheticItem(f"synthetic_{i:06d}", _ItemView(g[IMAGES], i), _ItemView(g[INST_MAPS], i), _ItemView(g[TYPE_MAPS], i))

    def tile(self, k: int, with_image: bool = True):
        """Item ``k`` fully read, as a :class:`napari_diffmix.datasets.Tile` (for evaluation)."""
        from ..datasets import Tile

        i = int(self.indices[k])
        g = self.store.group
        image = np.asarray(g[IMAGES][i]) if with_image else None
        return Tile(f"synthetic_{i:06d}", image, np.asarray(g[INST_MAPS][i]), np.asarray(g[TYPE_MAPS][i]), source=f"{self.path}[{i}]")


def open_synthetic_store(path: str | os.PathLike, scheme: Any = None, min_fidelity: float | None = None) -> SyntheticItems:
    """The finished items of a synthetic store; StoreError if it is missing, malformed or has none.

    If the store records a class scheme (``attrs["scheme"]``) it must name the same classes
    as ``scheme``. ``min_fidelity``: keep only the items whose label fidelity (``diffmix score``)
    reaches it (``selection`` on the result says how many).
    """
    store = open_store(path)
    indices = np.flatnonzero(store.done_mask())
    if indices.size == 0:
        raise StoreError(f"{store.path}: no finished items in the store (done is all False); run the synthesis first")
    selection = None
    if min_fidelity is not None:
        from ..fidelity_records import select_items

        selection = select_items(store, min_fidelity)
        log.info("%s: label fidelity %s", store.path, selection.text())
        if selection.kept == 0:
            raise StoreError(f"{store.path}: no synthetic item reaches the minimum fidelity {min_fidelity:g}; lower it or drop it")
    if indices.size < len(store):
        log.warning(
            "%s is not complete: %d of %d items are done (items %s); only those are used. "
            "Finish it with the same `diffmix synthesize` command to use all.",
            store.path, indices.size, len(store), index_ranges(indices),
        )
    store_scheme = store.scheme if "scheme" in store.attrs else None
    if scheme is not None and store_scheme is not None:
        wanted = load_scheme(scheme)
        if wanted.names != store_scheme.names:
            raise SchemeError(
                f"{store.path}: the synthetic store uses classes {list(store_scheme.names)}, the training data {list(wanted.names)}"
            )
    items = SyntheticItems(store, indices if selection is None else selection.indices, store_scheme)
    items.selection = selection
    return items


def index_ranges(indices: Sequence[int]) -> str:
    """'0-11, 15, 17-18' for sorted indices."""
    parts: list[str] = []
    start = prev = None
    for i in (int(v) for v in indices):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


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
        return Dataset.lazy(store.names, store.tile, use, labels_loader=lambda k: store.tile(k, False), root=path, layout="zarr")
    if allow_images:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        if files and files[0].suffix.lower() in IMAGE_SUFFIXES:

            def load(i: int) -> Tile:
                image = read_image(files[i])
                empty = np.zeros(image.shape[:2], np.int32)
                return Tile(files[i].stem, image, empty, empty.astype(np.uint8), source=str(files[i]))

            return Dataset.lazy([f.stem for f in files], load, scheme, root=path, layout="images")
    return open_dataset(path, scheme, layout)
