"""The small end-to-end setup that synthesis, fidelity and reliability tests share: the phantom
data set written to disk as a user's dataset and a tiny random model of its scheme."""

from __future__ import annotations

from pathlib import Path

import torch

from napari_diffmix.datasets import Dataset, write_generic
from napari_diffmix.model.checkpoint import save_model
from napari_diffmix.model.unet import SDMUNet, UNetConfig
from napari_diffmix.phantom import make_phantom_dataset


def phantom_and_tiny_model(data_dir: Path, model_file: Path) -> tuple[Dataset, Path]:
    """Two 96 px phantom tiles with every class (CoNSeP scheme) written to ``data_dir``, and a
    32 px SDM UNet with random weights (seed 0, guidance 2) saved to ``model_file``. Returns the
    dataset and the written folder."""
    ds = make_phantom_dataset(2, 96, class_probs=[0.15, 0.45, 0.4], seed=1)
    written = write_generic(ds, data_dir)
    torch.manual_seed(0)
    save_model(SDMUNet(UNetConfig.preset("tiny")), model_file, scheme=ds.scheme, default_guidance=2.0)
    return ds, Path(written)
