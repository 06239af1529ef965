"""The bundled demo segmentation model (``--seg-model demo``) and ``diffmix demo --compare``, the
miniature DiffMix experiment, run at a tiny size: a random tiny diffusion model, two 64 px
patches, 3 training steps per run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _browser import check_page, chromium
from napari_diffmix.classes import DEMO
from napari_diffmix.cli import main
from napari_diffmix.demo_experiment import ARMS, COMPARE_JSON, COMPARE_REPORT, held_out_evaluation
from napari_diffmix.errors import CheckpointError
from napari_diffmix.fidelity import load_scorer, read_records, select_items
from napari_diffmix.metrics import mean_sd
from napari_diffmix.seg.checkpoint import BUNDLED_SEG_MODEL_DIR, load_seg_model, resolve_seg_model
from napari_diffmix.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO_FAST = ["--patches", "2", "--patch-size", "64", "--stride", "64", "--steps", "2", "--batch-size", "2", "--threads", "1",
             "--device", "cpu"]
COMPARE_FAST = ["--compare", "--compare-steps", "3", "--compare-batch-size", "2", "--synthetic-share", "0.5"]


def test_bundled_demo_seg_model_loads_by_name_and_measures_what_its_card_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called demo here
    model, info = load_seg_model("demo")
    assert info.path == BUNDLED_SEG_MODEL_DIR and info.scheme.names == DEMO.names and info.config.width == 16
    weights = BUNDLED_SEG_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    quality = json.loads((BUNDLED_SEG_MODEL_DIR / "quality.json").read_text())
    measured = held_out_evaluation(model).summary()
    for key in ("pq", "dice", "f_d", "f1_other", "f1_epithelial", "f1_stromal"):
        recorded = quality["held_out"][key]
        assert (recorded is None and math.isnan(measured[key])) or measured[key] == pytest.approx(recorded, abs=1e-6), key
    card = (BUNDLED_SEG_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert f"| {quality['held_out']['pq']:.3f} |" in card and quality["sha256"] in card
    scorer = load_scorer("demo")  # the scorer names the resolved folder and hashes its weights
    assert scorer.info.path == BUNDLED_SEG_MODEL_DIR and scorer.model_sha256 == quality["sha256"]
    # A folder called demo here (e.g. 'diffmix demo --out demo') does not hide the bundled model;
    # a segmentation model folder called demo does.
    (tmp_path / "demo").mkdir()
    assert resolve_seg_model("demo") == BUNDLED_SEG_MODEL_DIR
    shutil.copytree(BUNDLED_SEG_MODEL_DIR, tmp_path / "demo", dirs_exist_ok=True)
    assert resolve_seg_model("demo") == Path("demo") and load_seg_model("demo")[1].path == Path("demo")


def test_missing_bundled_seg_model_says_how_to_make_it(tmp_path, monkeypatch):
    import napari_diffmix.seg.checkpoint as checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "BUNDLED_SEG_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"not installed .* scripts/train_demo_seg.py --ship"):
        load_seg_model("demo")


def test_demo_compare_trains_every_arm_per_seed_from_real_runs(tmp_path, tiny_model, capsys):
    out = tmp_path / "demo"
    store = out / "demo.zarr"
    args = ["demo", "--model", str(tiny_model), "--out", str(out), *DEMO_FAST, *COMPARE_FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "experiment" / COMPARE_JSON).read_text())
    settings = result["settings"]
    # The filtered pool: by default the items at or above the median PQ (the better half).
    pq = [r["pq"] for r in read_records(open_store(store).group)]
    assert settings["min_fidelity_rule"] == "median PQ of the items" and settings["min_fidelity"] == pytest.approx(np.median(pq))
    kept = select_items(open_store(store), settings["min_fidelity"])
    assert settings["items"] == {ARMS[0]: 0, ARMS[1]: 2, ARMS[2]: kept.kept} and kept.kept >= 1
    trained = list(ARMS)
    assert list(result["runs"]) == trained and not result["skipped"]

    weights: dict[tuple[str, int], list[torch.Tensor]] = {}
    for arm in trained:
        records = result["runs"][arm]
        assert [r["seed"] for r in records] == [0, 1, 2]
        for r in records:
            model, info = load_seg_model(r["model"])  # a real model folder, trained for the steps asked
            assert info.training["step"] == 3 and info.training["arm"] == arm and info.training["train"]["seed"] == r["seed"]
            weights[arm, r["seed"]] = list(model.state_dict().values())
            if r["seed"] == 0:  # its held-out figures are what the model gives again
                again = held_out_evaluation(model).summary()
                for key in ("pq", "f1_other", "f_d"):
                    assert (r["metrics"][key] is None and math.isnan(again[key])) or again[key] == pytest.approx(r["metrics"][key]), key
            share = r["synthetic_share"]
            assert (share["realised"] > 0) == (arm != ARMS[0])  # the synthetic arms really drew synthetic crops
        # mean and sd over the seeds are those of the per-seed values
        for key in ("f1_other", "pq"):
            mean, sd, n = mean_sd([r["metrics"][key] for r in records])
            got = result["summary"][arm][key]
            assert got["n"] == n and (n == 0 or got["mean"] == pytest.approx(mean))
            assert (got["sd"] is None) == (n < 2) and (n < 2 or got["sd"] == pytest.approx(sd))
    for arm in trained:  # the seeds gave different networks
        assert any(not torch.equal(a, b) for a, b in zip(weights[arm, 0], weights[arm, 1]))
    assert any(not torch.equal(a, b) for a, b in zip(weights[ARMS[0], 0], weights[ARMS[1], 0]))  # and so did the pools

    for arm in ARMS:
        assert arm in printed
    assert "mean ± sd over seeds 0, 1, 2" in printed and "Measured on" in printed and "load average" in printed
    page = (out / "experiment" / COMPARE_REPORT).read_text()
    assert page.count('<img id="f1-per-class"') == 1 and "F1 other (rare)" in page and "± " in page
    if chromium() is not None:
        check_page(out / "experiment" / COMPARE_REPORT, tmp_path)

    # The same command again measures the finished runs and trains nothing.
    def saved():
        return {p.parent.name: p.stat().st_mtime_ns for p in (out / "experiment" / "runs").rglob("model.safetensors")}

    before = saved()
    assert len(before) == 9 and main(args) == 0 and saved() == before
    assert json.loads((out / "experiment" / COMPARE_JSON).read_text())["summary"] == result["summary"]
    # Another threshold retrains the filtered arm only, and only if it selects other items.
    assert main([*args, "--min-fidelity", "0"]) == 0
    again = json.loads((out / "experiment" / COMPARE_JSON).read_text())
    assert again["settings"]["items"][ARMS[2]] == 2 and again["settings"]["min_fidelity_rule"] == "given"
    after = saved()
    for name, mtime in before.items():
        assert (after[name] != mtime) == (name.startswith("synthetic-filtered") and kept.kept < 2), name


def test_compare_options_need_compare(tmp_path, tiny_model, capsys):
    assert main(["demo", "--model", str(tiny_model), "--out", str(tmp_path / "d"), *DEMO_FAST, "--seeds", "1", "2"]) == 2
    assert "--seeds is an option of --compare" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_mean_sd_of_repeated_runs():
    mean, sd, n = mean_sd([0.5, None, float("nan")])  # undefined values are skipped; one value has no sd
    assert (mean, n) == (0.5, 1) and math.isnan(sd)
    mean, sd, n = mean_sd([0.0, 0.5, 1.0])
    assert (mean, n) == (0.5, 3) and sd == pytest.approx(np.std([0.0, 0.5, 1.0], ddof=1))
    assert mean_sd([])[2] == 0
