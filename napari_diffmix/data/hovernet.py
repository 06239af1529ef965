"""The ``hovernet`` layout: HoVer-Net ``run_infer`` predictions (``mat/`` and/or ``json/`` folders,
images optional), see :func:`read_hovernet`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError, SchemeError
from .files import (
    IMAGE_SUFFIXES, file_check, files_by_stem, image_size, loadmat, mat_keys, natural_key,
)
from .consep import read_consep_labels
from .tiles import Dataset, Tile, as_labels


def read_hovernet_json_labels(json_path: str | os.PathLike, shape: Sequence[int], scheme: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map, type_map)`` of shape ``shape`` from a HoVer-Net ``run_infer`` ``json/<stem>.json``.

    The file holds ``{"mag": ..., "nuc": {"<id>": {"bbox": [[rmin, cmin], [rmax, cmax]],
    "centroid": [x, y], "contour": [[x, y], ...], "type": k, "type_prob": p}}}``; each contour
    (pixel indices of the outline, x first) is filled with its nucleus id, outline included.
    ``type`` is the model's class (used as it is; 0 or null = unclassed).
    """
    from ..geojson import fill_polygon

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
        files = files_by_stem(folder, (suffix,))
        if files:
            return files, sub
    for suffix, kind in ((".mat", "mat"), (".json", "json")):  # a folder of either, under another name
        files = files_by_stem(root, (suffix,))
        if files:
            return files, kind
    raise DatasetError("a HoVer-Net output folder needs mat/*.mat or json/*.json (run_infer's output), or .mat or .json files", root)


def _lists_ids(path: Path) -> bool:
    keys = mat_keys(path)
    return "inst_uid" in keys or "id" in keys


def _mat_as_classes(path: Path, scheme: ClassScheme) -> tuple[np.ndarray, np.ndarray]:
    """A prediction ``.mat`` in CoNSeP's keys whose types are already the scheme's classes (no merge)."""
    identity = ClassScheme(scheme.name, scheme.names, scheme.colors)  # raw id k -> class k
    return read_consep_labels(path, identity)


def read_hovernet(root: str | os.PathLike, scheme: Any) -> Dataset:
    """Predictions without images: HoVer-Net ``run_infer`` output (the output folder, its ``mat/``
    or its ``json/``) or any folder of ``.mat`` label files. Classes are the model's, used as they
    are (``scheme`` must be the one the model was trained with). ``.json`` files carry no image
    size: it comes from ``mat/<stem>.mat``, ``overlay/<stem>.png`` or the tile's image beside them."""
    root = Path(root)
    scheme = load_scheme(scheme)
    files, kind = _hovernet_sources(root)
    names = sorted(files, key=natural_key)
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
                size = as_labels(loadmat(candidate)["inst_map"], "inst_map", np.int32, os.fspath(candidate)).shape
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

    return Dataset.lazy(names, load, scheme, root=root, layout="hovernet", image_check=file_check(names, beside))
