"""Training the downstream HoVer-Net on a dataset, optionally enlarged by a synthetic store.

Random crops with the 8 flip/rotation symmetries (the diffusion trainer's
:class:`~napari_diffmix.train.CropStream`: every pixel of every tile equally likely, so a
1000x1000 tile weighs as much as ~15 synthetic 256 px patches), HoVer-Net targets computed
per crop, AdamW, a fixed seed, a progress bar and atomic checkpoints. Under ``torchrun``
(WORLD_SIZE > 1) each process trains a DistributedDataParallel replica on its own crop
stream (gloo on CPU, NCCL on GPUs); the batch size is per process and rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..classes import ClassScheme, load_scheme
from ..errors import DatasetError, LabelError
from ..progress import progress_bar
from .checkpoint import check_output_dir, save_seg_model
from .data import SyntheticItems, open_synthetic_store
from .loss import LossWeights, hovernet_loss
from .model import HoVerNet, SegConfig
from .targets import seg_targets


@dataclass
class SegTrainConfig:
    steps: int = 2000
    batch_size: int = 8
    crop_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 25
    num_threads: int | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)

    def validate(self) -> None:
        from ..train import TrainingError

        for name in ("steps", "batch_size", "crop_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_size < 8:
            raise TrainingError(f"crop_size must be at least 8 px, got {self.crop_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise TrainingError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss_weights"] = self.loss_weights.to_dict()
        return d


@dataclass
class SegTrainResult:
    model: HoVerNet
    steps: int
    interrupted: bool
    history: list[dict[str, float]]
    out_dir: Path | None
    elapsed_s: float

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def build_sources(data: Any, scheme: ClassScheme, crop_size: int, synthetic: Any = None) -> list:
    """Checked training tiles (in memory) plus lazily read synthetic items; ``data`` may be None."""
    from ..train import Source, collect_sources

    sources = [] if data is None else collect_sources(data, scheme, crop_size)
    if synthetic is not None:
        store = synthetic if isinstance(synthetic, SyntheticItems) else open_synthetic_store(synthetic, scheme)
        h, w = store.patch_shape
        if min(h, w) < crop_size:
            raise DatasetError(f"synthetic items are {w}x{h} px, smaller than the {crop_size} px crop; pass a smaller --crop-size", store.path)
        sources += [Source(it.name, it.image, it.inst_map, it.type_map) for it in store]
    if not sources:
        raise DatasetError("nothing to train on: give a dataset, a synthetic store or both")
    return sources


def make_batch(
    images: np.ndarray, inst_maps: np.ndarray, type_maps: np.ndarray, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in [-1, 1], np, hv, tp) tensors for a batch of crops."""
    from ..train import to_model_space

    top = int(type_maps.max(initial=0))
    if top > num_classes:
        raise LabelError(f"a training crop has class {top}, but the scheme has classes 1..{num_classes}")
    targets = [seg_targets(i, t) for i, t in zip(inst_maps, type_maps)]
    np_t = torch.from_numpy(np.stack([t[0] for t in targets]))
    hv_t = torch.from_numpy(np.stack([t[1] for t in targets]))
    tp_t = torch.from_numpy(np.stack([t[2] for t in targets]))
    return tuple(a.to(device) for a in (to_model_space(images), np_t, hv_t, tp_t))  # type: ignore[return-value]


def train_segmentation(
    data: Any,
    *,
    scheme: Any = None,
    synthetic: Any = None,
    model_config: SegConfig | None = None,
    config: SegTrainConfig | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    pbar: Any = None,
    should_stop: Callable[[], bool] | None = None,
    record: Mapping[str, Any] | None = None,
) -> SegTrainResult:
    """Train a HoVer-Net on ``data`` (a dataset or tiles, or None) [+ ``synthetic`` store].

    ``model_config`` defaults to the ``small`` preset for the scheme's classes. With
    ``out_dir`` the model folder is saved every ``checkpoint_every`` steps and at the end
    (also when stopped by ``should_stop`` or Ctrl-C). ``record``: extra facts for the
    model's training record (e.g. data paths).
    """
    from ..train import CropStream, TrainingError, setup_distributed

    config = config or SegTrainConfig()
    config.validate()
    if scheme is None:
        scheme = getattr(data, "scheme", None) or getattr(synthetic, "scheme", None)
        if scheme is None:
            raise DatasetError("the training data carries no class scheme; pass scheme=")
    scheme = load_scheme(scheme)
    model_config = model_config or SegConfig.preset("small", scheme.num_classes)
    if model_config.num_classes != scheme.num_classes:
        raise TrainingError(f"the model predicts {model_config.num_classes} classes but scheme {scheme.name!r} has {scheme.num_classes}")
    if out_dir is not None:
        out_dir = check_output_dir(out_dir, overwrite)
    sources = build_sources(data, scheme, config.crop_size, synthetic)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    info, device = setup_distributed(config.device)
    try:
        torch.manual_seed(config.seed)
        model = HoVerNet(model_config).to(device)
        net: torch.nn.Module = model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        stream = CropStream(sources, config.crop_size, config.batch_size, seed=config.seed, rank=info.rank)
        base_record = {
            "train": config.to_dict(),
            "world_size": info.world_size,
            "num_tiles": len(sources),
            **dict(record or {}),
        }
        history: list[dict[str, float]] = []
        window: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        step = 0
        interrupted = False

        def save() -> None:
            if out_dir is not None and info.is_main:
                save_seg_model(model, out_dir, scheme, {**base_record, "step": step, "history": history})

        net.train()
        with progress_bar(pbar if info.is_main else tqdm(disable=True), config.steps, "train-seg", unit="step") as bar:
            try:
                while step < config.steps:
                    if should_stop is not None and not info.enabled and should_stop():
                        interrupted = True
                        break
                    images, insts, types, _ = stream.next(0.0)
                    x, np_t, hv_t, tp_t = make_batch(images, insts, types, scheme.num_classes, device)
                    terms = hovernet_loss(net(x), np_t, hv_t, tp_t, config.loss_weights)
                    loss = terms["loss"]
                    if not torch.isfinite(loss):
                        raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; lower --lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    values = torch.stack([v.detach() for v in terms.values()]).tolist()  # one device sync
                    for k, v in zip(terms, values):
                        window.setdefault(k, []).append(v)
                    if step % config.log_every == 0 or step == config.steps:
                        row = {"step": step, **{k: float(np.mean(v)) for k, v in window.items()}}
                        row["elapsed_s"] = time.perf_counter() - t0
                        history.append(row)
                        window = {}
                        if hasattr(bar, "set_postfix"):
                            bar.set_postfix(loss=f"{row['loss']:.3f}")
                    bar.update(1)
                    if step % config.checkpoint_every == 0 and step < config.steps:
                        save()
            except KeyboardInterrupt:
                save()
                raise
        if window:
            history.append({"step": step, **{k: float(np.mean(v)) for k, v in window.items()}, "elapsed_s": time.perf_counter() - t0})
        save()
        model.eval()
        return SegTrainResult(model, step, interrupted, history, None if out_dir is None else Path(out_dir), time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        if info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

