"""The ``fidelity`` array of a synthetic store: per-item records, reading, writing and the
threshold filter that ``diffmix export --min-fidelity`` and ``train-seg --synthetic-min-fidelity``
apply. Scoring lives in :mod:`napari_diffmix.fidelity`; this module needs only the store, so the
exporters and the segmentation data can filter without importing the scorer (no import cycle).

``fidelity`` (N,) holds one JSON object per item (empty: not scored), one chunk per item like
``provenance``; ``attrs["fidelity"]`` names the model that scored the store and the threshold its
training files apply. A record counts for filtering only when it names that model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import StoreError

FIDELITY = "fidelity"
METRICS = ("pq", "dq", "sq", "dice", "aji", "f_d", "type_accuracy", "rare_recall")
DEFAULT_METRIC = "pq"
# The threshold the store's TRAINING.md / train.sh apply when a store is scored and none is given.
DEFAULT_MIN_FIDELITY = 0.5


def image_digest(image: np.ndarray) -> str:
    """Short digest of an image's bytes: ties a score to the very pixels it was computed on."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def _none_to_nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def ensure_fidelity_array(group: Any) -> Any:
    """The store's ``fidelity`` array, created (empty) when missing."""
    import zarr

    from .store import DONE, ZSTD_LEVEL

    if FIDELITY in group:
        return group[FIDELITY]
    n = group[DONE].shape[0]
    # The store's chunk format: zstd with a checksum, so a torn chunk reads as "not scored".
    codec = zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=True)
    return group.create_array(FIDELITY, shape=(n,), chunks=(1,), dtype=str, compressors=codec)


def read_records(group: Any) -> list[dict[str, Any] | None]:
    """Every item's fidelity record (None: not scored, or its chunk is unreadable)."""
    n = int(group["done"].shape[0])
    if FIDELITY not in group:
        return [None] * n
    arr = group[FIDELITY]
    try:
        texts = list(np.asarray(arr[:]))
    except Exception:  # a torn chunk: read item by item so one bad chunk costs one item
        texts = []
        for i in range(n):
            try:
                texts.append(arr[i])
            except Exception:
                texts.append("")
    out: list[dict[str, Any] | None] = []
    for t in texts:
        try:
            out.append(json.loads(str(t)) if t else None)
        except ValueError:
            out.append(None)
    return out


def write_record(group: Any, i: int, record: Mapping[str, Any], where: Any = "") -> None:
    from .store import os_reason

    try:
        group[FIDELITY][i] = json.dumps(record)
    except OSError as exc:
        raise StoreError(f"{where or group.store}: writing the fidelity of item {i} failed: {os_reason(exc)}; "
                         "run the same command again to continue") from None


def metric_value(record: Mapping[str, Any] | None, metric: str = DEFAULT_METRIC) -> float:
    """One metric of a record; NaN for an unscored item or an undefined value."""
    if metric not in METRICS:
        raise StoreError(f"unknown fidelity metric {metric!r}; choose one of {', '.join(METRICS)}")
    return math.nan if record is None else _none_to_nan(record.get(metric))


def fidelity_values(store: Any, metric: str = DEFAULT_METRIC) -> np.ndarray:
    """``metric`` of every item of an open store (NaN: unscored, unfinished or undefined)."""
    return np.array([metric_value(r, metric) for r in read_records(store.group)], dtype=np.float64)


@dataclass
class Selection:
    """The finished items a fidelity threshold keeps."""

    indices: np.ndarray
    threshold: float
    metric: str
    scored: int
    finished: int

    @property
    def kept(self) -> int:
        return int(self.indices.size)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "threshold": self.threshold, "kept": self.kept, "scored": self.scored, "finished": self.finished}

    def text(self) -> str:
        return (f"{self.metric} >= {self.threshold:g} keeps {self.kept} of {self.finished} synthetic items "
                f"({self.finished - self.kept} left out)")


def select_items(store: Any, min_fidelity: float, metric: str = DEFAULT_METRIC) -> Selection:
    """The finished items whose ``metric`` is at least ``min_fidelity``.

    Every finished item must be scored (else :class:`StoreError` naming ``diffmix score``): a
    threshold that silently kept or dropped unscored items would not mean what it says. An item
    whose metric is undefined (PQ with no nucleus in the label map nor in the prediction: they
    agree) is kept.
    """
    if not isinstance(min_fidelity, (int, float)) or math.isnan(min_fidelity):
        raise StoreError(f"the minimum fidelity must be a number, got {min_fidelity!r}")
    done = store.done_mask()
    records = read_records(store.group)
    model = (store.attrs.get(FIDELITY) or {}).get("model", {}).get("sha256", "")[:16]
    finished = np.flatnonzero(done)
    unscored = [int(i) for i in finished if records[i] is None or (model and records[i].get("model") != model)]
    if not model or unscored:
        what = "is not scored" if not model else f"has {len(unscored)} finished item(s) without a score ({', '.join(map(str, unscored[:10]))}{' ...' if len(unscored) > 10 else ''})"
        raise StoreError(f"{store.path}: the store {what}; run 'diffmix score {store.path} --seg-model MODEL' "
                         "before filtering by fidelity")
    values = np.array([metric_value(records[i], metric) for i in finished])
    keep = finished[np.isnan(values) | (values >= min_fidelity)]
    return Selection(keep.astype(np.int64), float(min_fidelity), metric, int(finished.size), int(finished.size))


def summary(records: Sequence[Mapping[str, Any] | None], class_names: Sequence[str]) -> dict[str, Any]:
    """Means over the scored items (undefined values skipped)."""
    scored = [r for r in records if r]
    out: dict[str, Any] = {"items_scored": len(scored)}
    for k in METRICS:
        vals = [_none_to_nan(r.get(k)) for r in scored]
        vals = [v for v in vals if not math.isnan(v)]
        out[f"mean_{k}"] = float(np.mean(vals)) if vals else None
    for n in class_names:
        vals = [v for v in (_none_to_nan((r.get("f1") or {}).get(n)) for r in scored) if not math.isnan(v)]
        out[f"mean_f1_{n}"] = float(np.mean(vals)) if vals else None
    return out


def training_fidelity(store: Any) -> dict[str, Any] | None:
    """What TRAINING.md / train.sh carry for a scored store: threshold, metric and how many it keeps
    (None when the store has no complete scores)."""
    info = store.attrs.get(FIDELITY)
    if not info or info.get("min_fidelity") is None:
        return None
    try:
        return select_items(store, float(info["min_fidelity"]), info.get("metric", DEFAULT_METRIC)).to_dict()
    except StoreError:
        return None
