"""Training the downstream HoVer-Net on a dataset, optionally enlarged by a synthetic store.

Random crops with the 8 flip/rotation symmetries drawn by
:class:`~napari_diffmix.data.crops.CropStream`: a share of the crops from the synthetic store
(``synthetic_share``, default its share of the training pixels), the rest from the dataset,
each tile in proportion to its area. HoVer-Net targets computed per crop, AdamW, a fixed seed, mixed precision, a progress bar and atomic checkpoints. Under
``torchrun`` (WORLD_SIZE > 1) each process trains a DistributedDataParallel replica on its
own crop stream (gloo on CPU, NCCL on GPUs); the batch size is per process and rank 0 writes.

The model folder is the checkpoint: every ``checkpoint_every`` steps, at the end, and when
stopped (Ctrl-C, SIGTERM or ``should_stop``) it is rewritten atomically with its
``train_state.pt`` (optimizer, step, history, config, the crop streams' and torch's RNG
states of every rank). ``resume=True`` continues from there and ends with the weights an
uninterrupted run would have had; it may also extend a finished run to more ``steps``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..classes import ClassScheme, load_scheme
from ..data.crops import SYNTHETIC, CropStream, Source, drawn_shares, share_summary
from ..errors import CheckpointError, DatasetError, LabelError, TrainingError
from ..progress import StopRequests, progress_bar, set_bar_start
from ..runtime import (
    PRECISIONS,
    DistInfo,
    all_reduce_max,
    capture_rng,
    check_ranks_in_sync,
    pooled_means,
    precision_dtype,
    resolve_precision,
    restore_rng,
    setup_distributed,
)
from ..train import collect_sources, config_fields, to_model_space
from .checkpoint import SegRun, check_output_dir, load_seg_run, save_seg_model
from .data import SyntheticItems, open_synthetic_store
from .loss import LossWeights, hovernet_loss
from .model import HoVerNet, SegConfig
from .targets import seg_targets

log = logging.getLogger(__name__)

# Settings a resumed run must share with the interrupted one, or it would be another run.
RESUME_FIXED = ("batch_size", "crop_size", "seed", "loss_weights", "synthetic_share")
# Settings one may change on resume (e.g. a lower lr after the loss diverged); a warning says so.
RESUME_TUNABLE = ("lr", "weight_decay", "precision")
STATE_KEYS = ("step", "config", "data", "world_size", "optimizer", "scaler", "rng", "history", "window", "elapsed_s")


@dataclass
class SegTrainConfig:
    steps: int = 2000
    batch_size: int = 8
    crop_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 elsewhere) | fp32 | bf16 | fp16 (with a GradScaler)
    checkpoint_every: int = 500
    log_every: int = 25
    num_threads: int | None = None
    # Share of crops drawn from the synthetic store; None: its share of the training pixels.
    synthetic_share: float | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "crop_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_size < 8:
            raise TrainingError(f"crop_size must be at least 8 px, got {self.crop_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise TrainingError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.synthetic_share is not None and not 0.0 <= self.synthetic_share <= 1.0:
            raise TrainingError(f"synthetic_share must be between 0 and 1, got {self.synthetic_share}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision {self.precision!r} is not one of {'|'.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss_weights"] = self.loss_weights.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegTrainConfig":
        d = config_fields(cls, data, "segmentation training setting")
        if "loss_weights" in d:
            try:
                d["loss_weights"] = LossWeights(**d["loss_weights"])
            except TypeError as exc:
                raise TrainingError(f"bad loss weights {d['loss_weights']!r}: {exc}") from None
        return cls(**d)


@dataclass
class SegTrainResult:
    model: HoVerNet
    steps: int
    interrupted: bool
    history: list[dict[str, float]]
    out_dir: Path | None
    elapsed_s: float  # this call's wall time
    start_step: int = 0  # > 0 when resumed
    # Share of crops per data group: asked for (default: the pixels) and drawn (all ranks, whole run).
    requested_shares: dict[str, float] = field(default_factory=dict)
    realised_shares: dict[str, float] = field(default_factory=dict)

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def build_sources(data: Any, scheme: ClassScheme, crop_size: int, synthetic: Any = None) -> list:
    """Checked training tiles (in memory) plus lazily read synthetic items; ``data`` may be None."""
    sources = [] if data is None else collect_sources(data, scheme, crop_size)
    if synthetic is not None:
        store = synthetic if isinstance(synthetic, SyntheticItems) else open_synthetic_store(synthetic, scheme)
        h, w = store.patch_shape
        if min(h, w) < crop_size:
            raise DatasetError(f"synthetic items are {w}x{h} px, smaller than the {crop_size} px crop; pass a smaller --crop-size", store.path)
        sources += [Source(it.name, it.image, it.inst_map, it.type_map, SYNTHETIC) for it in store]
    if not sources:
        raise DatasetError("nothing to train on: give a dataset, a synthetic store or both")
    return sources


def data_digest(sources: Sequence[Source]) -> str:
    """Fingerprint of a training pool (tile names and sizes, in order): a resumed run must
    draw from the pool its crop streams were drawing from."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.name}\0{s.image.shape[0]}x{s.image.shape[1]}\n".encode())
    return h.hexdigest()


def make_batch(
    images: np.ndarray, inst_maps: np.ndarray, type_maps: np.ndarray, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in [-1, 1], np, hv, tp) tensors for a batch of crops."""
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
    resume: bool = False,
    pbar: Any = None,
    should_stop: Callable[[], bool] | None = None,
    record: Mapping[str, Any] | None = None,
) -> SegTrainResult:
    """Train a HoVer-Net on ``data`` (a dataset or tiles, or None) [+ ``synthetic`` store].

    ``model_config`` defaults to the ``small`` preset for the scheme's classes. With
    ``out_dir`` the model folder (and its training state) is saved every
    ``checkpoint_every`` steps, at the end, and when stopped by ``should_stop``, Ctrl-C or
    SIGTERM (then ``interrupted`` is True; a second Ctrl-C aborts without saving).
    ``resume``: continue the run saved in ``out_dir`` (a new run if the folder is empty or
    missing); ``config`` and ``model_config`` default to the run's own, and must agree with
    it on the model, scheme, data, batch and crop size, seed and loss weights. ``record``:
    extra facts for the model's training record (e.g. data paths).
    """
    if resume and out_dir is None:
        raise TrainingError("resume needs out_dir: the model folder of the run to continue")
    if resume and overwrite:
        raise TrainingError("resume continues the model in out_dir and overwrite replaces it: choose one")
    run: SegRun | None = None
    if out_dir is not None:
        out_dir = check_output_dir(out_dir, overwrite, resume=resume)
        if resume:
            run = load_seg_run(out_dir)
            if run is None:
                log.info("%s holds no model yet: starting a new run", out_dir)
    if run is not None:
        config = config or SegTrainConfig.from_dict(json.loads(run.state["config"]))
        model_config = model_config or run.info.config
    config = config or SegTrainConfig()
    config.validate()
    if scheme is None:
        scheme = getattr(data, "scheme", None) or getattr(synthetic, "scheme", None) or (run.info.scheme if run else None)
        if scheme is None:
            raise DatasetError("the training data carries no class scheme; pass scheme=")
    scheme = load_scheme(scheme)
    model_config = model_config or SegConfig.preset("small", scheme.num_classes)
    if model_config.num_classes != scheme.num_classes:
        raise TrainingError(f"the model predicts {model_config.num_classes} classes but scheme {scheme.name!r} has {scheme.num_classes}")
    sources = build_sources(data, scheme, config.crop_size, synthetic)
    if run is not None:
        _check_resumable(run, out_dir, config, model_config, scheme, sources)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    info, device = setup_distributed(config.device)
    try:
        return _train(config, model_config, scheme, sources, info, device, out_dir, run, pbar, should_stop, record)
    finally:
        torch.set_num_threads(threads)
        if info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _check_resumable(run: SegRun, out_dir: Path, config: SegTrainConfig, model_config: SegConfig, scheme: ClassScheme, sources: Sequence[Source]) -> None:
    """CheckpointError naming what differs when this call would not continue the saved run."""
    missing = [k for k in STATE_KEYS if k not in run.state]
    if missing:
        raise CheckpointError(f"{out_dir}: the training state lacks {missing}; pass --overwrite to start a new run")
    saved_model, now_model = run.info.config.to_dict(), model_config.to_dict()
    changed = _differences(saved_model, now_model, sorted(set(saved_model) | set(now_model)))
    if changed:
        raise CheckpointError(f"{out_dir}: cannot resume, the model differs from the saved one ({'; '.join(changed)})")
    if run.info.scheme.names != scheme.names:
        raise CheckpointError(
            f"{out_dir}: cannot resume, the run was trained on classes {list(run.info.scheme.names)}, the data now has {list(scheme.names)}"
        )
    saved_cfg, now_cfg = json.loads(run.state["config"]), config.to_dict()
    changed = _differences(saved_cfg, now_cfg, RESUME_FIXED)
    if changed:
        raise CheckpointError(
            f"{out_dir}: cannot resume with other settings ({'; '.join(changed)}); "
            "resume with the run's own settings, or pass --overwrite to start a new run"
        )
    saved_data = json.loads(run.state["data"])
    if saved_data["digest"] != data_digest(sources):
        raise CheckpointError(
            f"{out_dir}: cannot resume, the training data differs from the run's ({saved_data['num_tiles']} tiles then, "
            f"{len(sources)} now, or other tiles); give the run's own --data/--synthetic, or pass --overwrite to start a new run"
        )
    step = int(run.state["step"])
    if step > config.steps:
        raise CheckpointError(f"{out_dir}: the run is already at step {step}, past the {config.steps} steps asked for")
    changed = _differences(saved_cfg, now_cfg, RESUME_TUNABLE)
    if changed:
        log.warning("resuming with changed settings (%s): training continues, but not as the original run would have", "; ".join(changed))


def _train(config, model_config, scheme, sources, info: DistInfo, device, out_dir, run, pbar, should_stop, record) -> SegTrainResult:
    autocast_dtype = precision_dtype(resolve_precision(config.precision, device, training=True))
    if run is not None:
        model = run.model.to(device).train()
    else:
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = HoVerNet(model_config).to(device).train()
    net: torch.nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    stream = CropStream(sources, config.crop_size, config.batch_size, seed=config.seed, rank=info.rank,
                        shares={SYNTHETIC: config.synthetic_share})
    history: list[dict[str, float]] = []
    window: dict[str, list[float]] = {}
    step = 0
    elapsed_before = 0.0
    if run is not None:
        step = _restore(run, config, opt, scaler, stream, info)
        history = json.loads(run.state["history"])
        window = json.loads(run.state["window"])
        elapsed_before = float(run.state["elapsed_s"])
        if info.is_main:
            log.info("resumed %s at step %d of %d", out_dir, step, config.steps)
    if info.is_main:
        log.info("training data: %s", stream.describe())
    start_step = step
    base_record = {
        "train": config.to_dict(),
        "world_size": info.world_size,
        "num_tiles": len(sources),
        **dict(record or {}),
    }
    digest = json.dumps({"num_tiles": len(sources), "digest": data_digest(sources)})
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def window_row() -> dict[str, float]:
        # Means over all ranks: collective under DDP, where every rank calls it at the same steps.
        shares = {f"{g}_share": v for g, v in drawn_shares(stream, info, device).items()}
        return {"step": step, **pooled_means(window, list(window), info, device), "elapsed_s": elapsed(), **shares}

    def save() -> None:
        if out_dir is None:
            return
        check_ranks_in_sync(model, info, device, step)
        rng = capture_rng(stream)
        rngs = [rng]
        if info.enabled:
            import torch.distributed as dist

            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        shown = history + ([window_row()] if window else [])  # the record also shows the unfinished log window
        error: OSError | None = None
        if info.is_main:
            state = {
                "step": step,
                "config": json.dumps(config.to_dict()),
                "data": digest,
                "world_size": info.world_size,
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "history": json.dumps(history),
                "window": json.dumps(window),
                "elapsed_s": elapsed(),
            }
            try:
                save_seg_model(model, out_dir, scheme, {**base_record, "step": step, "history": shown}, state=state)
            except OSError as exc:
                error = exc
        # Every rank learns whether rank 0 could save (and none runs ahead of the save).
        failed, = all_reduce_max([float(error is not None)], info, device)
        if failed:
            why = f" ({error})" if error is not None else " (see the first process's error)"
            raise TrainingError(f"cannot write the model folder {out_dir} at step {step}{why}; its previous save is intact")

    net.train()
    saved_step = step if run is not None else None
    interrupted = False
    stopping = "finishing this step and saving the model (Ctrl-C again aborts without saving)"
    with StopRequests(should_stop, stopping) as stop, progress_bar(pbar if info.is_main else tqdm(disable=True), config.steps, "train-seg", unit="step") as bar:
        set_bar_start(bar, step)
        while step < config.steps:
            images, insts, types, _ = stream.next(0.0)
            x, np_t, hv_t, tp_t = make_batch(images, insts, types, scheme.num_classes, device)
            try:
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    terms = hovernet_loss(net(x), np_t, hv_t, tp_t, config.loss_weights)
                values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one device sync
                loss_ok = all(math.isfinite(v) for v in values)
                # Agreed by all ranks before backward: a rank that raised alone would leave the
                # others waiting forever in DDP's gradient all-reduce.
                bad, stop_flag = all_reduce_max([0.0 if loss_ok else 1.0, float(stop.poll())], info, device)
                if bad:
                    raise _diverged("the training loss became NaN or infinite", step, info, out_dir, saved_step)
                opt.zero_grad(set_to_none=True)
                scaler.scale(terms["loss"].float()).backward()
                scaler.unscale_(opt)
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
                # fp16's scaler skips steps with overflowing gradients by design; otherwise a
                # non-finite gradient would poison the weights (DDP makes gradients equal on all ranks).
                if not scaler.is_enabled() and not math.isfinite(grad_norm):
                    raise _diverged("the gradients became NaN or infinite", step, info, out_dir, saved_step)
                scaler.step(opt)
                scaler.update()
            except torch.OutOfMemoryError:
                raise TrainingError(
                    f"out of memory on {device} at batch size {config.batch_size} with {config.crop_size} px crops; "
                    "try a smaller --batch-size or --crop-size, or --precision bf16/fp16"
                ) from None
            step += 1
            for k, v in zip(terms, values):
                window.setdefault(k, []).append(v)
            window.setdefault("grad_norm", []).append(grad_norm)
            if step % config.log_every == 0 or step == config.steps:
                row = window_row()
                history.append(row)
                window = {}
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
            interrupted = bool(stop_flag)
            if interrupted or step % config.checkpoint_every == 0 or step == config.steps:
                save()
                saved_step = step
            if interrupted:
                if info.is_main:
                    log.warning("stopped at step %d of %d (%s)", step, config.steps, stop.requested or "another process")
                break
    shown = history + ([window_row()] if window else [])
    realised = drawn_shares(stream, info, device)
    if info.is_main and realised:
        log.info("crops drawn: %s", share_summary(stream.shares, realised))
    model.eval()
    return SegTrainResult(model, step, interrupted, shown, None if out_dir is None else Path(out_dir), time.perf_counter() - t0,
                          start_step, dict(stream.shares), realised)


def _restore(run: SegRun, config: SegTrainConfig, opt, scaler, stream: CropStream, info: DistInfo) -> int:
    state = run.state
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{run.info.path}: cannot restore the optimizer state ({exc})") from None
    for g in opt.param_groups:  # lr and weight decay may be tuned on resume
        g["lr"], g["weight_decay"] = config.lr, config.weight_decay
    if scaler.is_enabled() and state["scaler"]:  # empty when the run was not fp16
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        restore_rng(rngs[info.rank], stream)
    else:
        # Another number of processes: no per-rank stream to continue, so reseed from the step.
        stream.reseed(config.seed, info.rank, step)
        if info.is_main:
            log.warning("the run was saved by %d processes and resumes on %d: crop order reseeded", len(rngs), info.world_size)
    return step


def _diverged(what: str, step: int, info: DistInfo, out_dir: Path | None, saved_step: int | None) -> TrainingError:
    # The same words on every rank: each raises this after the same all-reduce.
    where = f" on at least one of the {info.world_size} processes" if info.enabled else ""
    if out_dir is not None and saved_step is not None:
        then = f"{out_dir} holds the model of step {saved_step}: continue from there with --resume and a lower --lr"
    else:
        then = "nothing was saved; start again with a lower --lr"
    return TrainingError(f"{what} at step {step + 1}{where}; training stopped before updating the weights. {then} (or --precision fp32/bf16 instead of fp16)")
