import numpy as np
import pytest
import torch

from napari_diffmix.classes import CONSEP
from napari_diffmix.errors import LabelError
from napari_diffmix.model.condition import condition_batch, make_condition, null_condition_like


def small_maps():
    inst = np.zeros((6, 7), dtype=np.int32)
    inst[1:3, 1:3] = 1  # class 2
    inst[1:3, 3:5] = 2  # touches nucleus 1, class 4
    inst[4:6, 5:7] = 3  # at the border, class 1
    inst_types = np.array([0, 2, 4, 1])
    return inst, inst_types[inst].astype(np.uint8)


def test_channels_one_hot_and_edges():
    inst, types = small_maps()
    cond = make_condition(inst, types, 4)
    assert cond.shape == (6, 6, 7) and cond.dtype == torch.float32
    onehot = cond[:5].numpy()
    assert np.array_equal(onehot.sum(0), np.ones((6, 7)))
    for k in range(5):
        assert np.array_equal(onehot[k], types == k)
    edges = cond[5].numpy()
    assert set(np.unique(edges)) <= {0.0, 1.0}
    # both sides of the nucleus/nucleus boundary and nucleus/background boundaries are edges
    assert edges[1, 2] == 1 and edges[1, 3] == 1 and edges[0, 1] == 1 and edges[1, 0] == 1
    # 2x2 nuclei away from the image border have no interior: every pixel is an edge
    assert edges[inst == 1].all() and edges[inst == 2].all()
    # the image border itself is no edge: nucleus 3's corner pixel only touches nucleus 3
    assert edges[5, 6] == 0
    # background far from nuclei is no edge
    assert edges[5, 0] == 0 and edges[4, 0] == 0
    assert np.array_equal(make_condition(inst, types, CONSEP).numpy(), cond.numpy())


def test_interior_pixel_is_no_edge():
    inst = np.zeros((7, 7), dtype=np.int32)
    inst[1:6, 1:6] = 5
    cond = make_condition(inst, (inst > 0).astype(np.uint8), 1)
    assert cond.shape[0] == 3
    assert cond[2, 3, 3] == 0 and cond[2, 1, 3] == 1 and cond[2, 0, 3] == 1


def test_class_ids_validated():
    inst, types = small_maps()
    with pytest.raises(LabelError, match=r"class id\(s\) \[4\] outside 0..3"):
        make_condition(inst, types, 3)
    with pytest.raises(LabelError, match="differ in shape"):
        make_condition(inst, types[:, :6], 4)
    with pytest.raises(LabelError, match="integer"):
        make_condition(inst.astype(float), types, 4)
    with pytest.raises(LabelError, match="2-D"):
        make_condition(inst[None], types[None], 4)


def test_batch_matches_single_and_checks_sizes():
    inst, types = small_maps()
    inst2, types2 = np.flipud(inst).copy(), np.flipud(types).copy()
    batch = condition_batch(np.stack([inst, inst2]), [types, types2], 4)
    assert batch.shape == (2, 6, 6, 7)
    assert torch.equal(batch[1], make_condition(inst2, types2, 4))
    with pytest.raises(LabelError, match="label map 1"):
        condition_batch([inst, inst[:, :5]], [types, types[:, :5]], 4)
    with pytest.raises(LabelError, match="label map 1: type_map"):
        condition_batch([inst, inst], [types, types + 5], 4)
    with pytest.raises(LabelError, match="2 inst_maps but 1"):
        condition_batch([inst, inst], [types], 4)


def test_null_condition():
    inst, types = small_maps()
    cond = condition_batch([inst], [types], 4)
    null = null_condition_like(cond)
    assert null.shape == cond.shape and null.dtype == cond.dtype and not null.any()
