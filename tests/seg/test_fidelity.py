"""Label fidelity (issue 19): per-item scores written into the store, resume, synthesize --seg-model,
export --min-fidelity and train-seg --synthetic-min-fidelity. A tiny segmentation model trained for a
few steps and a 4-item 32 px store keep every test to seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from _browser import check_page, chromium
from _phantom import phantom_and_tiny_model
from napari_diffmix.cli import main
from napari_diffmix.errors import StoreError
from napari_diffmix.fidelity import FIDELITY, load_scorer, read_records, score_store, select_items, write_record
from napari_diffmix.phantom import make_phantom_dataset
from napari_diffmix.seg.data import open_synthetic_store
from napari_diffmix.seg.model import SegConfig
from napari_diffmix.seg.train import SegTrainConfig, train_segmentation
from napari_diffmix.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITEMS = 4
FAST = ["--patch-size", "32", "--stride", "32", "--patches", str(ITEMS), "--steps", "2", "--strength", "0.5",
        "--batch-size", "2", "--threads", "1", "--device", "cpu"]
SEG = ["--seg-window", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    model = root / "tiny.safetensors"
    ds, data = phantom_and_tiny_model(root / "data", model)
    seg = root / "seg"
    cfg = SegTrainConfig(steps=6, seed=1, batch_size=2, crop_size=32, lr=3e-3, device="cpu", num_threads=1, log_every=3)
    train_segmentation(ds, model_config=SegConfig.preset("tiny", 3), config=cfg, out_dir=seg)
    store = root / "store.zarr"
    assert main(["synthesize", str(data), "--model", str(model), "--out", str(store), *FAST]) == 0
    return {"root": root, "data": data, "model": model, "seg": seg, "store": store, "dataset": ds}


def _copy(setup, tmp_path, name="s.zarr") -> Path:
    out = tmp_path / name
    shutil.copytree(setup["store"], out)
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(g[k][:]) for k in ("images", "inst_maps", "type_maps", "done", "provenance")}


def test_perfect_and_missing_predictions_give_the_expected_record(setup):
    scorer = load_scorer(setup["seg"], window=32, overlap=8)
    from napari_diffmix.nuclei import inst_types_from_maps, remap_ids, type_map_from

    tile = max(setup["dataset"], key=lambda t: np.count_nonzero(inst_types_from_maps(t.inst_map, t.type_map) == 1))
    inst, it = remap_ids(tile.inst_map, inst_types_from_maps(tile.inst_map, tile.type_map))
    types = type_map_from(inst, it)
    image = tile.image
    perfect = scorer.record(image, inst, types, inst, types, {"retyped_nuclei": 2})
    assert perfect["pq"] == pytest.approx(1.0) and perfect["dice"] == pytest.approx(1.0) and perfect["f_d"] == 1.0
    n_rare = int(np.count_nonzero(it[1:] == 1))
    assert n_rare > 0 and perfect["rare"] == {"classes": [1], "n": n_rare, "found": n_rare, "correct": n_rare, "retyped_in_plan": 2}
    assert perfect["rare_recall"] == 1.0 and set(perfect["f1"]) == {"other", "epithelial", "stromal"}
    # one rare nucleus predicted as another class, one left out: recall drops, PQ too
    rare_ids = np.flatnonzero(it == 1)
    pred_types = types.copy()
    pred_types[inst == rare_ids[0]] = 2
    pred_inst = inst.copy()
    if rare_ids.size > 1:
        pred_inst[inst == rare_ids[1]] = 0
        pred_types[inst == rare_ids[1]] = 0
    rec = scorer.record(image, inst, types, pred_inst, pred_types)
    lost = min(rare_ids.size, 2)
    assert rec["rare"]["correct"] == n_rare - lost and rec["rare_recall"] == pytest.approx((n_rare - lost) / n_rare)
    assert rec["f1"]["other"] < 1.0
    # an item with no nuclei anywhere: PQ undefined (null), recall undefined
    empty = np.zeros((32, 32), np.int32)
    rec = scorer.record(image[:32, :32], empty, empty.astype(np.uint8), empty, empty.astype(np.uint8))
    assert rec["pq"] is None and rec["rare_recall"] is None and rec["n_true"] == 0


def test_score_writes_every_item_never_touches_images_and_resumes(setup, tmp_path, capsys):
    store = _copy(setup, tmp_path)
    before = _arrays(store)
    assert main(["score", str(store), "--seg-model", str(setup["seg"]), *SEG]) == 0
    out = capsys.readouterr().out
    assert f"scored {ITEMS} item(s)" in out and "0 already scored" in out
    after = _arrays(store)
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    g = zarr.open_group(str(store), mode="r")
    records = read_records(g)
    assert all(r is not None for r in records)
    for i, r in enumerate(records):
        for k in ("dice", "pq", "dq", "sq", "aji", "f_d", "type_accuracy", "rare_recall", "f1", "rare", "n_true", "n_pred", "model", "image"):
            assert k in r, (i, k)
        assert r["pq"] is None or 0.0 <= r["pq"] <= 1.0
        prov = json.loads(str(g["provenance"][i]))
        assert r["rare"]["retyped_in_plan"] == prov["retyped_nuclei"]
        assert r["rare"]["n"] == prov["nuclei"]["other"]  # basis: the rare nuclei of the label map
    attrs = g.attrs["fidelity"]
    assert attrs["model"]["sha256"].startswith(records[0]["model"]) and attrs["summary"]["items_scored"] == ITEMS
    assert attrs["min_fidelity"] == 0.5 and "label map" in attrs["rare_basis"]
    # the training files carry the threshold and what it keeps
    kept = select_items(open_store(store), 0.5).kept
    md = (store / "training" / "TRAINING.md").read_text()
    sh = (store / "training" / "train.sh").read_text()
    assert "## Label fidelity" in md and f"{kept} of {ITEMS} items kept" in md
    assert "--synthetic-min-fidelity 0.5" in sh and "--min-fidelity 0.5" in sh and f"{kept} of {ITEMS} items kept" in sh

    # resume: nothing left to do; a missing record is scored again, and only it
    assert main(["score", str(store), "--seg-model", str(setup["seg"]), *SEG]) == 0
    assert "scored 0 item(s)" in capsys.readouterr().out
    gw = zarr.open_group(str(store), mode="r+")
    gw[FIDELITY][2] = ""
    res = score_store(store, load_scorer(setup["seg"], window=32, overlap=8))
    assert (res.scored_now, res.skipped) == (1, ITEMS - 1)
    assert read_records(gw)[2] == records[2]  # deterministic: the same score again
    # an item rendered again (other pixels) is scored again, even though its record names this model
    img = np.asarray(gw["images"][1])
    gw["images"][1] = 255 - img
    res = score_store(store, load_scorer(setup["seg"], window=32, overlap=8))
    assert (res.scored_now, res.skipped) == (1, ITEMS - 1)


def test_a_stopped_score_continues_where_it_stopped(setup, tmp_path):
    store = _copy(setup, tmp_path)
    scorer = load_scorer(setup["seg"], window=32, overlap=8)
    calls = iter(range(100))
    res = score_store(store, scorer, should_stop=lambda: next(calls) >= 1)  # stop after the first item
    assert res.stopped and res.scored_now == 1
    assert sum(r is not None for r in read_records(zarr.open_group(str(store), mode="r"))) == 1
    res = score_store(store, scorer)
    assert not res.stopped and (res.scored_now, res.skipped) == (ITEMS - 1, 1)


def test_synthesize_with_seg_model_scores_as_it_goes(setup, tmp_path, capsys):
    out = tmp_path / "scored.zarr"
    argv = ["synthesize", str(setup["data"]), "--model", str(setup["model"]), "--out", str(out), *FAST,
            "--seg-model", str(setup["seg"]), "--seg-window", "32", "--min-fidelity", "0.25"]
    assert main(argv) == 0
    capsys.readouterr()
    g = zarr.open_group(str(out), mode="r")
    records = read_records(g)
    assert all(r is not None for r in records) and g.attrs["fidelity"]["min_fidelity"] == 0.25
    # the same pixels as the unscored store (scoring changes nothing else), and the same scores as 'score'
    ref = _arrays(setup["store"])
    for k in ("images", "inst_maps", "type_maps"):
        assert np.array_equal(ref[k], np.asarray(g[k][:])), k
    again = _copy(setup, tmp_path, "again.zarr")
    score_store(again, load_scorer(setup["seg"], window=32, overlap=8))
    assert read_records(zarr.open_group(str(again), mode="r")) == records
    assert "--synthetic-min-fidelity 0.25" in (out / "training" / "train.sh").read_text()
    # re-running the same command resumes: every item done and scored, nothing rendered
    assert main(argv) == 0
    assert "rendered 0 item(s)" in capsys.readouterr().out


def _set_pq(store: Path, values) -> None:
    """Give the scored items known PQs (the tiny model's real ones are all near 0)."""
    g = zarr.open_group(str(store), mode="r+")
    for i, (r, v) in enumerate(zip(read_records(g), values)):
        write_record(g, i, {**r, "pq": v})


@pytest.fixture
def scored(setup, tmp_path):
    store = _copy(setup, tmp_path)
    score_store(store, load_scorer(setup["seg"], window=32, overlap=8))
    _set_pq(store, [0.1, 0.9, None, 0.3])  # None: no nuclei anywhere, which agrees: kept
    return store


def test_export_leaves_out_exactly_the_low_items(scored, tmp_path, capsys):
    out = tmp_path / "hv"
    assert main(["export", str(scored), "--format", "hovernet", "--originals", "skip", "--min-fidelity", "0.5", "--out", str(out)]) == 0
    assert "keeps 2 of 4 synthetic items (2 left out)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").glob("*.npy")) == ["synthetic_000001.npy", "synthetic_000002.npy"]
    from napari_diffmix.outputs import MARKER

    marker = json.loads((out / MARKER).read_text())
    assert marker["min_fidelity"] == 0.5 and marker["synthetic_kept"] == 2 and marker["synthetic_finished"] == ITEMS
    pn = tmp_path / "pn"
    assert main(["export", str(scored), "--format", "pannuke", "--originals", "skip", "--min-fidelity", "0.2", "--out", str(pn)]) == 0
    rows = [json.loads(line)["index"] for line in (pn / "provenance.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3] and np.load(pn / "images.npy").shape[0] == 3
    # without the flag every item goes
    assert main(["export", str(scored), "--format", "pannuke", "--originals", "skip", "--out", str(tmp_path / "all")]) == 0
    assert np.load(tmp_path / "all" / "images.npy").shape[0] == ITEMS


def test_filtering_an_unscored_store_is_refused(setup, tmp_path, capsys):
    store = _copy(setup, tmp_path)
    assert main(["export", str(store), "--format", "pannuke", "--min-fidelity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "is not scored; run 'diffmix score" in capsys.readouterr().err and not (tmp_path / "x").exists()
    score_store(store, load_scorer(setup["seg"], window=32, overlap=8))
    zarr.open_group(str(store), mode="r+")[FIDELITY][3] = ""
    with pytest.raises(StoreError, match=r"has 1 finished item\(s\) without a score \(3\)"):
        select_items(open_store(store), 0.5)


def test_train_seg_uses_only_the_kept_items(scored, setup, tmp_path, capsys):
    items = open_synthetic_store(scored, min_fidelity=0.5)
    assert items.indices.tolist() == [1, 2] and items.names == ["synthetic_000001", "synthetic_000002"]
    assert items.selection.kept == 2 and open_synthetic_store(scored).indices.tolist() == [0, 1, 2, 3]
    out = tmp_path / "seg2"
    assert main(["train-seg", "--synthetic", str(scored), "--synthetic-min-fidelity", "0.5", "--preset", "tiny",
                 "--steps", "1", "--batch-size", "1", "--crop-size", "32", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    assert "keeps 2 of 4 synthetic items" in capsys.readouterr().out
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["synthetic_fidelity"] == {"metric": "pq", "threshold": 0.5, "kept": 2, "scored": 4, "finished": 4}
    _set_pq(scored, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(StoreError, match="no synthetic item reaches the minimum fidelity 0.95"):
        open_synthetic_store(scored, min_fidelity=0.95)
    assert main(["train-seg", "--data", str(setup["data"]), "--synthetic-min-fidelity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--synthetic-min-fidelity needs --synthetic" in capsys.readouterr().err


def test_a_model_of_other_classes_is_refused(setup, tmp_path):
    from dataclasses import replace

    other = tmp_path / "seg-xyz"
    ds = make_phantom_dataset(1, 64, seed=2)
    ds.scheme = replace(ds.scheme, names=("x", "y", "z"))
    cfg = SegTrainConfig(steps=1, batch_size=1, crop_size=32, device="cpu", num_threads=1)
    train_segmentation(ds, model_config=SegConfig.preset("tiny", 3), config=cfg, out_dir=other)
    with pytest.raises(StoreError, match=r"the store's classes \['other', 'epithelial', 'stromal'\] differ"):
        score_store(_copy(setup, tmp_path), load_scorer(other))


# -- item 3: the HTML report ---------------------------------------------------------------------
def _images(page: str) -> list[tuple[str, bytes]]:
    import base64
    import re

    return [(m.group(1), base64.b64decode(m.group(2)))
            for m in re.finditer(r'<img [^>]*?(?:id|class)="([^"]+)"[^>]*?src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_self_contained_with_every_figure(scored, setup, tmp_path, capsys):
    from io import BytesIO

    from PIL import Image

    out = tmp_path / "report.html"
    assert main(["report", str(scored), "--out", str(out), "--items", "2"]) == 0
    assert "self-contained" in capsys.readouterr().out
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section in ("Class counts", "Label fidelity", "Montage", "Worst", "Best", "Settings", "Diffusion model", "Scoring model"):
        assert f">{section}</h" in page, section
    imgs = _images(page)
    kinds = [k for k, _ in imgs]
    assert kinds.count("class-counts") == 1 and kinds.count("fidelity-histogram") == 1 and kinds.count("montage-item") == 4
    for kind, data in imgs:
        im = Image.open(BytesIO(data))
        im.load()  # a whole, decodable PNG
        assert im.format == "PNG" and im.width > 0
        if kind == "montage-item":  # label map | render | predicted nuclei, each upscaled to >= 160 px
            assert im.height >= 160 and im.width >= 3 * im.height
    assert "src=\"http" not in page and "<script" not in page and "<link" not in page  # nothing fetched
    # item order: worst first (PQ 0.1 is item 0), best first (item 1, PQ 0.9; item 2's undefined PQ counts as agreement)
    worst, best = page.index(">Worst</h3>"), page.index(">Best</h3>")
    assert "item 0: PQ 0.100" in page[worst:best] and "item 1: PQ 0.900" in page[best:]
    assert "<td>pq</td><td>0.433</td>" in page  # the means of the records as they are now (0.1, 0.9, 0.3)
    assert main(["report", str(scored), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_report_of_an_unscored_store_shows_the_maps_and_says_why(setup, tmp_path):
    from napari_diffmix.report import build_report

    page = build_report(setup["store"], tmp_path / "r.html", items=2).read_text()
    assert "The store is not scored" in page and "no segmentation model" in page
    kinds = [k for k, _ in _images(page)]
    assert kinds == ["class-counts", "montage-item", "montage-item"]


@pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_report_loads_in_headless_chromium_with_every_image(scored, tmp_path):
    """A real browser: no console error, every <img> decoded (naturalWidth > 0)."""
    from napari_diffmix.report import build_report

    check_page(build_report(scored, tmp_path / "report.html", items=2), tmp_path)


def test_ctrl_c_stops_diffmix_score_after_the_current_item_and_the_same_command_continues(setup, tmp_path):
    """A real SIGINT to the command; scoring is slowed in the child so the signal lands mid-run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from _subprocess import process_group

    store = _copy(setup, tmp_path)
    slow = ("import sys, time; from napari_diffmix import fidelity; real = fidelity.Scorer.score\n"
            "def score(self, *a, **k):\n    time.sleep(0.5); return real(self, *a, **k)\n"
            "fidelity.Scorer.score = score\nfrom napari_diffmix.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", slow, "score", str(store), "--seg-model", str(setup["seg"]), *SEG, "--threads", "1"]
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    with process_group(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        chunks = store / FIDELITY / "c"
        deadline = time.monotonic() + 120
        while not (chunks.is_dir() and any(chunks.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "stopped by SIGINT; run the same command again to continue" in output
    first = sum(r is not None for r in read_records(zarr.open_group(str(store), mode="r")))
    assert 1 <= first < ITEMS
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"scored {ITEMS - first} item(s)" in res.stdout and f"{first} already scored" in res.stdout
    assert all(r is not None for r in read_records(zarr.open_group(str(store), mode="r")))


def test_the_cli_parser_stays_light_and_names_the_default_threshold():
    import subprocess
    import sys

    from napari_diffmix.fidelity import DEFAULT_MIN_FIDELITY

    code = ("import sys; from napari_diffmix.cli import build_parser; build_parser(); "
            "print('numpy' in sys.modules, 'napari_diffmix.fidelity' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
    from napari_diffmix.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd in ("score", "synthesize"):
        opt = next(a for a in sub.choices[cmd]._actions if a.dest == "min_fidelity")
        assert opt.default is None and f"(default {DEFAULT_MIN_FIDELITY:g})" in opt.help, cmd
