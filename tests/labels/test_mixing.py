"""Balancing and enlarging maps, balanced-set plans, and the ``diffmix labels`` command."""

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import ellipse

from napari_diffmix import mixing as mx
from napari_diffmix import nuclei as nu
from napari_diffmix.classes import DEMO
from napari_diffmix.cli import main
from napari_diffmix.datasets import Dataset, Tile, open_dataset, write_generic
from napari_diffmix.errors import DatasetError, LabelError, SchemeError

RARE = 1  # DEMO scheme: 1 other (rare), 2 epithelial, 3 stromal


def make_maps(h=160, w=160, n=70, rare_share=0.1, seed=0, touching=False):
    """Elliptic nuclei: rare class 1 small (r ~3 px), classes 2 and 3 larger (r ~5-7 px)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    classes = [0]
    for _ in range(n):
        rare = rng.random() < rare_share
        r = rng.uniform(2.5, 3.5) if rare else rng.uniform(4.5, 7.0)
        rr, cc = ellipse(
            rng.uniform(3, h - 3), rng.uniform(3, w - 3), r, r * rng.uniform(0.7, 1.0), shape=(h, w),
            rotation=rng.uniform(0, np.pi),
        )
        if touching:
            free = inst[rr, cc] == 0
            rr, cc = rr[free], cc[free]
        elif inst[rr, cc].any():
            continue
        if rr.size < 5:
            continue
        inst[rr, cc] = len(classes)
        classes.append(RARE if rare else int(rng.integers(2, 4)))
    inst, types = nu.remap_ids(inst, np.array(classes, np.int32))
    return inst, types


def make_dataset(n_tiles=3, size=160, rare_share=0.1, seed=0, n=70):
    tiles = []
    for i in range(n_tiles):
        inst, types = make_maps(size, size, n, rare_share, seed=seed + i)
        tiles.append(Tile(f"tile{i}", None, inst, nu.type_map_from(inst, types)))
    return Dataset(tiles, DEMO)


def counts(inst, types, c=3):
    props = nu.nuclei_props(inst, types)
    return np.bincount(props.classes, minlength=c + 1)


def local_mask(inst, nid):
    ys, xs = np.nonzero(inst == nid)
    return inst[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == nid


def assert_contract(inst, types):
    assert inst.dtype == np.int32 and types.dtype == np.int32
    present = np.unique(inst[inst > 0])
    np.testing.assert_array_equal(present, np.flatnonzero(types))  # every present id classed, absent ids 0
    type_map = nu.type_map_from(inst, types)
    np.testing.assert_array_equal(type_map, types[inst])
    nu.check_consistency(inst, type_map, types)


@pytest.fixture(scope="module")
def pool_maps():
    return [make_maps(seed=s) for s in range(4)]


@pytest.fixture(scope="module")
def pool(pool_maps):
    return mx.DonorPool.from_maps(pool_maps, classes=[RARE], names=[f"t{i}" for i in range(4)])


# -- balancing -----------------------------------------------------------------------------------
def test_balancing_follows_the_published_rules(pool_maps, pool):
    inst, types = pool_maps[0]
    inst0, types0 = inst.copy(), types.copy()
    params = mx.BalanceParams()
    res = mx.balance_map(inst, types, RARE, params=params, donors=pool, tile_index=0, rng=1)
    np.testing.assert_array_equal(inst, inst0)
    np.testing.assert_array_equal(types, types0)
    out, otypes, rec = res.inst_map, res.inst_types, res.record
    assert_contract(out, otypes)
    np.testing.assert_array_equal(res.type_map, otypes[out])

    before, after = counts(inst, types), counts(out, otypes)
    assert len(rec.edits) > 10
    assert after[RARE] / after.sum() > before[RARE] / before.sum() + 0.1

    props = nu.nuclei_props(inst, types)
    h, w = inst.shape
    cy, cx = props.centroids.T
    border = (cy < 30) | (cy > h - 30) | (cx < 30) | (cx > w - 30)
    major_eligible = np.count_nonzero(~border & (props.classes != RARE))
    assert rec.eligible_major == major_eligible
    assert rec.targets == int(0.8 * major_eligible)
    assert rec.unmatched == rec.targets - len(rec.edits)

    donors_used = [(e.donor_tile, e.donor_id) for e in rec.edits]
    assert len(set(donors_used)) == len(donors_used)  # each donor at most once per tile
    targets = [e.target_id for e in rec.edits]
    assert len(set(targets)) == len(targets)
    areas = [props.areas[props.row(t)] for t in targets]
    assert areas == sorted(areas)  # smallest targets first
    edited = np.array(targets)
    for e in rec.edits:
        row = props.row(e.target_id)
        assert props.classes[row] != RARE and not border[row]
        room = int(np.count_nonzero(ndimage.binary_dilation(inst == e.target_id, iterations=2)))
        dinst, dtypes = pool_maps[e.donor_tile]
        donor = dinst == e.donor_id
        assert e.room == room and e.donor_area == np.count_nonzero(donor)
        assert room >= 2.3 * np.count_nonzero(donor)  # the fit rule
        assert dtypes[e.donor_id] == RARE and e.cls == RARE and otypes[e.target_id] == RARE
        dprops = nu.nuclei_props(dinst)
        dc = dprops.centroids[dprops.row(e.donor_id)]
        assert 30 <= dc[0] <= h - 30 and 30 <= dc[1] <= w - 30  # donors obey the border rule too
        pasted = out == e.target_id
        if np.count_nonzero(pasted) == np.count_nonzero(donor):  # not covered by a later donor
            np.testing.assert_array_equal(local_mask(out, e.target_id), local_mask(dinst, e.donor_id))
            ys, xs = np.nonzero(pasted)
            assert abs(ys.mean() - cy[row]) <= 0.5 + 1e-6 and abs(xs.mean() - cx[row]) <= 0.5 + 1e-6

    # Nuclei that were not edited keep their id and class and only lose pixels to pasted donors.
    assert set(np.unique(out)) <= set(np.unique(inst))
    changed = inst != out
    assert np.all(np.isin(inst[changed], edited) | np.isin(out[changed], edited))
    for row in np.flatnonzero(border):
        nid = props.ids[row]
        assert not np.any((out == nid) & (inst != nid))
        if np.any(out == nid):
            assert otypes[nid] == types[nid]


def test_donor_order_same_tile_first_then_whole_tiles_in_random_order(pool_maps, pool):
    inst, types = pool_maps[1]
    # With a tiny fit ratio every donor fits, so donors are used exactly in queue order.
    res = mx.balance_map(inst, types, RARE, params=mx.BalanceParams(fit_ratio=0.01), donors=pool, tile_index=1, rng=0)
    used = [(e.donor_tile, e.donor_id) for e in res.record.edits]
    assert len(used) == min(res.record.targets, pool.count(RARE))
    blocks = [used[0][0]]
    for (t, _), (prev_t, _) in zip(used[1:], used):
        if t != prev_t:
            blocks.append(t)
    assert blocks[0] == 1 and len(blocks) == len(set(blocks)) > 1  # own tile first, each tile one block
    for t in blocks[:-1]:  # every block but the last is complete and in id order
        ids = [d for tt, d in used if tt == t]
        assert ids == sorted(pool.ids[pool.bank.query(RARE, source=t)].tolist())
    orders = {
        tuple(e.donor_tile for e in mx.balance_map(inst, types, RARE, params=mx.BalanceParams(fit_ratio=0.01),
                                                   donors=pool, tile_index=1, rng=r).record.edits)
        for r in range(6)
    }
    assert len(orders) > 1  # the other tiles come in a seed-dependent order


def test_standalone_map_uses_its_own_donors_and_no_fit_keeps_targets():
    inst, types = make_maps(seed=3, rare_share=0.2)
    res = mx.balance_map(inst, types, RARE, rng=0)
    assert res.record.edits and {e.donor_tile for e in res.record.edits} == {0}
    kept = mx.balance_map(inst, types, RARE, params=mx.BalanceParams(fit_ratio=1e6), rng=0)
    np.testing.assert_array_equal(kept.inst_map, inst)
    np.testing.assert_array_equal(kept.inst_types[: types.size], types)
    assert not kept.record.edits and kept.record.unmatched == kept.record.targets > 0


def test_no_rare_nuclei_anywhere_warns_and_changes_nothing():
    inst, types = make_maps(rare_share=0.0, seed=5)
    res = mx.balance_map(inst, types, RARE, rng=0)
    np.testing.assert_array_equal(res.inst_map, inst)
    assert not res.record.edits and res.record.donors == {RARE: 0}
    assert res.record.warnings and "no nuclei of rare class" in res.record.warnings[0]
    assert "nothing to paste" in res.record.to_dict()["warnings"][0]


def test_empty_single_and_touching_maps():
    empty = np.zeros((64, 64), np.int32)
    res = mx.balance_map(empty, np.zeros(1, np.int32), RARE, rng=0)
    assert not res.inst_map.any() and res.record.targets == 0
    en = mx.enlarge_map(empty, np.zeros(1, np.int32), rng=0)
    assert not en.inst_map.any() and en.shifts.shape == (0, 3)

    single = np.zeros((100, 100), np.int32)
    rr, cc = ellipse(50, 50, 8, 6)
    single[rr, cc] = 1
    one = np.array([0, 2], np.int32)
    res = mx.balance_map(single, one, RARE, rng=0)
    np.testing.assert_array_equal(res.inst_map, single)
    en = mx.enlarge_map(single, one, params=mx.EnlargeParams(probability=1.0, shift_range=(4, 4)), rng=0)
    np.testing.assert_array_equal(en.inst_map, np.roll(single, (4, 4), axis=(0, 1)))

    inst, types = make_maps(touching=True, seed=7, n=120, rare_share=0.15)
    touching = (inst[1:] != inst[:-1]) & (inst[1:] > 0) & (inst[:-1] > 0)
    assert touching.any()
    res = mx.balance_map(inst, types, RARE, rng=2)
    assert res.record.edits
    assert_contract(res.inst_map, res.inst_types)
    en = mx.enlarge_map(inst, types, params=mx.EnlargeParams(band=8), rng=3)
    assert en.shifts.shape[0] > 0
    assert_contract(en.inst_map, en.inst_types)


def test_several_rare_classes_take_turns():
    rng = np.random.default_rng(11)
    maps = []
    for s in range(3):
        inst, types = make_maps(seed=20 + s, rare_share=0.3, n=90)
        rare_rows = np.flatnonzero(types == RARE)
        types[rare_rows[rng.random(rare_rows.size) < 0.5]] = 3  # two small-nucleus rare classes: 1 and 3
        maps.append((inst, types))
    pool = mx.DonorPool.from_maps(maps, classes=[1, 3])
    params = mx.BalanceParams(fit_ratio=0.01)  # every donor fits: the turn order alone decides
    res = mx.balance_map(*maps[0], (1, 3), major=(2,), params=params, donors=pool, tile_index=0, rng=0)
    cls = [e.cls for e in res.record.edits]
    n = min(pool.count(1), pool.count(3))
    assert cls[: 2 * n] == [1, 3] * n or len(cls) < 2 * n and cls == [1, 3] * (len(cls) // 2) + [1] * (len(cls) % 2)
    res = mx.balance_map(*maps[0], (3, 1), major=(2,), params=params, donors=pool, tile_index=0, rng=0)
    assert [e.cls for e in res.record.edits][:2] == [3, 1]  # the rarest listed class goes first
    assert all(maps[0][1][e.target_id] == 2 for e in res.record.edits)


def test_balance_params_and_inputs_are_validated(pool):
    with pytest.raises(LabelError, match="target_fraction"):
        mx.BalanceParams(target_fraction=1.5)
    with pytest.raises(LabelError, match="border"):
        mx.BalanceParams(border=-1)
    with pytest.raises(LabelError, match="fit_ratio"):
        mx.BalanceParams(fit_ratio=0)
    inst, types = make_maps(seed=1)
    with pytest.raises(LabelError, match="border"):
        mx.balance_map(inst, types, RARE, params=mx.BalanceParams(border=10), donors=pool, tile_index=0)
    with pytest.raises(SchemeError):
        mx.balance_map(inst, types, (), rng=0)
    bad = types.copy()
    bad[3] = 0
    with pytest.raises(LabelError, match="class 0"):
        mx.balance_map(inst, bad, RARE)


# -- enlarging -----------------------------------------------------------------------------------
def test_enlarging_moves_interior_nuclei_within_range():
    inst, types = make_maps(128, 128, n=60, seed=9)
    params = mx.EnlargeParams(band=20, shift_range=(-6, 5), probability=0.5)
    res = mx.enlarge_map(inst, types, params=params, rng=4)
    out, otypes, shifts = res.inst_map, res.inst_types, res.shifts
    assert_contract(out, otypes)
    assert shifts.shape[0] > 3
    assert np.all((shifts[:, 1:] >= -6) & (shifts[:, 1:] <= 5)) and np.all(np.any(shifts[:, 1:] != 0, axis=1))
    props = nu.nuclei_props(inst, types)
    moved = set(shifts[:, 0].tolist())
    h, w = inst.shape
    for nid, (y0, x0, y1, x1) in zip(props.ids, props.bboxes):
        interior = y0 >= 20 and x0 >= 20 and y1 <= h - 20 and x1 <= w - 20
        if not interior:
            assert nid not in moved
            # Band nuclei stay put; they only lose pixels to shifted nuclei drawn over them.
            lost = (inst == nid) & (out != nid)
            assert not np.any((out == nid) & (inst != nid))
            assert np.all(np.isin(out[lost], list(moved)))
    for nid, dy, dx in shifts:
        assert otypes[nid] == types[nid]
        now = out == nid
        was = np.roll(inst == nid, (dy, dx), axis=(0, 1))
        assert not np.any(now & ~was)  # never grows, never changes shape
        later = [k for k in moved if k > nid]
        if np.count_nonzero(now) == np.count_nonzero(inst == nid):
            np.testing.assert_array_equal(now, was)
        else:  # occluded: only by nuclei shifted after it (id order)
            assert np.all(np.isin(out[was & ~now], later))
    # Old positions of moved nuclei are background unless something else now covers them.
    for nid in moved:
        vacated = (inst == nid) & (out != nid)
        assert np.all(np.isin(out[vacated], [0, *moved]))


def test_enlarging_with_probability_zero_is_identity_and_params_validated():
    inst, types = make_maps(128, 128, seed=2)
    res = mx.enlarge_map(inst, types, params=mx.EnlargeParams(probability=0.0), rng=0)
    np.testing.assert_array_equal(res.inst_map, inst)
    np.testing.assert_array_equal(res.inst_types[: types.size], types)
    assert res.shifts.shape == (0, 3)
    with pytest.raises(LabelError, match="shift_range"):
        mx.EnlargeParams(shift_range=(3, -3))
    with pytest.raises(LabelError, match="probability"):
        mx.EnlargeParams(probability=1.2)


def test_determinism_same_seed_same_bytes_different_seed_differs(pool_maps, pool):
    inst, types = pool_maps[2]
    a = mx.balance_map(inst, types, RARE, donors=pool, tile_index=2, rng=np.random.default_rng(5))
    b = mx.balance_map(inst, types, RARE, donors=pool, tile_index=2, rng=5)
    c = mx.balance_map(inst, types, RARE, donors=pool, tile_index=2, rng=6)
    assert a.inst_map.tobytes() == b.inst_map.tobytes() and a.inst_types.tobytes() == b.inst_types.tobytes()
    assert a.record.edits == b.record.edits
    assert a.inst_map.tobytes() != c.inst_map.tobytes()
    e1 = mx.enlarge_map(inst, types, rng=8)
    e2 = mx.enlarge_map(inst, types, rng=8)
    e3 = mx.enlarge_map(inst, types, rng=9)
    assert e1.inst_map.tobytes() == e2.inst_map.tobytes()
    assert e1.inst_map.tobytes() != e3.inst_map.tobytes()


# -- plans ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset():
    return make_dataset(n_tiles=3, size=160, rare_share=0.08, seed=40)


def test_plan_counts_match_materialised_items_and_items_reproduce_in_any_order(dataset):
    plan = mx.plan_balanced_set(dataset, patches=12, maps=["balance", "enlarge"], patch_size=64, stride=32, seed=3, pbar=None)
    assert len(plan) == 12 and plan.maps_summary() == {"balance": 6, "enlarge": 6}
    assert plan.original_patches == 3 * 16 and plan.reached
    forward = [mx.make_item(plan, dataset, i, cache=mx.MixCache(dataset)) for i in range(len(plan))]
    backward = [mx.make_item(plan, dataset, i) for i in reversed(range(len(plan)))][::-1]
    for (a_inst, a_type, a_prov), (b_inst, b_type, b_prov) in zip(forward, backward):
        assert a_inst.tobytes() == b_inst.tobytes() and a_type.tobytes() == b_type.tobytes() and a_prov == b_prov
    total = np.zeros(4, np.int64)
    for i, (inst, type_map, prov) in enumerate(forward):
        assert inst.shape == (64, 64) and inst.dtype == np.int32 and type_map.dtype == np.uint8
        ids = np.unique(inst[inst > 0])
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # contiguous ids
        nu.check_consistency(inst, type_map)
        types = nu.inst_types_from_maps(inst, type_map)
        total += np.bincount(types[1:], minlength=4)
        item = plan.items[i]
        assert prov["tile"] == item.tile and tuple(prov["origin"]) == item.origin and prov["seed"] == item.seed
        assert prov["maps"] == list(item.maps) and prov["tile_name"] == dataset.names[item.tile]
    # Balancing counts are exact; enlarging keeps classes unless a nucleus is covered completely.
    assert np.all(total <= plan.planned_counts) and plan.planned_counts.sum() - total.sum() <= 3
    # Original counts: every nucleus present in every grid patch.
    grid_total = np.zeros(4, np.int64)
    for tile in dataset:
        for y in range(0, 97, 32):
            for x in range(0, 97, 32):
                crop = tile.inst_map[y : y + 64, x : x + 64]
                grid_total += np.bincount(tile.inst_types[np.unique(crop[crop > 0])], minlength=4)
    np.testing.assert_array_equal(plan.original_counts, grid_total)
    table = plan.table()
    row = next(line for line in table.splitlines() if line.startswith("other"))
    assert str(grid_total[1]) in row and str(plan.planned_counts[1]) in row
    assert "goal reached" in table and "6 balance, 6 enlarge" in table
    actual = plan.table(total)
    assert "synthetic" in actual.splitlines()[0]


def test_plan_seed_controls_everything_and_round_trips(dataset, tmp_path):
    p1 = mx.plan_balanced_set(dataset, patches=6, maps=["balance+enlarge"], patch_size=64, stride=32, seed=1)
    p2 = mx.plan_balanced_set(dataset, patches=6, maps=["balance+enlarge"], patch_size=64, stride=32, seed=1)
    p3 = mx.plan_balanced_set(dataset, patches=6, maps=["balance+enlarge"], patch_size=64, stride=32, seed=2)
    assert p1.items == p2.items and p1.items != p3.items
    assert all(it.maps == ("balance", "enlarge") for it in p1.items)
    a = [mx.make_item(p1, dataset, i)[0].tobytes() for i in range(len(p1))]
    b = [mx.make_item(p2, dataset, i)[0].tobytes() for i in range(len(p2))]
    c = [mx.make_item(p3, dataset, i)[0].tobytes() for i in range(len(p3))]
    assert a == b and a != c
    p1.save(tmp_path / "plan.json")
    loaded = mx.Plan.load(tmp_path / "plan.json")
    assert loaded.items == p1.items and loaded.balance == p1.balance and loaded.enlarge == p1.enlarge
    assert loaded.table() == p1.table()
    assert [mx.make_item(loaded, dataset, i)[0].tobytes() for i in range(len(loaded))] == a
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DatasetError, match="not a napari-diffmix label plan"):
        mx.Plan.load(tmp_path / "bad.json")
    other = make_dataset(n_tiles=2, seed=90)
    with pytest.raises(DatasetError, match="does not match the plan"):
        mx.make_item(p1, other, 0)
    with pytest.raises(IndexError):
        mx.make_item(p1, dataset, 99)


def test_target_share_reached_or_reported_unreachable(dataset):
    low = mx.plan_balanced_set(dataset, target_share=10, maps=["balance"], patch_size=64, stride=32, seed=0)
    plan = mx.plan_balanced_set(dataset, target_share=15, maps=["balance"], patch_size=64, stride=32, seed=0)
    for p, share in ((low, 0.10), (plan, 0.15)):
        assert p.reached, p.reason
        combined = p.original_counts + p.planned_counts
        assert np.all(combined[1:] / combined[1:].sum() >= share)
        # Stops as soon as the goal is met: without the last pick (some item) a class was still short.
        cache = mx.MixCache(dataset)
        per_item = [np.array(list(mx.make_item(p, dataset, i, cache=cache)[2]["nuclei"].values())) for i in range(len(p))]
        np.testing.assert_array_equal(np.sum(per_item, axis=0), p.planned_counts[1:])  # balancing counts are exact
        assert any(np.any((combined[1:] - c) / (combined[1:] - c).sum() < share) for c in per_item)
    assert 0 < len(low) < len(plan)
    assert any(it.variant > 0 for it in plan.items)  # more patches than the grid: re-balanced variants
    high = mx.plan_balanced_set(dataset, target_share=33, maps=["balance"], patch_size=64, stride=32, max_variants=2)
    assert not high.reached and "stops at" in high.reason and "other" in high.reason
    assert "NOT reached" in high.table()
    impossible = mx.plan_balanced_set(dataset, target_share=40, maps=["balance"], patch_size=64, stride=32)
    assert not impossible.reached and "cannot each hold" in impossible.reason and len(impossible) == 0
    with pytest.raises(LabelError, match="either"):
        mx.plan_balanced_set(dataset, target_share=10, patches=4)
    with pytest.raises(LabelError, match="unknown map"):
        mx.plan_balanced_set(dataset, maps=["blend"])


def test_default_goal_is_the_original_size_and_no_rare_warns():
    ds = make_dataset(n_tiles=2, size=128, rare_share=0.0, seed=60, n=40)
    plan = mx.plan_balanced_set(ds, maps=["balance"], patch_size=64, stride=64)
    assert len(plan) == plan.original_patches == 8
    assert any("balancing cannot add any" in w for w in plan.warnings)
    assert plan.planned_counts[RARE] == 0
    small = Dataset([Tile("tiny", None, np.zeros((32, 32), np.int32), np.zeros((32, 32), np.uint8))], DEMO)
    with pytest.raises(DatasetError, match="large enough"):
        mx.plan_balanced_set(small, patch_size=64)


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_labels_end_to_end(tmp_path, capsys):
    src = tmp_path / "data"
    write_generic(make_dataset(n_tiles=2, size=128, seed=70, n=50), src)
    out = tmp_path / "out"
    args = ["labels", str(src), "--out", str(out), "--patches", "6", "--patch-size", "64", "--stride", "32", "--seed", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "original" in text and "synthetic" in text and "wrote 6 label-map patches" in text
    ds = open_dataset(out)
    assert len(ds) == 6 and ds.scheme.names == DEMO.names
    prov = json.loads((out / "provenance.json").read_text())["patches"]
    assert [p["name"] for p in prov] == ds.names
    assert {tuple(p["maps"]) for p in prov} == {("balance",), ("enlarge",)}
    plan = mx.Plan.load(out / "plan.json")
    src_ds = open_dataset(src)
    for i, tile in enumerate(ds):
        inst, type_map, p = mx.make_item(plan, src_ds, i)
        np.testing.assert_array_equal(tile.inst_map, inst)
        np.testing.assert_array_equal(tile.type_map, type_map)
        assert p["seed"] == prov[i]["seed"]
    assert (out / "summary.txt").read_text().startswith("class")

    assert main(args) == 2  # refuses a non-empty --out
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--combined", "--patches", "3"]) == 0
    assert len(open_dataset(out)) == 3

    dry = tmp_path / "dry"
    assert main(["labels", str(src), "--out", str(dry), "--dry-run", "--target-share", "12", "--balance",
                 "--patch-size", "64", "--stride", "32"]) == 0
    assert not dry.exists() and "every class at least 12 %" in capsys.readouterr().out
    assert main(["labels", str(src), "--patch-size", "64"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["labels", str(src), "--out", str(tmp_path / "x"), "--rare", "nope", "--patch-size", "64"]) == 2
    assert "nope" in capsys.readouterr().err


def test_planner_drives_a_callers_progress_bar_phase_by_phase(dataset):
    class Bar:
        def __init__(self):
            self.n, self.total, self.descs, self.resets = 0, None, [], 0

        def update(self, k=1):
            self.n += k
            assert self.total is None or self.n <= self.total

        def reset(self, total=None):
            self.n, self.total = 0, total
            self.resets += 1

        def set_description(self, d):
            self.descs.append(d)

        def close(self):
            pass

    bar = Bar()
    mx.plan_balanced_set(dataset, patches=4, maps=["balance", "enlarge"], patch_size=64, stride=32, pbar=bar)
    assert bar.descs == ["plan: read", "donors", "plan: variant 0"] and bar.n == bar.total == 2 * len(dataset)


def test_donor_pool_from_tiles_matches_the_cache_pool(dataset):
    pool = mx.DonorPool.from_maps(list(dataset), classes=[RARE])
    cached = mx.MixCache(dataset).pool(30, (RARE,))
    assert pool.tile_names == tuple(dataset.names) == cached.tile_names
    np.testing.assert_array_equal(pool.ids, cached.ids)
    np.testing.assert_array_equal(pool.bank.sources, cached.bank.sources)
    assert len(pool) == pool.count(RARE) > 0 and set(pool.bank.classes.tolist()) == {RARE}
    for i in range(len(pool)):
        tile = dataset[int(pool.bank.sources[i])]
        np.testing.assert_array_equal(pool.bank.mask(i), local_mask(tile.inst_map, pool.ids[i]))


def test_plan_spec_is_the_one_set_of_plan_settings_for_every_command():
    from napari_diffmix.cli import build_parser
    from napari_diffmix.cli._common import plan_spec
    from napari_diffmix.cli._synthesize import build_plan
    from napari_diffmix.demo_data import demo_dataset

    dataset = demo_dataset()
    spec = mx.PlanSpec(patches=4, maps=("balance",), patch_size=64, stride=64, seed=2)
    by_spec = mx.plan_balanced_set(dataset, spec)
    by_keywords = mx.plan_balanced_set(dataset, patches=4, maps=["balance"], patch_size=64, stride=64, seed=2)
    assert [it.to_dict() for it in by_spec.items] == [it.to_dict() for it in by_keywords.items]
    with pytest.raises(TypeError, match="unknown plan setting"):
        mx.plan_balanced_set(dataset, patchez=4)
    # synthesize plans with the balancing/enlarging rules `diffmix labels` takes (it used the defaults)
    parser = build_parser()
    common = ["demo", "--balance", "--patches", "4", "--patch-size", "64", "--stride", "64", "--seed", "2"]
    labels = parser.parse_args(["labels", *common, "--fit-ratio", "50", "--shift-prob", "0.9", "--dry-run"])
    synth = parser.parse_args(["synthesize", *common, "--fit-ratio", "50", "--shift-prob", "0.9", "--model", "m.safetensors", "--out", "o.zarr"])
    assert plan_spec(labels, dataset.scheme) == plan_spec(synth, dataset.scheme)
    assert plan_spec(synth, dataset.scheme).balance.fit_ratio == 50 and plan_spec(synth, dataset.scheme).enlarge.probability == 0.9
    strict = build_plan(synth, dataset)
    assert strict.balance.fit_ratio == 50
    # a donor must fit 50 times over: balancing replaces fewer nuclei than with the published 2.3
    assert strict.planned_counts[1] < by_spec.planned_counts[1]
