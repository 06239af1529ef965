"""QuPath GeoJSON for nuclei: label maps to FeatureCollections and back, and polygon filling.

QuPath (where pathologists review nuclei) imports and exports objects as GeoJSON. One
FeatureCollection describes one image; each nucleus is a Feature::

    {"type": "Feature",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x0, y0]]]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "epithelial", "color": [0, 158, 115]}}}

Coordinates are QuPath's: x to the right, y down, in pixels of the full image, pixel (row r,
column c) covering the square [c, c + 1] x [r, r + 1] (so its centre is (c + 0.5, r + 0.5)).
A nucleus made of several pieces becomes a MultiPolygon; holes are kept as inner rings.

Reading accepts a FeatureCollection, a bare list of features or one feature. ``detection``
and ``cell`` objects are nuclei (a cell's ``nucleusGeometry`` is used when present);
``annotation`` objects (regions drawn around tissue) are skipped. A pixel belongs to a polygon
when its centre lies inside it, so writing then reading a label map gives it back exactly.

HoVer-Net's ``json`` output (:func:`fill_polygon` with ``convention="index"``) lists contours
as the (x, y) indices of a nucleus's boundary pixels instead; those pixels belong to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .classes import ClassScheme, load_scheme
from .errors import DatasetError, SchemeError

SUFFIXES = (".geojson",)
NUCLEUS_OBJECTS = ("detection", "cell")


# -- polygons -> pixels --------------------------------------------------------------------------
def fill_polygon(xy: Any, shape: Sequence[int], *, convention: str = "corner") -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels of ``shape`` that the polygon ``xy`` (K, 2), x then y, covers.

    ``convention="corner"`` (QuPath, GeoJSON): pixels whose centre lies inside the polygon.
    ``convention="index"`` (HoVer-Net / OpenCV contours): vertices are pixel indices of the
    outline, and the outline's pixels count as inside too.
    """
    from skimage.draw import line, polygon

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if convention == "corner":
        # A pixel's centre in corner coordinates is (c + 0.5, r + 0.5): shift to centre indices.
        return polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=tuple(shape))
    if convention != "index":
        raise ValueError(f"convention must be 'corner' or 'index', got {convention!r}")
    rr, cc = polygon(xy[:, 1], xy[:, 0], shape=tuple(shape))
    pts = np.rint(xy).astype(np.int64)
    edges = [line(y0, x0, y1, x1) for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0))]
    pr = np.concatenate([e[0] for e in edges])
    pc = np.concatenate([e[1] for e in edges])
    inside = (pr >= 0) & (pr < shape[0]) & (pc >= 0) & (pc < shape[1])
    return np.concatenate([rr, pr[inside]]), np.concatenate([cc, pc[inside]])


# -- pixels -> polygons --------------------------------------------------------------------------
def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def mask_rings(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[np.ndarray]]:
    """Outline of a boolean mask as polygons ``[outer, hole, ...]`` of (x, y) vertices in QuPath
    coordinates (closed: the last vertex repeats the first); ``offset`` (y, x) places the mask.

    Vertices lie halfway between the centres of inside and outside pixels, so no pixel centre
    lies on an outline and :func:`fill_polygon` gives the mask back exactly.
    """
    from skimage.measure import approximate_polygon, find_contours, points_in_poly

    padded = np.pad(np.asarray(mask, dtype=np.float64), 1)
    rings = []
    for c in find_contours(padded, 0.5):
        if len(c) < 4:
            continue
        c = approximate_polygon(c, tolerance=0.01)  # drops the collinear half-pixel steps only
        # (row, col) in the padded crop -> x, y of pixel corners in the full image
        xy = np.stack([c[:, 1] - 1 + offset[1] + 0.5, c[:, 0] - 1 + offset[0] + 0.5], axis=1)
        rings.append(xy)
    if not rings:
        return []
    areas = [_signed_area(r) for r in rings]
    outer_sign = np.sign(areas[int(np.argmax(np.abs(areas)))])
    outers = [r for r, a in zip(rings, areas) if np.sign(a) == outer_sign]
    polygons = [[r] for r in outers]
    for r, a in zip(rings, areas):
        if np.sign(a) == outer_sign:
            continue
        for poly in polygons:  # a hole belongs to the outer ring that contains it
            if points_in_poly(r[:1], poly[0])[0]:
                poly.append(r)
                break
    return polygons


def _geometry(polygons: list[list[np.ndarray]]) -> dict[str, Any]:
    def ring(r: np.ndarray) -> list[list[float]]:
        pts = [[round(float(x), 3), round(float(y), 3)] for x, y in r]
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        return pts

    coords = [[ring(r) for r in poly] for poly in polygons]
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def feature_collection(inst_map: np.ndarray, type_map: np.ndarray, scheme: Any) -> dict[str, Any]:
    """A QuPath FeatureCollection with one detection per nucleus of the label maps (in id order);
    the class (majority of ``type_map`` within the nucleus) names its classification."""
    from scipy import ndimage

    from .nuclei import inst_types_from_maps

    scheme = load_scheme(scheme)
    inst_map = np.asarray(inst_map)
    types = inst_types_from_maps(inst_map, type_map)
    features = []
    for nid, box in enumerate(ndimage.find_objects(inst_map), start=1):
        if box is None:
            continue
        polygons = mask_rings(inst_map[box] == nid, (box[0].start, box[1].start))
        if not polygons:
            continue
        props: dict[str, Any] = {"objectType": "detection"}
        k = int(types[nid]) if nid < types.size else 0
        if k:
            props["classification"] = {"name": scheme.class_name(k), "color": list(scheme.color_rgb(k))}
        features.append({"type": "Feature", "geometry": _geometry(polygons), "properties": props})
    return {"type": "FeatureCollection", "features": features}


# -- reading -------------------------------------------------------------------------------------
def _features(data: Any, where: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        if not isinstance(data.get("features"), list):
            raise DatasetError("missing key 'features' (a FeatureCollection lists its features there)", where)
        return data["features"]
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise DatasetError("expected a GeoJSON FeatureCollection, a list of features or one Feature", where)


def _class_id(props: dict[str, Any], scheme: ClassScheme, i: int, where: str) -> int:
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls if isinstance(cls, str) else None
    if not name:
        raise DatasetError(
            f"feature {i} has no classification name; give every nucleus a class of {list(scheme.names)} "
            "(QuPath: Set class) or remove it",
            where,
        )
    try:
        return scheme.class_id(str(name))
    except SchemeError:
        raise SchemeError(
            f"{where}: feature {i} is classified {name!r}, which is not a class of scheme {scheme.name!r} "
            f"{list(scheme.names)}; pass the matching --scheme or rename the class in QuPath"
        ) from None


def labels_from_features(data: Any, shape: Sequence[int], scheme: Any, *, source: str | os.PathLike = "") -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map int32, type_map uint8)`` of ``shape`` from parsed GeoJSON: nucleus k = k-th
    nucleus feature; later features win where polygons overlap."""
    scheme = load_scheme(scheme)
    where = os.fspath(source)
    inst_map = np.zeros(tuple(shape), np.int32)
    types = [0]
    for i, feature in enumerate(_features(data, where)):
        if not isinstance(feature, dict):
            raise DatasetError(f"feature {i} is not a JSON object", where)
        props = feature.get("properties") or {}
        kind = str(props.get("objectType", "detection")).lower()
        if kind not in NUCLEUS_OBJECTS:
            continue  # annotations outline regions, not nuclei
        geometry = props.get("nucleusGeometry") if kind == "cell" and props.get("nucleusGeometry") else feature.get("geometry")
        if not isinstance(geometry, dict) or "coordinates" not in geometry:
            raise DatasetError(f"feature {i}: missing key 'geometry' with 'coordinates'", where)
        gtype = geometry.get("type")
        if gtype == "Polygon":
            polygons = [geometry["coordinates"]]
        elif gtype == "MultiPolygon":
            polygons = geometry["coordinates"]
        else:
            raise DatasetError(f"feature {i} is a {gtype}; nuclei must be Polygon or MultiPolygon outlines", where)
        k = _class_id(props, scheme, i, where)
        try:
            rings = [[np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in poly] for poly in polygons]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"feature {i}: coordinates are not lists of [x, y] points ({exc})", where) from None
        # Fill within the feature's bounding box (clipped to the image): a tile holds ~1000 nuclei.
        allpts = np.concatenate([r for poly in rings for r in poly]) if rings else np.zeros((0, 2))
        if allpts.size == 0:
            continue
        x0, y0 = max(int(np.floor(allpts[:, 0].min())), 0), max(int(np.floor(allpts[:, 1].min())), 0)
        x1, y1 = min(int(np.ceil(allpts[:, 0].max())), inst_map.shape[1]), min(int(np.ceil(allpts[:, 1].max())), inst_map.shape[0])
        if x1 <= x0 or y1 <= y0:
            continue  # outside the image
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for poly in rings:
            for j, ring in enumerate(poly):
                rr, cc = fill_polygon(ring - [x0, y0], mask.shape)
                mask[rr, cc] = j == 0  # outer ring fills, inner rings (holes) clear
        if not mask.any():
            continue  # smaller than a pixel
        types.append(k)
        inst_map[y0:y1, x0:x1][mask] = len(types) - 1
    inst_types = np.asarray(types, np.uint8)
    return inst_map, inst_types[inst_map]


def read_geojson(path: str | os.PathLike) -> Any:
    """Parsed JSON of a GeoJSON file (a DatasetError naming the file if it is not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError("GeoJSON file does not exist", path) from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read GeoJSON: {exc}", path) from None


# -- writing -------------------------------------------------------------------------------------
def export_geojson(
    tiles: Iterable[Any],
    out: str | os.PathLike,
    scheme: Any,
    *,
    inputs: Sequence[Any] = (),
    overwrite: bool = False,
    pbar: Any | None = None,
) -> Path:
    """Write one ``<name>.geojson`` FeatureCollection per tile (anything with ``name``,
    ``inst_map``, ``type_map`` and ``image``) into ``out``, its image beside it as
    ``<name>.png`` when it has one, and ``scheme.json``; QuPath opens each image with its
    nuclei, and :func:`napari_diffmix.datasets.open_dataset` reads the folder back.

    The folder appears whole or not at all; ``inputs`` are never written over and
    ``overwrite`` replaces only a dataset folder this tool wrote (marked as one).
    """
    from .atomic import atomic_dir, save_png, write_json
    from .outputs import check_replace, refuse_overlap, write_marker
    from .progress import progress_bar

    out = Path(out)
    scheme = load_scheme(scheme)
    refuse_overlap(out, inputs)
    check_replace(out, overwrite, ["dataset"])
    total = len(tiles) if hasattr(tiles, "__len__") else None  # type: ignore[arg-type]
    seen: set[str] = set()
    with atomic_dir(out) as tmp, progress_bar(pbar, total, "export geojson", unit="tile") as bar:
        for tile in tiles:
            name = str(tile.name)
            if not name or name in seen or Path(name).name != name or name.startswith("."):
                raise DatasetError(f"tile name {name!r} is empty, repeated or not a plain file name")
            seen.add(name)
            scheme.check_classes(tile.type_map, source=getattr(tile, "source", None) or name)
            write_json(tmp / f"{name}.geojson", feature_collection(tile.inst_map, tile.type_map, scheme))
            if tile.image is not None:
                save_png(tmp / f"{name}.png", tile.image)
            bar.update(1)
        if not seen:
            raise DatasetError("nothing to export: no tiles")
        scheme.save(tmp / "scheme.json")
        write_marker(tmp, "dataset", layout="geojson")
    return out
