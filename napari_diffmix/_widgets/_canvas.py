"""A nuclei layer bound to the edit verbs: class view, active class, selection, undo.

:class:`NucleiCanvas` owns no label logic: every verb calls a pure function of
:mod:`napari_diffmix.nuclei` (or :mod:`napari_diffmix.mixing`) on the layer's ``inst_map`` and
per-nucleus classes and writes the result back. What it adds is the napari side:

* Classes live in the layer's ``features`` (``index``/``class``/``class_name``); a class view
  (a second Labels layer of the ``type_map``, coloured by the scheme) is rebuilt whenever the
  instance map or the classes change, including after every brush stroke (``events.paint``).
* Painting: each brush/fill/polygon stroke paints a fresh nucleus id, which gets the active
  class; erasing a nucleus completely removes its row.
* Selection: the pick tool (``L``) selects the nucleus under the click (outlined in yellow);
  dragging it moves it. Verbs act on the selection.
* Undo: one chronological history for brush strokes and verbs, bound to Ctrl+Z /
  Ctrl+Shift+Z on the layer. Pixel changes (strokes and verbs alike) go through napari's own
  Labels history (``data_setitem`` inside ``block_history``), so each undo step pairs one
  napari pixel step with the classes before it; class-only edits (retype, features table edits)
  are undone here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import nuclei
from ..classes import ClassScheme
from ..errors import LabelError, SchemeError
from .._layers import (
    HIGHLIGHT_RGBA,
    KEY,
    class_layer_data,
    features_table,
    info_of,
    outline_colormap,
    present_ids,
    rgba,
    scheme_of,
    types_from_features,
)
from ._notify import user_errors

PAINT_MODES = ("paint", "fill", "polygon")
NAPARI_HISTORY = 100  # steps napari's Labels layer keeps (Labels._history_limit)

# verb -> (napari key bindings, human-readable shortcut for tooltips)
SHORTCUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "undo": (("Control-Z",), "Ctrl+Z"),
    "redo": (("Control-Shift-Z",), "Ctrl+Shift+Z"),
    "delete": (("Delete", "Backspace"), "Delete"),
    "duplicate": (("D",), "D (at the cursor)"),
    "rotate_ccw": (("R",), "R"),
    "rotate_cw": (("Shift-R",), "Shift+R"),
    "flip_lr": (("H",), "H"),
    "flip_ud": (("Shift-H",), "Shift+H"),
    "retype": (("T",), "T"),
    "insert": (("I",), "I (at the cursor)"),
    "next_class": (("N",), "N"),
    "move_up": (("Up",), "↑"),
    "move_down": (("Down",), "↓"),
    "move_left": (("Left",), "←"),
    "move_right": (("Right",), "→"),
    "move_up_far": (("Shift-Up",), "Shift+↑"),
    "move_down_far": (("Shift-Down",), "Shift+↓"),
    "move_left_far": (("Shift-Left",), "Shift+←"),
    "move_right_far": (("Shift-Right",), "Shift+→"),
}


def shortcut(verb: str) -> str:
    """The shortcut of a verb as shown in tooltips."""
    return SHORTCUTS[verb][1]


@dataclass(frozen=True)
class Edit:
    """One undo step: a label, whether napari's pixel history holds its pixels, classes around it."""

    label: str
    pixels: bool
    before: np.ndarray
    after: np.ndarray


class NucleiCanvas:
    """Bind a 2-D nuclei Labels layer of ``viewer`` to the edit verbs (see the module docstring)."""

    def __init__(self, viewer: Any, layer: Any, scheme: ClassScheme | None = None):
        from napari.utils.events import EmitterGroup

        self.viewer = viewer
        self.layer = layer
        recorded = scheme_of(layer)
        if scheme is not None and recorded is not None and recorded.names != scheme.names:
            raise SchemeError(
                f"layer {layer.name!r} uses classes {list(recorded.names)}, not {list(scheme.names)} of {scheme.name!r}"
            )
        self.scheme: ClassScheme = recorded or scheme
        if self.scheme is None:
            raise SchemeError(f"layer {layer.name!r} has no class scheme; choose one before editing it")
        data = np.asarray(layer.data)
        if data.ndim != 2:
            raise LabelError(
                f"layer {layer.name!r} is {data.ndim}-D {data.shape}; the nuclei editor edits one 2-D label map"
            )
        if not np.issubdtype(data.dtype, np.integer) or (data.size and data.min() < 0):
            raise LabelError(f"layer {layer.name!r} must hold non-negative integer nucleus ids, got {data.dtype}")
        if data.dtype != np.int32 or not isinstance(layer.data, np.ndarray):
            layer.data = data.astype(np.int32)
        types = types_from_features(layer.features, int(self.inst_map.max(initial=0)) + 1)
        self.scheme.check_classes(types, source=f"layer {layer.name!r}")
        info = info_of(layer)
        info.update(role="nuclei", scheme=self.scheme.to_dict())
        layer.metadata = {**layer.metadata, KEY: info}

        self.events = EmitterGroup(source=self, changed=None, selection=None, active_class=None)
        self._types = types
        self._undo: deque[Edit] = deque()
        self._redo: list[Edit] = []
        self._own = 0  # > 0 while this object writes to the layer (its own events are not user edits)
        self.selected = 0
        self.active_class = self.scheme.rare[0] if self.scheme.rare else 1
        self.rotate_step = 15.0
        self.move_step = 10
        self.bank: nuclei.NucleiBank | None = None
        self.rng = np.random.default_rng()
        self.classes = self._class_view()
        layer.contour = max(layer.contour, 1)
        self._write_features()
        self._refresh_highlight()

        self._connections: list[tuple[Any, Callable]] = []
        for emitter, handler in (
            (layer.events.paint, self._on_paint),
            (layer.events.mode, self._on_mode),
            (layer.events.selected_label, self._on_selected_label),
            (layer.events.features, self._on_features),
            (layer.events.data, self._on_data),
            (layer.events.editable, self._on_editable),
        ):
            emitter.connect(handler)
            self._connections.append((emitter, handler))
        layer.mouse_drag_callbacks.append(self._drag)
        self._bind_keys()
        if layer.mode in PAINT_MODES:
            self._arm_brush()

    # -- state -------------------------------------------------------------------------------------
    @property
    def inst_map(self) -> np.ndarray:
        return self.layer.data

    @property
    def inst_types(self) -> np.ndarray:
        """Class per nucleus id (a copy; index = id, unused ids 0)."""
        return self._types.copy()

    @property
    def type_map(self) -> np.ndarray:
        return nuclei.type_map_from(self.inst_map, self._types)

    def counts(self) -> np.ndarray:
        """Nuclei per class, (C + 1,) with index 0 = nuclei without a class."""
        ids = present_ids(self.inst_map)
        classes = self._types[ids] if ids.size else np.zeros(0, np.int32)
        return np.bincount(classes, minlength=self.scheme.num_classes + 1)

    def next_id(self) -> int:
        return max(int(self.inst_map.max(initial=0)), self._types.size - 1) + 1

    def _class_view(self) -> Any:
        name = f"{self.layer.name} classes"
        for other in self.viewer.layers:
            if info_of(other).get("role") == "classes" and info_of(other).get("nuclei") == self.layer.name:
                other.data = self.type_map  # the labels may have changed while nobody edited them here
                return other
        data, kwargs, _ = class_layer_data(self.type_map, self.scheme, name, nuclei=self.layer.name)
        selected = list(self.viewer.layers.selection)
        view = self.viewer.add_labels(data, **kwargs)
        view.editable = False
        # Below the instance outlines, so the outlines stay on top and painting targets the nuclei.
        layers = self.viewer.layers
        layers.move(layers.index(view), layers.index(self.layer))
        layers.selection = set(selected) or {self.layer}
        return view

    def detach(self) -> None:
        """Stop listening to the layer (its data, classes and class view stay)."""
        for emitter, handler in self._connections:
            emitter.disconnect(handler)
        self._connections = []
        if self._drag in self.layer.mouse_drag_callbacks:
            self.layer.mouse_drag_callbacks.remove(self._drag)
        for keys, _ in SHORTCUTS.values():
            for key in keys:
                self.layer.bind_key(key, None, overwrite=True)

    # -- writing -------------------------------------------------------------------------------------
    def _write_features(self) -> None:
        self._own += 1
        try:
            self.layer.features = features_table(self.inst_map, self._types, self.scheme)
        finally:
            self._own -= 1

    def _set_types(self, types: np.ndarray) -> None:
        types = np.asarray(types, dtype=np.int32)
        need = int(self.inst_map.max(initial=0)) + 1
        if types.size < need:
            types = np.concatenate([types, np.zeros(need - types.size, np.int32)])
        self._types = types
        self._write_features()
        self.classes.data = nuclei.type_map_from(self.inst_map, types)
        if self.selected and not np.any(self.inst_map == self.selected):
            self.selected = 0
            self.events.selection(value=0)
        self._refresh_highlight()
        self.events.changed()

    def _push(self, edit: Edit) -> None:
        self._undo.append(edit)
        self._redo.clear()
        # napari keeps a bounded pixel history; drop our oldest steps with it so the two stay paired.
        while sum(e.pixels for e in self._undo) > NAPARI_HISTORY:
            self._undo.popleft()

    def apply(self, inst_map: np.ndarray, inst_types: np.ndarray, label: str, select: int | None = None) -> bool:
        """Write a new ``(inst_map, inst_types)`` as one undoable step; False when nothing changed."""
        inst_map = np.asarray(inst_map)
        if inst_map.shape != self.inst_map.shape:
            raise LabelError(f"{label}: new map {inst_map.shape} differs from the layer's {self.inst_map.shape}")
        changed = inst_map != self.inst_map
        pixels = bool(changed.any())
        before = self._types.copy()
        after = np.asarray(inst_types, dtype=np.int32)
        if not pixels and _same_types(before, after):
            return False
        if pixels:
            index = np.nonzero(changed)
            self._own += 1
            try:
                with self.layer.block_history():
                    self.layer.data_setitem(index, inst_map[index].astype(self.inst_map.dtype))
            finally:
                self._own -= 1
        self._push(Edit(label, pixels, before, after))
        self._set_types(after)
        if select is not None:
            self.select(select)
        return True

    def undo(self) -> bool:
        """Undo the last stroke or verb; False when there is nothing to undo."""
        if not self._undo:
            return False
        edit = self._undo.pop()
        if edit.pixels:
            self._own += 1
            try:
                self.layer.undo()
            finally:
                self._own -= 1
        self._redo.append(edit)
        self._set_types(edit.before)
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        edit = self._redo.pop()
        if edit.pixels:
            self._own += 1
            try:
                self.layer.redo()
            finally:
                self._own -= 1
        self._undo.append(edit)
        self._set_types(edit.after)
        return True

    @property
    def history(self) -> list[str]:
        """Labels of the undoable steps, oldest first."""
        return [e.label for e in self._undo]

    # -- selection and active class ------------------------------------------------------------------
    def select(self, nid: int) -> None:
        nid = int(nid)
        if nid and not np.any(self.inst_map == nid):
            raise LabelError(f"there is no nucleus {nid} in layer {self.layer.name!r}")
        self.selected = nid
        if nid and self.layer.mode == "pick" and self.layer.selected_label != nid:
            self._own += 1
            try:
                self.layer.selected_label = nid
            finally:
                self._own -= 1
        self._refresh_highlight()
        self.events.selection(value=nid)

    def set_active_class(self, k: int) -> None:
        k = int(k)
        if not 1 <= k <= self.scheme.num_classes:
            raise SchemeError(f"class {k} is outside 1..{self.scheme.num_classes} of scheme {self.scheme.name!r}")
        self.active_class = k
        self._refresh_highlight()
        self.events.active_class(value=k)

    def _arm_brush(self) -> None:
        """Point napari's brush at a fresh nucleus id: every stroke paints a new nucleus."""
        self._own += 1
        try:
            self.layer.selected_label = self.next_id()
        finally:
            self._own -= 1
        self._refresh_highlight()

    def _refresh_highlight(self) -> None:
        special = {}
        if self.layer.mode in PAINT_MODES:
            special[self.layer.selected_label] = rgba(self.scheme.colors[self.active_class - 1])
        if self.selected:
            special[self.selected] = HIGHLIGHT_RGBA
        self._own += 1  # napari re-emits selected_label when the colormap changes
        try:
            self.layer.colormap = outline_colormap(special)
        finally:
            self._own -= 1

    def _require_selection(self, verb: str) -> int:
        if not self.selected:
            raise LabelError(f"{verb}: select a nucleus first (pick tool 'L', then click a nucleus)")
        return self.selected

    # -- verbs -------------------------------------------------------------------------------------
    def move(self, dy: int, dx: int) -> bool:
        nid = self._require_selection("move")
        m, t = nuclei.move_nucleus(self.inst_map, self._types, nid, dy, dx)
        return self.apply(m, t, f"move #{nid} by ({dy}, {dx})", select=nid if np.any(m == nid) else 0)

    def rotate(self, angle_deg: float | None = None) -> bool:
        """Rotate the selection counter-clockwise by ``angle_deg`` (default: the rotate step)."""
        nid = self._require_selection("rotate")
        angle = self.rotate_step if angle_deg is None else float(angle_deg)
        m, t = nuclei.rotate_nucleus(self.inst_map, self._types, nid, angle)
        return self.apply(m, t, f"rotate #{nid} by {angle:g}°", select=nid if np.any(m == nid) else 0)

    def flip(self, axis: int) -> bool:
        """Mirror the selection: axis 1 left/right, axis 0 up/down."""
        nid = self._require_selection("flip")
        m, t = nuclei.flip_nucleus(self.inst_map, self._types, nid, axis)
        return self.apply(m, t, f"flip #{nid} {'left/right' if axis == 1 else 'up/down'}", select=nid)

    def duplicate(self, center_yx: tuple[float, float] | None = None) -> int:
        """Copy the selection to ``center_yx`` (default: beside it); the copy becomes the selection."""
        nid = self._require_selection("duplicate")
        if center_yx is None:
            center_yx = self._beside(nid)
        new = self.next_id()
        m, t = nuclei.duplicate_nucleus(self.inst_map, self._types, nid, center_yx)
        if not np.any(m == new):
            raise LabelError(f"duplicate: the copy of #{nid} would land outside the map")
        self.apply(m, t, f"duplicate #{nid}", select=new)
        return new

    def _beside(self, nid: int) -> tuple[float, float]:
        props = nuclei.nuclei_props(np.where(self.inst_map == nid, nid, 0))
        (cy, cx), (_, x0, _, x1) = props.centroids[0], props.bboxes[0]
        width = x1 - x0 + 2
        w = self.inst_map.shape[1]
        return (cy, cx + width) if cx + width + width / 2 < w else (cy, cx - width)

    def delete(self) -> bool:
        nid = self._require_selection("delete")
        m, t = nuclei.delete_nucleus(self.inst_map, self._types, nid)
        return self.apply(m, t, f"delete #{nid}", select=0)

    def retype(self, new_class: int | None = None) -> bool:
        """Give the selection ``new_class`` (default: the active class)."""
        nid = self._require_selection("change class")
        k = self.active_class if new_class is None else int(new_class)
        self.scheme.check_classes(np.array([k]))
        m, t = nuclei.retype_nucleus(self.inst_map, self._types, nid, k)
        return self.apply(m, t, f"#{nid} -> {self.scheme.class_name(k)}", select=nid)

    def insert(self, center_yx: tuple[float, float], cls: int | None = None) -> int:
        """Stamp a real nucleus of class ``cls`` (default: active class) from the bank at ``center_yx``."""
        k = self.active_class if cls is None else int(cls)
        if self.bank is None:
            raise LabelError("insert: no nuclei bank loaded; choose a bank source (demo set, this map or a dataset)")
        i = self.bank.sample(k, self.rng)
        if i is None:
            raise LabelError(
                f"insert: the nuclei bank has no {self.scheme.class_name(k)!r} nucleus; load a dataset that has some"
            )
        new = self.next_id()
        m, t = nuclei.paste_mask(self.inst_map, self._types, self.bank.mask(i), center_yx, k)
        if not np.any(m == new):
            raise LabelError(f"insert: the nucleus would land outside the map at {center_yx}")
        self.apply(m, t, f"insert {self.scheme.class_name(k)} #{new}", select=new)
        return new

    def next_class(self, step: int = 1) -> None:
        self.set_active_class((self.active_class - 1 + step) % self.scheme.num_classes + 1)

    # -- positions -------------------------------------------------------------------------------------
    def _data_point(self, world_position: Any) -> tuple[int, int] | None:
        """Integer (y, x) of a world position, or None outside the map."""
        point = np.round(np.asarray(self.layer.world_to_data(world_position))[-2:]).astype(int)
        h, w = self.inst_map.shape
        if 0 <= point[0] < h and 0 <= point[1] < w:
            return int(point[0]), int(point[1])
        return None

    def cursor_point(self) -> tuple[int, int]:
        """The canvas cursor in map pixels; the centre of the view when the cursor is off the map."""
        point = self._data_point(self.viewer.cursor.position)
        if point is None:
            point = self._data_point(self.viewer.scene.camera.center)
        if point is None:
            h, w = self.inst_map.shape
            point = (h // 2, w // 2)
        return point

    # -- napari events -------------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        if self._own:
            return
        atoms = list(event.value)
        if not self._written(atoms):
            # A lone ``layer.paint``/``data_setitem`` call reports its step before writing the
            # pixels (a mouse stroke reports after): record it once the write is done.
            from qtpy.QtCore import QTimer

            QTimer.singleShot(0, lambda: self._record_stroke(atoms))
            return
        self._record_stroke(atoms)

    def _written(self, atoms: list[Any]) -> bool:
        data = self.inst_map
        for atom in atoms:
            if hasattr(atom, "new_value"):
                region = np.asarray(data[atom.slice_key])
                values = region if atom.mask is None else region[atom.mask]
                if not np.all(values == atom.new_value):
                    return False
            elif not np.array_equal(np.asarray(data[atom[0]]), np.broadcast_to(atom[2], np.shape(atom[1]))):
                return False
        return True

    def _record_stroke(self, atoms: list[Any]) -> None:
        """One user stroke: new ids get the active class, vanished nuclei lose theirs."""
        before = self._types.copy()
        painted: set[int] = set()
        for atom in atoms:
            if hasattr(atom, "new_value"):
                painted.add(int(atom.new_value))
            else:  # (indices, old values, new values) from data_setitem
                painted.update(int(v) for v in np.unique(np.asarray(atom[2])))
        top = max(int(self.inst_map.max(initial=0)), max(painted, default=0))
        after = np.zeros(max(before.size, top + 1), dtype=np.int32)
        after[: before.size] = before
        present = np.zeros(after.size, dtype=bool)
        present[present_ids(self.inst_map)] = True
        for nid in painted:
            if nid > 0 and present[nid] and after[nid] == 0:
                after[nid] = self.active_class
        after[~present] = 0
        self._push(Edit("brush stroke", True, before, after))
        self._set_types(after)
        if self.layer.mode in PAINT_MODES:
            self._arm_brush()

    def _on_mode(self, event: Any) -> None:
        mode = str(self.layer.mode)
        if mode in PAINT_MODES:
            self._arm_brush()
        elif mode == "pick" and self.selected:
            self.select(self.selected)
        else:
            self._refresh_highlight()

    def _on_selected_label(self, event: Any) -> None:
        if self._own or self.layer.mode != "pick":
            return
        label = int(self.layer.selected_label)
        if label != self.selected:
            self.select(label if np.any(self.inst_map == label) else 0)

    def _on_features(self, event: Any) -> None:
        if self._own:
            return
        before = self._types.copy()
        after = types_from_features(self.layer.features, int(self.inst_map.max(initial=0)) + 1)
        self.scheme.check_classes(after, source=f"layer {self.layer.name!r} features")
        if not _same_types(before, after):
            self._push(Edit("edit classes", False, before, after))
        self._set_types(after)

    def _on_data(self, event: Any) -> None:
        if self._own:
            return
        # Someone replaced the whole map: the step history no longer applies to it.
        self._undo.clear()
        self._redo.clear()
        self._set_types(self._types)

    def _on_editable(self, event: Any) -> None:
        if not self.layer.editable:  # napari dropped its pixel history
            self._undo.clear()
            self._redo.clear()

    def _drag(self, layer: Any, event: Any):
        """Pick tool: press on a nucleus and drag it to move it (one undo step)."""
        if layer.mode != "pick" or getattr(event, "button", 1) != 1:
            return
        start = self._data_point(event.position)
        if start is None:
            return
        nid = int(self.inst_map[start])
        if nid == 0:
            return
        yield
        end = start
        while event.type == "mouse_move":
            end = self._data_point(event.position) or end
            yield
        end = self._data_point(event.position) or end  # the release point
        dy, dx = end[0] - start[0], end[1] - start[1]
        if dy or dx:
            user_errors(self._move_nucleus)(nid, dy, dx)

    def _move_nucleus(self, nid: int, dy: int, dx: int) -> None:
        self.select(nid)
        self.move(dy, dx)

    def _bind_keys(self) -> None:
        verbs: dict[str, Callable[[], Any]] = {
            "undo": self.undo,
            "redo": self.redo,
            "delete": self.delete,
            "duplicate": lambda: self.duplicate(self.cursor_point()),
            "rotate_ccw": lambda: self.rotate(self.rotate_step),
            "rotate_cw": lambda: self.rotate(-self.rotate_step),
            "flip_lr": lambda: self.flip(1),
            "flip_ud": lambda: self.flip(0),
            "retype": self.retype,
            "insert": lambda: self.insert(self.cursor_point()),
            "next_class": self.next_class,
            "move_up": lambda: self.move(-1, 0),
            "move_down": lambda: self.move(1, 0),
            "move_left": lambda: self.move(0, -1),
            "move_right": lambda: self.move(0, 1),
            "move_up_far": lambda: self.move(-self.move_step, 0),
            "move_down_far": lambda: self.move(self.move_step, 0),
            "move_left_far": lambda: self.move(0, -self.move_step),
            "move_right_far": lambda: self.move(0, self.move_step),
        }
        for verb, (keys, _) in SHORTCUTS.items():
            action = user_errors(verbs[verb])
            for key in keys:
                self.layer.bind_key(key, _key_handler(action), overwrite=True)


def _key_handler(action: Callable[[], Any]) -> Callable[[Any], None]:
    def handler(layer: Any) -> None:
        action()

    return handler


def _same_types(a: np.ndarray, b: np.ndarray) -> bool:
    n = max(a.size, b.size)
    return np.array_equal(np.pad(a, (0, n - a.size)), np.pad(b, (0, n - b.size)))
