import numpy as np
import pytest

from napari_diffmix import demo_data
from napari_diffmix.classes import DEMO
from napari_diffmix.datasets import Dataset, Tile, dataset_stats, open_dataset
from napari_diffmix.errors import DatasetError
from napari_diffmix.nuclei import check_consistency, inst_types_from_maps


@pytest.fixture(scope="module")
def derived():
    image = demo_data.demo_image()
    inst_map, type_map = demo_data.derive_demo_labels(image)
    return image, inst_map, type_map


def test_derivation_equals_shipped_file(derived):
    _, inst_map, type_map = derived
    shipped_inst, shipped_type = demo_data.load_demo_labels()
    assert inst_map.dtype == np.int32 and type_map.dtype == np.uint8
    np.testing.assert_array_equal(inst_map, shipped_inst)
    np.testing.assert_array_equal(type_map, shipped_type)


def test_derivation_is_deterministic(derived):
    image, inst_map, type_map = derived
    again_inst, again_type = demo_data.derive_demo_labels(image.copy())
    np.testing.assert_array_equal(inst_map, again_inst)
    np.testing.assert_array_equal(type_map, again_type)


def test_labels_are_consistent_and_contiguous(derived):
    _, inst_map, type_map = derived
    check_consistency(inst_map, type_map)
    ids = np.unique(inst_map)
    np.testing.assert_array_equal(ids, np.arange(inst_map.max() + 1))
    areas = np.bincount(inst_map.ravel())[1:]
    assert areas.min() >= demo_data.MIN_AREA


def test_counts_in_documented_ranges(derived):
    image, inst_map, type_map = derived
    n = int(inst_map.max())
    assert 300 <= n <= 500
    types = inst_types_from_maps(inst_map, type_map)[1:]
    counts = np.bincount(types, minlength=4)
    assert counts[0] == 0
    # other is the rare class (documented aim 5-10 %), epithelial the largest.
    assert 0.04 * n <= counts[demo_data.OTHER] <= 0.10 * n
    assert counts[demo_data.EPITHELIAL] > counts[demo_data.STROMAL] > counts[demo_data.OTHER]
    features = demo_data.demo_features(image, inst_map)
    ring = features.ring_dab
    assert ring[types == demo_data.EPITHELIAL].mean() > 4 * ring[types == demo_data.STROMAL].mean()


def test_classes_follow_the_rules(derived):
    image, inst_map, type_map = derived
    f = demo_data.demo_features(image, inst_map)
    types = inst_types_from_maps(inst_map, type_map)[1:]
    epi = types == demo_data.EPITHELIAL
    np.testing.assert_array_equal(epi, (f.ring_dab >= f.dab_cut) | (f.in_region >= 0.5))
    other = types == demo_data.OTHER
    assert np.all(f.elongation[other] <= demo_data.OTHER_MAX_ELONGATION)
    assert np.all(f.area[other] <= np.median(f.area))
    # Elongated non-epithelial nuclei (spindles) are stromal, never "other".
    assert np.all(types[~epi & (f.elongation > demo_data.OTHER_MAX_ELONGATION)] == demo_data.STROMAL)


def test_nuclei_are_not_merged_sheets(derived):
    _, inst_map, _ = derived
    areas = np.bincount(inst_map.ravel())[1:]
    # A single global threshold merges the epithelium into sheets of thousands of pixels.
    assert areas.max() < 2000
    assert np.median(areas) < 400


def test_classify_rejects_bad_images():
    with pytest.raises(DatasetError, match="RGB uint8"):
        demo_data.derive_demo_labels(np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match="too small"):
        demo_data.derive_demo_labels(np.zeros((20, 20, 3), np.uint8))


def test_load_demo_tile_and_dataset():
    tile = demo_data.load_demo_tile()
    assert isinstance(tile, Tile)
    assert tile.image.shape == (512, 512, 3) and tile.image.dtype == np.uint8
    check_consistency(tile.inst_map, tile.type_map, tile.inst_types)
    ds = demo_data.demo_dataset()
    assert isinstance(ds, Dataset) and len(ds) == 1 and ds.scheme is DEMO
    np.testing.assert_array_equal(ds[0].inst_map, tile.inst_map)
    opened = open_dataset("demo")
    assert opened.names == ds.names
    np.testing.assert_array_equal(opened[0].type_map, tile.type_map)
    stats = dataset_stats(ds)
    assert stats.total.total_nuclei == tile.inst_map.max()


def test_loaded_tiles_do_not_share_memory():
    a = demo_data.load_demo_tile()
    a.inst_map[:] = 0
    b = demo_data.load_demo_tile()
    assert b.inst_map.max() > 0


def test_split_is_documented_crop():
    tile = demo_data.load_demo_tile()
    train, held_out = demo_data.demo_split()
    cut = 512 - demo_data.HELD_OUT_COLUMNS
    assert train.shape == (512, cut) and held_out.shape == (512, demo_data.HELD_OUT_COLUMNS)
    np.testing.assert_array_equal(np.concatenate([train.inst_map, held_out.inst_map], axis=1), tile.inst_map)
    np.testing.assert_array_equal(np.concatenate([train.image, held_out.image], axis=1), tile.image)
    assert train.name != held_out.name
    for part in (train, held_out):
        check_consistency(part.inst_map, part.type_map)
        assert part.inst_map.max() > 0
    ds = demo_data.demo_split_dataset()
    assert ds.names == [train.name, held_out.name]


def test_mismatched_image_is_refused(tmp_path):
    inst, typ = demo_data.load_demo_labels()
    path = tmp_path / "labels.npz"
    np.savez_compressed(path, inst_map=inst.astype(np.uint16), type_map=typ, image_sha256=np.array("0" * 64))
    with pytest.raises(DatasetError, match="regenerate"):
        demo_data.load_demo_tile(path)


def test_missing_or_corrupt_labels_file(tmp_path):
    with pytest.raises(DatasetError, match="missing"):
        demo_data.load_demo_tile(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        demo_data.load_demo_tile(bad)


def test_cli_demo_data_writes_readable_generic_folder(tmp_path, capsys):
    from napari_diffmix.cli import main

    out = tmp_path / "demo-out"
    assert main(["demo-data", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "other" in printed and "epithelial" in printed and "stromal" in printed and "total" in printed
    back = open_dataset(out)
    assert back.scheme.names == DEMO.names and back.names == [demo_data.DEMO_NAME]
    tile = demo_data.load_demo_tile()
    np.testing.assert_array_equal(back[0].inst_map, tile.inst_map)
    np.testing.assert_array_equal(back[0].type_map, tile.type_map)
    np.testing.assert_array_equal(back[0].image, tile.image)
    total = str(int(tile.inst_map.max()))
    assert any(line.startswith("total") and total in line.split() for line in printed.splitlines())

    # A second run refuses to clobber the folder unless asked.
    assert main(["demo-data", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo-data", "--out", str(out), "--split", "--overwrite"]) == 0
    split = open_dataset(out)
    assert sorted(split.names) == sorted([f"{demo_data.DEMO_NAME}-train", f"{demo_data.DEMO_NAME}-heldout"])
    held = split[split.names.index(f"{demo_data.DEMO_NAME}-heldout")]
    assert held.shape == (512, demo_data.HELD_OUT_COLUMNS)
