"""The napari reader, writer and sample data as plain functions (no window needed)."""

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_diffmix._reader import get_reader  # noqa: E402
from napari_diffmix._writer import write_labels  # noqa: E402
from napari_diffmix.classes import CONSEP, DEMO, GLYSAC  # noqa: E402
from napari_diffmix.errors import StoreError  # noqa: E402


def _by_name(layers):
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layers}


def test_writer_and_reader_round_trip_a_nuclei_layer(tmp_path, disk_map):
    from napari_diffmix._layers import nuclei_layer_data

    inst_map, inst_types = disk_map
    data, kwargs, _ = nuclei_layer_data(inst_map, inst_types, DEMO, "disks")
    (written,) = write_labels(str(tmp_path / "edited"), data, kwargs)
    assert written.endswith("edited.npz")
    with np.load(written) as z:
        assert np.array_equal(z["type_map"], inst_types[inst_map])
        assert json.loads(str(z["scheme"]))["name"] == "demo"
    reader = get_reader(written)
    assert reader is not None
    ((back, back_kwargs, kind),) = reader(written)
    assert kind == "labels" and np.array_equal(back, inst_map)
    features = back_kwargs["features"]
    assert features["index"].tolist() == list(range(1, 10))
    assert features["class"].tolist() == inst_types[1:].tolist()
    assert back_kwargs["metadata"]["diffmix"]["scheme"]["name"] == "demo"


def test_writer_refuses_stacks(tmp_path):
    from napari_diffmix.errors import LabelError

    with pytest.raises(LabelError, match="2-D"):
        write_labels(str(tmp_path / "x.npz"), np.zeros((2, 4, 4), np.int32), {})


def _store(path, n=2, size=16, scheme=DEMO, finished=None):
    import zarr

    from napari_diffmix.store import create_store, write_items

    attrs = {} if scheme is None else {"scheme": scheme.to_dict()}
    create_store(path, count=n, shape=(size, size), attrs=attrs, originals=1)
    inst = np.zeros((n, size, size), np.int32)
    inst[:, 4:8, 4:8] = 1
    inst[:, 10:14, 9:13] = 2
    types = np.where(inst == 1, 2, np.where(inst == 2, 3, 0)).astype(np.uint8)
    images = np.full((n, size, size, 3), 200, np.uint8)
    k = n if finished is None else finished
    write_items(zarr.open_group(str(path), mode="r+"), 0, images[:k], inst[:k], types[:k], [{"index": i} for i in range(k)])
    return inst, types


def test_store_reader_shows_images_classes_and_nuclei(tmp_path):
    path = tmp_path / "synth.zarr"
    inst, types = _store(path)
    reader = get_reader(str(path))
    assert reader is not None
    layers = _by_name(reader(str(path)))
    assert list(layers) == [
        "synth images", "synth classes", "synth nuclei",
        "synth originals images", "synth originals classes", "synth originals nuclei",
    ]
    images, image_kwargs, kind = layers["synth images"]
    assert kind == "image" and image_kwargs["rgb"] and images.shape == (2, 16, 16, 3)
    classes, class_kwargs, _ = layers["synth classes"]
    assert np.array_equal(np.asarray(classes[1]), types[1])
    colors = class_kwargs["colormap"].color_dict
    assert np.allclose(colors[2][:3], [0, 0x9E / 255, 0x73 / 255], atol=1e-3)  # DEMO epithelial
    nuclei, nuclei_kwargs, _ = layers["synth nuclei"]
    assert np.array_equal(np.asarray(nuclei[0]), inst[0])
    assert nuclei_kwargs["metadata"]["diffmix"]["scheme"]["name"] == "demo"
    assert layers["synth originals images"][1]["visible"] is False


def test_store_reader_warns_about_unfinished_items(tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    warned = []
    monkeypatch.setattr(notifications, "show_warning", lambda message: warned.append(message))
    path = tmp_path / "partial.zarr"
    _store(path, n=3, finished=1)
    get_reader(str(path))(str(path))
    assert "1 of 3 items are finished" in warned[-1]


def test_store_reader_errors_are_specific(tmp_path):
    path = tmp_path / "noscheme.zarr"
    _store(path, scheme=None)
    with pytest.raises(StoreError, match="records no class scheme"):
        get_reader(str(path))(str(path))
    other = tmp_path / "other.zarr"
    import zarr

    zarr.open_group(str(other), mode="w").create_array("x", data=np.zeros(3))
    # Not a store: handed to napari's own reader, so that choosing this plugin for *.zarr opens any zarr.
    handed = get_reader(str(other))
    assert handed is not None and handed.__module__.startswith("napari_builtins")
    assert get_reader(str(tmp_path / "missing.mat")) is None
    np.savez(tmp_path / "features.npz", x=np.zeros(3))
    assert get_reader(str(tmp_path / "features.npz")) is None
    assert get_reader([str(path), str(other)]) is None


def _write_mat(folder, stem, inst_map, raw_inst_type, image):
    from scipy.io import savemat

    import imageio.v3 as iio

    (folder / "Images").mkdir(parents=True, exist_ok=True)
    (folder / "Labels").mkdir(parents=True, exist_ok=True)
    if image is not None:
        iio.imwrite(folder / "Images" / f"{stem}.png", image)
    mat = folder / "Labels" / f"{stem}.mat"
    savemat(mat, {"inst_map": inst_map, "inst_type": np.asarray(raw_inst_type, float).reshape(-1, 1)})
    return mat


def test_mat_reader_merges_raw_types_by_scheme(tmp_path, disk_map):
    inst_map, _ = disk_map
    image = np.full((*inst_map.shape, 3), 220, np.uint8)
    # CoNSeP raw ids: 1 other, 2 inflammatory, 3/4 epithelial, 5/6/7 spindle.
    raw = [1, 2, 3, 4, 5, 6, 7, 2, 4]
    mat = _write_mat(tmp_path / "CoNSeP" / "Train", "tile_1", inst_map, raw, image)
    layers = _by_name(get_reader(str(mat))(str(mat)))
    image_data, image_kwargs, _ = layers["tile_1 H&E"]
    assert image_data.shape == (96, 96, 3)
    _, kwargs, _ = layers["tile_1 nuclei"]
    assert kwargs["features"]["class"].tolist() == [1, 2, 3, 3, 4, 4, 4, 2, 3]
    assert kwargs["metadata"]["diffmix"]["scheme"]["name"] == CONSEP.name
    assert np.array_equal(image_kwargs["metadata"]["diffmix"]["type_map"], CONSEP.merge_lut()[np.r_[0, raw]][inst_map])


def test_mat_reader_falls_back_to_glysac_ids_and_opens_labels_without_image(tmp_path, disk_map, monkeypatch):
    inst_map, _ = disk_map
    image = np.full((*inst_map.shape, 3), 220, np.uint8)
    raw = [9, 10, 8, 4, 5, 3, 1, 2, 7]  # ids 8..10 exist only in GLySAC
    mat = _write_mat(tmp_path / "gastric", "g1", inst_map, raw, image)
    _, kwargs, _ = _by_name(get_reader(str(mat))(str(mat)))["g1 nuclei"]
    assert kwargs["metadata"]["diffmix"]["scheme"]["name"] == GLYSAC.name
    assert kwargs["features"]["class"].tolist() == [1, 1, 3, 2, 2, 3, 1, 1, 2]
    import napari.utils.notifications as notifications

    told = []
    monkeypatch.setattr(notifications, "show_info", told.append)
    lonely = _write_mat(tmp_path / "glysac" / "lonely", "l1", inst_map, raw, None)
    ((data, kwargs, kind),) = get_reader(str(lonely))(str(lonely))
    assert kind == "labels" and kwargs["name"] == "l1 nuclei" and np.array_equal(data, inst_map)
    assert kwargs["features"]["class"].tolist() == [1, 1, 3, 2, 2, 3, 1, 1, 2]
    assert "no image l1.png/.tif" in told[-1] and "opened the nuclei only" in told[-1]


def test_sample_data_layers_are_consistent():
    from napari_diffmix._sample_data import blank_canvas, demo_tile
    from napari_diffmix._layers import types_from_features

    (image, image_kwargs, _), (inst_map, kwargs, kind) = demo_tile()
    assert kind == "labels" and image.shape[:2] == inst_map.shape
    types = types_from_features(kwargs["features"], int(inst_map.max()) + 1)
    assert np.array_equal(types[inst_map], image_kwargs["metadata"]["diffmix"]["type_map"])
    ((blank, blank_kwargs, _),) = blank_canvas()
    assert blank.shape == (256, 256) and not blank.any()
    assert blank_kwargs["metadata"]["diffmix"]["scheme"]["name"] == "demo"


# -- files of other tools: HoVer-Net output, Lizard, QuPath GeoJSON ---------------------------------
def _classes_by_id(features):
    return {int(i): int(k) for i, k in zip(features["index"], features["class"])}


@pytest.fixture
def napari_plugins():
    """napari's plugin registry with this package's manifest (what a running napari has)."""
    from napari.plugins import _initialize_plugins

    _initialize_plugins()


def test_hovernet_mat_and_json_open_with_their_image_without_naming_the_plugin(tmp_path, napari_plugins):
    import imageio.v3 as iio
    from napari.components import ViewerModel
    from _formats import BOXES, H, W, box_map, hovernet_output

    out = tmp_path / "consep_run"  # the path names the dataset: classes get CoNSeP's names
    hovernet_output(out)
    image = np.full((H, W, 3), 90, np.uint8)
    iio.imwrite(out / "test_1.png", image)  # the tile HoVer-Net read, beside its output
    for f in (out / "mat" / "test_1.mat", out / "json" / "test_1.json"):
        viewer = ViewerModel()
        viewer.open(str(f), plugin=None)  # napari's File > Open / drag and drop: no plugin named
        assert [layer.name for layer in viewer.layers] == ["test_1 H&E", "test_1 nuclei"]
        assert np.array_equal(viewer.layers["test_1 H&E"].data, image)
        nuclei = viewer.layers["test_1 nuclei"]
        assert np.array_equal(nuclei.data > 0, box_map() > 0 if f.suffix == ".json" else (box_map() > 0) | (np.arange(W)[None] < 2) & (np.arange(H)[:, None] < 1))
        r, c, h, w = BOXES[3]
        nid = int(nuclei.data[r, c])
        assert _classes_by_id(nuclei.features)[nid] == 4  # the model's spindle, not merged again
        assert nuclei.metadata["diffmix"]["scheme"]["name"] == "consep"


def test_hovernet_prediction_elsewhere_gets_numbered_classes(tmp_path, monkeypatch):
    import napari.utils.notifications as notifications
    from _formats import hovernet_output

    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    monkeypatch.setattr(notifications, "show_info", lambda m: None)
    hovernet_output(tmp_path / "run", with_overlay=True)
    layers = _by_name(get_reader(str(tmp_path / "run" / "json" / "test_1.json"))(str(tmp_path / "run" / "json" / "test_1.json")))
    _, kwargs, _ = layers["test_1 nuclei"]  # no image: overlay/ gives the size only
    assert list(layers) == ["test_1 nuclei"]
    assert kwargs["metadata"]["diffmix"]["scheme"]["classes"][3]["name"] == "class 4"
    assert "numbered classes" in warned[-1]
    (tmp_path / "notes.json").write_text(json.dumps({"nuclei": []}))
    assert get_reader(str(tmp_path / "notes.json")) is None  # a JSON file that is not HoVer-Net's


def test_lizard_mat_opens_with_lizard_classes_and_its_image(tmp_path):
    import imageio.v3 as iio
    from _formats import H, W, lizard_mat

    root = tmp_path / "data"
    mat = root / "Lizard_Labels" / "Labels" / "glas_1.mat"
    inst = lizard_mat(mat, [5, 9, 2, 30], [1, 5, 2, 6])
    (root / "Lizard_Images2").mkdir(parents=True)
    iio.imwrite(root / "Lizard_Images2" / "glas_1.png", np.full((H, W, 3), 77, np.uint8))
    layers = _by_name(get_reader(str(mat))(str(mat)))
    assert layers["glas_1 H&E"][0][0, 0, 0] == 77
    data, kwargs, _ = layers["glas_1 nuclei"]
    assert np.array_equal(data, inst)
    classes = _classes_by_id(kwargs["features"])
    assert [classes[i] for i in (5, 9, 2, 30)] == [1, 5, 2, 6]
    assert kwargs["metadata"]["diffmix"]["scheme"]["name"] == "lizard"


def test_geojson_opens_with_its_image_and_the_files_classes(tmp_path, napari_plugins):
    import imageio.v3 as iio
    from napari.components import ViewerModel

    from napari_diffmix.geojson import feature_collection

    inst = np.zeros((30, 40), np.int32)
    inst[3:7, 5:20] = 1  # wide
    inst[12:28, 30:34] = 2  # tall
    types = np.array([0, 2, 4], np.uint8)[inst]
    fc = feature_collection(inst, types, CONSEP)
    fc["features"][0]["properties"]["classification"]["color"] = [10, 200, 30]  # a QuPath user's colour
    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "slide.geojson").write_text(json.dumps(fc))
    iio.imwrite(tmp_path / "review" / "slide.png", np.full((30, 40, 3), 5, np.uint8))
    viewer = ViewerModel()
    viewer.open(str(tmp_path / "review" / "slide.geojson"), plugin=None)
    assert [layer.name for layer in viewer.layers] == ["slide H&E", "slide nuclei"]
    nuclei = viewer.layers["slide nuclei"]
    assert np.array_equal(nuclei.data, inst)
    scheme = nuclei.metadata["diffmix"]["scheme"]
    # No scheme.json and no dataset name in the path: the classes the file uses, with its colours.
    assert [c["name"] for c in scheme["classes"]] == ["inflammatory", "spindle"]
    assert scheme["classes"][0]["color"] == "#0AC81E"
    assert _classes_by_id(nuclei.features) == {1: 1, 2: 2}
    (tmp_path / "review" / "slide.png").unlink()
    from napari_diffmix.errors import DatasetError

    with pytest.raises(DatasetError, match=r"slide\.geojson: GeoJSON carries no image size"):
        get_reader(str(tmp_path / "review" / "slide.geojson"))(str(tmp_path / "review" / "slide.geojson"))


def test_store_opens_through_the_manifest_and_other_zarr_still_open(tmp_path, napari_plugins):
    """viewer.open(path) defaults to napari's own reader (plugin='napari'); a store needs this plugin
    named, or chosen once for *.zarr in napari's preferences, which stays safe for any other zarr."""
    import zarr
    from napari.components import ViewerModel

    path = tmp_path / "synth.zarr"
    _store(path)
    viewer = ViewerModel()
    viewer.open(str(path), plugin="napari-diffmix")
    assert [layer.name for layer in viewer.layers][:3] == ["synth images", "synth classes", "synth nuclei"]
    other = tmp_path / "plain.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", data=np.arange(12, dtype=np.float32).reshape(3, 4))
    viewer.open(str(other), plugin="napari-diffmix")
    assert np.array_equal(np.asarray(viewer.layers[-1].data), np.arange(12).reshape(3, 4))


def test_store_originals_align_with_their_synthetic_items(tmp_path, tiny_model):
    """One slider position shows a synthetic item and the original patch it came from (the store
    holds 3 items and the whole grid of originals: the slider must not span the grid)."""
    from napari_diffmix.demo_data import demo_split
    from napari_diffmix.datasets import Dataset
    from napari_diffmix.mixing import MixCache, PlanSpec, plan_balanced_set
    from napari_diffmix.store import open_store
    from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob

    dataset = Dataset([demo_split().train], DEMO)  # in memory: its original patches are included
    cache = MixCache(dataset)
    plan = plan_balanced_set(dataset, PlanSpec(patches=3, patch_size=32, stride=32, seed=1), cache=cache)
    out = tmp_path / "s.zarr"
    config = SynthesisConfig(steps=2, batch_size=3, device="cpu", precision="fp32", originals="include")
    SynthesisJob(dataset, plan, tiny_model, out, config, cache=cache).run()
    store = open_store(out)
    assert len(store.originals) > 3  # the whole grid
    layers = {kw["name"]: data for data, kw, _ in get_reader(str(out))(str(out))}
    synthetic, originals = layers["s images"], layers["s originals images"]
    assert originals.shape == synthetic.shape == (3, 32, 32, 3)
    tile = dataset[0].image
    for i in range(3):
        y, x = store.provenance(i)["origin"]
        np.testing.assert_array_equal(np.asarray(originals[i]), tile[y : y + 32, x : x + 32])
    assert layers["s originals nuclei"].shape == (3, 32, 32)
