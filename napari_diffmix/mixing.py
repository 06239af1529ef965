"""Virtual label maps: balancing (rare-class insertion), enlarging (nucleus shifts), balanced-set plans.

Balancing map (GradMix-style, one per tile; :func:`balance_map`)
----------------------------------------------------------------
1. Nuclei whose centroid lies within ``border`` (30) px of the tile edge are neither targets
   nor donors.
2. Targets: a random ``target_fraction`` (80 %, ``int(0.8 * n)``) of the eligible major-class
   nuclei, processed smallest (area) first.
3. Donors: eligible rare-class nuclei, from the same tile first (by id), then from the other
   tiles of the donor pool in a random tile order (by id within a tile). Every donor is used
   at most once per balanced tile. A target takes the first unused donor that fits: the
   target's mask dilated by ``dilation`` (2) px (4-connected steps, as
   ``scipy.ndimage.binary_dilation(iterations=2)``) has an area of at least ``fit_ratio``
   (2.3) times the donor's area. No fit: the target is kept as it is.
4. Edit: the target's pixels become background and the donor mask is drawn with its
   centroid on the target's centroid (rounded to whole pixels; the published script centres
   the donor's bounding box instead, which shifts lopsided nuclei off the target), keeping
   the target's id, with the rare class. The donor masks are the original nuclei (a
   same-tile donor stays where it is as well).
   Edits are applied together with :func:`napari_diffmix.nuclei.draw_nuclei`: all accepted
   targets are lifted first, then the donors are drawn in processing order, so a larger
   target's donor covers a smaller one's where they overlap; covered neighbours lose those
   pixels and vanish if nothing is left (the occlusion rule of ``nuclei.py``).

Several rare classes: :func:`balance_map` takes them rarest first (plans rank the scheme's
or the given rare classes by nuclei count with ``classes.rank_by_scarcity``) and they share
the targets in turn. Target after target, the class whose turn it
is gets the target if one of its donors fits; otherwise the next class in rank order is
tried. The turn passes to the class after the one that was served, so successful edits
alternate between the rare classes as long as each has donors that fit.

Enlarging map (per patch; :func:`enlarge_map`)
----------------------------------------------
Nuclei touching the outer ``band`` (32) px stay. Every other nucleus gets an integer shift
drawn uniformly from ``shift_range`` (inclusive, default -15..14) along y, applied with
``probability`` (0.3), and independently along x. All shifts happen at once: the shifted
nuclei are lifted from the map (their old pixels become background) and redrawn with their
full shape, in id order, on top of everything else; the occlusion rule decides overlaps.

Balanced sets (:func:`plan_balanced_set`, :func:`make_item`)
------------------------------------------------------------
A :class:`Plan` lists patches to synthesise: (tile, patch origin on the
``datasets.patch_grid``, maps to apply, seeds). Balancing is done per whole tile (border
rule on the tile, as published) and the patch is cut from the balanced tile; tiles are
balanced once per *variant* with a seed derived from (plan seed, tile, variant), so patches
of one tile share a balanced tile. Enlarging uses the item's own seed, derived from (plan
seed, item index). Any item is rebuilt from the plan and its index alone
(:func:`make_item`); a :class:`MixCache` avoids recomputing shared work across items.

Counts in plans are nuclei per patch, summed over patches (a nucleus in several overlapping
patches counts once per patch): the unit the segmentation network trains on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from .classes import ClassScheme, load_scheme, rank_by_scarcity
from .datasets import patch_grid, tile_labels
from .errors import DatasetError, LabelError, SchemeError
from .nuclei import (
    NucleiBank,
    NucleiProps,
    draw_nuclei,
    nuclei_bboxes,
    nuclei_props,
    nucleus_masks,
    remap_ids,
    type_map_from,
)
from .progress import progress_bar

BALANCE = "balance"
ENLARGE = "enlarge"
MAP_NAMES = (BALANCE, ENLARGE)
PLAN_FORMAT = "diffmix-label-plan-1"
# Seed-derivation domains, so tile and item streams never coincide.
_BALANCE_STREAM = 1
_ITEM_STREAM = 2
_ROUND_EPS = 1e-7  # same rounding as nuclei.py: x.5 goes up even after float noise


# -- parameters ----------------------------------------------------------------------------------
def _int_param(value: Any, name: str, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (lo is not None and value < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise LabelError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def _float_param(value: Any, name: str, lo: float, hi: float | None = None, *, open_lo: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or (open_lo and v == lo) or (hi is not None and v > hi):
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi if hi is not None else 'inf'}]"
        raise LabelError(f"{name} must lie in {rng}, got {value!r}")
    return v


@dataclass(frozen=True)
class BalanceParams:
    """Balancing-map rules; defaults are the published GradMix/DiffMix values."""

    border: int = 30  # px: nuclei with a centroid this close to the tile edge are left alone
    target_fraction: float = 0.8  # share of eligible major nuclei drawn as targets
    dilation: int = 2  # px the target mask grows before the fit test
    fit_ratio: float = 2.3  # dilated target area >= fit_ratio * donor area

    def __post_init__(self) -> None:
        object.__setattr__(self, "border", _int_param(self.border, "border", 0))
        object.__setattr__(self, "target_fraction", _float_param(self.target_fraction, "target_fraction", 0.0, 1.0))
        object.__setattr__(self, "dilation", _int_param(self.dilation, "dilation", 0))
        object.__setattr__(self, "fit_ratio", _float_param(self.fit_ratio, "fit_ratio", 0.0, None, open_lo=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EnlargeParams:
    """Enlarging-map rules; defaults are the published DiffMix values."""

    band: int = 32  # px: nuclei touching this outer band stay
    shift_range: tuple[int, int] = (-15, 14)  # inclusive integer shift range per axis
    probability: float = 0.3  # chance that a nucleus shifts along an axis (independently per axis)

    def __post_init__(self) -> None:
        object.__setattr__(self, "band", _int_param(self.band, "band", 0))
        try:
            lo, hi = self.shift_range
        except (TypeError, ValueError):
            raise LabelError(f"shift_range must be a pair (low, high), got {self.shift_range!r}") from None
        lo, hi = _int_param(lo, "shift_range low"), _int_param(hi, "shift_range high")
        if lo > hi:
            raise LabelError(f"shift_range low must not exceed high, got ({lo}, {hi})")
        object.__setattr__(self, "shift_range", (lo, hi))
        object.__setattr__(self, "probability", _float_param(self.probability, "probability", 0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shift_range"] = list(self.shift_range)
        return d


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _round(v: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5 + _ROUND_EPS).astype(np.int64)


def _classed_props(inst_map: np.ndarray, inst_types: Any, where: str) -> NucleiProps:
    props = nuclei_props(inst_map, inst_types)
    unclassed = props.ids[props.classes == 0]
    if unclassed.size:
        raise LabelError(f"{where}: {unclassed.size} nuclei have class 0 (ids {unclassed[:10].tolist()}); every nucleus needs a class")
    return props


def _away_from_border(props: NucleiProps, shape: tuple[int, int], border: int) -> np.ndarray:
    h, w = shape
    cy, cx = props.centroids[:, 0], props.centroids[:, 1]
    return (cy >= border) & (cy <= h - border) & (cx >= border) & (cx <= w - border)


def _class_tuple(classes: int | Iterable[int], what: str) -> tuple[int, ...]:
    items = (classes,) if isinstance(classes, (int, np.integer)) else tuple(classes)
    out = []
    for k in items:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 254:
            raise SchemeError(f"{what} must be class ids 1..254, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    return tuple(out)


# -- donor pool ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DonorPool:
    """Eligible donor nuclei of one or more tiles: masks (a :class:`NucleiBank` whose
    ``sources`` are tile indices), their ids in their tiles and local centroids."""

    bank: NucleiBank
    ids: np.ndarray
    centres: np.ndarray  # (N, 2) centroid within the mask's box, y then x
    tile_names: tuple[str, ...]
    border: int

    def __len__(self) -> int:
        return len(self.bank)

    def count(self, cls: int) -> int:
        return int(np.count_nonzero(self.bank.classes == cls))

    @classmethod
    def from_maps(
        cls,
        maps: Iterable[Any],
        *,
        border: int = BalanceParams.border,
        classes: Iterable[int] | None = None,
        names: Sequence[str] | None = None,
    ) -> "DonorPool":
        """Donors from ``(inst_map, inst_types)`` pairs or tiles, tile ``i`` being the ``i``-th map.

        Nuclei within ``border`` px (centroid) of their map's edge are skipped; ``classes``
        keeps only those classes (None: every class).
        """
        border = _int_param(border, "border", 0)
        keep = None if classes is None else _class_tuple(classes, "donor classes")
        builder = _PoolBuilder(border, keep)
        tile_names = []
        for index, item in enumerate(maps):
            inst_map, inst_types = (item.inst_map, item.inst_types) if hasattr(item, "inst_map") else item
            inst_map = np.asarray(inst_map)
            builder.add(index, inst_map, _classed_props(inst_map, inst_types, f"map {index}"))
            tile_names.append(getattr(item, "name", None) or str(index))
        return builder.build(names if names is not None else tile_names)


class _PoolBuilder:
    def __init__(self, border: int, classes: tuple[int, ...] | None):
        self.border, self.classes = border, classes
        self.masks: list[np.ndarray] = []
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, tile: int, inst_map: np.ndarray, props: NucleiProps) -> None:
        ok = _away_from_border(props, inst_map.shape, self.border)
        if self.classes is not None:
            ok &= np.isin(props.classes, self.classes)
        rows = np.flatnonzero(ok)
        sub = NucleiProps(props.ids[rows], props.centroids[rows], props.areas[rows], props.bboxes[rows], props.classes[rows])
        self.masks.extend(nucleus_masks(inst_map, sub))
        centres = sub.centroids - sub.bboxes[:, :2]
        self.parts.append((np.full(rows.size, tile, np.int32), sub.ids, sub.classes, centres))

    def build(self, names: Sequence[str]) -> DonorPool:
        if self.parts:
            sources, ids, classes, centres = (np.concatenate(a) for a in zip(*self.parts))
        else:
            sources, ids, classes, centres = (np.zeros(0, np.int32),) * 3 + (np.zeros((0, 2)),)
        return DonorPool(NucleiBank(self.masks, classes, sources), ids.astype(np.int32), centres, tuple(names), self.border)


# -- balancing -----------------------------------------------------------------------------------
class BalanceEdit(NamedTuple):
    """One accepted replacement: ``target_id`` (kept) now holds donor ``donor_id`` of tile ``donor_tile``."""

    target_id: int
    donor_tile: int
    donor_id: int
    cls: int
    room: int  # area of the target mask dilated by ``dilation`` px
    donor_area: int


@dataclass(frozen=True)
class BalanceRecord:
    """What a balancing map did, for provenance and reports."""

    edits: tuple[BalanceEdit, ...]
    rare: tuple[int, ...]
    eligible_major: int
    targets: int
    unmatched: int
    donors: dict[int, int]  # rare class -> donors in the pool
    warnings: tuple[str, ...] = ()

    def to_dict(self, tile_names: Sequence[str] | None = None) -> dict[str, Any]:
        def tile(i: int) -> Any:
            return tile_names[i] if tile_names is not None and 0 <= i < len(tile_names) else i

        return {
            "rare": list(self.rare),
            "eligible_major": self.eligible_major,
            "targets": self.targets,
            "replaced": len(self.edits),
            "unmatched": self.unmatched,
            "donors": {str(k): v for k, v in self.donors.items()},
            "edits": [
                {"target_id": e.target_id, "donor_tile": tile(e.donor_tile), "donor_id": e.donor_id, "class": e.cls}
                for e in self.edits
            ],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class BalanceResult:
    inst_map: np.ndarray
    inst_types: np.ndarray
    record: BalanceRecord

    @property
    def type_map(self) -> np.ndarray:
        return type_map_from(self.inst_map, self.inst_types)


def _room(inst_map: np.ndarray, nid: int, bbox: Sequence[int], dilation: int) -> int:
    """Area of nucleus ``nid`` dilated by ``dilation`` 4-connected steps, clipped to the map."""
    y0, x0, y1, x1 = bbox
    h, w = inst_map.shape
    wy0, wx0 = max(y0 - dilation, 0), max(x0 - dilation, 0)
    m = inst_map[wy0 : min(y1 + dilation, h), wx0 : min(x1 + dilation, w)] == nid
    # Cross-shaped steps, as binary_dilation(iterations=n) does; its per-call overhead is ~10x this.
    for _ in range(dilation):
        d = m.copy()
        d[1:] |= m[:-1]
        d[:-1] |= m[1:]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        m = d
    return int(np.count_nonzero(m))


def balance_map(
    inst_map: np.ndarray,
    inst_types: Any,
    rare: int | Sequence[int],
    *,
    major: Sequence[int] | None = None,
    params: BalanceParams = BalanceParams(),
    donors: DonorPool | None = None,
    tile_index: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> BalanceResult:
    """The balancing map of one tile (rules in the module docstring).

    ``rare``: rare class id(s), rarest first. ``major``: classes that may be replaced
    (default: every other class). ``donors``: pool of donors from all tiles, with this tile
    at ``tile_index`` (its donors come first); None uses this map's own nuclei only.
    Returns new arrays and a :class:`BalanceRecord`; the inputs are not modified.
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise LabelError(f"inst_map must be a 2-D (H, W) array, got shape {inst_map.shape}")
    rare = _class_tuple(rare, "rare classes")
    if not rare:
        raise SchemeError("balancing needs at least one rare class")
    props = _classed_props(inst_map, inst_types, "balance_map")
    present = tuple(int(k) for k in np.unique(props.classes))
    major = tuple(k for k in (present if major is None else _class_tuple(major, "major classes")) if k not in rare)
    if donors is None:
        donors = DonorPool.from_maps([(inst_map, inst_types)], border=params.border, classes=rare)
        tile_index = 0
    elif donors.border != params.border:
        raise LabelError(f"the donor pool was built with border {donors.border} px but params.border is {params.border} px")
    rng = _rng(rng)

    eligible = _away_from_border(props, inst_map.shape, params.border)
    major_rows = np.flatnonzero(eligible & np.isin(props.classes, major))
    n_targets = int(params.target_fraction * major_rows.size)
    chosen = rng.choice(major_rows, size=n_targets, replace=False) if n_targets else major_rows[:0]
    targets = chosen[np.argsort(props.areas[chosen], kind="stable")]

    # Donor order: same tile by id, then the other tiles in a random order, by id within a tile.
    n_tiles = max(len(donors.tile_names), int(donors.bank.sources.max(initial=-1)) + 1)
    others = np.array([t for t in range(n_tiles) if t != tile_index], dtype=np.int64)
    tile_rank = np.empty(max(n_tiles, 1), dtype=np.int64)
    tile_rank[rng.permutation(others)] = np.arange(1, others.size + 1)
    if tile_index is not None and 0 <= tile_index < n_tiles:
        tile_rank[tile_index] = 0
    queues = []
    for k in rare:
        rows = donors.bank.query(k)
        rows = rows[np.lexsort((donors.ids[rows], tile_rank[donors.bank.sources[rows]]))]
        queues.append((k, rows, donors.bank.areas[rows] * params.fit_ratio, np.ones(rows.size, dtype=bool)))
    counts = {k: int(q[1].size) for k, q in zip(rare, queues)}

    warnings = []
    names = ", ".join(str(k) for k in rare)
    if not any(counts.values()):
        warnings.append(
            f"no nuclei of rare class(es) {names} at least {params.border} px from a tile border in the donor pool; "
            "nothing to paste, the map is unchanged"
        )
    elif major_rows.size == 0:
        warnings.append(f"no major-class nuclei at least {params.border} px from the border; nothing to replace")

    edits: list[BalanceEdit] = []
    stamps = []
    turn = 0
    left = sum(counts.values())
    if left:
        for row in targets.tolist():
            if not left:
                break  # every donor is used: the remaining targets are kept
            nid = int(props.ids[row])
            room = _room(inst_map, nid, props.bboxes[row], params.dilation)
            for q in range(len(queues)):
                slot = (turn + q) % len(queues)
                k, rows, need, free = queues[slot]
                fits = free & (need <= room)
                j = int(fits.argmax()) if fits.size else 0
                if not fits.size or not fits[j]:
                    continue
                free[j] = False
                left -= 1
                d = int(rows[j])
                mask = donors.bank.mask(d)
                top_left = _round(props.centroids[row] - donors.centres[d])
                stamps.append((nid, k, mask, (int(top_left[0]), int(top_left[1]))))
                edits.append(
                    BalanceEdit(nid, int(donors.bank.sources[d]), int(donors.ids[d]), k, room, int(donors.bank.areas[d]))
                )
                turn = (slot + 1) % len(queues)
                break
    out, types = draw_nuclei(inst_map, inst_types, stamps, erase=[e.target_id for e in edits])
    record = BalanceRecord(
        tuple(edits), rare, int(major_rows.size), int(targets.size), int(targets.size) - len(edits), counts, tuple(warnings)
    )
    return BalanceResult(out, types, record)


# -- enlarging -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnlargeResult:
    inst_map: np.ndarray
    inst_types: np.ndarray
    shifts: np.ndarray  # (K, 3) int: nucleus id, dy, dx of every nucleus that moved

    @property
    def type_map(self) -> np.ndarray:
        return type_map_from(self.inst_map, self.inst_types)


def enlarge_map(
    inst_map: np.ndarray,
    inst_types: Any,
    *,
    params: EnlargeParams = EnlargeParams(),
    rng: np.random.Generator | int | None = None,
) -> EnlargeResult:
    """The enlarging map of a patch (rules in the module docstring); inputs are not modified."""
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise LabelError(f"inst_map must be a 2-D (H, W) array, got shape {inst_map.shape}")
    ids, boxes = nuclei_bboxes(inst_map)
    types_in = np.asarray(inst_types)
    if ids.size and int(ids[-1]) >= types_in.size:
        raise LabelError(f"inst_map has nucleus id {ids[-1]} but inst_types only covers ids 0..{types_in.size - 1}")
    classes = types_in[ids]
    if np.any(classes == 0):
        bad = ids[classes == 0]
        raise LabelError(f"enlarge_map: {bad.size} nuclei have class 0 (ids {bad[:10].tolist()}); every nucleus needs a class")
    rng = _rng(rng)
    h, w = inst_map.shape
    b = params.band
    y0, x0, y1, x1 = boxes.T
    rows = np.flatnonzero((y0 >= b) & (x0 >= b) & (y1 <= h - b) & (x1 <= w - b))
    n = rows.size
    lo, hi = params.shift_range
    # Always draw all four streams so one nucleus's draw never depends on another's outcome.
    move_y, move_x = rng.random(n) < params.probability, rng.random(n) < params.probability
    dy = np.where(move_y, rng.integers(lo, hi + 1, n), 0)
    dx = np.where(move_x, rng.integers(lo, hi + 1, n), 0)
    moving = (dy != 0) | (dx != 0)
    rows, dy, dx = rows[moving], dy[moving], dx[moving]
    stamps = [
        (nid, k, inst_map[by:ey, bx:ex] == nid, (by + sy, bx + sx))
        for nid, k, (by, bx, ey, ex), sy, sx in zip(
            ids[rows].tolist(), classes[rows].tolist(), boxes[rows].tolist(), dy.tolist(), dx.tolist()
        )
    ]
    out, types = draw_nuclei(inst_map, inst_types, stamps, erase=ids[rows].tolist())
    shifts = np.stack([ids[rows].astype(np.int64), dy, dx], axis=1) if rows.size else np.zeros((0, 3), np.int64)
    return EnlargeResult(out, types, shifts)


# -- plans ---------------------------------------------------------------------------------------
def _derive_seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


def parse_maps(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"balance"``, ``"enlarge"``, ``"balance+enlarge"`` (or a sequence of names) as a map tuple."""
    names = spec.replace(",", "+").split("+") if isinstance(spec, str) else list(spec)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    bad = [n for n in names if n not in MAP_NAMES]
    if bad or not names:
        raise LabelError(f"unknown map(s) {bad or spec!r}; choose from {', '.join(MAP_NAMES)} (combine with '+')")
    return tuple(n for n in MAP_NAMES if n in names)


@dataclass(frozen=True)
class PlanItem:
    """One patch to synthesise. ``balance_seed`` seeds the tile's balancing (shared by the
    items of one tile and variant); ``seed`` seeds this item's own randomness (enlarging)."""

    tile: int
    origin: tuple[int, int]
    maps: tuple[str, ...]
    seed: int
    variant: int = 0
    balance_seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile": self.tile, "origin": list(self.origin), "maps": list(self.maps), "variant": self.variant,
            "seed": self.seed, "balance_seed": self.balance_seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanItem":
        bs = d.get("balance_seed")
        return cls(int(d["tile"]), tuple(int(v) for v in d["origin"]), parse_maps(d["maps"]), int(d["seed"]),
                   int(d.get("variant", 0)), None if bs is None else int(bs))


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


@dataclass(frozen=True, eq=False)  # arrays inside: plans compare by identity
class Plan:
    """Patches to synthesise, with the parameters that make every item reproducible.

    ``original_counts`` / ``planned_counts``: nuclei per class (index 0 unused) summed over
    the original grid patches / the planned synthetic patches. Planned counts are exact for
    balancing; enlarging is counted as class-preserving (a nucleus it covers completely is
    not subtracted).
    """

    items: tuple[PlanItem, ...]
    seed: int
    patch_size: int
    stride: int
    scheme: ClassScheme
    tile_names: tuple[str, ...]
    tile_shapes: tuple[tuple[int, int], ...]
    rare: tuple[int, ...]
    major: tuple[int, ...]
    balance: BalanceParams
    enlarge: EnlargeParams
    goal: dict[str, Any]
    original_counts: np.ndarray
    planned_counts: np.ndarray
    original_patches: int
    reached: bool
    reason: str = ""
    warnings: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.items)

    def maps_summary(self) -> dict[str, int]:
        """Items per map combination, e.g. ``{"balance": 6, "enlarge": 6}``."""
        kinds = sorted({it.maps for it in self.items}, key=lambda m: (len(m), [MAP_NAMES.index(n) for n in m]))
        return {"+".join(k): sum(it.maps == k for it in self.items) for k in kinds}

    def describe_goal(self) -> str:
        mode = self.goal.get("mode")
        if mode == "share":
            return f"every class at least {self.goal['share']:g} % of nuclei"
        if mode == "patches":
            return f"{self.goal['patches']} patches"
        return f"as many patches as the original set ({self.original_patches})"

    def table(self, synthetic: np.ndarray | None = None) -> str:
        """Nuclei per class: original patches, synthetic patches (planned, or the given actual
        counts) and both together, with shares."""
        syn = self.planned_counts if synthetic is None else np.asarray(synthetic)
        label = "planned" if synthetic is None else "synthetic"
        cols = [("original", self.original_counts), (label, syn), ("combined", self.original_counts + syn)]
        names = list(self.scheme.names)
        width = max(len(n) for n in names + ["class", "patches"])
        head = f"{'class':<{width}}" + "".join(f"  {c:>10} {'%':>6}" for c, _ in cols)
        lines = [head]
        for k, name in enumerate(names, start=1):
            row = f"{name:<{width}}"
            for _, counts in cols:
                row += f"  {int(counts[k]):>10} {_pct(counts[k], counts[1:].sum()):>5.1f}%"
            lines.append(row)
        row = f"{'total':<{width}}"
        for _, counts in cols:
            total = int(counts[1:].sum())
            row += f"  {total:>10} {100.0 if total else 0.0:>5.1f}%"
        lines.append(row)
        n = len(self.items)
        lines.append(f"{'patches':<{width}}  {self.original_patches:>10} {'':>6}  {n:>10} {'':>6}  {self.original_patches + n:>10}")
        kinds = ", ".join(f"{v} {k}" for k, v in self.maps_summary().items()) or "none"
        lines.append(f"synthetic patches by maps: {kinds}; goal: {self.describe_goal()}")
        lines.append("goal reached" if self.reached else f"goal NOT reached: {self.reason}")
        lines.append(
            f"counts are nuclei per {self.patch_size} px patch summed over patches "
            "(a nucleus in overlapping patches counts once per patch)"
        )
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "seed": self.seed,
            "patch_size": self.patch_size,
            "stride": self.stride,
            "scheme": self.scheme.to_dict(),
            "tiles": [{"name": n, "shape": list(s)} for n, s in zip(self.tile_names, self.tile_shapes)],
            "rare": list(self.rare),
            "major": list(self.major),
            "balance": self.balance.to_dict(),
            "enlarge": self.enlarge.to_dict(),
            "goal": dict(self.goal),
            "original_counts": [int(v) for v in self.original_counts],
            "planned_counts": [int(v) for v in self.planned_counts],
            "original_patches": self.original_patches,
            "reached": self.reached,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "items": [it.to_dict() for it in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | os.PathLike | None = None) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise DatasetError(f"not a napari-diffmix label plan (expected format {PLAN_FORMAT!r})", source)
        try:
            return cls(
                items=tuple(PlanItem.from_dict(it) for it in d["items"]),
                seed=int(d["seed"]),
                patch_size=int(d["patch_size"]),
                stride=int(d["stride"]),
                scheme=load_scheme(d["scheme"]),
                tile_names=tuple(t["name"] for t in d["tiles"]),
                tile_shapes=tuple(tuple(int(v) for v in t["shape"]) for t in d["tiles"]),
                rare=tuple(int(k) for k in d["rare"]),
                major=tuple(int(k) for k in d["major"]),
                balance=BalanceParams(**d["balance"]),
                enlarge=EnlargeParams(**{**d["enlarge"], "shift_range": tuple(d["enlarge"]["shift_range"])}),
                goal=dict(d["goal"]),
                original_counts=np.asarray(d["original_counts"], dtype=np.int64),
                planned_counts=np.asarray(d["planned_counts"], dtype=np.int64),
                original_patches=int(d["original_patches"]),
                reached=bool(d["reached"]),
                reason=str(d.get("reason", "")),
                warnings=tuple(d.get("warnings", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (LabelError, SchemeError)):
                raise DatasetError(f"label plan is invalid: {exc}", source) from None
            raise DatasetError(f"label plan is incomplete or corrupt ({type(exc).__name__}: {exc})", source) from None

    def save(self, path: str | os.PathLike) -> None:
        from .atomic import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        import json

        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise DatasetError("plan file does not exist", path) from None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read plan: {exc}", path) from None
        return cls.from_dict(data, source=path)


def _phase(pbar: Any | None, total: int, desc: str) -> Any:
    """A progress phase over ``total`` tiles; a caller's bar restarts at 0 for each phase."""
    if pbar is not None and hasattr(pbar, "reset"):
        pbar.reset(total=total)
    return progress_bar(pbar, total, desc, unit="tile")


class _TileLabels(NamedTuple):
    inst_map: np.ndarray
    inst_types: np.ndarray
    props: NucleiProps


class MixCache:
    """Work shared between items: tiles' label maps and nuclei, the donor pool, balanced tiles.

    Entries are kept least-recently-used within ``max_bytes``; everything is recomputed
    identically when evicted, so the cache changes speed, never results.
    """

    def __init__(self, dataset: Sequence[Any], *, max_bytes: int = 512 * 2**20):
        self.dataset = dataset
        self.max_bytes = int(max_bytes)
        self._lru: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._pools: dict[Any, DonorPool] = {}
        self.checked_plan: Plan | None = None  # the plan whose tiles were matched against the dataset

    def _get(self, key: Any) -> Any:
        hit = self._lru.get(key)
        if hit is None:
            return None
        self._lru.move_to_end(key)
        return hit[0]

    def _put(self, key: Any, value: Any, nbytes: int) -> None:
        self._lru[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._lru) > 1:
            _, (_, n) = self._lru.popitem(last=False)
            self._bytes -= n

    def labels(self, t: int) -> _TileLabels:
        """Label maps and nuclei properties of tile ``t`` (images are not read)."""
        key = ("labels", t)
        hit = self._get(key)
        if hit is None:
            tile = tile_labels(self.dataset, t)
            where = getattr(tile, "source", None) or getattr(tile, "name", f"tile {t}")
            types = np.asarray(tile.inst_types, dtype=np.int32)
            hit = _TileLabels(tile.inst_map, types, _classed_props(tile.inst_map, types, where))
            self._put(key, hit, tile.inst_map.nbytes + types.nbytes)
        return hit

    def pool(self, border: int, classes: tuple[int, ...], *, pbar: Any | None = None) -> DonorPool:
        """Donors of ``classes`` from every tile (built once per border and classes)."""
        key = (border, classes)
        if key not in self._pools:
            builder = _PoolBuilder(border, classes)
            names = getattr(self.dataset, "names", None) or [getattr(t, "name", str(i)) for i, t in enumerate(self.dataset)]
            with _phase(pbar, len(self.dataset), "donors") as bar:
                for t in range(len(self.dataset)):
                    lab = self.labels(t)
                    builder.add(t, lab.inst_map, lab.props)
                    bar.update(1)
            self._pools[key] = builder.build(names)
        return self._pools[key]

    def balanced(
        self, t: int, seed: int, params: BalanceParams, rare: tuple[int, ...], major: tuple[int, ...]
    ) -> BalanceResult:
        """The balancing map of tile ``t`` for this seed (donors from every tile)."""
        key = ("balanced", t, seed, params, rare, major)
        hit = self._get(key)
        if hit is None:
            lab = self.labels(t)
            pool = self.pool(params.border, rare)
            hit = balance_map(
                lab.inst_map, lab.inst_types, rare, major=major, params=params, donors=pool, tile_index=t,
                rng=np.random.default_rng(seed),
            )
            self._put(key, hit, hit.inst_map.nbytes + hit.inst_types.nbytes)
        return hit


def _patch_counts(inst_map: np.ndarray, inst_types: np.ndarray, origins: Sequence[tuple[int, int]], size: int, c: int) -> np.ndarray:
    """(len(origins), C + 1) nuclei per class present in each patch."""
    if inst_map.size and int(inst_map.max()) > 4 * inst_map.size + 1024:
        inst_map, inst_types = remap_ids(inst_map, inst_types)
    top = int(inst_map.max()) if inst_map.size else 0
    types = np.zeros(top + 1, dtype=np.int64)
    n = min(top + 1, np.asarray(inst_types).size)
    types[:n] = np.asarray(inst_types)[:n]
    present = np.empty((len(origins), top + 1), dtype=bool)
    for i, (y, x) in enumerate(origins):
        present[i] = np.bincount(inst_map[y : y + size, x : x + size].reshape(-1), minlength=top + 1) > 0
    present[:, 0] = False
    onehot = np.zeros((top + 1, c + 1), dtype=np.int64)
    onehot[np.arange(top + 1), np.clip(types, 0, c)] = 1
    onehot[:, 0] = 0
    return present.astype(np.int64) @ onehot


def resolve_classes(
    scheme: ClassScheme, counts: np.ndarray, rare: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(rare classes, major classes): ``rare`` if given, else the scheme's, else the single
    rarest class; rare classes are ranked rarest first by ``counts`` (nuclei per class, index 0
    unused), ties keeping the lower class id first."""
    c = scheme.num_classes
    if rare is not None:
        ids = _class_tuple(rare, "rare classes")
        bad = [k for k in ids if k > c]
        if bad:
            raise SchemeError(f"rare class(es) {bad} are outside 1..{c} of scheme {scheme.name!r}")
    elif scheme.rare:
        ids = scheme.rare
    else:
        ids = rank_by_scarcity(np.asarray(counts), scheme.class_ids)[:1]
    ids = rank_by_scarcity(np.asarray(counts), tuple(ids))
    if len(ids) >= c:
        raise SchemeError(f"rare classes {list(ids)} leave no major class to replace in scheme {scheme.name!r}")
    return tuple(ids), tuple(k for k in scheme.class_ids if k not in ids)


class _Candidates:
    """Patches that could be synthesised: tile, origin, maps, variant and planned counts."""

    def __init__(self, c: int):
        self.rows: list[tuple[int, tuple[int, int], int, int]] = []  # tile, origin, kind, variant
        self.counts: list[np.ndarray] = []
        self.c = c

    def add(self, tile: int, origins: Sequence[tuple[int, int]], kind: int, variant: int, counts: np.ndarray) -> None:
        self.rows.extend((tile, o, kind, variant) for o in origins)
        self.counts.append(counts)

    def matrix(self) -> np.ndarray:
        return np.concatenate(self.counts) if self.counts else np.zeros((0, self.c + 1), np.int64)


class _Selector:
    """Greedy choice of candidates toward class shares (see :func:`plan_balanced_set`)."""

    def __init__(self, state: np.ndarray):
        self.state = state.astype(np.int64).copy()
        self.picks: list[int] = []
        self.used = np.zeros(0, dtype=bool)

    def _orders(self, counts: np.ndarray, kinds: np.ndarray, kind: int | None, k: int) -> np.ndarray:
        rows = np.flatnonzero(~self.used if kind is None else (~self.used & (kinds == kind)))
        total = counts[rows, 1:].sum(axis=1)
        share = np.divide(counts[rows, k], total, out=np.zeros(rows.size), where=total > 0)
        return rows[np.lexsort((rows, -counts[rows, k], -share))]

    def shares(self) -> np.ndarray:
        total = self.state[1:].sum()
        return self.state[1:] / total if total else np.zeros(self.state.size - 1)

    def _take(self, j: int, counts: np.ndarray) -> None:
        self.used[j] = True
        self.picks.append(j)
        self.state += counts[j]

    def fill(self, counts: np.ndarray, kinds: np.ndarray, quotas: list[int]) -> bool:
        """Take ``quotas[q]`` candidates of each kind, kinds in turn, each the best for the
        class furthest below an equal share. False when a kind ran out of candidates."""
        self.used = np.concatenate([self.used, np.zeros(counts.shape[0] - self.used.size, bool)])
        c = counts.shape[1] - 1
        cache: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        q = 0
        while any(quotas):
            while not quotas[q]:
                q = (q + 1) % len(quotas)
            k = int(np.argmin(self.shares() - 1.0 / c)) + 1
            order, pos = cache.get((q, k)) or (self._orders(counts, kinds, q, k), 0)
            while pos < order.size and self.used[order[pos]]:
                pos += 1
            if pos == order.size:
                return False
            cache[(q, k)] = (order, pos + 1)
            self._take(int(order[pos]), counts)
            quotas[q] -= 1
            q = (q + 1) % len(quotas)
        return True

    def reach(self, counts: np.ndarray, goal: float) -> tuple[bool, int]:
        """Add candidates until every class holds ``goal`` (a fraction). Returns (reached, class
        stuck on): stuck when no unused candidate holds a larger share of the neediest class."""
        self.used = np.concatenate([self.used, np.zeros(counts.shape[0] - self.used.size, bool)])
        cache: dict[int, tuple[np.ndarray, int]] = {}
        while True:
            shares = self.shares()
            deficit = goal - shares
            if np.all(deficit <= 1e-12):
                return True, 0
            k = int(np.argmax(deficit)) + 1
            order, pos = cache.get(k) or (self._orders(counts, np.zeros(0), None, k), 0)
            while pos < order.size and self.used[order[pos]]:
                pos += 1
            if pos == order.size:
                return False, k
            j = int(order[pos])
            total = counts[j, 1:].sum()
            if total == 0 or counts[j, k] / total <= shares[k - 1]:
                return False, k
            cache[k] = (order, pos + 1)
            self._take(j, counts)


@dataclass(frozen=True)
class PlanSpec:
    """What a balanced-set plan is made from: the goal, the kinds of map, the rules and the seed.

    Built once from a command's options or a widget's fields (``diffmix labels``, ``synthesize``,
    ``demo``, Batch export) and turned into a :class:`Plan` by :func:`plan_balanced_set`, so every
    planner takes the same options with the same defaults (the published ones).
    """

    patches: int | None = None  # an explicit count; with target_share None and this None: the original grid
    target_share: float | None = None  # every class at least this % of the nuclei
    maps: tuple[str | Sequence[str], ...] = ("balance", "enlarge")
    rare: tuple[int, ...] | None = None  # class ids (None: the scheme's)
    patch_size: int = 256
    stride: int = 76
    balance: BalanceParams = BalanceParams()
    enlarge: EnlargeParams = EnlargeParams()
    seed: int = 0
    max_variants: int = 4


def plan_balanced_set(
    dataset: Sequence[Any],
    spec: PlanSpec | None = None,
    *,
    scheme: Any = None,
    cache: MixCache | None = None,
    pbar: Any | None = None,
    **fields: Any,
) -> Plan:
    """Choose patches (and maps) for a synthetic set; no images are used.

    ``spec`` holds the settings (:class:`PlanSpec`); without it, ``fields`` are PlanSpec's
    fields (``patches=``, ``maps=``, ...), the rest keeping their defaults.

    Goal, one of: ``patches`` (an explicit count), ``target_share`` (every class at least
    this % of the nuclei in original + synthetic patches), or neither (as many patches as
    the original grid holds). ``maps``: the kinds of synthetic patch, each ``"balance"``,
    ``"enlarge"`` or ``"balance+enlarge"`` (both maps on one patch).

    Candidates are every grid patch of every tile in every kind, per variant (a variant is
    another balancing of the tile, or another enlarging draw). Selection is greedy: with a
    patch count, the kinds take equal shares of the count in turn and each pick is the
    unused candidate with the largest share of the class currently furthest below an equal
    share; further variants are added when the candidates run out. With a target share, the
    pick is the candidate with the largest share of the neediest class, over all kinds,
    until every class reaches the target, adding up to ``max_variants`` variants; if the
    neediest class cannot be raised further the plan says so (``reached`` False and
    ``reason``). Items are ordered by tile and variant so consecutive items share work.
    """
    if spec is None:
        unknown = set(fields) - {f.name for f in dataclasses.fields(PlanSpec)}
        if unknown:
            raise TypeError(f"plan_balanced_set() got unknown plan setting(s) {sorted(unknown)}")
        spec = PlanSpec(**fields)
    elif fields:
        raise TypeError("give the plan settings as a PlanSpec or as keywords, not both")
    patches, target_share, maps, rare = spec.patches, spec.target_share, spec.maps, spec.rare
    patch_size, stride, balance, enlarge = spec.patch_size, spec.stride, spec.balance, spec.enlarge
    seed, max_variants = spec.seed, spec.max_variants
    scheme = load_scheme(scheme if scheme is not None else getattr(dataset, "scheme", None) or _need_scheme())
    kinds = []
    for m in maps:
        parsed = parse_maps(m)
        if parsed not in kinds:
            kinds.append(parsed)
    if not kinds:
        raise LabelError("no maps chosen: pass at least one of balance, enlarge, balance+enlarge")
    if patches is not None and target_share is not None:
        raise LabelError("give either a patch count or a target share, not both")
    if patches is not None:
        patches = _int_param(patches, "patches", 0)
    if target_share is not None:
        target_share = _float_param(target_share, "target share (%)", 0.0, 100.0, open_lo=True)
    seed = _int_param(seed, "seed", 0)
    max_variants = _int_param(max_variants, "max_variants", 1)
    patch_size, stride = _int_param(patch_size, "patch size", 1), _int_param(stride, "stride", 1)
    if len(dataset) == 0:
        raise DatasetError("the dataset has no tiles")
    cache = cache if cache is not None else MixCache(dataset)
    c = scheme.num_classes
    names = list(getattr(dataset, "names", None) or [getattr(t, "name", str(i)) for i, t in enumerate(dataset)])

    # Pass 1: the original grid patches.
    grids: list[list[tuple[int, int]]] = []
    shapes: list[tuple[int, int]] = []
    orig: list[np.ndarray] = []
    tile_counts = np.zeros(c + 1, dtype=np.int64)
    warnings = []
    with _phase(pbar, len(dataset), "plan: read") as bar:
        for t in range(len(dataset)):
            lab = cache.labels(t)
            shape = tuple(int(s) for s in lab.inst_map.shape)
            shapes.append(shape)
            scheme.check_classes(lab.props.classes, source=names[t])
            tile_counts += np.bincount(lab.props.classes, minlength=c + 1)[: c + 1]
            if shape[0] < patch_size or shape[1] < patch_size:
                warnings.append(f"tile {names[t]!r} ({shape[0]}x{shape[1]}) is smaller than a {patch_size} px patch; skipped")
                grids.append([])
                orig.append(np.zeros((0, c + 1), np.int64))
            else:
                grids.append(patch_grid(shape[0], shape[1], patch_size, stride))
                orig.append(_patch_counts(lab.inst_map, lab.inst_types, grids[-1], patch_size, c))
            bar.update(1)
    n_orig = sum(len(g) for g in grids)
    if n_orig == 0:
        raise DatasetError(f"no tile is large enough for a {patch_size} px patch")
    rare_ids, major_ids = resolve_classes(scheme, tile_counts, rare)
    original_counts = np.sum([o.sum(axis=0) for o in orig], axis=0)
    needs_balance = any(BALANCE in k for k in kinds)
    if needs_balance:
        pool = cache.pool(balance.border, rare_ids, pbar=pbar)
        if not any(pool.count(k) for k in rare_ids):
            warnings.append(
                f"no nuclei of rare class(es) {[scheme.class_name(k) for k in rare_ids]} at least {balance.border} px "
                "from a tile border in any tile: balancing cannot add any"
            )

    cands = _Candidates(c)
    kind_of: list[int] = []
    rounds_built = 0

    def build_round(v: int) -> None:
        with _phase(pbar, len(dataset) * len(kinds), f"plan: variant {v}") as bar:
            for kind_index, kind in enumerate(kinds):
                for t in range(len(dataset)):
                    if grids[t]:
                        if BALANCE in kind:
                            res = cache.balanced(t, _derive_seed(seed, _BALANCE_STREAM, t, v), balance, rare_ids, major_ids)
                            counts = _patch_counts(res.inst_map, res.inst_types, grids[t], patch_size, c)
                        else:
                            counts = orig[t]
                        cands.add(t, grids[t], kind_index, v, counts)
                        kind_of.extend([kind_index] * len(grids[t]))
                    bar.update(1)

    selector = _Selector(original_counts)
    reached, reason = True, ""
    if target_share is None:
        n_goal = n_orig if patches is None else patches
        quotas = [n_goal // len(kinds) + (q < n_goal % len(kinds)) for q in range(len(kinds))]
        while any(quotas):
            build_round(rounds_built)
            rounds_built += 1
            if selector.fill(cands.matrix(), np.asarray(kind_of), quotas):
                break
        goal = {"mode": "original" if patches is None else "patches", "patches": n_goal}
    else:
        goal = {"mode": "share", "share": target_share}
        share = target_share / 100.0
        if share * c > 1.0 + 1e-12:
            reached, reason = False, f"{c} classes cannot each hold {target_share:g} % (at most {100.0 / c:.4g} % each)"
        else:
            while True:
                build_round(rounds_built)
                rounds_built += 1
                ok, stuck = selector.reach(cands.matrix(), share)
                if ok:
                    break
                if rounds_built >= max_variants:
                    reached = False
                    counts = cands.matrix()
                    sh = selector.shares()[stuck - 1]
                    left = counts[~selector.used]
                    tot = left[:, 1:].sum(axis=1)
                    best = float(np.max(np.divide(left[:, stuck], tot, out=np.zeros(tot.size), where=tot > 0), initial=0.0))
                    if not counts[:, stuck].any():
                        why = "it is in no candidate patch" + ("" if stuck in rare_ids else " and is not a rare class that balancing adds")
                    else:
                        why = f"no unused candidate patch holds more than {100 * best:.1f} % of it"
                    hint = (f"allow more variants (--max-variants, now {max_variants})" if stuck in rare_ids
                            else "make it a rare class (--rare)")
                    reason = (
                        f"class {scheme.class_name(stuck)!r} stops at {100 * sh:.1f} % < {target_share:g} % after "
                        f"{len(selector.picks)} patches and {rounds_built} variant(s): {why}; lower the target or {hint}"
                    )
                    break
    counts = cands.matrix()
    picks = sorted(selector.picks, key=lambda j: (cands.rows[j][0], cands.rows[j][3], cands.rows[j][2], cands.rows[j][1]))
    items = []
    for i, j in enumerate(picks):
        t, origin, kind_index, v = cands.rows[j]
        kind = kinds[kind_index]
        items.append(
            PlanItem(
                t, origin, kind, _derive_seed(seed, _ITEM_STREAM, i), v,
                _derive_seed(seed, _BALANCE_STREAM, t, v) if BALANCE in kind else None,
            )
        )
    planned = counts[picks].sum(axis=0) if picks else np.zeros(c + 1, np.int64)
    return Plan(
        tuple(items), seed, patch_size, stride, scheme, tuple(names), tuple(shapes), rare_ids, major_ids, balance,
        enlarge, goal, original_counts.astype(np.int64), planned.astype(np.int64), n_orig, reached, reason, tuple(warnings),
    )


def _need_scheme() -> Any:
    raise SchemeError("the dataset carries no class scheme; pass scheme=")


def _check_dataset(plan: Plan, dataset: Sequence[Any]) -> None:
    names = list(getattr(dataset, "names", None) or [getattr(t, "name", str(i)) for i, t in enumerate(dataset)])
    if names != list(plan.tile_names):
        diff = sorted(set(names) ^ set(plan.tile_names))[:5]
        raise DatasetError(
            f"the dataset does not match the plan: the plan has {len(plan.tile_names)} tiles, the dataset {len(names)}"
            + (f" (differing names e.g. {diff})" if diff else " (same names in another order)")
        )


def make_item(plan: Plan, dataset: Sequence[Any], i: int, *, cache: MixCache | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Build item ``i`` of ``plan``: ``(inst_map int32 with ids 1..N, type_map uint8, provenance)``.

    Depends only on the plan, the dataset and ``i``: items may be built in any order, in
    separate processes, or again after an interruption, with identical results. Pass one
    :class:`MixCache` to many calls to share tile loading and balancing.
    """
    n = len(plan.items)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
        raise IndexError(f"item {i!r} is out of range for a plan of {n} items")
    i = int(i) % n
    item = plan.items[i]
    if cache is None:
        cache = MixCache(dataset)
    if cache.checked_plan is not plan:
        _check_dataset(plan, dataset)
        cache.checked_plan = plan
    lab = cache.labels(item.tile)
    if tuple(lab.inst_map.shape) != tuple(plan.tile_shapes[item.tile]):
        raise DatasetError(
            f"tile {plan.tile_names[item.tile]!r} is {lab.inst_map.shape} but the plan expects {plan.tile_shapes[item.tile]}"
        )
    retyped = np.zeros(0, dtype=np.int64)
    if BALANCE in item.maps:
        if item.balance_seed is None:
            raise DatasetError(f"plan item {i} applies balancing but has no balance_seed")
        res = cache.balanced(item.tile, item.balance_seed, plan.balance, plan.rare, plan.major)
        inst_map, inst_types = res.inst_map, res.inst_types
        retyped = np.array([e.target_id for e in res.record.edits], dtype=np.int64)
    else:
        inst_map, inst_types = lab.inst_map, lab.inst_types
    y, x = item.origin
    s = plan.patch_size
    crop = inst_map[y : y + s, x : x + s]
    if crop.shape != (s, s):
        raise DatasetError(f"plan item {i}: patch at {item.origin} does not fit tile {plan.tile_names[item.tile]!r}")
    present = np.unique(crop[crop > 0])
    n_retyped = int(np.count_nonzero(np.isin(present, retyped)))
    shifted = 0
    if ENLARGE in item.maps:
        res_e = enlarge_map(crop, inst_types, params=plan.enlarge, rng=np.random.default_rng(item.seed))
        crop, inst_types, shifted = res_e.inst_map, res_e.inst_types, int(res_e.shifts.shape[0])
    out, types = remap_ids(crop, inst_types)
    type_map = type_map_from(out, types)
    counts = np.bincount(types[1:], minlength=plan.scheme.num_classes + 1)
    provenance = {
        "index": i,
        "tile": item.tile,
        "tile_name": plan.tile_names[item.tile],
        "origin": [y, x],
        "size": s,
        "maps": list(item.maps),
        "variant": item.variant,
        "seed": item.seed,
        "balance_seed": item.balance_seed,
        "plan_seed": plan.seed,
        "retyped_nuclei": n_retyped,
        "shifted_nuclei": shifted,
        "nuclei": {name: int(counts[k]) for k, name in enumerate(plan.scheme.names, start=1)},
    }
    return out, type_map, provenance


def unchanged_items(plan: Plan, dataset: Sequence[Any], *, cache: MixCache | None = None, limit: int = 64) -> tuple[int, int]:
    """``(unchanged, checked)``: of up to ``limit`` items spread over the plan, how many come out
    with no nucleus retyped or shifted, i.e. would only copy an original patch."""
    n = len(plan.items)
    if n == 0:
        return 0, 0
    picks = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int))
    cache = cache if cache is not None else MixCache(dataset)
    unchanged = 0
    for i in picks:
        prov = make_item(plan, dataset, int(i), cache=cache)[2]
        unchanged += prov["retyped_nuclei"] == 0 and prov["shifted_nuclei"] == 0
    return unchanged, int(picks.size)


def iter_items(
    plan: Plan,
    dataset: Sequence[Any],
    indices: Iterable[int] | None = None,
    *,
    cache: MixCache | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Yield ``(i, inst_map, type_map, provenance)`` for the given item indices (default: all)."""
    cache = cache if cache is not None else MixCache(dataset)
    for i in range(len(plan.items)) if indices is None else indices:
        yield (int(i), *make_item(plan, dataset, i, cache=cache))
