"""Files made by other tools: HoVer-Net's run_infer output, Lizard, CoNIC and QuPath GeoJSON.

Each test writes a small file in the tool's own convention (keys, dtypes, shapes, x/y order)
and checks which nuclei come back, where, and with which class.
"""

import json

import imageio.v3 as iio
import numpy as np
import pytest
from scipy.io import savemat

from napari_diffmix import datasets as ds
from napari_diffmix.classes import CONSEP, LIZARD
from napari_diffmix.cli import main
from napari_diffmix.errors import DatasetError, SchemeError

H, W = 60, 80
# (row0, col0, height, width): wide and tall boxes off the diagonal, so swapping x and y shows.
BOXES = [(4, 10, 6, 14), (20, 50, 12, 5), (40, 5, 8, 9), (45, 60, 5, 16)]


def box_map(boxes=BOXES, ids=None, shape=(H, W)):
    inst = np.zeros(shape, np.int32)
    for k, (r, c, h, w) in enumerate(boxes):
        inst[r : r + h, c : c + w] = k + 1 if ids is None else ids[k]
    return inst


def cv2_contour(r, c, h, w):
    """The outline OpenCV's findContours (CHAIN_APPROX_SIMPLE) gives a filled box: its corner pixels, x first."""
    return [[c, r], [c, r + h - 1], [c + w - 1, r + h - 1], [c + w - 1, r]]


# -- HoVer-Net run_infer output --------------------------------------------------------------------
def hovernet_output(out, stem="test_1", types=(1, 2, 3, 4), with_overlay=True):
    """What HoVer-Net's infer/tile.py writes for one tile: mat/, json/, overlay/ (no type_map, no image).

    A fifth, tiny instance sits in inst_map but not in the lists (HoVer-Net drops instances whose
    contour has fewer than 3 points).
    """
    inst = box_map()
    inst[0:1, 0:2] = 5
    uid = np.arange(1, len(BOXES) + 1)
    centroid_xy = np.array([[c + (w - 1) / 2, r + (h - 1) / 2] for r, c, h, w in BOXES])
    (out / "mat").mkdir(parents=True)
    savemat(out / "mat" / f"{stem}.mat", {
        "inst_map": inst,  # int32
        "inst_uid": uid[:, None],
        "inst_type": np.asarray(types)[:, None],
        "inst_centroid": centroid_xy,
    })
    nuc = {}
    for k, (r, c, h, w) in enumerate(BOXES, start=1):
        nuc[str(k)] = {
            "bbox": [[r, c], [r + h, c + w]],
            "centroid": centroid_xy[k - 1].tolist(),
            "contour": cv2_contour(r, c, h, w),
            "type_prob": 0.9,
            "type": int(types[k - 1]),
        }
    (out / "json").mkdir()
    (out / "json" / f"{stem}.json").write_text(json.dumps({"mag": None, "nuc": nuc}))
    if with_overlay:
        (out / "overlay").mkdir()
        iio.imwrite(out / "overlay" / f"{stem}.png", np.zeros((H, W, 3), np.uint8))
    return inst


def consep_truth(root, stem="test_1", raw=(1, 2, 4, 6)):
    """CoNSeP ground truth of the same boxes, raw types (4 -> epithelial 3, 6 -> spindle 4)."""
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    inst = box_map()
    raw = np.asarray(raw)
    savemat(root / "Labels" / f"{stem}.mat", {
        "inst_map": inst.astype(float), "type_map": np.r_[0, raw][inst].astype(float),
        "inst_type": raw[:, None].astype(float), "inst_centroid": np.zeros((len(raw), 2)),
    })
    iio.imwrite(root / "Images" / f"{stem}.png", np.full((H, W, 3), 200, np.uint8))


def test_hovernet_mat_output_keeps_model_classes_and_unlisted_ids(tmp_path):
    inst = hovernet_output(tmp_path / "out")
    d = ds.open_dataset(tmp_path / "out" / "mat", "consep")
    assert d.layout == "hovernet" and d.names == ["test_1"]
    tile = d[0]
    assert tile.image is None and np.array_equal(tile.inst_map, inst)
    # The model's classes as they are: 4 stays spindle (merging would make it epithelial).
    assert tile.inst_types.tolist() == [0, 1, 2, 3, 4, 0]
    r, c, h, w = BOXES[1]
    assert np.all(tile.type_map[r : r + h, c : c + w] == 2)
    assert ds.open_dataset(tmp_path / "out", "consep").layout == "hovernet"  # the run_infer folder itself


def test_hovernet_json_output_fills_contours_x_then_y(tmp_path):
    hovernet_output(tmp_path / "out")
    tile = ds.open_dataset(tmp_path / "out" / "json", "consep")[0]
    assert np.array_equal(tile.inst_map, box_map())  # the unlisted tiny instance is not in the json
    assert tile.inst_types.tolist() == [0, 1, 2, 3, 4]
    # Without mat/ or overlay/ the json has no image size.
    hovernet_output(tmp_path / "bare", with_overlay=False)
    import shutil

    shutil.rmtree(tmp_path / "bare" / "mat")
    with pytest.raises(DatasetError, match=r"test_1\.json: HoVer-Net \.json files carry no image size"):
        ds.open_dataset(tmp_path / "bare" / "json", "consep")[0]


def test_hovernet_missing_keys_are_named(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "a.json").write_text(json.dumps({"mag": None, "nuclei": {}}))
    (tmp_path / "mat").mkdir()
    savemat(tmp_path / "mat" / "a.mat", {"inst_map": box_map(), "inst_uid": np.arange(1, 5)[:, None]})
    with pytest.raises(DatasetError, match=r"a\.json: missing key 'nuc'"):
        ds.read_hovernet_json_labels(tmp_path / "json" / "a.json", (H, W), CONSEP)
    (tmp_path / "json" / "a.json").write_text(json.dumps({"nuc": {"1": {"centroid": [1, 2], "type": 1}}}))
    with pytest.raises(DatasetError, match=r"a\.json: nucleus 1: missing key 'contour'"):
        ds.read_hovernet_json_labels(tmp_path / "json" / "a.json", (H, W), CONSEP)
    # No inst_type: an instance-only model; every nucleus unclassed.
    assert ds.open_dataset(tmp_path / "mat", "consep")[0].inst_types.tolist() == [0, 0, 0, 0, 0]
    savemat(tmp_path / "mat" / "a.mat", {"inst_uid": np.arange(1, 5)[:, None], "inst_type": np.ones((4, 1))})
    with pytest.raises(DatasetError, match=r"a\.mat: missing key 'inst_map'"):
        ds.open_dataset(tmp_path / "mat", "consep")[0]
    savemat(tmp_path / "mat" / "a.mat", {"inst_map": box_map(), "inst_uid": np.arange(1, 5)[:, None], "inst_type": np.full((4, 1), 7)})
    with pytest.raises(SchemeError, match=r"a\.mat: inst_type holds class ids \[7\] outside 0\.\.4 of scheme 'consep'"):
        ds.open_dataset(tmp_path / "mat", "consep")[0]


def test_evaluate_hovernet_output_against_consep_and_stats(tmp_path, capsys):
    hovernet_output(tmp_path / "hovernet_out", types=(1, 2, 3, 4))
    consep_truth(tmp_path / "CoNSeP" / "Test", raw=(1, 2, 4, 6))  # merged 1, 2, 3, 4: all correct
    out = tmp_path / "res.json"
    assert main(["evaluate", str(tmp_path / "hovernet_out" / "mat"), str(tmp_path / "CoNSeP" / "Test"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "using 'consep', which the path" in printed
    res = json.loads(out.read_text())
    assert res["summary"]["n_true"] == 4 and res["summary"]["n_pred"] == 5  # the unlisted instance is a detection
    assert res["class_f1"] == {"other": 1.0, "inflammatory": 1.0, "epithelial": 1.0, "spindle": 1.0}
    # A misclassified nucleus costs its classes' F1.
    hovernet_output(tmp_path / "wrong", types=(1, 2, 3, 3))
    assert main(["evaluate", str(tmp_path / "wrong" / "json"), str(tmp_path / "CoNSeP" / "Test"), "--scheme", "consep", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["class_f1"]["spindle"] == 0.0 and res["class_f1"]["other"] == 1.0 and res["summary"]["f_d"] == 1.0
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "hovernet_out" / "mat"), "--scheme", "consep", "--json", str(tmp_path / "s.json")]) == 0
    assert "layout hovernet" in capsys.readouterr().out
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["total"]["nuclei"] == 4  # the unclassed detection has no class to count under
    assert [stats["total"]["classes"][n]["nuclei"] for n in CONSEP.names] == [1, 1, 1, 1]
