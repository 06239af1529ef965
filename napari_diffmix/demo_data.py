"""The bundled demo dataset: scikit-image's IHC tile with classically derived nuclei labels.

The product runs offline, so the demo needs no download: the image is
``skimage.data.immunohistochemistry()`` (512 x 512, hematoxylin-stained nuclei in DAB-positive,
brown epithelium and in pale stroma) and only its label maps ship with the package
(``resources/demo/demo_labels.npz``). :func:`derive_demo_labels` recomputes them exactly;
``scripts/make_demo_data.py`` rewrites the shipped file and a test keeps the two identical.

Derivation (deterministic: no randomness, every threshold comes from the image itself)
--------------------------------------------------------------------------------------
1. Colour deconvolution (``skimage.color.rgb2hed``) gives hematoxylin ``H`` and DAB ``D``.
2. Nucleus score ``S = gaussian(z(H) - z(D), sigma=1.5)`` (``z`` = standardised over the
   image). Subtracting DAB keeps the brown cytoplasm of the epithelium, which also absorbs in
   the hematoxylin channel, from joining the nuclei; a global Otsu on ``H`` alone merges the
   nuclei of the epithelium into sheets.
3. Foreground = ``S`` above its local threshold (``threshold_local``, block 35 px) **and**
   ``gaussian(H, 1.5)`` above 0.8 x its Otsu threshold (the global test drops faint, bluish
   stroma that a local threshold alone would accept). Then a 1 px opening and hole filling.
4. Splitting: watershed of the negative distance transform (smoothed, sigma 1) from its
   h-maxima of depth 0.75 px. An h-maximum, unlike ``peak_local_max(min_distance=...)``,
   needs a real neck between two nuclei, so long spindle nuclei are not cut into beads.
5. Fragments under 30 px are dropped; ids are renumbered 1..N in raster order of their seeds.

Classes (``classes.DEMO``: 1 other, 2 epithelial, 3 stromal)
------------------------------------------------------------
* Ring DAB: mean ``D`` over the background pixels within 5 px (Euclidean) of the nucleus
  (pixels of other nuclei excluded). Its distribution over nuclei is bimodal (brown epithelium
  vs pale stroma); the cut is Otsu's threshold of the per-nucleus ring-DAB values.
* DAB-positive region: ``gaussian(D, sigma=8)`` above its Otsu threshold, holes filled (the
  epithelium as one sheet, nuclei included).
* epithelial (2): ring DAB >= cut, **or** at least half of the nucleus lies in the DAB-positive
  region (small nuclei wedged between epithelial nuclei have little ring of their own).
* other (1): not epithelial **and** roundish (major/minor axis ratio <= 2) **and** small
  (area <= median area of all nuclei) **and** dark (mean ``H`` >= median mean ``H`` of the
  low-DAB nuclei): lymphocyte-like nuclei in the stroma, a deliberately rare class
  (5-10 % of nuclei) so that the demo has an imbalance to fix.
* stromal (3): every other nucleus; elongated spindle nuclei of the stroma always land here.

Split
-----
:func:`demo_split` holds out the right :data:`HELD_OUT_COLUMNS` columns (x >= 384): train on
the left 512 x 384 crop, evaluate on the right 512 x 128 crop. Nuclei cut by the split line
appear partly in each crop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from .data.tiles import Dataset, Tile
from .classes import DEMO
from .errors import DatasetError
from .nuclei import remap_ids, type_map_from

DEMO_DIR = Path(__file__).resolve().parent / "resources" / "demo"
DEMO_LABELS = DEMO_DIR / "demo_labels.npz"
DEMO_NAME = "ihc-demo"
DEMO_SOURCE = "skimage.data.immunohistochemistry"
HELD_OUT_COLUMNS = 128

# Segmentation parameters (see the module docstring; measured on this image, DESIGN.md §7).
SMOOTH_SIGMA = 1.5
LOCAL_BLOCK = 35
GLOBAL_FRACTION = 0.8
DIST_SIGMA = 1.0
SPLIT_DEPTH = 0.75
MIN_AREA = 30
# Classification parameters.
RING_WIDTH = 5
REGION_SIGMA = 8.0
OTHER_MAX_ELONGATION = 2.0

OTHER, EPITHELIAL, STROMAL = (DEMO.class_id(n) for n in ("other", "epithelial", "stromal"))


@dataclass(frozen=True)
class DemoFeatures:
    """Per-nucleus measurements behind the classes (row ``i`` = nucleus ``i + 1``).

    ``in_region`` is the fraction of the nucleus inside the DAB-positive region.
    """

    area: np.ndarray
    elongation: np.ndarray
    mean_h: np.ndarray
    ring_dab: np.ndarray
    in_region: np.ndarray
    dab_cut: float


class DemoSplit(NamedTuple):
    """Train and held-out crops of the demo tile."""

    train: Tile
    held_out: Tile


# -- derivation --------------------------------------------------------------------------------
def demo_image() -> np.ndarray:
    """The demo image, ``skimage.data.immunohistochemistry()`` (shipped with scikit-image)."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry(), dtype=np.uint8)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DatasetError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 2 * LOCAL_BLOCK:
        raise DatasetError(f"image {image.shape[:2]} is too small for the demo derivation (at least {2 * LOCAL_BLOCK} px a side)")
    return image


def _stains(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import rgb2hed

    hed = rgb2hed(image)
    return hed[..., 0], hed[..., 2]


def _standardise(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / max(float(a.std()), 1e-12)


def segment_nuclei(image: np.ndarray) -> np.ndarray:
    """Instance map (int32, ids 1..N) of the hematoxylin nuclei; steps 1-5 of the module docstring."""
    from skimage import filters, morphology, segmentation

    h, d = _stains(_check_image(image))
    score = filters.gaussian(_standardise(h) - _standardise(d), sigma=SMOOTH_SIGMA)
    h_smooth = filters.gaussian(h, sigma=SMOOTH_SIGMA)
    fg = score > filters.threshold_local(score, block_size=LOCAL_BLOCK)
    fg &= h_smooth > GLOBAL_FRACTION * filters.threshold_otsu(h_smooth)
    fg = ndimage.binary_fill_holes(morphology.opening(fg, morphology.disk(1)))
    dist = filters.gaussian(ndimage.distance_transform_edt(fg), sigma=DIST_SIGMA)
    markers, _ = ndimage.label(morphology.h_maxima(dist, SPLIT_DEPTH))
    inst = segmentation.watershed(-dist, markers, mask=fg)
    areas = np.bincount(inst.ravel())
    keep = areas >= MIN_AREA
    keep[0] = False
    inst = np.where(keep[inst], inst, 0)
    inst, _ = remap_ids(inst.astype(np.int32))
    return inst


def _ring_means(inst_map: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """Mean of ``values`` over background pixels within ``width`` px of each nucleus (ids 1..N)."""
    n = int(inst_map.max())
    out = np.zeros(n)
    yy, xx = np.mgrid[-width : width + 1, -width : width + 1]
    disk = yy**2 + xx**2 <= width**2
    background = inst_map == 0
    h, w = inst_map.shape
    for i, sl in enumerate(ndimage.find_objects(inst_map), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - width, 0), min(sl[0].stop + width, h)
        x0, x1 = max(sl[1].start - width, 0), min(sl[1].stop + width, w)
        own = inst_map[y0:y1, x0:x1] == i
        ring = ndimage.binary_dilation(own, structure=disk) & background[y0:y1, x0:x1]
        out[i - 1] = values[y0:y1, x0:x1][ring].mean() if ring.any() else 0.0
    return out


def demo_features(image: np.ndarray, inst_map: np.ndarray) -> DemoFeatures:
    """Area, elongation, mean hematoxylin, ring DAB and DAB-region share of nuclei 1..N."""
    from skimage import filters, measure

    h, d = _stains(_check_image(image))
    n = int(inst_map.max())
    if n == 0:
        e = np.zeros(0)
        return DemoFeatures(e, e, e, e, e, 0.0)
    flat = inst_map.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    mean_h = np.bincount(flat, weights=h.ravel(), minlength=n + 1)[1:] / area
    axes = measure.regionprops_table(inst_map, properties=("axis_major_length", "axis_minor_length"))
    elongation = axes["axis_major_length"] / np.maximum(axes["axis_minor_length"], 1.0)
    ring_dab = _ring_means(inst_map, d, RING_WIDTH)
    cut = float(filters.threshold_otsu(ring_dab)) if np.ptp(ring_dab) > 0 else float(ring_dab[0])
    d_smooth = filters.gaussian(d, sigma=REGION_SIGMA)
    region = ndimage.binary_fill_holes(d_smooth > filters.threshold_otsu(d_smooth))
    in_region = np.bincount(flat, weights=region.ravel(), minlength=n + 1)[1:] / area
    return DemoFeatures(area, elongation, mean_h, ring_dab, in_region, cut)


def classify_nuclei(features: DemoFeatures) -> np.ndarray:
    """``inst_types`` (int32, index = id) from the rules in the module docstring."""
    f = features
    types = np.zeros(f.area.size + 1, dtype=np.int32)
    if f.area.size == 0:
        return types
    epithelial = (f.ring_dab >= f.dab_cut) | (f.in_region >= 0.5)
    low = ~epithelial
    dark_cut = np.median(f.mean_h[low]) if low.any() else np.inf
    other = low & (f.elongation <= OTHER_MAX_ELONGATION) & (f.area <= np.median(f.area)) & (f.mean_h >= dark_cut)
    types[1:] = np.where(epithelial, EPITHELIAL, np.where(other, OTHER, STROMAL))
    return types


def derive_demo_labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inst_map int32, type_map uint8)`` for an IHC image; the same output on every run."""
    inst_map = segment_nuclei(image)
    inst_types = classify_nuclei(demo_features(image, inst_map))
    return inst_map, type_map_from(inst_map, inst_types)


# -- shipped files -------------------------------------------------------------------------------
def image_digest(image: np.ndarray) -> str:
    """SHA-256 of the image's shape and bytes: ties the shipped labels to the pixels they describe."""
    image = np.ascontiguousarray(image)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


def write_demo_labels(path: str | os.PathLike = DEMO_LABELS, image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Derive the demo labels and write them (compressed npz, atomically) to ``path``."""
    from .atomic import atomic_path

    image = demo_image() if image is None else image
    inst_map, type_map = derive_demo_labels(image)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            # uint16 ids halve the file; the loader widens them back to int32.
            np.savez_compressed(
                fh,
                inst_map=inst_map.astype(np.uint16),
                type_map=type_map,
                image_sha256=np.array(image_digest(image)),
            )
    # mkstemp creates 0600 files; a shipped resource must be readable by every user.
    os.chmod(path, 0o644)
    _shipped_labels.cache_clear()
    return inst_map, type_map


@lru_cache(maxsize=1)
def _shipped_labels(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            inst_map = z["inst_map"].astype(np.int32)
            type_map = z["type_map"].astype(np.uint8)
            digest = str(z["image_sha256"])
    except FileNotFoundError:
        raise DatasetError("the bundled demo labels are missing; regenerate them with scripts/make_demo_data.py", path) from None
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"cannot read the bundled demo labels ({exc}); regenerate them with scripts/make_demo_data.py", path) from None
    inst_map.setflags(write=False)
    type_map.setflags(write=False)
    return inst_map, type_map, digest


def load_demo_labels(path: str | os.PathLike = DEMO_LABELS) -> tuple[np.ndarray, np.ndarray]:
    """The shipped ``(inst_map, type_map)`` (fresh, writable copies)."""
    inst_map, type_map, _ = _shipped_labels(os.fspath(path))
    return inst_map.copy(), type_map.copy()


def load_demo_tile(path: str | os.PathLike = DEMO_LABELS) -> Tile:
    """The demo tile: skimage's IHC image with the shipped labels (scheme ``classes.DEMO``)."""
    inst_map, type_map, digest = _shipped_labels(os.fspath(path))
    image = demo_image()
    if image.shape[:2] != inst_map.shape or image_digest(image) != digest:
        raise DatasetError(
            f"scikit-image's immunohistochemistry image {image.shape} is not the one the demo labels "
            "were derived from; regenerate them with scripts/make_demo_data.py",
            path,
        )
    return Tile(name=DEMO_NAME, image=image, inst_map=inst_map.copy(), type_map=type_map.copy(), source=DEMO_SOURCE)


def demo_dataset() -> "Dataset":
    """The demo as a one-tile :class:`~napari_diffmix.Dataset` with scheme ``DEMO``."""
    return Dataset([load_demo_tile()], DEMO, root=DEMO_DIR, layout="demo")


def demo_split() -> DemoSplit:
    """Train crop (all rows, columns 0..383) and held-out crop (columns 384..511) of the demo tile.

    The crops keep the tile's instance ids and are named ``ihc-demo-train`` / ``ihc-demo-heldout``.
    """
    tile = load_demo_tile()
    h, w = tile.shape
    cut = w - HELD_OUT_COLUMNS
    train = replace(tile.crop(0, 0, h, cut), name=f"{DEMO_NAME}-train")
    held_out = replace(tile.crop(0, cut, h, HELD_OUT_COLUMNS), name=f"{DEMO_NAME}-heldout")
    return DemoSplit(train, held_out)


def demo_canvases(size: int = 256) -> dict[str, list[Tile]]:
    """Whole canvases the model cards measure at the plugin's size: ``"tile"``, the demo tile's
    four ``size`` x ``size`` windows; ``"held_out"``, the held-out columns as ``size`` x 128 ones."""
    tile, held_out = load_demo_tile(), demo_split().held_out
    return {"tile": tile.windows(size),
            "held_out": [held_out.crop(y, 0, size, held_out.shape[1]) for y in range(0, held_out.shape[0] - size + 1, size)]}


def demo_split_dataset() -> "Dataset":
    """:func:`demo_split` as a two-tile Dataset (train first, held-out second), scheme ``DEMO``."""
    return Dataset(list(demo_split()), DEMO, root=DEMO_DIR, layout="demo")
