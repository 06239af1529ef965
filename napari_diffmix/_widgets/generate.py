"""Generate dock widget: render the current label map into tissue with a live preview.

The engine is :class:`napari_diffmix.render.Renderer`: it loads the model once per (file,
device, precision), checks memory, translates out-of-memory errors and writes the provenance;
this widget only collects the settings and shows steps. Rendering again reuses the loaded
weights and, while the label map is unchanged, the SPADE modulation of the last condition.
The render's generator runs in a napari thread worker: every step the worker sends a small
preview of the predicted clean image to the main thread, which paints it into a preview layer
(a new preview is computed only once the last one was shown, so a slow screen never queues up
frames) and updates the progress bar. Cancel stops the run within a step (the sampler polls it
between windows and between the two guidance halves) and leaves no layer.
``DIFFMIX_NAPARI_NOTHREADS=1`` runs the same generator synchronously.

Modes: from noise; from the chosen image (SDEdit, ``strength`` of the schedule); or re-render
only the nuclei edited since that image was made (the image layer carries the label map it
depicts; changed pixels, grown by a margin, are rendered, the rest of the image is kept, and
the network runs only on windows around the edit). The whole canvas is rendered at once unless
a tile size is set (overlapping tiles blended at every step, to bound memory).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..classes import ClassScheme
from ..errors import LabelError
from ..progress import JobEvent
from .._layers import KEY, info_of, role_of, scheme_of, types_from_features
from ._layout import Collapsible, DockTab, scroll_body
from ._model_picker import ModelPicker
from ._notify import user_errors
from ._sampling import fill_sampler_controls, sampler_controls, seed_spin, strength_spin
from ._workers import JobWidget, show_progress, threads_enabled

if TYPE_CHECKING:
    from ..render import Rendered

MODES = ("noise", "sdedit", "edited")
# Quality in a pathologist's words -> solver steps (the model card passes its measure at 10-25).
QUALITY = {"draft (fastest)": 10, "standard": 15, "best (slowest)": 25}
DEFAULT_QUALITY = "standard"
CUSTOM_QUALITY = "custom (Advanced)"
MODEL_QUALITY = "set by the model"  # a distilled student renders only with its own steps
REGIONS = {"whole map": "whole", "visible part": "visible"}
PREVIEW_SIDE = 512  # px: previews of larger canvases are subsampled
PREVIEW_INTERVAL = 0.1  # s: at most this often (each repaint costs the event loop a few ms)
# s: the longest the render waits for the window to repaint a preview. Under Xvfb's software
# OpenGL a repaint of the canvas took 40-100 ms of CPU, and with the render's threads on every
# core it took twice that (benchmarks/bench_gui.py); the wait is bounded so that a window that
# never repaints (hidden, minimised) cannot slow a render by more than this per preview.
PAINT_WAIT = 0.3
GENERATE_KEY = "Shift-G"
WARM_UP_DELAY_MS = 200  # the background import starts after the dock has been drawn
# The check's segmentation model: the bundled demo one by default (seg.checkpoint's name "demo").
SEG_DEMO = "bundled demo segmentation model"
# Check overlay: outcome code (fidelity.FOUND, WRONG_CLASS, MISSED; not imported, fidelity loads
# the store's modules) -> colour and its word.
CHECK_COLOURS = {1: ("#2ca02c", "green"), 2: ("#ff7f0e", "orange"), 3: ("#d62728", "red")}
OUTCOMES_SHORT = {1: "found with their class", 2: "with another class", 3: "missed"}
EDIT_MARGIN = 4  # px grown around edited nuclei, so their surroundings blend in


def warm_up_imports() -> None:
    """Import what a first run would import, now, on the main thread.

    The samplers import diffusers lazily (and through it sympy, torch.distributed, scipy, ...).
    An import that size inside the worker thread holds the GIL in long stretches and froze the
    event loop for up to half a second during the first generation; done while the widget
    opens, it costs a moment once and no run ever pays it.
    """
    import importlib

    import diffusers

    for name in ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        getattr(diffusers, name)
    for module in ("render", "model.checkpoint", "model.condition", "model.samplers"):
        importlib.import_module(f"napari_diffmix.{module}")


class AfterRepaint(QObject):
    """Calls back once a top-level window has repainted. Qt repaints napari's canvas in two
    update requests in a row (the OpenGL draw, then the window's composition), so the callbacks
    run when no update request came for :attr:`SETTLE_MS`."""

    SETTLE_MS = 5

    def __init__(self, window: QWidget):
        super().__init__(window)
        self._callbacks: list[Any] = []
        self._repaints = 0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(self.SETTLE_MS)
        self._timer.timeout.connect(self._settled)
        self._counted = 0
        window.installEventFilter(self)

    def add(self, callback: Any) -> None:
        self._callbacks.append(callback)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt)
        if event.type() == QEvent.Type.UpdateRequest and self._callbacks:
            self._repaints += 1
            if not self._timer.isActive():
                self._counted = self._repaints
                self._timer.start()
        return False

    def _settled(self) -> None:
        if self._repaints != self._counted:  # another pass came: wait for it to end too
            self._counted = self._repaints
            self._timer.start()
            return
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass
class Request:
    """Everything a run needs, captured on the main thread when Generate is pressed."""

    model_path: Path
    preset: str | None
    device: str
    precision: str
    inst_map: np.ndarray
    type_map: np.ndarray
    scheme: ClassScheme
    sampler: str
    steps: int
    guidance: float
    seed: int
    mode: str
    strength: float | None
    image: np.ndarray | None
    image_name: str | None
    mask: np.ndarray | None
    tile: int | None
    labels_name: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checked:
    """A check of one image: what became of each painted nucleus (fidelity.NucleusCheck)."""

    image_name: str
    inst_map: np.ndarray
    check: Any
    model: str


class GenerateWidget(DockTab, JobWidget, QWidget):
    """Model, device, sampler, steps, guidance, seed and mode; Generate / Cancel with a live preview."""

    busy_message = "a generation is already running; cancel it first"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        from ..render import Renderer

        self.renderer = Renderer()
        self._stop = threading.Event()  # set by Cancel; the sampler polls it within a step
        self._fixed_sampling = False  # a distilled student chosen: its own steps, sampler, guidance
        # Set by the main thread: once the latest preview reached the layer (the worker makes no
        # other preview until then), and once the window repainted it.
        self._preview_taken = threading.Event()
        self._painted = threading.Event()
        self._paint_watch: Any = None
        self._pace = False  # whether the render waits for each preview's repaint (threaded runs)
        self.preview_layer: Any = None
        self.previews_shown = 0
        self.last_result: Any = None
        self.renders = 0  # results so far: layers are named "render 1", "render 2", ...
        self._scorers: dict[str, Any] = {}  # segmentation models of the check, loaded once per choice
        self.last_check: Checked | None = None
        self._build()
        self._warm_up()
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            emitter.connect(self._refresh_layers)
        self._refresh_layers()

    # -- layout --------------------------------------------------------------------------------------
    def _build(self) -> None:
        root = scroll_body(self)
        advanced = Collapsible("Advanced", "Sampler, steps, guidance, strength, region, tiles, device and precision")
        adv = QFormLayout()
        advanced.body.addLayout(adv)
        form = QFormLayout()
        root.addLayout(form)

        self.picker = ModelPicker(advanced=adv, deferred=True)
        self.picker.changed.connect(self._on_model_changed)
        form.addRow(self.picker)

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The nuclei layer to render (its classes come with it)")
        form.addRow("Nuclei", self.labels_combo)

        modes = QVBoxLayout()
        self.mode_buttons = {
            "noise": QRadioButton("the whole map, new tissue"),
            "sdedit": QRadioButton("from my image, keeping its look"),
            "edited": QRadioButton("only the nuclei I changed"),
        }
        self.mode_buttons["noise"].setChecked(True)
        self.mode_buttons["noise"].setToolTip("Render tissue for every nucleus of the map, from scratch (from noise)")
        self.mode_buttons["sdedit"].setToolTip(
            "Re-render the chosen image so it follows the map, keeping its colours and layout "
            "(SDEdit: the image is noised part way, see Strength under Advanced)"
        )
        self.mode_buttons["edited"].setToolTip(
            "Render only where the nuclei differ from the ones the chosen image was made from; every other pixel is kept"
        )
        for b in self.mode_buttons.values():
            modes.addWidget(b)
            b.toggled.connect(lambda *_: self._update_enabled())
        form.addRow("Render", modes)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image to start from or to edit (default: the latest render)")
        form.addRow("Image", self.image_combo)
        self.quality = QComboBox()
        self.quality.addItems(list(QUALITY))
        self.quality.setCurrentText(DEFAULT_QUALITY)
        self.quality.setToolTip("More denoising steps: finer tissue, slower. The exact step count is under Advanced")
        self.quality.currentTextChanged.connect(lambda text: self.steps.setValue(QUALITY[text]) if text in QUALITY else None)
        form.addRow("Quality", self.quality)
        self.seed = seed_spin()
        dice = QPushButton("Random")
        dice.setToolTip("Roll a new seed: other tissue for the same nuclei")
        dice.clicked.connect(lambda *_: self.roll_seed())
        row = QHBoxLayout()
        row.addWidget(self.seed, 1)
        row.addWidget(dice)
        form.addRow("Seed", row)

        row = QHBoxLayout()
        self.generate_button = QPushButton("Generate")
        self.generate_button.setToolTip("Render the nuclei (Shift+G in the viewer)")
        self.generate_button.clicked.connect(lambda *_: user_errors(self.generate)())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop within the current step; nothing is added")
        self.cancel_button.clicked.connect(lambda *_: self.cancel())
        row.addWidget(self.generate_button)
        row.addWidget(self.cancel_button)
        root.addLayout(row)
        row = QHBoxLayout()
        self.check_button = QPushButton("Check the render")
        self.check_button.setToolTip(
            "Find the nuclei in the chosen image with a segmentation model and colour each painted nucleus: "
            "green = found with its class, orange = found with another class, red = missed"
        )
        self.check_button.clicked.connect(lambda *_: user_errors(self.check)())
        self.check_after = QCheckBox("after each render")
        self.check_after.setToolTip("Check every new render as soon as it is done")
        row.addWidget(self.check_button)
        row.addWidget(self.check_after)
        root.addLayout(row)
        self._add_job_status(root)

        self.strength = strength_spin("How far the image is noised before rendering (from my image)", deferred=True)
        adv.addRow("Strength", self.strength)
        self.sampler_combo, self.steps = sampler_controls(deferred=True)
        self.steps.valueChanged.connect(self._sync_quality)
        adv.addRow("Sampler", self.sampler_combo)
        adv.addRow("Steps", self.steps)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 20.0)
        self.guidance.setSingleStep(0.25)
        self.guidance.setValue(3.0)
        self.guidance.setToolTip("Classifier-free guidance scale: how strongly the tissue follows the classes (1 = plain conditional model)")
        adv.addRow("Guidance", self.guidance)
        self.region = QComboBox()
        self.region.addItems(list(REGIONS))
        self.region.setToolTip("Render the whole map, or only the part of it the canvas shows now (large maps)")
        adv.addRow("Region", self.region)
        self.tile = QSpinBox()
        self.tile.setRange(0, 4096)
        self.tile.setSpecialValueText("off")
        self.tile.setSuffix(" px")
        self.tile.setToolTip(
            "off (default): the whole canvas at once. A size: canvases larger than it are rendered in overlapping "
            "tiles blended at every step (bounds memory, costs time)"
        )
        adv.addRow("Tile size", self.tile)
        self.seg_combo = QComboBox()
        self.seg_combo.addItem(SEG_DEMO)
        self.seg_combo.setToolTip("The segmentation model of 'Check the render' (a 'diffmix train-seg' model folder)")
        seg_browse = QPushButton("Browse…")
        seg_browse.setToolTip("Choose a segmentation model folder")
        seg_browse.clicked.connect(lambda *_: self._browse_seg_model())
        row = QHBoxLayout()
        row.addWidget(self.seg_combo, 1)
        row.addWidget(seg_browse)
        adv.addRow("Check with", row)
        self.advanced = advanced
        root.addWidget(advanced)
        root.addStretch(1)
        self.viewer.bind_key(GENERATE_KEY, lambda viewer: user_errors(self.generate)(), overwrite=True)
        self._update_enabled()

    def _warm_up(self) -> None:
        """Import torch and the sampler library in the background while the dock opens (on the
        main thread they froze the window for seconds); Generate waits for it with a visible
        state. What needs them (architectures, sampler choices and defaults, the model's summary)
        is filled in when they are there."""
        self.ready = False
        self._imported = threading.Event()  # a run waits for it: two threads importing one module race
        self.generate_button.setEnabled(False)
        self.progress.setFormat("loading the renderer…")

        def warm() -> None:
            try:
                warm_up_imports()
            finally:
                self._imported.set()

        def poll() -> None:
            if not self._imported.is_set():
                return
            self._warm_timer.stop()
            self.picker.load_presets()
            fill_sampler_controls(self.sampler_combo, self.steps, self.strength)
            if self.picker.info is None:  # the model chosen (the default) is read now that torch is there
                self.picker.set_model(self.picker.combo.currentText())
            self.ready = True
            if self.progress.format() == "loading the renderer…":
                self.progress.setFormat("idle")
            self._update_enabled()

        # A plain daemon thread and a timer owned by the widget: nothing Qt crosses threads, so
        # closing napari while it imports cannot touch a deleted Qt object. It starts once the
        # dock is on screen: torch's extension module holds the GIL while it initialises (0.3 s
        # on a busy 2-core machine), which would otherwise delay the dock itself.
        # (Kept on the widget: a Qt connection to a bound method holds only a weak reference.)
        self._warm_thread = threading.Thread(target=warm, name="diffmix-warm-up", daemon=True)
        self._warm_start = QTimer(self)
        self._warm_start.setSingleShot(True)
        self._warm_start.timeout.connect(self._warm_thread.start)
        self._warm_start.start(WARM_UP_DELAY_MS)
        self._warm_timer = QTimer(self)
        self._warm_timer.setInterval(100)
        self._warm_timer.timeout.connect(poll)
        self._warm_timer.start()

    def _sync_quality(self, steps: int) -> None:
        if self._fixed_sampling:
            label = MODEL_QUALITY
        else:
            label = next((name for name, n in QUALITY.items() if n == steps), CUSTOM_QUALITY)
        if self.quality.findText(label) < 0 and label in (CUSTOM_QUALITY, MODEL_QUALITY):
            self.quality.addItem(label)
        self.quality.blockSignals(True)
        self.quality.setCurrentText(label)
        self.quality.blockSignals(False)

    # -- choices --------------------------------------------------------------------------------------
    def roll_seed(self) -> int:
        self.seed.setValue(int(np.random.default_rng().integers(2**31 - 1)))
        return self.seed.value()

    def set_model(self, path: str | os.PathLike, preset: str | None = None) -> None:
        """Choose a model file; see :meth:`ModelPicker.set_model`."""
        self.picker.set_model(path, preset)

    def _on_model_changed(self, info: Any) -> None:
        # A distilled student renders only with its own sampler, steps and folded-in guidance:
        # its quality, steps, sampler and guidance are shown but cannot be changed.
        self._fixed_sampling = bool(info is not None and info.distilled)
        for control in (self.quality, self.steps, self.sampler_combo, self.guidance):
            control.setEnabled(not self._fixed_sampling)
        if not self._fixed_sampling and self.quality.findText(MODEL_QUALITY) >= 0:
            self.quality.removeItem(self.quality.findText(MODEL_QUALITY))
        if info is not None:  # a native model: start from its stored guidance
            # No tiles by default: the demo model, trained on 64 px crops, keeps its measured quality
            # at 256 px untiled (README, Performance), and tiles at the training size cost 2.7x.
            self.guidance.setValue(info.default_guidance)
            # A distilled student renders only with its own sampler and steps (the fast ones otherwise).
            own = info.default_sampling()
            self.sampler_combo.setCurrentText(own["sampler"])
            self.steps.setValue(own["steps"])
        self._sync_quality(self.steps.value())

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        for combo, layers in (
            (self.labels_combo, [l for l in self.viewer.layers if isinstance(l, Labels) and role_of(l) == "nuclei"]),
            (self.image_combo, [l for l in self.viewer.layers if isinstance(l, Image) and l.rgb and role_of(l) != "preview"]),
        ):
            current = combo.currentText()
            combo.clear()
            combo.addItems([layer.name for layer in layers])
            if current in [layer.name for layer in layers]:
                combo.setCurrentText(current)
            elif layers:
                combo.setCurrentIndex(len(layers) - 1 if combo is self.labels_combo else 0)

    def mode(self) -> str:
        return next(m for m, b in self.mode_buttons.items() if b.isChecked())

    def set_mode(self, mode: str) -> None:
        self.mode_buttons[mode].setChecked(True)

    def _update_enabled(self) -> None:
        running = self._running
        self.generate_button.setEnabled(not running and getattr(self, "ready", False))
        self.check_button.setEnabled(not running and getattr(self, "ready", False))
        self.cancel_button.setEnabled(running)
        needs_image = self.mode() != "noise"
        self.image_combo.setEnabled(needs_image)
        self.strength.setEnabled(self.mode() == "sdedit")

    # -- request --------------------------------------------------------------------------------------
    def _labels(self) -> tuple[Any, np.ndarray, np.ndarray, ClassScheme]:
        name = self.labels_combo.currentText()
        if not name:
            raise LabelError("no nuclei layer to render: open the demo tile or paint on a new canvas (Nuclei editor)")
        from ..nuclei import type_map_from

        layer = self.viewer.layers[name]
        inst_map = np.array(layer.data, dtype=np.int32)
        if inst_map.ndim != 2:
            raise LabelError(f"layer {name!r} is {inst_map.ndim}-D; render one 2-D label map")
        scheme = scheme_of(layer)
        types = types_from_features(layer.features, int(inst_map.max(initial=0)) + 1)
        scheme.check_classes(types, source=f"layer {name!r}")
        return layer, inst_map, type_map_from(inst_map, types), scheme

    def _image(self, shape: tuple[int, int]) -> Any:
        name = self.image_combo.currentText()
        if not name:
            raise LabelError("this mode starts from an image: add or choose an RGB image layer")
        layer = self.viewer.layers[name]
        image = np.asarray(layer.data)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise LabelError(f"image {name!r} must be an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        if image.shape[:2] != shape:
            raise LabelError(f"image {name!r} is {image.shape[:2]} but the label map is {shape}; they must match")
        return layer, image

    def _visible_window(self, layer: Any, shape: tuple[int, int]) -> tuple[slice, slice]:
        """The part of the map the canvas shows, grown to multiples of 32 px (the network's sizes)."""
        corners = np.asarray(layer.corner_pixels)[:, -2:]
        (y0, x0), (y1, x1) = corners[0], corners[1] + 1
        y0, x0 = max(0, int(y0) // 32 * 32), max(0, int(x0) // 32 * 32)
        y1, x1 = min(shape[0], -(-int(y1) // 32) * 32), min(shape[1], -(-int(x1) // 32) * 32)
        if y1 - y0 < 32 or x1 - x0 < 32:
            raise LabelError("the visible part of the map is too small to render: zoom out, or render the whole map")
        return slice(y0, y1), slice(x0, x1)

    def request(self) -> Request:
        """The run the current settings describe (validated on the main thread)."""
        layer, inst_map, type_map, scheme = self._labels()
        window = (slice(None), slice(None))
        if REGIONS[self.region.currentText()] == "visible":
            window = self._visible_window(layer, inst_map.shape)
        full_shape = inst_map.shape
        inst_map, type_map = inst_map[window], type_map[window]
        from ..nuclei import changed_mask

        mode = self.mode()
        image = mask = None
        image_name = None
        if mode != "noise":
            image_layer, image = self._image(full_shape)
            image = image[window]
            image_name = image_layer.name
            if mode == "edited":
                info = info_of(image_layer)
                if info.get("inst_map") is None or info.get("type_map") is None:
                    raise LabelError(
                        f"image {image_name!r} does not record the label map it shows, so edits cannot be found; "
                        "use 'from my image' or render it here first"
                    )
                if np.shape(info["inst_map"]) != full_shape:
                    raise LabelError(f"image {image_name!r} shows a part of the map only; edit from a render of the whole map")
                mask = changed_mask(info["inst_map"][window], info["type_map"][window], inst_map, type_map, EDIT_MARGIN)
                if not mask.any():
                    raise LabelError(f"no nucleus differs from the labels of {image_name!r}: nothing to re-render")
        return Request(
            model_path=self.picker.path(),
            preset=self.picker.preset(),
            device=self.picker.device(),
            precision=self.picker.precision(),
            inst_map=inst_map,
            type_map=type_map,
            scheme=scheme,
            sampler=self.sampler_combo.currentText(),
            steps=self.steps.value(),
            guidance=self.guidance.value(),
            seed=self.seed.value(),
            mode=mode,
            strength=self.strength.value() if mode == "sdedit" else None,
            image=image,
            image_name=image_name,
            mask=mask,
            tile=self.tile.value() or None,
            labels_name=layer.name,
            extra={"origin": (window[0].start or 0, window[1].start or 0), "full_shape": full_shape},
        )

    # -- the run ------------------------------------------------------------------------------------
    def _job(self, req: Request):
        from ..model.samplers import preview
        from ..render import RenderJob

        if not self._imported.is_set():
            yield JobEvent("status", message="loading the renderer…")
            self._imported.wait()
        yield JobEvent("status", message=f"loading model {req.model_path.name}…")
        loaded = self.renderer.load(req.model_path, req.device, req.precision, req.preset)
        yield JobEvent("status", message="preparing the label map…")
        job = RenderJob(
            inst_map=req.inst_map, type_map=req.type_map, scheme=req.scheme, sampler=req.sampler, steps=req.steps,
            guidance=req.guidance, seed=req.seed, mode=req.mode, strength=req.strength, image=req.image,
            image_name=req.image_name, mask=req.mask, tile=req.tile, labels_name=req.labels_name,
        )
        run = self.renderer.start(loaded, job, should_stop=self._stop.is_set)
        what = "cached model" if loaded.reused else "model loaded"
        yield JobEvent("status", message=f"{what}; label map {'unchanged, SPADE features reused' if run.reused_spade else 'encoded'}")
        start = time.perf_counter()
        shown = -math.inf
        early_shown = False
        steps = run.steps()
        while True:
            try:
                record = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            picture = None
            now = time.perf_counter()
            # After the early half-resolution look (step 0), the first third of the steps' own
            # estimates are noisier than it (the demo model's x0 estimate is noise down to t ~ 700):
            # keep it on screen until they are worth showing.
            early_kept = early_shown and record.step <= record.total // 3
            if record.step == 0:
                early_shown = True
            if record.step == 0 or (not early_kept and self._preview_taken.is_set() and now - shown >= PREVIEW_INTERVAL
                                    and not record.done):
                self._preview_taken.clear()
                shown = now
                picture = preview(record, max_side=PREVIEW_SIDE)
                self._painted.clear()
            yield JobEvent("preview", record.step, record.total, step=record.step, steps=record.total,
                           elapsed=time.perf_counter() - start, preview=picture)
            if picture is not None and self._pace:
                # The next network pass waits for the window to repaint this preview: the
                # repaint then has the cores to itself instead of sharing them with the render's
                # threads (half the stall; costs the render one repaint per preview).
                self._painted.wait(PAINT_WAIT)
        return result  # render.Rendered; None when stopped within a step

    def generate(self, *, block: bool = False) -> Any:
        """Start rendering (``block=True`` or DIFFMIX_NAPARI_NOTHREADS=1: synchronously)."""
        self._check_idle()
        req = self.request()
        self._stop.clear()
        self.previews_shown = 0
        self._preview_taken.set()
        self._pace = threads_enabled() and not block
        self.progress.setRange(0, req.steps)
        self.progress.setValue(0)
        self.progress.setFormat("loading model…")
        self._make_preview_layer(req)
        return self._start_job(
            lambda: self._job(req),
            on_yield=self._on_yield,
            on_return=lambda result: self._on_result(result, req),
            on_finish=lambda: self._on_finish(block),
            block=block,
        )

    def _make_preview_layer(self, req: Request) -> None:
        h, w = req.inst_map.shape
        base = req.image if req.image is not None else np.full((h, w, 3), 255, np.uint8)
        stride = max(1, math.ceil(max(h, w) / PREVIEW_SIDE))
        self.preview_layer = self.viewer.add_image(
            np.array(base[::stride, ::stride]), name="rendering…", rgb=True, scale=(stride, stride),
            translate=req.extra.get("origin", (0, 0)), metadata={KEY: {"role": "preview"}},
        )

    def _on_yield(self, event: JobEvent) -> None:
        if event.kind == "status":
            self.status.setText(event.message)
            self.progress.setFormat(event.message)
            return
        layer = self.preview_layer
        if event.preview is not None and layer is not None:
            if layer.data.shape == event.preview.shape:
                # In place, and only the displayed data: a new array (layer.data = ...) or a full
                # refresh also recomputes the extent (the viewer's dims), the thumbnail and the
                # highlight, none of which a new preview of the same size changes. The thumbnail
                # follows with the result.
                layer.data[...] = event.preview
                layer.refresh(thumbnail=False, extent=False, highlight=False)
            else:
                layer.data = event.preview
            self.previews_shown += 1
            self._after_repaint(self._painted.set)
        self._preview_taken.set()
        if event.step == 0:  # the early half-resolution estimate, before the first step
            show_progress(self.progress, 0, event.steps, f"first look · step 1/{event.steps} running")
            return
        eta = event.elapsed / event.step * (event.steps - event.step)
        show_progress(self.progress, event.step, event.steps, f"step {event.step}/{event.steps} · ETA {eta:.0f} s")

    def _after_repaint(self, callback: Any) -> None:
        """``callback()`` once the window has repainted (at once when it shows nothing)."""
        window = self.window()
        if not window.isVisible() or window is self or not self.preview_layer.visible:
            callback()
            return
        if self._paint_watch is None or self._paint_watch.parent() is not window:
            self._paint_watch = AfterRepaint(window)
        self._paint_watch.add(callback)

    def cancel(self) -> None:
        """Stop the running render within its current step; nothing is added."""
        self._stop.set()
        super().cancel()

    def _on_result(self, result: Rendered | None, req: Request) -> None:
        if result is None:
            return
        p = result.provenance
        settings = f"seed {p['seed']}, {p['sampler']} × {p['steps']} steps, guidance {p['guidance']:g}"
        if req.mode == "sdedit":
            settings += f", from {req.image_name} at strength {req.strength:g}"
        elif req.mode == "edited":
            settings += f", edit of {req.image_name}"
        if req.inst_map.shape != req.extra.get("full_shape", req.inst_map.shape):
            settings += f", region at {tuple(req.extra['origin'])}"
        self.renders += 1
        name = f"render {self.renders}"
        meta = {KEY: {"role": "image", "inst_map": req.inst_map, "type_map": req.type_map, "provenance": p,
                      "description": settings}}
        # The preview layer becomes the result: creating a layer is what would stall the event loop.
        layer, self.preview_layer = self.preview_layer, None
        layer.data = result.image
        layer.scale = (1, 1)
        layer.metadata = meta
        layer.name = name
        self._below_nuclei(layer)
        self.last_result = layer
        self._refresh_layers()
        # The next edit or SDEdit starts from this render, not from the first image (chosen once
        # here, so a later choice of the user survives layers coming and going).
        self.image_combo.setCurrentText(name)
        reused = " (cached model" + (", SPADE features reused)" if p["reused_spade"] else ")") if p["reused_model"] else ""
        self.status.setText(f"{name} done in {p['seconds']:.1f} s on {p['device']}{reused}: {settings}")

    def _below_nuclei(self, layer: Any) -> None:
        """Put a render under the label layers, so the nuclei outlines stay visible on it."""
        from napari.layers import Labels

        layers = self.viewer.layers
        labels = [i for i, l in enumerate(layers) if isinstance(l, Labels)]
        here = layers.index(layer)
        if labels and min(labels) < here:
            layers.move(here, min(labels))

    def _on_finish(self, block: bool = False) -> None:
        if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self.preview_layer)
        self.preview_layer = None
        rendered = self.last_result is not None and self.last_result.name == f"render {self.renders}"
        if self._job_finished():  # cancelled: nothing is added
            self.status.setText("cancelled")
            self.progress.setFormat("cancelled")
        elif self.check_after.isChecked() and rendered and self._checked_renders < self.renders:
            self._checked_renders = self.renders
            user_errors(self.check)(self.last_result.name, block=block)

    # -- the check ----------------------------------------------------------------------------------
    _checked_renders = 0

    def _browse_seg_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Segmentation model folder (diffmix train-seg)")
        if path:
            self.set_seg_model(path)

    def set_seg_model(self, path: str | os.PathLike) -> None:
        """Choose the check's segmentation model folder (added to the list)."""
        path = str(path)
        if self.seg_combo.findText(path) < 0:
            self.seg_combo.addItem(path)
        self.seg_combo.setCurrentText(path)

    def check(self, image_name: str | None = None, *, block: bool = False) -> Any:
        """Find the nuclei of an image (default: the one chosen under Image) with the segmentation
        model, in a worker, and show what became of each nucleus of the label map it depicts."""
        self._check_idle()
        name = image_name or self.image_combo.currentText()
        if not name:
            raise LabelError("nothing to check: render an image first")
        layer = self.viewer.layers[name]
        info = info_of(layer)
        if info.get("inst_map") is None or info.get("type_map") is None:
            raise LabelError(f"image {name!r} does not record the label map it shows, so its nuclei cannot be checked")
        image = np.asarray(layer.data)
        inst_map, type_map = np.asarray(info["inst_map"]), np.asarray(info["type_map"])
        if image.shape[:2] != inst_map.shape:
            raise LabelError(f"image {name!r} is {image.shape[:2]} but its label map {inst_map.shape}")
        choice = self.seg_combo.currentText()
        model = "demo" if choice == SEG_DEMO else choice
        labels_scheme = None
        if self.labels_combo.currentText():
            labels_scheme = scheme_of(self.viewer.layers[self.labels_combo.currentText()])
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"checking {name}…")
        return self._start_job(
            lambda: self._check_job(name, image, inst_map, type_map, model, labels_scheme),
            on_yield=self._on_yield, on_return=self._show_check, on_finish=self._on_check_finished, block=block,
        )

    def _check_job(self, name, image, inst_map, type_map, model, scheme):
        from ..fidelity import load_scorer

        if not self._imported.is_set():
            yield JobEvent("status", message="loading the renderer…")
            self._imported.wait()
        scorer = self._scorers.get(model)
        if scorer is None:
            yield JobEvent("status", message="loading the segmentation model…")
            scorer = self._scorers[model] = load_scorer(model)
        if scheme is not None and tuple(scheme.names) != scorer.class_names:
            raise LabelError(
                f"the segmentation model finds {list(scorer.class_names)} nuclei but the labels use "
                f"{list(scheme.names)}; choose a model of that class scheme under Advanced (Check with)"
            )
        yield JobEvent("status", message=f"finding the nuclei of {name}…")
        check = scorer.check(image, inst_map, type_map)
        return Checked(name, inst_map, check, scorer.info.path.name)

    def _show_check(self, result: Checked) -> None:
        """Two layers over the image: the predicted nuclei's outlines, and the painted nuclei
        coloured by what became of them; a second check of the same image replaces them."""
        from napari.utils.colormaps import DirectLabelColormap

        from .._layers import outline_colormap, rgba

        check, name = result.check, result.image_name
        colours = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        colours.update({code: rgba(hex_colour) for code, (hex_colour, _) in CHECK_COLOURS.items()})
        found_name, check_name = f"{name} · nuclei found", f"{name} · check"
        image_layer = self.viewer.layers[name]
        place = {"translate": image_layer.translate, "scale": image_layer.scale}
        for layer_name, data, kwargs in (
            (check_name, check.outcome_map(result.inst_map),
             {"colormap": DirectLabelColormap(color_dict=colours), "opacity": 0.85}),
            (found_name, check.pred_inst.astype(np.int32),
             {"colormap": outline_colormap({}), "opacity": 1.0}),
        ):
            meta = {KEY: {"role": "check", "image": name}}
            if layer_name in self.viewer.layers:
                self.viewer.layers[layer_name].data = data
            else:
                layer = self.viewer.add_labels(data, name=layer_name, metadata=meta, **kwargs, **place)
                layer.editable = False
                if layer_name == found_name:
                    layer.contour = 1  # outlines: the painted nuclei's colours stay visible inside
        counts = check.counts()
        words = ", ".join(f"{counts[code]} {OUTCOMES_SHORT[code]} ({colour})" for code, (_, colour) in CHECK_COLOURS.items())
        text = (f"{name} checked with {result.model}: of {check.ids.size} painted nuclei {words}; "
                f"{int(np.unique(check.pred_inst).size - (check.pred_inst == 0).any())} nuclei found in all (white outlines)")
        self.last_check = result
        self.status.setText(text)
        self.progress.setRange(0, 1)
        show_progress(self.progress, 1, 1, "checked")

    def _on_check_finished(self) -> None:
        if self._job_finished():
            self.status.setText("check cancelled")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt)
        self.cancel()
        self.viewer.bind_key(GENERATE_KEY, None, overwrite=True)
        super().closeEvent(event)
