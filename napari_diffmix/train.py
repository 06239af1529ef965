"""Training the label-conditioned diffusion model (SDM as used by DiffMix).

A compact loop in the spirit of guided-diffusion's ``TrainLoop``: random crops with the 8
flip/rotation symmetries, hybrid loss, AdamW, EMA, condition dropout for classifier-free
guidance, mixed precision, gradient clipping, checkpoints that resume bit-for-bit, and
``torchrun`` data parallelism (``torchrun ... -m napari_diffmix train ...``).

Training runs in *stages* (``Stage(steps, lr, cond_dropout)``): the published recipe is a
plain stage at lr 1e-4 followed by a classifier-free fine-tune at lr 2e-5 that zeroes the
whole condition for 20 % of the samples.

Besides tiles with their own images, a run can train on the balancing/enlarging label maps
that ``diffmix labels`` wrote (``extra_labels=`` / ``--extra-labels``): each is paired with the
original image of the window it was cut from (:func:`pair_label_patches`).

A run directory holds::

    config.json            the TrainConfig the run started with (``--resume`` reads it)
    checkpoints/step-NNNNNNN.pt   model, EMA, optimizer, scaler, step, every RNG state
    log.csv                loss curves (and TensorBoard events when tensorboard is installed)
    samples/step-NNNNNNN.png      EMA samples for fixed validation label maps
    model.safetensors      the EMA weights as a native model (checkpoint.save_model)

The run-folder machinery (checkpoint files, the state a checkpoint restores, log.csv, EMA) is
shared with the distiller in :mod:`napari_diffmix.trainloop`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .atomic import save_png, write_json
from .classes import ClassScheme, load_scheme
from .data.crops import EXTRA, CropStream, Source, drawn_shares, share_summary
from .errors import CheckpointError, DatasetError, LabelError, TrainingError
from .progress import StopRequests, progress_bar, set_bar_start
from .runtime import PRECISIONS, all_reduce_max, pooled_means, precision_dtype, preset_precision, resolve_precision, seed_int
from .trainloop import (
    CsvLog,
    RunResult,
    TrainState,
    barrier,
    changed_settings,
    ema_rate_at,
    find_resume,
    read_checkpoint,
    remove_stale_temporaries,
    resume_step,
    training_session,
    update_ema,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "napari-diffmix-train/1"


# ----------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Stage:
    """A stretch of training with one learning rate and one condition-dropout rate."""

    steps: int
    lr: float
    cond_dropout: float = 0.0


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``TrainConfig.preset(name)`` gives the
    published DiffMix recipes and a small CPU demo; fields can be overridden after."""

    out_dir: str = "runs/diffmix"
    model: str | dict = "demo"  # UNetConfig preset name or a UNetConfig dict
    stages: tuple[Stage, ...] = (Stage(3000, 2e-4, 0.1),)
    crop_size: int = 64
    batch_size: int = 12
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_rate: float = 0.9999
    # rate_k = min(rate, (1 + k) / (10 + k)): without it a 0.9999 EMA still remembers the
    # random init after 10 k steps (0.9999 ** 1e4 = 0.37).
    ema_warmup: bool = True
    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    # Offset noise (Guttenberg 2023): add offset * N(0, 1) per image and channel to the noise.
    # A network with GroupNorms hardly learns to pass the image-wide mean of x_t through to
    # its epsilon, whose per-channel mean decides the colour at high t; the offset makes that
    # component large enough to be learned. 0 = the published recipe.
    offset_noise: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    channels_last: bool = False  # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the published recipe does not clip)
    augment: bool = True  # the 8 flip/rotation symmetries
    # Share of crops drawn from the extra label maps (extra_labels=); None: their share of the pixels.
    extra_share: float | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_threads: int | None = None
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 1000  # 0 = never
    num_val_samples: int = 4
    sample_sampler: str = "dpm++2m"
    sample_steps: int = 20
    guidance: float = 1.5  # default CFG scale stored with the exported model
    init: str | None = None  # fine-tune from this checkpoint (native or official .pt)
    preset: str | None = None

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name not in PRESETS:
            raise TrainingError(f"unknown training preset {name!r}; choose one of {', '.join(PRESETS)}")
        cfg = dataclasses.replace(PRESETS[name], preset=name, **overrides)
        return cfg if "precision" in overrides else dataclasses.replace(cfg, precision=preset_precision(cfg.precision, cfg.device))

    def validate(self) -> None:
        if not self.stages:
            raise TrainingError("no training stages: give at least one Stage(steps, lr, cond_dropout)")
        for s in self.stages:
            if s.steps < 0 or not s.lr > 0 or not 0.0 <= s.cond_dropout < 1.0:
                raise TrainingError(f"bad stage {s}: need steps >= 0, lr > 0 and 0 <= cond_dropout < 1")
        checks = [
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.crop_size >= 8, f"crop size must be >= 8 px, got {self.crop_size}"),
            (0.0 <= self.ema_rate < 1.0, f"EMA rate must be in [0, 1), got {self.ema_rate}"),
            (self.precision in PRECISIONS, f"precision {self.precision!r} is not {'|'.join(PRECISIONS)}"),
            (self.grad_clip >= 0, f"gradient clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.save_every >= 0 and self.log_every >= 1 and self.sample_every >= 0, "save/log/sample intervals must be >= 0 (log >= 1)"),
            (self.keep_last >= 1, f"keep at least one checkpoint, got keep_last={self.keep_last}"),
            (self.extra_share is None or 0.0 <= self.extra_share <= 1.0, f"extra share must be in [0, 1], got {self.extra_share}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainingError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        d = config_fields(cls, data, "training config field")
        if "stages" in d:
            d["stages"] = tuple(Stage(int(s["steps"]), float(s["lr"]), float(s.get("cond_dropout", 0.0))) for s in d["stages"])
        if "adam_betas" in d:
            d["adam_betas"] = tuple(float(b) for b in d["adam_betas"])
        return cls(**d)


def config_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A copy of ``data`` for ``cls(**...)``, refusing keys that are not fields of the dataclass
    (a config saved by another version, or a typo in a hand-written one)."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TrainingError(f"unknown {what}(s): {sorted(unknown)}")
    return dict(data)


def _published(model: str) -> TrainConfig:
    # The public DiffMix scripts train 5,900 steps at lr 1e-4, then resume from model005900
    # for the classifier-free fine-tune (lr 2e-5, drop 0.2) and sample from ema_0.9999_010000.
    return TrainConfig(
        model=model,
        stages=(Stage(5900, 1e-4, 0.0), Stage(4100, 2e-5, 0.2)),
        crop_size=256,
        batch_size=16,
        ema_rate=0.9999,
        ema_warmup=False,
        precision="auto",
        grad_checkpointing=True,
        save_every=500,
        sample_every=1000,
        guidance=1.5,
    )


PRESETS: dict[str, TrainConfig] = {
    "diffmix-consep": _published("diffmix-consep"),
    "diffmix-glysac": _published("diffmix-glysac"),
    # Lizard and CoNIC (20x, six classes): DiffMix's recipe unchanged; CoNIC's patches are
    # the published 256 px crop size.
    "diffmix-lizard": _published("diffmix-lizard"),
    # A 4.5 M-parameter model that learns the demo tile on one CPU core in a few hours. It
    # needs guidance ~3 (1.5 is muddy at this size), hence condition dropout from the start.
    # bf16 autocast + channels_last: 1.6x faster steps on a CPU with avx512_bf16 (from_preset
    # keeps bf16 only where it is native). Without
    # offset noise its epsilon still had zero image-wide mean after 2,000 steps, so every
    # sample took the colour cast of its starting noise (green, magenta).
    "demo": TrainConfig(
        model="demo",
        stages=(Stage(4500, 2e-4, 0.15), Stage(1500, 5e-5, 0.15)),
        crop_size=64,
        batch_size=12,
        ema_rate=0.999,
        ema_warmup=True,
        offset_noise=0.1,
        precision="bf16",
        channels_last=True,
        grad_clip=1.0,
        save_every=250,
        keep_last=3,
        log_every=50,
        sample_every=500,
        num_val_samples=6,
        guidance=3.0,
        num_threads=1,
    ),
    # For tests and smoke runs.
    "tiny": TrainConfig(
        model="tiny",
        stages=(Stage(200, 1e-3, 0.1),),
        crop_size=32,
        batch_size=4,
        ema_rate=0.99,
        precision="fp32",
        grad_clip=1.0,
        save_every=100,
        log_every=10,
        sample_every=0,
        sample_steps=10,
        guidance=2.0,
    ),
}


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, Stage]:
    """The stage (index, Stage) that training step ``step`` (0-based) belongs to."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i, s
    return len(stages) - 1, stages[-1]


# ----------------------------------------------------------------------------------------
# data


def collect_sources(data: Any, scheme: ClassScheme, crop_size: int | None = None) -> list[Source]:
    """Normalise training data into checked :class:`Source` tiles.

    ``data`` is a dataset (a sequence of tiles), a tile, an ``(image, inst_map, type_map)``
    tuple, or a list mixing these (extra balancing/enlarging label maps paired with their
    original image are just more tuples). Raises :class:`DatasetError`, :class:`LabelError`
    or :class:`SchemeError` naming the offending tile.
    """
    items: list[tuple[str, Any]] = []

    def add(obj: Any, name: str) -> None:
        if isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(a, np.ndarray) or a is None for a in obj):
            items.append((name, obj))
        elif hasattr(obj, "inst_map") and hasattr(obj, "image"):
            items.append((str(getattr(obj, "name", name)), (obj.image, obj.inst_map, obj.type_map)))
        elif isinstance(obj, (Sequence, Iterable)) and not isinstance(obj, (str, bytes, np.ndarray)):
            for i, sub in enumerate(obj):
                add(sub, f"{name}[{i}]")
        else:
            raise DatasetError(f"training data item {name} is a {type(obj).__name__}; expected a dataset, tile or (image, inst_map, type_map)")

    add(data, "data")
    if not items:
        raise DatasetError("the training data is empty: no tiles to train on")
    sources = []
    for name, (image, inst_map, type_map) in items:
        if image is None:
            raise DatasetError(
                f"tile {name!r} has no image; training needs H&E images paired with label maps (label-only patches "
                "from `diffmix labels` go in --extra-labels / extra_labels=, which pairs them with their original images)"
            )
        if inst_map is None or type_map is None:
            raise DatasetError(f"tile {name!r} has an image but no label maps (inst_map and type_map); training needs both")
        image, inst_map, type_map = np.asarray(image), np.asarray(inst_map), np.asarray(type_map)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DatasetError(f"tile {name!r}: image must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
        if inst_map.shape != image.shape[:2] or type_map.shape != image.shape[:2]:
            raise LabelError(
                f"tile {name!r}: label maps {inst_map.shape}/{type_map.shape} do not match the image size {image.shape[:2]}"
            )
        if not np.issubdtype(inst_map.dtype, np.integer) or not np.issubdtype(type_map.dtype, np.integer):
            raise LabelError(f"tile {name!r}: inst_map and type_map must be integer arrays, got {inst_map.dtype}/{type_map.dtype}")
        scheme.check_classes(type_map, source=name)
        if inst_map.min(initial=0) < 0:
            raise LabelError(f"tile {name!r}: inst_map has negative ids; 0 is background and nuclei are 1..N")
        if crop_size is not None and min(image.shape[:2]) < crop_size:
            raise DatasetError(
                f"tile {name!r} is {image.shape[1]}x{image.shape[0]} px, smaller than the {crop_size} px training crop; "
                "pass a smaller --crop-size or leave the tile out"
            )
        sources.append(Source(name, image, inst_map.astype(np.int32, copy=False), type_map.astype(np.uint8, copy=False)))
    return sources


def pair_label_patches(
    labels_dir: str | os.PathLike, sources: Sequence[Source], scheme: ClassScheme, crop_size: int | None = None
) -> list[Source]:
    """Pair each label-map patch of a ``diffmix labels`` output folder with the original image.

    ``provenance.json`` in the folder names, for every patch, the tile it was cut from
    (``tile_name``) and its window (``origin`` (y, x), ``size``); the image of the patch is
    that window of the training tile of the same name in ``sources``. Balancing and enlarging
    maps so become extra conditions whose image is the original, as DiffMix trains them.

    Raises :class:`DatasetError` naming the folder and the patch when a patch has no
    provenance record, its source tile is not (or more than once) among ``sources``, its
    size differs from the record, its window does not fit the tile, or the tile's size
    differs from the one the plan recorded; :class:`SchemeError` when the folder's classes
    are not ``scheme``'s.
    """
    from .datasets import Tile, open_dataset
    from .errors import SchemeError
    from .mixing import Plan

    folder = Path(labels_dir)
    if not folder.is_dir():
        raise DatasetError("label-map folder does not exist" if not folder.exists() else "expected a `diffmix labels` output folder, got a file", folder)
    records = _label_provenance(folder)
    labels = open_dataset(folder, scheme=None if (folder / "scheme.json").is_file() else scheme, layout="generic")
    if labels.scheme.names != scheme.names:
        raise SchemeError(
            f"{folder}: the label maps use classes {list(labels.scheme.names)}, the model {list(scheme.names)}; "
            "plan them from the data the model trains on"
        )
    # plan.json records each tile's shape when the maps were planned: a tile of the same name
    # but another size is another tile.
    plan_shapes = {}
    if (folder / "plan.json").is_file():
        plan = Plan.load(folder / "plan.json")
        plan_shapes = dict(zip(plan.tile_names, plan.tile_shapes))
    by_name: dict[str, list[Source]] = {}
    for s in sources:
        by_name.setdefault(s.name, []).append(s)

    tiles = []
    for i, name in enumerate(labels.names):
        rec = records.get(name)
        if rec is None:
            raise DatasetError(f"label map {name!r} has no record in provenance.json, so its source tile is unknown", folder)
        tile_name, (y, x), size = rec
        found = by_name.get(tile_name, [])
        if not found:
            crops = [n for n in by_name if n.startswith(tile_name)]
            hint = (
                f"; {crops[0]!r} is a part of that tile: plan the label maps from {crops[0]!r} itself, since the rest of "
                "the tile (e.g. held-out columns) must not be trained on"
                if crops else "; plan the label maps from the data the model trains on"
            )
            shown = ", ".join(sorted(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
            raise DatasetError(
                f"label map {name!r} comes from tile {tile_name!r}, which is not among the training tiles ({shown}){hint}", folder
            )
        if len(found) > 1:
            raise DatasetError(
                f"label map {name!r} comes from tile {tile_name!r}, but {len(found)} training tiles have that name; "
                "train on one dataset holding it", folder,
            )
        src = found[0]
        h, w = src.image.shape[:2]
        if tile_name in plan_shapes and tuple(plan_shapes[tile_name]) != (h, w):
            ph, pw = plan_shapes[tile_name]
            raise DatasetError(
                f"training tile {tile_name!r} is {w}x{h} px but the label maps were planned on a {pw}x{ph} px tile of that "
                "name: not the same tile", folder,
            )
        lab = labels.labels(i)
        if lab.shape != (size, size):
            raise DatasetError(
                f"label map {name!r} is {lab.shape[1]}x{lab.shape[0]} px but provenance.json records a {size} px patch", folder
            )
        if y < 0 or x < 0 or y + size > h or x + size > w:
            raise DatasetError(
                f"label map {name!r}: its window (y {y}, x {x}, {size} px) does not fit the {w}x{h} px training tile {tile_name!r}",
                folder,
            )
        image = src.image[y : y + size, x : x + size]
        tiles.append(Tile(f"{folder.name}/{name}", image, lab.inst_map, lab.type_map, source=os.fspath(folder / name)))
    if not tiles:
        raise DatasetError("the label-map folder holds no patches", folder)
    log.info("%s: %d label-map patches paired with windows of %d training tile(s)", folder, len(tiles),
             len({records[n][0] for n in labels.names}))
    sources = collect_sources(tiles, scheme, crop_size)
    for s in sources:
        s.group = EXTRA
    return sources


def _label_provenance(folder: Path) -> dict[str, tuple[str, tuple[int, int], int]]:
    """Patch name -> (source tile name, (y, x) origin, size) from a labels folder's provenance.json."""
    path = folder / "provenance.json"
    if not path.is_file():
        raise DatasetError(
            "not a `diffmix labels` output folder: no provenance.json saying which tile and window each label map comes from",
            folder,
        )
    try:
        patches = json.loads(path.read_text(encoding="utf-8"))["patches"]
        out = {}
        for rec in patches:
            y, x = (int(v) for v in rec["origin"])
            out[str(rec["name"])] = (str(rec["tile_name"]), (y, x), int(rec["size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read the patch records ({type(exc).__name__}: {exc})", path) from None
    return out


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def validation_crops(sources: Sequence[Source], crop_size: int, count: int, seed: int) -> list[Source]:
    """Fixed crops (same for every call with the same seed) for the sample grids.

    Crops with the most nuclei among a few random candidates per pick, so the grid shows
    tissue rather than empty background.
    """
    rng = np.random.default_rng([seed, 7919])
    out = []
    for _ in range(count):
        best = None
        for _ in range(8):
            src = sources[int(rng.integers(len(sources)))]
            y = int(rng.integers(0, src.image.shape[0] - crop_size + 1))
            x = int(rng.integers(0, src.image.shape[1] - crop_size + 1))
            inst = src.inst_map[y : y + crop_size, x : x + crop_size]
            score = len(np.unique(inst)) + 0.5 * len(np.unique(src.type_map[y : y + crop_size, x : x + crop_size]))
            if best is None or score > best[0]:
                best = (score, src, y, x)
        _, src, y, x = best
        sl = (slice(y, y + crop_size), slice(x, x + crop_size))
        out.append(Source(f"{src.name}@{y},{x}", src.image[sl], src.inst_map[sl], src.type_map[sl]))
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (exact bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint (safe unpickling: tensors and plain containers only)."""
    return read_checkpoint(path, CHECKPOINT_FORMAT, "training checkpoint",
                           " (for a model to fine-tune from, use --init)", map_location=map_location)


def find_resume_checkpoint(resume: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``--resume`` means: a file, a run folder's newest loadable one, or for
    ``"auto"`` the newest in ``out_dir`` (None when the run has none yet)."""
    return find_resume(resume, out_dir, load_checkpoint)


# ----------------------------------------------------------------------------------------
# results, logging


@dataclass
class TrainResult(RunResult):
    # Share of crops per data group: asked for (default: the pixels) and drawn (all ranks, whole run).
    requested_shares: dict[str, float] = field(default_factory=dict)
    realised_shares: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)  # raw weights
    ema_model: torch.nn.Module | None = field(default=None, repr=False)  # what gets exported


LOG_FIELDS = (
    "step", "samples", "loss", "mse", "vb", "mse_q0", "mse_q1", "mse_q2", "mse_q3",
    "lr", "cond_dropout", "ema_rate", "grad_norm", "loss_scale", "steps_per_s", "elapsed_s", "extra_share",
)


# ----------------------------------------------------------------------------------------
# model construction, export, sampling


def build_model(config: TrainConfig, scheme: ClassScheme) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh SDMUNet from the config's model preset (or dict), or the ``init`` checkpoint.

    Returns the model and its UNetConfig dict.
    """
    from .model.unet import SDMUNet, UNetConfig

    if config.init:
        from .model.checkpoint import load_model

        if Path(config.init).suffix == ".safetensors":
            model, _ = load_model(config.init)
        elif isinstance(config.model, str):
            model, _ = load_model(config.init, preset=config.model)
        else:
            model, _ = load_model(config.init, config=UNetConfig.from_dict(dict(config.model)), scheme=scheme)
        want = scheme.condition_channels
        have = model.config.cond_channels
        model.config = model.config.replace(use_checkpoint=False)
        if have != want:
            raise CheckpointError(
                f"{config.init}: the model was trained for {have - 2} classes (condition channels {have}) but the "
                f"training data uses scheme {scheme.name!r} with {scheme.num_classes} classes"
            )
    else:
        if isinstance(config.model, str):
            ucfg = UNetConfig.preset(config.model)
        else:
            ucfg = UNetConfig.from_dict(dict(config.model))
        ucfg = ucfg.replace(cond_channels=scheme.condition_channels, use_checkpoint=False)
        model = SDMUNet(ucfg)
    # Checkpointing is a training-time memory trade, not part of the architecture: keep it out
    # of the config that is saved and exported.
    model.set_gradient_checkpointing(config.grad_checkpointing)
    if config.crop_size % model.config.size_multiple:
        raise TrainingError(
            f"crop size {config.crop_size} px is not a multiple of {model.config.size_multiple}, which this model needs "
            f"({len(model.config.channel_mult) - 1} downsamplings)"
        )
    return model, model.config.to_dict()


def build_diffusion(config: TrainConfig, learn_sigma: bool):
    from .model.diffusion import DiffusionConfig, GaussianDiffusion

    return GaussianDiffusion(
        DiffusionConfig(num_timesteps=config.num_timesteps, schedule=config.noise_schedule, learn_sigma=learn_sigma)
    )


def export_model(ema_model: torch.nn.Module, path: str | os.PathLike, scheme: ClassScheme, config: TrainConfig, *, step: int, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the EMA weights as a native model (one ``.safetensors`` with config and scheme)."""
    from .model.checkpoint import save_model

    model = getattr(ema_model, "module", ema_model)
    provenance = {
        "training": {"step": step, "preset": config.preset, "crop_size": config.crop_size,
                     "batch_size": config.batch_size, "stages": [dataclasses.asdict(s) for s in config.stages],
                     "ema_rate": config.ema_rate, "ema_warmup": config.ema_warmup, "seed": config.seed},
    }
    provenance.update(extra or {})
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors" if path.is_dir() or not path.suffix else path.with_suffix(".safetensors")
    diffusion = build_diffusion(config, model.config.learn_sigma).config
    save_model(model, path, scheme=scheme, diffusion=diffusion, default_guidance=config.guidance, extra=provenance)
    return path


def render_samples(model: torch.nn.Module, crops: Sequence[Source], scheme: ClassScheme, config: TrainConfig, device: torch.device) -> np.ndarray:
    """uint8 (N, s, s, 3) images rendered by ``model`` for the crops' label maps (fixed seed)."""
    from .model.condition import condition_batch
    from .model.samplers import sample

    cond = condition_batch([c.inst_map for c in crops], [c.type_map for c in crops], scheme.num_classes).to(device)
    last = None
    for last in sample(model, cond, diffusion=build_diffusion(config, model.config.learn_sigma), sampler=config.sample_sampler,
                       steps=config.sample_steps, guidance=config.guidance, seed=config.seed):
        pass
    return last.images()


def label_preview(inst_map: np.ndarray, type_map: np.ndarray, scheme: ClassScheme) -> np.ndarray:
    """RGB view of a label map: class colours, instance edges darkened."""
    from .nuclei import instance_edges

    rgb = scheme.palette()[type_map].copy()
    rgb[instance_edges(inst_map) & (inst_map > 0)] //= 3
    return rgb


def sample_grid(crops: Sequence[Source], samples: np.ndarray, scheme: ClassScheme, gap: int = 2) -> np.ndarray:
    """Rows: label map, model sample, real image; one column per crop (small crops enlarged)."""
    zoom = max(1, 128 // samples.shape[1])
    rows = [
        [label_preview(c.inst_map, c.type_map, scheme) for c in crops],
        list(samples),
        [c.image for c in crops],
    ]
    rows = [[np.kron(img, np.ones((zoom, zoom, 1), np.uint8)) for img in row] for row in rows]
    s = samples.shape[1] * zoom
    n = len(crops)
    grid = np.full((3 * s + 2 * gap, n * s + (n - 1) * gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = img
    return grid


# ----------------------------------------------------------------------------------------
# the loop


def train(
    config: TrainConfig,
    dataset: Any,
    *,
    scheme: ClassScheme | str | None = None,
    val: Any = None,
    resume: str | os.PathLike | None = None,
    pbar: Any = None,
    should_stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
    extra_labels: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> TrainResult:
    """Train (or fine-tune, or resume) a label-conditioned diffusion model.

    ``dataset``: a dataset, tiles, ``(image, inst_map, type_map)`` tuples or a list of them.
    ``extra_labels``: ``diffmix labels`` output folders whose balancing/enlarging maps are
    trained as extra tiles with the original image of their window (:func:`pair_label_patches`).
    ``scheme`` defaults to ``dataset.scheme``. ``val``: label maps (with images) for the
    sample grids; defaults to fixed crops of the training data. ``resume``: a checkpoint,
    a run folder, or ``"auto"`` (newest checkpoint in ``config.out_dir``, if any).
    ``should_stop``: polled every step (GUI cancel); Ctrl-C/SIGTERM do the same from the
    main thread. ``max_steps``: stop (with a checkpoint) after this many steps in this call.
    """
    config.validate()
    if scheme is None:
        scheme = getattr(dataset, "scheme", None)
        if scheme is None:
            raise DatasetError("the training data carries no class scheme; pass scheme=")
    scheme = load_scheme(scheme)
    sources = collect_sources(dataset, scheme, config.crop_size)
    # The grids show real images next to their label maps: edited maps would not match them.
    val_crops = validation_crops(
        collect_sources(val, scheme, config.crop_size) if val is not None else sources,
        config.crop_size, config.num_val_samples, config.seed,
    )
    if extra_labels is not None:
        folders = [extra_labels] if isinstance(extra_labels, (str, os.PathLike)) else list(extra_labels)
        sources = sources + [s for folder in folders for s in pair_label_patches(folder, sources, scheme, config.crop_size)]

    out_dir = Path(config.out_dir)
    with training_session(config.device, config.num_threads, out_dir, "training run") as (info, device):
        return _run(config, scheme, sources, val_crops, info, device, out_dir, resume, pbar, should_stop, max_steps)


def _run(config, scheme, sources, val_crops, info, device, out_dir, resume, pbar, should_stop, max_steps) -> TrainResult:
    from .model.condition import condition_batch

    torch.manual_seed(config.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model, model_cfg = build_model(config, scheme)
    model.to(device).train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    diffusion = build_diffusion(config, bool(model_cfg.get("learn_sigma", True)))
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    autocast_dtype = precision_dtype(resolve_precision(config.precision, device, training=True))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=config.stages[0].lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas))
    stream = CropStream(sources, config.crop_size, config.batch_size, seed=config.seed, rank=info.rank,
                        augment=config.augment, shares={EXTRA: config.extra_share})
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(seed_int(config.seed, info.rank, 1))
    state = TrainState(CHECKPOINT_FORMAT, model, ema_model, opt, scaler, stream, noise_gen)

    ckpt_in = find_resume_checkpoint(resume, out_dir) if resume is not None else None
    step = resume_step(state, ckpt_in, out_dir, lambda path: _load_training_state(path, config, model_cfg, scheme, state, info), info)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        write_json(out_dir / "config.json", {**config.to_dict(), "scheme": scheme.to_dict(), "model_config": model_cfg})
        csv_log = CsvLog(out_dir / "log.csv", LOG_FIELDS, step)
    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    total = config.total_steps
    stop_at = total if max_steps is None else min(total, step + max_steps)
    n_params = sum(p.numel() for p in model.parameters())
    if info.is_main:
        log.info(
            "training %.1f M parameters on %s (%s%s), %d tiles, crops %d px, batch %d x %d, steps %d -> %d",
            n_params / 1e6, device, "fp32" if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""),
            f", {info.world_size} processes" if info.enabled else "", len(sources), config.crop_size,
            config.batch_size, info.world_size, step, total,
        )
        log.info("training data: %s", stream.describe())
    acc: dict[str, list[float]] = {}
    history: list[dict[str, float]] = []
    last_loss = None
    last_ckpt = ckpt_in
    t_start = time.perf_counter()
    t_log, step_log = t_start, step
    start_step = step
    stopped = False

    with StopRequests(should_stop, "finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)") as stop, progress_bar(pbar if info.is_main else tqdm(disable=True), total, "train", unit="step") as bar:
        set_bar_start(bar, step)
        while step < stop_at:
            _, stage = stage_at(config.stages, step)
            for g in opt.param_groups:
                g["lr"] = stage.lr
            images, insts, types, keep = stream.next(stage.cond_dropout)
            x0 = to_model_space(images).to(device, memory_format=memory_format)
            cond = condition_batch(insts, types, scheme.num_classes)
            cond = (cond * torch.from_numpy(keep.astype(np.float32)).view(-1, 1, 1, 1)).to(device, memory_format=memory_format)
            t = torch.randint(0, config.num_timesteps, (x0.shape[0],), generator=noise_gen, device=device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            if config.offset_noise:
                noise += config.offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=noise_gen, device=device)
            noise = noise.contiguous(memory_format=memory_format)
            try:
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    losses = diffusion.training_losses(net, x0, t, cond, noise=noise)
                loss = losses["loss"].float().mean()
                loss_value = float(loss.detach())
                bad, stop_flag = all_reduce_max([0.0 if math.isfinite(loss_value) else 1.0, float(stop.poll())], info, device)
                if bad:
                    raise _diverged(f"the loss became {loss_value}", step, stage, last_ckpt)
                grad_norm = state.optimize(loss, config.grad_clip, lambda what: _diverged(what, step, stage, last_ckpt))
            except torch.OutOfMemoryError:
                raise TrainingError(
                    f"out of memory on {device} at batch size {config.batch_size} with {config.crop_size} px crops; "
                    "try a smaller --batch-size, --grad-checkpointing, --precision bf16/fp16 or a smaller --crop-size"
                ) from None
            update_ema(ema_model, model, ema_rate_at(config.ema_rate, step, config.ema_warmup))
            step += 1
            last_loss = loss_value
            _accumulate(acc, losses, t, config.num_timesteps, grad_norm)
            bar.update(1)

            if step % config.log_every == 0 or step == stop_at:
                row = _log_row(acc, info, device, step, config, stage, t_start, t_log, step_log, scaler, stream)
                acc, t_log, step_log = {}, time.perf_counter(), step
                history.append(row)
                if info.is_main:
                    csv_log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                    log.info("step %d/%d  loss %.4f  mse %.4f  vb %.4f  lr %.2g  %.2f steps/s",
                             step, total, row["loss"], row["mse"], row["vb"], row["lr"], row["steps_per_s"])
            stopped = bool(stop_flag)
            if (config.save_every and step % config.save_every == 0) or step == stop_at or stopped:
                last_ckpt = state.save(out_dir, step, _checkpoint_header(config, model_cfg, scheme), info, device, config.keep_last)
            if info.is_main and config.sample_every and (step % config.sample_every == 0 or step == total):
                grid = sample_grid(val_crops, render_samples(ema_model, val_crops, scheme, config, device), scheme)
                save_png(out_dir / "samples" / f"step-{step:07d}.png", grid)
            if stopped:
                if info.is_main:
                    log.warning("stopped at step %d (%s); resume with --resume", step, stop.requested or "another process")
                break

    realised = drawn_shares(stream, info, device)
    if info.is_main and realised:
        log.info("crops drawn: %s", share_summary(stream.shares, realised))
    model_path = None
    if info.is_main:
        csv_log.close()
        if step >= total and not stopped:
            model_path = export_model(ema_model, out_dir / "model.safetensors", scheme, config, step=step)
            log.info("exported the EMA model to %s", model_path)
    barrier(info)
    elapsed = time.perf_counter() - t_start
    return TrainResult(
        step=step, total_steps=total, interrupted=step < total, out_dir=out_dir, checkpoint=last_ckpt,
        model_path=model_path, last_loss=last_loss, elapsed_s=elapsed,
        steps_per_s=(step - start_step) / elapsed if elapsed > 0 else 0.0, history=history,
        requested_shares=dict(stream.shares), realised_shares=realised, model=model, ema_model=ema_model,
    )


def _diverged(what: str, step: int, stage: Stage, last_ckpt: Path | None) -> TrainingError:
    return TrainingError(
        f"{what} at step {step + 1} (stage lr {stage.lr:g}); training stopped before updating the weights. "
        + (f"The last good checkpoint is {last_ckpt}. " if last_ckpt else "No checkpoint was written yet. ")
        + "Try a lower learning rate, --grad-clip 1, or --precision fp32/bf16 instead of fp16."
    )


def _accumulate(acc: dict[str, list[float]], losses: Mapping[str, torch.Tensor], t: torch.Tensor, num_timesteps: int, grad_norm: float) -> None:
    q = (t * 4 // num_timesteps).cpu().numpy()
    for key in ("loss", "mse", "vb"):
        if key in losses:
            acc.setdefault(key, []).append(float(losses[key].detach().float().mean()))
    mse = losses["mse"].detach().float().cpu().numpy()
    for k in range(4):
        if np.any(q == k):
            acc.setdefault(f"mse_q{k}", []).extend(mse[q == k].tolist())
    acc.setdefault("grad_norm", []).append(grad_norm)


def _log_row(acc, info, device, step, config, stage, t_start, t_log, step_log, scaler, stream: CropStream) -> dict[str, float]:
    now = time.perf_counter()
    # The stream's own count, kept in checkpoints: right also after a resume with another batch size.
    row = {"step": step, "samples": int(stream.drawn.sum()) * info.world_size}
    row.update(pooled_means(acc, ("loss", "mse", "vb", "mse_q0", "mse_q1", "mse_q2", "mse_q3", "grad_norm"), info, device))
    row.update({f"{g}_share": v for g, v in drawn_shares(stream, info, device).items()})
    row.update(
        lr=stage.lr, cond_dropout=stage.cond_dropout, ema_rate=ema_rate_at(config.ema_rate, step - 1, config.ema_warmup),
        loss_scale=float(scaler.get_scale()) if scaler.is_enabled() else 1.0,
        steps_per_s=(step - step_log) / max(now - t_log, 1e-9), elapsed_s=now - t_start,
    )
    return row


def _load_training_state(path: Path, config: TrainConfig, model_cfg, scheme, state: TrainState, info) -> int:
    ckpt = load_checkpoint(path, map_location="cpu")
    changed = changed_settings(json.loads(ckpt["config"]), config, ("crop_size", "batch_size", "seed", "ema_rate", "ema_warmup", "augment",
                                                                   "noise_schedule", "num_timesteps", "extra_share"))
    if changed and info.is_main:
        log.warning("resuming with changed settings %s: training continues, but not as the original run would have", changed)
    return state.restore(ckpt, path, model_cfg, scheme, info, config.seed)


def _checkpoint_header(config: TrainConfig, model_cfg, scheme: ClassScheme) -> dict[str, str]:
    return {"config": json.dumps(config.to_dict()), "model_config": json.dumps(model_cfg), "scheme": json.dumps(scheme.to_dict())}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the EMA weights of a training checkpoint (or a run folder's newest) as a model."""
    from .model.unet import SDMUNet, UNetConfig

    path = find_resume_checkpoint(checkpoint, checkpoint)
    if path is None:
        raise CheckpointError(f"{checkpoint}: no checkpoint to export")
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(json.loads(ckpt["config"]))
    model = SDMUNet(UNetConfig.from_dict(json.loads(ckpt["model_config"])))
    model.load_state_dict(ckpt["ema"])
    return export_model(model, out, ClassScheme.from_dict(json.loads(ckpt["scheme"])), config, step=int(ckpt["step"]))

