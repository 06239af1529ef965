"""Segmentation model folders: ``model.safetensors`` + ``config.json`` (architecture, class
scheme, training record), ``log.csv`` (the training history: losses and the share of crops
drawn from each data group), and while a model is trained ``train_state.pt`` (optimizer, step,
history, every RNG state: what ``diffmix train-seg --resume`` continues from). A folder is
written atomically, all files together: readers see the old model or the new one,
never half of either, and the training state always belongs to the weights beside it.
Prediction reads only the first two, so a finished model folder may drop ``train_state.pt``.

The package ships one such folder, the demo segmentation model (``resources/models/demo-seg``,
trained on the demo tile's training split by ``scripts/train_demo_seg.py``); wherever a model
folder is taken, the name ``demo`` stands for it (unless the working directory holds a
segmentation model folder called ``demo``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..classes import ClassScheme
from ..errors import CheckpointError, SchemeError
from .model import HoVerNet, SegConfig

FORMAT = "napari-diffmix-seg/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
LOG_CSV = "log.csv"
STATE_FORMAT = "napari-diffmix-seg-train/1"
BUNDLED_SEG_MODEL_DIR = Path(__file__).resolve().parents[1] / "resources" / "models" / "demo-seg"
BUNDLED_SEG_MODEL_NAME = "demo"


@dataclass
class SegModelInfo:
    config: SegConfig
    scheme: ClassScheme
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def resolve_seg_model(path: str | os.PathLike) -> Path:
    """The folder ``path`` names: ``"demo"`` is the bundled demo model (a CheckpointError says how
    to make it when the package lacks it) unless ``./demo`` holds a segmentation model; anything
    else is a path as given. (Any other ``./demo``, e.g. ``diffmix demo --out demo``, does not hide
    the bundled model.)"""
    if os.fspath(path) != BUNDLED_SEG_MODEL_NAME or is_seg_model_dir(path):
        return Path(path)
    if not (BUNDLED_SEG_MODEL_DIR / WEIGHTS).is_file():
        raise CheckpointError(
            f"the bundled demo segmentation model is not installed (no {WEIGHTS} in {BUNDLED_SEG_MODEL_DIR}); "
            "train it with scripts/train_demo_seg.py --ship, or give a model folder from 'diffmix train-seg'"
        )
    return BUNDLED_SEG_MODEL_DIR


def is_seg_model_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(path: str | os.PathLike, overwrite: bool, *, resume: bool = False) -> Path:
    """Refuse to replace a folder that is not a segmentation model, or one that is unless
    ``overwrite`` (or ``resume``, which continues the model's training instead)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is a file; the model is saved as a folder")
        if any(path.iterdir()):
            if not is_seg_model_dir(path):
                raise CheckpointError(f"{path}: folder exists and does not hold a segmentation model; choose an empty or new folder")
            if not (overwrite or resume):
                raise CheckpointError(
                    f"{path}: a segmentation model is already there; pass --overwrite to replace it or --resume to continue its training"
                )
    return path


def save_seg_model(
    model: torch.nn.Module,
    path: str | os.PathLike,
    scheme: ClassScheme,
    training: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model folder; ``state`` (tensors, numbers, strings and containers of them,
    so that it loads with ``weights_only``) becomes its ``train_state.pt``."""
    from safetensors.torch import save_file

    from ..atomic import atomic_dir, write_json

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    config: SegConfig = model.config
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_json(
            tmp / CONFIG,
            {"format": FORMAT, "model": config.to_dict(), "scheme": scheme.to_dict(), "training": dict(training or {})},
        )
        if state is not None:
            torch.save({**state, "format": STATE_FORMAT}, tmp / TRAIN_STATE)
        history = (training or {}).get("history")
        if history:
            _write_log_csv(tmp / LOG_CSV, history)
    return path


def _write_log_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The training history as a table (loss terms, realised data shares), one row per log window."""
    import csv

    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)


def read_seg_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of a model folder: ``model``, ``scheme`` and ``training``."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise CheckpointError(f"{path}: no segmentation model folder here (expected {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a napari-diffmix segmentation model (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    return meta


def load_seg_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HoVerNet, SegModelInfo]:
    """The model (in eval mode, on ``device``) and its config, scheme and training record;
    ``path`` is a model folder or ``"demo"`` (the bundled one, see :func:`resolve_seg_model`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_seg_model(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no segmentation model folder here (expected {CONFIG} and {WEIGHTS})")
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{path}: a segmentation model folder needs {CONFIG} and {WEIGHTS}")
    meta = read_seg_meta(path)
    config = SegConfig.from_dict(meta.get("model", {}))
    try:
        scheme = ClassScheme.from_dict(meta.get("scheme", {}), source=str(cfg_path))
    except SchemeError as exc:
        raise CheckpointError(str(exc)) from None
    if scheme.num_classes != config.num_classes:
        raise CheckpointError(f"{cfg_path}: scheme has {scheme.num_classes} classes, the model {config.num_classes}")
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{w_path}: cannot read weights ({exc})") from None
    model = HoVerNet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{w_path}: weights do not fit the configured architecture: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, SegModelInfo(config, scheme, dict(meta.get("training", {})), path)


@dataclass
class SegRun:
    """A model folder written by training: the model, its info and its ``train_state.pt``."""

    model: HoVerNet
    info: SegModelInfo
    state: dict[str, Any]


def load_seg_run(path: str | os.PathLike) -> SegRun | None:
    """What ``--resume`` continues from: None when ``path`` holds nothing yet (a new run
    starts), else the model and its training state (CheckpointError if either is missing or
    unreadable). The state is read with ``weights_only``: tensors and plain data only."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    model, info = load_seg_model(path)
    state_path = path / TRAIN_STATE
    if not state_path.is_file():
        raise CheckpointError(
            f"{path}: the model has no training state ({TRAIN_STATE}), so its training cannot be resumed; "
            "pass --overwrite to train a new model there"
        )
    from ..model.checkpoint import load_tensors_only

    state = load_tensors_only(state_path, what="training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_path}: not a napari-diffmix segmentation training state (expected format {STATE_FORMAT!r})")
    return SegRun(model, info, state)
