"""Metrics on hand-built cases with answers worked out by hand, plus a brute-force cross-check."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from napari_diffmix import metrics as M
from napari_diffmix.errors import DatasetError, LabelError


def rect(shape, boxes):
    """Instance map with rectangles (id, y0, x0, y1, x1) drawn in order."""
    m = np.zeros(shape, np.int32)
    for nid, y0, x0, y1, x1 in boxes:
        m[y0:y1, x0:x1] = nid
    return m


def types_of(inst, classes):
    lut = np.zeros(int(inst.max()) + 1, np.uint8)
    for nid, c in classes.items():
        lut[nid] = c
    return lut[inst]


def scores(t, p, tt=None, pt=None):
    return M.evaluate_image(t, p, tt, pt)


# -- hand-built cases -----------------------------------------------------------------------


def test_perfect_match_is_one():
    t = rect((40, 40), [(1, 2, 2, 10, 10), (2, 20, 20, 30, 28), (3, 5, 25, 12, 35)])
    tt = types_of(t, {1: 1, 2: 2, 3: 3})
    r = scores(t, t, tt, tt)
    for k in M.INSTANCE_METRICS:
        assert getattr(r, k) == pytest.approx(1.0)
    assert r.tally.f_d == 1.0 and r.tally.type_accuracy == 1.0
    assert [r.tally.class_f1(c) for c in (1, 2, 3)] == [1.0, 1.0, 1.0]


def test_one_missed_nucleus():
    # A: 8x8 = 64 px (class 1), B: 10x5 = 50 px (class 2); the prediction misses B.
    t = rect((40, 40), [(1, 2, 2, 10, 10), (2, 20, 20, 30, 25)])
    p = rect((40, 40), [(7, 2, 2, 10, 10)])
    tt, pt = types_of(t, {1: 1, 2: 2}), types_of(p, {7: 1})
    r = scores(t, p, tt, pt)
    assert r.dice == pytest.approx(2 * 64 / (2 * 64 + 50))
    assert r.aji == pytest.approx(64 / (64 + 50))
    assert r.aji_plus == pytest.approx(64 / (64 + 50))
    assert (r.dq, r.sq, r.pq) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert r.tally.f_d == pytest.approx(2 / 3)
    assert r.tally.class_f1(1) == 1.0
    assert r.tally.class_f1(2) == 0.0  # 2*0 / (0 + FN_d 1)
    assert r.tally.type_accuracy == 1.0


def test_one_wrong_class():
    t = rect((40, 40), [(1, 2, 2, 10, 10), (2, 20, 20, 30, 25)])
    tt = types_of(t, {1: 1, 2: 2})
    pt = types_of(t, {1: 1, 2: 1})  # B predicted as class 1
    r = scores(t, t, tt, pt)
    assert r.pq == pytest.approx(1.0) and r.tally.f_d == 1.0
    assert r.tally.type_accuracy == 0.5
    # class 1: TP 1 (A), FP 1 (B true 2, predicted 1): 2 / (2 + 2*1) = 0.5
    assert r.tally.class_f1(1) == pytest.approx(0.5)
    # class 2: FN 1 (B): 0 / (0 + 2*1) = 0
    assert r.tally.class_f1(2) == 0.0
    # a class that occurs nowhere has no F1
    assert math.isnan(r.tally.class_f1(3))


def test_class_f1_weights_wrong_type_twice_and_unpaired_once():
    tally = M.TypeTally(
        paired_true=np.array([1, 1, 1, 2, 1]),
        paired_pred=np.array([1, 1, 2, 1, 1]),
        unpaired_true=np.array([1, 2]),
        unpaired_pred=np.array([1, 1, 2]),
    )
    # class 1: TP 3, FP 1, FN 1, FP_d 2, FN_d 1 -> 6 / (6 + 2 + 2 + 2 + 1)
    assert tally.class_f1(1) == pytest.approx(6 / 13)
    # class 2: TP 0 -> 0
    assert tally.class_f1(2) == 0.0
    assert tally.f_d == pytest.approx(10 / (10 + 3 + 2))
    assert tally.type_accuracy == pytest.approx(3 / 5)


def test_split_nucleus():
    # one true nucleus 10x20 = 200 px, predicted as 10x12 (120 px) + 10x8 (80 px)
    t = rect((30, 40), [(1, 5, 5, 15, 25)])
    p = rect((30, 40), [(1, 5, 5, 15, 17), (2, 5, 17, 15, 25)])
    r = scores(t, p)
    assert r.dice == pytest.approx(1.0)
    # IoUs 0.6 and 0.4: AJI pairs the 0.6 piece, the other piece joins the union
    assert r.aji == pytest.approx(120 / (200 + 80))
    assert r.aji_plus == pytest.approx(120 / (200 + 80))
    assert (r.dq, r.sq, r.pq) == pytest.approx((1 / 1.5, 0.6, 0.4))


def test_merged_nuclei_separate_aji_from_aji_plus():
    t = rect((30, 40), [(1, 5, 5, 15, 17), (2, 5, 17, 15, 25)])
    p = rect((30, 40), [(1, 5, 5, 15, 25)])
    r = scores(t, p)
    # AJI: both true nuclei pick the merged prediction, its union counted twice
    assert r.aji == pytest.approx((120 + 80) / (200 + 200))
    # AJI+: one-to-one, the 80 px nucleus is unpaired
    assert r.aji_plus == pytest.approx(120 / (200 + 80))
    assert (r.dq, r.sq, r.pq) == pytest.approx((1 / 1.5, 0.6, 0.4))


def test_iou_exactly_half_is_not_a_match():
    t = rect((30, 40), [(1, 5, 5, 15, 25)])
    p = rect((30, 40), [(1, 5, 5, 15, 15), (2, 5, 15, 15, 25)])
    dq, sq, pq = M.panoptic_quality(t, p)
    assert dq == 0.0 and pq == 0.0
    assert M.aji(t, p) == pytest.approx(100 / 300)


def test_empty_maps():
    z = np.zeros((16, 16), np.int32)
    one = rect((16, 16), [(1, 2, 2, 6, 6)])
    r = scores(z, z)
    assert all(math.isnan(getattr(r, k)) for k in M.INSTANCE_METRICS)
    assert math.isnan(r.tally.f_d)
    r = scores(z, one)
    assert r.dice == 0.0 and r.aji == 0.0 and r.pq == 0.0 and r.tally.f_d == 0.0
    r = scores(one, z)
    assert r.dice == 0.0 and r.aji_plus == 0.0 and r.dq == 0.0


# -- properties -------------------------------------------------------------------------------


def blob_map(seed, size=48, n=14):
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    seeds[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.integers(1, 500, n)
    fg = ndi.distance_transform_edt(seeds == 0) < rng.uniform(3, 6)
    return watershed(np.zeros((size, size)), seeds, mask=fg).astype(np.int32)


def perturbed(t, seed):
    rng = np.random.default_rng(seed)
    p = np.roll(t, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    return np.where(rng.random(t.shape) < 0.05, 0, p).astype(np.int32)


@pytest.mark.parametrize("seed", range(4))
def test_symmetric_metrics(seed):
    t, p = blob_map(seed), perturbed(blob_map(seed), seed)
    assert M.dice(t, p) == pytest.approx(M.dice(p, t))
    assert M.panoptic_quality(t, p) == pytest.approx(M.panoptic_quality(p, t))
    assert M.aji_plus(t, p) == pytest.approx(M.aji_plus(p, t))


@pytest.mark.parametrize("seed", range(4))
def test_id_permutation_invariance(seed):
    rng = np.random.default_rng(seed)
    t, p = blob_map(seed), perturbed(blob_map(seed), seed)
    tt = ((t * 7) % 3 + 1).astype(np.uint8) * (t > 0)
    pt = ((p * 5) % 3 + 1).astype(np.uint8) * (p > 0)
    lut = np.concatenate([[0], rng.permutation(np.arange(1, 10_000))[: p.max()] * 1000]).astype(np.int64)
    p2 = lut[p].astype(np.int64)  # shuffled, sparse and huge ids
    a, b = M.evaluate_image(t, p, tt, pt), M.evaluate_image(t, p2, tt, pt)
    for k in M.INSTANCE_METRICS:
        assert getattr(a, k) == pytest.approx(getattr(b, k))
    assert a.tally.f_d == b.tally.f_d
    assert [a.tally.class_f1(c) for c in (1, 2, 3)] == [b.tally.class_f1(c) for c in (1, 2, 3)]


def _brute(t, p):
    """The definitions as per-pair mask loops (HoVer-Net's pseudocode form)."""
    ti = [i for i in np.unique(t) if i]
    pi = [i for i in np.unique(p) if i]
    inter = np.array([[np.sum((t == a) & (p == b)) for b in pi] for a in ti], float).reshape(len(ti), len(pi))
    union = np.array([[np.sum((t == a) | (p == b)) for b in pi] for a in ti], float).reshape(len(ti), len(pi))
    iou = inter / union
    area_t = np.array([np.sum(t == a) for a in ti])
    area_p = np.array([np.sum(p == b) for b in pi])
    best = iou.argmax(1)
    has = iou.max(1) > 0
    rows = np.flatnonzero(has)
    aji = inter[rows, best[rows]].sum() / (
        union[rows, best[rows]].sum() + area_t[~has].sum() + np.delete(area_p, best[rows]).sum()
    )
    r, c = linear_sum_assignment(-iou)
    k = iou[r, c] > 0
    r, c = r[k], c[k]
    ajip = inter[r, c].sum() / (union[r, c].sum() + np.delete(area_t, r).sum() + np.delete(area_p, c).sum())
    m = iou[iou > 0.5]
    dq = m.size / (m.size + 0.5 * (len(pi) - m.size) + 0.5 * (len(ti) - m.size))
    return aji, ajip, dq, m.mean() if m.size else 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dense", [True, False])
def test_vectorised_equals_brute_force(seed, dense, monkeypatch):
    if not dense:  # the sparse contingency path used for very many nuclei
        monkeypatch.setattr(M, "_DENSE_CELLS", 0)
    t = blob_map(seed)
    p = perturbed(t, seed) if seed % 2 else blob_map(seed + 50)
    aji, ajip, dq, sq = _brute(t, p)
    assert M.aji(t, p) == pytest.approx(aji)
    assert M.aji_plus(t, p) == pytest.approx(ajip)
    assert M.panoptic_quality(t, p)[:2] == pytest.approx((dq, sq))


def test_centroid_pairing_radius_and_hungarian():
    true = np.array([[10.0, 10.0], [10.0, 30.0], [50.0, 50.0]])
    # pred 0 is 11 px from true 0 (paired), pred 1 is 13 px from true 2 (too far)
    pred = np.array([[21.0, 10.0], [50.0, 63.0]])
    pairs, ut, up = M.pair_centroids(true, pred, radius=12)
    assert pairs.tolist() == [[0, 0]] and ut.tolist() == [1, 2] and up.tolist() == [1]
    # Hungarian, not greedy: greedy would give true 0 to pred 0 (1 px) and leave pred 1 unpaired
    true = np.array([[0.0, 0.0], [0.0, 10.0]])
    pred = np.array([[0.0, 1.0], [0.0, -9.0]])
    pairs, ut, up = M.pair_centroids(true, pred)
    assert sorted(pairs.tolist()) == [[0, 1], [1, 0]]


def test_centroids_and_majority_types():
    t = rect((20, 20), [(4, 0, 0, 4, 4), (9, 10, 10, 12, 16)])
    tm = types_of(t, {4: 2, 9: 3})
    tm[0, 0] = 1  # one stray pixel does not change the majority
    yx, types = M.centroids_and_types(t, tm)
    assert yx.tolist() == [[1.5, 1.5], [10.5, 12.5]]
    assert types.tolist() == [2, 3]


def test_bad_inputs_raise_label_errors():
    with pytest.raises(LabelError, match="shape"):
        M.aji(np.zeros((4, 4), int), np.zeros((5, 4), int))
    with pytest.raises(LabelError, match="integer"):
        M.dice(np.zeros((4, 4), float), np.zeros((4, 4), int))
    with pytest.raises(LabelError, match="negative"):
        M.dice(-np.ones((4, 4), int), np.zeros((4, 4), int))


# -- a test set ---------------------------------------------------------------------------


def tile(name, inst, types):
    return SimpleNamespace(name=name, inst_map=inst, type_map=types)


def test_evaluate_pools_nuclei_and_writes_results(tmp_path):
    t1 = rect((40, 40), [(1, 2, 2, 10, 10), (2, 20, 20, 30, 25)])
    t2 = rect((40, 40), [(1, 5, 5, 15, 15)])
    truth = [tile("a", t1, types_of(t1, {1: 1, 2: 2})), tile("b", t2, types_of(t2, {1: 2}))]
    p1 = rect((40, 40), [(3, 2, 2, 10, 10)])  # misses the class-2 nucleus
    pred = [
        tile("b", t2, types_of(t2, {1: 1})),  # right place, wrong class
        tile("a", p1, types_of(p1, {3: 1})),
        tile("extra", t2, types_of(t2, {1: 1})),
    ]
    ev = M.evaluate(pred, truth, ["other", "epithelial"])
    assert [r.name for r in ev.images] == ["a", "b"] and ev.ignored == ("extra",)
    s = ev.summary()
    # pooled: pairs (1,1) and (2,1); one unpaired true of class 2
    assert s["f_d"] == pytest.approx(4 / 5)
    assert s["type_accuracy"] == pytest.approx(0.5)
    assert s["f1_other"] == pytest.approx(2 / (2 + 2))
    assert s["f1_epithelial"] == pytest.approx(0.0)
    assert s["pq"] == pytest.approx((2 / 3 + 1.0) / 2)
    table = ev.table()
    assert "F1 other" in table and "PQ" in table and "AJI+" in table

    ev.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["class_f1"]["other"] == pytest.approx(0.5)
    assert [im["name"] for im in data["images"]] == ["a", "b"]
    ev.write(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("name,n_true,n_pred,dice,aji,aji_plus,dq,sq,pq,f_d,type_accuracy,f1_other")
    assert [ln.split(",")[0] for ln in lines[1:]] == ["a", "b", "ALL"]
    with pytest.raises(DatasetError, match="json or .csv"):
        ev.write(tmp_path / "r.txt")


def test_evaluate_needs_a_prediction_for_every_tile():
    t = rect((20, 20), [(1, 2, 2, 6, 6)])
    with pytest.raises(DatasetError, match="no prediction for 1 ground-truth tile"):
        M.evaluate([tile("x", t, t.astype(np.uint8))], [tile("y", t, t.astype(np.uint8))], ["a"])
    with pytest.raises(LabelError, match="tile 'x'"):
        M.evaluate([tile("x", t[:10], t[:10].astype(np.uint8))], [tile("x", t, t.astype(np.uint8))], ["a"])
