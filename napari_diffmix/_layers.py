"""How napari-diffmix label maps live in napari layers (shared by readers, samples and widgets).

A *nuclei layer* is a 2-D ``Labels`` layer holding an ``inst_map``. The class of each nucleus
lives in the layer's ``features`` table: one row per nucleus present, columns ``index``
(instance id), ``class`` (class id of the scheme) and ``class_name``. napari shows that row in
the status bar when the cursor hovers a nucleus. The layer's ``metadata["diffmix"]`` names its
role and class scheme::

    {"role": "nuclei", "scheme": ClassScheme.to_dict()}

A *class view* is a ``Labels`` layer of the matching ``type_map`` coloured by the scheme
(``{"role": "classes", ...}``), and an image layer may carry the label maps it depicts
(``{"role": "image", "inst_map": ..., "type_map": ...}``), which is what a masked re-render
compares the current labels against.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .classes import ClassScheme, load_scheme
from .errors import LabelError, SchemeError

KEY = "diffmix"
OUTLINE_RGBA = (1.0, 1.0, 1.0, 0.55)
HIGHLIGHT_RGBA = (1.0, 1.0, 0.0, 1.0)


def info_of(layer: Any) -> dict[str, Any]:
    """The layer's napari-diffmix metadata (empty when it has none)."""
    meta = getattr(layer, "metadata", None) or {}
    info = meta.get(KEY)
    return dict(info) if isinstance(info, Mapping) else {}


def role_of(layer: Any) -> str | None:
    return info_of(layer).get("role")


def scheme_of(layer: Any) -> ClassScheme | None:
    """The class scheme recorded on a layer, or None."""
    spec = info_of(layer).get("scheme")
    if spec is None:
        return None
    try:
        return load_scheme(spec)
    except SchemeError as exc:
        raise SchemeError(f"layer {getattr(layer, 'name', '?')!r}: its recorded class scheme is invalid: {exc}") from None


def present_ids(inst_map: np.ndarray) -> np.ndarray:
    """Nucleus ids present in ``inst_map`` (sorted, background excluded)."""
    counts = np.bincount(np.asarray(inst_map).reshape(-1), minlength=1)
    counts[0] = 0
    return np.flatnonzero(counts)


def features_table(inst_map: np.ndarray, inst_types: np.ndarray, scheme: ClassScheme) -> dict[str, np.ndarray]:
    """The features columns (``index``, ``class``, ``class_name``) of the nuclei present."""
    ids = present_ids(inst_map)
    types = np.asarray(inst_types)
    classes = np.zeros(ids.size, dtype=np.int64)
    known = ids < types.size
    classes[known] = types[ids[known]]
    names = np.array(
        [scheme.class_name(int(k)) if 0 <= k <= scheme.num_classes else "invalid" for k in classes], dtype=object
    )
    return {"index": ids.astype(np.int64), "class": classes, "class_name": names}


def types_from_features(features: Any, min_len: int = 1) -> np.ndarray:
    """``inst_types`` (int32, indexed by id) from a features table with ``index`` and ``class``."""
    if features is None or len(features) == 0 or "index" not in features or "class" not in features:
        return np.zeros(max(min_len, 1), dtype=np.int32)
    ids = np.asarray(features["index"], dtype=np.int64)
    try:
        classes = np.asarray(features["class"], dtype=np.float64)
    except (TypeError, ValueError):
        raise LabelError("the nuclei layer's 'class' feature must hold class ids (integers)") from None
    if ids.size and ids.min() < 0:
        raise LabelError(f"the nuclei layer's 'index' feature holds negative ids {ids[ids < 0][:5].tolist()}")
    bad = ~np.isfinite(classes) | (np.mod(classes, 1) != 0) | (classes < 0)
    if bad.any():
        raise LabelError(f"the nuclei layer's 'class' feature holds invalid class ids {classes[bad][:5].tolist()}")
    types = np.zeros(max(min_len, int(ids.max()) + 1 if ids.size else 1), dtype=np.int32)
    types[ids] = classes.astype(np.int32)
    types[0] = 0
    return types


def rgba(color_hex: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    return (int(color_hex[1:3], 16) / 255, int(color_hex[3:5], 16) / 255, int(color_hex[5:7], 16) / 255, alpha)


def class_colormap(scheme: ClassScheme):
    """Class id -> scheme colour; background and unknown ids transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for k in scheme.class_ids:
        colors[k] = rgba(scheme.colors[k - 1])
    return DirectLabelColormap(color_dict=colors)


def outline_colormap(special: Mapping[int, tuple[float, ...]] | None = None):
    """Instance outlines in one neutral colour, with ``special`` ids (selection, brush) coloured."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {None: OUTLINE_RGBA, 0: (0.0, 0.0, 0.0, 0.0)}
    colors.update({int(k): tuple(v) for k, v in (special or {}).items()})
    return DirectLabelColormap(color_dict=colors)


def nuclei_layer_data(
    inst_map: np.ndarray, inst_types: np.ndarray, scheme: ClassScheme, name: str, **extra_meta: Any
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A layer-data tuple for a nuclei layer (see the module docstring)."""
    inst_map = np.ascontiguousarray(inst_map, dtype=np.int32)
    meta = {KEY: {"role": "nuclei", "scheme": scheme.to_dict(), **extra_meta}}
    kwargs = {
        "name": name,
        "features": features_table(inst_map, inst_types, scheme),
        "metadata": meta,
    }
    return inst_map, kwargs, "labels"


def class_layer_data(type_map: np.ndarray, scheme: ClassScheme, name: str, **extra_meta: Any) -> tuple:
    """A layer-data tuple for a class view of a ``type_map`` (or a stack of them)."""
    meta = {KEY: {"role": "classes", "scheme": scheme.to_dict(), **extra_meta}}
    kwargs = {"name": name, "colormap": class_colormap(scheme), "opacity": 0.55, "metadata": meta}
    return np.asarray(type_map), kwargs, "labels"


def image_layer_data(image: Any, name: str, **info: Any) -> tuple:
    """A layer-data tuple for an RGB image; ``info`` (e.g. the label maps it depicts) goes to metadata."""
    return image, {"name": name, "rgb": True, "metadata": {KEY: {"role": "image", **info}}}, "image"
