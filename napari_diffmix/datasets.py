"""Datasets of every layout: :func:`open_dataset` (which detects the layout), patch grids and
per-class statistics. This is the package's public entry to its data; each layout's reader
lives in :mod:`napari_diffmix.data` (the tiles themselves in :mod:`napari_diffmix.data.tiles`):

========== ============================================ =========================================
layout     what                                         reader
========== ============================================ =========================================
consep     CoNSeP / GLySAC releases (``Images``,        :func:`~napari_diffmix.data.consep.read_consep`
           ``Labels/*.mat``)
generic    this package's own folders                   :func:`~napari_diffmix.data.generic.read_generic`
           (:func:`write_generic`)
pannuke    stacked ``.npy`` arrays (PanNuke folds)      :func:`~napari_diffmix.data.pannuke.read_pannuke`
hovernet   HoVer-Net ``run_infer`` predictions          :func:`~napari_diffmix.data.hovernet.read_hovernet`
lizard     the Lizard release                           :func:`~napari_diffmix.data.lizard.read_lizard`
conic      CoNIC patches (``images.npy``,               :func:`~napari_diffmix.data.lizard.read_conic`
           ``labels.npy``)
geojson    QuPath GeoJSON with images                   :func:`~napari_diffmix.data.qupath.read_geojson_folder`
========== ============================================ =========================================

The path ``"demo"`` opens the bundled demo tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .classes import ClassScheme, load_scheme
from .data.consep import read_consep, read_consep_labels, read_consep_tile
from .data.files import IMAGE_SUFFIXES, LABEL_SUFFIXES, child_dir, find_one, image_problem, image_size, mat_keys, read_image
from .data.generic import read_generic, write_generic
from .data.hovernet import read_hovernet, read_hovernet_json_labels
from .data.lizard import is_lizard_mat, read_conic, read_lizard
from .data.pannuke import read_pannuke
from .data.qupath import read_geojson_folder
from .data.tiles import Dataset, Tile, tile_labels
from .errors import DatasetError, LabelError, SchemeError
from .progress import progress_bar

# The public names of the data layer, gathered here so that callers need one import.
__all__ = [
    "LAYOUTS", "IMAGE_SUFFIXES", "LABEL_SUFFIXES", "Dataset", "Tile", "DatasetStats", "TileStats", "class_counts",
    "dataset_stats", "detect_layout", "image_problem", "image_size", "mat_keys", "open_dataset", "patch_grid",
    "read_conic", "read_consep", "read_consep_labels", "read_consep_tile", "read_generic", "read_geojson_folder",
    "read_hovernet", "read_hovernet_json_labels", "read_image", "read_lizard", "read_pannuke", "tile_labels",
    "tile_stats", "write_generic",
]


LAYOUTS = ("consep", "generic", "pannuke", "hovernet", "lizard", "conic", "geojson")


def _first_mat(folder: Path) -> Path | None:
    mats = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".mat" and not p.name.startswith("."))
    return mats[0] if mats else None


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
    labels = child_dir(root, "labels")
    if child_dir(root, "images") and labels and any(p.suffix.lower() == ".mat" for p in labels.iterdir()):
        return "lizard" if is_lizard_mat(_first_mat(labels)) else "consep"
    if child_dir(root, "inst_maps") or child_dir(root, "type_maps"):
        return "generic"
    if labels and any(p.suffix.lower() == ".npz" for p in labels.iterdir()):
        return "generic"
    if (root / "inst_maps.npy").is_file() or (root / "type_maps.npy").is_file() or find_one(root, "masks.npy"):
        return "pannuke"
    if root.name.lower() == "labels" and child_dir(root.parent, "images") and _first_mat(root) is not None:
        # Ground truth, not a folder of predictions: its raw types need the CoNSeP/GLySAC merge.
        raise DatasetError(f"point at the folder that holds Images and Labels: {root.parent}", root)
    if find_one(root, "labels.npy", 1):
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
        return "lizard" if is_lizard_mat(mat) else "hovernet"
    nested = [d for d in entries if d.is_dir() and "label" in d.name.lower()]
    for d in nested:
        inner = [d, *(p for p in d.iterdir() if p.is_dir())]
        if any(is_lizard_mat(_first_mat(x)) for x in inner):
            return "lizard"  # Lizard_Labels/Labels/*.mat beside Lizard_Images1/
    if child_dir(root, "images") and labels:
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
