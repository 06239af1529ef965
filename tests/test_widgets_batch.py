"""The batch export widget in a real napari window (Xvfb): plan, run, cancel, resume, open."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def batch(make_napari_viewer, tiny_model, tmp_path):
    from napari_diffmix._widgets.batch import BatchExportWidget

    viewer = make_napari_viewer(show=True)
    widget = BatchExportWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.picker.set_model(tiny_model)
    widget.picker.device_combo.setCurrentText("CPU")
    widget.dataset_edit.setText("demo")
    widget.patches.setValue(4)
    widget.patch_size.setValue(32)
    widget.stride.setValue(64)
    widget.steps.setValue(4)
    widget.batch.setValue(1)
    widget.out_edit.setText(str(tmp_path / "demo-synthetic.zarr"))
    return viewer, widget


def test_plan_only_writes_nothing(batch, tmp_path, qtbot):
    viewer, widget = batch
    widget.start(dry_run=True, block=True)
    assert "plan of 4 patch(es) checked" in widget.status.text()
    assert "other" in widget.plan_label.text()  # the plan's class table
    assert not (tmp_path / "demo-synthetic.zarr").exists()


def test_official_checkpoint_with_a_preset(batch, tmp_path, tiny_model):
    import torch

    from napari_diffmix.model.checkpoint import load_model

    viewer, widget = batch
    official = tmp_path / "ema_0.9999_000100.pt"
    torch.save(load_model(tiny_model)[0].state_dict(), official)
    widget.picker.set_model(official, preset="tiny")
    widget.start(dry_run=True, block=True)
    assert "plan of 4 patch(es) checked" in widget.status.text() and "guidance 1.5" in widget.status.text()


def test_cancel_then_resume_completes_and_opens_the_store(batch, tmp_path, qtbot):
    from napari_diffmix.export import open_store

    viewer, widget = batch
    events = []
    worker = widget.start()
    worker.yielded.connect(lambda item: events.append(item[1].kind) if item[0] == "event" else None)
    qtbot.waitUntil(lambda: "batch" in events, timeout=120_000)
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    assert widget.status.text().startswith("cancelled") and widget.result is None
    store = tmp_path / "demo-synthetic.zarr"
    done_before = int(open_store(store).done_mask().sum())
    assert 1 <= done_before < 4
    assert "items/s" in widget.progress.format()

    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    result = widget.result
    assert result.complete and result.done == 4 and result.rendered == 4 - done_before
    names = [layer.name for layer in viewer.layers]
    assert names[:3] == ["demo-synthetic images", "demo-synthetic classes", "demo-synthetic nuclei"]
    assert "demo-synthetic originals images" in names  # the demo lives in memory: its patches are included
    images = viewer.layers["demo-synthetic images"].data
    assert images.shape == (4, 32, 32, 3) and np.asarray(images[3]).std() > 0


def test_export_errors_notify(batch, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_diffmix._widgets._workers import NOTHREADS_ENV

    viewer, widget = batch
    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    monkeypatch.setenv(NOTHREADS_ENV, "1")
    widget.out_edit.setText("")
    widget.start_button.click()
    assert "choose an output store" in shown[-1]
    widget.out_edit.setText("x.zarr")
    widget.scheme_combo.setCurrentText("consep")
    widget.start_button.click()
    assert "demo dataset uses the 'demo' scheme" in shown[-1]
    widget.scheme_combo.setCurrentText("the dataset's")
    widget.dataset_edit.setText("/nonexistent/folder")
    widget.start_button.click()
    assert "does not exist" in shown[-1]
    assert not widget._running and widget.start_button.isEnabled()
