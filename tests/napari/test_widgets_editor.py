"""The nuclei editor in a real napari window (Xvfb): painting, verbs, undo, shortcuts, maps, errors."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _centroid(layer, nid):
    return np.argwhere(np.asarray(layer.data) == nid).mean(axis=0)


def _process():
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()


def _canvas_point(viewer, y, x):
    """Where data pixel (y, x) of a 2-D view is on the canvas widget."""
    from qtpy.QtCore import QPoint

    canvas = viewer.window._qt_viewer.canvas
    px = (canvas.view.transform * canvas.view.scene.transform).map([x, y])[:2]
    return QPoint(int(round(px[0])), int(round(px[1])))


def _drag(qtbot, viewer, points):
    """A left-button mouse drag on the canvas through data points [(y, x), ...]."""
    from qtpy.QtCore import Qt

    native = viewer.window._qt_viewer.canvas.native
    first, *rest = [_canvas_point(viewer, y, x) for y, x in points]
    qtbot.mousePress(native, Qt.MouseButton.LeftButton, pos=first)
    for point in rest:
        qtbot.mouseMove(native, point)
    qtbot.mouseRelease(native, Qt.MouseButton.LeftButton, pos=rest[-1] if rest else first)
    _process()


@pytest.fixture
def errors(monkeypatch):
    """Messages shown as napari error notifications."""
    import napari.utils.notifications as notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda message: shown.append(str(message)))
    return shown


def test_paint_stroke_makes_a_new_nucleus_of_the_active_class(editor, qtbot):
    from napari_diffmix.classes import DEMO

    viewer, widget = editor
    c = widget.canvas
    layer = c.layer
    from qtpy.QtCore import Qt

    left = Qt.MouseButton.LeftButton
    qtbot.mouseClick(widget.palette_buttons[1], left)
    assert c.active_class == 1
    qtbot.mouseClick(widget.tool_buttons["paint"], left)
    assert layer.mode == "paint" and widget.tool_buttons["paint"].isChecked()
    first = layer.selected_label
    assert first == 10  # a fresh id: the map holds 1..9
    with layer.block_history():  # one brush stroke, as a mouse drag makes it
        layer.paint((35, 35), layer.selected_label)
    rows = layer.features.set_index("index")
    assert rows.loc[first, "class"] == 1 and rows.loc[first, "class_name"] == "other"
    assert c.classes.data[35, 35] == 1  # the class view follows the stroke
    assert np.array_equal(c.classes.data, c.type_map)
    # The next stroke is a new nucleus again, of whatever class is active then.
    assert layer.selected_label == first + 1
    qtbot.mouseClick(widget.palette_buttons[3], left)
    layer.paint((65, 65), layer.selected_label)  # a lone call: recorded once napari has written it
    qtbot.waitUntil(lambda: first + 1 in set(layer.features["index"]))
    rows = layer.features.set_index("index")
    assert rows.loc[first + 1, "class"] == 3
    assert widget.palette_buttons[1].text() == "other (rare): 2"
    assert c.counts().tolist() == [0, 2, 4, 5]
    # The class view is coloured by the scheme.
    colors = c.classes.colormap.color_dict
    for k in DEMO.class_ids:
        expected = np.array([int(DEMO.colors[k - 1][i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert np.allclose(colors[k][:3], expected, atol=1e-3)
    # Undo removes the stroke and its feature row.
    assert c.undo()
    assert first + 1 not in set(layer.features["index"]) and not np.any(layer.data == first + 1)
    # A real mouse stroke on the canvas: one new nucleus of the active class.
    viewer.reset_view()
    _process()
    stroke = layer.selected_label
    _drag(qtbot, viewer, [(60, 35), (62, 37), (64, 39)])
    rows = layer.features.set_index("index")
    assert rows.loc[stroke, "class"] == 3 and c.history[-1] == "brush stroke"
    assert layer.data[62, 37] == stroke and c.classes.data[62, 37] == 3
    assert layer.selected_label == stroke + 1


def test_erasing_a_nucleus_drops_its_row(editor):
    viewer, widget = editor
    c = widget.canvas
    layer = c.layer
    layer.mode = "erase"
    layer.brush_size = 15
    with layer.block_history():
        layer.paint((50, 50), 0)
    assert 5 not in set(layer.features["index"])
    assert c.inst_types[5] == 0 and c.counts()[1] == 0
    c.undo()
    assert 5 in set(layer.features["index"]) and c.counts()[1] == 1


def test_verbs_round_trip_and_undo(editor, disk_map):
    viewer, widget = editor
    c = widget.canvas
    layer = c.layer
    original_map, original_types = disk_map
    c.select(5)
    area = int(np.count_nonzero(layer.data == 5))
    c.move(3, -2)
    assert np.allclose(_centroid(layer, 5), (53, 48))
    c.rotate(90)
    ys, xs = np.nonzero(layer.data == 5)
    assert abs(ys.size - area) <= 2 and np.ptp(ys) > np.ptp(xs)  # the ellipse now stands upright
    c.rotate(-30)
    c.flip(1)
    new = c.duplicate((30, 65))
    assert new == 10 and c.selected == 10 and c.inst_types[10] == 1
    assert np.allclose(_centroid(layer, 10), (30, 65), atol=0.6)
    c.retype(3)
    assert c.inst_types[10] == 3 and c.classes.data[30, 65] == 3
    c.select(2)
    c.delete()
    assert not np.any(layer.data == 2) and 2 not in set(layer.features["index"]) and c.selected == 0
    widget.bank_combo.setCurrentText("this map")
    widget._load_bank("this map")
    c.set_active_class(1)
    inserted = c.insert((65, 35))
    assert c.inst_types[inserted] == 1 and layer.data[65, 35] == inserted
    # The inserted shape is a real nucleus of the bank: the only class-1 nucleus (#5 as it is now).
    assert int(np.count_nonzero(layer.data == inserted)) == int(np.count_nonzero(layer.data == 5))
    assert len(c.history) == 8
    while c.undo():
        pass
    assert np.array_equal(layer.data, original_map)
    assert np.array_equal(c.inst_types[: original_types.size], original_types)
    assert np.array_equal(c.classes.data, original_types[original_map])
    c.redo()
    assert np.allclose(_centroid(layer, 5), (53, 48))


def test_shortcuts_drag_and_ctrl_z_on_the_canvas(editor, qtbot):
    from qtpy.QtCore import Qt

    viewer, widget = editor
    c = widget.canvas
    layer = c.layer
    qtbot.mouseClick(widget.tool_buttons["pick"], Qt.MouseButton.LeftButton)
    assert layer.mode == "pick"
    c.select(5)
    canvas = viewer.window._qt_viewer.canvas
    native = canvas.native
    start = _centroid(layer, 5)
    qtbot.keyClick(native, Qt.Key.Key_Up)
    qtbot.keyClick(native, Qt.Key.Key_Right, Qt.KeyboardModifier.ShiftModifier)
    assert np.allclose(_centroid(layer, 5), start + (-1, widget.move_step.value()))
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert np.allclose(_centroid(layer, 5), start)
    qtbot.keyClick(native, Qt.Key.Key_Delete)
    assert not np.any(layer.data == 5)
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert np.any(layer.data == 5)
    # Tooltips name the shortcuts.
    assert "(Delete)" in widget.verb_buttons["delete"].toolTip()
    assert "Ctrl+Z" in widget.undo_button.toolTip()

    # Drag nucleus 1 with the select tool: press on it, move, release.
    viewer.reset_view()
    _process()
    zoom = viewer.scene.camera.zoom
    before = _centroid(layer, 1)
    _drag(qtbot, viewer, [(20, 20), (26, 23), (32, 26)])
    moved = _centroid(layer, 1) - before
    assert np.allclose(moved, (12, 6), atol=1.5 / min(zoom, 1) + 0.5), moved
    assert c.selected == 1 and c.history[-1].startswith("move #1")


def test_balance_raises_rare_share_and_enlarge_shifts(make_napari_viewer):
    from napari_diffmix._widgets.editor import NucleiEditorWidget

    viewer = make_napari_viewer(show=True)
    widget = NucleiEditorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    c = widget.open_demo()
    counts = c.counts()
    original = np.array(c.layer.data)
    share = counts[1] / counts.sum()
    assert "demo set" in widget.bank_label.text()
    widget.map_seed.setValue(3)
    widget.balance_button.click()
    after = c.counts()
    assert after[1] / after.sum() > share + 0.05
    assert np.array_equal(c.classes.data, c.type_map)
    assert "balance" in c.history[-1]
    widget.enlarge_button.click()
    assert "enlarge" in c.history[-1] and not np.array_equal(np.asarray(c.layer.data), original)
    c.undo()
    c.undo()
    assert np.array_equal(np.asarray(c.layer.data), original)
    assert c.counts().tolist() == counts.tolist()


def test_features_table_edits_drive_the_class_view_and_undo(editor):
    viewer, widget = editor
    c = widget.canvas
    layer = c.layer
    features = layer.features.copy()
    features.loc[features["index"] == 3, "class"] = 1
    layer.features = features
    assert c.inst_types[3] == 1 and c.classes.data[20, 80] == 1
    assert c.history[-1] == "edit classes"
    c.undo()
    assert c.inst_types[3] == 3 and c.classes.data[20, 80] == 3


def test_user_errors_become_notifications(editor, errors, make_napari_viewer):
    from napari_diffmix._widgets._canvas import NucleiCanvas
    from napari_diffmix.classes import CONSEP
    from napari_diffmix.errors import LabelError, SchemeError

    viewer, widget = editor
    widget.verb_buttons["delete"].setEnabled(True)
    widget.verb_buttons["delete"].click()  # nothing selected
    assert errors and "select a nucleus first" in errors[-1]
    widget.canvas.select(5)
    widget.canvas.retype(2)  # no class-1 nucleus left in the map ...
    widget.bank_combo.setCurrentText("this map")
    widget._load_bank("this map")  # ... so a bank of this map has none either
    widget.canvas.set_active_class(1)
    widget.insert_button.click()
    assert "has no 'other' nucleus" in errors[-1]
    # A layer of another scheme, and a 3-D stack, are refused with a reason.
    with pytest.raises(SchemeError, match="uses classes"):
        NucleiCanvas(viewer, widget.canvas.layer, CONSEP)
    stack = viewer.add_labels(np.zeros((2, 8, 8), np.int32), name="stack")
    with pytest.raises(LabelError, match="3-D"):
        NucleiCanvas(viewer, stack, CONSEP)
    # Balancing a map with unclassed nuclei names them.
    viewer.add_labels(np.pad(np.ones((4, 4), np.int32), 40), name="plain")
    widget.scheme_combo.setCurrentText("demo")
    widget.layer_combo.setCurrentText("plain")
    widget._adopt_current()
    assert widget.canvas.layer.name == "plain" and "1 nuclei without class" in widget.palette_box.title()
    widget.balance_button.click()
    assert "class 0" in errors[-1]


def test_plugin_opens_from_the_manifest_with_the_demo_sample(make_napari_viewer, tmp_path):
    import napari

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-diffmix", "demo")
    _, generate = viewer.window.add_plugin_dock_widget("napari-diffmix", "Generate tissue")
    _, batch = viewer.window.add_plugin_dock_widget("napari-diffmix", "Batch export")
    assert generate.labels_combo.currentText() == "demo nuclei" and batch.dataset_edit.text() == "demo"
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffmix", "Nuclei editor")
    assert widget.canvas is not None and widget.canvas.layer.name == "demo nuclei"
    names = [layer.name for layer in viewer.layers]
    assert names == ["demo IHC", "demo nuclei classes", "demo nuclei"]
    assert widget.canvas.counts().sum() == len(widget.canvas.layer.features)
    # File > Save with the plugin's writer, and open it again with its reader.
    (path,) = napari.save_layers(str(tmp_path / "edited.npz"), [widget.canvas.layer], plugin="napari-diffmix")
    (reopened,) = viewer.open(path, plugin="napari-diffmix")
    assert np.array_equal(reopened.data, widget.canvas.layer.data)
    assert reopened.features["class"].tolist() == widget.canvas.layer.features["class"].tolist()
    viewer.open_sample("napari-diffmix", "blank")
    assert viewer.layers[-1].data.shape == (256, 256)


def test_dataset_bank_feeds_insert_and_balancing(editor, tmp_path):
    from napari_diffmix.classes import DEMO
    from napari_diffmix.datasets import write_generic
    from napari_diffmix.phantom import make_phantom_dataset

    viewer, widget = editor
    folder = write_generic(make_phantom_dataset(2, 128, class_probs=(0.5, 0.25, 0.25), seed=4), tmp_path / "phantoms", scheme=DEMO)
    widget.load_dataset_bank(str(folder), block=True)
    assert widget.bank_label.text().startswith("phantoms: ")
    c = widget.canvas
    others = int(np.count_nonzero(c.bank.classes == 1))
    assert others > 5 and f"other {others}" in widget.bank_label.text()
    new = c.insert((85, 65), cls=1)
    assert c.inst_types[new] == 1
    # A large epithelial nucleus in the centre: the only nucleus 30 px from this small map's border,
    # so the only balancing target. This map has no rare donor that far inside; the dataset has.
    from napari_diffmix.nuclei import paste_mask

    yy, xx = np.mgrid[-12:13, -12:13]
    big, types = paste_mask(c.inst_map, c.inst_types, yy**2 + xx**2 <= 144, (48, 48), 2)
    c.apply(big, types, "big centre nucleus")
    before = c.counts()
    widget.target_fraction.setValue(1.0)
    widget.balance_button.click()
    after = c.counts()
    assert c.history[-1] == "balance (1 of 1 targets replaced)"
    assert after[1] == before[1] + 1 and after[2] == before[2] - 1
