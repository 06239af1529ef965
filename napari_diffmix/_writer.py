"""napari writer: a nuclei layer as an ``.npz`` label map (``inst_map``, ``type_map``, ``scheme``).

The type map is rebuilt from the layer's per-nucleus classes (its ``features``), the scheme
is stored as JSON, and the file appears whole or not at all. The plugin's reader (and
``datasets.open_dataset`` for a ``labels/`` folder of such files) reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import KEY, types_from_features
from .atomic import atomic_path
from .errors import LabelError
from .nuclei import type_map_from


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers; returns the written path."""
    p = Path(path)
    if p.suffix.lower() != ".npz":
        p = p.with_name(p.name + ".npz")
    inst_map = np.asarray(data)
    if inst_map.ndim != 2:
        raise LabelError(f"{p}: only 2-D label maps can be saved as .npz, this layer is {inst_map.ndim}-D {inst_map.shape}")
    if inst_map.size and inst_map.min() < 0:
        raise LabelError(f"{p}: label maps hold ids >= 0, this layer has negative labels")
    inst_map = inst_map.astype(np.int32)
    top = int(inst_map.max()) if inst_map.size else 0
    types = types_from_features(meta.get("features"), top + 1)
    type_map = type_map_from(inst_map, types)
    arrays = {"inst_map": inst_map, "type_map": type_map}
    scheme = ((meta.get("metadata") or {}).get(KEY) or {}).get("scheme")
    if scheme is not None:
        arrays["scheme"] = np.array(json.dumps(scheme))
    with atomic_path(p, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return [str(p)]
