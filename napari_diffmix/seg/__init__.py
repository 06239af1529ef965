"""Downstream nuclei segmentation and classification: a compact HoVer-Net.

``model`` (architecture + config), ``targets`` (NP/HV/TP targets), ``loss`` (HoVer-Net's
loss), ``postprocess`` (marker-controlled watershed), ``train`` (training loop),
``predict`` (sliding-window inference), ``checkpoint`` (model folders), ``data``
(synthetic store reader, tile opening) and ``compare`` (baseline vs baseline + synthetic).
Import the submodules; this package imports nothing heavy.
"""
