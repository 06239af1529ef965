"""Batch export dock widget: the napari face of ``diffmix synthesize``.

Pick a dataset (and its class scheme), a model, what to balance and how many patches, and the
output store. The widget plans with :func:`napari_diffmix.mixing.plan_balanced_set` and runs
:class:`napari_diffmix.synthesize.SynthesisJob` (its event generator) in a thread worker:
progress in items with items/s and ETA, Cancel between denoising steps (the store keeps every
finished batch), and running the same settings again resumes where it stopped. A finished
store opens in the viewer through this plugin's reader.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..classes import BUILTIN_SCHEMES
from ..errors import DiffMixError
from ..progress import JobEvent
from ._layout import Collapsible, DockTab, scroll_body
from ._model_picker import BUNDLED, ModelPicker
from ._notify import user_errors
from ._sampling import sampler_controls, seed_spin, strength_spin
from ._workers import JobWidget, show_progress

DATASET_SCHEME = "the dataset's"
MAPS = {
    "add rare nuclei, or shift nuclei": ["balance", "enlarge"],
    "add rare nuclei": ["balance"],
    "shift nuclei": ["enlarge"],
    "add rare nuclei and shift nuclei": ["balance+enlarge"],
}
OVERWRITE = "replace a store made with other settings"
RESUME_ONLY = "only resume (error if there is no store)"


@dataclass
class PlanCheck:
    """What planning produced: the plan, and how many of the label maps checked came out unchanged."""

    plan: Any
    unchanged: int
    checked: int


class BatchExportWidget(DockTab, JobWidget, QWidget):
    """Plan and render a class-balanced synthetic set into a resumable zarr store."""

    busy_message = "an export is already running; cancel it first"
    cli_words = (
        ("pass --overwrite to replace it", f"tick '{OVERWRITE}' to replace it"),
        ("run without --resume to start it", f"untick '{RESUME_ONLY}' (Advanced) to start it"),
        ("--overwrite", f"'{OVERWRITE}'"),
        ("another --out", "another output folder"),
    )

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: Any = None
        self.plan: Any = None
        self.unchanged = (0, 0)  # (unchanged, checked) label maps of the last plan
        from ..render import Renderer

        self.renderer = Renderer()  # keeps the model loaded from one export to the next
        self._build()
        self.picker.changed.connect(self._on_model_changed)
        self.picker.set_model(BUNDLED)

    def _on_model_changed(self, info: Any) -> None:
        if info is not None:  # a distilled student renders only with its own sampler and steps
            own = info.default_sampling()
            self.sampler_combo.setCurrentText(own["sampler"])
            self.steps.setValue(own["steps"])

    # -- layout --------------------------------------------------------------------------------------
    def _build(self) -> None:
        root = scroll_body(self)
        advanced = Collapsible("Advanced", "Classes, patch grid, sampler, seed, device and precision")
        adv = QFormLayout()
        advanced.body.addLayout(adv)

        data = QGroupBox("Dataset")
        form = QFormLayout(data)
        self.dataset_edit = QLineEdit("demo")
        self.dataset_edit.setToolTip("A CoNSeP/GLySAC folder (e.g. CoNSeP/Train), a generic or PanNuke folder, or 'demo'")
        browse = QPushButton("Browse…")
        browse.setToolTip("Choose the folder of the labelled tiles to balance")
        browse.clicked.connect(lambda *_: self._browse_dataset())
        row = QHBoxLayout()
        row.addWidget(self.dataset_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        root.addWidget(data)

        model = QGroupBox("Model")
        layout = QVBoxLayout(model)
        self.picker = ModelPicker(advanced=adv)
        layout.addWidget(self.picker)
        root.addWidget(model)

        plan = QGroupBox("What to make")
        form = QFormLayout(plan)
        self.maps_combo = QComboBox()
        self.maps_combo.addItems(list(MAPS))
        # Long choices must not set the dock's width: the combo elides them (the list shows them whole).
        self.maps_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.maps_combo.setMinimumContentsLength(14)
        self.maps_combo.setToolTip(
            "Add rare nuclei: common-class nuclei are replaced by real rare-class nuclei (DiffMix's balancing map). "
            "Shift nuclei: inner nuclei move a few pixels (DiffMix's enlarging map)."
        )
        form.addRow("Patches that", self.maps_combo)
        goal = QVBoxLayout()
        self.goal_patches = QRadioButton("this many patches")
        self.goal_patches.setToolTip("Make a fixed number of synthetic patches")
        self.goal_share = QRadioButton("until every class is at least")
        self.goal_share.setToolTip("Add patches until the rarest class reaches this share of all nuclei (or the plan runs out)")
        self.goal_grid = QRadioButton("as many as the original patches")
        self.goal_grid.setToolTip("One synthetic patch per original patch of the grid: the set doubles")
        self.goal_patches.setChecked(True)
        self.patches = QSpinBox()
        self.patches.setRange(1, 1_000_000)
        self.patches.setValue(16)
        self.patches.setToolTip("Number of synthetic patches")
        self.share = QDoubleSpinBox()
        self.share.setRange(0.5, 100)
        self.share.setValue(15)
        self.share.setDecimals(1)
        self.share.setSuffix(" %")
        self.share.setToolTip("Share of all nuclei (%) every class should hold in the original + synthetic set")
        for spin in (self.patches, self.share):
            spin.setMaximumWidth(110)
        for button, spin in ((self.goal_patches, self.patches), (self.goal_share, self.share), (self.goal_grid, None)):
            row = QHBoxLayout()
            row.addWidget(button)
            if spin is not None:
                row.addWidget(spin)
            goal.addLayout(row)
        form.addRow("How many", goal)
        root.addWidget(plan)

        store = QGroupBox("Save to")
        form = QFormLayout(store)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("synthetic.zarr")
        self.out_edit.setToolTip("The store to write (a .zarr folder); the same settings again continue a stopped run")
        browse = QPushButton("Browse…")
        browse.setToolTip("Choose where to save the synthetic set")
        browse.clicked.connect(lambda *_: self._browse_out())
        row = QHBoxLayout()
        row.addWidget(self.out_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.overwrite = QCheckBox(OVERWRITE)
        self.overwrite.setToolTip("A store made with other settings is deleted and made again (never a folder this tool did not make)")
        self.open_when_done = QCheckBox("open the store when finished")
        self.open_when_done.setToolTip("Show the synthetic patches and their nuclei in the viewer at the end")
        self.open_when_done.setChecked(True)
        for box in (self.overwrite, self.open_when_done):
            form.addRow(box)
        root.addWidget(store)

        row = QHBoxLayout()
        self.plan_button = QPushButton("Plan")
        self.plan_button.setToolTip("Check the inputs and show the plan (nothing is written)")
        self.plan_button.clicked.connect(lambda *_: user_errors(self.start)(dry_run=True))
        self.start_button = QPushButton("Start / resume")
        self.start_button.setToolTip("Render the plan into the store; the same settings again continue a stopped run")
        self.start_button.clicked.connect(lambda *_: user_errors(self.start)())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current denoising step; finished batches stay in the store")
        self.cancel_button.clicked.connect(lambda *_: self.cancel())
        for b in (self.plan_button, self.start_button, self.cancel_button):
            row.addWidget(b)
        root.addLayout(row)
        self._add_job_status(root)
        # A table: no wrapping (it would break its columns), a few lines high, scrolling.
        self.plan_view = QPlainTextEdit()
        self.plan_view.setReadOnly(True)
        self.plan_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.plan_view.setStyleSheet("font-family: monospace")
        self.plan_view.setFixedHeight(9 * self.plan_view.fontMetrics().lineSpacing())
        self.plan_view.setToolTip("Nuclei per class: original patches, planned synthetic patches and both together")
        self.plan_view.setVisible(False)
        root.addWidget(self.plan_view)

        self.scheme_combo = QComboBox()
        self.scheme_combo.addItems([DATASET_SCHEME, *BUILTIN_SCHEMES])
        self.scheme_combo.setToolTip("The classes the labels are read with (default: the folder's scheme.json)")
        adv.addRow("Classes", self.scheme_combo)
        self.patch_size = QSpinBox()
        self.patch_size.setRange(16, 4096)
        self.patch_size.setValue(256)
        self.patch_size.setSuffix(" px")
        self.patch_size.setToolTip("Side of each synthetic patch (DiffMix: 256 px)")
        self.stride = QSpinBox()
        self.stride.setRange(1, 4096)
        self.stride.setValue(76)
        self.stride.setSuffix(" px")
        self.stride.setToolTip("Step between the patches cut from each tile (DiffMix: 76 px, a 10 x 10 grid on 1000 px tiles)")
        row = QHBoxLayout()
        row.addWidget(self.patch_size)
        row.addWidget(QLabel("step"))
        row.addWidget(self.stride)
        adv.addRow("Patch size", row)
        self.sampler_combo, self.steps = sampler_controls()
        row = QHBoxLayout()
        row.addWidget(self.sampler_combo)
        row.addWidget(QLabel("steps"))
        row.addWidget(self.steps)
        adv.addRow("Sampler", row)
        self.from_noise = QCheckBox("from noise (default: start from the original patch, noised part way)")
        self.from_noise.setToolTip("Render from pure noise instead of DiffMix's SDEdit start from the original patch")
        adv.addRow(self.from_noise)
        self.strength = strength_spin("How far the original patch is noised before rendering")
        adv.addRow("Strength", self.strength)
        self.from_noise.toggled.connect(lambda on: self.strength.setEnabled(not on))
        self.seed = seed_spin()
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(8)
        self.batch.setToolTip("Items rendered together (memory grows with it)")
        row = QHBoxLayout()
        row.addWidget(self.seed)
        row.addWidget(QLabel("batch"))
        row.addWidget(self.batch)
        adv.addRow("Seed", row)
        self.resume_only = QCheckBox(RESUME_ONLY)
        self.resume_only.setToolTip("Continue the store in the folder; never start a new one")
        adv.addRow(self.resume_only)
        self.advanced = advanced
        root.addWidget(advanced)
        root.addStretch(1)
        self._update_enabled()

    def _browse_dataset(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path:
            self.dataset_edit.setText(path)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Output store", "synthetic.zarr", "zarr store (*.zarr)")
        if path:
            self.out_edit.setText(path)

    def _update_enabled(self) -> None:
        self.start_button.setEnabled(not self._running)
        self.plan_button.setEnabled(not self._running)
        self.cancel_button.setEnabled(self._running)

    # -- the job ------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The choices, read on the main thread."""
        from ..mixing import PlanSpec

        out = self.out_edit.text().strip()
        if not out:
            raise DiffMixError("choose an output store folder (e.g. synthetic.zarr)")
        scheme = self.scheme_combo.currentText()
        return {
            "dataset": self.dataset_edit.text().strip() or "demo",
            "scheme": None if scheme == DATASET_SCHEME else scheme,
            "model": self.picker.path(),
            "preset": self.picker.preset(),
            "device": self.picker.device(),
            "precision": self.picker.precision(),
            "plan": PlanSpec(
                patches=self.patches.value() if self.goal_patches.isChecked() else None,
                target_share=self.share.value() if self.goal_share.isChecked() else None,
                maps=tuple(MAPS[self.maps_combo.currentText()]), patch_size=self.patch_size.value(),
                stride=self.stride.value(), seed=self.seed.value(),
            ),
            "sampler": self.sampler_combo.currentText(),
            "steps": self.steps.value(),
            "init": "noise" if self.from_noise.isChecked() else "original",
            "strength": self.strength.value(),
            "seed": self.seed.value(),
            "batch_size": self.batch.value(),
            "out": Path(out),
            "overwrite": self.overwrite.isChecked(),
            "resume": self.resume_only.isChecked(),
        }

    def _job(self, s: dict[str, Any], dry_run: bool):
        from ..datasets import open_dataset
        from ..mixing import MixCache, plan_balanced_set, unchanged_items
        from ..synthesize import SynthesisConfig, SynthesisJob

        yield JobEvent("status", message=f"opening {s['dataset']}…")
        dataset = open_dataset(s["dataset"], s["scheme"])
        cache = MixCache(dataset)
        yield JobEvent("status", message=f"planning on {len(dataset)} tile(s)…")
        plan = plan_balanced_set(dataset, s["plan"], cache=cache)
        yield JobEvent("status", message="checking the planned label maps…")
        unchanged, checked = unchanged_items(plan, dataset, cache=cache)
        yield JobEvent("status", message=f"planned {len(plan)} patch(es)", data=PlanCheck(plan, unchanged, checked))
        config = SynthesisConfig(
            sampler=s["sampler"], steps=s["steps"], init=s["init"], strength=s["strength"], seed=s["seed"],
            batch_size=s["batch_size"], device=s["device"], precision=s["precision"],
        )
        job = SynthesisJob(
            dataset, plan, s["model"], s["out"], config, overwrite=s["overwrite"], resume=s["resume"],
            created_by="napari-diffmix batch export", cache=cache, preset=s["preset"], renderer=self.renderer,
        )
        if dry_run:
            return ("dry-run", job)
        yield from job.events()
        return ("finished", job)

    def start(self, dry_run: bool = False, *, block: bool = False) -> Any:
        """Plan (``dry_run``) or run the export; ``block=True`` or DIFFMIX_NAPARI_NOTHREADS=1 runs it here."""
        self._check_idle()
        s = self.settings()
        self.result = None
        self._rate_start = None
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting…")
        return self._start_job(
            lambda: self._job(s, dry_run), on_yield=self._on_yield, on_return=self._on_return, on_finish=self._on_finish,
            block=block,
        )

    # -- main-thread callbacks -------------------------------------------------------------------------
    def _on_yield(self, event: JobEvent) -> None:
        if event.kind == "status":
            self.status.setText(event.message)
            if isinstance(event.data, PlanCheck):
                self._show_plan(event.data)
            return
        if self._rate_start is None:  # the first event of the rendering: the rate counts from here
            self._rate_start = (time.perf_counter(), event.done)
        t0, done0 = self._rate_start
        rate = (event.done - done0) / max(time.perf_counter() - t0, 1e-9)
        left = event.total - event.done
        eta = f" · ETA {left / rate:.0f} s" if rate > 0 else ""
        step = f" · step {event.step}/{event.steps}" if event.kind == "preview" else ""
        show_progress(self.progress, event.done, event.total, f"{event.done}/{event.total} items · {rate:.2f} items/s{eta}{step}")
        if event.kind == "progress":
            self.status.setText(event.message)

    def _show_plan(self, check: PlanCheck) -> None:
        self.plan = check.plan
        text = check.plan.table()
        if check.unchanged:
            # Such patches only copy an original: the plan should change before any rendering.
            text = (
                f"warning: {check.unchanged} of {check.checked} patches checked come out unchanged (no nucleus replaced "
                "or shifted): they would only copy original patches\n" + text
            )
        self.unchanged = (check.unchanged, check.checked)
        self.plan_view.setPlainText(text)
        self.plan_view.setVisible(True)

    def _on_return(self, value: tuple) -> None:
        kind, job = value
        if kind == "dry-run":
            init = "SDEdit" if job.config.init == "original" else "from noise"
            unchanged, checked = self.unchanged
            same = f"; {unchanged} of {checked} checked come out unchanged" if unchanged else ""
            self.status.setText(
                f"plan of {len(job.plan)} patch(es) checked{same}; {job.config.sampler} × {job.config.steps} steps, "
                f"guidance {job.guidance:g}, {init}; nothing written"
            )
            return
        self.result = result = job.result
        if result.complete:
            if result.rendered:
                self.status.setText(f"done: {result.done} items in {result.store} ({result.rendered} rendered now)")
            else:
                self.status.setText(f"{result.store} is already complete ({result.done} items): nothing to render")
            # Layers of this store already in the viewer would come in twice ("name [1]").
            if self.open_when_done.isChecked() and not self._store_is_open(result.store):
                self.viewer.open(str(result.store), plugin="napari-diffmix")
        else:
            self.status.setText(f"stopped: {result.total - result.done} item(s) left; Start again to resume")

    def _store_is_open(self, store: Path) -> bool:
        target = Path(store).resolve()
        for layer in self.viewer.layers:
            path = getattr(getattr(layer, "source", None), "path", None)
            if path and Path(path).resolve() == target:
                return True
        return False

    def _on_finish(self) -> None:
        self.progress.setRange(0, max(self.progress.maximum(), 1))
        if self._job_finished():  # cancelled between denoising steps
            self.status.setText("cancelled: finished batches are in the store; Start again to resume")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt)
        self.cancel()
        super().closeEvent(event)
