"""Procedural H&E-like phantoms with exact labels, for tests, benchmarks and demos.

:func:`make_phantom` places nuclei of ``num_classes`` classes on eosin-pink fibrous tissue and
renders the image *from the final label maps*, so the labels are exact by construction: every
purple pixel that belongs to a nucleus is in ``inst_map``, and ``type_map ==
inst_types[inst_map]``. Same arguments and seed give identical arrays.

Class appearance (archetype ``(k - 1) % 4`` for class ``k``; classes 5.. repeat the archetypes
12 % larger per round and a little paler, so every class still looks different)::

    1  small round dark       lymphocyte-like, semi-axis ~6 px
    2  large pale oval        epithelial-like, semi-axis ~11 px, vesicular chromatin, pink cytoplasm
    3  elongated spindle      fibroblast-like, ~14 x 4 px, aligned with the collagen fibres
    4  medium irregular       semi-axis ~8.5 px, lobed outline

With three classes this matches the demo scheme (1 other, 2 epithelial, 3 stromal).

Placement: each class gets its share of ``n_nuclei`` (largest-remainder rounding of
``class_probs``), candidates are drawn uniformly outside small lumens and accepted in random
order unless they crowd an accepted nucleus. Nuclei may touch and overlap slightly; the draw
order is the occlusion order (later nuclei cover earlier ones). A nucleus left in several
pieces keeps its largest piece, and one left with less than half of its area is dropped, so a
crowded tile can hold a few fewer nuclei than asked. Ids are 1..N in draw order.

Everything is vectorised: nuclei are rasterised together in one (N, W, W) window stack and
the texture fields are FFT / Gaussian filters, so a 1000 x 1000 phantom with ~1000 nuclei
takes a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .classes import DEMO, OKABE_ITO, ClassScheme
from .datasets import Dataset, Tile
from .errors import DatasetError, SchemeError
from .nuclei import instance_edges, remap_ids, type_map_from

# Nuclei per pixel of tissue when ``n_nuclei`` is None: ~1000 on a 1000 x 1000 tile, as in CoNSeP.
DEFAULT_DENSITY = 1.0e-3
# Accepted nuclei keep their equal-area radii at least this fraction of their sum apart.
MIN_SEPARATION = 0.85
MIN_VISIBLE = 0.5
LUMEN_LEVEL = -1.6  # lumens where the standardised tissue field falls below this (~5 % of the tile)
_CHUNK = 256
MIN_SIDE = 8

# Beer-Lambert optical densities (R, G, B) of hematoxylin and eosin: the reference H&E stain
# vectors commonly used for Macenko normalisation (purple-blue nuclei, pink stroma).
_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
_STAINS = (_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class NucleusStyle:
    """Shape and stain of one nucleus class. Sizes are in pixels (semi-axes)."""

    name: str
    semi_major: float
    semi_major_sd: float
    aspect: tuple[float, float]  # minor / major axis ratio, drawn uniformly
    wobble: float  # outline irregularity (relative amplitude of angular harmonics 2..4)
    hematoxylin: float  # optical density of the nucleus
    chromatin: float  # relative amplitude of the chromatin texture
    cytoplasm: float  # eosin added in a halo around the nucleus
    follows_fibres: bool = False

    def scaled(self, round_: int) -> "NucleusStyle":
        """The archetype for classes beyond the first four: larger and paler per round."""
        if round_ == 0:
            return self
        s = 1.0 + 0.12 * round_
        return NucleusStyle(
            f"{self.name} {round_ + 1}",
            self.semi_major * s,
            self.semi_major_sd * s,
            self.aspect,
            self.wobble,
            max(0.45, self.hematoxylin * (1.0 - 0.1 * round_)),
            self.chromatin,
            self.cytoplasm,
            self.follows_fibres,
        )


ARCHETYPES = (
    NucleusStyle("small round dark", 6.0, 0.7, (0.8, 1.0), 0.04, 1.45, 0.10, 0.0),
    NucleusStyle("large pale oval", 11.0, 1.5, (0.6, 0.85), 0.05, 0.75, 0.35, 0.55),
    NucleusStyle("spindle", 14.0, 2.5, (0.22, 0.34), 0.03, 1.1, 0.15, 0.0, follows_fibres=True),
    NucleusStyle("medium irregular", 8.5, 1.1, (0.65, 0.9), 0.14, 1.15, 0.22, 0.15),
)


def class_style(k: int) -> NucleusStyle:
    """Appearance of class ``k`` (1-based)."""
    if k < 1:
        raise SchemeError(f"class ids start at 1, got {k}")
    base = ARCHETYPES[(k - 1) % len(ARCHETYPES)]
    return base.scaled((k - 1) // len(ARCHETYPES))


def phantom_scheme(num_classes: int) -> ClassScheme:
    """The class scheme of phantoms: ``classes.DEMO`` for 3 classes, else the archetype names."""
    if num_classes == DEMO.num_classes:
        return DEMO
    names = tuple(class_style(k).name for k in range(1, num_classes + 1))
    return ClassScheme(name="phantom", names=names, colors=_distinct_colors(num_classes), rare=(1,))


def _distinct_colors(n: int) -> tuple[str, ...]:
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    import colorsys

    # Golden-angle hues with alternating lightness stay distinct for any n up to 254.
    cols = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 + 0.2 * (i % 3) / 2, 0.75)
        cols.append("#{:02X}{:02X}{:02X}".format(*(int(round(255 * c)) for c in (r, g, b))))
    for i in range(n):  # a collision of 8-bit colours is possible in principle; nudge it away
        while cols[i] in cols[:i] or cols[i] == "#000000":
            v = int(cols[i][1:], 16) + 1
            cols[i] = f"#{v % 0xFFFFFF:06X}"
    return tuple(cols)


# -- random fields ---------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised Gaussian random field with correlation length ~``sigma`` px (periodic, via FFT)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    spectrum = np.fft.rfft2(noise) * np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _fine_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised Gaussian-filtered noise; wide fields are made at reduced size and upsampled."""
    step = max(1, int(sigma // 1.5))
    if step == 1:
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    else:
        small = tuple(-(-n // step) + 1 for n in shape)
        field = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / step)
        field = ndimage.zoom(field, step, order=1, grid_mode=False)[: shape[0], : shape[1]]
    std = float(field.std())
    return field / (std if std > 0 else 1.0)


@dataclass(frozen=True)
class _Tissue:
    lumen_level: np.ndarray  # standardised tissue field; lumen where < LUMEN_LEVEL
    stream: np.ndarray  # fibres run along the level lines of this field
    grad: tuple[np.ndarray, np.ndarray]


def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> _Tissue:
    level = _smooth_noise(rng, shape, 0.06 * max(shape) + 8)
    corr = 0.05 * max(shape) + 10
    stream = _smooth_noise(rng, shape, corr)
    # A ramp as steep as the field's own typical slope makes the fibres run as wavy parallel
    # bundles in one main direction instead of closing into fingerprint loops.
    angle = rng.uniform(0.0, math.pi)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    stream += (np.cos(angle) * yy + np.sin(angle) * xx).astype(np.float32) * (1.2 / corr)
    gy, gx = np.gradient(stream)
    return _Tissue(level, stream, (gy, gx))


# -- placement -------------------------------------------------------------------------------------
def _quotas(n: int, probs: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``n * probs`` (sums to ``n`` exactly)."""
    raw = n * probs
    q = np.floor(raw).astype(np.int64)
    rest = n - int(q.sum())
    if rest:
        order = np.lexsort((np.arange(probs.size), -(raw - q)))
        q[order[:rest]] += 1
    return q


def _check_args(height, width, n_nuclei, class_probs, num_classes, seed) -> tuple[int, int, np.ndarray]:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise DatasetError(f"phantom size must be integers, got {height!r} x {width!r}") from None
    if h != height or w != width or min(h, w) < MIN_SIDE:
        raise DatasetError(f"phantom size must be integers of at least {MIN_SIDE} px a side, got {height!r} x {width!r}")
    if not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes <= 254:
        raise SchemeError(f"num_classes must be an integer 1..254, got {num_classes!r}")
    if n_nuclei is not None and (not isinstance(n_nuclei, (int, np.integer)) or n_nuclei < 0):
        raise DatasetError(f"n_nuclei must be a non-negative integer or None, got {n_nuclei!r}")
    if class_probs is None:
        probs = np.full(num_classes, 1.0 / num_classes)
    else:
        probs = np.asarray(class_probs, dtype=np.float64).reshape(-1)
        if probs.size != num_classes:
            raise SchemeError(f"class_probs has {probs.size} entries but num_classes is {num_classes}")
        if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.sum() <= 0:
            raise SchemeError(f"class_probs must be non-negative with a positive sum, got {probs.tolist()}")
        probs = probs / probs.sum()
    return h, w, probs


def _place(
    rng: np.random.Generator, shape: tuple[int, int], tissue: _Tissue, quotas: np.ndarray
) -> dict[str, np.ndarray]:
    """Centres, classes and shape parameters of accepted nuclei, in draw order."""
    from scipy.spatial import cKDTree

    h, w = shape
    styles = [class_style(k) for k in range(1, quotas.size + 1)]
    # More candidates than could ever fit only add conflicts: cap at 4 tiles' worth per class.
    fits = np.array([4.0 * h * w / (math.pi * s.semi_major**2 * s.aspect[0]) for s in styles])
    n_cand = np.minimum(4 * quotas + 8, np.ceil(fits).astype(np.int64)) * (quotas > 0)
    cls = np.repeat(np.arange(1, quotas.size + 1), n_cand)
    m = cls.size
    if m == 0:
        return {"cls": cls, "cy": np.zeros(0), "cx": np.zeros(0), "a": np.zeros(0), "b": np.zeros(0), "theta": np.zeros(0)}
    # Candidates in lumens are moved by redrawing; a couple of rounds leave almost none.
    cy, cx = rng.uniform(0, h, m), rng.uniform(0, w, m)
    for _ in range(3):
        bad = tissue.lumen_level[cy.astype(int), cx.astype(int)] < LUMEN_LEVEL
        if not bad.any():
            break
        cy[bad], cx[bad] = rng.uniform(0, h, bad.sum()), rng.uniform(0, w, bad.sum())
    mean = np.array([s.semi_major for s in styles])[cls - 1]
    sd = np.array([s.semi_major_sd for s in styles])[cls - 1]
    lo = np.array([s.aspect[0] for s in styles])[cls - 1]
    hi = np.array([s.aspect[1] for s in styles])[cls - 1]
    a = np.clip(rng.normal(mean, sd), 0.6 * mean, 1.5 * mean)
    b = np.maximum(a * rng.uniform(lo, hi), 1.2)
    theta = rng.uniform(0.0, math.pi, m)
    fib = np.array([s.follows_fibres for s in styles])[cls - 1]
    if fib.any():
        iy, ix = cy[fib].astype(int), cx[fib].astype(int)
        gy, gx = tissue.grad[0][iy, ix], tissue.grad[1][iy, ix]
        theta[fib] = np.arctan2(gx, -gy) + rng.normal(0.0, 0.15, fib.sum())

    order = rng.permutation(m)
    radius = np.sqrt(a * b)
    pts = np.stack([cy, cx], axis=1)
    pairs = cKDTree(pts).query_pairs(2.0 * MIN_SEPARATION * float(radius.max()), output_type="ndarray")
    close = np.hypot(*(pts[pairs[:, 0]] - pts[pairs[:, 1]]).T) < MIN_SEPARATION * (radius[pairs[:, 0]] + radius[pairs[:, 1]])
    pairs = pairs[close]
    neighbours: list[list[int]] = [[] for _ in range(m)]
    for i, j in pairs.tolist():
        neighbours[i].append(j)
        neighbours[j].append(i)
    accepted = np.zeros(m, dtype=bool)
    left = quotas.copy()
    chosen = []
    for i in order.tolist():  # greedy in random order: one cheap check per candidate
        k = cls[i] - 1
        if left[k] == 0 or any(accepted[j] for j in neighbours[i]):
            continue
        accepted[i] = True
        left[k] -= 1
        chosen.append(i)
        if not left.any():
            break
    idx = np.array(chosen, dtype=np.int64)
    return {"cls": cls[idx], "cy": cy[idx], "cx": cx[idx], "a": a[idx], "b": b[idx], "theta": theta[idx]}


def _rasterise(rng: np.random.Generator, shape: tuple[int, int], nuc: dict[str, np.ndarray]) -> np.ndarray:
    """inst_map with ids 1..N in draw order; a later nucleus covers an earlier one."""
    h, w = shape
    inst = np.zeros(h * w, dtype=np.int32)
    n = nuc["cls"].size
    if n == 0:
        return inst.reshape(h, w)
    wob = np.array([class_style(k).wobble for k in range(1, int(nuc["cls"].max()) + 1)])[nuc["cls"] - 1]
    harmonics = np.arange(2, 5, dtype=np.float32)
    amp = (wob[:, None] * rng.normal(0.0, 1.0, (n, 3)) / harmonics[None, :] * 2.0).astype(np.float32)
    phase = rng.uniform(0.0, 2.0 * math.pi, (n, 3)).astype(np.float32)
    reach = int(math.ceil(float((nuc["a"] * (1.0 + 3.0 * wob)).max()))) + 1
    off = np.arange(-reach, reach + 1, dtype=np.int64)
    drawn = np.zeros(n + 1, dtype=np.int64)
    for lo in range(0, n, _CHUNK):  # bounded memory: one (chunk, W, W) window stack at a time
        c = slice(lo, min(lo + _CHUNK, n))
        # Window pixel (i, j) of a nucleus sits at (floor(cy) + off[i], floor(cx) + off[j]).
        py = np.floor(nuc["cy"][c]).astype(np.int64)[:, None] + off[None, :]
        px = np.floor(nuc["cx"][c]).astype(np.int64)[:, None] + off[None, :]
        dy = (py + 0.5 - nuc["cy"][c, None]).astype(np.float32)[:, :, None]
        dx = (px + 0.5 - nuc["cx"][c, None]).astype(np.float32)[:, None, :]
        cos = np.cos(nuc["theta"][c]).astype(np.float32)[:, None, None]
        sin = np.sin(nuc["theta"][c]).astype(np.float32)[:, None, None]
        u = (dx * cos + dy * sin) / nuc["a"][c].astype(np.float32)[:, None, None]
        v = (dy * cos - dx * sin) / nuc["b"][c].astype(np.float32)[:, None, None]
        angle = np.arctan2(v, u)
        outline = 1.0 + sum(
            amp[c, q, None, None] * np.cos(harmonics[q] * angle + phase[c, q, None, None]) for q in range(3)
        )
        inside = (u * u + v * v) <= outline * outline
        inside &= ((py >= 0) & (py < h))[:, :, None] & ((px >= 0) & (px < w))[:, None, :]
        k, i, j = np.nonzero(inside)
        ids = (k + lo + 1).astype(np.int32)
        np.maximum.at(inst, py[k, i] * w + px[k, j], ids)
        drawn += np.bincount(ids, minlength=n + 1)
    return _tidy(inst.reshape(h, w), drawn)


def _tidy(inst: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Keep each nucleus's largest connected piece; drop nuclei with < MIN_VISIBLE of their area left."""
    from skimage.measure import label

    pieces = label(inst, background=0, connectivity=1)
    owner = np.zeros(int(pieces.max()) + 1, dtype=np.int64)
    owner[pieces.ravel()] = inst.ravel()
    size = np.bincount(pieces.ravel(), minlength=owner.size)
    size[0] = 0
    # Largest piece per owner: sort by (owner, size) and take the last of each owner run.
    order = np.lexsort((size, owner))
    last = np.ones(order.size, dtype=bool)
    last[:-1] = owner[order[:-1]] != owner[order[1:]]
    best = order[last]
    keep_piece = np.zeros(owner.size, dtype=bool)
    visible = np.zeros(drawn.size, dtype=np.int64)
    visible[owner[best]] = size[best]
    ok = visible >= MIN_VISIBLE * np.maximum(drawn, 1)
    keep_piece[best] = ok[owner[best]]
    keep_piece[0] = False
    return np.where(keep_piece[pieces], inst, 0).astype(np.int32)


# -- rendering -------------------------------------------------------------------------------------
def render_tissue(inst_map: np.ndarray, inst_types: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Procedural H&E image (uint8 RGB) for any label map, nuclei styled by class (see module doc).

    A stand-in renderer where no trained model is needed: the pixels follow the labels
    exactly. Same labels and seed give the same image.
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise DatasetError(f"inst_map must be 2-D, got shape {inst_map.shape}")
    rng = np.random.default_rng([int(seed), 2])
    return _render(inst_map, np.asarray(inst_types), rng, _tissue(rng, inst_map.shape))


def _render(inst_map: np.ndarray, inst_types: np.ndarray, rng: np.random.Generator, tissue: _Tissue) -> np.ndarray:
    shape = inst_map.shape
    type_map = type_map_from(inst_map, inst_types)
    styles = [class_style(k) for k in range(1, max(int(type_map.max()), 1) + 1)]
    dark, chrom, cyto = (np.array([0.0, *(getattr(s, f) for s in styles)], np.float32) for f in ("hematoxylin", "chromatin", "cytoplasm"))
    nuclei = inst_map > 0
    f32 = np.float32

    # Stroma: eosin in wavy collagen bands along the level lines of the stream field.
    g = np.hypot(tissue.grad[0][::4, ::4], tissue.grad[1][::4, ::4])
    freq = f32(1.0 / (6.0 * max(float(np.median(g)), 1e-6)))
    # Phase noise breaks the bands into fibres of uneven width that split and end.
    phase = f32(1.5) * _fine_noise(rng, shape, 6.0)
    bands = np.square(f32(0.5) + f32(0.5) * np.sin(f32(2.0 * math.pi) * freq * tissue.stream + phase))
    # One fine field serves as stroma grain outside nuclei and as chromatin inside them.
    fine = _fine_noise(rng, shape, 0.8)
    tissue_mask = np.clip((tissue.lumen_level - f32(LUMEN_LEVEL)) / f32(0.35), f32(0.0), f32(1.0))
    eosin = tissue_mask * (f32(0.22) + f32(0.32) * bands * (f32(0.8) + f32(0.2) * fine) + f32(0.05) * _fine_noise(rng, shape, 3.0))
    # Cytoplasm: an eosin halo around nuclei of classes that have one.
    halo = ndimage.gaussian_filter(cyto[type_map], 4.0)
    eosin += f32(0.45) * np.clip(f32(2.0) * halo, f32(0.0), f32(1.0)) * tissue_mask
    hema = tissue_mask * (f32(0.05) + f32(0.015) * fine)
    # Nuclei: class darkness with chromatin texture and a darker rim along the nuclear membrane.
    rim = np.clip(f32(2.0) * ndimage.gaussian_filter((instance_edges(inst_map) & nuclei).astype(f32), 1.0), f32(0.0), f32(1.0))
    nuc_h = dark[type_map] * (f32(1.0) + chrom[type_map] * f32(0.6) * fine) * (f32(1.0) + f32(0.35) * rim)
    hema = np.where(nuclei, np.maximum(nuc_h, f32(0.1)), hema)
    eosin = np.where(nuclei, f32(0.08), eosin)
    # Optics: slight blur, Beer-Lambert absorption, sensor noise.
    hema = ndimage.gaussian_filter(hema, 0.6)
    eosin = ndimage.gaussian_filter(eosin, 0.6)
    od = hema[..., None] * _STAINS[0] + eosin[..., None] * _STAINS[1]
    rgb = f32(250.0) * np.exp(-od) + rng.standard_normal((*shape, 1), dtype=f32) * f32(2.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# -- public API -------------------------------------------------------------------------------------
def make_phantom(
    height: int,
    width: int,
    *,
    n_nuclei: int | None = None,
    class_probs: Sequence[float] | None = None,
    num_classes: int = 3,
    seed: int = 0,
) -> Tile:
    """A procedural H&E-like :class:`~napari_diffmix.datasets.Tile` with exact labels.

    ``n_nuclei`` defaults to ~1 per 1000 px of tissue; ``class_probs`` (length
    ``num_classes``, normalised) to uniform. The tile may hold a few fewer nuclei than asked
    when the tissue is crowded (see the module docstring), never more.
    """
    h, w, probs = _check_args(height, width, n_nuclei, class_probs, num_classes, seed)
    rng = np.random.default_rng([int(seed), 0])
    tissue = _tissue(rng, (h, w))
    if n_nuclei is None:
        area = float(np.count_nonzero(tissue.lumen_level >= LUMEN_LEVEL))
        n_nuclei = int(round(DEFAULT_DENSITY * area))
    quotas = _quotas(int(n_nuclei), probs)
    nuc = _place(rng, (h, w), tissue, quotas)
    inst = _rasterise(rng, (h, w), nuc)
    types = np.zeros(nuc["cls"].size + 1, dtype=np.int32)
    types[1:] = nuc["cls"]
    inst, types = remap_ids(inst, types)
    image = _render(inst, types, np.random.default_rng([int(seed), 1]), tissue)
    return Tile(
        name=f"phantom-{h}x{w}-s{seed}",
        image=image,
        inst_map=inst,
        type_map=type_map_from(inst, types),
        source=f"phantom(height={h}, width={w}, n_nuclei={n_nuclei}, num_classes={num_classes}, seed={seed})",
    )


def make_phantom_dataset(
    n_tiles: int,
    size: int | tuple[int, int] = 256,
    *,
    n_nuclei: int | None = None,
    class_probs: Sequence[float] | None = None,
    num_classes: int = 3,
    seed: int = 0,
) -> Dataset:
    """An in-memory :class:`~napari_diffmix.datasets.Dataset` of ``n_tiles`` phantoms.

    Tile ``i`` uses a seed derived from ``seed`` and ``i`` (different ``seed`` values give
    unrelated tiles); the scheme is :func:`phantom_scheme`. ``size`` is one side or
    ``(height, width)``.
    """
    if not isinstance(n_tiles, (int, np.integer)) or n_tiles < 0:
        raise DatasetError(f"n_tiles must be a non-negative integer, got {n_tiles!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    hw = (size, size) if np.isscalar(size) else tuple(size)
    if len(hw) != 2:
        raise DatasetError(f"size must be one side or (height, width), got {size!r}")
    h, w = hw
    seeds = np.random.SeedSequence(int(seed)).generate_state(int(n_tiles), dtype=np.uint32)
    tiles = []
    for i, s in enumerate(seeds.tolist()):
        t = make_phantom(h, w, n_nuclei=n_nuclei, class_probs=class_probs, num_classes=num_classes, seed=s)
        t.name = f"phantom-{i:04d}"
        tiles.append(t)
    return Dataset(tiles, phantom_scheme(num_classes), layout="phantom")
