"""Model checkpoints: the native single-file format and official guided-diffusion imports.

Native format
-------------
One ``.safetensors`` file. Its tensors are the model's state dict (guided-diffusion parameter
names, see :mod:`napari_diffmix.model.unet`); its header metadata holds one key,
``"napari_diffmix"``, whose value is a JSON document::

    {"format": "napari-diffmix-model", "version": 1,
     "unet": UNetConfig.to_dict(), "diffusion": {"num_timesteps": 1000, "schedule": "linear", ...},
     "default_guidance": 3.0, "scheme": ClassScheme.to_dict(), "extra": {...}}

A distilled student (:mod:`napari_diffmix.distill`) adds ``"distilled": {"method", "sampler",
"steps", "guidance", "teacher_sha256", ...}``: the sampler and step count it was trained for,
the teacher's guidance folded into its single forward (its ``default_guidance`` is 1), and the
teacher file's sha256. Such files are version 2, so that a reader that does not know students
refuses them instead of rendering them with a sampler they were not trained for.

One file rather than a folder because a model is picked, copied and verified as one thing
(a napari file dialog, a ``--model`` flag, ``sha256sum``); ``ModelInfo.sha256`` is the hash of
the file's bytes, the same as ``sha256sum`` prints. safetensors never executes code on load.

Official checkpoints
--------------------
The published DiffMix / SDM models are guided-diffusion ``.pt`` state dicts (EMA weights,
``ema_0.9999_*.pt``) carrying no configuration: load them with
``load_model(path, preset="diffmix-consep")`` (or ``config=`` and ``scheme=``). They are read
with ``torch.load(weights_only=True)``; a file that contains pickled Python objects is refused.
Key names equal ours, so no key map is involved; a checkpoint that does not fit the config is
reported with the first mismatched tensors and what the file's shapes say about its config.

Bundled demo model
------------------
The package ships (at most) one native model in :data:`BUNDLED_MODEL_DIR`
(``resources/models/demo``); :func:`bundled_model_path` finds it and
:func:`require_bundled_model` says how to get one when it is not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import atomic_path
from ..classes import ClassScheme, load_scheme
from ..errors import CheckpointError, DiffMixError, RenderError
from .unet import PRESET_SCHEMES, SDMUNet, UNetConfig

__all__ = ["ModelInfo", "save_model", "load_model", "read_info", "check_state_dict", "infer_config_fields",
           "bundled_model_path", "require_bundled_model", "BUNDLED_MODEL_DIR", "BUNDLED_STUDENT_DIR", "PUBLISHED_DIFFUSION",
           "PUBLISHED_GUIDANCE"]

FORMAT = "napari-diffmix-model"
FORMAT_VERSION = 2  # 1: plain models (still written for them); 2: distilled students
METADATA_KEY = "napari_diffmix"

# DiffMix / SDM: 1000 linear-beta steps, learned sigma; sampling with CFG scale 1.5.
PUBLISHED_DIFFUSION: dict[str, Any] = {"num_timesteps": 1000, "schedule": "linear", "learn_sigma": True}
PUBLISHED_GUIDANCE = 1.5
BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "resources" / "models" / "demo"
# The demo model's distilled student ("demo model (fast)"), beside it so that the demo folder
# itself keeps one model file.
BUNDLED_STUDENT_DIR = BUNDLED_MODEL_DIR / "fast"


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its model besides the weights."""

    config: UNetConfig
    scheme: ClassScheme
    diffusion: dict[str, Any]
    default_guidance: float
    sha256: str
    source: str
    format: str  # "native" or "guided-diffusion"
    extra: dict[str, Any] = field(default_factory=dict)
    distilled: dict[str, Any] | None = None  # a student's sampler, steps, guidance, teacher

    def default_sampling(self) -> dict[str, Any]:
        """The sampler and steps renderers start from: a student's own, else the fast settings."""
        from .samplers import FAST_SETTINGS

        if self.distilled:
            return {"sampler": self.distilled["sampler"], "steps": int(self.distilled["steps"])}
        return {"sampler": FAST_SETTINGS["sampler"], "steps": FAST_SETTINGS["steps"]}

    def summary(self) -> str:
        """A short name of what kind of model this is, for pickers and logs."""
        if self.distilled:
            return f"{int(self.distilled['steps'])}-step distilled model"
        return "diffusion model"

    def check_sampling(self, sampler: str, steps: int, guidance: float | None) -> None:
        """Refuse settings a distilled student was not trained for (its sampler, its step count,
        guidance 1 or None); any settings pass for other models."""
        if not self.distilled:
            return
        own = self.default_sampling()
        wrong = []
        if sampler != own["sampler"]:
            wrong.append(f"sampler {sampler!r}")
        if int(steps) != own["steps"]:
            wrong.append(f"{steps} steps")
        if guidance is not None and float(guidance) != 1.0:
            wrong.append(f"guidance {guidance:g}")
        if wrong:
            raise RenderError(
                f"{Path(self.source).name} is a {self.summary()} (sampler {own['sampler']}, {own['steps']} steps, "
                f"guidance {float(self.distilled['guidance']):g} of its teacher folded in) and renders only with those "
                f"settings, not {', '.join(wrong)}; leave sampler, steps and guidance at the model's defaults, or use its "
                "teacher for other settings"
            )


# ---------------------------------------------------------------------------------------------
# the bundled demo model
# ---------------------------------------------------------------------------------------------
def bundled_model_path(folder: str | os.PathLike | None = None) -> Path | None:
    """The bundled demo model, the one ``.safetensors`` file in ``folder`` (default
    :data:`BUNDLED_MODEL_DIR`); None when it is not installed."""
    folder = BUNDLED_MODEL_DIR if folder is None else Path(folder)
    # Hidden names are the temporaries of a model being written (atomic_path).
    found = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(".")) if folder.is_dir() else []
    if len(found) > 1:
        raise CheckpointError(
            f"{folder}: the bundled demo model is ambiguous ({[p.name for p in found]}); keep one .safetensors file there"
        )
    return found[0] if found else None


def require_bundled_model(instead: str = "pass --model", folder: str | os.PathLike | None = None) -> Path:
    """:func:`bundled_model_path`, or a :class:`CheckpointError` saying how to get a model (``instead``:
    the caller's alternative, e.g. "pass --model")."""
    path = bundled_model_path(folder)
    if path is None:
        raise CheckpointError(
            f"the bundled demo model is not installed (no .safetensors in {folder or BUNDLED_MODEL_DIR}); train one with "
            f"scripts/train_demo_model.py or {instead}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def save_model(
    model: SDMUNet,
    path: str | os.PathLike,
    *,
    scheme: ClassScheme | str,
    diffusion: Any = None,
    default_guidance: float | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    distilled: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` (pass the EMA model when there is one) as one native ``.safetensors``.

    ``diffusion``: the diffusion settings (a mapping, a dataclass such as ``DiffusionConfig``
    or an object with ``to_dict()``; default: the published 1000-step linear schedule).
    ``default_guidance``: the CFG scale samplers should start from (default 1.5, the paper's).
    ``extra``: JSON-serialisable provenance (training steps, dataset, ...). ``dtype`` stores
    the weights in another precision (e.g. ``torch.float16`` halves the file). ``distilled``:
    a student's sampling record (see the module docstring). The write is atomic. Returns the
    file's sha256.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: napari-diffmix models are single .safetensors files; name it '*.safetensors'")
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    if not isinstance(model, SDMUNet):
        raise CheckpointError(f"save_model needs an SDMUNet, got {type(model).__name__}")
    scheme = load_scheme(scheme)
    _check_scheme(scheme, model.config, str(path))
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION if distilled else 1,
        "unet": model.config.to_dict(),
        "diffusion": _diffusion_dict(diffusion, model.config),
        "default_guidance": float(PUBLISHED_GUIDANCE if default_guidance is None else default_guidance),
        "scheme": scheme.to_dict(),
        "extra": dict(extra or {}),
    }
    if distilled:
        _check_distilled(dict(distilled), str(path))
        document["distilled"] = dict(distilled)
    try:
        text = json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the model's metadata (diffusion / extra) is not JSON-serialisable: {exc}") from None

    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
        tensors[name] = tensor.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
        digest = file_sha256(tmp)
    return digest


def _diffusion_dict(diffusion: Any, config: UNetConfig) -> dict[str, Any]:
    if diffusion is None:
        return {**PUBLISHED_DIFFUSION, "learn_sigma": config.learn_sigma}
    if hasattr(diffusion, "to_dict"):
        diffusion = diffusion.to_dict()
    elif dataclasses.is_dataclass(diffusion) and not isinstance(diffusion, type):
        diffusion = dataclasses.asdict(diffusion)
    if not isinstance(diffusion, Mapping):
        raise CheckpointError(f"diffusion settings must be a mapping or a dataclass, got {type(diffusion).__name__}")
    return dict(diffusion)


def _check_distilled(record: dict[str, Any], source: str) -> None:
    from .samplers import SAMPLERS

    missing = [k for k in ("sampler", "steps", "guidance", "teacher_sha256") if k not in record]
    if missing:
        raise CheckpointError(f"{source}: the distilled-student record lacks {', '.join(missing)}")
    if record["sampler"] not in SAMPLERS or not isinstance(record["steps"], int) or record["steps"] < 1:
        raise CheckpointError(
            f"{source}: the distilled-student record names sampler {record['sampler']!r} with {record['steps']!r} steps; "
            f"expected one of {', '.join(SAMPLERS)} and a step count >= 1"
        )


def _check_scheme(scheme: ClassScheme, config: UNetConfig, source: str) -> None:
    if scheme.condition_channels != config.cond_channels:
        raise CheckpointError(
            f"{source}: class scheme {scheme.name!r} has {scheme.num_classes} classes "
            f"({scheme.condition_channels} condition channels) but the model takes {config.cond_channels} "
            f"condition channels ({config.num_classes} classes)"
        )


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (model files run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    preset: str | None = None,
    config: UNetConfig | None = None,
    scheme: ClassScheme | str | None = None,
    dtype: torch.dtype = torch.float32,
    sha256: str | None = None,
) -> tuple[SDMUNet, ModelInfo]:
    """Load a native ``.safetensors`` model or an official guided-diffusion ``.pt``.

    Native files carry their config and scheme; ``preset``/``config``/``scheme`` are for
    official ``.pt`` files only, which need ``preset`` (``diffmix-consep``,
    ``diffmix-glysac``, ...) or ``config`` + ``scheme``. The model is returned in eval mode on
    ``device`` with parameters in ``dtype``. ``sha256``: the file's digest when the caller
    already has it (from :func:`read_info`), so that a multi-GB file is not hashed twice.
    """
    path = Path(path)
    if _sniff(path, preset, config, scheme) == "native":
        info = _native_info(path, _native_metadata(path), sha256)
        model = _empty_model(info.config, device, dtype)
        _load_native_weights(model, path)
    else:
        state_dict = _read_official(path)
        info = _official_info(path, state_dict, preset, config, scheme, sha256)
        model = _empty_model(info.config, device, dtype)
        check_state_dict(model, _shapes(state_dict), source=str(path), official=True)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(_finite(state_dict[name], name, path))
    return model.eval(), info


def _finite(tensor: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    # NaN/Inf weights render black images without any other sign; checked per tensor as it is
    # copied, so a 2.6 GB file is read once.
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}; "
                "the model is broken (a diverged training run or a damaged file) and would render blank images"
            )
    return tensor


def _empty_model(config: UNetConfig, device: str | torch.device, dtype: torch.dtype) -> SDMUNet:
    # Built on the meta device and allocated uninitialised: no random init of 652 M parameters,
    # and weights are copied in one tensor at a time (peak memory ~ one model).
    with torch.device("meta"):
        model = SDMUNet(config).to(dtype)
    return model.to_empty(device=device)


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def read_info(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    config: UNetConfig | None = None,
    scheme: ClassScheme | str | None = None,
) -> ModelInfo:
    """A model's :class:`ModelInfo` without building the network.

    Official ``.pt`` files need ``preset`` (or ``config`` + ``scheme``) as in :func:`load_model`;
    their tensors are memory-mapped to check the shapes, not loaded.
    """
    path = Path(path)
    if _sniff(path, preset, config, scheme) == "native":
        return _native_info(path, _native_metadata(path))
    return _official_info(path, _read_official(path), preset, config, scheme)


def _sniff(path: Path, preset: str | None = None, config: UNetConfig | None = None, scheme: Any = None) -> str:
    """"native" or "official"; a native file refuses ``preset``/``config``/``scheme`` (it carries its own)."""
    kind = _file_kind(path)
    if kind == "native" and (preset is not None or config is not None or scheme is not None):
        raise CheckpointError(
            f"{path}: a napari-diffmix model file carries its own config and class scheme; "
            "preset/config/scheme are only for official guided-diffusion .pt files"
        )
    return kind


def _file_kind(path: Path) -> str:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; a napari-diffmix model is one .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "native"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "official"
    raise CheckpointError(
        f"{path}: neither a napari-diffmix model (.safetensors) nor a guided-diffusion checkpoint (.pt)"
    )


def _native_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read the safetensors file: {exc}") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path}: a safetensors file without napari-diffmix metadata (no config, class scheme or "
            "diffusion settings); save models with napari_diffmix.model.checkpoint.save_model"
        )
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the napari-diffmix metadata is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata is not a {FORMAT!r} document")
    version = document.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model file format version {version!r}; this napari-diffmix reads up to {FORMAT_VERSION} "
            "(update napari-diffmix)"
        )
    return document


def _native_info(path: Path, document: Mapping[str, Any], sha256: str | None = None) -> ModelInfo:
    try:
        config = UNetConfig.from_dict(document["unet"])
        scheme = ClassScheme.from_dict(document["scheme"])
        info = ModelInfo(
            config=config,
            scheme=scheme,
            diffusion=dict(document["diffusion"]),
            default_guidance=float(document["default_guidance"]),
            sha256=sha256 or file_sha256(path),
            source=str(path),
            format="native",
            extra=dict(document.get("extra") or {}),
            distilled=dict(document["distilled"]) if document.get("distilled") else None,
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: model metadata lacks the {exc.args[0]!r} entry") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (DiffMixError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model metadata: {exc}") from None
    _check_scheme(scheme, config, str(path))
    if info.distilled:
        _check_distilled(info.distilled, str(path))
    return info


def _load_native_weights(model: SDMUNet, path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            check_state_dict(model, shapes, source=str(path))
            with torch.no_grad():
                for name, tensor in model.state_dict().items():
                    tensor.copy_(_finite(fh.get_tensor(name), name, path))
    except CheckpointError:
        raise
    except Exception as exc:  # truncated / corrupt tensor data
        raise CheckpointError(f"{path}: cannot read the model weights: {exc}") from None


def load_tensors_only(
    path: str | os.PathLike,
    *,
    what: str = "checkpoint",
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
    hint: str = "",
) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one line of our own.

    A file holding pickled Python objects (code could run on unpickling) is refused naming the
    global it asks for, never with torch's advice to load it with ``weights_only=False``; a
    truncated or foreign file gives the first line of torch's reason. ``what`` names the file
    in the message on unreadable files ("training checkpoint"); ``hint`` is appended to the refusal. ``mmap`` maps a
    zip-format file instead of reading it (legacy files are read).
    """
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # legacy (non-zip) file
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ..."
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        if found is None:  # not a pickle torch can read at all (garbage, another format)
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
            reason = detail.group(1).strip().splitlines()[0] if detail else "not a torch file"
            raise CheckpointError(f"{path}: cannot read the {what}: not a torch file or damaged ({reason})") from None
        raise CheckpointError(
            f"{path}: refused: the file contains pickled Python objects (found {found.group(1)}), not only tensors; "
            f"unpickling could run code, so only tensors and plain containers are loaded{hint}"
        ) from None
    except Exception as exc:  # truncated archive, I/O errors, not a torch file
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot read the {what}: {type(exc).__name__}: {reason}") from None


def _read_official(path: Path) -> dict[str, torch.Tensor]:
    hint = "; re-save the weights with torch.save(model.state_dict(), path)"
    return _state_dict_from(load_tensors_only(path, mmap=True, hint=hint), path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        # Training scripts commonly nest the weights under one of these keys.
        for key in ("state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: does not hold a state dict (a mapping of parameter names to tensors); found {keys}"
        )
    state_dict = dict(obj)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# Tensors whose shapes reveal config fields, and how.
_INFERABLE = {
    "model_channels": ("time_embed.0.weight", 1),
    "in_channels": ("input_blocks.0.0.weight", 1),
    "cond_channels": ("middle_block.0.in_norm.mlp_shared.0.weight", 1),
    "spade_hidden": ("middle_block.0.in_norm.mlp_shared.0.weight", 0),
}


def infer_config_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Config fields that a guided-diffusion/SDM state dict's tensor shapes (name -> shape) determine."""
    found: dict[str, Any] = {}
    for name, (key, dim) in _INFERABLE.items():
        shape = shapes.get(key)
        if shape is not None and len(shape) > dim:
            found[name] = int(shape[dim])
    out = shapes.get("out.2.weight")
    if out is not None and "in_channels" in found:
        found["learn_sigma"] = int(out[0]) == 2 * found["in_channels"]
    return found


def _matching_presets(inferred: Mapping[str, Any]) -> list[str]:
    return [
        name for name in UNetConfig.preset_names()
        if all(getattr(UNetConfig.preset(name), k) == v for k, v in inferred.items())
    ]


def _official_info(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    preset: str | None,
    config: UNetConfig | None,
    scheme: ClassScheme | str | None,
    sha256: str | None = None,
) -> ModelInfo:
    inferred = infer_config_fields(_shapes(state_dict))
    described = ", ".join(f"{k}={v}" for k, v in inferred.items()) or "nothing"
    if preset is None and config is None:
        matches = _matching_presets(inferred)
        hint = f"; its tensor shapes match preset {matches[0]!r}" if len(matches) == 1 else ""
        raise CheckpointError(
            f"{path}: an official guided-diffusion checkpoint carries no model config: pass preset= / --preset "
            f"({', '.join(UNetConfig.preset_names())}) or config= and scheme= (inferred from the file: "
            f"{described}{hint})"
        )
    if config is None:
        config = UNetConfig.preset(preset)
    if scheme is None:
        if preset is None:
            raise CheckpointError(f"{path}: with config= also pass scheme= (the class scheme the model was trained on)")
        scheme = PRESET_SCHEMES[preset.lower()]
    scheme = load_scheme(scheme)
    wrong = {k: (v, getattr(config, k)) for k, v in inferred.items() if getattr(config, k) != v}
    if wrong:
        matches = _matching_presets(inferred)
        hint = f"; preset {matches[0]!r} fits this file" if len(matches) == 1 else ""
        raise CheckpointError(
            f"{path}: checkpoint does not match the {'preset ' + repr(preset) if preset else 'given config'}: "
            + ", ".join(f"the file has {k}={v}, the config {c}" for k, (v, c) in wrong.items())
            + f" (inferred from tensor shapes: {described}){hint}"
        )
    _check_scheme(scheme, config, str(path))
    return ModelInfo(
        config=config,
        scheme=scheme,
        diffusion={**PUBLISHED_DIFFUSION, "learn_sigma": config.learn_sigma},
        default_guidance=PUBLISHED_GUIDANCE,
        sha256=sha256 or file_sha256(path),
        source=str(path),
        format="guided-diffusion",
        extra={"preset": preset} if preset else {},
    )


def check_state_dict(
    model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], *, source: str, official: bool = False
) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped tensors.

    ``shapes`` maps the checkpoint's tensor names to their shapes.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [
        f"{k}: file {tuple(shapes[k])} vs model {expected[k]}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f", ... ({len(items) - 4} more)" if len(items) > 4 else ""
            parts.append(f"{len(items)} {label}: " + ", ".join(items[:4]) + more)
    inferred = infer_config_fields(shapes)
    hint = (
        " Inferred from the file's tensor shapes: " + ", ".join(f"{k}={v}" for k, v in inferred.items())
        + "; other differences (channel_mult, num_res_blocks, attention_resolutions) show in the key lists."
        if official and inferred else ""
    )
    raise CheckpointError(f"{source}: checkpoint does not match the model config. " + "; ".join(parts) + "." + hint)
