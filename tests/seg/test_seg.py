"""Downstream HoVer-Net: targets, loss, post-processing, training, prediction and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from _browser import check_page, chromium
from napari_diffmix import metrics
from napari_diffmix.cli import main
from napari_diffmix.errors import CheckpointError, DatasetError, SchemeError, StoreError
from napari_diffmix.phantom import make_phantom, make_phantom_dataset
from napari_diffmix.seg.checkpoint import load_seg_model
from napari_diffmix.seg.data import open_synthetic_store, open_tiles
from napari_diffmix.seg.loss import hovernet_loss, hv_gradients, msge_loss, soft_dice_loss
from napari_diffmix.seg.model import HoVerNet, SegConfig
from napari_diffmix.seg.postprocess import PostprocessConfig, postprocess, sobel
from napari_diffmix.seg.predict import predict_maps, segment
from napari_diffmix.seg.targets import hv_targets, seg_targets
from napari_diffmix.seg.train import SegTrainConfig, train_segmentation

FAST = dict(batch_size=4, crop_size=64, lr=3e-3, device="cpu", num_threads=1, log_every=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms():
    return make_phantom_dataset(3, 128, seed=11)


def perfect_outputs(inst_map, type_map, num_classes):
    np_prob = (inst_map > 0).astype(np.float32)
    tp_prob = np.eye(num_classes + 1, dtype=np.float32)[type_map].transpose(2, 0, 1)
    return np_prob, hv_targets(inst_map), tp_prob


# -- targets ----------------------------------------------------------------------------------


def test_hv_targets_of_a_rectangle():
    m = np.zeros((10, 12), np.int32)
    m[2:7, 3:10] = 4  # 5 rows x 7 cols, centre (4, 6)
    hv = hv_targets(m)
    assert hv.shape == (2, 10, 12) and hv.dtype == np.float32
    np.testing.assert_allclose(hv[0, 4, 3:10], [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1], atol=1e-6)
    np.testing.assert_allclose(hv[1, 2:7, 5], [-1, -0.5, 0, 0.5, 1], atol=1e-6)
    assert not hv[:, m == 0].any()


def test_hv_targets_touching_nuclei_jump_at_the_border():
    m = np.zeros((8, 16), np.int32)
    m[2:6, 1:8] = 1
    m[2:6, 8:15] = 9
    hv = hv_targets(m)
    assert hv[0, 3, 7] == 1.0 and hv[0, 3, 8] == -1.0
    assert hv.min() >= -1 and hv.max() <= 1
    np_t, _, tp_t = seg_targets(m, (m > 0).astype(np.uint8) * 2)
    assert np_t.sum() == np.count_nonzero(m) and set(np.unique(tp_t)) == {0, 2}


# -- post-processing --------------------------------------------------------------------------


def test_sobel_matches_the_3x3_kernel():
    rng = np.random.default_rng(0)
    img = rng.random((9, 11))
    from scipy import ndimage as ndi

    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    np.testing.assert_allclose(sobel(img, axis=1, ksize=3), ndi.correlate(img, kx, mode="mirror"), atol=1e-12)
    np.testing.assert_allclose(sobel(img, axis=0, ksize=3), ndi.correlate(img, kx.T, mode="mirror"), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_postprocess_recovers_ground_truth_from_perfect_maps(seed):
    tile = make_phantom(256, 256, num_classes=3, seed=seed)
    inst, types = postprocess(*perfect_outputs(tile.inst_map, tile.type_map, 3))
    assert inst.dtype == np.int32 and types.dtype == np.uint8
    r = metrics.evaluate_image(tile.inst_map, inst, tile.type_map, types)
    assert r.pq > 0.93 and r.dice == pytest.approx(1.0)
    assert r.tally.type_accuracy == 1.0


def test_postprocess_returns_consistent_maps_from_noisy_outputs():
    rng = np.random.default_rng(3)
    tile = make_phantom(128, 128, num_classes=3, seed=5)
    np_prob, hv, tp = perfect_outputs(tile.inst_map, tile.type_map, 3)
    np_prob = np.clip(np_prob + rng.normal(0, 0.3, np_prob.shape), 0, 1)
    hv = hv + rng.normal(0, 0.2, hv.shape)
    tp = rng.dirichlet(np.ones(4), size=np_prob.shape).transpose(2, 0, 1)
    inst, types = postprocess(np_prob, hv, tp, PostprocessConfig(sobel_ksize=11))
    ids = np.unique(inst)
    assert ids[0] == 0 and np.array_equal(ids, np.arange(ids.size))  # contiguous 1..N
    inst_types = metrics.centroids_and_types(inst, types)[1]
    lut = np.concatenate([[0], inst_types]).astype(np.uint8)
    np.testing.assert_array_equal(types, lut[inst])  # type_map == inst_types[inst_map]
    assert (inst_types >= 1).all() and (inst_types <= 3).all()


def test_postprocess_of_empty_maps():
    inst, types = postprocess(np.zeros((32, 32)), np.zeros((2, 32, 32)), np.ones((3, 32, 32)) / 3)
    assert not inst.any() and not types.any()


# -- loss and model ---------------------------------------------------------------------------


def test_loss_terms_vanish_or_shrink_for_perfect_outputs():
    tile = make_phantom(96, 96, num_classes=3, seed=2)
    np_t, hv_t, tp_t = (torch.from_numpy(a)[None] for a in seg_targets(tile.inst_map, tile.type_map))
    perfect = {
        "np": torch.nn.functional.one_hot(np_t, 2).permute(0, 3, 1, 2).float() * 30,
        "hv": hv_t.clone(),
        "tp": torch.nn.functional.one_hot(tp_t, 4).permute(0, 3, 1, 2).float() * 30,
    }
    terms = hovernet_loss(perfect, np_t, hv_t, tp_t)
    assert terms["hv_mse"] == 0 and terms["hv_msge"] == 0
    assert terms["loss"] < 1e-3
    rand = {k: torch.randn_like(v) for k, v in perfect.items()}
    assert hovernet_loss(rand, np_t, hv_t, tp_t)["loss"] > 1.0
    # the gradient kernels differentiate the horizontal map along x only
    ramp = torch.arange(10.0).repeat(10, 1)[None, None].repeat(1, 2, 1, 1)
    g = hv_gradients(ramp)
    assert g[0, 0, 5, 5] > 0 and g[0, 1, 5, 5] == 0
    assert msge_loss(ramp, ramp, torch.ones(1, 10, 10)) == 0
    assert soft_dice_loss(perfect["np"], np_t) < 1e-3


def test_model_shapes_any_size_and_channels_last_backward():
    model = HoVerNet(SegConfig.preset("tiny", 4))
    out = model(torch.randn(2, 3, 37, 50))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"np": (2, 2, 37, 50), "hv": (2, 2, 37, 50), "tp": (2, 5, 37, 50)}
    # NHWC-strided input (numpy -> permute) once crashed torch's CPU backward
    x = torch.randn(2, 32, 32, 3).permute(0, 3, 1, 2)
    sum(v.mean() for v in model(x).values()).backward()
    with pytest.raises(ValueError, match="unknown segmentation model preset"):
        SegConfig.preset("huge", 3)


# -- training, checkpoints, prediction --------------------------------------------------------


def test_training_decreases_loss_and_checkpoint_round_trips(phantoms, tmp_path):
    cfg = SegTrainConfig(steps=40, seed=1, **FAST)
    result = train_segmentation(phantoms, model_config=SegConfig.preset("tiny", 3), config=cfg, out_dir=tmp_path / "m")
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2])
    assert torch.get_num_threads() >= 1

    model, info = load_seg_model(tmp_path / "m")
    assert info.scheme == phantoms.scheme and info.training["step"] == 40
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a, b = result.model(x), model(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])

    # same seed, same run
    again = train_segmentation(phantoms, model_config=SegConfig.preset("tiny", 3), config=SegTrainConfig(steps=5, seed=1, **FAST))
    first = train_segmentation(phantoms, model_config=SegConfig.preset("tiny", 3), config=SegTrainConfig(steps=5, seed=1, **FAST))
    assert again.history[-1]["loss"] == first.history[-1]["loss"]

    calls = iter(range(100))  # polled once per step; the step that sees the request still finishes
    stopped = train_segmentation(
        phantoms, model_config=SegConfig.preset("tiny", 3), config=SegTrainConfig(steps=50, **FAST),
        out_dir=tmp_path / "stopped", should_stop=lambda: next(calls) >= 2,
    )
    assert stopped.interrupted and stopped.steps == 3
    assert load_seg_model(tmp_path / "stopped")[1].training["step"] == 3

    with pytest.raises(CheckpointError, match="--overwrite"):
        train_segmentation(phantoms, model_config=SegConfig.preset("tiny", 3), config=SegTrainConfig(steps=1, **FAST), out_dir=tmp_path / "m")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="does not hold a segmentation model"):
        train_segmentation(phantoms, model_config=SegConfig.preset("tiny", 3), config=SegTrainConfig(steps=1, **FAST), out_dir=tmp_path / "other")
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_seg_model(tmp_path / "other")


class PixelModel(torch.nn.Module):
    """Outputs that depend on each pixel alone, so sliding windows must equal one pass."""

    def __init__(self):
        super().__init__()
        self.config = SegConfig(num_classes=2)
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return {"np": torch.cat([x[:, :1], -x[:, :1]], 1) * self.w, "hv": x[:, 1:3], "tp": x * 2}


def test_sliding_window_blending_is_seamless():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    model = PixelModel()
    whole = predict_maps(model, image, window=256)
    tiled = predict_maps(model, image, window=64, overlap=24, batch_size=3)
    np.testing.assert_allclose(tiled.np_prob, whole.np_prob, atol=1e-5)
    np.testing.assert_allclose(tiled.hv, whole.hv, atol=1e-5)
    np.testing.assert_allclose(tiled.tp_prob, whole.tp_prob, atol=1e-5)
    np.testing.assert_allclose(whole.tp_prob.sum(0), 1.0, atol=1e-5)


def test_segment_returns_valid_maps():
    model = HoVerNet(SegConfig.preset("tiny", 3)).eval()
    image = make_phantom(96, 96, seed=4).image
    inst, types = segment(model, image, window=64, overlap=16)
    assert inst.shape == types.shape == (96, 96) and inst.dtype == np.int32 and types.dtype == np.uint8
    with pytest.raises(DatasetError, match="uint8 RGB"):
        segment(model, image[..., 0])


# -- synthetic store --------------------------------------------------------------------------


def write_store(path, tiles, done=None, scheme=None, drop=None, dtypes=None):
    import zarr

    n, (h, w) = len(tiles), tiles[0].inst_map.shape
    g = zarr.open_group(str(path), mode="w")
    dtypes = {"images": "uint8", "inst_maps": "int32", "type_maps": "uint8", **(dtypes or {})}
    arrays = {
        "images": ((n, h, w, 3), dtypes["images"], [t.image for t in tiles]),
        "inst_maps": ((n, h, w), dtypes["inst_maps"], [t.inst_map for t in tiles]),
        "type_maps": ((n, h, w), dtypes["type_maps"], [t.type_map for t in tiles]),
    }
    for key, (shape, dtype, data) in arrays.items():
        if key == drop:
            continue
        g.create_array(key, shape=shape, dtype=dtype, chunks=(1, *shape[1:]))[:] = np.stack(data)
    g.create_array("done", shape=(n,), dtype="bool")[:] = np.ones(n, bool) if done is None else np.asarray(done)
    if scheme is not None:
        g.attrs["scheme"] = scheme.to_dict()
    return path


def test_synthetic_store_reader(tmp_path, phantoms, caplog):
    tiles = list(make_phantom_dataset(3, 96, seed=5))
    with caplog.at_level("WARNING", logger="napari_diffmix.seg.data"):
        store = open_synthetic_store(write_store(tmp_path / "s.zarr", tiles, done=[True, False, True], scheme=phantoms.scheme))
    assert "s.zarr is not complete: 2 of 3 items are done (items 0, 2); only those are used" in caplog.text
    assert len(store) == 2 and store.names == ["synthetic_000000", "synthetic_000002"]
    np.testing.assert_array_equal(store[1].inst_map[10:20, 5:9], tiles[2].inst_map[10:20, 5:9])
    assert store.tile(0).image.shape == (96, 96, 3)
    ds = open_tiles(tmp_path / "s.zarr")
    assert ds.scheme == phantoms.scheme and len(ds) == 2
    assert ds.labels(1).image is None and np.array_equal(ds.labels(1).type_map, tiles[2].type_map)
    np.testing.assert_array_equal(ds[1].image, tiles[2].image)

    with pytest.raises(StoreError, match="no finished items"):
        open_synthetic_store(write_store(tmp_path / "e.zarr", tiles, done=[False] * 3))
    with pytest.raises(StoreError, match=r"missing array\(s\) \['type_maps'\]"):
        open_synthetic_store(write_store(tmp_path / "m.zarr", tiles, drop="type_maps"))
    with pytest.raises(StoreError, match="no such store"):
        open_synthetic_store(tmp_path / "missing.zarr")
    with pytest.raises(StoreError, match=r"wrong array types \(inst_maps float32\)"):
        open_synthetic_store(write_store(tmp_path / "f.zarr", tiles, dtypes={"inst_maps": "float32"}))
    with pytest.raises(SchemeError, match="synthetic store uses classes"):
        open_synthetic_store(tmp_path / "s.zarr", "consep")


# -- command line -----------------------------------------------------------------------------


def test_cli_train_predict_evaluate_compare(tmp_path, phantoms, capsys):
    from napari_diffmix.datasets import write_generic

    write_generic(phantoms, tmp_path / "train")
    write_generic(make_phantom_dataset(2, 96, seed=12), tmp_path / "test")
    write_store(tmp_path / "syn.zarr", list(make_phantom_dataset(3, 64, seed=13, class_probs=[0.8, 0.1, 0.1])), scheme=phantoms.scheme)
    fast = ["--preset", "tiny", "--batch-size", "2", "--crop-size", "64", "--lr", "3e-3", "--device", "cpu", "--threads", "1"]

    assert main(["train-seg", "--data", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn.zarr"),
                 "--out", str(tmp_path / "model"), "--steps", "6", *fast]) == 0
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["training"]["num_tiles"] == 6 and cfg["training"]["step"] == 6

    # the store alone (its recorded scheme) is a valid training pool too
    assert main(["train-seg", "--synthetic", str(tmp_path / "syn.zarr"), "--out", str(tmp_path / "model_syn"), "--steps", "2", *fast]) == 0
    assert json.loads((tmp_path / "model_syn" / "config.json").read_text())["training"]["num_tiles"] == 3

    assert main(["predict", str(tmp_path / "model"), str(tmp_path / "test"), "--out", str(tmp_path / "pred"), "--window", "64", "--overlap", "16"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred" / "inst_maps").iterdir()) == ["phantom-0000.npy", "phantom-0001.npy"]
    # a plain folder of images (no labels)
    assert main(["predict", str(tmp_path / "model"), str(tmp_path / "test" / "images"), "--out", str(tmp_path / "pred_img")]) == 0
    assert len(open_tiles(tmp_path / "pred_img")) == 2

    capsys.readouterr()
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "test"), "--out", str(out_json), "--out", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "F1 other" in printed and "PQ" in printed and "AJI+" in printed
    assert json.loads(out_json.read_text())["summary"]["n_images"] == 2
    assert out_csv.read_text().splitlines()[-1].startswith("ALL,")

    # perfect predictions: evaluating the ground truth against itself
    assert main(["evaluate", str(tmp_path / "test"), str(tmp_path / "test"), "--out", str(out_json)]) == 0
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["pq"] == pytest.approx(1.0) and summary["f_d"] == 1.0

    assert main(["compare", "--data", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn.zarr"),
                 "--test", str(tmp_path / "test"), "--out", str(tmp_path / "cmp"), "--steps", "4", "--synthetic-share", "0.5",
                 "--window", "64", "--overlap", "16", *fast]) == 0
    printed = capsys.readouterr().out
    assert "f1_other" in printed and "+synthetic" in printed
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    row = cmp["metrics"]["f1_other"]
    if row["baseline"] is not None and row["augmented"] is not None:
        assert row["diff"] == pytest.approx(row["augmented"] - row["baseline"])
    for name in ("baseline", "augmented", "pred_baseline", "pred_augmented"):
        assert (tmp_path / "cmp" / name).is_dir()
    # The synthetic store was really trained on: drawn at about its pixel share, other weights.
    shares = cmp["synthetic_share"]
    assert shares["baseline"] == {"requested": 0.0, "realised": 0.0}
    assert shares["augmented"]["requested"] == 0.5 and shares["augmented"]["realised"] > 0
    assert f"baseline 0.0%, augmented {shares['augmented']['realised']:.1%} (asked 50.0%)" in printed
    base, _ = load_seg_model(tmp_path / "cmp" / "baseline")
    aug, _ = load_seg_model(tmp_path / "cmp" / "augmented")
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), aug.state_dict().values()))
    # The same comparison as a self-contained page: per-class F1 side by side, the rare class first.
    report = tmp_path / "cmp" / "report.html"
    assert f"wrote {tmp_path / 'cmp' / 'compare.json'} and {report}" in printed
    page = report.read_text()
    assert page.count('<img id="f1-per-class"') == 1 and "src=\"http" not in page and "<script" not in page
    rows = re.findall(r"<tr><td>([^<]+)</td>", page)
    assert rows[:3] == ["F1 other (rare)", "F1 epithelial", "F1 stromal"] and rows[-1] == "pq"
    for key, cells in zip(rows, re.findall(r"<tr><td>[^<]+</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", page)):
        name = key.removeprefix("F1 ").removesuffix(" (rare)")
        row = cmp["metrics"]["f1_" + name if key.startswith("F1 ") else key]
        assert cells == tuple("n/a" if v is None else f"{v:{'+' if k == 'diff' else ''}.3f}" for k, v in row.items()), key
    if chromium() is not None:
        check_page(report, tmp_path)

    # clear errors, exit code 2, no traceback
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "nowhere")]) == 2
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "test"), "--out", str(tmp_path / "r.txt")]) == 2
    assert main(["predict", str(tmp_path / "test"), str(tmp_path / "test"), "--out", str(tmp_path / "p2")]) == 2
    assert main(["compare", "--data", str(tmp_path / "train"), "--synthetic", str(tmp_path / "none.zarr"),
                 "--test", str(tmp_path / "test"), "--out", str(tmp_path / "c2")]) == 2
    assert main(["train-seg", "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "must end in .json or .csv" in err and "needs config.json" in err and "does not exist" in err
    assert "nothing to train on" in err


def test_train_seg_draws_the_synthetic_share(tmp_path, phantoms, capsys):
    """Patches equal to the crop size are drawn at the share asked for (default: their pixels)."""
    import csv
    import math

    from napari_diffmix.datasets import write_generic

    write_generic(phantoms, tmp_path / "train")  # 3 tiles of 128 px
    write_store(tmp_path / "syn.zarr", list(make_phantom_dataset(4, 64, seed=13)), scheme=phantoms.scheme)
    fast = ["--preset", "tiny", "--width", "8", "--batch-size", "6", "--crop-size", "64", "--device", "cpu", "--threads", "1",
            "--steps", "30", "--checkpoint-every", "10"]
    draws = 30 * 6
    pixel_share = 4 * 64**2 / (4 * 64**2 + 3 * 128**2)
    for share, out in ((None, "pixels"), (0.8, "most")):
        extra = [] if share is None else ["--synthetic-share", str(share)]
        assert main(["train-seg", "--data", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn.zarr"), *extra,
                     *fast, "--out", str(tmp_path / out)]) == 0
        share = pixel_share if share is None else share
        with open(tmp_path / out / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        realised = float(rows[-1]["synthetic_share"])
        assert abs(realised - share) <= 4 * math.sqrt(share * (1 - share) / draws), (share, realised)
        assert f"crops drawn: synthetic {realised:.1%} of the crops (asked {share:.1%})" in capsys.readouterr().out
    assert main(["train-seg", "--data", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn.zarr"),
                 "--synthetic-share", "0.8", *fast[:-4], "--steps", "20", "--checkpoint-every", "10", "--out", str(tmp_path / "part")]) == 0
    assert main(["train-seg", "--out", str(tmp_path / "part"), "--resume", "--steps", "30", "--threads", "1"]) == 0
    # resuming continues the count: the last row is the uninterrupted run's
    last = {}
    for d in ("most", "part"):
        with open(tmp_path / d / "log.csv", newline="") as fh:
            last[d] = list(csv.DictReader(fh))[-1]
            last[d].pop("elapsed_s")
    assert last["part"] == last["most"] and last["most"]["step"] == "30"
    assert main(["train-seg", "--data", str(tmp_path / "train"), "--synthetic-share", "0.5", *fast, "--out", str(tmp_path / "x")]) == 2
    assert "50% of the crops were asked to come from synthetic data, but the training pool has none" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, phantoms):
    """DDP with gloo: two ranks train in step and rank 0 writes the model."""
    import os
    import sys

    from _subprocess import run_group

    from napari_diffmix.datasets import write_generic

    write_generic(phantoms, tmp_path / "train")
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "napari_diffmix", "train-seg", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "m"),
           "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--crop-size", "64", "--device", "cpu"]
    proc = run_group(cmd, timeout=120, env=env, capture_output=True, text=True)
    # A rank's own error comes before torchrun's summary of it: keep both (a SIGABRT of rank 1
    # was seen once under the full suite's load with only the summary left to read).
    assert proc.returncode == 0, proc.stderr[:4000] + "\n...\n" + proc.stderr[-2000:]
    assert proc.stdout.count("model saved to") == 1  # rank 0 only
    model, info = load_seg_model(tmp_path / "m")
    assert info.training["world_size"] == 2 and info.training["step"] == 4
