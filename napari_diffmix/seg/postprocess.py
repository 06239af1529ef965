"""HoVer-Net's post-processing: NP + HV maps -> nuclei instances, TP map -> their classes.

Marker-controlled watershed (Graham et al. 2019, ``__proc_np_hv``):

1. foreground = NP probability >= 0.5, connected components smaller than 10 px dropped;
2. HV maps min-max scaled to [0, 1], differentiated with a 21-tap Sobel filter (x for the
   horizontal map, y for the vertical one); each derivative is min-max scaled and inverted,
   so nucleus boundaries (where the maps jump from +1 back to -1) are high;
3. energy ``E = max(Sx, Sy)`` on the foreground; markers = foreground where ``E < 0.4``,
   holes filled, opened with a 5x5 ellipse, components under 10 px dropped;
4. watershed of ``-blur((1 - E) * foreground)`` from the markers inside the foreground.

One addition: a foreground component left without any marker (a small or thin nucleus
whose marker the opening erased) becomes one instance instead of vanishing.

The Sobel filter is built like OpenCV's ``getDerivKernels`` (binomial smoothing across,
binomial-of-differences along) with reflect-101 borders, so no OpenCV is needed.

Classes: the majority of the per-pixel TP argmax over each instance, background votes
ignored (HoVer-Net picks the runner-up when background wins). An instance whose every
pixel voted background takes the class with the largest summed probability, so every
nucleus has a class 1..C and ``type_map == inst_types[inst_map]`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.special import comb
from skimage.segmentation import watershed

from ..errors import LabelError
from ..nuclei import inst_types_from_maps, remap_ids, type_map_from

# OpenCV's MORPH_ELLIPSE 5x5 structuring element.
_ELLIPSE5 = np.array(
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool
)


@dataclass(frozen=True)
class PostprocessConfig:
    """HoVer-Net's published settings (for 40x tiles); scale ``sobel_ksize`` with magnification."""

    threshold: float = 0.5
    marker_threshold: float = 0.4
    sobel_ksize: int = 21
    min_size: int = 10

    def __post_init__(self) -> None:
        if self.sobel_ksize < 3 or self.sobel_ksize % 2 == 0:
            raise ValueError(f"sobel_ksize must be odd and >= 3, got {self.sobel_ksize}")
        if not 0 < self.threshold < 1 or not 0 < self.marker_threshold < 1:
            raise ValueError("threshold and marker_threshold must lie in (0, 1)")


def _binomial(n: int) -> np.ndarray:
    return comb(n - 1, np.arange(n)).astype(np.float64)


def sobel(image: np.ndarray, axis: int, ksize: int = 21) -> np.ndarray:
    """First derivative along ``axis`` (1 = x, 0 = y) with an OpenCV-style ``ksize`` Sobel kernel."""
    deriv = np.convolve(_binomial(ksize - 1), [1.0, -1.0])  # convolve flips: [-1, ..., +1] as correlation
    smooth = _binomial(ksize)
    out = ndi.correlate1d(image.astype(np.float64), deriv[::-1], axis=axis, mode="mirror")
    return ndi.correlate1d(out, smooth, axis=1 - axis, mode="mirror")


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=np.float64)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(labels.reshape(-1))
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def instances_from_np_hv(np_prob: np.ndarray, hv: np.ndarray, config: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """int32 instance map (ids 1..N) from the foreground probability (H, W) and HV maps (2, H, W)."""
    np_prob = np.asarray(np_prob, dtype=np.float64)
    hv = np.asarray(hv, dtype=np.float64)
    if np_prob.ndim != 2 or hv.shape != (2, *np_prob.shape):
        raise LabelError(f"expected NP (H, W) and HV (2, H, W) maps, got {np_prob.shape} and {hv.shape}")
    fg_labels, _ = ndi.label(np_prob >= config.threshold)
    fg_labels = _drop_small(fg_labels, config.min_size)
    fg = fg_labels > 0
    if not fg.any():
        return np.zeros(np_prob.shape, dtype=np.int32)
    sx = 1.0 - _minmax(sobel(_minmax(hv[0]), axis=1, ksize=config.sobel_ksize))
    sy = 1.0 - _minmax(sobel(_minmax(hv[1]), axis=0, ksize=config.sobel_ksize))
    energy = np.maximum(sx, sy) * fg
    # sigma 0.8 over a 3x3 support is what OpenCV's GaussianBlur((3, 3), 0) uses.
    dist = -ndi.gaussian_filter((1.0 - energy) * fg, sigma=0.8, truncate=1.25, mode="mirror")
    marker = fg & (energy < config.marker_threshold)
    marker = ndi.binary_fill_holes(marker)
    marker = ndi.binary_opening(marker, structure=_ELLIPSE5)
    markers, _ = ndi.label(marker)
    markers = _drop_small(markers, config.min_size)
    inst = watershed(dist, markers, mask=fg).astype(np.int64)
    # A foreground blob whose marker the opening erased (small or thin nuclei) would vanish
    # in HoVer-Net; it becomes one nucleus instead.
    seeded = np.zeros(fg_labels.max() + 1, dtype=bool)
    seeded[fg_labels[inst > 0]] = True
    orphan = fg & ~seeded[fg_labels]
    inst[orphan] = fg_labels[orphan] + inst.max()
    return remap_ids(inst.astype(np.int32))[0]


def instance_types(inst_map: np.ndarray, tp_prob: np.ndarray) -> np.ndarray:
    """Class per instance (indexed by id, 0 for background) from TP probabilities (C + 1, H, W)."""
    tp_prob = np.asarray(tp_prob)
    if tp_prob.ndim != 3 or tp_prob.shape[1:] != inst_map.shape or tp_prob.shape[0] < 2:
        raise LabelError(f"expected TP probabilities (C + 1, H, W) for maps {inst_map.shape}, got {tp_prob.shape}")
    inst_types = inst_types_from_maps(inst_map, np.argmax(tp_prob, axis=0).astype(np.uint8))
    ids = np.arange(inst_types.size)
    undecided = (inst_types == 0) & (ids > 0)
    undecided &= np.bincount(inst_map.reshape(-1), minlength=inst_types.size) > 0
    if undecided.any():
        flat = inst_map.reshape(-1)
        sums = np.stack(
            [np.bincount(flat, weights=tp_prob[c].reshape(-1), minlength=inst_types.size) for c in range(1, tp_prob.shape[0])],
            axis=1,
        )
        inst_types[undecided] = np.argmax(sums[undecided], axis=1) + 1
    return inst_types


def postprocess(
    np_prob: np.ndarray, hv: np.ndarray, tp_prob: np.ndarray, config: PostprocessConfig = PostprocessConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map int32, type_map uint8) from the three branch outputs of one tile."""
    inst_map = instances_from_np_hv(np_prob, hv, config)
    inst_types = instance_types(inst_map, tp_prob)
    return inst_map, type_map_from(inst_map, inst_types)
