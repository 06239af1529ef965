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
    assert "other" in widget.plan_view.toPlainText() and widget.plan_view.isVisible()  # the plan's class table
    assert not (tmp_path / "demo-synthetic.zarr").exists()


def test_plan_says_when_patches_come_out_unchanged(batch):
    viewer, widget = batch
    widget.maps_combo.setCurrentText("add rare nuclei")
    widget.patch_size.setValue(16)  # too small to hold a replaced nucleus: most patches stay as they were
    widget.start(dry_run=True, block=True)
    unchanged, checked = widget.unchanged
    assert checked == 4 and unchanged >= 1
    assert f"{unchanged} of 4 checked come out unchanged" in widget.status.text()
    assert widget.plan_view.toPlainText().startswith(f"warning: {unchanged} of 4 patches checked come out unchanged")


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
    from napari_diffmix.store import open_store

    viewer, widget = batch
    events = []
    worker = widget.start()
    worker.yielded.connect(lambda event: events.append(event.kind))
    qtbot.waitUntil(lambda: "item" in events, timeout=120_000)
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    assert widget.status.text().startswith("cancelled") and widget.result is None
    store = tmp_path / "demo-synthetic.zarr"
    done_before = int(open_store(store).done_mask().sum())
    assert 1 <= done_before < 4
    assert widget.progress.format() == "cancelled"  # no ETA of a job that is gone

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

    # Start again on the finished store: nothing to render, and its layers are not added twice.
    count = len(viewer.layers)
    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: not widget._running)
    assert "already complete" in widget.status.text() and len(viewer.layers) == count


def test_changed_settings_name_the_widgets_own_checkbox(batch, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_diffmix._widgets._workers import NOTHREADS_ENV

    viewer, widget = batch
    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    monkeypatch.setenv(NOTHREADS_ENV, "1")
    widget.steps.setValue(2)
    widget.patches.setValue(1)
    widget.start_button.click()
    widget.seed.setValue(5)  # another plan for the same store
    widget.start_button.click()
    assert "tick 'replace a store made with other settings'" in shown[-1] and "--" not in shown[-1]
    widget.overwrite.setChecked(True)
    widget.start_button.click()
    assert widget.result is not None and widget.result.complete


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
