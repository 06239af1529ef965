"""Batch primitives of nuclei.py: draw_nuclei, nucleus_masks, nuclei_bboxes."""

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from napari_diffmix import nuclei as nu
from napari_diffmix.errors import LabelError


def two_discs():
    inst = np.zeros((40, 40), np.int32)
    inst[disk((10, 10), 4)] = 1
    inst[disk((10, 28), 5)] = 2
    rr, cc = ellipse(28, 20, 4, 7)
    inst[rr, cc] = 3
    return inst, np.array([0, 1, 2, 3], np.int32)


def square(n):
    return np.ones((n, n), bool)


def test_draw_nuclei_matches_paste_mask_when_nothing_overlaps():
    inst, types = two_discs()
    mask = square(3)
    expect, etypes = nu.paste_mask(inst, types, mask, (30, 5), 2, nid=1)
    got, gtypes = nu.draw_nuclei(inst, types, [(1, 2, mask, (29, 4))], erase=[1])
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(gtypes, etypes)


def test_draw_nuclei_is_pure_and_later_stamps_win():
    inst, types = two_discs()
    inst0, types0 = inst.copy(), types.copy()
    out, t = nu.draw_nuclei(inst, types, [(5, 1, square(6), (0, 0)), (6, 3, square(4), (2, 2))])
    np.testing.assert_array_equal(inst, inst0)
    np.testing.assert_array_equal(types, types0)
    assert out is not inst and t is not types
    assert np.all(out[2:6, 2:6] == 6)  # the later stamp covers the earlier one
    assert np.count_nonzero(out == 5) == 36 - 16
    assert t[5] == 1 and t[6] == 3 and out.dtype == np.int32 and t.dtype == np.int32
    np.testing.assert_array_equal(nu.type_map_from(out, t), t[out])


def test_draw_nuclei_occlusion_clipping_and_vanishing():
    inst, types = two_discs()
    # A big stamp swallows nucleus 1 entirely and part of 3; a stamp off the map leaves nothing.
    out, t = nu.draw_nuclei(inst, types, [(7, 2, square(14), (3, 3)), (8, 1, square(3), (50, 50))])
    assert not np.any(out == 1) and t[1] == 0
    assert not np.any(out == 8) and t[8] == 0
    assert t[3] == 3 and np.any(out == 3)
    # Clipping: a stamp hanging over the corner keeps only its inside pixels.
    out, t = nu.draw_nuclei(inst, types, [(9, 1, square(6), (-3, -3))])
    assert np.count_nonzero(out == 9) == 9 and t[9] == 1


def test_draw_nuclei_erase_and_redraw_same_id_and_last_class():
    inst, types = two_discs()
    area = np.count_nonzero(inst == 2)
    out, t = nu.draw_nuclei(inst, types, [(2, 1, square(2), (0, 38)), (2, 3, square(2), (38, 0))], erase=[2])
    assert np.count_nonzero(out == 2) == 8 and area != 8
    assert t[2] == 3  # the last stamp of an id sets its class
    out, t = nu.draw_nuclei(inst, types, [], erase=[1, 3])
    assert set(np.unique(out)) == {0, 2} and t[1] == 0 and t[3] == 0 and t[2] == 2


def test_draw_nuclei_sparse_ids_take_the_slow_path_with_same_result():
    inst, types = two_discs()
    offset = 100_000  # ids far above the pixel count: no lookup table over ids
    sparse = np.where(inst > 0, inst + offset, 0).astype(np.int32)
    stypes = np.zeros(offset + 4, np.int32)
    stypes[offset + 1 :] = types[1:]
    stamps = [(offset + 1, 2, square(3), (29, 4))]
    out, t = nu.draw_nuclei(sparse, stypes, stamps, erase=[offset + 1, offset + 3])
    ref, rt = nu.draw_nuclei(inst, types, [(1, 2, square(3), (29, 4))], erase=[1, 3])
    np.testing.assert_array_equal(out, np.where(ref > 0, ref + offset, 0))
    np.testing.assert_array_equal(t[offset:], rt)


def test_draw_nuclei_rejects_bad_stamps():
    inst, types = two_discs()
    with pytest.raises(LabelError, match="class"):
        nu.draw_nuclei(inst, types, [(4, 0, square(2), (0, 0))])
    with pytest.raises(LabelError, match="nucleus id"):
        nu.draw_nuclei(inst, types, [(0, 1, square(2), (0, 0))])
    with pytest.raises(LabelError, match="2-D"):
        nu.draw_nuclei(inst, types, [(4, 1, np.ones(3, bool), (0, 0))])


def test_nucleus_masks_and_bboxes_match_props():
    rng = np.random.default_rng(0)
    inst = np.zeros((64, 64), np.int32)
    for i in range(1, 15):
        rr, cc = ellipse(rng.uniform(5, 59), rng.uniform(5, 59), rng.uniform(2, 5), rng.uniform(2, 5), shape=inst.shape)
        inst[rr, cc] = 3 * i  # sparse ids
    props = nu.nuclei_props(inst)
    masks = nu.nucleus_masks(inst, props)
    for nid, m, (y0, x0, y1, x1) in zip(props.ids, masks, props.bboxes):
        assert m.shape == (y1 - y0, x1 - x0) and m.dtype == bool
        np.testing.assert_array_equal(m, inst[y0:y1, x0:x1] == nid)
    ids, boxes = nu.nuclei_bboxes(inst)
    np.testing.assert_array_equal(ids, props.ids)
    np.testing.assert_array_equal(boxes, props.bboxes)
    ids, boxes = nu.nuclei_bboxes(np.where(inst > 0, inst + 10**8, 0))
    np.testing.assert_array_equal(ids, props.ids + 10**8)
    np.testing.assert_array_equal(boxes, props.bboxes)
    ids, boxes = nu.nuclei_bboxes(np.zeros((5, 5), np.int32))
    assert ids.size == 0 and boxes.shape == (0, 4)
