"""napari reader: napari-diffmix stores, CoNSeP/GLySAC ``.mat`` labels and saved label maps.

* ``*.zarr`` export store (:mod:`napari_diffmix.export`: ``images`` (N, H, W, 3) uint8,
  ``inst_maps`` (N, H, W) int32, ``type_maps`` (N, H, W) uint8, ``done``; ``attrs["scheme"]``):
  the images as an RGB stack, the class maps coloured by the scheme and the instance maps
  (hidden); included original patches as hidden layers. Arrays stay lazy (zarr reads the item
  on screen only); a store with unfinished items opens with a warning.
* CoNSeP / GLySAC ``Labels/<stem>.mat``: the tile's image (``Images/<stem>.*`` next to the
  ``Labels`` folder, or beside the file; when there is none, the nuclei open alone) and its
  nuclei, raw types merged by the scheme. The scheme is ``glysac`` when the path names GLySAC
  (or raw ids beyond CoNSeP's 1..7 occur), otherwise ``consep``.
* ``*.npz`` label maps written by this plugin's writer (``inst_map``, ``type_map``, ``scheme``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._layers import class_layer_data, image_layer_data, nuclei_layer_data
from .classes import CONSEP, GLYSAC, OKABE_ITO, ClassScheme, load_scheme
from .errors import DatasetError, SchemeError


def get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """npe2 ``get_reader``: a reader for one path this plugin understands, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.suffix.lower() == ".mat" and p.is_file() and _holds_inst_map(p):
        return read_mat
    if p.suffix.lower() == ".npz" and p.is_file() and _holds_inst_map(p):
        return read_npz
    if p.is_dir() and _is_store(p):
        return read_store
    return None


def _holds_inst_map(p: Path) -> bool:
    """Whether a .mat / .npz file has an ``inst_map`` (else it is not ours; napari asks others)."""
    try:
        if p.suffix.lower() == ".mat":
            from scipy.io import whosmat

            try:
                return any(name == "inst_map" for name, _, _ in whosmat(p))
            except NotImplementedError:  # MATLAB v7.3: reading it says how to re-save it
                return True
        with np.load(p, allow_pickle=False) as data:  # lazy: reads the archive's directory only
            return "inst_map" in data.files
    except Exception:  # unreadable here; not this reader's file
        return False


def _is_store(p: Path) -> bool:
    # A zarr v3 group has zarr.json, v2 .zgroup; ours holds inst_maps and type_maps.
    if not ((p / "zarr.json").is_file() or (p / ".zgroup").is_file()):
        return False
    return all((p / name).is_dir() for name in ("inst_maps", "type_maps"))


def _one(path: Any) -> Path:
    return Path(path[0] if isinstance(path, list) else path)


# -- zarr stores ---------------------------------------------------------------------------------
def _store_layers(store: Any, scheme: ClassScheme, stem: str, visible: bool) -> list[tuple]:
    from .export import IMAGES, INST_MAPS, TYPE_MAPS

    g, where = store.group, str(store.path)
    meta = {"diffmix": {"role": "store-nuclei", "scheme": scheme.to_dict(), "store": where}}
    image = image_layer_data(g[IMAGES], f"{stem} images", store=where)
    image[1]["visible"] = visible
    classes = class_layer_data(g[TYPE_MAPS], scheme, f"{stem} classes", store=where)
    classes[1]["visible"] = visible
    return [image, classes, (g[INST_MAPS], {"name": f"{stem} nuclei", "metadata": meta, "visible": False}, "labels")]


def read_store(path: Any) -> list[tuple]:
    """Layers of an export store: images, class maps, nuclei (and the included originals, hidden)."""
    from .export import open_store

    p = _one(path)
    store = open_store(p)
    done = store.done_mask()
    if not done.all():
        from napari.utils.notifications import show_warning

        show_warning(
            f"{p.name}: {int(done.sum())} of {done.size} items are finished (the others are blank); "
            "run the same synthesis again to complete the store"
        )
    scheme = store.scheme
    layers = _store_layers(store, scheme, p.stem, visible=True)
    originals = store.originals
    if originals is not None:
        layers += _store_layers(originals, scheme, f"{p.stem} originals", visible=False)
    return layers


# -- CoNSeP / GLySAC .mat ------------------------------------------------------------------------
def _scheme_for_mat(p: Path) -> tuple[ClassScheme, bool]:
    """(scheme, named_by_path): GLySAC if the path says so, else CoNSeP first."""
    lowered = [part.lower() for part in p.resolve().parts]
    if any("glysac" in part for part in lowered):
        return GLYSAC, True
    return CONSEP, any("consep" in part for part in lowered)


def _image_folders(p: Path) -> list[Path]:
    folders = [p.parent]
    if p.parent.name.lower() == "labels":
        folders.insert(0, p.parent.parent / "Images")
        folders.insert(1, p.parent.parent / "images")
    return folders


def _image_for_mat(p: Path) -> Path | None:
    """The tile image of a label file (CoNSeP/GLySAC keep images in Images/ beside Labels/), or None."""
    from .datasets import IMAGE_SUFFIXES

    for folder in _image_folders(p):
        for suffix in IMAGE_SUFFIXES:
            for candidate in (folder / f"{p.stem}{suffix}", folder / f"{p.stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def read_mat(path: Any) -> list[tuple]:
    """A CoNSeP/GLySAC tile: its image (when found) and its nuclei (classes merged by the scheme)."""
    from napari.utils.notifications import show_info, show_warning

    from .datasets import read_consep_tile

    p = _one(path)
    image_path = _image_for_mat(p)
    scheme, named = _scheme_for_mat(p)
    try:
        tile = read_consep_tile(image_path, p, scheme)
    except SchemeError:
        if named or scheme is GLYSAC:
            raise
        # Raw ids beyond CoNSeP's 1..7: GLySAC's 10 raw types.
        scheme = GLYSAC
        tile = read_consep_tile(image_path, p, scheme)
    if not named:
        show_warning(
            f"{p.name}: read with the {scheme.name!r} class scheme (guessed from the raw type ids); "
            "put 'consep' or 'glysac' in the path to choose."
        )
    layers = [nuclei_layer_data(tile.inst_map, tile.inst_types, scheme, f"{p.stem} nuclei", source=str(p))]
    if image_path is None:
        show_info(
            f"{p.name}: no image {p.stem}.png/.tif in {', '.join(str(f) for f in _image_folders(p))}; "
            "opened the nuclei only (CoNSeP/GLySAC keep images in Images/ beside Labels/)"
        )
        return layers
    image = image_layer_data(tile.image, f"{p.stem} H&E", inst_map=tile.inst_map, type_map=tile.type_map, source=str(p))
    return [image, *layers]


# -- .npz label maps -----------------------------------------------------------------------------
def _numbered_scheme(num_classes: int) -> ClassScheme:
    classes = [{"name": f"class {k}", "color": OKABE_ITO[(k - 1) % len(OKABE_ITO)]} for k in range(1, num_classes + 1)]
    if num_classes > len(OKABE_ITO):
        raise SchemeError(f"{num_classes} classes and no scheme in the file; save the scheme with the labels")
    return ClassScheme.from_dict({"name": "unnamed", "classes": classes})


def read_npz(path: Any) -> list[tuple]:
    """A label map saved by this plugin (``inst_map``, ``type_map``, optional ``scheme`` JSON)."""
    from .nuclei import check_consistency, inst_types_from_maps

    p = _one(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            if "inst_map" not in data.files:
                raise DatasetError(f"no 'inst_map' array (arrays in file: {sorted(data.files)})", p)
            inst_map = data["inst_map"]
            type_map = data["type_map"] if "type_map" in data.files else np.zeros_like(inst_map, dtype=np.uint8)
            spec = str(data["scheme"]) if "scheme" in data.files else None
    except DatasetError:
        raise
    except Exception as exc:  # zip/npy decoding errors of a damaged file
        raise DatasetError(f"cannot read label file: {exc}", p) from None
    if inst_map.ndim != 2 or type_map.shape != inst_map.shape:
        raise DatasetError(f"inst_map {inst_map.shape} and type_map {type_map.shape} must be one 2-D size", p)
    inst_map = inst_map.astype(np.int32)
    type_map = type_map.astype(np.uint8)
    check_consistency(inst_map, type_map, source=p)
    if spec is not None:
        try:
            scheme = load_scheme(json.loads(spec))
        except (json.JSONDecodeError, SchemeError) as exc:
            raise DatasetError(f"invalid 'scheme' entry: {exc}", p) from None
    else:
        scheme = _numbered_scheme(max(int(type_map.max()), 1))
    scheme.check_classes(type_map, source=p)
    return [nuclei_layer_data(inst_map, inst_types_from_maps(inst_map, type_map), scheme, f"{p.stem} nuclei", source=str(p))]
