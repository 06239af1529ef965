"""napari reader: napari-diffmix stores, labelled ``.mat`` files, HoVer-Net JSON, QuPath GeoJSON, saved label maps.

* ``*.zarr`` export store (:mod:`napari_diffmix.store`: ``images`` (N, H, W, 3) uint8,
  ``inst_maps`` (N, H, W) int32, ``type_maps`` (N, H, W) uint8, ``done``; ``attrs["scheme"]``):
  the images as an RGB stack, the class maps coloured by the scheme and the instance maps
  (hidden); included original patches as hidden layers. Arrays stay lazy (zarr reads the item
  on screen only); a store with unfinished items opens with a warning. Other zarr folders are
  handed to napari's own reader, so choosing this plugin for ``*.zarr`` is safe.
* ``.mat`` labels: CoNSeP / GLySAC ``Labels/<stem>.mat`` (raw types merged by the scheme:
  ``glysac`` when the path names GLySAC or raw ids beyond CoNSeP's 1..7 occur, else ``consep``),
  Lizard (``id`` + ``class``: the ``lizard`` scheme) and HoVer-Net ``run_infer`` predictions
  (``inst_uid``: the model's classes, in the scheme the path names, else numbered classes).
* HoVer-Net ``json/<stem>.json`` predictions (``nuc`` with contours); the tile's size comes from
  its image, ``mat/<stem>.mat`` or ``overlay/<stem>.png``.
* QuPath ``*.geojson``: detections by class name, in ``scheme.json`` beside the file, the scheme
  the path names, or else the classes (and QuPath colours) the file uses.
* ``*.npz`` label maps written by this plugin's writer (``inst_map``, ``type_map``, ``scheme``).

A file's image opens with it when it is beside it: ``Images/<stem>.*`` next to ``Labels``, the
same folder, the run_infer output folder above ``mat/`` / ``json/``, or an ``images`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._layers import class_layer_data, image_layer_data, nuclei_layer_data
from .classes import CONSEP, GLYSAC, LIZARD, OKABE_ITO, ClassScheme, load_scheme, scheme_named_by_path
from .errors import DatasetError, SchemeError


def get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """npe2 ``get_reader``: a reader for one path this plugin understands, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".mat" and p.is_file() and _holds_inst_map(p):
        return read_mat
    if suffix == ".npz" and p.is_file() and _holds_inst_map(p):
        return read_npz
    if suffix == ".geojson" and p.is_file():
        return read_geojson_file
    if suffix == ".json" and p.is_file() and _is_hovernet_json(p):
        return read_hovernet_json
    if p.is_dir() and _is_store(p):
        return read_store
    if p.is_dir() and suffix == ".zarr":
        return _napari_zarr_reader(p)
    return None


def _napari_zarr_reader(p: Path) -> Callable[[Any], list[tuple]] | None:
    """napari's own reader for a zarr folder that is not a store: a user who made this plugin
    the reader for ``*.zarr`` still opens OME-Zarr and plain arrays."""
    try:
        from napari_builtins.io import napari_get_reader
    except ImportError:  # napari without its builtins: nothing to hand over to
        return None
    return napari_get_reader(str(p))


def _is_hovernet_json(p: Path) -> bool:
    """Whether a .json file is HoVer-Net's (``{"mag": ..., "nuc": {...}}``): its head names ``nuc``."""
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith("{") and '"nuc"' in head


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
def _store_layers(store: Any, scheme: ClassScheme, stem: str, visible: bool, rows: Any = None) -> list[tuple]:
    """Images, classes and nuclei of ``store``; ``rows``: show these items of it, in this order
    (the originals aligned with the synthetic items made from them)."""
    from .store import IMAGES, INST_MAPS, TYPE_MAPS, RowsView

    g, where = store.group, str(store.path)

    def stack(name: str) -> Any:
        return g[name] if rows is None else RowsView(g[name], rows)

    meta = {"diffmix": {"role": "store-nuclei", "scheme": scheme.to_dict(), "store": where}}
    image = image_layer_data(stack(IMAGES), f"{stem} images", store=where)
    image[1]["visible"] = visible
    classes = class_layer_data(stack(TYPE_MAPS), scheme, f"{stem} classes", store=where)
    classes[1]["visible"] = visible
    return [image, classes, (stack(INST_MAPS), {"name": f"{stem} nuclei", "metadata": meta, "visible": False}, "labels")]


def read_store(path: Any) -> list[tuple]:
    """Layers of an export store: images, class maps, nuclei, and, hidden, the included original
    patch of each item at the same slider position (one stack as long as the synthetic one)."""
    from .store import open_store

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
        layers += _store_layers(originals, scheme, f"{p.stem} originals", visible=False, rows=store.original_index())
    return layers


# -- .mat labels, HoVer-Net and QuPath files ------------------------------------------------------
def _scheme_for_mat(p: Path) -> tuple[ClassScheme, bool]:
    """(scheme, named_by_path): the scheme a folder on the path names, else CoNSeP (not named)."""
    named = scheme_named_by_path(p)
    return (named, True) if named is not None else (CONSEP, False)


def _image_folders(p: Path) -> list[Path]:
    """Where a label file's image may be: Images/ beside Labels/, its own folder, the run_infer
    output folder above mat/ or json/, and folders named like images up to two levels up."""
    parent, grand = p.parent, p.parent.parent
    folders = []
    if parent.name.lower() == "labels":
        folders += [grand / "Images", grand / "images"]
    folders.append(parent)
    if parent.name.lower() in ("mat", "json"):
        folders += [grand, grand / "images", grand / "Images", grand / "imgs"]
    for base in (grand, grand.parent):
        if base.is_dir():
            folders += sorted(d for d in base.iterdir() if d.is_dir() and "image" in d.name.lower() and d not in folders)
    return folders


def _image_for_mat(p: Path) -> Path | None:
    """The tile image of a label file (see :func:`_image_folders`), or None."""
    from .datasets import IMAGE_SUFFIXES

    for folder in _image_folders(p):
        for suffix in IMAGE_SUFFIXES:
            for candidate in (folder / f"{p.stem}{suffix}", folder / f"{p.stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _prediction_scheme(p: Path, top_class: int) -> tuple[ClassScheme, bool]:
    """A prediction's classes: the scheme the path names, else numbered classes 1..top."""
    named = scheme_named_by_path(p)
    return (named, True) if named is not None else (_numbered_scheme(max(top_class, 1)), False)


def _tile_layers(p: Path, tile: Any, scheme: ClassScheme, image_path: Path | None, *, guessed: str | None = None) -> list[tuple]:
    from napari.utils.notifications import show_info, show_warning

    if guessed:
        show_warning(f"{p.name}: {guessed}")
    layers = [nuclei_layer_data(tile.inst_map, tile.inst_types, scheme, f"{p.stem} nuclei", source=str(p))]
    if tile.image is None:
        show_info(
            f"{p.name}: no image {p.stem}.png/.tif in {', '.join(str(f) for f in _image_folders(p))}; opened the nuclei only"
        )
        return layers
    image = image_layer_data(tile.image, f"{p.stem} H&E", inst_map=tile.inst_map, type_map=tile.type_map, source=str(p))
    return [image, *layers]


def read_mat(path: Any) -> list[tuple]:
    """A labelled tile (CoNSeP/GLySAC, Lizard or a HoVer-Net prediction): its image when found, and its nuclei."""
    from .datasets import mat_keys, read_consep_tile

    p = _one(path)
    image_path = _image_for_mat(p)
    keys = mat_keys(p)
    guessed = None
    if "id" in keys and "class" in keys:
        scheme = LIZARD  # Lizard's class ids are its own six classes
        tile = read_consep_tile(image_path, p, scheme)
    elif "inst_uid" in keys:  # HoVer-Net run_infer output: classes as the model gives them
        from scipy.io import loadmat

        types = loadmat(p, variable_names=["inst_type"]).get("inst_type", np.zeros(0))
        scheme, named = _prediction_scheme(p, int(np.max(types, initial=0)))
        if not named:
            guessed = (f"a HoVer-Net prediction with classes 1..{scheme.num_classes}, shown as numbered classes; "
                       "put the dataset's name (consep, glysac, lizard) in the path to name them")
        tile = read_consep_tile(image_path, p, scheme)
    else:
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
            guessed = (f"read with the {scheme.name!r} class scheme (guessed from the raw type ids); "
                       "put 'consep' or 'glysac' in the path to choose.")
    return _tile_layers(p, tile, scheme, image_path, guessed=guessed)


def _hovernet_size(p: Path, image: np.ndarray | None) -> tuple[int, int]:
    from .datasets import IMAGE_SUFFIXES, image_size, mat_keys

    if image is not None:
        return image.shape[:2]
    mat = p.parent.parent / "mat" / f"{p.stem}.mat"
    if mat.is_file() and "inst_map" in mat_keys(mat):
        from scipy.io import loadmat

        return loadmat(mat, variable_names=["inst_map"])["inst_map"].shape[:2]
    for suffix in IMAGE_SUFFIXES:
        size = image_size(p.parent.parent / "overlay" / f"{p.stem}{suffix}")
        if size is not None:
            return size
    raise DatasetError(
        f"HoVer-Net .json carries no image size; expected the image ({p.stem}.png) beside it, "
        f"mat/{p.stem}.mat or overlay/{p.stem}.png in {p.parent.parent}", p,
    )


def read_hovernet_json(path: Any) -> list[tuple]:
    """A HoVer-Net ``json/<stem>.json`` prediction: its image when found, and its nuclei."""
    from .datasets import Tile, read_hovernet_json_labels, read_image

    p = _one(path)
    image_path = _image_for_mat(p)
    image = read_image(image_path) if image_path is not None else None
    try:
        nuc = json.loads(p.read_text(encoding="utf-8")).get("nuc") or {}
    except (OSError, ValueError, AttributeError):
        nuc = {}  # the reader below says what is wrong
    top = max((int(v.get("type") or 0) for v in nuc.values() if isinstance(v, dict)), default=0)
    scheme, named = _prediction_scheme(p, top)
    inst_map, type_map = read_hovernet_json_labels(p, _hovernet_size(p, image), scheme)
    tile = Tile(p.stem, image, inst_map, type_map, source=str(p))
    guessed = None if named else (
        f"a HoVer-Net prediction with classes 1..{scheme.num_classes}, shown as numbered classes; "
        "put the dataset's name (consep, glysac, lizard) in the path to name them"
    )
    return _tile_layers(p, tile, scheme, image_path, guessed=guessed)


def _geojson_scheme(p: Path, data: Any) -> ClassScheme:
    """scheme.json beside the file, the scheme the path names, or the classes the file uses (in order)."""
    saved = p.parent / "scheme.json"
    if saved.is_file():
        return load_scheme(saved)
    named = scheme_named_by_path(p)
    if named is not None:
        return named
    features = data.get("features", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    classes: dict[str, str] = {}
    for f in features:
        props = (f.get("properties") or {}) if isinstance(f, dict) else {}
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else cls
        if not isinstance(name, str) or not name or name.lower() in (k.lower() for k in classes):
            continue
        color = cls.get("color") if isinstance(cls, dict) else None
        hexcol = "#%02X%02X%02X" % tuple(int(v) for v in color[:3]) if isinstance(color, list) and len(color) >= 3 else None
        if hexcol is None or hexcol in classes.values() or hexcol == "#000000":
            hexcol = next(c for c in [*OKABE_ITO, "#FFFFFF"] if c not in classes.values())
        classes[name] = hexcol
    if not classes:
        raise DatasetError("no classified detections, and no scheme.json beside the file to name the classes", p)
    return ClassScheme.from_dict({"name": p.stem, "classes": [{"name": n, "color": c} for n, c in classes.items()]})


def read_geojson_file(path: Any) -> list[tuple]:
    """A QuPath GeoJSON file with its image (same stem, beside it or in ``images/``) and its nuclei."""
    from .datasets import Tile, read_image
    from .geojson import labels_from_features, read_geojson

    p = _one(path)
    data = read_geojson(p)
    scheme = _geojson_scheme(p, data)
    image_path = _image_for_mat(p)
    if image_path is None:
        raise DatasetError(
            f"GeoJSON carries no image size; expected its image {p.stem}.png or .tif in "
            f"{', '.join(str(f) for f in _image_folders(p))}", p,
        )
    image = read_image(image_path)
    inst_map, type_map = labels_from_features(data, image.shape[:2], scheme, source=p)
    return _tile_layers(p, Tile(p.stem, image, inst_map, type_map, source=str(p)), scheme, image_path)


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
