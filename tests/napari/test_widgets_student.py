"""A distilled student in the plugin: the picker names it, Generate renders with its own settings."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui

CROP = (slice(200, 264), slice(160, 224))


@pytest.fixture
def student(tiny_model, tmp_path):
    """The tiny model saved as a 4-step student (what diffmix distill writes, without the training)."""
    from napari_diffmix.classes import DEMO
    from napari_diffmix.model.checkpoint import load_model, save_model

    model, info = load_model(tiny_model)
    path = tmp_path / "student.safetensors"
    save_model(model, path, scheme=DEMO, default_guidance=1.0, distilled={
        "sampler": "ddim-logsnr", "steps": 4, "guidance": 2.0, "teacher_sha256": info.sha256, "teacher": "tiny.safetensors",
        "crop_size": 64, "crop_cycle": [16, 64]})
    return path


def test_generate_uses_the_students_sampler_and_steps(make_napari_viewer, qtbot, student, tiny_model):
    from napari_diffmix._layers import nuclei_layer_data
    from napari_diffmix._widgets import _model_picker
    from napari_diffmix._widgets._workers import NOTHREADS_ENV
    from napari_diffmix._widgets.generate import GenerateWidget
    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import load_demo_tile
    from napari_diffmix.nuclei import remap_ids

    tile = load_demo_tile()
    inst_map, inst_types = remap_ids(tile.inst_map[CROP], tile.inst_types)
    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = nuclei_layer_data(inst_map, inst_types, DEMO, "crop nuclei")
    viewer.add_labels(data, **kwargs)
    widget = GenerateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.ready, timeout=60_000)
    items = [widget.picker.combo.itemText(i) for i in range(widget.picker.combo.count())]
    assert _model_picker.FAST in items and _model_picker.BUNDLED in items
    widget.set_model(student)
    widget.picker.device_combo.setCurrentText("CPU")
    assert "4-step distilled model" in widget.picker.info_label.text()
    assert "learned on 16 and 64 px patches" in widget.picker.info_label.text()  # its own crops, not its teacher's
    assert "folded in" in widget.picker.info_label.toolTip()
    assert (widget.sampler_combo.currentText(), widget.steps.value(), widget.guidance.value()) == ("ddim-logsnr", 4, 1.0)
    # The student's settings are shown but fixed: no Quality choice can ask for steps it refuses.
    assert widget.quality.currentText() == "set by the model"
    assert not any(c.isEnabled() for c in (widget.quality, widget.steps, widget.sampler_combo, widget.guidance))
    import os

    os.environ[NOTHREADS_ENV] = "1"
    try:
        widget.generate_button.click()
        qtbot.waitUntil(lambda: any(layer.name.startswith("render") for layer in viewer.layers), timeout=60_000)
    finally:
        del os.environ[NOTHREADS_ENV]
    render = [layer for layer in viewer.layers if layer.name.startswith("render")][-1]
    assert render.data.shape == (64, 64, 3) and np.ptp(render.data) > 0
    # Back to a plain model: the fast settings again.
    widget.set_model(tiny_model)
    assert "distilled" not in widget.picker.info_label.text()
    assert widget.quality.isEnabled() and widget.steps.isEnabled() and widget.quality.currentText() == "standard"
    assert widget.quality.findText("set by the model") < 0
    assert (widget.sampler_combo.currentText(), widget.steps.value()) == ("dpm++2m", 15)


def test_batch_export_takes_the_students_settings(make_napari_viewer, student, tiny_model):
    from napari_diffmix._widgets.batch import BatchExportWidget

    widget = BatchExportWidget(make_napari_viewer())
    widget.picker.set_model(student)
    assert (widget.sampler_combo.currentText(), widget.steps.value()) == ("ddim-logsnr", 4)
    widget.picker.set_model(tiny_model)
    assert (widget.sampler_combo.currentText(), widget.steps.value()) == ("dpm++2m", 15)
