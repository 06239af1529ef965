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

    from napari_diffmix.export import create_store, write_items

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
    assert get_reader(str(other)) is None  # not ours: napari asks the next reader
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
