"""fidelity.check_nuclei: what became of each painted nucleus of one render."""

import numpy as np

from napari_diffmix.fidelity import FOUND, MISSED, WRONG_CLASS, check_nuclei


def _disks(shape, disks):
    """(inst_map, type_map) with a disk of radius 5 per (id, cy, cx, class)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst, types = np.zeros(shape, np.int32), np.zeros(shape, np.uint8)
    for nid, cy, cx, k in disks:
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        inst[disk], types[disk] = nid, k
    return inst, types


def test_each_painted_nucleus_is_found_with_its_class_with_another_or_missed():
    # Painted: #3 class 1 at (20, 20), #5 class 2 at (20, 60), #7 class 3 at (60, 20), #9 class 2 at (60, 60).
    inst, types = _disks((80, 80), [(3, 20, 20, 1), (5, 20, 60, 2), (7, 60, 20, 3), (9, 60, 60, 2)])
    # Predicted: #3 found 3 px off with its class, #5 found as class 3, #7 not at all, #9 found
    # without a class, and a nucleus nobody painted (a false positive changes no painted outcome).
    pred_inst, pred_type = _disks((80, 80), [(1, 23, 20, 1), (2, 20, 62, 3), (4, 60, 58, 0), (6, 40, 40, 2)])
    check = check_nuclei(inst, types, pred_inst, pred_type)
    assert check.ids.tolist() == [3, 5, 7, 9]
    assert check.painted.tolist() == [1, 2, 3, 2]
    assert check.predicted.tolist() == [1, 3, 0, -1]
    assert check.outcome.tolist() == [FOUND, WRONG_CLASS, MISSED, WRONG_CLASS]
    assert check.counts() == {FOUND: 1, WRONG_CLASS: 2, MISSED: 1}
    outcome = check.outcome_map(inst)
    assert outcome.dtype == np.uint8
    for nid, code in zip(check.ids, check.outcome):
        assert np.all(outcome[inst == nid] == code)
    assert np.all(outcome[inst == 0] == 0)
    assert np.array_equal(check.pred_inst, pred_inst)


def test_a_prediction_beyond_12_px_does_not_find_a_nucleus():
    inst, types = _disks((64, 64), [(1, 20, 20, 2)])
    pred_inst, pred_type = _disks((64, 64), [(1, 20, 33, 2)])  # 13 px away
    assert check_nuclei(inst, types, pred_inst, pred_type).outcome.tolist() == [MISSED]
    pred_inst, pred_type = _disks((64, 64), [(1, 20, 32, 2)])  # 12 px: the F_d radius
    assert check_nuclei(inst, types, pred_inst, pred_type).outcome.tolist() == [FOUND]
