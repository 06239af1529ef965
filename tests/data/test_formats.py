"""Files made by other tools: HoVer-Net's run_infer output, Lizard, CoNIC and QuPath GeoJSON.

Each test writes a small file in the tool's own convention (keys, dtypes, shapes, x/y order)
and checks which nuclei come back, where, and with which class.
"""

import json

import imageio.v3 as iio
import numpy as np
import pytest
from scipy.io import savemat

from napari_diffmix import datasets as ds
from napari_diffmix.classes import CONSEP, LIZARD
from napari_diffmix.cli import main
from napari_diffmix.errors import DatasetError, SchemeError

from _formats import BOXES, H, W, blob_tiles, box_map, conic_folder, consep_truth, hovernet_output, lizard_mat


# -- HoVer-Net run_infer output --------------------------------------------------------------------


def test_hovernet_mat_output_keeps_model_classes_and_unlisted_ids(tmp_path):
    inst = hovernet_output(tmp_path / "out")
    d = ds.open_dataset(tmp_path / "out" / "mat", "consep")
    assert d.layout == "hovernet" and d.names == ["test_1"]
    tile = d[0]
    assert tile.image is None and np.array_equal(tile.inst_map, inst)
    # The model's classes as they are: 4 stays spindle (merging would make it epithelial).
    assert tile.inst_types.tolist() == [0, 1, 2, 3, 4, 0]
    r, c, h, w = BOXES[1]
    assert np.all(tile.type_map[r : r + h, c : c + w] == 2)
    assert ds.open_dataset(tmp_path / "out", "consep").layout == "hovernet"  # the run_infer folder itself


def test_hovernet_json_output_fills_contours_x_then_y(tmp_path):
    hovernet_output(tmp_path / "out")
    tile = ds.open_dataset(tmp_path / "out" / "json", "consep")[0]
    assert np.array_equal(tile.inst_map, box_map())  # the unlisted tiny instance is not in the json
    assert tile.inst_types.tolist() == [0, 1, 2, 3, 4]
    # Without mat/ or overlay/ the json has no image size.
    hovernet_output(tmp_path / "bare", with_overlay=False)
    import shutil

    shutil.rmtree(tmp_path / "bare" / "mat")
    with pytest.raises(DatasetError, match=r"test_1\.json: HoVer-Net \.json files carry no image size"):
        ds.open_dataset(tmp_path / "bare" / "json", "consep")[0]


def test_hovernet_missing_keys_are_named(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "a.json").write_text(json.dumps({"mag": None, "nuclei": {}}))
    (tmp_path / "mat").mkdir()
    savemat(tmp_path / "mat" / "a.mat", {"inst_map": box_map(), "inst_uid": np.arange(1, 5)[:, None]})
    with pytest.raises(DatasetError, match=r"a\.json: missing key 'nuc'"):
        ds.read_hovernet_json_labels(tmp_path / "json" / "a.json", (H, W), CONSEP)
    (tmp_path / "json" / "a.json").write_text(json.dumps({"nuc": {"1": {"centroid": [1, 2], "type": 1}}}))
    with pytest.raises(DatasetError, match=r"a\.json: nucleus 1: missing key 'contour'"):
        ds.read_hovernet_json_labels(tmp_path / "json" / "a.json", (H, W), CONSEP)
    # No inst_type: an instance-only model; every nucleus unclassed.
    assert ds.open_dataset(tmp_path / "mat", "consep")[0].inst_types.tolist() == [0, 0, 0, 0, 0]
    savemat(tmp_path / "mat" / "a.mat", {"inst_uid": np.arange(1, 5)[:, None], "inst_type": np.ones((4, 1))})
    with pytest.raises(DatasetError, match=r"a\.mat: missing key 'inst_map'"):
        ds.open_dataset(tmp_path / "mat", "consep")[0]
    savemat(tmp_path / "mat" / "a.mat", {"inst_map": box_map(), "inst_uid": np.arange(1, 5)[:, None], "inst_type": np.full((4, 1), 7)})
    with pytest.raises(SchemeError, match=r"a\.mat: inst_type holds class ids \[7\] outside 0\.\.4 of scheme 'consep'"):
        ds.open_dataset(tmp_path / "mat", "consep")[0]


def test_evaluate_hovernet_output_against_consep_and_stats(tmp_path, capsys):
    hovernet_output(tmp_path / "hovernet_out", types=(1, 2, 3, 4))
    consep_truth(tmp_path / "CoNSeP" / "Test", raw=(1, 2, 4, 6))  # merged 1, 2, 3, 4: all correct
    out = tmp_path / "res.json"
    assert main(["evaluate", str(tmp_path / "hovernet_out" / "mat"), str(tmp_path / "CoNSeP" / "Test"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "using 'consep', which the path" in printed
    res = json.loads(out.read_text())
    assert res["summary"]["n_true"] == 4 and res["summary"]["n_pred"] == 5  # the unlisted instance is a detection
    assert res["class_f1"] == {"other": 1.0, "inflammatory": 1.0, "epithelial": 1.0, "spindle": 1.0}
    # A misclassified nucleus costs its classes' F1.
    hovernet_output(tmp_path / "wrong", types=(1, 2, 3, 3))
    assert main(["evaluate", str(tmp_path / "wrong" / "json"), str(tmp_path / "CoNSeP" / "Test"), "--scheme", "consep", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["class_f1"]["spindle"] == 0.0 and res["class_f1"]["other"] == 1.0 and res["summary"]["f_d"] == 1.0
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "hovernet_out" / "mat"), "--scheme", "consep", "--json", str(tmp_path / "s.json")]) == 0
    assert "layout hovernet" in capsys.readouterr().out
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["total"]["nuclei"] == 4  # the unclassed detection has no class to count under
    assert [stats["total"]["classes"][n]["nuclei"] for n in CONSEP.names] == [1, 1, 1, 1]


# -- Lizard ------------------------------------------------------------------------------------------


def test_lizard_release_layout_pairs_images_across_folders(tmp_path):
    root = tmp_path / "Lizard"
    a = lizard_mat(root / "Lizard_Labels" / "Labels" / "consep_1.mat", [7, 3, 12, 40], [1, 2, 5, 6])
    b = lizard_mat(root / "Lizard_Labels" / "Labels" / "glas_2.mat", [1, 2, 3, 4], [3, 3, 4, 2])
    for folder, stem, red in (("Lizard_Images1", "consep_1", 11), ("Lizard_Images2", "glas_2", 22)):
        (root / folder).mkdir(parents=True)
        image = np.zeros((H, W, 3), np.uint8)
        image[..., 0] = red
        iio.imwrite(root / folder / f"{stem}.png", image)
    d = ds.open_dataset(root)  # no scheme: Lizard's own
    assert d.layout == "lizard" and d.scheme is LIZARD and d.names == ["consep_1", "glas_2"]
    t1, t2 = d
    assert np.array_equal(t1.inst_map, a) and t1.image[0, 0, 0] == 11 and t2.image[0, 0, 0] == 22
    types = t1.inst_types
    assert [types[i] for i in (7, 3, 12, 40)] == [1, 2, 5, 6]  # neutrophil, epithelial, eosinophil, connective
    r, c, h, w = BOXES[2]
    assert np.all(t1.type_map[r : r + h, c : c + w] == 5)
    assert np.array_equal(t2.inst_map, b) and t2.inst_types.tolist() == [0, 3, 3, 4, 2]
    assert d.labels(0).image is None


def test_lizard_errors_name_the_key_and_the_scheme(tmp_path, capsys):
    root = tmp_path / "liz"
    lizard_mat(root / "Labels" / "x.mat", [1, 2, 3, 4], [1, 2, 3, 4])
    assert ds.open_dataset(root).layout == "lizard"  # labels only
    with pytest.raises(SchemeError, match="Lizard's six classes"):
        ds.open_dataset(root, "consep")
    assert main(["stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout lizard, scheme lizard" in out and "neutrophil" in out
    savemat(root / "Labels" / "x.mat", {"inst_map": box_map(), "id": np.arange(1, 5)[:, None]})
    with pytest.raises(DatasetError, match=r"x\.mat: missing key 'class'"):
        ds.open_dataset(root, layout="lizard")[0]
    savemat(root / "Labels" / "x.mat", {"inst_map": box_map(), "id": np.arange(1, 4)[:, None], "class": np.ones((3, 1))})
    with pytest.raises(DatasetError, match=r"x\.mat: inst_map has 1 nuclei whose id 'id' does not list \(ids \[4\]\)"):
        ds.open_dataset(root, layout="lizard")[0]


# -- CoNIC -------------------------------------------------------------------------------------------


def test_conic_arrays_give_tiles_with_lizard_classes(tmp_path, capsys):
    labels, classes = conic_folder(tmp_path / "conic")
    d = ds.open_dataset(tmp_path / "conic")
    assert d.layout == "conic" and d.scheme is LIZARD and d.names == ["00000", "00001"]
    for i, tile in enumerate(d):
        assert np.array_equal(tile.inst_map, labels[i, ..., 0]) and tile.image[0, 0, 1] == 30 + i
        assert [tile.inst_types[k] for k in (3, 9, 14)] == classes[i]
    r, c, h, w = 20, 40, 12, 5  # the tall box: rows 20..31, columns 40..44
    assert np.all(d[0].type_map[r : r + h, c : c + w] == 2) and d[0].type_map[c, r] == 0
    assert main(["stats", str(tmp_path / "conic"), "--json", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [stats["total"]["classes"][n]["nuclei"] for n in LIZARD.names] == [1, 1, 1, 1, 1, 1]
    bad = labels.copy()
    bad[1, 4:10, 10:24, 1] = 0  # a nucleus without class
    np.save(tmp_path / "conic" / "labels.npy", bad)
    with pytest.raises(DatasetError, match=r"labels\.npy\[1\]: 1 nuclei have class 0 in the class channel \(ids \[3\]\)"):
        ds.open_dataset(tmp_path / "conic")[1]
    np.save(tmp_path / "conic" / "labels.npy", labels[..., 0])
    with pytest.raises(DatasetError, match=r"labels\.npy must be \(N, H, W, 2\)"):
        ds.open_dataset(tmp_path / "conic", layout="conic")


# -- QuPath GeoJSON ----------------------------------------------------------------------------------


def test_geojson_round_trip_dataset_to_qupath_and_back(tmp_path, capsys):
    tiles = blob_tiles()
    src = ds.write_generic(ds.Dataset(tiles, CONSEP), tmp_path / "data")
    assert main(["export", str(src), "--format", "geojson", "--out", str(tmp_path / "qp")]) == 0
    assert "wrote 2 GeoJSON FeatureCollections" in capsys.readouterr().out
    fc = json.loads((tmp_path / "qp" / "tile_0.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 9
    f1 = fc["features"][0]
    assert f1["properties"]["objectType"] == "detection"
    k1 = int(tiles[0].inst_types[1])
    assert f1["properties"]["classification"] == {"name": CONSEP.names[k1 - 1], "color": list(CONSEP.color_rgb(k1))}
    assert f1["geometry"]["type"] == "Polygon" and len(f1["geometry"]["coordinates"]) == 2  # outline + hole
    xy = np.asarray(f1["geometry"]["coordinates"][0])
    assert np.ptp(xy[:, 0]) > 2 * np.ptp(xy[:, 1])  # nucleus 1 is wide: x first, as GeoJSON/QuPath want
    assert abs(xy[:, 0].mean() - 12.5) < 1 and abs(xy[:, 1].mean() - 10.5) < 1  # pixel (10, 12)'s centre is (12.5, 10.5)
    assert fc["features"][8]["geometry"]["type"] == "MultiPolygon"
    back = ds.open_dataset(tmp_path / "qp")  # scheme.json written beside
    assert back.layout == "geojson" and back.scheme.names == CONSEP.names and back.names == ["tile_0", "tile_1"]
    for orig, tile in zip(tiles, back):
        assert np.array_equal(tile.image, orig.image)
        assert np.unique(tile.inst_map).size == 10
        for k in range(1, 10):  # each nucleus: its best match by IoU, and that match's class
            mine = orig.inst_map == k
            ids, counts = np.unique(tile.inst_map[mine], return_counts=True)
            j = ids[np.argmax(counts)]
            theirs = tile.inst_map == j
            iou = np.count_nonzero(mine & theirs) / np.count_nonzero(mine | theirs)
            assert j > 0 and iou >= 0.95, (k, iou)
            assert tile.inst_types[j] == orig.inst_types[k]
        assert np.array_equal(tile.inst_map, orig.inst_map)  # exact, in fact
    capsys.readouterr()
    res = tmp_path / "res.json"
    assert main(["evaluate", str(tmp_path / "qp"), str(src), "--out", str(res)]) == 0  # any pair of layouts scores
    summary = json.loads(res.read_text())["summary"]
    assert summary["pq"] == 1.0 and summary["f_d"] == 1.0 and summary["type_accuracy"] == 1.0
    assert main(["stats", str(tmp_path / "qp")]) == 0
    assert "layout geojson, scheme consep" in capsys.readouterr().out


def test_geojson_from_qupath_cells_annotations_and_errors(tmp_path):
    folder = tmp_path / "qupath"
    (folder / "images").mkdir(parents=True)
    iio.imwrite(folder / "images" / "slide_a.png", np.zeros((40, 50, 3), np.uint8))
    square = [[10, 5], [20, 5], [20, 9], [10, 9], [10, 5]]  # x 10..20, y 5..9: 10 px wide, 4 px tall
    nucleus = [[30, 20], [34, 20], [34, 30], [30, 30], [30, 20]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 40], [0, 40], [0, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "detection", "classification": {"name": "Epithelial", "color": [0, 158, 115]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[28, 18], [36, 18], [36, 32], [28, 32], [28, 18]]]},
         "properties": {"objectType": "cell", "nucleusGeometry": {"type": "Polygon", "coordinates": [nucleus]},
                        "classification": {"name": "spindle"}}},
    ]
    (folder / "slide_a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    d = ds.open_dataset(folder, "consep")
    assert d.layout == "geojson"
    tile = d[0]
    assert tile.image.shape == (40, 50, 3)
    assert np.array_equal(np.argwhere(tile.inst_map == 1).min(0), [5, 10]) and np.array_equal(np.argwhere(tile.inst_map == 1).max(0), [8, 19])
    assert np.count_nonzero(tile.inst_map == 2) == 4 * 10  # the cell's nucleus, not the cell
    assert tile.inst_types.tolist() == [0, 3, 4]
    features[1]["properties"].pop("classification")
    (folder / "slide_a.geojson").write_text(json.dumps(features))  # a bare list of features also reads
    with pytest.raises(DatasetError, match=r"slide_a\.geojson: feature 1 has no classification name"):
        ds.open_dataset(folder, "consep")[0]
    features[1]["properties"]["classification"] = {"name": "Tumor"}
    (folder / "slide_a.geojson").write_text(json.dumps(features))
    with pytest.raises(SchemeError, match=r"feature 1 is classified 'Tumor', which is not a class of scheme 'consep'"):
        ds.open_dataset(folder, "consep")[0]
    (folder / "slide_a.geojson").write_text(json.dumps({"type": "FeatureCollection"}))
    with pytest.raises(DatasetError, match=r"slide_a\.geojson: missing key 'features'"):
        ds.open_dataset(folder, "consep")[0]
    (folder / "images" / "slide_a.png").unlink()
    with pytest.raises(DatasetError, match=r"GeoJSON carries no image size: no image beside 1 file\(s\) \['slide_a'\]"):
        ds.open_dataset(folder, "consep")


def test_geojson_export_of_a_store_with_its_originals(tmp_path, capsys):
    import zarr

    from napari_diffmix.store import create_store, write_items

    path = tmp_path / "synth.zarr"
    tiles = blob_tiles(n=3, size=(48, 48))
    create_store(path, count=2, shape=(48, 48), attrs={"scheme": CONSEP.to_dict()}, originals=1)
    g = zarr.open_group(str(path), mode="r+")
    stack = lambda attr, ts: np.stack([getattr(t, attr) for t in ts])  # noqa: E731
    write_items(g, 0, stack("image", tiles[:2]), stack("inst_map", tiles[:2]), stack("type_map", tiles[:2]), [{"index": 0}, {"index": 1}])
    write_items(g["originals"], 0, stack("image", tiles[2:]), stack("inst_map", tiles[2:]), stack("type_map", tiles[2:]),
                [{"index": 0, "kind": "original", "tile_name": "t", "origin": [0, 0]}])
    assert main(["export", str(path), "--format", "geojson"]) == 0
    out = tmp_path / "synth-geojson"
    assert "wrote 3 GeoJSON" in capsys.readouterr().out
    back = ds.open_dataset(out)
    assert back.names == ["original_t_y0_x0", "synthetic_000000", "synthetic_000001"]
    for name, orig in zip(back.names, [tiles[2], tiles[0], tiles[1]]):
        tile = back[back.names.index(name)]
        assert np.array_equal(tile.inst_map > 0, orig.inst_map > 0) and np.array_equal(tile.type_map, orig.type_map)
    assert main(["export", str(path), "--format", "geojson"]) != 0  # exists: refused without --overwrite
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["export", str(path), "--format", "geojson", "--overwrite", "--originals", "skip"]) == 0
    assert ds.open_dataset(out).names == ["synthetic_000000", "synthetic_000001"]


def test_hovernet_json_folder_under_another_name_sized_by_its_images(tmp_path):
    hovernet_output(tmp_path / "run", with_overlay=False)
    preds = tmp_path / "preds"
    preds.mkdir()
    (tmp_path / "run" / "json" / "test_1.json").rename(preds / "test_1.json")
    iio.imwrite(preds / "test_1.png", np.zeros((H, W, 3), np.uint8))
    d = ds.open_dataset(preds, "consep", layout="hovernet")
    assert np.array_equal(d[0].inst_map, box_map()) and d[0].inst_types.tolist() == [0, 1, 2, 3, 4]


def test_older_hovernet_mat_with_id_type_pairs(tmp_path):
    """run_infer before inst_uid: inst_type (N, 2) rows [id, type], no type_map."""
    (tmp_path / "mat").mkdir()
    inst = box_map(ids=[4, 9, 2, 7])
    savemat(tmp_path / "mat" / "t.mat", {"inst_map": inst, "inst_type": np.array([[2, 3], [4, 1], [7, 4], [9, 2]])})
    tile = ds.open_dataset(tmp_path / "mat", "consep")[0]
    assert np.array_equal(tile.inst_map, inst)
    assert [tile.inst_types[i] for i in (4, 9, 2, 7)] == [1, 2, 3, 4]


# -- a training preset for Lizard / CoNIC ------------------------------------------------------------
def test_lizard_training_preset_is_the_published_recipe_for_six_classes(tmp_path):
    import dataclasses

    from napari_diffmix.model.unet import PRESET_SCHEMES, UNetConfig
    from napari_diffmix.train import TrainConfig

    lizard, consep = TrainConfig.from_preset("diffmix-lizard"), TrainConfig.from_preset("diffmix-consep")
    assert dataclasses.replace(lizard, model="diffmix-consep", preset="diffmix-consep") == consep  # the same recipe
    assert [(s.steps, s.lr, s.cond_dropout) for s in lizard.stages] == [(5900, 1e-4, 0.0), (4100, 2e-5, 0.2)]
    net = UNetConfig.preset("diffmix-lizard")
    assert net.cond_channels == LIZARD.condition_channels == 8 and PRESET_SCHEMES["diffmix-lizard"] == "lizard"
    assert dataclasses.replace(net, cond_channels=6) == UNetConfig.preset("diffmix-consep")  # the same network
    # From the command line on CoNIC patches (scheme lizard from the layout); a tiny network and
    # one step keep the test fast, the rest is the preset's.
    conic_folder(tmp_path / "conic", size=64)
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "conic"), "--preset", "diffmix-lizard", "--model", "tiny", "--steps", "1",
            "--crop-size", "32", "--batch-size", "2", "--sample-every", "0", "--device", "cpu", "--out", str(run)]
    assert main(argv) == 0  # was: argparse's "invalid choice: 'diffmix-lizard'"
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "diffmix-lizard" and saved["ema_rate"] == 0.9999 and saved["guidance"] == 1.5
    assert (run / "model.safetensors").is_file()
