"""Nuclei editor dock widget: paint nuclei by class, rearrange them, apply the DiffMix maps.

The widget only gathers choices; the :class:`~._canvas.NucleiCanvas` of the chosen layer
calls the pure functions of :mod:`napari_diffmix.nuclei` and :mod:`napari_diffmix.mixing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QKeySequence, QPixmap, QShortcut
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .. import nuclei
from ..classes import BUILTIN_SCHEMES, ClassScheme, load_scheme
from ..errors import DiffMixError, LabelError, SchemeError
from .._layers import nuclei_layer_data, role_of, scheme_of
from ._canvas import NucleiCanvas, shortcut
from ._layout import Collapsible, DockTab, scroll_body
from ._notify import notify_error, user_errors
from ._workers import run_in_thread

BANK_DEMO, BANK_MAP, BANK_DATASET, BANK_FILE = "demo set", "this map", "dataset folder…", "saved shapes (.npz)…"
BANK_BORDER = 1  # px: nuclei cut by the map edge are poor shapes to stamp elsewhere
SCHEME_FILE = "from file…"


def _swatch(color_hex: str) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(color_hex))
    return QIcon(pix)


def _button(text: str, tip: str, slot: Callable[[], Any]) -> QPushButton:
    b = QPushButton(text)
    b.setToolTip(tip)
    b.clicked.connect(lambda *_: user_errors(slot)())
    return b


class NucleiEditorWidget(DockTab, QWidget):
    """Paint, select, move, rotate, flip, duplicate, delete, retype and insert nuclei; balance/enlarge."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.canvas: NucleiCanvas | None = None
        self._banks: dict[tuple, Any] = {}
        self._donor_maps: dict[tuple, list] = {}  # bank source -> its label maps (balancing donors)
        self._bank_key: tuple | None = None
        self._bank_worker = None
        self._adopting = False
        self._build()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.moved.connect(self._on_layers_changed)
        self._on_layers_changed()

    # -- layout --------------------------------------------------------------------------------------
    def _build(self) -> None:
        root = scroll_body(self)

        source = QGroupBox("Label map")
        form = QFormLayout(source)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The nuclei (instance) Labels layer to edit")
        self.layer_combo.activated.connect(lambda *_: user_errors(self._adopt_current)())
        form.addRow("Nuclei layer", self.layer_combo)
        self.scheme_combo = QComboBox()
        self.scheme_combo.addItems([*BUILTIN_SCHEMES, SCHEME_FILE])
        self.scheme_combo.setCurrentText("demo")
        self.scheme_combo.setToolTip(
            "The nucleus classes of new canvases and of layers that carry none: CoNSeP, GLySAC, the demo's, or a file"
        )
        self.scheme_combo.activated.connect(lambda *_: user_errors(self._on_scheme_chosen)())
        self._custom_scheme: ClassScheme | None = None
        form.addRow("Classes", self.scheme_combo)
        row = QHBoxLayout()
        row.addWidget(_button("New canvas", "Add an empty nuclei layer to paint on (its size is under Advanced)", self.new_canvas))
        row.addWidget(_button("Demo tile", "Open the bundled demo tile and its nuclei", self.open_demo))
        form.addRow(row)
        root.addWidget(source)

        tools = QGroupBox("Tools")
        grid = QGridLayout(tools)
        self.tool_buttons: dict[str, QPushButton] = {}
        for i, (mode, text, tip) in enumerate((
            ("paint", "Paint", "Brush (P): every stroke paints a new nucleus of the active class"),
            ("pick", "Select / move", "Select (L): click a nucleus to select it, drag it to move it"),
            ("erase", "Erase", "Eraser (E)"),
            ("pan_zoom", "Pan", "Pan and zoom (Z)"),
        )):
            b = QPushButton(text)  # napari's theme shows a checked push button, not a tool button
            b.setToolTip(tip)
            b.setCheckable(True)
            b.clicked.connect(lambda *_, m=mode: user_errors(self.set_mode)(m))
            self.tool_buttons[mode] = b
            grid.addWidget(b, 0, i)
        self.undo_button = _button("Undo", f"Undo the last stroke or edit ({shortcut('undo')})", lambda: self._c().undo())
        self.redo_button = _button("Redo", f"Redo ({shortcut('redo')})", lambda: self._c().redo())
        grid.addWidget(self.undo_button, 1, 0, 1, 2)
        grid.addWidget(self.redo_button, 1, 2, 1, 2)
        root.addWidget(tools)

        self.palette_box = QGroupBox("Classes")
        self.palette_box.setToolTip(f"The active class: painting, insert and set-class use it ({shortcut('next_class')} cycles)")
        self.palette_layout = QGridLayout(self.palette_box)
        self.palette_group = QButtonGroup(self)
        self.palette_group.setExclusive(True)
        self.palette_buttons: dict[int, QPushButton] = {}
        root.addWidget(self.palette_box)

        edit = QGroupBox("Selected nucleus")
        grid = QGridLayout(edit)
        self.selection_label = QLabel()
        self.selection_label.setWordWrap(True)
        grid.addWidget(self.selection_label, 0, 0, 1, 4)
        self.verb_buttons: dict[str, QPushButton] = {}
        verbs = (
            ("rotate_ccw", "Rotate ⟲", "Rotate counter-clockwise by the step", lambda: self._c().rotate(self.rotate_step.value())),
            ("rotate_cw", "Rotate ⟳", "Rotate clockwise by the step", lambda: self._c().rotate(-self.rotate_step.value())),
            ("flip_lr", "Flip ↔", "Mirror left/right", lambda: self._c().flip(1)),
            ("flip_ud", "Flip ↕", "Mirror up/down", lambda: self._c().flip(0)),
            ("duplicate", "Duplicate", "Copy the nucleus beside it (the key puts it at the cursor)", lambda: self._c().duplicate()),
            ("delete", "Delete", "Remove the nucleus", lambda: self._c().delete()),
            ("retype", "Set class", "Give the nucleus the active class", lambda: self._c().retype()),
        )
        for i, (verb, text, tip, slot) in enumerate(verbs):
            b = _button(text, f"{tip} ({shortcut(verb)})", slot)
            self.verb_buttons[verb] = b
            grid.addWidget(b, 1 + i // 4, i % 4)
        root.addWidget(edit)

        insert = QGroupBox("Insert real nuclei")
        form = QFormLayout(insert)
        self.bank_combo = QComboBox()
        self.bank_combo.addItems([BANK_DEMO, BANK_MAP, BANK_DATASET, BANK_FILE])
        self.bank_combo.setToolTip("Where the shapes of inserted nuclei (and of added rare nuclei) come from")
        self.bank_combo.activated.connect(lambda *_: user_errors(self._on_bank_chosen)())
        form.addRow("Shapes from", self.bank_combo)
        self.bank_label = QLabel("no shapes loaded")
        self.bank_label.setWordWrap(True)
        form.addRow(self.bank_label)
        self.insert_button = _button(
            "Insert nucleus of the active class",
            f"Stamp a real nucleus of the active class at the cursor ({shortcut('insert')})",
            lambda: self._c().insert(self._c().cursor_point()),
        )
        form.addRow(self.insert_button)
        root.addWidget(insert)

        maps = QGroupBox("Rebalance the map")
        row = QHBoxLayout(maps)
        self.balance_button = _button(
            "Add rare nuclei",
            "Replace common-class nuclei by real rare-class nuclei that fit in their place (DiffMix's balancing map)",
            self.balance,
        )
        self.enlarge_button = _button("Shift nuclei", "Move inner nuclei a few pixels at random (DiffMix's enlarging map)", self.enlarge)
        row.addWidget(self.balance_button)
        row.addWidget(self.enlarge_button)
        root.addWidget(maps)

        advanced = Collapsible("Advanced", "Canvas size, edit steps and the settings of the DiffMix label maps")
        form = QFormLayout()
        advanced.body.addLayout(form)
        self.canvas_size = QSpinBox()
        self.canvas_size.setRange(16, 8192)
        self.canvas_size.setValue(256)
        self.canvas_size.setSuffix(" px")
        self.canvas_size.setToolTip("Side of a new blank canvas")
        form.addRow("New canvas size", self.canvas_size)
        self.rotate_step = QDoubleSpinBox()
        self.rotate_step.setRange(0.5, 180)
        self.rotate_step.setValue(15)
        self.rotate_step.setSuffix("°")
        self.rotate_step.setToolTip(f"Rotation step ({shortcut('rotate_ccw')} / {shortcut('rotate_cw')})")
        self.rotate_step.valueChanged.connect(self._sync_steps)
        form.addRow("Rotate step", self.rotate_step)
        self.move_step = QSpinBox()
        self.move_step.setRange(1, 200)
        self.move_step.setValue(10)
        self.move_step.setSuffix(" px")
        self.move_step.setToolTip("Move with the arrow keys: 1 px, or this far with Shift; or drag with the select tool")
        self.move_step.valueChanged.connect(self._sync_steps)
        form.addRow("Shift+arrow step", self.move_step)
        self.map_seed = QSpinBox()
        self.map_seed.setRange(0, 2**31 - 1)
        self.map_seed.setToolTip("Seed of the random draws of 'Add rare nuclei' and 'Shift nuclei' (same seed, same map)")
        row = QHBoxLayout()
        row.addWidget(self.map_seed)
        row.addWidget(_button("Random", "Roll a new seed", lambda: self.map_seed.setValue(int(np.random.default_rng().integers(2**31 - 1)))))
        form.addRow("Seed", row)
        self.target_fraction = QDoubleSpinBox()
        self.target_fraction.setRange(0.0, 1.0)
        self.target_fraction.setSingleStep(0.05)
        self.target_fraction.setValue(0.8)
        self.target_fraction.setToolTip("Share of the eligible common-class nuclei that 'Add rare nuclei' replaces (published: 0.8)")
        form.addRow("Rare nuclei: share replaced", self.target_fraction)
        row = QHBoxLayout()
        self.shift_max = QSpinBox()
        self.shift_max.setRange(0, 100)
        self.shift_max.setValue(15)
        self.shift_max.setSuffix(" px")
        self.shift_max.setToolTip("Shifts are drawn from -max..max-1 px per axis (published: 15)")
        self.shift_prob = QDoubleSpinBox()
        self.shift_prob.setRange(0.0, 1.0)
        self.shift_prob.setSingleStep(0.05)
        self.shift_prob.setValue(0.3)
        self.shift_prob.setToolTip("Chance that a nucleus shifts along each axis (published: 0.3)")
        row.addWidget(QLabel("up to"))
        row.addWidget(self.shift_max)
        row.addWidget(QLabel("chance"))
        row.addWidget(self.shift_prob)
        form.addRow("Shift nuclei", row)
        self.advanced = advanced
        root.addWidget(advanced)
        root.addStretch(1)
        for keys, slot in ((QKeySequence.StandardKey.Undo, lambda: self._c().undo()), (QKeySequence.StandardKey.Redo, lambda: self._c().redo())):
            sc = QShortcut(QKeySequence(keys), self)
            sc.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            sc.activated.connect(lambda s=slot: user_errors(s)())
        self._update_enabled()

    # -- layer choice --------------------------------------------------------------------------------
    def _candidates(self) -> list[Any]:
        from napari.layers import Labels

        return [
            layer for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer.ndim == 2 and role_of(layer) not in ("classes",)
        ]

    def _on_layers_changed(self, event: Any = None) -> None:
        candidates = self._candidates()
        current = self.canvas.layer if self.canvas else None
        if current is not None and all(layer.unique_id != current.unique_id for layer in self.viewer.layers):
            self.detach()
            current = None
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for layer in candidates:
            self.layer_combo.addItem(layer.name)
        if current is not None:
            self.layer_combo.setCurrentText(current.name)
        self.layer_combo.blockSignals(False)
        if current is None and not self._adopting:
            tagged = [layer for layer in candidates if role_of(layer) == "nuclei"]
            if tagged:
                try:
                    self.adopt(tagged[-1])
                except DiffMixError as exc:
                    notify_error(exc)

    def _adopt_current(self) -> None:
        name = self.layer_combo.currentText()
        if name and (self.canvas is None or self.canvas.layer.name != name):
            self.adopt(self.viewer.layers[name])

    def adopt(self, layer: Any) -> NucleiCanvas:
        """Edit ``layer`` (its scheme, or the chosen scheme when it carries none)."""
        if self.canvas is not None and self.canvas.layer.unique_id == layer.unique_id:
            return self.canvas
        scheme = scheme_of(layer) or self.scheme()
        self.detach()
        self._adopting = True  # the canvas adds its class view: no auto-adoption meanwhile
        try:
            self.canvas = canvas = NucleiCanvas(self.viewer, layer, scheme)
        finally:
            self._adopting = False
        canvas.rotate_step = self.rotate_step.value()
        canvas.move_step = self.move_step.value()
        canvas.events.changed.connect(self._refresh_palette)
        canvas.events.selection.connect(self._refresh_selection)
        canvas.events.active_class.connect(self._refresh_palette)
        layer.events.mode.connect(self._refresh_tools)
        self.layer_combo.blockSignals(True)
        self.layer_combo.setCurrentText(layer.name)
        self.layer_combo.blockSignals(False)
        if scheme_of(layer) is not None and scheme.name in BUILTIN_SCHEMES:
            self.scheme_combo.setCurrentText(scheme.name)
        self._build_palette()
        self._refresh_selection()
        self._refresh_tools()
        self._bank_key = None
        self._load_bank(self.bank_combo.currentText(), quiet=True)
        self._update_enabled()
        return canvas

    def detach(self) -> None:
        if self.canvas is None:
            return
        self.canvas.layer.events.mode.disconnect(self._refresh_tools)
        self.canvas.detach()
        self.canvas = None
        self._update_enabled()

    def _c(self) -> NucleiCanvas:
        if self.canvas is None:
            raise LabelError("no nuclei layer: open the demo tile, make a new canvas or choose a Labels layer")
        return self.canvas

    def scheme(self) -> ClassScheme:
        """The scheme chosen in the combo box."""
        choice = self.scheme_combo.currentText()
        if choice == SCHEME_FILE:
            if self._custom_scheme is None:
                raise SchemeError("choose a class scheme file first")
            return self._custom_scheme
        return load_scheme(choice)

    def _on_scheme_chosen(self) -> None:
        if self.scheme_combo.currentText() == SCHEME_FILE:
            path, _ = QFileDialog.getOpenFileName(self, "Class scheme", "", "Scheme (*.json *.yaml *.yml)")
            if path:
                self._custom_scheme = load_scheme(path)

    def new_canvas(self) -> Any:
        """Add an empty nuclei layer of the chosen size and scheme and edit it."""
        side = self.canvas_size.value()
        scheme = self.scheme()
        data, kwargs, _ = nuclei_layer_data(np.zeros((side, side), np.int32), np.zeros(1, np.int32), scheme, "canvas nuclei")
        layer = self.viewer.add_labels(data, **kwargs)
        self.adopt(layer)
        layer.mode = "paint"
        return layer

    def open_demo(self) -> Any:
        from .._sample_data import demo_tile

        added = [getattr(self.viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in demo_tile()]
        return self.adopt(added[-1])

    # -- tools, palette, selection -----------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        layer = self._c().layer
        layer.mode = mode
        self.viewer.layers.selection.active = layer

    def _refresh_tools(self, event: Any = None) -> None:
        mode = str(self.canvas.layer.mode) if self.canvas else ""
        for m, b in self.tool_buttons.items():
            b.setChecked(m == mode)

    def _build_palette(self) -> None:
        for b in self.palette_buttons.values():
            self.palette_group.removeButton(b)
            b.deleteLater()
        self.palette_buttons = {}
        scheme = self._c().scheme
        for k in scheme.class_ids:
            b = QPushButton()
            b.setCheckable(True)
            b.setIcon(_swatch(scheme.colors[k - 1]))
            b.clicked.connect(lambda *_, k=k: user_errors(self._c().set_active_class)(k))
            self.palette_group.addButton(b, k)
            self.palette_layout.addWidget(b, (k - 1) // 2, (k - 1) % 2)
            self.palette_buttons[k] = b
        self.palette_box.setTitle(f"Classes ({scheme.name})")
        self._refresh_palette()

    def _refresh_palette(self, event: Any = None) -> None:
        if self.canvas is None:
            return
        counts = self.canvas.counts()
        scheme = self.canvas.scheme
        for k, b in self.palette_buttons.items():
            rare = " (rare)" if k in scheme.rare else ""
            b.setText(f"{scheme.class_name(k)}{rare}: {int(counts[k])}")
            b.setToolTip(f"Paint, insert and set-class use {scheme.class_name(k)!r}; {int(counts[k])} nuclei on the map")
            b.setChecked(k == self.canvas.active_class)
        if counts[0]:
            self.palette_box.setTitle(f"Classes ({scheme.name}; {int(counts[0])} nuclei without class)")
        else:
            self.palette_box.setTitle(f"Classes ({scheme.name})")
        self._refresh_selection()

    def _refresh_selection(self, event: Any = None) -> None:
        c = self.canvas
        if c is None or not c.selected:
            self.selection_label.setText("Nothing selected: use the select tool (L) and click a nucleus.")
        else:
            area = int(np.count_nonzero(c.inst_map == c.selected))
            k = int(c.inst_types[c.selected])
            self.selection_label.setText(f"#{c.selected}: {c.scheme.class_name(k)}, {area} px")
        for b in self.verb_buttons.values():
            b.setEnabled(bool(c and c.selected))

    def _sync_steps(self) -> None:
        if self.canvas is not None:
            self.canvas.rotate_step = self.rotate_step.value()
            self.canvas.move_step = self.move_step.value()

    def _update_enabled(self) -> None:
        on = self.canvas is not None
        for w in (self.palette_box, self.insert_button, self.balance_button, self.enlarge_button, self.undo_button, self.redo_button):
            w.setEnabled(on)
        if hasattr(self, "selection_label"):
            self._refresh_selection()

    # -- nuclei bank ---------------------------------------------------------------------------------
    def _on_bank_chosen(self) -> None:
        self._load_bank(self.bank_combo.currentText())

    def _load_bank(self, choice: str, quiet: bool = False) -> None:
        """Build (or reuse) the bank for ``choice``; dataset banks are built in a worker thread."""
        c = self._c()
        if choice == BANK_MAP:
            self._set_bank(("map",), nuclei.NucleiBank.from_maps([(c.inst_map, c.inst_types)], border=BANK_BORDER), "this map")
            return
        if choice == BANK_DEMO:
            from ..classes import DEMO

            if c.scheme.names != DEMO.names:
                if quiet:
                    self.bank_label.setText("demo set: other classes than this map; choose where shapes come from")
                    return
                raise SchemeError(
                    f"the demo nuclei are of classes {list(DEMO.names)}, this map's scheme {c.scheme.name!r} has "
                    f"{list(c.scheme.names)}; use 'this map' or a dataset of that scheme"
                )
            key = ("demo",)
            if key not in self._banks:
                from ..demo_data import load_demo_tile

                self._banks[key] = nuclei.NucleiBank.from_maps([load_demo_tile()], border=BANK_BORDER)
            self._set_bank(key, self._banks[key], "demo set")
            return
        if choice == BANK_FILE:
            path, _ = QFileDialog.getOpenFileName(self, "Nuclei bank", "", "Nuclei bank (*.npz)")
            if path:
                self.load_bank_file(path)
            return
        path = QFileDialog.getExistingDirectory(self, "Dataset folder (CoNSeP/GLySAC, generic or PanNuke)")
        if path:
            self.load_dataset_bank(path)

    def load_bank_file(self, path: str) -> None:
        self._set_bank(("file", path), nuclei.NucleiBank.load(path), Path(path).name)

    def load_dataset_bank(self, path: str, *, block: bool = False) -> Any:
        """Collect the nuclei of a dataset (this map's scheme) into the bank, in a worker thread."""
        from ..datasets import open_dataset

        scheme = self._c().scheme
        key = ("dataset", str(path), scheme.name)
        if key in self._banks:
            self._set_bank(key, self._banks[key], Path(path).name)
            return None
        dataset = open_dataset(path, scheme)
        self.bank_label.setText(f"reading {len(dataset)} tiles of {Path(path).name}…")

        def job():
            # The label maps are kept (without images) as balancing donors: balance then reads nothing.
            maps = [(tile.inst_map, tile.inst_types) for tile in map(dataset.labels, range(len(dataset)))]
            return nuclei.NucleiBank.from_maps(maps, border=BANK_BORDER), maps

        def done(value):
            bank, self._donor_maps[key] = value
            self._banks[key] = bank
            self._set_bank(key, bank, Path(path).name)

        self._bank_worker = run_in_thread(job, on_return=done, on_error=self._bank_failed, block=block)
        return self._bank_worker

    def _bank_failed(self, exc: BaseException) -> None:
        self.bank_label.setText("no shapes loaded")
        notify_error(exc)

    def _set_bank(self, key: tuple, bank: Any, what: str) -> None:
        c = self._c()
        c.bank = bank
        self._bank_key = key
        counts = np.bincount(bank.classes, minlength=c.scheme.num_classes + 1) if len(bank) else np.zeros(c.scheme.num_classes + 1, int)
        parts = ", ".join(f"{c.scheme.class_name(k)} {int(counts[k])}" for k in c.scheme.class_ids)
        self.bank_label.setText(f"{what}: {len(bank)} nuclei ({parts})")

    # -- DiffMix maps --------------------------------------------------------------------------------
    def _donor_pool(self, rare: tuple[int, ...], border: int) -> tuple[Any, int | None]:
        """Donors of the rare classes from the current bank source (this map first), or None for this map only."""
        from ..mixing import DonorPool

        c = self._c()
        key = self._bank_key
        if key is None or key[0] == "map":
            return None, None
        if key[0] == "file":
            raise LabelError("balancing needs donors from whole label maps; choose the demo set, this map or a dataset")
        if key not in self._donor_maps:  # the demo set (dataset banks keep their maps when loaded)
            from ..demo_data import load_demo_tile

            self._donor_maps[key] = [load_demo_tile()]
        maps = self._donor_maps[key]
        pool = DonorPool.from_maps([(c.inst_map, c.inst_types), *maps], border=border, classes=rare)
        return pool, 0

    def balance(self) -> bool:
        """Apply the balancing map to the current label map (one undo step)."""
        from ..mixing import BalanceParams, balance_map

        c = self._c()
        rare = c.scheme.rare or (c.active_class,)
        params = BalanceParams(target_fraction=self.target_fraction.value())
        donors, index = self._donor_pool(tuple(rare), params.border)
        result = balance_map(
            c.inst_map, c.inst_types, rare, params=params, donors=donors, tile_index=index, rng=self.map_seed.value()
        )
        for warning in result.record.warnings:
            from napari.utils.notifications import show_warning

            show_warning(warning)
        record = result.record
        return c.apply(result.inst_map, result.inst_types, f"balance ({len(record.edits)} of {record.targets} targets replaced)")

    def enlarge(self) -> bool:
        """Apply the enlarging map (random shifts of interior nuclei) to the current label map."""
        from ..mixing import EnlargeParams, enlarge_map

        c = self._c()
        m = self.shift_max.value()
        params = EnlargeParams(shift_range=(-m, max(m - 1, -m)), probability=self.shift_prob.value())
        result = enlarge_map(c.inst_map, c.inst_types, params=params, rng=self.map_seed.value())
        return c.apply(result.inst_map, result.inst_types, f"enlarge ({len(result.shifts)} nuclei shifted)")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt)
        self.detach()
        super().closeEvent(event)
