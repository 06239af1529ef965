"""Sampler controls shared by the Generate and Batch export widgets: one set of ranges and defaults."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox

def sampler_controls(deferred: bool = False) -> tuple[QComboBox, QSpinBox]:
    """The solver and its respaced steps, both defaulting to the samplers' fast settings.

    ``deferred``: empty until :func:`fill_sampler_controls` (the sampler module imports torch,
    which froze the window for seconds when a dock opened); otherwise filled now."""
    combo = QComboBox()
    combo.setToolTip("dpm++2m / unipc: good images in ~20 steps; ddim: DiffMix's published sampler")
    steps = QSpinBox()
    steps.setRange(2, 1000)
    steps.setToolTip("Respaced steps of the whole schedule")
    if not deferred:
        fill_sampler_controls(combo, steps)
    return combo, steps


def fill_sampler_controls(combo: QComboBox, steps: QSpinBox, strength: QDoubleSpinBox | None = None) -> None:
    """Give the controls their choices and defaults from the sampler module (imports torch)."""
    from ..model.samplers import FAST_SETTINGS, SAMPLERS

    combo.addItems(list(SAMPLERS))
    combo.setCurrentText(FAST_SETTINGS["sampler"])
    steps.setValue(FAST_SETTINGS["steps"])
    if strength is not None:
        _strength_default(strength)


def strength_spin(tooltip: str, deferred: bool = False) -> QDoubleSpinBox:
    """SDEdit strength in (0, 1], DiffMix's published value by default (``deferred``: set by
    :func:`fill_sampler_controls`)."""
    spin = QDoubleSpinBox()
    spin.setRange(0.05, 1.0)
    spin.setSingleStep(0.05)
    spin.setToolTip(tooltip)
    if not deferred:
        _strength_default(spin)
    return spin


def _strength_default(spin: QDoubleSpinBox) -> None:
    from ..model.samplers import DIFFMIX_SETTINGS

    spin.setValue(DIFFMIX_SETTINGS["strength"])
    spin.setToolTip(f"{spin.toolTip()} (DiffMix: {DIFFMIX_SETTINGS['strength']})")


def seed_spin() -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(0, 2**31 - 1)
    spin.setValue(0)
    spin.setToolTip("Same seed and settings give the same images")
    return spin
