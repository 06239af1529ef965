"""The synthetic store (zarr v3): its layout, writing, reading, and the original patches it holds or refers to.

Store layout
------------
A zarr v3 group (a folder, ``*.zarr``) written by :mod:`napari_diffmix.synthesize`::

    images       (N, H, W, 3) uint8   rendered H&E patches
    inst_maps    (N, H, W)    int32   nuclei 1..n per patch (contiguous ids), 0 = background
    type_maps    (N, H, W)    uint8   class per pixel, == inst_types[inst_maps]
    done         (N,)         bool    True once the item's three arrays and provenance are written
    provenance   (N,)         string  one JSON object per item (see below)
    originals/                        optional: the original training patches, same arrays
    training/                         TRAINING.md, train.sh, scheme.json: how to train a nuclei
                                      segmentation network on original + synthetic (a zarr group,
                                      so listing the store meets no foreign files)

Every array is chunked one item per chunk (``done`` and ``provenance`` too), so items are
written independently: by several ``torchrun`` ranks at once, or again after a crash. Chunks
are zstd-compressed with a checksum, so a chunk torn by a crash is detected on read. Readers
use only items whose ``done`` flag is set (:meth:`SyntheticStore.done_mask`).

Crash safety: an item is written in order images, inst_maps, type_maps, provenance, then
``done``. zarr >= 3.1.3 writes every chunk through a temporary file and a rename, so a chunk
is whole or absent; with older zarr (or on other file systems) a crash may tear a chunk, which
is harmless because an item whose ``done`` flag is unset (or unreadable) is rendered and
written again on resume. Leftover ``*.partial`` temporaries of killed writes are removed when
a run resumes.

Store attributes (``zarr.json``): ``format`` / ``format_version``, ``scheme``
(:meth:`ClassScheme.to_dict`), ``fingerprint`` (sha256 of ``settings``), ``settings`` (plan,
patch size, model sha256, sampler, steps, guidance, strength, init, seed: everything that
decides the output), ``model`` (sha256, source, UNet config, diffusion, default guidance),
``dataset`` (path, layout, tile names), ``originals`` (``mode`` "included" / "referenced" /
"none", patch origins), ``software`` (versions), ``class_counts`` (``before``, ``planned``,
``synthetic``, ``after``: nuclei per class indexed by class id, 0 unused), ``status``
("in progress" / "complete" / "stopped"), ``items_done``, ``created_by`` ("synthesize" /
"demo").

Provenance (per item JSON): ``index``, ``tile`` (name), ``tile_index``, ``origin`` [y, x],
``maps`` (edits applied, e.g. ["balance", "enlarge"]), ``seed``, ``sampler``, ``steps``,
``guidance``, ``strength``, ``init`` ("original" / "noise"), ``nuclei`` (per class, index =
class id), and what the label planner reports about the item (``label``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .atomic import atomic_dir, json_default
from .classes import ClassScheme, load_scheme
from .errors import DatasetError, SchemeError, StoreError
from .outputs import STORE_FORMAT

FORMAT = STORE_FORMAT
FORMAT_VERSION = 1
IMAGES, INST_MAPS, TYPE_MAPS, DONE, PROVENANCE = "images", "inst_maps", "type_maps", "done", "provenance"
ORIGINALS = "originals"
# Level 1 zstd: H&E patches barely compress further and the writer should stay far below the
# sampling cost; the checksum turns a torn chunk into a read error instead of silent garbage.
ZSTD_LEVEL = 1


def _codec():
    import zarr

    return zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=True)


# ---------------------------------------------------------------------------------------------
# creating and writing
# ---------------------------------------------------------------------------------------------
def _create_arrays(group: Any, count: int, shape: tuple[int, int]) -> None:
    h, w = shape
    codec = _codec()
    group.create_array(IMAGES, shape=(count, h, w, 3), chunks=(1, h, w, 3), dtype="uint8", compressors=codec, fill_value=0)
    group.create_array(INST_MAPS, shape=(count, h, w), chunks=(1, h, w), dtype="int32", compressors=codec, fill_value=0)
    group.create_array(TYPE_MAPS, shape=(count, h, w), chunks=(1, h, w), dtype="uint8", compressors=codec, fill_value=0)
    group.create_array(DONE, shape=(count,), chunks=(1,), dtype="bool", compressors=codec, fill_value=False)
    group.create_array(PROVENANCE, shape=(count,), chunks=(1,), dtype=str, compressors=codec)


def create_store(
    path: str | os.PathLike,
    *,
    count: int,
    shape: tuple[int, int],
    attrs: Mapping[str, Any],
    originals: int = 0,
    overwrite: bool = False,
) -> Path:
    """Create an empty store for ``count`` items of ``shape`` (H, W) with root ``attrs``.

    The store appears whole or not at all (built in a temporary folder and renamed), so a crash
    during creation never leaves a half-made store. ``originals`` > 0 adds the ``originals``
    group for that many original patches. An existing ``path`` is replaced only with
    ``overwrite``.
    """
    import zarr

    path = Path(path)
    if count < 1:
        raise StoreError(f"{path}: nothing to synthesize (the plan has no items)")
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        with atomic_dir(path) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            _create_arrays(group, count, shape)
            if originals:
                _create_arrays(group.create_group(ORIGINALS), originals, shape)
            group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **_jsonable(attrs)})
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the store: {os_reason(exc)}") from None
    return path


def _jsonable(obj: Any) -> Any:
    # zarr stores attributes as JSON; numpy scalars/arrays and paths must become plain values.
    return json.loads(json.dumps(obj, default=json_default))


def os_reason(exc: OSError) -> str:
    """A short reason for a failed write: the full disk and permission cases in plain words."""
    import errno

    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"


def write_items(
    group: Any,
    start: int,
    images: np.ndarray,
    inst_maps: np.ndarray,
    type_maps: np.ndarray,
    provenance: Sequence[Mapping[str, Any]],
    *,
    where: str = "",
) -> None:
    """Write items ``start .. start + n - 1`` and only then set their ``done`` flags.

    Raises :class:`StoreError` (the store stays resumable) when the disk is full or the store
    cannot be written.
    """
    n = len(images)
    sl = slice(start, start + n)
    try:
        group[IMAGES][sl] = images
        group[INST_MAPS][sl] = inst_maps
        group[TYPE_MAPS][sl] = type_maps
        group[PROVENANCE][sl] = np.array([json.dumps(p, default=json_default) for p in provenance], dtype=object)
        group[DONE][sl] = True
    except OSError as exc:
        raise StoreError(
            f"{where or group.store}: writing items {start}..{start + n - 1} failed: {os_reason(exc)}. "
            "Items written before are kept; free space (or fix the problem) and run the same command again to resume."
        ) from None


def read_done(group: Any) -> np.ndarray:
    """The ``done`` mask; an unreadable (torn) flag counts as not done."""
    try:
        arr = group[DONE]
    except KeyError:
        raise StoreError(f"{_group_path(group)}: the store has no 'done' array; it is damaged or not a napari-diffmix store") from None
    except Exception as exc:  # a damaged zarr.json of the array
        raise StoreError(f"{_group_path(group)}: the 'done' array cannot be opened ({_short(exc)})") from None
    try:
        return np.asarray(arr[:], dtype=bool)
    except Exception:  # a torn chunk: decode or checksum error; fall back to item by item
        out = np.zeros(arr.shape[0], dtype=bool)
        for i in range(arr.shape[0]):
            with contextlib.suppress(Exception):
                out[i] = bool(arr[i])
        return out


def _group_path(group: Any) -> str:
    root = getattr(group.store, "root", None)
    return os.path.join(os.fspath(root), group.path) if root is not None else str(group.store)


def _short(exc: BaseException) -> str:
    """One line about a decode/parse error (zarr and numcodecs messages can span many)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def remove_partial_files(path: str | os.PathLike) -> int:
    """Delete ``*.partial`` temporaries left in the store by killed chunk writes; returns the count.

    Call only while no process writes to the store.
    """
    removed = 0
    for p in Path(path).rglob("*.partial"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


def update_attrs(path: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    import zarr

    try:
        zarr.open_group(str(path), mode="r+").attrs.update(_jsonable(attrs))
    except OSError as exc:
        raise StoreError(f"{path}: cannot update the store attributes: {os_reason(exc)}") from None


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass
class StoreItem:
    """One store item (read whole)."""

    index: int
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    provenance: dict[str, Any]

    @property
    def name(self) -> str:
        return item_name(self.provenance, self.index)


def item_name(provenance: Mapping[str, Any], index: int) -> str:
    """File-name-safe item name: ``synthetic_000012`` or ``original_<tile>_y<y>_x<x>``."""
    if provenance.get("kind") == "original":
        y, x = provenance.get("origin", (0, 0))
        tile = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(provenance.get("tile_name", index)))
        return f"original_{tile}_y{y}_x{x}"
    return f"synthetic_{index:06d}"


class SyntheticStore:
    """A store opened for reading: arrays, attributes, ``done`` mask, items and originals."""

    def __init__(self, path: Path, group: Any, *, kind: str = "synthetic"):
        self.path = path
        self.group = group
        self.kind = kind
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._check_layout()

    def _check_layout(self) -> None:
        try:
            self._check_arrays()
        except StoreError:
            raise
        except Exception as exc:  # a damaged zarr.json of an array: JSONDecodeError, ValueError, ...
            raise StoreError(f"{self.path}: the store's array metadata cannot be read ({_short(exc)}); the store is damaged") from None

    def _check_arrays(self) -> None:
        g = self.group
        missing = [k for k in (IMAGES, INST_MAPS, TYPE_MAPS, DONE) if k not in g]
        if missing:
            raise StoreError(f"{self.path}: not a napari-diffmix store: missing array(s) {missing}")
        kinds = {IMAGES: "u", INST_MAPS: "iu", TYPE_MAPS: "iu", DONE: "b"}
        wrong = [f"{k} {g[k].dtype}" for k, kind in kinds.items() if g[k].dtype.kind not in kind]
        if g[IMAGES].dtype.itemsize != 1 or wrong:
            raise StoreError(
                f"{self.path}: wrong array types ({', '.join(wrong) or f'images {g[IMAGES].dtype}'}); expected images "
                "uint8, inst_maps and type_maps integers, done bool"
            )
        if g[INST_MAPS].ndim != 3:
            raise StoreError(f"{self.path}: inst_maps must be (N, H, W), got shape {g[INST_MAPS].shape}")
        n, h, w = g[INST_MAPS].shape
        if g[IMAGES].shape != (n, h, w, 3) or g[TYPE_MAPS].shape != (n, h, w) or g[DONE].shape != (n,):
            raise StoreError(
                f"{self.path}: array shapes disagree: images {g[IMAGES].shape}, inst_maps {g[INST_MAPS].shape}, "
                f"type_maps {g[TYPE_MAPS].shape}, done {g[DONE].shape}"
            )

    def __len__(self) -> int:
        return int(self.group[DONE].shape[0])

    @property
    def patch_shape(self) -> tuple[int, int]:
        return tuple(self.group[INST_MAPS].shape[1:])  # type: ignore[return-value]

    @property
    def scheme(self) -> ClassScheme:
        data = self.attrs.get("scheme")
        if data is None:
            raise StoreError(f"{self.path}: the store records no class scheme (attrs['scheme'])")
        try:
            return load_scheme(data)
        except SchemeError as exc:
            raise StoreError(f"{self.path}: the store's class scheme is invalid: {exc}") from None

    def done_mask(self) -> np.ndarray:
        return read_done(self.group)

    def provenance(self, i: int) -> dict[str, Any]:
        if PROVENANCE not in self.group:
            return {"index": i, "kind": self.kind}
        try:
            text = self.group[PROVENANCE][i]
            return json.loads(str(text)) if text else {"index": i, "kind": self.kind}
        except Exception as exc:
            raise self._damaged(i, f"its provenance cannot be read ({_short(exc)})") from None

    def chunk_missing(self, name: str, i: int) -> bool:
        """Whether item ``i``'s chunk of array ``name`` is absent from disk: zarr would read the
        fill value (zeros) for it, an all-black image passed off as a finished item."""
        arr = self.group[name]
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        return not (self.path / name / key).is_file()

    def _damaged(self, i: int, what: str) -> StoreError:
        exc = StoreError(
            f"{self.path}: item {i}: {what}; 'diffmix verify {self.path}' lists every damaged item, and running the "
            "synthesis command again renders them anew"
        )
        exc.reason = what  # what verify_store reports for the item
        return exc

    def item(self, i: int) -> StoreItem:
        """Item ``i`` read whole; :class:`StoreError` when a chunk of it is missing or cannot be decoded."""
        g = self.group
        arrays = []
        for name in (IMAGES, INST_MAPS, TYPE_MAPS):
            if self.chunk_missing(name, i):
                raise self._damaged(i, f"its {name} chunk is missing")
            try:
                arrays.append(np.asarray(g[name][i]))
            except Exception as exc:  # zstd checksum / decode errors of a damaged chunk
                raise self._damaged(i, f"its {name} chunk cannot be decoded ({_short(exc)})") from None
        return StoreItem(i, *arrays, self.provenance(i))

    def items(self, indices: Sequence[int] | None = None) -> Iterator[StoreItem]:
        """Finished items (``done``) in index order, or the given ``indices``."""
        for i in np.flatnonzero(self.done_mask()) if indices is None else indices:
            yield self.item(int(i))

    @property
    def originals(self) -> "SyntheticStore | None":
        """The included original patches, or None when the store only references them."""
        if ORIGINALS not in self.group:
            return None
        return SyntheticStore(self.path / ORIGINALS, self.group[ORIGINALS], kind="original")

    def original_index(self) -> np.ndarray:
        """For each item, the index of the included original patch it was made from (-1: none,
        e.g. an unfinished item or a store whose originals are referenced, not included)."""
        patches = (self.attrs.get("originals") or {}).get("patches") or []
        where = {tuple(int(v) for v in p): k for k, p in enumerate(patches)}
        out = np.full(len(self), -1, np.int64)
        done = self.done_mask()
        for i in np.flatnonzero(done):
            prov = self.provenance(int(i))
            if "tile" in prov and "origin" in prov:
                out[i] = where.get((int(prov["tile"]), *(int(v) for v in prov["origin"])), -1)
        return out

    def class_counts(self) -> np.ndarray:
        """Nuclei per class (index = class id, 0 unused) over the finished items, from the maps."""
        from .datasets import class_counts
        from .nuclei import inst_types_from_maps

        c = self.scheme.num_classes
        total = np.zeros(c + 1, np.int64)
        for item in self.items():
            total += class_counts(item.inst_map, inst_types_from_maps(item.inst_map, item.type_map), c)
        return total


class RowsView:
    """Rows ``index`` of an array (a zarr array of the store), read when sliced: a stack as long
    as ``index`` without copying it. Rows at -1 read as zeros (no such row)."""

    def __init__(self, array: Any, index: np.ndarray):
        self.array = array
        self.index = np.asarray(index, np.int64)
        self.dtype = np.dtype(array.dtype)
        self.shape = (int(self.index.size), *array.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if np.ndim(self.index[first]) == 0:
            row = int(self.index[first])
            return np.zeros(self.shape[1:], self.dtype)[rest] if row < 0 else np.asarray(self.array[(row, *rest)])
        picks = np.arange(self.shape[0])[first]
        if picks.size == 0:
            return np.zeros((0, *np.zeros(self.shape[1:], self.dtype)[rest].shape), self.dtype)
        return np.stack([self[(int(i), *rest)] for i in picks])


def open_store(path: str | os.PathLike) -> SyntheticStore:
    """Open a synthetic store for reading; :class:`StoreError` if it is missing or malformed."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a zarr v3 store (no zarr.json); expected a folder written by 'diffmix synthesize'")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"; report, not a traceback
        raise StoreError(f"{path}: not a readable zarr group ({type(exc).__name__}: {exc})") from None
    return SyntheticStore(path, group)


# ---------------------------------------------------------------------------------------------
# originals
# ---------------------------------------------------------------------------------------------
def original_patches(
    dataset: Sequence[Any], origins: Sequence[Sequence[int]], size: int, *, indices: Sequence[int] | None = None
) -> Iterator[StoreItem]:
    """Original patches ``(tile_index, y, x)`` of ``dataset`` as store items (ids remapped 1..n).

    ``indices`` numbers the items (default 0, 1, ...). Consecutive origins of one tile load it once.
    """
    from .nuclei import inst_types_from_maps, remap_ids, type_map_from

    names = dataset.scheme.names
    cached: tuple[int, Any] | None = None
    for k, (t, y, x) in enumerate(origins):
        if cached is None or cached[0] != t:
            cached = (t, dataset[t])
        tile = cached[1]
        if tile.image is None:
            raise DatasetError(f"tile {tile.name!r} has no image; original patches need images", tile.source)
        crop = tile.crop(int(y), int(x), size, size)
        inst_map, inst_types = remap_ids(crop.inst_map, inst_types_from_maps(crop.inst_map, crop.type_map))
        counts = np.bincount(inst_types[1:], minlength=len(names) + 1)
        index = int(indices[k]) if indices is not None else k
        prov = {
            "index": index, "kind": "original", "tile": int(t), "tile_name": tile.name, "origin": [int(y), int(x)],
            "size": size, "nuclei": {name: int(counts[c]) for c, name in enumerate(names, start=1)},
        }
        yield StoreItem(index, crop.image, inst_map, type_map_from(inst_map, inst_types), prov)


def referenced_dataset(store: SyntheticStore) -> Path | None:
    """The dataset folder a store's attributes name (None if none)."""
    data = store.attrs.get("dataset") or {}
    if not data.get("path"):
        return None
    path = Path(data["path"])
    return store.path.parent / path if data.get("relative_to_store_folder") else path


def referenced_originals(store: SyntheticStore) -> Iterator[StoreItem] | None:
    """The originals a store references (re-read from its dataset), or None if it records none."""
    info = store.attrs.get("originals") or {}
    if info.get("mode") != "referenced":
        return None
    from .datasets import open_dataset

    data = store.attrs.get("dataset") or {}
    path = referenced_dataset(store)
    if path is None:
        raise StoreError(f"{store.path}: the store references originals but records no dataset path")
    try:
        dataset = open_dataset(path, store.scheme, layout=data.get("layout", "auto"))
    except (DatasetError, SchemeError) as exc:
        raise StoreError(
            f"{store.path}: cannot read the original patches it references ({exc}); "
            "re-run synthesis with --include-originals, or export with --originals skip"
        ) from None
    if list(dataset.names) != list(data.get("tiles", dataset.names)):
        raise StoreError(
            f"{store.path}: the dataset at {data['path']} no longer has the tiles the store was made from "
            f"(expected {data.get('tiles')[:5]}..., found {dataset.names[:5]}...)"
        )
    return original_patches(dataset, info["patches"], store.patch_shape[0])
