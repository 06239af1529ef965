"""napari-diffmix: DiffMix label synthesis, label-conditioned diffusion and export.

The core modules import neither Qt nor napari; the napari faces live in
``napari_diffmix._widgets``, ``_reader``, ``_writer`` and ``_sample_data``.
"""

import os
import sys

__version__ = "0.1.0"

# torch's OpenMP threads (libgomp) spin while they wait for each other. When other work holds a
# core, the spinning threads starve the one they wait for: on 2 cores with one other busy
# process, a 256 px step took 1.5x longer with 2 threads than with 1; with passive waiters 2
# threads were faster than 1 (README, Performance; render.cpu_threads).
# libgomp reads the policy once, when torch loads it, so it is set here, before any module of
# ours imports torch; a user's value wins. OMP_PASSIVE: whether it is in effect (False also
# when torch was loaded before us).
OMP_PASSIVE = "torch" not in sys.modules and os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE").upper() == "PASSIVE"
