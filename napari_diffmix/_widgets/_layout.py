"""Layout pieces every dock uses so that all of them fit a 1366 x 768 laptop screen together:
a scrolling body (the dock shrinks to a few rows and scrolls instead of pushing the window
taller than the screen) and collapsible sections that keep the technical options out of the
first screen."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QDockWidget, QFrame, QMainWindow, QScrollArea, QSizePolicy, QToolButton, QVBoxLayout, QWidget

# The least a dock asks for: its first rows stay visible, the rest scrolls.
MIN_BODY_HEIGHT = 160


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as narrow as its content allows (never clipping it sideways),
    as short as MIN_BODY_HEIGHT."""

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt)
        body = self.widget()
        width = (body.minimumSizeHint().width() if body is not None else 0) + self.verticalScrollBar().sizeHint().width()
        return QSize(width, MIN_BODY_HEIGHT)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt)
        # The body's minimum grows after it is built (a model summary, a plan): pass it on, or
        # the dock keeps its first width and clips the body's right edge.
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return False


def scroll_body(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a scrolling body and return the layout to fill."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _VerticalScroll(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = QWidget()
    area.setWidget(body)
    body.installEventFilter(area)
    outer.addWidget(area)
    widget.scroll_area = area  # type: ignore[attr-defined]  # tests and callers scroll to a section
    return QVBoxLayout(body)


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


class DockTab:
    """Mixin (before QWidget) for the plugin's dock widgets: when the dock first shows, it joins
    another visible napari-diffmix dock on the same side as a tab. Stacked, three docks each get a
    third of a laptop screen; as tabs each gets all of it (napari docks plugin widgets side by side)."""

    _tabs_joined = False

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt)
        super().showEvent(event)  # type: ignore[misc]
        if not self._tabs_joined:
            self._tabs_joined = True
            _join_sibling_tabs(self)  # type: ignore[arg-type]


def _join_sibling_tabs(widget: QWidget) -> None:
    dock = _dock_of(widget)
    main = dock.parentWidget() if dock is not None else None
    if not isinstance(main, QMainWindow):
        return
    for other in main.findChildren(QDockWidget):
        if other is dock or not other.isVisible() or main.dockWidgetArea(other) != main.dockWidgetArea(dock):
            continue
        inner = other.widget()
        if inner is not None and any(isinstance(w, DockTab) for w in (inner, *inner.findChildren(QWidget))):
            main.tabifyDockWidget(other, dock)
            dock.show()
            dock.raise_()
            return


class Collapsible(QWidget):
    """A titled section whose content shows only when its header is clicked (closed by default)."""

    def __init__(self, title: str, tooltip: str = "", parent: QWidget | None = None, *, expanded: bool = False):
        super().__init__(parent)
        self.header = QToolButton(self)
        self.header.setText(title)
        self.header.setToolTip(tooltip or f"Show or hide: {title.lower()}")
        self.header.setCheckable(True)
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; text-align: left; }")
        self.content = QWidget(self)
        self.body = QVBoxLayout(self.content)
        self.body.setContentsMargins(8, 0, 0, 0)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.header)
        layout.addWidget(self.content)
        self.header.toggled.connect(self.set_expanded)
        self.header.setChecked(expanded)
        self.set_expanded(expanded)

    def set_expanded(self, on: bool) -> None:
        self.header.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.content.setVisible(on)
        if self.header.isChecked() != on:
            self.header.setChecked(on)

    @property
    def expanded(self) -> bool:
        return self.content.isVisibleTo(self)
