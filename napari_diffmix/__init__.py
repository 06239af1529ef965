"""napari-diffmix: DiffMix label synthesis, label-conditioned diffusion and export.

The core modules import neither Qt nor napari; the napari faces live in
``napari_diffmix._widgets``, ``_reader``, ``_writer`` and ``_sample_data``.
"""

__version__ = "0.1.0"
