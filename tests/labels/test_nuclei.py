import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk, ellipse
from skimage.measure import regionprops

from napari_diffmix import nuclei as nu
from napari_diffmix.errors import DatasetError, LabelError


def make_maps(h=96, w=96, n=20, num_classes=3, seed=0, overlap=True):
    """Random elliptical nuclei; with ``overlap`` later ones cover earlier ones, so some touch."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    for i in range(1, n + 1):
        rr, cc = ellipse(
            rng.uniform(6, h - 6), rng.uniform(6, w - 6), rng.uniform(2.5, 6), rng.uniform(2.5, 6),
            shape=(h, w), rotation=rng.uniform(0, np.pi),
        )
        if not overlap:
            free = inst[rr, cc] == 0
            rr, cc = rr[free], cc[free]
        inst[rr, cc] = i
    inst, _ = nu.remap_ids(inst)
    types = np.zeros(inst.max() + 1, np.int32)
    types[1:] = rng.integers(1, num_classes + 1, size=inst.max())
    return inst, types


def isolated_map():
    """Three well separated discs of known classes on a 64x64 map."""
    inst = np.zeros((64, 64), np.int32)
    inst[disk((15, 15), 5)] = 1
    inst[disk((15, 45), 4)] = 2
    rr, cc = ellipse(45, 30, 4, 8, rotation=0.4)
    inst[rr, cc] = 3
    return inst, np.array([0, 2, 1, 3], np.int32)


def assert_contract(inst_map, inst_types):
    assert inst_map.dtype == np.int32 and inst_types.dtype == np.int32
    present = np.unique(inst_map[inst_map > 0])
    classed = np.flatnonzero(inst_types)
    np.testing.assert_array_equal(present, classed)
    nu.check_consistency(inst_map, nu.type_map_from(inst_map, inst_types), inst_types)


def assert_others_only_lost_to(before, after, nid):
    changed = before != after
    # A changed pixel either belonged to the edited nucleus or now belongs to it.
    assert np.all((before[changed] == nid) | (after[changed] == nid))


def run_pure(fn, inst, types, *args):
    inst0, types0 = inst.copy(), types.copy()
    out = fn(inst, types, *args)
    np.testing.assert_array_equal(inst, inst0)
    np.testing.assert_array_equal(types, types0)
    assert out[0] is not inst and out[1] is not types
    return out


def local_mask(inst_map, nid):
    ys, xs = np.nonzero(inst_map == nid)
    return inst_map[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == nid


# -- maps <-> types ------------------------------------------------------------------------------
def test_instance_edges_marks_both_sides():
    inst = np.zeros((5, 6), np.int32)
    inst[1:4, 1:3] = 1
    inst[1:4, 3:5] = 2
    edges = nu.instance_edges(inst)
    assert edges[2, 2] and edges[2, 3]  # nucleus/nucleus boundary, both sides
    assert edges[2, 0] and edges[2, 1]  # background/nucleus
    assert not edges[4, 0] and not edges[0, 5]


def test_changed_mask_finds_moved_and_retyped_nuclei_grown_by_the_margin():
    inst, types = make_maps(seed=3, overlap=False)
    type_map = nu.type_map_from(inst, types)
    assert not nu.changed_mask(inst, type_map, inst, type_map, margin=4).any()
    moved, moved_types = nu.move_nucleus(inst, types, 2, 0, 3)
    retyped, retyped_types = nu.retype_nucleus(moved, moved_types, 5, types[5] % 3 + 1)
    new_types = nu.type_map_from(retyped, retyped_types)
    exact = nu.changed_mask(inst, type_map, retyped, new_types)
    expected = ((inst == 2) ^ (retyped == 2)) | (inst == 5)  # pixels inside both old and new position kept
    np.testing.assert_array_equal(exact, expected)
    grown = nu.changed_mask(inst, type_map, retyped, new_types, margin=2)
    # grown by 2 px in 4-connected steps: the city-block distance to a changed pixel is at most 2
    distance = ndimage.distance_transform_cdt(~expected, metric="taxicab")
    np.testing.assert_array_equal(grown, distance <= 2)
    with pytest.raises(LabelError, match="one shape"):
        nu.changed_mask(inst, type_map, retyped[:-1], new_types[:-1])
    with pytest.raises(LabelError, match="margin"):
        nu.changed_mask(inst, type_map, retyped, new_types, margin=-1)


def test_inst_types_majority_and_type_map_round_trip():
    inst, types = make_maps(seed=1)
    tm = nu.type_map_from(inst, types)
    assert tm.dtype == np.uint8
    np.testing.assert_array_equal(nu.inst_types_from_maps(inst, tm), types)
    noisy = tm.copy()
    ys, xs = np.nonzero(inst == 3)
    noisy[ys[0], xs[0]] = (types[3] % 3) + 1  # one stray pixel does not win the vote
    noisy[ys[1], xs[1]] = 0
    assert nu.inst_types_from_maps(inst, noisy)[3] == types[3]
    only_bg = tm.copy()
    only_bg[inst == 2] = 0
    assert nu.inst_types_from_maps(inst, only_bg)[2] == 0


def test_inst_types_from_maps_sparse_ids():
    inst = np.zeros((4, 4), np.int32)
    inst[0, :2] = 7
    inst[3, 3] = 2_000_000_000
    tm = np.zeros((4, 4), np.uint8)
    tm[0, :2] = 2
    tm[3, 3] = 1
    types = nu.inst_types_from_maps(inst[:, :3], tm[:, :3])
    assert types.tolist() == [0, 0, 0, 0, 0, 0, 0, 2]


def test_type_map_from_rejects_short_inst_types():
    inst, types = make_maps()
    with pytest.raises(LabelError, match=f"id {inst.max()}"):
        nu.type_map_from(inst, types[:-1])


def test_check_consistency_accepts_good_and_explains_bad():
    inst, types = make_maps(seed=2)
    tm = nu.type_map_from(inst, types)
    nu.check_consistency(inst, tm)
    nu.check_consistency(inst, tm, types)

    bg = tm.copy()
    bg[inst == 0] = 0
    bg[np.nonzero(inst == 0)[0][0], np.nonzero(inst == 0)[1][0]] = 2
    with pytest.raises(LabelError, match="tile_7.mat: .*1 background pixel"):
        nu.check_consistency(inst, bg, source="tile_7.mat")

    mixed = tm.copy()
    ys, xs = np.nonzero(inst == 4)
    mixed[ys[: ys.size // 2], xs[: xs.size // 2]] = (types[4] % 3) + 1
    with pytest.raises(LabelError, match=r"mix several classes: .* \(ids 4\)"):
        nu.check_consistency(inst, mixed)

    wrong = types.copy()
    wrong[5] = (types[5] % 3) + 1
    with pytest.raises(LabelError, match=r"disagrees with inst_types: \d+ pixel\(s\) in 1 nuclei \(ids 5\)"):
        nu.check_consistency(inst, tm, wrong)

    untyped = tm.copy()
    untyped[inst == 6] = 0
    with pytest.raises(LabelError, match=r"class 0 \(ids 6\)"):
        nu.check_consistency(inst, untyped)

    with pytest.raises(LabelError, match="differ in shape"):
        nu.check_consistency(inst, tm[:-1])
    with pytest.raises(LabelError, match="integers"):
        nu.check_consistency(inst.astype(float), tm)
    with pytest.raises(LabelError, match="negative"):
        nu.check_consistency(-inst, tm)


def test_remap_ids_is_stable_and_carries_types():
    inst = np.zeros((6, 6), np.int32)
    inst[0, 0], inst[2, 2], inst[4, 4] = 40, 7, 900
    types = np.zeros(901, np.int32)
    types[[7, 40, 900]] = [3, 1, 2]
    new, new_types = nu.remap_ids(inst, types)
    assert new[2, 2] == 1 and new[0, 0] == 2 and new[4, 4] == 3
    assert new_types.tolist() == [0, 3, 1, 2]
    assert new.dtype == np.int32
    huge = inst.astype(np.int64) * 10_000_000
    new2, none = nu.remap_ids(huge)
    np.testing.assert_array_equal(new2, new)
    assert none is None


def test_nuclei_props_match_regionprops():
    inst, types = make_maps(h=80, w=120, seed=3)
    inst[inst == 5] = 0  # a gap in the ids
    props = nu.nuclei_props(inst, types)
    ref = regionprops(inst)
    assert len(props) == len(ref)
    np.testing.assert_array_equal(props.ids, [r.label for r in ref])
    np.testing.assert_allclose(props.centroids, [r.centroid for r in ref])
    np.testing.assert_array_equal(props.areas, [r.area for r in ref])
    np.testing.assert_array_equal(props.bboxes, [r.bbox for r in ref])
    np.testing.assert_array_equal(props.classes, types[props.ids])
    assert props.row(int(props.ids[3])) == 3
    with pytest.raises(LabelError, match="id 5 "):
        props.row(5)
    assert len(nu.nuclei_props(np.zeros((3, 3), np.int32))) == 0


# -- edit verbs ----------------------------------------------------------------------------------
def test_move_keeps_shape_class_and_others():
    inst, types = isolated_map()
    new, new_types = run_pure(nu.move_nucleus, inst, types, 1, 3, -4)
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, 1)
    np.testing.assert_array_equal(np.roll(np.roll(inst == 1, 3, 0), -4, 1), new == 1)
    assert new_types[1] == 2


def test_move_clips_at_border_and_vanishes_off_map():
    inst, types = isolated_map()
    new, new_types = nu.move_nucleus(inst, types, 1, -13, 0)
    assert 0 < np.count_nonzero(new == 1) < np.count_nonzero(inst == 1)
    assert new[0, 15] == 1
    gone, gone_types = nu.move_nucleus(inst, types, 1, -100, 0)
    assert not np.any(gone == 1) and gone_types[1] == 0
    assert_contract(gone, gone_types)


def test_move_over_a_neighbour_occludes_it():
    inst, types = isolated_map()
    new, new_types = nu.move_nucleus(inst, types, 2, 0, -27)  # disc 2 lands on disc 1
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, 2)
    assert np.count_nonzero(new == 2) == np.count_nonzero(inst == 2)
    assert 0 < np.count_nonzero(new == 1) < np.count_nonzero(inst == 1)
    swallowed, sw_types = nu.move_nucleus(new, new_types, 1, 0, 3)
    covered = nu.paste_mask(inst, types, np.ones((14, 14), bool), (15, 15), 3, nid=2)
    assert 1 not in covered[0] and covered[1][1] == 0  # disc 1 entirely covered -> vanished
    assert_contract(*covered)
    assert_contract(swallowed, sw_types)


@pytest.mark.parametrize("angle", [90, 180, 270, -90])
def test_rotate_right_angles_are_exact(angle):
    inst, types = isolated_map()
    new, new_types = run_pure(nu.rotate_nucleus, inst, types, 3, angle)
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, 3)
    k = (angle // 90) % 4
    np.testing.assert_array_equal(local_mask(new, 3), np.rot90(local_mask(inst, 3), k))
    p0, p1 = nu.nuclei_props(inst), nu.nuclei_props(new)
    np.testing.assert_allclose(p1.centroids[2], p0.centroids[2], atol=1.0)


def test_rotate_counter_clockwise_as_displayed():
    inst = np.zeros((40, 40), np.int32)
    inst[20, 15:26] = 1  # horizontal bar
    inst[19:22, 24:26] = 1  # heavier right end
    new, _ = nu.rotate_nucleus(inst, np.array([0, 1]), 1, 90)
    ys, xs = np.nonzero(new == 1)
    heavy_row = np.bincount(ys).argmax()
    assert heavy_row < 20  # the right end went up


@pytest.mark.parametrize("angle", [17, 37.5, 133, -61])
def test_rotate_any_angle_keeps_area_and_connectivity(angle):
    inst, types = make_maps(h=96, w=96, n=12, seed=4, overlap=False)
    props = nu.nuclei_props(inst, types)
    for nid, area, centroid in zip(props.ids, props.areas, props.centroids):
        if area < 30 or ndimage.label(inst == nid)[1] != 1:
            continue
        new, new_types = nu.rotate_nucleus(inst, types, nid, angle)
        assert_others_only_lost_to(inst, new, nid)
        assert_contract(new, new_types)
        mask = new == nid
        assert abs(np.count_nonzero(mask) - area) <= 0.15 * area
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        np.testing.assert_allclose(np.argwhere(mask).mean(0), centroid, atol=1.0)


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_mirrors_about_centroid(axis):
    inst, types = isolated_map()
    new, new_types = run_pure(nu.flip_nucleus, inst, types, 3, axis)
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, 3)
    np.testing.assert_array_equal(local_mask(new, 3), np.flip(local_mask(inst, 3), axis))
    np.testing.assert_allclose(np.argwhere(new == 3).mean(0), np.argwhere(inst == 3).mean(0), atol=0.5)
    with pytest.raises(LabelError, match="axis"):
        nu.flip_nucleus(inst, types, 3, 2)


def test_duplicate_places_copy_with_new_id():
    inst, types = isolated_map()
    new, new_types = run_pure(nu.duplicate_nucleus, inst, types, 2, (50, 55))
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, 4)
    assert new_types[4] == types[2]
    np.testing.assert_array_equal(local_mask(new, 4), local_mask(inst, 2))
    np.testing.assert_allclose(np.argwhere(new == 4).mean(0), (50, 55), atol=0.5)
    np.testing.assert_array_equal(new == 2, inst == 2)


def test_delete_and_retype():
    inst, types = make_maps(seed=5)
    new, new_types = run_pure(nu.delete_nucleus, inst, types, 7)
    assert not np.any(new == 7) and new_types[7] == 0
    assert_contract(new, new_types)
    np.testing.assert_array_equal(new[inst != 7], inst[inst != 7])
    re_map, re_types = run_pure(nu.retype_nucleus, inst, types, 7, 3)
    np.testing.assert_array_equal(re_map, inst)
    assert re_types[7] == 3 and np.array_equal(np.delete(re_types, 7), np.delete(types, 7))
    for bad in (0, 255, 1.5, "x"):
        with pytest.raises(LabelError, match="class"):
            nu.retype_nucleus(inst, types, 7, bad)


def test_paste_mask_new_id_and_replacing_id():
    inst, types = isolated_map()
    mask = np.zeros((7, 5), bool)
    mask[1:6, 1:4] = True
    new, new_types = run_pure(nu.paste_mask, inst, types, mask, (30, 8), 1)
    assert new_types[4] == 1 and np.count_nonzero(new == 4) == 15
    np.testing.assert_allclose(np.argwhere(new == 4).mean(0), (30, 8), atol=0.5)
    assert_contract(new, new_types)
    # Keeping an id: the old nucleus is replaced, like a balancing swap.
    swapped, sw_types = nu.paste_mask(inst, types, mask, (15, 15), 3, nid=1)
    assert np.count_nonzero(swapped == 1) == 15 and sw_types[1] == 3
    np.testing.assert_array_equal(swapped[inst != 1], inst[inst != 1])
    assert_contract(swapped, sw_types)
    with pytest.raises(LabelError, match="empty"):
        nu.paste_mask(inst, types, np.zeros((3, 3), bool), (5, 5), 1)


def test_overlapping_paste_follows_occlusion_rule():
    inst, types = make_maps(h=64, w=64, n=30, seed=6)
    big = np.ones((21, 21), bool)
    new, new_types = run_pure(nu.paste_mask, inst, types, big, (32, 32), 2)
    nid = inst.max() + 1
    assert_contract(new, new_types)
    assert_others_only_lost_to(inst, new, nid)
    assert np.all(new[22:43, 22:43] == nid)
    covered = np.unique(inst[22:43, 22:43])
    vanished = [k for k in covered if k and not np.any(new == k)]
    survived = [k for k in covered if k and np.any(new == k)]
    assert vanished and survived  # the generator is seeded to give both cases
    assert all(new_types[k] == 0 for k in vanished)
    assert all(new_types[k] == types[k] for k in survived)
    untouched = [k for k in range(1, inst.max() + 1) if k not in covered]
    for k in untouched:
        np.testing.assert_array_equal(new == k, inst == k)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: nu.move_nucleus(m, t, 99, 1, 1),
        lambda m, t: nu.rotate_nucleus(m, t, 99, 30),
        lambda m, t: nu.flip_nucleus(m, t, 99, 0),
        lambda m, t: nu.duplicate_nucleus(m, t, 99, (5, 5)),
        lambda m, t: nu.delete_nucleus(m, t, 99),
        lambda m, t: nu.retype_nucleus(m, t, 99, 1),
    ],
)
def test_absent_id_raises_label_error_naming_it(call):
    inst, types = isolated_map()
    with pytest.raises(LabelError, match="nucleus id 99 is not in the inst_map"):
        call(inst, types)


def test_invalid_ids_and_maps():
    inst, types = isolated_map()
    with pytest.raises(LabelError, match="id 0"):
        nu.delete_nucleus(inst, types, 0)
    with pytest.raises(LabelError, match="2-D"):
        nu.move_nucleus(inst[None], types, 1, 1, 1)


def test_edits_chain_on_touching_nuclei():
    inst, types = make_maps(h=128, w=128, n=60, seed=7)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ids = np.flatnonzero(types)
        nid = int(rng.choice(ids))
        op = rng.integers(5)
        before = inst
        if op == 0:
            inst, types = nu.move_nucleus(inst, types, nid, *rng.integers(-10, 11, 2))
        elif op == 1:
            inst, types = nu.rotate_nucleus(inst, types, nid, rng.uniform(-180, 180))
        elif op == 2:
            inst, types = nu.flip_nucleus(inst, types, nid, int(rng.integers(2)))
        elif op == 3:
            inst, types = nu.duplicate_nucleus(inst, types, nid, rng.uniform(0, 128, 2))
            nid = before.max() + 1
        else:
            inst, types = nu.retype_nucleus(inst, types, nid, int(rng.integers(1, 4)))
        assert_others_only_lost_to(before, inst, nid)
        assert_contract(inst, types)


# -- nuclei bank ---------------------------------------------------------------------------------
def test_bank_from_maps_query_sample_and_border():
    maps = [make_maps(seed=s, overlap=False) for s in range(3)]
    bank = nu.NucleiBank.from_maps(maps)
    total = sum(len(nu.nuclei_props(m)) for m, _ in maps)
    assert len(bank) == total
    m0, t0 = maps[0]
    p0 = nu.nuclei_props(m0, t0)
    np.testing.assert_array_equal(bank.areas[: len(p0)], p0.areas)
    np.testing.assert_array_equal(bank.classes[: len(p0)], p0.classes)
    np.testing.assert_array_equal(bank.mask(0), local_mask(m0, p0.ids[0]))
    assert not bank.mask(0).flags.writeable

    idx = bank.query(2, min_area=20, max_area=60)
    assert idx.size and np.all(bank.classes[idx] == 2)
    assert np.all((bank.areas[idx] >= 20) & (bank.areas[idx] <= 60))
    assert set(bank.query(source=1)) == set(np.flatnonzero(bank.sources == 1))

    a = [bank.sample(1, np.random.default_rng(3)) for _ in range(3)]
    assert len(set(a)) == 1 and bank.classes[a[0]] == 1
    draws = {bank.sample(1, np.random.default_rng(s)) for s in range(300)}
    assert draws == set(bank.query(1).tolist())
    assert bank.sample(1, 0, exclude=bank.query(1)) is None
    assert bank.sample(3, 0, max_area=1) is None

    inner = nu.NucleiBank.from_maps(maps, border=10)
    assert 0 < len(inner) < len(bank)
    assert "NucleiBank(" in repr(inner)


def test_bank_skips_unclassed_and_accepts_tile_like_objects():
    inst, types = isolated_map()
    types = types.copy()
    types[2] = 0

    class TileLike:
        inst_map, inst_types = inst, types

    bank = nu.NucleiBank.from_maps([TileLike()])
    assert sorted(bank.classes.tolist()) == [2, 3]


def test_bank_save_load_round_trip(tmp_path):
    bank = nu.NucleiBank.from_maps([make_maps(seed=8)])
    path = tmp_path / "sub" / "bank.npz"
    bank.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["bank.npz"]
    back = nu.NucleiBank.load(path)
    assert len(back) == len(bank)
    np.testing.assert_array_equal(back.classes, bank.classes)
    np.testing.assert_array_equal(back.areas, bank.areas)
    np.testing.assert_array_equal(back.sources, bank.sources)
    for i in range(len(bank)):
        np.testing.assert_array_equal(back.mask(i), bank.mask(i))
    empty = tmp_path / "empty.npz"
    nu.NucleiBank([], []).save(empty)
    assert len(nu.NucleiBank.load(empty)) == 0


def test_bank_load_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="missing.npz: .*does not exist"):
        nu.NucleiBank.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(DatasetError, match="junk.npz"):
        nu.NucleiBank.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(DatasetError, match="other.npz: not a napari-diffmix nuclei bank"):
        nu.NucleiBank.load(other)
