import numpy as np
import pytest

from napari_diffmix.classes import DEMO
from napari_diffmix.datasets import Dataset, Tile, write_generic, open_dataset
from napari_diffmix.errors import DatasetError, SchemeError
from napari_diffmix.nuclei import check_consistency
from napari_diffmix.phantom import (
    class_style,
    make_phantom,
    make_phantom_dataset,
    phantom_scheme,
    render_tissue,
)


@pytest.fixture(scope="module")
def big():
    return make_phantom(1000, 1000, seed=0)


def test_same_seed_same_arrays_other_seed_differs():
    a = make_phantom(96, 128, seed=7)
    b = make_phantom(96, 128, seed=7)
    c = make_phantom(96, 128, seed=8)
    for name in ("image", "inst_map", "type_map"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.inst_map, c.inst_map)
    assert not np.array_equal(a.image, c.image)


def test_tile_contract(big):
    assert isinstance(big, Tile)
    assert big.image.shape == (1000, 1000, 3) and big.image.dtype == np.uint8
    assert big.inst_map.dtype == np.int32 and big.type_map.dtype == np.uint8
    types = big.inst_types
    np.testing.assert_array_equal(big.type_map, types[big.inst_map])
    check_consistency(big.inst_map, big.type_map, types)
    # ids contiguous 1..N
    np.testing.assert_array_equal(np.unique(big.inst_map), np.arange(big.inst_map.max() + 1))


def test_default_density_and_one_piece_per_nucleus(big):
    from skimage.measure import label

    n = int(big.inst_map.max())
    assert 600 <= n <= 1300
    # Occlusion never leaves a nucleus in two pieces.
    assert label(big.inst_map, background=0, connectivity=1).max() == n


def test_labels_are_exact_in_the_image(big):
    # Nuclei are hematoxylin-dark; background tissue is light: the labels mark the dark pixels.
    gray = big.image.astype(np.float32).mean(axis=2)
    nuc = big.inst_map > 0
    assert gray[nuc].mean() < gray[~nuc].mean() - 40
    # Class appearance: class 1 (small round dark) darker and smaller than class 2 (large pale oval).
    types = big.inst_types
    areas = np.bincount(big.inst_map.ravel())
    ids1, ids2, ids3 = (np.flatnonzero(types == k) for k in (1, 2, 3))
    assert areas[ids1].mean() < areas[ids2].mean()
    assert gray[big.type_map == 1].mean() < gray[big.type_map == 2].mean()
    # Spindles are elongated.
    from skimage.measure import regionprops_table

    props = regionprops_table(big.inst_map, properties=("label", "axis_major_length", "axis_minor_length"))
    elong = props["axis_major_length"] / np.maximum(props["axis_minor_length"], 1)
    by_id = dict(zip(props["label"], elong))
    assert np.median([by_id[i] for i in ids3]) > 2.5 > np.median([by_id[i] for i in ids1])


def test_class_proportions_follow_class_probs():
    probs = (0.05, 0.6, 0.35)
    t = make_phantom(800, 800, n_nuclei=600, class_probs=probs, seed=3)
    types = t.inst_types[1:]
    types = types[types > 0]
    assert 560 <= types.size <= 600
    frac = np.bincount(types, minlength=4)[1:] / types.size
    np.testing.assert_allclose(frac, probs, atol=0.03)


def test_n_nuclei_exact_when_space_allows_and_never_more():
    t = make_phantom(256, 256, n_nuclei=40, seed=1)
    assert t.inst_map.max() == 40
    crowded = make_phantom(96, 96, n_nuclei=2000, seed=1)
    assert 0 < crowded.inst_map.max() < 2000
    check_consistency(crowded.inst_map, crowded.type_map, crowded.inst_types)
    empty = make_phantom(64, 64, n_nuclei=0)
    assert empty.inst_map.max() == 0 and empty.image.shape == (64, 64, 3)


@pytest.mark.parametrize("shape", [(8, 8), (17, 301), (300, 23)])
def test_any_size(shape):
    t = make_phantom(*shape, n_nuclei=5, seed=2)
    assert t.inst_map.shape == shape and t.image.shape == (*shape, 3)
    check_consistency(t.inst_map, t.type_map, t.inst_types)


def test_many_classes_have_distinct_styles_and_a_scheme():
    t = make_phantom(400, 400, n_nuclei=90, num_classes=9, seed=4)
    counts = np.bincount(t.inst_types[1:], minlength=10)[1:]
    assert np.all(counts >= 8)
    assert class_style(5).semi_major > class_style(1).semi_major
    scheme = phantom_scheme(9)
    assert scheme.num_classes == 9 and len(set(scheme.colors)) == 9
    assert phantom_scheme(3) is DEMO
    assert phantom_scheme(200).num_classes == 200


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(SchemeError, match="class_probs has 2 entries"):
        make_phantom(64, 64, class_probs=(0.5, 0.5))
    with pytest.raises(SchemeError, match="non-negative"):
        make_phantom(64, 64, class_probs=(1, -1, 1))
    with pytest.raises(SchemeError, match="num_classes"):
        make_phantom(64, 64, num_classes=0)
    with pytest.raises(DatasetError, match="at least"):
        make_phantom(4, 64)
    with pytest.raises(DatasetError, match="n_nuclei"):
        make_phantom(64, 64, n_nuclei=-1)
    with pytest.raises(DatasetError, match="seed"):
        make_phantom(64, 64, seed=-3)
    with pytest.raises(DatasetError, match="size"):
        make_phantom_dataset(2, (64, 64, 3))


def test_render_tissue_follows_any_label_map():
    inst = np.zeros((64, 64), np.int32)
    inst[10:20, 10:20] = 1
    inst[30:50, 30:40] = 2
    types = np.array([0, 1, 2])
    a = render_tissue(inst, types, seed=1)
    b = render_tissue(inst, types, seed=1)
    np.testing.assert_array_equal(a, b)
    gray = a.astype(float).mean(axis=2)
    assert gray[inst > 0].mean() < gray[inst == 0].mean() - 40


def test_phantom_dataset_in_memory_and_writable(tmp_path):
    ds = make_phantom_dataset(3, 64, n_nuclei=6, seed=0)
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds.scheme is DEMO
    assert len(set(ds.names)) == 3
    assert not np.array_equal(ds[0].image, ds[1].image)
    again = make_phantom_dataset(3, 64, n_nuclei=6, seed=0)
    np.testing.assert_array_equal(ds[2].inst_map, again[2].inst_map)
    rect = make_phantom_dataset(1, (48, 80), num_classes=5)
    assert rect[0].shape == (48, 80) and rect.scheme.num_classes == 5
    out = write_generic(ds, tmp_path / "ph")
    back = open_dataset(out)
    np.testing.assert_array_equal(back[1].type_map, ds[1].type_map)
