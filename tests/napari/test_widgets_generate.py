"""The Generate widget in a real napari window (Xvfb) with a tiny random-weight model."""

import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

CROP = (slice(200, 264), slice(160, 224))  # a 64 x 64 window of the demo tile


@pytest.fixture
def generate(make_napari_viewer, tiny_model, qtbot):
    """(viewer, widget) with a 64 px crop of the demo tile (image + nuclei) and the tiny model chosen."""
    from napari_diffmix._layers import image_layer_data, nuclei_layer_data
    from napari_diffmix._widgets.generate import GenerateWidget
    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import load_demo_tile
    from napari_diffmix.nuclei import remap_ids

    tile = load_demo_tile()
    inst_map, inst_types = remap_ids(tile.inst_map[CROP], tile.inst_types)
    type_map = inst_types[inst_map].astype(np.uint8)
    viewer = make_napari_viewer(show=True)
    image, kwargs, _ = image_layer_data(tile.image[CROP].copy(), "crop H&E", inst_map=inst_map, type_map=type_map)
    viewer.add_image(image, **kwargs)
    data, kwargs, _ = nuclei_layer_data(inst_map, inst_types, DEMO, "crop nuclei")
    viewer.add_labels(data, **kwargs)
    widget = GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    # The sampler library loads in the background while the dock opens; Generate waits for it.
    assert widget.progress.format() == "loading the renderer…" or widget.ready
    qtbot.waitUntil(lambda: widget.ready, timeout=60_000)
    widget.set_model(tiny_model)
    widget.picker.device_combo.setCurrentText("CPU")
    widget.steps.setValue(6)
    assert widget.tile.value() == 0  # untiled by default, whatever the model's training size
    widget.tile.setValue(32)
    assert widget.labels_combo.currentText() == "crop nuclei"
    assert widget.guidance.value() == 2.0  # the model's stored default
    return viewer, widget


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    return shown


def _renders(viewer):
    return [layer for layer in viewer.layers if layer.name.startswith("render")]


def test_generate_streams_previews_keeps_ui_responsive_and_adds_a_layer(generate, qtbot):
    from qtpy.QtCore import QElapsedTimer, QTimer

    viewer, widget = generate
    widget.steps.setValue(20)
    widget.seed.setValue(7)
    # Measure the event loop while the worker renders: a 10 ms timer records its largest gap.
    clock, gaps = QElapsedTimer(), []
    ticker = QTimer()
    ticker.setInterval(10)

    def tick():
        gaps.append(clock.restart())

    ticker.timeout.connect(tick)
    worker = widget.generate()
    clock.start()
    ticker.start()
    assert widget.preview_layer is not None and widget.cancel_button.isEnabled()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    ticker.stop()
    qtbot.waitUntil(lambda: not widget._running)
    stall, total = max(gaps[1:]), sum(gaps)
    print(f"event-loop stall while generating: max {stall} ms over {len(gaps)} ticks, {total} ms in all")
    # The render ran beside the event loop, not on it: the loop kept ticking through the render
    # and no pause took a large part of it. Stall targets in milliseconds are benchmarks
    # (benchmarks/bench_gui.py), not tests: a loaded machine stretches any pause.
    assert len(gaps) >= 10 and stall < max(500, total / 3), f"the UI froze for {stall} of {total} ms"
    assert widget.previews_shown >= 2
    (result,) = _renders(viewer)
    assert result.name == "render 1"  # short: the settings are in its metadata and the status line
    assert result.metadata["diffmix"]["description"] == "seed 7, dpm++2m × 20 steps, guidance 2"
    assert "render 1 done" in widget.status.text() and "seed 7" in widget.status.text()
    # under the nuclei layer, so its outlines stay visible on the render
    assert viewer.layers.index(result) < viewer.layers.index("crop nuclei")
    assert result.data.shape == (64, 64, 3) and result.data.dtype == np.uint8
    provenance = result.metadata["diffmix"]["provenance"]
    assert provenance["seed"] == 7 and provenance["steps"] == 20 and provenance["device"] == "cpu"
    assert np.array_equal(result.metadata["diffmix"]["inst_map"], viewer.layers["crop nuclei"].data)
    assert all(layer.name != "rendering…" for layer in viewer.layers)  # the preview layer is gone
    assert widget.progress.value() == 20 and widget.progress.format().startswith("step 20/20")


def test_previews_repaint_one_layer_in_place(generate, demo_model_file, qtbot):
    """Each preview is written into the one preview layer (no new layer, no new data array, no
    extent recomputed) and the canvas the user looks at changes with it."""
    viewer, widget = generate
    widget.set_model(demo_model_file)  # trained: its estimates change from step to step (the random tiny one saturates)
    widget.steps.setValue(8)
    widget.tile.setValue(0)
    for layer in viewer.layers:  # only the preview on the canvas, so its pixels are what changes
        layer.visible = False
    n_layers = len(viewer.layers)
    seen = []
    worker = widget.generate()
    layer = widget.preview_layer
    data_events = []
    layer.events.data.connect(lambda event: data_events.append(event))
    extent_before = layer.extent

    def on_preview(item):  # connected after the widget's own slot: runs once the preview is written
        if getattr(item, "preview", None) is None or len(seen) >= 4:
            return
        shot = viewer.screenshot(canvas_only=True, flash=False)
        seen.append((widget.preview_layer, np.array(layer.data), shot, len(viewer.layers), len(data_events),
                     layer.extent == extent_before))

    worker.yielded.connect(on_preview)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    assert len(seen) >= 3, f"only {len(seen)} previews were shown"
    assert all(shown is layer for shown, *_ in seen)  # the same layer object throughout
    assert all(count == n_layers + 1 for _, _, _, count, _, _ in seen)  # the preview layer, no other
    # Written in place: napari never saw a new data array, nor recomputed the extent (the
    # result replaces the data once, at the end).
    assert all(events == 0 and same_extent for *_, events, same_extent in seen)
    for (_, before, shot_before, *_), (_, after, shot_after, *_) in zip(seen, seen[1:]):
        assert before.shape == after.shape == (64, 64, 3)
        assert np.abs(before.astype(int) - after).mean() > 1  # the preview changed step to step
        assert np.abs(shot_before.astype(int) - shot_after).mean() > 0.1  # and so did the canvas
    assert layer.name == "render 1"  # the preview layer became the result


def test_cancel_stops_within_a_step_and_adds_nothing(generate, qtbot):
    viewer, widget = generate
    widget.steps.setValue(400)
    n_layers = len(viewer.layers)
    steps = []
    worker = widget.generate()
    worker.yielded.connect(lambda item: steps.append(getattr(item, "step", 0)))
    qtbot.waitUntil(lambda: max(steps, default=0) >= 2, timeout=60_000)
    widget.cancel()
    cancelled_at = max(steps)
    t0 = time.perf_counter()
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    assert time.perf_counter() - t0 < 5
    assert max(steps) <= cancelled_at + 1
    assert len(viewer.layers) == n_layers and not _renders(viewer)
    assert widget.status.text() == "cancelled" and widget.generate_button.isEnabled()


def test_synchronous_mode_modes_and_caches(generate, monkeypatch):
    from napari_diffmix.runtime import resolve_precision
    from napari_diffmix._widgets._canvas import NucleiCanvas
    from napari_diffmix._widgets._workers import NOTHREADS_ENV, SyncWorker

    viewer, widget = generate
    monkeypatch.setenv(NOTHREADS_ENV, "1")
    assert isinstance(widget.generate(), SyncWorker)
    first = _renders(viewer)[-1]
    assert widget.previews_shown >= 2

    def current_runner():
        req = widget.request()
        loaded = widget.renderer.load(req.model_path, req.device, req.precision, req.preset)
        assert loaded.reused  # the widget's renders loaded it already
        return loaded.runner

    runner = current_runner()
    calls = []
    original = runner.model.spade_params
    monkeypatch.setattr(runner.model, "spade_params", lambda *a, **k: calls.append(1) or original(*a, **k))
    widget.seed.setValue(1)
    widget.generate()
    assert current_runner() is runner  # the model stayed loaded
    second = _renders(viewer)[-1].metadata["diffmix"]["provenance"]
    assert calls == [] and second["reused_model"] and second["reused_spade"]
    assert "SPADE features reused" in widget.status.text()
    assert second["precision"] == runner.precision == resolve_precision("auto", "cpu")
    # Another precision keeps the loaded model but not the SPADE cache, which is stored in the old one.
    widget.picker.precision_combo.setCurrentText("fp32")
    widget.generate()
    fp32_runner = current_runner()
    third = _renders(viewer)[-1].metadata["diffmix"]["provenance"]
    assert fp32_runner.model is runner.model and fp32_runner.precision == "fp32" == third["precision"]
    assert third["reused_model"] and (third["reused_spade"] is (runner.precision == "fp32"))
    widget.picker.precision_combo.setCurrentText("auto")
    # SDEdit from the first render.
    widget.set_mode("sdedit")
    widget.image_combo.setCurrentText(first.name)
    widget.strength.setValue(0.5)
    widget.generate()
    sdedit = _renders(viewer)[-1]
    assert sdedit.metadata["diffmix"]["description"].endswith(f"from {first.name} at strength 0.5")
    assert sdedit.metadata["diffmix"]["provenance"]["mode"] == "sdedit"
    # Move one nucleus, then re-render only that edit: the rest of the image is kept exactly.
    layer = viewer.layers["crop nuclei"]
    canvas = NucleiCanvas(viewer, layer)
    nid = int(layer.features["index"].iloc[len(layer.features) // 2])
    canvas.select(nid)
    canvas.move(0, 3)
    widget.set_mode("edited")
    assert widget.image_combo.currentText() == sdedit.name  # the latest render, not the first image
    widget.image_combo.setCurrentText(first.name)
    widget.generate()
    edited = _renders(viewer)[-1]
    assert edited.metadata["diffmix"]["description"].endswith(f"edit of {first.name}")
    changed = np.any(edited.data != first.data, axis=-1)
    from napari_diffmix._widgets.generate import EDIT_MARGIN
    from napari_diffmix.nuclei import changed_mask

    info = first.metadata["diffmix"]
    mask = changed_mask(info["inst_map"], info["type_map"], canvas.inst_map, canvas.type_map, EDIT_MARGIN)
    assert changed.any() and not changed[~mask].any()
    provenance = edited.metadata["diffmix"]["provenance"]
    assert provenance["edited_pixels"] == int(mask.sum())
    # The network ran on windows around the edit only, and they cover it.
    assert provenance["edit_windows"]
    covered = np.zeros(mask.shape, bool)
    for y, x, h, w in provenance["edit_windows"]:
        covered[y : y + h, x : x + w] = True
    assert covered[mask].all() and not covered.all()
    canvas.detach()


def test_official_guided_diffusion_checkpoint_with_a_preset(generate, monkeypatch, tiny_model, tmp_path):
    import torch

    from napari_diffmix._widgets._workers import NOTHREADS_ENV
    from napari_diffmix.model.checkpoint import load_model

    viewer, widget = generate
    monkeypatch.setenv(NOTHREADS_ENV, "1")
    model, _ = load_model(tiny_model)
    official = tmp_path / "ema_0.9999_000100.pt"
    torch.save(model.state_dict(), official)  # what guided-diffusion writes: a bare state dict
    widget.set_model(official, preset="tiny")
    assert widget.picker.preset_combo.isEnabled() and "official checkpoint" in widget.picker.info_label.text()
    widget.generate()
    provenance = _renders(viewer)[-1].metadata["diffmix"]["provenance"]
    assert provenance["model"] == str(official) and provenance["scheme"] == "demo"


def test_errors_reach_the_user_as_notifications(generate, errors, monkeypatch, tmp_path):
    import torch

    from napari_diffmix._widgets import _model_picker
    from napari_diffmix._layers import nuclei_layer_data
    from napari_diffmix._widgets._workers import NOTHREADS_ENV
    from napari_diffmix.classes import CONSEP
    from napari_diffmix.model import samplers

    viewer, widget = generate
    monkeypatch.setenv(NOTHREADS_ENV, "1")
    n_layers = len(viewer.layers)
    # No checkpoint.
    widget.set_model(tmp_path / "missing.safetensors")
    widget.generate_button.click()
    assert "no such model file" in errors[-1]
    from napari_diffmix.model import checkpoint

    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL_DIR", tmp_path / "no-bundled-model")
    widget.picker.combo.setCurrentText(_model_picker.BUNDLED)
    widget.generate_button.click()
    assert "bundled demo model is not installed" in errors[-1] and "Browse…" in errors[-1]
    widget.picker.combo.setCurrentIndex(widget.picker.combo.count() - 2)  # the tiny model
    # Scheme mismatch between the model and the labels.
    data, kwargs, _ = nuclei_layer_data(np.zeros((64, 64), np.int32), np.zeros(1, np.int32), CONSEP, "consep nuclei")
    viewer.add_labels(data, **kwargs)
    widget.labels_combo.setCurrentText("consep nuclei")
    widget.generate_button.click()
    assert "trained on classes ['other', 'epithelial', 'stromal']" in errors[-1] and "consep" in errors[-1]
    widget.labels_combo.setCurrentText("crop nuclei")
    # A label map too large for the memory left.
    with monkeypatch.context() as patch:
        patch.setattr(samplers, "free_bytes", lambda device: 100_000)
        widget.generate_button.click()
    assert "too large for memory" in errors[-1] and "only 0.1 MiB are free" in errors[-1]
    # CUDA asked for, none present.
    if not torch.cuda.is_available():
        widget.picker.device_combo.setCurrentText("CUDA")
        widget.generate_button.click()
        assert "CUDA" in errors[-1]
        widget.picker.device_combo.setCurrentText("CPU")
    # Masked edit without edits.
    widget.set_mode("edited")
    widget.image_combo.setCurrentText("crop H&E")
    widget.generate_button.click()
    assert "nothing to re-render" in errors[-1]
    assert len(viewer.layers) == n_layers + 1  # only the consep layer was added; no preview left behind
    assert not widget._running and widget.generate_button.isEnabled()


def test_render_only_the_visible_part_of_the_map(generate, qtbot):
    from qtpy.QtWidgets import QApplication

    viewer, widget = generate
    widget.tile.setValue(0)
    widget.steps.setValue(2)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    camera.center = (0, 16, 16)
    camera.zoom = camera.zoom * 6  # only the top-left corner of the 64 px map shows
    for _ in range(5):
        QApplication.processEvents()
    widget.region.setCurrentText("visible part")
    widget.generate(block=True)
    (result,) = _renders(viewer)
    h, w = result.data.shape[:2]
    assert (h, w) != (64, 64) and h % 32 == 0 and w % 32 == 0
    assert tuple(result.translate) == (0.0, 0.0)  # the window starts at the map's corner
    assert result.metadata["diffmix"]["inst_map"].shape == (h, w)
    assert "region at (0, 0)" in result.metadata["diffmix"]["description"]


@pytest.fixture
def checked_render(generate, disk_map, monkeypatch):
    """The generate fixture plus a 'render 1' of the disk map (nine nuclei) and a segmentation
    model whose prediction is known: #1-3 and #8-9 found with their class, #4 and #5 found with
    another class, #6 and #7 missed, and one nucleus nobody painted."""
    from types import SimpleNamespace

    from napari_diffmix import fidelity
    from napari_diffmix._layers import image_layer_data, nuclei_layer_data
    from napari_diffmix.classes import DEMO

    viewer, widget = generate
    inst_map, inst_types = disk_map
    type_map = inst_types[inst_map].astype(np.uint8)
    data, kwargs, _ = nuclei_layer_data(inst_map, inst_types, DEMO, "disks")
    viewer.add_labels(data, **kwargs)
    image = np.full((96, 96, 3), 200, np.uint8)
    data, kwargs, _ = image_layer_data(image, "render 1", inst_map=inst_map, type_map=type_map)
    viewer.add_image(data, **kwargs)
    widget.labels_combo.setCurrentText("disks")
    widget.image_combo.setCurrentText("render 1")
    pred_inst = np.where(np.isin(inst_map, [6, 7]), 0, inst_map)
    pred_inst[90:95, 90:95] = 20  # a nucleus nobody painted
    pred_types = inst_types.copy()
    pred_types[4], pred_types[5] = inst_types[4] % 3 + 1, inst_types[5] % 3 + 1
    pred_types = np.concatenate([pred_types, np.zeros(11, pred_types.dtype)])
    pred_types[20] = 2
    predicted = (pred_inst, pred_types[pred_inst].astype(np.uint8))
    calls = []

    def fake_predict(self, img):
        calls.append(img)
        return predicted

    fake = fidelity.Scorer(None, SimpleNamespace(scheme=DEMO, path=Path("known-answer-seg")), "0" * 64, (1,))
    monkeypatch.setattr(fidelity.Scorer, "predict", fake_predict)
    monkeypatch.setattr(fidelity, "load_scorer", lambda model: fake)
    return viewer, widget, inst_map, predicted, calls


def test_check_colours_each_painted_nucleus_by_what_was_found(checked_render, qtbot):
    from napari_diffmix import fidelity
    from napari_diffmix._widgets.generate import CHECK_COLOURS

    viewer, widget, inst_map, (pred_inst, _), calls = checked_render
    assert (fidelity.FOUND, fidelity.WRONG_CLASS, fidelity.MISSED) == tuple(CHECK_COLOURS)
    n_layers = len(viewer.layers)
    # The known answer comes back at once: the worker may finish before a waitSignal could
    # connect, so wait on the dock's own state, which only the finished slot resets.
    widget.check()
    qtbot.waitUntil(lambda: not widget._running, timeout=60_000)
    assert len(calls) == 1 and calls[0].shape == (96, 96, 3)  # the render's pixels were segmented
    assert len(viewer.layers) == n_layers + 2
    overlay, found = viewer.layers["render 1 · check"], viewer.layers["render 1 · nuclei found"]
    assert np.array_equal(found.data, pred_inst) and found.contour == 1
    expected = {1: "green", 2: "green", 3: "green", 4: "orange", 5: "orange", 6: "red", 7: "red", 8: "green", 9: "green"}
    by_word = {word: code for code, (_, word) in CHECK_COLOURS.items()}
    for nid, word in expected.items():
        codes = np.unique(overlay.data[inst_map == nid])
        assert codes.tolist() == [by_word[word]], (nid, codes)
        hex_colour = CHECK_COLOURS[by_word[word]][0]
        shown = overlay.colormap.map(np.array([by_word[word]]))[0]
        assert np.allclose(shown[:3], [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)], atol=1 / 255), nid
    assert not overlay.data[inst_map == 0].any()  # only painted nuclei are coloured
    assert overlay.colormap.map(np.array([0]))[0][3] == 0  # background transparent
    text = widget.status.text()
    assert "of 9 painted nuclei 5 found with their class (green), 2 with another class (orange), 2 missed (red)" in text
    assert "8 nuclei found in all" in text and "known-answer-seg" in text
    # Checking again replaces the overlay instead of stacking layers.
    widget.check()
    qtbot.waitUntil(lambda: not widget._running, timeout=60_000)
    assert len(calls) == 2 and len(viewer.layers) == n_layers + 2


def test_check_refuses_an_image_without_its_labels(generate, errors):
    viewer, widget = generate
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="photo", rgb=True)
    widget.image_combo.setCurrentText("photo")
    widget.check_button.click()
    assert errors and "does not record the label map" in errors[-1]
    assert not widget._running


def test_check_after_each_render_with_a_trained_segmentation_model(generate, qtbot, tmp_path):
    """End to end in the worker: a tiny segmentation model trained here checks a fresh render."""
    from napari_diffmix.demo_data import demo_split_dataset
    from napari_diffmix.seg.model import SegConfig
    from napari_diffmix.seg.train import SegTrainConfig, train_segmentation

    viewer, widget = generate
    cfg = SegTrainConfig(steps=4, seed=1, batch_size=2, crop_size=32, lr=3e-3, device="cpu", num_threads=1, log_every=2)
    train_segmentation(demo_split_dataset(), model_config=SegConfig.preset("tiny", 3), config=cfg, out_dir=tmp_path / "seg")
    widget.set_seg_model(tmp_path / "seg")
    widget.check_after.setChecked(True)
    widget.steps.setValue(3)
    worker = widget.generate()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: widget.last_check is not None and not widget._running, timeout=120_000)
    check = widget.last_check
    assert check.image_name == "render 1"
    painted = np.unique(viewer.layers["crop nuclei"].data)
    assert check.check.ids.tolist() == painted[painted > 0].tolist()
    overlay = viewer.layers["render 1 · check"]
    assert sum(check.check.counts().values()) == check.check.ids.size
    assert set(np.unique(overlay.data)) <= {0, 1, 2, 3}
    assert "render 1 checked with seg" in widget.status.text()
