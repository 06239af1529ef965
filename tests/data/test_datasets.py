import json
import random

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from scipy.io import savemat

from napari_diffmix import datasets as ds
from napari_diffmix.data import consep
from napari_diffmix.data import generic as generic_layout
from napari_diffmix.data import pannuke as pannuke_layout
from napari_diffmix.classes import CONSEP, GLYSAC, ClassScheme
from napari_diffmix.cli import main
from napari_diffmix.errors import DatasetError, LabelError, SchemeError, UnsafeOutputError
from napari_diffmix.nuclei import type_map_from

H = W = 48


def square_tile(raw_types, side=4, gap=2, h=H, w=W):
    """inst_map with nucleus i (1-based) a square whose side grows with i; returns (inst_map, raw type_map, areas)."""
    inst = np.zeros((h, w), np.int32)
    y = x = gap
    areas = []
    for i in range(1, len(raw_types) + 1):
        s = side + (i % 3)
        if x + s + gap > w:
            x, y = gap, y + side + 2 + gap
        inst[y : y + s, x : x + s] = i
        areas.append(s * s)
        x += s + gap
    raw = np.asarray([0, *raw_types])
    return inst, raw[inst], np.asarray(areas)


def write_mat_tile(root, stem, inst, raw_types, raw_type_map=None, image=None, suffix=".png", keys=None):
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    raw = np.asarray([0, *raw_types])
    data = {
        "inst_map": inst.astype(np.float64),
        "type_map": (raw[inst] if raw_type_map is None else raw_type_map).astype(np.float64),
        "inst_type": np.asarray(raw_types, np.float64)[:, None],
        "inst_centroid": np.zeros((len(raw_types), 2)),
    }
    if keys is not None:
        data = {k: v for k, v in data.items() if k in keys}
    savemat(root / "Labels" / f"{stem}.mat", data)
    if image is None:
        image = np.full(inst.shape + (3,), 100, np.uint8)
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(root / "Images" / f"{stem}{suffix}", image)
    else:
        iio.imwrite(root / "Images" / f"{stem}{suffix}", image)


def consep_folder(root, suffix=".png"):
    """Three tiles written in shuffled order; the image's red value encodes its tile for pairing checks."""
    tiles = {
        "train_1": [1, 2, 3, 4, 5, 6, 7],
        "train_2": [2, 2, 3, 5],
        "train_10": [4, 4, 4, 1, 7],
    }
    order = list(tiles)
    random.Random(3).shuffle(order)
    for stem in order:
        inst, _, _ = square_tile(tiles[stem])
        image = np.zeros((H, W, 3), np.uint8)
        image[..., 0] = 10 + len(tiles[stem])
        write_mat_tile(root, stem, inst, tiles[stem], image=image, suffix=suffix)
    return tiles


# -- CoNSeP / GLySAC -----------------------------------------------------------------------------
def test_consep_round_trip_merges_once_pairs_by_stem_and_counts(tmp_path):
    raw = consep_folder(tmp_path)
    d = ds.open_dataset(tmp_path, "consep")
    assert d.layout == "consep" and d.scheme is CONSEP and d.root == tmp_path
    assert d.names == ["train_1", "train_2", "train_10"]  # natural order, not listing order
    merge = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
    for tile in d:
        assert tile.image[0, 0, 0] == 10 + len(raw[tile.name])
        assert tile.inst_map.dtype == np.int32 and tile.type_map.dtype == np.uint8
        expected_types = np.array([0] + [merge[r] for r in raw[tile.name]])
        np.testing.assert_array_equal(tile.inst_types, expected_types)
        np.testing.assert_array_equal(tile.type_map, expected_types[tile.inst_map])
        assert tile.source.endswith(f"{tile.name}.mat")

    stats = ds.dataset_stats(d)
    # Merged nuclei by hand: train_1 -> 1,2,3,3,4,4,4; train_2 -> 2,2,3,4; train_10 -> 3,3,3,1,4.
    np.testing.assert_array_equal(stats.total.nuclei, [0, 2, 3, 6, 5])
    np.testing.assert_array_equal(stats.per_tile[1].nuclei, [0, 0, 2, 1, 1])
    areas = {name: square_tile(r)[2] for name, r in raw.items()}
    other_px = areas["train_1"][0] + areas["train_10"][3]
    nucleus_px = sum(a.sum() for a in areas.values())
    assert stats.total.pixels[1] == other_px
    assert stats.total.nucleus_pixels == nucleus_px
    assert stats.total.total_pixels == 3 * H * W
    out = stats.to_dict()
    assert out["total"]["classes"]["other"]["nuclei_pct"] == round(100 * 2 / 16, 2)
    assert out["total"]["classes"]["other"]["pixels_pct"] == round(100 * other_px / nucleus_px, 2)
    assert [t["name"] for t in out["per_tile"]] == d.names
    json.dumps(out)


def test_labels_read_without_decoding_images(tmp_path, monkeypatch):
    raw = consep_folder(tmp_path)
    full = ds.open_dataset(tmp_path, "consep")
    tiles = list(full)
    inst_map, type_map = ds.read_consep_labels(tmp_path / "Labels" / "train_2.mat", "consep")
    np.testing.assert_array_equal(inst_map, tiles[1].inst_map)
    np.testing.assert_array_equal(type_map, tiles[1].type_map)
    assert inst_map.dtype == np.int32 and type_map.dtype == np.uint8

    def no_images(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(consep, "read_image", no_images)
    for i, tile in enumerate(tiles):
        labels = full.labels(i)
        assert labels.image is None and labels.name == tile.name and labels.source == tile.source
        np.testing.assert_array_equal(labels.type_map, tile.type_map)
    bare = ds.read_consep_tile(None, tmp_path / "Labels" / "train_10.mat", CONSEP)
    assert bare.image is None and bare.name == "train_10" and len(bare.inst_types) == len(raw["train_10"]) + 1
    # statistics and balanced-set planning need label maps only
    np.testing.assert_array_equal(ds.dataset_stats(full).total.nuclei, [0, 2, 3, 6, 5])
    from napari_diffmix.mixing import make_item, plan_balanced_set

    plan = plan_balanced_set(full, patches=3, patch_size=16, stride=16, maps=["balance", "enlarge"], seed=0)
    assert len(plan) == 3 and make_item(plan, full, 0)[0].shape == (16, 16)
    with pytest.raises(AssertionError, match="decoded"):
        full[0]
    with pytest.raises(IndexError):
        full.labels(3)


def test_labels_only_for_generic_pannuke_and_memory(tmp_path, monkeypatch):
    tiles = make_tiles(2)
    ds.write_generic(tiles, tmp_path / "generic", scheme="glysac")
    masks = np.zeros((2, H, W, 4), np.int32)
    masks[:, 2:8, 2:8, 0] = 1
    masks[..., 3] = masks[..., 0] == 0
    (tmp_path / "pannuke").mkdir()
    np.save(tmp_path / "pannuke" / "images.npy", np.zeros((2, H, W, 3), np.uint8))
    np.save(tmp_path / "pannuke" / "masks.npy", masks)
    generic, pannuke = ds.open_dataset(tmp_path / "generic"), ds.open_dataset(tmp_path / "pannuke", "glysac")
    monkeypatch.setattr(generic_layout, "read_image", lambda path: pytest.fail(f"decoded {path}"))
    monkeypatch.setattr(pannuke_layout, "stack_image", lambda *a: pytest.fail("decoded a stacked image"))
    for d, count in ((generic, 2), (pannuke, 2), (ds.Dataset(tiles, "glysac"), 2)):
        got = [d.labels(i) for i in range(len(d))]
        assert len(got) == count and all(t.image is None for t in got)
    np.testing.assert_array_equal(generic.labels(1).inst_map, tiles[1].inst_map)
    assert pannuke.labels(0).inst_types.tolist() == [0, 1]
    assert ds.tile_labels(tiles, 0) is tiles[0]  # a plain list of tiles has no labels-only path


def test_glysac_tif_round_trip(tmp_path):
    raw_types = list(range(1, 11))
    inst, _, _ = square_tile(raw_types)
    write_mat_tile(tmp_path, "gastric_a", inst, raw_types, suffix=".tif")
    write_mat_tile(tmp_path, "gastric_b", inst, [4, 4, 3, 8, 9, 10, 1, 2, 6, 7], suffix=".tiff")
    d = ds.open_dataset(tmp_path, "glysac")
    assert d.names == ["gastric_a", "gastric_b"]
    a, b = d[0], d[1]
    np.testing.assert_array_equal(a.inst_types, [0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1])
    stats = ds.dataset_stats(d)
    np.testing.assert_array_equal(stats.total.nuclei, [0, 8, 8, 4])
    assert b.image.shape == (H, W, 3)
    table = stats.table()
    lines = table.splitlines()
    assert lines[0].split() == ["class", "nuclei", "%", "nuclei", "pixels", "%"]
    assert lines[1].split()[:3] == ["other", "8", "40.0%"]
    assert lines[4].split()[:3] == ["total", "20", "100.0%"]
    assert len({len(line) for line in lines[:5]}) == 1  # aligned


def test_type_map_only_labels_use_majority(tmp_path):
    inst, raw_tm, _ = square_tile([1, 5, 6])
    raw_tm[inst == 2] = 5
    raw_tm[np.nonzero(inst == 2)[0][0], np.nonzero(inst == 2)[1][0]] = 2  # a stray pixel
    write_mat_tile(tmp_path, "t", inst, [1, 5, 6], raw_type_map=raw_tm, keys=("inst_map", "type_map"))
    tile = ds.open_dataset(tmp_path, CONSEP)[0]
    np.testing.assert_array_equal(tile.inst_types, [0, 1, 4, 4])


def test_rgba_image_is_accepted(tmp_path):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "a", inst, [1, 2], image=np.full((H, W, 4), 7, np.uint8))
    assert ds.open_dataset(tmp_path, "consep")[0].image.shape == (H, W, 3)


def test_point_at_split_folder_and_hint_at_root(tmp_path):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path / "Train", "a", inst, [1, 2])
    write_mat_tile(tmp_path / "Test", "b", inst, [1, 2])
    assert ds.open_dataset(tmp_path / "Train", "consep").names == ["a"]
    with pytest.raises(DatasetError, match=r"splits \['Test', 'Train'\]; point at one of them"):
        ds.open_dataset(tmp_path, "consep")


@pytest.mark.parametrize(
    "keys, missing",
    [(("type_map", "inst_type"), "'inst_map'"), (("inst_map",), "'inst_type'")],
)
def test_missing_mat_key(tmp_path, keys, missing):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "tile_3", inst, [1, 2], keys=keys)
    d = ds.open_dataset(tmp_path, "consep")
    with pytest.raises(DatasetError, match=rf"tile_3\.mat: missing key {missing}"):
        d[0]


def test_image_label_shape_mismatch_names_both_files(tmp_path):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "tile_4", inst, [1, 2], image=np.zeros((40, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"tile_4\.mat: image tile_4\.png is \(40, 48\) but its labels tile_4\.mat are \(48, 48\)"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_type_map_inconsistent_with_inst_type(tmp_path):
    inst, raw_tm, _ = square_tile([1, 2, 3, 5])
    bad = raw_tm.copy()
    bad[inst == 3] = 2  # a whole epithelial nucleus typed inflammatory
    write_mat_tile(tmp_path, "tile_5", inst, [1, 2, 3, 5], raw_type_map=bad)
    n = int(np.count_nonzero(inst == 3))
    with pytest.raises(DatasetError, match=rf"tile_5\.mat: type_map disagrees with inst_type at {n} of \d+ nucleus pixels"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_type_map_sliver_and_raw_merge_are_tolerated(tmp_path):
    inst, raw_tm, _ = square_tile([3] * 40 + [5] * 40, side=3, gap=1, h=96, w=96)
    tm = raw_tm.copy()
    tm[inst == 1] = 4  # raw 3 vs 4 is the same merged class (epithelial)
    ys, xs = np.nonzero(inst == 2)
    tm[ys[0], xs[0]] = 5  # one stray pixel, far below 1 %
    write_mat_tile(tmp_path, "ok", inst, [3] * 40 + [5] * 40, raw_type_map=tm)
    tile = ds.open_dataset(tmp_path, "consep")[0]
    assert tile.type_map[ys[0], xs[0]] == 3  # inst_type wins


def test_unknown_raw_class_names_the_file(tmp_path):
    inst, _, _ = square_tile([1, 9])
    write_mat_tile(tmp_path, "tile_6", inst, [1, 9])
    with pytest.raises(SchemeError, match=r"tile_6\.mat: raw class id\(s\) \[9\] are not in scheme 'consep'"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_inst_map_ids_beyond_inst_type(tmp_path):
    inst, _, _ = square_tile([1, 2, 3])
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Images").mkdir()
    savemat(tmp_path / "Labels" / "x.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]])})
    iio.imwrite(tmp_path / "Images" / "x.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"x\.mat: inst_map has nucleus id 3 but inst_type lists only 2 nuclei"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_grayscale_image_is_not_rgb(tmp_path):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "gray", inst, [1, 2], image=np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"gray\.png: image is not RGB: shape \(48, 48\)"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_corrupt_mat_and_image(tmp_path):
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "a", inst, [1, 2])
    (tmp_path / "Labels" / "a.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"a\.mat: cannot read \.mat file"):
        ds.open_dataset(tmp_path, "consep")[0]
    write_mat_tile(tmp_path, "a", inst, [1, 2])
    (tmp_path / "Images" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"a\.png: cannot read image"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_unpaired_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ds.open_dataset(tmp_path / "nope", "consep")
    with pytest.raises(DatasetError, match="is empty"):
        ds.open_dataset(tmp_path, "consep")
    (tmp_path / "Images").mkdir()
    (tmp_path / "Labels").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ds.open_dataset(tmp_path, "consep", layout="consep")
    inst, _, _ = square_tile([1, 2])
    write_mat_tile(tmp_path, "a", inst, [1, 2])
    write_mat_tile(tmp_path, "b", inst, [1, 2])
    (tmp_path / "Images" / "a.png").unlink()
    iio.imwrite(tmp_path / "Images" / "c.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"no Images file for 1 stem\(s\) \['a'\]; no Labels file for 1 stem\(s\) \['c'\]"):
        ds.open_dataset(tmp_path, "consep")


def test_no_scheme_and_bad_layout(tmp_path):
    consep_folder(tmp_path)
    with pytest.raises(SchemeError, match="no class scheme given"):
        ds.open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="unknown layout 'cellpose'"):
        ds.open_dataset(tmp_path, "consep", layout="cellpose")
    with pytest.raises(DatasetError, match="inst_maps"):
        ds.open_dataset(tmp_path, "consep", layout="generic")


# -- generic folders -----------------------------------------------------------------------------
def make_tiles(n=3, with_image=True):
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(n):
        inst, _, _ = square_tile(list(rng.integers(1, 4, size=6 + i)))
        types = np.zeros(inst.max() + 1, np.int32)
        types[1:] = rng.integers(1, 4, size=inst.max())
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8) if with_image else None
        tiles.append(ds.Tile(f"tile{i}", image, inst, type_map_from(inst, types)))
    return tiles


def test_write_generic_round_trip(tmp_path):
    tiles = make_tiles()
    out = ds.write_generic(ds.Dataset(tiles, GLYSAC), tmp_path / "gen")
    assert sorted(p.name for p in out.iterdir()) == [".napari-diffmix-output.json", "images", "inst_maps", "scheme.json", "type_maps"]
    assert not [p for p in tmp_path.iterdir() if p.name != "gen"]  # no temp left behind
    back = ds.open_dataset(out)  # scheme from scheme.json
    assert back.layout == "generic" and back.scheme == GLYSAC and back.names == ["tile0", "tile1", "tile2"]
    for a, b in zip(tiles, back):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.inst_map, b.inst_map)
        np.testing.assert_array_equal(a.type_map, b.type_map)
    with pytest.raises(UnsafeOutputError, match="output exists and is not empty"):
        ds.write_generic(tiles, out)
    ds.write_generic(tiles[:1], out, scheme=GLYSAC, overwrite=True)
    assert ds.open_dataset(out).names == ["tile0"]
    with pytest.raises(SchemeError, match=r"scheme.json: the folder's labels use classes"):
        ds.open_dataset(out, "consep")


def test_write_generic_label_only_and_errors(tmp_path):
    out = ds.write_generic(make_tiles(2, with_image=False), tmp_path / "labels_only", scheme="glysac")
    assert not (out / "images").exists()
    assert ds.open_dataset(out)[1].image is None
    mixed = make_tiles(2)
    mixed[1].image = None
    with pytest.raises(DatasetError, match="every tile has an image or none"):
        ds.write_generic(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(DatasetError, match="not a plain file name"):
        ds.write_generic([ds.Tile("../x", None, np.zeros((4, 4), np.int32), np.zeros((4, 4), np.uint8))], tmp_path / "y")
    with pytest.raises(DatasetError, match="no tiles"):
        ds.write_generic([], tmp_path / "z")


def test_generic_npz_and_bad_labels(tmp_path):
    tiles = make_tiles(2)
    root = tmp_path / "npz"
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    for t in tiles:
        np.savez(root / "labels" / f"{t.name}.npz", inst_map=t.inst_map, type_map=t.type_map)
        iio.imwrite(root / "images" / f"{t.name}.png", t.image)
    d = ds.open_dataset(root, "glysac")
    assert d.layout == "generic"
    np.testing.assert_array_equal(d[1].type_map, tiles[1].type_map)

    np.savez(root / "labels" / "tile1.npz", inst_map=tiles[1].inst_map)
    with pytest.raises(DatasetError, match=r"tile1\.npz: missing key\(s\) \['type_map'\]"):
        d[1]
    np.savez(root / "labels" / "tile1.npz", inst_map=tiles[1].inst_map, type_map=tiles[1].type_map * 2)
    with pytest.raises(SchemeError, match=r"tile1\.npz: class id\(s\) \[4, 6\] are outside 0..3"):
        ds.open_dataset(root, "glysac")[1]
    broken = tiles[1].type_map.copy()
    broken[tiles[1].inst_map == 2] = 0
    np.savez(root / "labels" / "tile1.npz", inst_map=tiles[1].inst_map, type_map=broken)
    with pytest.raises(LabelError, match=r"tile1\.npz: .*class 0 \(ids 2\)"):
        ds.open_dataset(root, "glysac")[1]
    (root / "images" / "tile0.png").unlink()
    with pytest.raises(DatasetError, match=r"no images file for 1 stem\(s\) \['tile0'\]"):
        ds.open_dataset(root, "glysac")


def test_generic_tif_maps_and_shape_mismatch(tmp_path):
    t = make_tiles(1)[0]
    for sub in ("images", "inst_maps", "type_maps"):
        (tmp_path / sub).mkdir()
    iio.imwrite(tmp_path / "images" / "a.png", t.image)
    tifffile.imwrite(tmp_path / "inst_maps" / "a.tif", t.inst_map)
    tifffile.imwrite(tmp_path / "type_maps" / "a.tif", t.type_map)
    np.testing.assert_array_equal(ds.open_dataset(tmp_path, "glysac")[0].inst_map, t.inst_map)
    tifffile.imwrite(tmp_path / "inst_maps" / "a.tif", t.inst_map[:-2])
    with pytest.raises(DatasetError, match=r"a\.tif: image a\.png is \(48, 48\) but its labels a\.tif are \(46, 48\)"):
        ds.open_dataset(tmp_path, "glysac")[0]


# -- PanNuke-style stacks ------------------------------------------------------------------------
PANNUKE = ClassScheme(
    "pannuke-test", ("neoplastic", "inflammatory", "other"), ("#E69F00", "#56B4E9", "#009E73"),
    merge={1: 1, 2: 2, 3: 3, 4: 3, 5: 1},
)


def test_pannuke_masks_to_tiles(tmp_path):
    n = 2
    masks = np.zeros((n, 32, 32, 6))
    masks[0, 2:6, 2:6, 0] = 7  # neoplastic
    masks[0, 10:14, 2:6, 0] = 9  # neoplastic
    masks[0, 2:6, 10:14, 1] = 7  # inflammatory, id reused in another channel
    masks[0, 20:24, 20:24, 4] = 3  # epithelial -> merged neoplastic
    masks[1, 5:9, 5:9, 3] = 1  # dead -> other
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3)).astype(np.float64)
    fold = tmp_path / "Fold 1"
    (fold / "images" / "fold1").mkdir(parents=True)
    (fold / "masks" / "fold1").mkdir(parents=True)
    np.save(fold / "images" / "fold1" / "images.npy", images)
    np.save(fold / "masks" / "fold1" / "masks.npy", masks)
    d = ds.open_dataset(fold, PANNUKE)
    assert d.layout == "pannuke" and d.names == ["00000", "00001"]
    t0 = d[0]
    assert t0.inst_map.max() == 4
    assert sorted(t0.inst_types[1:].tolist()) == [1, 1, 1, 2]
    assert t0.inst_map[3, 3] != t0.inst_map[3, 11]
    np.testing.assert_array_equal(t0.image, images[0].astype(np.uint8))
    np.testing.assert_array_equal(ds.dataset_stats(d).total.nuclei, [0, 3, 1, 1])
    with pytest.raises(SchemeError, match=r"masks\.npy\[0\]: raw class id\(s\) \[5\]"):
        ds.open_dataset(fold, ClassScheme("x", ("a", "b", "c", "d"), ("#111111", "#222222", "#333333", "#444444")))[0]


def test_stacked_label_maps(tmp_path):
    tiles = make_tiles(3)
    np.save(tmp_path / "inst_maps.npy", np.stack([t.inst_map for t in tiles]))
    np.save(tmp_path / "type_maps.npy", np.stack([t.type_map for t in tiles]))
    np.save(tmp_path / "images.npy", np.stack([t.image for t in tiles]))
    d = ds.open_dataset(tmp_path, "glysac")
    assert d.layout == "pannuke" and len(d) == 3
    np.testing.assert_array_equal(d[2].type_map, tiles[2].type_map)
    np.testing.assert_array_equal(d[-1].image, tiles[2].image)
    np.save(tmp_path / "images.npy", np.stack([t.image[:40] for t in tiles]))
    with pytest.raises(DatasetError, match=r"images\.npy holds \(3, 40, 48\) \(N, H, W\) but inst_maps\.npy holds \(3, 48, 48\)"):
        ds.open_dataset(tmp_path, "glysac")


# -- tiles, datasets, grids ----------------------------------------------------------------------
def test_tile_validation_and_crop():
    t = make_tiles(1)[0]
    c = t.crop(4, 8, 20, 16)
    assert c.name == "tile0_y4_x8" and c.image.shape == (20, 16, 3)
    np.testing.assert_array_equal(c.inst_map, t.inst_map[4:24, 8:24])
    c.inst_map[:] = 0
    assert t.inst_map.any()  # a copy
    with pytest.raises(DatasetError, match="does not fit"):
        t.crop(40, 0, 20, 20)
    # windows: side by side, rows first, the remainder left out (48 x 48 holds 2 x 2 of 20 px)
    assert [w.name for w in t.windows(20)] == ["tile0_y0_x0", "tile0_y0_x20", "tile0_y20_x0", "tile0_y20_x20"]
    np.testing.assert_array_equal(t.windows(20)[1].image, t.image[0:20, 20:40])
    assert t.windows(49) == []
    with pytest.raises(DatasetError, match=r"src\.mat: image \(48, 40\) and label maps \(48, 48\) differ"):
        ds.Tile("a", t.image[:, :40], t.inst_map, t.type_map, source="src.mat")
    with pytest.raises(DatasetError, match="differ in shape"):
        ds.Tile("a", None, t.inst_map, t.type_map[:-1])
    with pytest.raises(DatasetError, match=r"^b: image is not RGB"):
        ds.Tile("b", t.image[..., 0], t.inst_map, t.type_map)
    with pytest.raises(DatasetError, match="8-bit"):
        ds.Tile("b", t.image.astype(np.float32), t.inst_map, t.type_map)
    with pytest.raises(DatasetError, match="type_map values must lie in 0..255"):
        ds.Tile("b", None, t.inst_map, t.type_map.astype(int) + 300)
    with pytest.raises(DatasetError, match="non-integer"):
        ds.Tile("b", None, t.inst_map + 0.5, t.type_map)


def test_dataset_sequence_behaviour():
    tiles = make_tiles(3)
    d = ds.Dataset(tiles, "glysac")
    assert len(d) == 3 and d[-1] is tiles[2] and [t.name for t in d[1:]] == ["tile1", "tile2"]
    with pytest.raises(IndexError):
        d[3]
    assert "3 tiles" in repr(d)
    with pytest.raises(DatasetError, match="repeated"):
        ds.Dataset([tiles[0], tiles[0]], "glysac")
    bad = make_tiles(1)[0]
    bad.type_map[bad.inst_map > 0] = 9
    with pytest.raises(SchemeError, match="tile0: class id"):
        ds.Dataset([bad], "glysac")


def test_patch_grid():
    grid = ds.patch_grid(1000, 1000)
    assert len(grid) == 100
    assert sorted({y for y, _ in grid}) == list(range(0, 685, 76))
    assert grid[:2] == [(0, 0), (0, 76)]
    covered = ds.patch_grid(1000, 1000, cover=True)
    assert sorted({y for y, _ in covered})[-2:] == [684, 744] and len(covered) == 121
    assert ds.patch_grid(256, 300, 256, 76) == [(0, 0)]
    assert ds.patch_grid(256, 300, 256, 76, cover=True) == [(0, 0), (0, 44)]
    with pytest.raises(DatasetError, match="larger than the 200x1000 tile"):
        ds.patch_grid(200, 1000)
    with pytest.raises(DatasetError, match="positive"):
        ds.patch_grid(300, 300, stride=0)


def test_class_counts():
    inst = np.array([[1, 1, 0, 4], [2, 0, 0, 4]], np.int32)
    types = np.array([0, 3, 1, 2, 3])  # id 3 absent
    np.testing.assert_array_equal(ds.class_counts(inst, types, 3), [0, 1, 0, 2])
    with pytest.raises(LabelError, match="outside 0..2"):
        ds.class_counts(inst, types, 2)


def test_demo_path_opens_demo_dataset():
    pytest.importorskip("napari_diffmix.demo_data")
    d = ds.open_dataset("demo")
    assert len(d) >= 1 and d.scheme.name == "demo"
    with pytest.raises(SchemeError, match="demo"):
        ds.open_dataset("demo", "consep")


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_stats_prints_table_and_json(tmp_path, capsys):
    consep_folder(tmp_path / "data")
    out_json = tmp_path / "stats.json"
    rc = main(["stats", str(tmp_path / "data"), "--scheme", "consep", "--per-tile", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "3 tile(s), layout consep, scheme consep" in out
    summary, per_tile = out.split("\n\n")
    rows = {line.split()[0]: line.split() for line in summary.splitlines()}
    assert rows["other"][1:3] == ["2", "12.5%"]
    assert rows["spindle"][1:3] == ["5", "31.2%"]
    assert rows["total"][1:3] == ["16", "100.0%"]
    tiles = {line.split()[0]: line.split() for line in per_tile.splitlines()}
    assert tiles["train_10"][1:] == ["1", "0", "3", "1", "5"]
    assert tiles["total"][1:] == ["2", "3", "6", "5", "16"]
    data = json.loads(out_json.read_text())
    assert data["total"]["nuclei"] == 16 and data["tiles"] == 3


def test_cli_stats_reports_errors_without_traceback(tmp_path, capsys):
    inst, _, _ = square_tile([1, 9])
    write_mat_tile(tmp_path, "tile_9", inst, [1, 9])
    rc = main(["stats", str(tmp_path), "--scheme", "consep"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffmix stats: error:") and "tile_9.mat" in err and "Traceback" not in err


def test_tile_without_background_and_membership(tmp_path):
    inst = np.ones((8, 8), np.int32)
    inst[:, 4:] = 2
    write_mat_tile(tmp_path, "full", inst, [1, 5])
    d = ds.open_dataset(tmp_path, "consep")
    tile = d[0]
    np.testing.assert_array_equal(tile.inst_types, [0, 1, 4])
    assert tile in [tile] and d[0] is not tile  # identity comparison, lazily re-read


# -- non-sequential ids and empty type maps ------------------------------------------------------
def scattered_ids_tile(n=20, top=759, seed=5):
    """Public-patch style labels: n nuclei with sorted random ids up to ``top``, inst_type in that order."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(1, 8, size=n)
    inst, _, _ = square_tile(list(raw), h=64, w=96)
    ids = np.sort(rng.choice(np.arange(1, top), size=n - 1, replace=False))
    ids = np.r_[ids, top]
    scattered = np.r_[0, ids][inst]
    return inst, scattered, raw


def _write_mat(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, arrays)
    iio.imwrite(path.parent.parent / "Images" / f"{path.stem}.png", np.zeros((*arrays["inst_map"].shape, 3), np.uint8)) \
        if (path.parent.parent / "Images").is_dir() else None


def test_non_sequential_ids_are_relabelled_when_type_map_confirms(tmp_path, caplog):
    (tmp_path / "Images").mkdir()
    inst, scattered, raw = scattered_ids_tile()
    assert scattered.max() == 759 and np.unique(scattered).size == 21
    for stem in ("p1", "p2"):
        _write_mat(tmp_path / "Labels" / f"{stem}.mat", inst_map=scattered, type_map=np.r_[0, raw][inst],
                   inst_type=raw[:, None].astype(float))
    caplog.set_level("INFO", logger="napari_diffmix")
    d = ds.open_dataset(tmp_path, "consep")
    for tile in d:
        assert np.array_equal(tile.inst_map, inst)  # renumbered 1..20 in the order of the old ids
        assert np.array_equal(tile.inst_types[1:], CONSEP.merge_lut()[raw])
    notes = [r.getMessage() for r in caplog.records if "renumbered" in r.getMessage()]
    assert len(notes) == 1 and "ids up to 759 for 20 nuclei" in notes[0]


def test_non_sequential_ids_confirmed_by_centroids_x_then_y(tmp_path):
    inst, scattered, raw = scattered_ids_tile(n=12, top=300)
    from napari_diffmix.nuclei import nuclei_props

    yx = nuclei_props(inst).centroids
    good = tmp_path / "good" / "Labels" / "a.mat"
    (tmp_path / "good" / "Images").mkdir(parents=True)
    _write_mat(good, inst_map=scattered, inst_type=raw[:, None], inst_centroid=yx[:, ::-1])  # CoNSeP: x then y
    tile = ds.open_dataset(tmp_path / "good", "consep")[0]
    assert np.array_equal(tile.inst_types[1:], CONSEP.merge_lut()[raw])
    swapped = tmp_path / "swapped" / "Labels" / "a.mat"
    (tmp_path / "swapped" / "Images").mkdir(parents=True)
    _write_mat(swapped, inst_map=scattered, inst_type=raw[:, None], inst_centroid=yx)  # y first: wrong orientation
    with pytest.raises(DatasetError, match=r"a\.mat: inst_map has nucleus id 300 but inst_type lists only 12 nuclei; .*neither a type_map nor inst_centroid confirms"):
        ds.open_dataset(tmp_path / "swapped", "consep")[0]


def test_ambiguous_ids_and_disagreeing_type_map_are_refused(tmp_path):
    inst, scattered, raw = scattered_ids_tile(n=10, top=90)
    (tmp_path / "Images").mkdir()
    _write_mat(tmp_path / "Labels" / "few.mat", inst_map=scattered, type_map=np.r_[0, raw][inst], inst_type=raw[:-1, None])
    with pytest.raises(DatasetError, match=r"few\.mat: inst_map has nucleus id 90 but inst_type lists only 9 nuclei, and the map holds 10 distinct ids"):
        ds.open_dataset(tmp_path, "consep")[0]
    shuffled = raw[::-1]  # listed in another order than the sorted ids: the type_map says so
    (tmp_path / "Labels" / "few.mat").unlink()
    (tmp_path / "Images" / "few.png").unlink()
    if len(set(CONSEP.merge_lut()[raw])) > 1 and not np.array_equal(CONSEP.merge_lut()[shuffled], CONSEP.merge_lut()[raw]):
        _write_mat(tmp_path / "Labels" / "rev.mat", inst_map=scattered, type_map=np.r_[0, raw][inst], inst_type=shuffled[:, None])
        with pytest.raises(DatasetError, match=r"rev\.mat: type_map disagrees with inst_type \(inst_type read in the order of the sorted ids\)"):
            ds.open_dataset(tmp_path, "consep")[0]


def test_all_zero_type_map_defers_to_inst_type(tmp_path):
    inst, _, _ = square_tile([1, 2, 3, 5])
    (tmp_path / "Images").mkdir()
    _write_mat(tmp_path / "Labels" / "pred.mat", inst_map=inst, type_map=np.zeros_like(inst), inst_type=np.array([[1], [2], [3], [5]]))
    tile = ds.open_dataset(tmp_path, "consep")[0]
    assert tile.inst_types[1:].tolist() == [1, 2, 3, 4]
    _write_mat(tmp_path / "Labels" / "pred.mat", inst_map=inst, type_map=np.zeros_like(inst))
    with pytest.raises(DatasetError, match=r"pred\.mat: missing key 'inst_type' \(the type_map is all zero"):
        ds.open_dataset(tmp_path, "consep")[0]


def test_pointing_at_labels_of_a_consep_folder_says_where_to_point(tmp_path):
    consep_folder(tmp_path)
    with pytest.raises(DatasetError, match=rf"point at the folder that holds Images and Labels: {tmp_path}"):
        ds.open_dataset(tmp_path / "Labels", "consep")


# -- 16-bit images, NaN pixels, decoding image checks (issue 15 item 4) ------------------------------
def write_png16(path, image):
    """A 16-bit RGB(A) PNG written byte by byte as the PNG standard says (Pillow cannot write one):
    big-endian samples, filter Sub on odd rows and Up on every third, so the decoder's unfiltering
    with 6- or 8-byte pixels is exercised."""
    import struct
    import zlib

    a = np.ascontiguousarray(image, dtype=">u2")
    h, w, c = a.shape
    bpp = 2 * c
    rows = a.reshape(h, w * bpp // 2).view(np.uint8).reshape(h, w * bpp).astype(np.int16)
    out = bytearray()
    for y in range(h):
        row, kind = rows[y], (2 if y and y % 3 == 0 else 1 if y % 2 else 0)
        if kind == 1:
            row = row - np.r_[np.zeros(bpp, np.int16), row[:-bpp]]
        elif kind == 2:
            row = row - rows[y - 1]
        out += bytes([kind]) + (row % 256).astype(np.uint8).tobytes()

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))


def test_16_bit_png_holding_8_bit_values_reads_them_and_says_so_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 13, 3)).astype(np.uint16)
    write_png16(tmp_path / "a.png", image)
    write_png16(tmp_path / "b.png", image[::-1])
    with caplog.at_level("INFO", logger="napari_diffmix.data.tiles"):
        a, b = ds.read_image(tmp_path / "a.png"), ds.read_image(tmp_path / "b.png")
    assert a.dtype == np.uint8 and np.array_equal(a, image) and np.array_equal(b, image[::-1])  # was all zeros
    notes = [r for r in caplog.records if "16-bit" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "INFO" and "0..255" in notes[0].getMessage()
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint16)])
    write_png16(tmp_path / "c.png", rgba)
    assert np.array_equal(ds.read_image(tmp_path / "c.png"), image)  # alpha dropped
    assert ds.image_problem(tmp_path / "c.png", (9, 13)) is None


def test_16_bit_range_is_scaled_to_8_bits_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(1)
    image8 = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
    image8[0, 0, 0] = 7
    wide = image8.astype(np.uint16) * 257  # how 8-bit data is widened (255 -> 65535)
    wide[0, 0, 0] += 100  # not an exact multiple: rounds to the nearest 8-bit value
    write_png16(tmp_path / "full.png", wide)
    tifffile.imwrite(tmp_path / "full.tif", wide, photometric="rgb")
    with caplog.at_level("INFO", logger="napari_diffmix.data.tiles"):
        png, tif = ds.read_image(tmp_path / "full.png"), ds.read_image(tmp_path / "full.tif")
    assert np.array_equal(png, image8) and np.array_equal(tif, image8)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "full.png" in warned[0] and "/ 257" in warned[0] and str(int(wide.max())) in warned[0]
    # Wider integers have no agreed full range: refused, naming what was found.
    tifffile.imwrite(tmp_path / "int32.tif", wide.astype(np.int32) * 1000, photometric="rgb")
    with pytest.raises(DatasetError, match=r"int32\.tif: image must be 8-bit RGB \(uint8\) or 16-bit; got int32 with values up to"):
        ds.read_image(tmp_path / "int32.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.full((4, 4, 3), -3, np.int16), photometric="rgb")
    with pytest.raises(DatasetError, match=r"neg\.tif: image has negative values"):
        ds.read_image(tmp_path / "neg.tif")


def _pannuke_fold(root, images):
    n, h, w = images.shape[:3]
    masks = np.zeros((n, h, w, 6))
    masks[:, 2:6, 2:6, 0] = 1
    masks[..., 5] = masks[..., :5].sum(-1) == 0
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    return root


def test_nan_pixels_in_a_pannuke_stack_are_refused_naming_file_and_image(tmp_path):
    import warnings

    images = np.full((3, 16, 16, 3), 120.0)
    images[1, 4, 5, 2] = np.nan
    images[2, 0, 0, 0] = np.inf
    root = _pannuke_fold(tmp_path / "fold", images)
    d = ds.open_dataset(root, PANNUKE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was a numpy RuntimeWarning and a black pixel
        assert d[0].image[0, 0, 0] == 120
        with pytest.raises(DatasetError, match=r"images\.npy: image 1 has 1 NaN pixel value\(s\) \(first at row 4, column 5\); expected 0\.\.255"):
            d[1]
        with pytest.raises(DatasetError, match=r"images\.npy: image 2 has 1 infinite pixel value\(s\)"):
            d[2]
    assert d.labels(1).image is None  # the labels alone still read


def test_stats_decodes_every_image_and_catches_truncated_and_nan(tmp_path, capsys):
    root = tmp_path / "consep"
    consep_folder(root)
    png = sorted((root / "Images").glob("*.png"))[0]
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # its header is whole: only decoding finds the damage
    assert main(["stats", str(root), "--scheme", "consep"]) == 2
    err = capsys.readouterr().err
    assert f"{png}: cannot read image: image file is truncated" in err and "1 of 3 tile image(s)" in err
    png.write_bytes(data)
    assert main(["stats", str(root), "--scheme", "consep"]) == 0
    assert "images: 3 decoded (8-bit RGB, the size of their label maps)" in capsys.readouterr().out

    images = np.full((3, 16, 16, 3), 99.0)
    images[2, 1, 1, 1] = np.nan
    fold = _pannuke_fold(tmp_path / "fold", images)
    PANNUKE.save(tmp_path / "pannuke.json")
    assert main(["stats", str(fold), "--scheme", str(tmp_path / "pannuke.json")]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 tile image(s) do not fit" in err and f"{fold / 'images.npy'}[2]: image 2 has 1 NaN pixel value(s)" in err


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def _image_layouts(tmp_path):
    """One small folder per layout that has images, each with 2 tiles: (layout, folder, scheme,
    what to damage (a PNG to truncate, or an images.npy stack to poison with NaN at image 1))."""
    tiles = make_tiles(2)
    generic = ds.write_generic(ds.Dataset(tiles, GLYSAC), tmp_path / "generic")
    yield "generic", generic, None, generic / "images" / "tile1.png"
    assert main(["export", str(generic), "--format", "geojson", "--out", str(tmp_path / "qupath")]) == 0
    yield "geojson", tmp_path / "qupath", None, tmp_path / "qupath" / "tile1.png"

    liz = tmp_path / "lizard"
    (liz / "Lizard_Labels" / "Labels").mkdir(parents=True)
    (liz / "Lizard_Images1").mkdir()
    for t in tiles:
        ids = np.unique(t.inst_map)[1:]
        savemat(liz / "Lizard_Labels" / "Labels" / f"{t.name}.mat", {
            "inst_map": t.inst_map, "id": ids[:, None], "class": t.inst_types[ids][:, None].astype(np.int32),
        })
        iio.imwrite(liz / "Lizard_Images1" / f"{t.name}.png", t.image)
    yield "lizard", liz, None, liz / "Lizard_Images1" / "tile1.png"

    hov = tmp_path / "hovernet_out"
    (hov / "mat").mkdir(parents=True)
    (hov / "images").mkdir()  # run_infer's input tiles, kept beside its output
    for t in tiles:
        ids = np.unique(t.inst_map)[1:]
        savemat(hov / "mat" / f"{t.name}.mat", {
            "inst_map": t.inst_map, "inst_uid": ids[:, None], "inst_type": t.inst_types[ids][:, None], "inst_centroid": np.zeros((ids.size, 2)),
        })
        iio.imwrite(hov / "images" / f"{t.name}.png", t.image)
    yield "hovernet", hov / "mat", "glysac", hov / "images" / "tile1.png"

    conic = tmp_path / "conic"
    conic.mkdir()
    labels = np.stack([np.stack([t.inst_map, t.type_map], -1) for t in tiles]).astype(np.uint16)
    np.save(conic / "labels.npy", labels)
    np.save(conic / "images.npy", np.stack([t.image for t in tiles]).astype(np.float64))
    yield "conic", conic, None, conic / "images.npy"

    pan = tmp_path / "stacks"
    pan.mkdir()
    np.save(pan / "inst_maps.npy", np.stack([t.inst_map for t in tiles]))
    np.save(pan / "type_maps.npy", np.stack([t.type_map for t in tiles]))
    np.save(pan / "images.npy", np.stack([t.image for t in tiles]).astype(np.float64))
    yield "pannuke", pan, "glysac", pan / "images.npy"


def test_stats_decodes_the_images_of_every_layout_that_has_them(tmp_path, capsys):
    for layout, root, scheme, damage in _image_layouts(tmp_path):
        args = ["stats", str(root)] + (["--scheme", scheme] if scheme else [])
        capsys.readouterr()
        assert main(args) == 0, layout
        out = capsys.readouterr().out
        assert f"layout {layout}" in out and "images: 2 decoded (8-bit RGB, the size of their label maps)" in out, (layout, out)
        if damage.suffix == ".png":
            data = _truncate(damage)
            expected = f"{damage}: cannot read image: image file is truncated"
        else:
            data = damage.read_bytes()
            stack = np.load(damage)
            stack[1, 3, 2, 0] = np.nan
            np.save(damage, stack)
            expected = f"{damage}[1]: image 1 has 1 NaN pixel value(s) (first at row 3, column 2)"
        assert main(args) == 2, layout
        err = capsys.readouterr().err
        assert "1 of 2 tile image(s) do not fit" in err and expected in err, (layout, err)
        damage.write_bytes(data)
    # HoVer-Net output with no tile image beside it: labels only, nothing to decode.
    (tmp_path / "hovernet_out" / "images" / "tile0.png").unlink()
    (tmp_path / "hovernet_out" / "images" / "tile1.png").unlink()
    assert main(["stats", str(tmp_path / "hovernet_out" / "mat"), "--scheme", "glysac"]) == 0
    assert "images: none (label maps only)" in capsys.readouterr().out
