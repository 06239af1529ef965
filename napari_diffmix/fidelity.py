"""Label fidelity of a synthetic store: does each rendered image show what its label map says?

A segmentation model (a ``diffmix train-seg`` model folder) predicts nuclei on every rendered
image; the item's fidelity is the agreement of that prediction with the label map the image was
rendered from, in the :mod:`napari_diffmix.metrics` definitions: Dice, AJI, DQ/SQ/PQ, F_d, type
accuracy and per-class F1 (HoVer-Net's), plus the recall of the rare-class nuclei.

Rare-class recall: the provenance of an item records *how many* nuclei the balancing map
retyped (``retyped_nuclei``), not *which*: their ids are renumbered when the item is written
(and the enlarging map moves them). So the recall is measured over **all rare-class nuclei of the
item's label map** (``rare.basis`` says so): the inserted/retyped ones plus any the original patch
already had. ``rare.found`` counts those paired with a predicted nucleus (centroids within 12 px,
as for F_d), ``rare.correct`` those paired with a prediction of the same class;
``rare_recall = correct / n``.

Storage: the array ``fidelity`` (N,) of JSON strings, one chunk per item like ``provenance``,
so items are scored independently and a run continues where it stopped. Images and label maps
are never written. An item's record names the model (sha256 of its weights) and the digest of
the image it scored; a record counts only while both still match (a re-rendered item, or another
model, is scored again). ``attrs["fidelity"]`` holds the model provenance, the metric
definitions, the threshold the training files apply and a summary. The array's reading, writing
and the threshold filter live in :mod:`napari_diffmix.fidelity_records` (re-exported here), which
needs only the store: export and the segmentation data filter without importing the scorer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import CheckpointError, StoreError
from .fidelity_records import (  # noqa: F401 - the store side of fidelity, re-exported for callers
    DEFAULT_METRIC,
    DEFAULT_MIN_FIDELITY,
    FIDELITY,
    METRICS,
    Selection,
    ensure_fidelity_array,
    fidelity_values,
    image_digest,
    metric_value,
    read_records,
    select_items,
    summary,
    training_fidelity,
    write_record,
)

RARE_BASIS = "rare-class nuclei of the item's label map (provenance records how many were retyped, not which)"


def _nan_to_none(v: float) -> float | None:
    # JSON has no NaN; null says "undefined" (e.g. PQ of an item with no nuclei anywhere).
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


# ---------------------------------------------------------------------------------------------
# scoring one item
# ---------------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """A loaded segmentation model that scores items against their label maps.

    ``rare``: class ids whose recall is reported (default: the model scheme's rare classes).
    ``window`` / ``overlap`` / ``batch_size``: as for ``diffmix predict``.
    """

    model: Any
    info: Any
    model_sha256: str
    rare: tuple[int, ...]
    window: int = 256
    overlap: int = 64
    batch_size: int = 4

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.info.scheme.names)

    def provenance(self) -> dict[str, Any]:
        """What ``attrs["fidelity"]["model"]`` records about the model."""
        training = self.info.training or {}
        return {
            "path": str(self.info.path),
            "sha256": self.model_sha256,
            "scheme": self.info.scheme.name,
            "classes": list(self.class_names),
            "config": self.info.config.to_dict(),
            "trained_on": {k: training.get(k) for k in ("data", "synthetic", "layout", "step") if k in training},
        }

    def check_scheme(self, scheme: Any, where: Any) -> None:
        if tuple(scheme.names) != self.class_names:
            raise StoreError(
                f"{where}: the store's classes {list(scheme.names)} differ from the segmentation model's "
                f"{list(self.class_names)} ({self.info.path}); score with a model trained on the store's class scheme"
            )

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from .seg.predict import segment

        return segment(self.model, image, window=self.window, overlap=self.overlap, batch_size=self.batch_size)

    def score(self, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fidelity record of one item (a JSON-ready dict)."""
        pred_inst, pred_type = self.predict(image)
        return self.record(image, inst_map, type_map, pred_inst, pred_type, provenance)

    def record(self, image, inst_map, type_map, pred_inst, pred_type, provenance=None) -> dict[str, Any]:
        """The record of an item whose prediction is already made (the metrics only)."""
        from .metrics import evaluate_image

        r = evaluate_image(inst_map, pred_inst, type_map, pred_type)
        tally = r.tally
        # Rare-class recall from the same centroid pairing as F_d: no second matcher.
        rare_pt = np.isin(tally.paired_true, self.rare)
        n_rare = int(np.count_nonzero(rare_pt) + np.count_nonzero(np.isin(tally.unpaired_true, self.rare)))
        found = int(np.count_nonzero(rare_pt))
        correct = int(np.count_nonzero(rare_pt & (tally.paired_pred == tally.paired_true)))
        out: dict[str, Any] = {
            "model": self.model_sha256[:16],
            "image": image_digest(image),
            "n_true": r.n_true,
            "n_pred": r.n_pred,
            **{k: _nan_to_none(v) for k, v in r.instance_metrics().items()},
            "f_d": _nan_to_none(tally.f_d),
            "type_accuracy": _nan_to_none(tally.type_accuracy),
            "f1": {n: _nan_to_none(tally.class_f1(k)) for k, n in enumerate(self.class_names, start=1)},
            "rare": {"classes": list(self.rare), "n": n_rare, "found": found, "correct": correct},
            "rare_recall": _nan_to_none(correct / n_rare if n_rare else math.nan),
        }
        if provenance is not None and "retyped_nuclei" in provenance:
            out["rare"]["retyped_in_plan"] = int(provenance["retyped_nuclei"])
        return out

    def check(self, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> "NucleusCheck":
        """What became of each painted nucleus of one rendered image (:func:`check_nuclei`)."""
        pred_inst, pred_type = self.predict(image)
        return check_nuclei(inst_map, type_map, pred_inst, pred_type)

    def valid(self, record: Mapping[str, Any] | None, image: np.ndarray | None = None) -> bool:
        """Whether ``record`` was made by this model (and, given ``image``, on these pixels)."""
        if not record or record.get("model") != self.model_sha256[:16]:
            return False
        return image is None or record.get("image") == image_digest(image)


# ---------------------------------------------------------------------------------------------
# one render, nucleus by nucleus (the Generate widget's check)
# ---------------------------------------------------------------------------------------------
# What became of a painted nucleus: codes of NucleusCheck.outcome and of its outcome map.
FOUND, WRONG_CLASS, MISSED = 1, 2, 3
OUTCOMES = {FOUND: "found with its class", WRONG_CLASS: "found with another class", MISSED: "missed"}


@dataclass
class NucleusCheck:
    """Per painted nucleus (``ids``, sorted): its ``painted`` class, the class of the predicted
    nucleus paired with it (``predicted``: 0 when none, -1 when the prediction has no class) and
    the ``outcome`` code; with the prediction itself (``pred_inst``, ``pred_type``)."""

    ids: np.ndarray
    painted: np.ndarray
    predicted: np.ndarray
    pred_inst: np.ndarray
    pred_type: np.ndarray

    @property
    def outcome(self) -> np.ndarray:
        return np.where(self.predicted == 0, MISSED, np.where(self.predicted == self.painted, FOUND, WRONG_CLASS))

    def counts(self) -> dict[int, int]:
        """Painted nuclei per outcome code."""
        outcome = self.outcome
        return {code: int(np.count_nonzero(outcome == code)) for code in OUTCOMES}

    def outcome_map(self, inst_map: np.ndarray) -> np.ndarray:
        """uint8 map: each painted nucleus's pixels hold its outcome code, background 0."""
        lut = np.zeros(int(np.max(inst_map, initial=0)) + 1, np.uint8)
        lut[self.ids] = self.outcome
        return lut[inst_map]


def check_nuclei(inst_map: np.ndarray, type_map: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray) -> NucleusCheck:
    """Pair the painted nuclei with the predicted ones as F_d does (centroids, Hungarian within
    12 px: :func:`napari_diffmix.metrics.pair_centroids`) and say, for each painted nucleus,
    whether it was found with its class, found with another, or missed."""
    from .metrics import centroids_and_types, pair_centroids

    inst_map = np.asarray(inst_map)
    ids = np.unique(inst_map)
    ids = ids[ids > 0]
    true_yx, painted = centroids_and_types(inst_map, type_map)  # in id order, as ``ids``
    pred_yx, pred_classes = centroids_and_types(pred_inst, pred_type)
    pairs, _, _ = pair_centroids(true_yx, pred_yx)
    predicted = np.zeros(ids.size, np.int64)
    # A prediction of class 0 (no class) still counts as found, with another class.
    predicted[pairs[:, 0]] = np.where(pred_classes[pairs[:, 1]] > 0, pred_classes[pairs[:, 1]], -1)
    return NucleusCheck(ids, painted, predicted, np.asarray(pred_inst), np.asarray(pred_type))


def load_scorer(
    path: str | os.PathLike, *, device: str = "cpu", rare: Sequence[int] | None = None, window: int = 256,
    overlap: int = 64, batch_size: int = 4,
) -> Scorer:
    """A :class:`Scorer` from a ``diffmix train-seg`` model folder, or ``"demo"``: the bundled demo
    segmentation model (:func:`napari_diffmix.seg.checkpoint.resolve_seg_model`)."""
    from .model.checkpoint import file_sha256
    from .seg.checkpoint import WEIGHTS, load_seg_model

    try:
        model, info = load_seg_model(path, device)
    except CheckpointError as exc:
        raise CheckpointError(f"--seg-model: {exc}") from None
    rare_ids = tuple(int(c) for c in (rare if rare is not None else info.scheme.rare))
    return Scorer(model, info, file_sha256(info.path / WEIGHTS), rare_ids, window, overlap, batch_size)


# ---------------------------------------------------------------------------------------------
# the store's fidelity array
# ---------------------------------------------------------------------------------------------
def fidelity_attrs(scorer: Scorer, records: Sequence[Mapping[str, Any] | None], min_fidelity: float, metric: str = DEFAULT_METRIC) -> dict[str, Any]:
    """``attrs["fidelity"]`` of a store scored by ``scorer``."""
    from .metrics import MATCH_IOU, PAIR_RADIUS

    return {
        "model": scorer.provenance(),
        "metric": metric,
        "min_fidelity": float(min_fidelity),
        "rare_classes": list(scorer.rare),
        "rare_basis": RARE_BASIS,
        "definitions": {"match_iou": MATCH_IOU, "pair_radius_px": PAIR_RADIUS, "window": scorer.window, "overlap": scorer.overlap},
        "summary": summary(records, scorer.class_names),
    }


def rewrite_training_files(path: str | os.PathLike) -> dict[str, Any] | None:
    """Write the store's TRAINING.md / train.sh again with its fidelity threshold and kept count
    (a complete store only: an unfinished one gets its files when synthesis completes)."""
    from .export import write_training_files
    from .store import open_store, referenced_dataset

    store = open_store(path)
    if store.attrs.get("status") != "complete" or "class_counts" not in store.attrs:
        return None
    fid = training_fidelity(store)
    mode = (store.attrs.get("originals") or {}).get("mode", "none")
    data = (store.attrs.get("dataset") or {}).get("path") if mode == "referenced" else None
    if data is not None and (store.attrs.get("dataset") or {}).get("relative_to_store_folder"):
        data = str(referenced_dataset(store))
    write_training_files(store.path, data=data, scheme=store.scheme, patch_size=store.patch_shape[0],
                         counts=store.attrs["class_counts"], originals=mode, items=len(store), fidelity=fid)
    return fid


# ---------------------------------------------------------------------------------------------
# scoring a whole store
# ---------------------------------------------------------------------------------------------
@dataclass
class ScoreResult:
    store: Path
    finished: int
    scored_now: int
    skipped: int
    stopped: bool
    seconds: float
    attrs: dict[str, Any]
    signal: str | None = None

    @property
    def complete(self) -> bool:
        return not self.stopped


def score_store(
    path: str | os.PathLike,
    scorer: Scorer,
    *,
    min_fidelity: float = DEFAULT_MIN_FIDELITY,
    rescore: bool = False,
    pbar: Any | None = None,
    should_stop: Callable[[], bool] | None = None,
    lock: bool = True,
    training_files: bool = True,
) -> ScoreResult:
    """Score every finished, not yet scored item of the store at ``path`` (resumable).

    Items whose record was made by this model on the same pixels are skipped; ``rescore`` scores
    them again. Ctrl-C / SIGTERM (or ``should_stop``) stop after the current item: what is written
    stays, and the same call continues. Holds the store's writer lock (a synthesis run on the same
    store would otherwise change items under the scorer) unless ``lock`` is False: the caller holds
    it (``diffmix synthesize --seg-model``). ``training_files``: write TRAINING.md / train.sh again
    with the threshold (a complete store only).
    """
    import time

    import zarr

    from .outputs import WriterLock
    from .progress import StopRequests, progress_bar
    from .store import open_store, update_attrs

    t0 = time.perf_counter()
    store = open_store(path)
    scorer.check_scheme(store.scheme, store.path)
    import contextlib

    held = WriterLock(store.path) if lock else contextlib.nullcontext()
    with held, StopRequests(should_stop, "finishing the current item, then stopping") as requests:
        group = zarr.open_group(str(store.path), mode="r+")
        ensure_fidelity_array(group)
        done = store.done_mask()
        records = read_records(group)
        finished = [int(i) for i in np.flatnonzero(done)]
        scored = skipped = 0
        with progress_bar(pbar, len(finished), "score", unit="item") as bar:
            for i in finished:
                if requests.poll():
                    break
                # Reading an item costs little next to segmenting it; the pixel check catches items
                # rendered again since they were scored.
                item = store.item(i)
                if not rescore and scorer.valid(records[i], item.image):
                    skipped += 1
                else:
                    records[i] = scorer.score(item.image, item.inst_map, item.type_map, item.provenance)
                    write_record(group, i, records[i], store.path)
                    scored += 1
                bar.update(1)
        attrs = fidelity_attrs(scorer, [records[i] if done[i] else None for i in range(len(records))], min_fidelity)
        update_attrs(store.path, {FIDELITY: attrs})
    stopped = requests.requested is not None
    if not stopped and training_files:
        rewrite_training_files(store.path)
    result = ScoreResult(store.path, int(done.sum()), scored, skipped, stopped, time.perf_counter() - t0, attrs)
    if requests.requested in ("SIGINT", "SIGTERM"):
        result.signal = requests.requested
    return result
