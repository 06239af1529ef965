"""Measured acceptance of rendered tissue: does the model put stain where the labels say?

Two stain-based measures, computed with scikit-image's colour deconvolution (``rgb2hed``:
hematoxylin, eosin, DAB optical densities), pooled over a set of images with their label
maps and compared with the same measure on real tissue:

* **hematoxylin contrast**: mean hematoxylin inside painted nuclei / outside. A model that
  ignores the label map scores ~1; real H&E/IHC tissue scores well above.
* **ring DAB ratio**: mean DAB in a thin ring around nuclei of one class / around nuclei of
  another (for the bundled IHC demo: epithelial vs stromal, the brown epithelium). It tests
  that the model learned class-dependent surroundings, not just "dark blob here".
* **high-frequency ratio**: pixel noise of the rendered images / of the real ones (standard
  deviation of image minus its Gaussian blur, sigma 1 px). Both stain measures are ratios of
  means, which an image drowned in colour noise can still pass; this one cannot. It has a floor
  too: a blurred render (a few-step sampler that averages instead of drawing) has too little.
* **off-stain pixels**: the share of pixels whose green exceeds both red and blue by more than
  10 grey levels. Hematoxylin, eosin and DAB all absorb green at least as much as red (their
  optical densities: H 0.65/0.70/0.29, E 0.07/0.99/0.11, DAB 0.27/0.57/0.78 for R/G/B), so no
  mix of them under white light makes a pixel green; real tiles score ~0. Speckled colour noise
  that the noise ratio tolerates (a few-step student's) shows up here as green dots.

Ring means are per nucleus (each background pixel within ``width`` px belongs to its nearest
nucleus, ``skimage.segmentation.expand_labels``), then averaged over the nuclei of a class,
so large nuclei do not dominate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import LabelError

H, E, DAB = 0, 1, 2


def stains(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float optical densities: hematoxylin, eosin, DAB (``skimage.color.rgb2hed``)."""
    from skimage.color import rgb2hed

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise LabelError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    return rgb2hed(image)


def _pairs(images: Sequence[np.ndarray] | np.ndarray, inst_maps: Sequence[np.ndarray] | np.ndarray):
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images, inst_maps = [images], [inst_maps]
    if len(images) != len(inst_maps):
        raise LabelError(f"{len(images)} images but {len(inst_maps)} label maps")
    if len(images) == 0:
        raise LabelError("no images to measure")
    for img, inst in zip(images, inst_maps):
        if np.shape(img)[:2] != np.shape(inst):
            raise LabelError(f"image {np.shape(img)[:2]} and label map {np.shape(inst)} differ in size")
        yield img, np.asarray(inst)


def hematoxylin_contrast(images: Sequence[np.ndarray] | np.ndarray, inst_maps: Sequence[np.ndarray] | np.ndarray) -> float:
    """Mean hematoxylin inside nuclei / outside, pooled over all pixels of all images."""
    inside = outside = 0.0
    n_in = n_out = 0
    for img, inst in _pairs(images, inst_maps):
        h = stains(img)[..., H]
        mask = inst > 0
        inside += float(h[mask].sum())
        outside += float(h[~mask].sum())
        n_in += int(mask.sum())
        n_out += int((~mask).sum())
    if n_in == 0 or n_out == 0:
        raise LabelError("hematoxylin contrast needs both nuclei and background pixels")
    return (inside / n_in) / max(outside / n_out, 1e-12)


def ring_means(channel: np.ndarray, inst_map: np.ndarray, width: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-nucleus mean of ``channel`` over a ``width`` px ring of background around it.

    Returns ``(means, counts)`` indexed by instance id (index 0 unused; nuclei without ring
    pixels have count 0 and mean NaN).
    """
    from skimage.segmentation import expand_labels

    inst_map = np.asarray(inst_map)
    grown = expand_labels(inst_map, distance=width)
    ring = (inst_map == 0) & (grown > 0)
    ids = grown[ring]
    size = int(inst_map.max()) + 1
    counts = np.bincount(ids, minlength=size)
    sums = np.bincount(ids, weights=channel[ring], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, counts


def ring_stain_by_class(
    images: Sequence[np.ndarray] | np.ndarray,
    inst_maps: Sequence[np.ndarray] | np.ndarray,
    inst_types: Sequence[np.ndarray] | np.ndarray,
    num_classes: int,
    *,
    stain: int = DAB,
    width: int = 5,
) -> np.ndarray:
    """Mean over nuclei of each class of their ring stain: array (num_classes + 1,), NaN where
    a class has no nucleus with a ring. ``inst_types[k]`` is the class of nucleus ``k``."""
    if isinstance(inst_types, np.ndarray) and inst_types.ndim == 1:
        inst_types = [inst_types]
    per_class: list[list[float]] = [[] for _ in range(num_classes + 1)]
    for (img, inst), types in zip(_pairs(images, inst_maps), inst_types):
        means, counts = ring_means(stains(img)[..., stain], inst, width)
        types = np.asarray(types)
        ids = np.nonzero(counts)[0]
        ids = ids[ids < types.size]
        for cls in range(1, num_classes + 1):
            per_class[cls].extend(means[ids[types[ids] == cls]].tolist())
    return np.array([np.mean(v) if v else np.nan for v in per_class])


def ring_ratio(
    images, inst_maps, inst_types, num_classes: int, numerator: int, denominator: int, *, stain: int = DAB, width: int = 5
) -> float:
    """Ring stain around class ``numerator`` nuclei / around class ``denominator`` nuclei."""
    by_class = ring_stain_by_class(images, inst_maps, inst_types, num_classes, stain=stain, width=width)
    num, den = by_class[numerator], by_class[denominator]
    if np.isnan(num) or np.isnan(den):
        raise LabelError(f"the label maps need nuclei of classes {numerator} and {denominator} to compare their rings")
    return float(num / max(den, 1e-12))


def high_frequency(images: Sequence[np.ndarray] | np.ndarray, sigma: float = 1.0) -> float:
    """Mean over images and RGB channels of std(image - gaussian(image, sigma)), in grey levels."""
    from scipy import ndimage

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    values = []
    for img in images:
        img = np.asarray(img, dtype=np.float64)
        values += [float(np.std(img[..., c] - ndimage.gaussian_filter(img[..., c], sigma))) for c in range(img.shape[-1])]
    if not values:
        raise LabelError("no images to measure")
    return float(np.mean(values))


def off_stain_fraction(images: Sequence[np.ndarray] | np.ndarray, margin: int = 10) -> float:
    """Share of pixels, over all images, whose green exceeds red and blue by > ``margin``."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    off = total = 0
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3:
            raise LabelError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
        r, g, b = (img[..., c].astype(np.int16) for c in range(3))
        off += int(((g > r + margin) & (g > b + margin)).sum())
        total += r.size
    if total == 0:
        raise LabelError("no images to measure")
    return off / total


@dataclass
class QualityReport:
    """Rendered vs real figures and whether the rendered set passes the thresholds."""

    h_contrast: float
    h_contrast_real: float
    dab_ratio: float
    dab_ratio_real: float
    hf: float
    hf_real: float
    n_images: int
    n_nuclei: int
    off_stain: float
    off_stain_real: float
    min_h_fraction: float = 0.7
    min_dab_ratio: float = 2.0
    max_hf_ratio: float = 1.5
    min_hf_ratio: float = 0.5
    max_off_stain_excess: float = 0.01  # off-stain share allowed above the real tissue's

    @property
    def h_fraction(self) -> float:
        return self.h_contrast / self.h_contrast_real

    @property
    def hf_ratio(self) -> float:
        return self.hf / self.hf_real

    def failures(self) -> list[str]:
        """The criteria missed, each in words with its figure (empty: passed)."""
        checks = [
            (self.h_fraction >= self.min_h_fraction,
             f"hematoxylin contrast {self.h_fraction:.2f} x real < {self.min_h_fraction:g}"),
            (self.dab_ratio >= self.min_dab_ratio, f"ring DAB ratio {self.dab_ratio:.2f} < {self.min_dab_ratio:g}"),
            (self.hf_ratio <= self.max_hf_ratio,
             f"high-frequency noise {self.hf_ratio:.2f} x real > {self.max_hf_ratio:g}: grainier than the teacher"),
            (self.hf_ratio >= self.min_hf_ratio, f"high-frequency noise {self.hf_ratio:.2f} x real < {self.min_hf_ratio:g}: blurred"),
            (self.off_stain <= self.off_stain_real + self.max_off_stain_excess,
             f"off-stain pixels {self.off_stain:.2%} > real + {self.max_off_stain_excess:.0%}"),
        ]
        return [words for ok, words in checks if not ok]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "h_fraction": self.h_fraction, "hf_ratio": self.hf_ratio, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QualityReport":
        """The report of :meth:`to_dict` (its derived keys and any extra ones are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def table(self) -> str:
        rows = [
            ("hematoxylin in/out nuclei", f"{self.h_contrast:.2f}", f"{self.h_contrast_real:.2f}",
             f">= {self.min_h_fraction:g} x real ({self.h_fraction:.2f} x)"),
            ("ring DAB epithelial/stromal", f"{self.dab_ratio:.2f}", f"{self.dab_ratio_real:.2f}", f">= {self.min_dab_ratio:g}"),
            ("high-frequency noise (grey levels)", f"{self.hf:.1f}", f"{self.hf_real:.1f}",
             f"{self.min_hf_ratio:g}-{self.max_hf_ratio:g} x real ({self.hf_ratio:.2f} x)"),
            ("off-stain (green) pixels", f"{self.off_stain:.2%}", f"{self.off_stain_real:.2%}",
             f"<= real + {self.max_off_stain_excess:.0%}"),
        ]
        lines = ["| measure | rendered | real | required |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines.append(f"\n{self.n_images} label maps, {self.n_nuclei} nuclei; {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def acceptance(
    rendered: Sequence[np.ndarray],
    real: Sequence[np.ndarray],
    inst_maps: Sequence[np.ndarray],
    inst_types: Sequence[np.ndarray],
    num_classes: int,
    *,
    ring_classes: tuple[int, int],
    width: int = 5,
    min_h_fraction: float = 0.7,
    min_dab_ratio: float = 2.0,
    max_hf_ratio: float = 1.5,
    min_hf_ratio: float = 0.5,
    max_off_stain_excess: float = 0.01,
) -> QualityReport:
    """Compare images rendered for label maps with the real images of the same label maps."""
    kw = dict(stain=DAB, width=width)
    return QualityReport(
        h_contrast=hematoxylin_contrast(rendered, inst_maps),
        h_contrast_real=hematoxylin_contrast(real, inst_maps),
        dab_ratio=ring_ratio(rendered, inst_maps, inst_types, num_classes, *ring_classes, **kw),
        dab_ratio_real=ring_ratio(real, inst_maps, inst_types, num_classes, *ring_classes, **kw),
        hf=high_frequency(rendered),
        hf_real=high_frequency(real),
        n_images=len(rendered),
        n_nuclei=int(sum(len(np.unique(m)) - (1 if (np.asarray(m) == 0).any() else 0) for m in inst_maps)),
        off_stain=off_stain_fraction(rendered),
        off_stain_real=off_stain_fraction(real),
        min_h_fraction=min_h_fraction,
        min_dab_ratio=min_dab_ratio,
        max_hf_ratio=max_hf_ratio,
        min_hf_ratio=min_hf_ratio,
        max_off_stain_excess=max_off_stain_excess,
    )


def render_and_measure(
    model: Any,
    tiles: Sequence[Any],
    scheme: Any,
    *,
    ring_classes: tuple[int, int],
    size: int = 128,
    sampler: str = "dpm++2m",
    steps: int = 20,
    guidance: float = 3.0,
    diffusion: Any = None,
    seed: int = 0,
    pbar: Any = None,
    windows: Sequence[Any] | None = None,
) -> tuple[QualityReport, list[np.ndarray], list[Any]]:
    """Render every ``size`` px window of the tiles' label maps and measure them against the
    tiles' real images (or exactly the given ``windows``, tiles of any shape the network takes;
    ``tiles`` and ``size`` are then unused). Returns the report, the rendered images and the
    windows (tiles)."""
    import torch
    from tqdm import tqdm

    from .model.condition import condition_batch
    from .model.samplers import Sampler
    from .progress import progress_bar

    if windows is None:
        windows = [w for t in tiles for w in t.windows(size)]
    if not windows:
        raise LabelError(f"no {size} px window fits in the given tiles")
    # fp32: a measure of the model must not depend on the hardware it runs on.
    runner = Sampler(model, diffusion, precision="fp32")
    rendered = []
    with progress_bar(pbar, len(windows), "rendering") as bar:
        for i, w in enumerate(windows):
            cond = condition_batch([w.inst_map], [w.type_map], scheme.num_classes).to(runner.device)
            with torch.inference_mode():
                last = runner.generate(cond, sampler=sampler, steps=steps, guidance=guidance, seed=seed + i, pbar=tqdm(disable=True))
            rendered.append(last.images()[0])
            bar.update(1)
    report = acceptance(
        rendered, [w.image for w in windows], [w.inst_map for w in windows], [w.inst_types for w in windows],
        scheme.num_classes, ring_classes=ring_classes,
    )
    return report, rendered, windows

