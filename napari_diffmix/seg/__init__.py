"""Downstream nuclei segmentation and classification: a compact HoVer-Net.

``model`` (architecture + config), ``targets`` (NP/HV/TP targets), ``loss`` (HoVer-Net's
loss), ``postprocess`` (marker-controlled watershed), ``train`` (training loop),
``predict`` (sliding-window inference), ``checkpoint`` (model folders) and ``data``
(synthetic store reader). Import the submodules; this package imports nothing heavy.
"""
