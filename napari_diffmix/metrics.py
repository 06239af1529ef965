"""Nuclei segmentation and classification metrics, as HoVer-Net and SONNET define them.

Per image (instance maps only, ids need not be contiguous):

- ``dice``: binary Dice of foreground (HoVer-Net's ``get_dice_1``);
- ``aji``: Aggregated Jaccard Index; every ground-truth nucleus is paired with the
  prediction of highest IoU, a prediction may serve several (MoNuSeg's definition);
- ``aji_plus``: AJI with a one-to-one pairing that maximises the summed IoU (Hungarian);
- ``dq``, ``sq``, ``pq``: detection, segmentation and panoptic quality with pairs of
  IoU > 0.5 (unique at that threshold).

Pooled over a test set (HoVer-Net's ``compute_stats``): nuclei are paired by centroid
with a Hungarian assignment on the full Euclidean distance matrix of each image, and pairs
farther apart than 12 px are dropped. Then

- ``f_d = 2 TP / (2 TP + FP + FN)`` (detection F1),
- ``type_accuracy`` = share of paired nuclei with the right class,
- per class c: ``F1_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c)`` where
  TP_c / FP_c / FN_c count *paired* nuclei (true and predicted c / predicted c but true
  another class / true c but predicted another class) and FP_d,c / FN_d,c count
  *unpaired* predicted / true nuclei of class c.

Conventions where HoVer-Net divides by zero: a ratio with an empty denominator is NaN
(e.g. PQ of an image without nuclei in both maps, F1 of a class that occurs nowhere), and
means over images skip NaNs. An image without nuclei contributes nothing to the pooled
counts (HoVer-Net inserts a dummy nucleus at (0, 0) of class 0 instead, which can count
as a false detection). SQ is the exact mean IoU of pairs (HoVer-Net adds 1e-6 to the
denominator).

Everything derives from one contingency table of the two instance maps (a bincount over
combined ids), so an image with ~600 nuclei takes a few tens of milliseconds.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import DatasetError, LabelError
from .nuclei import inst_types_from_maps, nuclei_props, remap_ids

MATCH_IOU = 0.5
PAIR_RADIUS = 12.0
INSTANCE_METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
# Dense contingency tables up to this many cells; above it the sparse path is cheaper.
_DENSE_CELLS = 1 << 22


# -- instance maps -------------------------------------------------------------------------


def _check_inst_map(inst_map: np.ndarray, what: str) -> np.ndarray:
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise LabelError(f"{what} must be a 2-D instance map, got shape {inst_map.shape}")
    if not np.issubdtype(inst_map.dtype, np.integer):
        raise LabelError(f"{what} must hold integer instance ids, got dtype {inst_map.dtype}")
    if inst_map.size and inst_map.min() < 0:
        raise LabelError(f"{what} has negative instance ids; 0 is background and nuclei are 1..N")
    return inst_map


@dataclass(frozen=True)
class Overlap:
    """Sparse contingency table of two instance maps (0-based compact nucleus indices).

    ``pair_true[k]``, ``pair_pred[k]`` overlap by ``inter[k]`` pixels; only overlapping
    pairs are listed, each once.
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    inter: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.true_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def overlap(true_inst: np.ndarray, pred_inst: np.ndarray) -> Overlap:
    """Pixel overlaps of every pair of true and predicted nuclei, from one bincount."""
    true_inst = _check_inst_map(true_inst, "ground-truth instance map")
    pred_inst = _check_inst_map(pred_inst, "predicted instance map")
    if true_inst.shape != pred_inst.shape:
        raise LabelError(
            f"ground truth and prediction differ in shape: {true_inst.shape} vs {pred_inst.shape}"
        )
    ct, _ = remap_ids(true_inst)
    cp, _ = remap_ids(pred_inst)
    ct, cp = ct.astype(np.int64), cp.astype(np.int64)
    nt, npred = int(ct.max(initial=0)), int(cp.max(initial=0))
    true_area = np.bincount(ct.ravel(), minlength=nt + 1)[1:]
    pred_area = np.bincount(cp.ravel(), minlength=npred + 1)[1:]
    both = (ct > 0) & (cp > 0)
    keys = (ct[both] - 1) * npred + (cp[both] - 1)
    if nt * npred <= _DENSE_CELLS:
        table = np.bincount(keys, minlength=nt * npred)
        keys = np.flatnonzero(table)
        counts = table[keys]
    else:
        keys, counts = np.unique(keys, return_counts=True)
    pair_true, pair_pred = np.divmod(keys, max(npred, 1))
    return Overlap(true_area, pred_area, pair_true, pair_pred, counts.astype(np.int64))


# -- per-image metrics ---------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def dice_from_overlap(ov: Overlap) -> float:
    return _ratio(2 * ov.inter.sum(), ov.true_area.sum() + ov.pred_area.sum())


def aji_from_overlap(ov: Overlap) -> float:
    if ov.pair_true.size == 0:
        return _ratio(0, ov.true_area.sum() + ov.pred_area.sum())
    iou = ov.iou
    # Best prediction per true nucleus; ties go to the lowest prediction id.
    order = np.lexsort((ov.pair_pred, -iou, ov.pair_true))
    t_sorted = ov.pair_true[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = t_sorted[1:] != t_sorted[:-1]
    best = order[first]
    used_pred = np.unique(ov.pair_pred[best])
    union = (
        ov.union[best].sum()
        + ov.true_area.sum() - ov.true_area[ov.pair_true[best]].sum()
        + ov.pred_area.sum() - ov.pred_area[used_pred].sum()
    )
    return _ratio(ov.inter[best].sum(), union)


def max_iou_matching(ov: Overlap) -> np.ndarray:
    """Indices into the overlap pairs of a one-to-one matching of maximal summed IoU.

    Pairs whose two nuclei overlap nothing else are in every optimal matching; only the
    rest (nuclei touching several others) goes to the Hungarian solver, which keeps it
    small.
    """
    if ov.pair_true.size == 0:
        return np.zeros(0, dtype=np.int64)
    deg_t = np.bincount(ov.pair_true, minlength=ov.n_true)
    deg_p = np.bincount(ov.pair_pred, minlength=ov.n_pred)
    forced = (deg_t[ov.pair_true] == 1) & (deg_p[ov.pair_pred] == 1)
    chosen = [np.flatnonzero(forced)]
    rest = np.flatnonzero(~forced)
    if rest.size:
        rows, r_inv = np.unique(ov.pair_true[rest], return_inverse=True)
        cols, c_inv = np.unique(ov.pair_pred[rest], return_inverse=True)
        gain = np.zeros((rows.size, cols.size))
        gain[r_inv, c_inv] = ov.iou[rest]
        index = np.full((rows.size, cols.size), -1, dtype=np.int64)
        index[r_inv, c_inv] = rest
        r, c = linear_sum_assignment(gain, maximize=True)
        picked = index[r, c]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


def aji_plus_from_overlap(ov: Overlap) -> float:
    sel = max_iou_matching(ov)
    union = (
        ov.union[sel].sum()
        + ov.true_area.sum() - ov.true_area[ov.pair_true[sel]].sum()
        + ov.pred_area.sum() - ov.pred_area[ov.pair_pred[sel]].sum()
    )
    return _ratio(ov.inter[sel].sum(), union)


def pq_from_overlap(ov: Overlap, match_iou: float = MATCH_IOU) -> tuple[float, float, float]:
    """(DQ, SQ, PQ). Above IoU 0.5 pairs are unique; below it a max-IoU matching decides."""
    if not 0.0 <= match_iou < 1.0:
        raise ValueError(f"match_iou must be in [0, 1), got {match_iou}")
    iou = ov.iou
    if match_iou >= 0.5:
        matched = iou[iou > match_iou]
    else:
        m = iou[max_iou_matching(ov)]
        matched = m[m > match_iou]
    tp = matched.size
    fp, fn = ov.n_pred - tp, ov.n_true - tp
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched.mean()) if tp else (0.0 if (fp or fn) else math.nan)
    return dq, sq, dq * sq


def dice(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Binary Dice of the foreground (NaN if both maps are empty)."""
    return dice_from_overlap(overlap(true_inst, pred_inst))


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (MoNuSeg / HoVer-Net ``get_fast_aji``)."""
    return aji_from_overlap(overlap(true_inst, pred_inst))


def aji_plus(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """AJI+ with a one-to-one maximal-IoU pairing (HoVer-Net ``get_fast_aji_plus``)."""
    return aji_plus_from_overlap(overlap(true_inst, pred_inst))


def panoptic_quality(
    true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = MATCH_IOU
) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) of two instance maps (HoVer-Net ``get_fast_pq``)."""
    return pq_from_overlap(overlap(true_inst, pred_inst), match_iou)


# -- detection and classification ---------------------------------------------------------


def centroids_and_types(
    inst_map: np.ndarray, type_map: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (N, 2) as (y, x) and majority class (N,) of each nucleus, by id.

    Without a ``type_map`` every class is 0.
    """
    inst_types = None if type_map is None else inst_types_from_maps(inst_map, type_map)
    props = nuclei_props(inst_map, inst_types)
    return props.centroids, props.classes.astype(np.int64)


def pair_centroids(
    true_yx: np.ndarray, pred_yx: np.ndarray, radius: float = PAIR_RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HoVer-Net's ``pair_coordinates``: Hungarian on all distances, then drop pairs > radius.

    Returns ``(pairs (K, 2) [true, pred], unpaired_true, unpaired_pred)`` as index arrays.
    """
    true_yx = np.asarray(true_yx, dtype=np.float64).reshape(-1, 2)
    pred_yx = np.asarray(pred_yx, dtype=np.float64).reshape(-1, 2)
    if true_yx.shape[0] == 0 or pred_yx.shape[0] == 0:
        pairs = np.zeros((0, 2), dtype=np.int64)
    else:
        dist = np.sqrt(((true_yx[:, None, :] - pred_yx[None, :, :]) ** 2).sum(-1))
        r, c = linear_sum_assignment(dist)
        keep = dist[r, c] <= radius
        pairs = np.stack([r[keep], c[keep]], axis=1).astype(np.int64)
    unpaired_true = np.setdiff1d(np.arange(true_yx.shape[0]), pairs[:, 0])
    unpaired_pred = np.setdiff1d(np.arange(pred_yx.shape[0]), pairs[:, 1])
    return pairs, unpaired_true, unpaired_pred


@dataclass
class TypeTally:
    """Classes of paired and unpaired nuclei, the raw material of F_d and per-class F1.

    Tallies of several images add up (``a + b``), which is how the test set is pooled.
    """

    paired_true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    paired_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unpaired_true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unpaired_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def from_nuclei(
        cls,
        true_yx: np.ndarray,
        true_types: np.ndarray,
        pred_yx: np.ndarray,
        pred_types: np.ndarray,
        radius: float = PAIR_RADIUS,
    ) -> "TypeTally":
        true_types = np.asarray(true_types, dtype=np.int64)
        pred_types = np.asarray(pred_types, dtype=np.int64)
        pairs, ut, up = pair_centroids(true_yx, pred_yx, radius)
        return cls(true_types[pairs[:, 0]], pred_types[pairs[:, 1]], true_types[ut], pred_types[up])

    def __add__(self, other: "TypeTally") -> "TypeTally":
        return TypeTally(
            *(np.concatenate([a, b]) for a, b in zip(self._arrays(), other._arrays()))
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.paired_true, self.paired_pred, self.unpaired_true, self.unpaired_pred

    @property
    def f_d(self) -> float:
        tp, fp, fn = self.paired_true.size, self.unpaired_pred.size, self.unpaired_true.size
        return _ratio(2 * tp, 2 * tp + fp + fn)

    @property
    def type_accuracy(self) -> float:
        return _ratio(np.count_nonzero(self.paired_true == self.paired_pred), self.paired_true.size)

    def class_f1(self, cls: int) -> float:
        t, p = self.paired_true == cls, self.paired_pred == cls
        tp = np.count_nonzero(t & p)
        fp = np.count_nonzero(~t & p)
        fn = np.count_nonzero(t & ~p)
        fp_d = np.count_nonzero(self.unpaired_pred == cls)
        fn_d = np.count_nonzero(self.unpaired_true == cls)
        return _ratio(2 * tp, 2 * tp + 2 * fp + 2 * fn + fp_d + fn_d)


# -- one image and a test set --------------------------------------------------------------


@dataclass
class ImageResult:
    name: str
    n_true: int
    n_pred: int
    dice: float
    aji: float
    aji_plus: float
    dq: float
    sq: float
    pq: float
    tally: TypeTally

    def instance_metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in INSTANCE_METRICS}


def evaluate_image(
    true_inst: np.ndarray,
    pred_inst: np.ndarray,
    true_type: np.ndarray | None = None,
    pred_type: np.ndarray | None = None,
    *,
    name: str = "",
    match_iou: float = MATCH_IOU,
    radius: float = PAIR_RADIUS,
) -> ImageResult:
    """All per-image metrics and the image's contribution to the pooled scores."""
    ov = overlap(true_inst, pred_inst)
    dq, sq, pq = pq_from_overlap(ov, match_iou)
    t_yx, t_types = centroids_and_types(true_inst, true_type)
    p_yx, p_types = centroids_and_types(pred_inst, pred_type)
    return ImageResult(
        name=name,
        n_true=ov.n_true,
        n_pred=ov.n_pred,
        dice=dice_from_overlap(ov),
        aji=aji_from_overlap(ov),
        aji_plus=aji_plus_from_overlap(ov),
        dq=dq,
        sq=sq,
        pq=pq,
        tally=TypeTally.from_nuclei(t_yx, t_types, p_yx, p_types, radius),
    )


def _nanmean(values: Iterable[float]) -> float:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else math.nan


def mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the defined values (None and NaN skipped) of repeated runs, e.g.
    one metric over seeds; the sd is NaN below two values, both are NaN with none."""
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not arr.size:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size)


@dataclass
class Evaluation:
    """Per-image results plus pooled detection / classification scores of a test set.

    ``class_names[k - 1]`` names class k. Instance metrics of the summary are means over
    images (NaNs skipped); F_d, type accuracy and per-class F1 are pooled over all nuclei.
    """

    images: list[ImageResult]
    class_names: tuple[str, ...]
    ignored: tuple[str, ...] = ()

    @property
    def tally(self) -> TypeTally:
        total = TypeTally()
        for r in self.images:
            total = total + r.tally
        return total

    def _class_columns(self, tally: TypeTally) -> dict[str, float]:
        return {f"f1_{n}": tally.class_f1(k) for k, n in enumerate(self.class_names, start=1)}

    def summary(self) -> dict[str, float]:
        tally = self.tally
        out: dict[str, float] = {
            "n_images": len(self.images),
            "n_true": sum(r.n_true for r in self.images),
            "n_pred": sum(r.n_pred for r in self.images),
        }
        out.update({k: _nanmean(getattr(r, k) for r in self.images) for k in INSTANCE_METRICS})
        out.update(f_d=tally.f_d, type_accuracy=tally.type_accuracy)
        out.update(self._class_columns(tally))
        return out

    def class_f1(self) -> dict[str, float]:
        """Pooled F1 per class name."""
        tally = self.tally
        return {n: tally.class_f1(k) for k, n in enumerate(self.class_names, start=1)}

    def rows(self) -> list[dict[str, Any]]:
        """One row per image (its own detection scores) and a final pooled ``ALL`` row."""
        rows = []
        for r in self.images:
            row: dict[str, Any] = {"name": r.name, "n_true": r.n_true, "n_pred": r.n_pred}
            row.update(r.instance_metrics())
            row.update(f_d=r.tally.f_d, type_accuracy=r.tally.type_accuracy)
            row.update(self._class_columns(r.tally))
            rows.append(row)
        total = {"name": "ALL"}
        total.update({k: v for k, v in self.summary().items() if k != "n_images"})
        rows.append(total)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.class_names),
            "summary": _json_floats(self.summary()),
            "class_f1": _json_floats(self.class_f1()),
            "images": [_json_floats(r) for r in self.rows()[:-1]],
            "ignored_predictions": list(self.ignored),
            "definitions": {"match_iou": MATCH_IOU, "pair_radius_px": PAIR_RADIUS},
        }

    def to_csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue()

    def table(self) -> str:
        """Human-readable summary: per-class F1, then F_d, Dice, AJI, AJI+, DQ, SQ, PQ, accuracy."""
        s = self.summary()
        lines = [f"{s['n_images']} image(s), {s['n_true']} true / {s['n_pred']} predicted nuclei"]
        width = max([len(n) for n in self.class_names] + [14])
        for n in self.class_names:
            lines.append(f"  F1 {n:<{width}} {_fmt(s[f'f1_{n}'])}")
        labels = {
            "f_d": "F_d (detection)", "dice": "Dice", "aji": "AJI", "aji_plus": "AJI+",
            "dq": "DQ", "sq": "SQ", "pq": "PQ", "type_accuracy": "type accuracy",
        }
        for key, label in labels.items():
            lines.append(f"  {label:<{width + 3}} {_fmt(s[key])}")
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> Path:
        """Write JSON (``.json``) or CSV (``.csv``) atomically."""
        from .atomic import write_json, write_text

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            write_json(path, self.to_dict())
        elif suffix == ".csv":
            write_text(path, self.to_csv())
        else:
            raise DatasetError("results file must end in .json or .csv", path)
        return path


def _fmt(v: float) -> str:
    return "   n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def _json_floats(d: Mapping[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; null says "undefined" to every reader.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def evaluate(
    pred: Sequence[Any],
    truth: Sequence[Any],
    class_names: Sequence[str],
    *,
    match_iou: float = MATCH_IOU,
    radius: float = PAIR_RADIUS,
    pbar: Any | None = None,
) -> Evaluation:
    """Evaluate predicted tiles against ground-truth tiles, paired by tile name.

    ``pred`` and ``truth`` are sequences of tile-like objects (``name``, ``inst_map``,
    ``type_map``), e.g. :class:`napari_diffmix.datasets.Dataset`. Every ground-truth tile
    needs a prediction; predictions without ground truth are listed in ``ignored``.
    """
    from .datasets import tile_labels
    from .progress import progress_bar

    pred_index = {_tile_name(t, i): i for i, t in enumerate(_names(pred))}
    truth_names = [_tile_name(t, i) for i, t in enumerate(_names(truth))]
    if not truth_names:
        raise DatasetError("the ground truth holds no tiles", getattr(truth, "root", None))
    missing = [n for n in truth_names if n not in pred_index]
    if missing:
        raise DatasetError(
            f"no prediction for {len(missing)} ground-truth tile(s): {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; predictions are paired with ground truth by tile name",
            getattr(pred, "root", None),
        )
    ignored = tuple(sorted(set(pred_index) - set(truth_names)))
    results = []
    with progress_bar(pbar, len(truth_names), "evaluate", unit="tile") as bar:
        for i, name in enumerate(truth_names):
            t, p = tile_labels(truth, i), tile_labels(pred, pred_index[name])
            try:
                results.append(
                    evaluate_image(
                        t.inst_map, p.inst_map, t.type_map, p.type_map,
                        name=name, match_iou=match_iou, radius=radius,
                    )
                )
            except LabelError as exc:
                raise LabelError(f"tile {name!r}: {exc}") from None
            bar.update(1)
    return Evaluation(results, tuple(class_names), ignored)


def _names(tiles: Sequence[Any]) -> Sequence[Any]:
    # Datasets know their names without loading pixels; plain lists of tiles do not.
    names = getattr(tiles, "names", None)
    return list(names) if names is not None else [t.name for t in tiles]


def _tile_name(name: Any, index: int) -> str:
    return str(name) if name not in (None, "") else f"tile_{index}"
