"""Model, device and precision choice shared by the Generate and Batch export widgets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton, QWidget

from ..errors import CheckpointError
from ..runtime import PRECISIONS

BUNDLED = "bundled demo model"
# The bundled 4-step student of the demo model (resources/models/demo/fast/, README: Distillation).
FAST = "demo model (fast)"
# The student: it passes the teacher's acceptance, off-stain pixels included, on the held-out
# windows and on whole 64 and 256 px canvases (its card), in 4 network passes against 30
# (README, 3b). The teacher is one choice away.
DEFAULT_MODEL = FAST
DEVICES = {"auto": "auto", "CPU": "cpu", "CUDA": "cuda", "MPS": "mps"}


class ModelPicker(QWidget):
    """Model file (a bundled demo model by default, any native ``.safetensors`` or official ``.pt``), its
    architecture for official files, the device and the network precision. ``changed`` fires with
    the model's info (or None).

    ``advanced``: a form (the dock's "Advanced" section) that takes the architecture, device and
    precision rows, so the first screen shows only the model and what it is.

    ``deferred``: leave the architecture list empty until :meth:`load_presets` (it imports torch,
    seconds of a frozen window when done on the main thread while a dock opens); a widget that
    imports torch in the background calls it once that is done, and chooses its model then.
    """

    changed = Signal(object)

    def __init__(self, parent: QWidget | None = None, advanced: QFormLayout | None = None, deferred: bool = False):
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.addItems([BUNDLED, FAST])
        self.combo.setCurrentText(DEFAULT_MODEL)
        self.combo.setToolTip("A napari-diffmix .safetensors model or an official DiffMix/SDM .pt checkpoint")
        self.combo.currentIndexChanged.connect(lambda *_: self._on_changed())
        browse = QPushButton("Browse…")
        browse.setToolTip("Choose a model file (.safetensors, .pt); nothing is downloaded")
        browse.clicked.connect(lambda *_: self._browse())
        row = QHBoxLayout()
        row.addWidget(self.combo, 1)
        row.addWidget(browse)
        form.addRow("Model", row)
        self.preset_combo = QComboBox()
        self.preset_combo.setToolTip("Architecture of an official .pt checkpoint (it carries no configuration)")
        self.info_label = QLabel()
        self.info_label.setWordWrap(True)
        # A wrapped label's minimum is one line: in a full dock Qt squeezed the two-line model
        # summary into one, clipping both lines.
        self.info_label.setMinimumHeight(2 * self.info_label.fontMetrics().lineSpacing() + 2)
        form.addRow(self.info_label)
        extra = form if advanced is None else advanced
        extra.addRow("Architecture (.pt)", self.preset_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setToolTip("auto: CUDA, else Apple MPS, else CPU")
        extra.addRow("Device", self.device_combo)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(list(PRECISIONS))
        self.precision_combo.setToolTip(
            "auto: bf16 where the hardware has it (GPUs, CPUs with avx512_bf16/AMX; about 1.5x faster, within a few "
            "grey levels of fp32), fp16 on older GPUs, else fp32. fp32: the same image on any hardware"
        )
        extra.addRow("Precision", self.precision_combo)
        self.info: Any = None
        if not deferred:
            self.load_presets()

    def load_presets(self) -> None:
        """Fill the architecture list (imports torch: off the main thread first where that matters)."""
        if self.preset_combo.count():
            return
        from ..model.unet import UNetConfig

        self.preset_combo.addItems(list(UNetConfig.preset_names()))

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model", "", "Models (*.safetensors *.pt *.pth);;All files (*)")
        if path:
            self.set_model(path)

    def set_model(self, path: str | os.PathLike, preset: str | None = None) -> None:
        """Choose a model file (added to the list); ``preset`` for official .pt files."""
        path = str(path)
        index = self.combo.findText(path)
        if index < 0:
            self.combo.addItem(path)
            index = self.combo.count() - 1
        if preset is not None:
            self.preset_combo.setCurrentText(preset)
        if index == self.combo.currentIndex():
            self._on_changed()
        else:
            self.combo.setCurrentIndex(index)  # -> _on_changed

    def path(self) -> Path:
        choice = self.combo.currentText()
        if choice in (BUNDLED, FAST):
            from ..model.checkpoint import BUNDLED_STUDENT_DIR, require_bundled_model

            return require_bundled_model("choose a model file with Browse…", BUNDLED_STUDENT_DIR if choice == FAST else None)
        return Path(choice)

    def is_native(self, path: Path | None = None) -> bool:
        return (path or self.path()).suffix.lower() == ".safetensors"

    def preset(self) -> str | None:
        """The preset of an official checkpoint (None for native models, which carry their config)."""
        return None if self.is_native() else self.preset_combo.currentText()

    def device(self) -> str:
        return DEVICES[self.device_combo.currentText()]

    def precision(self) -> str:
        return self.precision_combo.currentText()

    def _on_changed(self) -> None:
        self.info = None
        self.info_label.setToolTip("")
        self.preset_combo.setEnabled(False)
        try:
            path = self.path()
            if not self.is_native(path):
                self.preset_combo.setEnabled(True)
                self.info_label.setText(f"{path.name}: official checkpoint; choose its architecture (Advanced)")
            else:
                from ..model.checkpoint import read_info

                info = read_info(path)
                kind = f"{info.summary()}; " if info.distilled else ""
                # A student's own crops (its last stage's) are what it learned on, not its teacher's.
                d = info.distilled or {}
                sizes = d.get("crop_cycle") or [d.get("crop_size", info.config.image_size)]
                self.info_label.setText(
                    f"{path.name}: {kind}draws {', '.join(info.scheme.names)} nuclei; "
                    f"learned on {' and '.join(str(s) for s in sizes)} px patches"
                )
                tip = f"class scheme {info.scheme.name!r}, default guidance {info.default_guidance:g}"
                if info.distilled:
                    d = info.distilled
                    tip = (f"class scheme {info.scheme.name!r}; renders in {d['steps']} steps of {d['sampler']}, one network "
                           f"pass each, with its teacher's guidance {d['guidance']:g} folded in (teacher: {d.get('teacher', '?')})")
                self.info_label.setToolTip(tip)
                self.info = info
        except CheckpointError as exc:  # shown here; running reports it again as a notification
            self.info_label.setText(str(exc))
        self.changed.emit(self.info)
