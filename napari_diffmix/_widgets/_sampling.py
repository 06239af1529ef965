"""Sampler controls shared by the Generate and Batch export widgets: one set of ranges and defaults."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QSpinBox

def sampler_controls() -> tuple[QComboBox, QSpinBox]:
    """The solver and its respaced steps, both defaulting to the samplers' fast settings."""
    from ..model.samplers import FAST_SETTINGS, SAMPLERS

    combo = QComboBox()
    combo.addItems(list(SAMPLERS))
    combo.setCurrentText(FAST_SETTINGS["sampler"])
    combo.setToolTip("dpm++2m / unipc: good images in ~20 steps; ddim: DiffMix's published sampler")
    steps = QSpinBox()
    steps.setRange(2, 1000)
    steps.setValue(FAST_SETTINGS["steps"])
    steps.setToolTip("Respaced steps of the whole schedule")
    return combo, steps


def strength_spin(tooltip: str) -> QDoubleSpinBox:
    """SDEdit strength in (0, 1], DiffMix's published value by default."""
    from ..model.samplers import DIFFMIX_SETTINGS

    spin = QDoubleSpinBox()
    spin.setRange(0.05, 1.0)
    spin.setSingleStep(0.05)
    spin.setValue(DIFFMIX_SETTINGS["strength"])
    spin.setToolTip(f"{tooltip} (DiffMix: {DIFFMIX_SETTINGS['strength']})")
    return spin


def seed_spin() -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(0, 2**31 - 1)
    spin.setValue(0)
    spin.setToolTip("Same seed and settings give the same images")
    return spin
