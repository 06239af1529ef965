"""The docks as a pathologist on a laptop meets them (Xvfb, a 1366 x 768 window): all three fit
together, open as tabs, show plain words first and explain every control."""

import pytest

pytestmark = pytest.mark.gui

# Words for the technical options: they belong under "Advanced", not on the first screen.
JARGON = ("SDEdit", "dpm++", "ddim", "Precision", "preset", "stride", "bank", "Tile size", "cfg", "Guidance")


@pytest.fixture
def docks(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QApplication

    from napari_diffmix._widgets.batch import BatchExportWidget
    from napari_diffmix._widgets.editor import NucleiEditorWidget
    from napari_diffmix._widgets.generate import GenerateWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    widgets = {}
    for cls, name in ((NucleiEditorWidget, "Nuclei editor"), (GenerateWidget, "Generate tissue"), (BatchExportWidget, "Batch export")):
        widgets[name] = cls(viewer)
        viewer.window.add_dock_widget(widgets[name], name=name)
        QApplication.processEvents()
    return viewer, widgets


def _dock(widget):
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parentWidget()
    while not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def _first_screen_texts(widget):
    from qtpy.QtWidgets import QAbstractButton, QGroupBox, QLabel

    texts = []
    for child in widget.findChildren((QLabel, QAbstractButton, QGroupBox)):
        if child.isVisibleTo(widget):
            texts.append(child.title() if isinstance(child, QGroupBox) else child.text())
    return texts


def test_all_docks_fit_a_laptop_screen_as_tabs(docks):
    viewer, widgets = docks
    window = viewer.window._qt_window
    for name, widget in widgets.items():
        assert _dock(widget).minimumSizeHint().height() <= 200, name  # scrolls instead of growing
        assert widget.minimumSizeHint().width() <= 480, name
        body = widget.scroll_area.widget()
        assert body.width() >= body.minimumSizeHint().width(), f"{name}: its right edge is clipped"
    assert window.minimumSizeHint().height() <= 768
    assert window.height() <= 768
    main = _dock(widgets["Nuclei editor"]).parentWidget()
    tabbed = set(main.tabifiedDockWidgets(_dock(widgets["Nuclei editor"])))
    assert {_dock(widgets["Generate tissue"]), _dock(widgets["Batch export"])} <= tabbed


@pytest.mark.parametrize("name", ["Nuclei editor", "Generate tissue", "Batch export"])
def test_first_screen_speaks_plain_words(docks, name):
    _, widgets = docks
    widget = widgets[name]
    assert not widget.advanced.expanded  # technical options start folded away
    shown = " ".join(_first_screen_texts(widget))
    assert not [w for w in JARGON if w.lower() in shown.lower()], shown
    widget.advanced.header.click()
    assert widget.advanced.expanded and "Seed" in _first_screen_texts(widget)


def test_every_batch_control_has_a_tooltip(docks):
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit

    _, widgets = docks
    widget = widgets["Batch export"]
    missing = [
        f"{type(c).__name__} {getattr(c, 'text', lambda: '')()!r}"
        for c in widget.findChildren((QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit))
        if not c.toolTip() and not isinstance(c.parentWidget(), (QAbstractSpinBox, QComboBox))
    ]
    assert not missing, missing
