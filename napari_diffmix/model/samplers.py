"""Samplers for the label-conditioned diffusion model, as generators of per-step records.

Every sampler run is a generator yielding one :class:`StepRecord` per denoising step (the
state ``x_t`` after the step and the current clean-image prediction ``pred_x0``); the last
record carries the final sample. Progress, live previews and cancellation come for free:
iterate, show :func:`preview` of a record, stop iterating (``gen.close()``). A run keeps its
state in local variables only: no global RNG use (``torch.Generator`` per batch item), no
grad-mode or autocast state held across a ``yield``, no threads, no files.

Solvers are diffusers' maintained schedulers (DDIM, DDPM, DPM-Solver++(2M), UniPC) fed with
this package's beta table. Hand-written here is only what they lack: classifier-free guidance
on the encoder/decoder split with a SPADE cache, SDEdit starts at a fraction of the schedule
(noising with our float64 tables), DPM-Solver++ steps evenly spaced in log-SNR from an SDEdit
start (:func:`log_snr_timesteps`), masked local edits, per-item seeding, and tiled
(MultiDiffusion-style) rendering of canvases larger than the model.

Classifier-free guidance: ``eps = eps(empty) + s * (eps(y) - eps(empty))`` on the epsilon
channels, the empty condition being all zeros; the learned-variance channels come from the
conditional branch. ``s = 1`` is the plain conditional model (one branch), ``s = 0`` the
unconditional one. With ``cfg="batched"`` (default) both branches share one encoder pass (the
encoder never sees the labels) and run as one decoder batch (on CPUs as two decoder passes,
which measured faster there: ``Sampler(cfg_decoder=...)``); ``cfg="separate"`` runs two full
forwards per step with no cache, exactly as the DiffMix reference code does.

Two presets:

* :data:`FAST_SETTINGS` (the product default): DPM-Solver++(2M), 15 steps evenly spaced in
  log-SNR, batched CFG; with a :class:`Sampler` (SPADE cache on, precision "auto"). 15 steps
  land within 1-2/255 of 100-step DDIM from the same noise on the demo model
  (:func:`ode_agreement`, tested); steps even in time were 5x further off.
* :data:`DIFFMIX_SETTINGS` (the published sampling): 100-step DDIM respacing, start from the
  original patch noised to 55 % of the schedule (SDEdit) and take 55 deterministic DDIM steps,
  CFG 1.5 as two forwards per step. Pass the original image as ``init_image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DiffMixError, LabelError, RenderError
from ..progress import progress_bar
from ..runtime import resolve_precision
from .diffusion import DiffusionConfig, GaussianDiffusion
from .unet import SpadeCache

__all__ = [
    "SAMPLERS",
    "FAST_SETTINGS",
    "DIFFMIX_SETTINGS",
    "StepRecord",
    "Sampler",
    "sample",
    "free_bytes",
    "to_uint8",
    "from_uint8",
    "preview",
    "condition_key",
    "tile_windows",
    "blend_weights",
    "edit_windows",
    "EDIT_CONTEXT",
    "ode_agreement",
    "log_snr_timesteps",
    "TIMESTEP_SPACING",
]

# "ddim-logsnr": deterministic DDIM on log-SNR-even steps, the sampler distilled students are
# trained for (napari_diffmix.distill); any model can use it.
SAMPLERS = ("dpm++2m", "ddim", "ddpm", "unipc", "ddim-logsnr")
CFG_MODES = ("batched", "separate")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

FAST_SETTINGS: Mapping[str, Any] = MappingProxyType({"sampler": "dpm++2m", "steps": 15, "cfg": "batched"})
DIFFMIX_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {"sampler": "ddim", "steps": 100, "strength": 0.55, "eta": 0.0, "guidance": 1.5, "cfg": "separate"}
)


@dataclass(frozen=True)
class StepRecord:
    """One denoising step. ``x_t``/``pred_x0`` are model-space (N, 3, H, W) float32 tensors.

    ``step`` counts from 1 to ``total``; ``t`` is the (original) timestep the model was
    evaluated at. On the last record (``done``) ``x_t`` is the final sample. ``seeds`` are the
    per-item seeds, so any item can be reproduced alone.
    """

    step: int
    total: int
    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor
    seeds: tuple[int, ...]

    @property
    def done(self) -> bool:
        return self.step == self.total

    def images(self) -> np.ndarray:
        """The final sample (or the current prediction before the end) as uint8 (N, H, W, 3)."""
        return to_uint8(self.x_t if self.done else self.pred_x0)


# ---------------------------------------------------------------------------------------------
# image conversions
# ---------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space images (N, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected model-space images (N, 3, H, W), got shape {tuple(x.shape)}")
    x = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 RGB images (H, W, 3) or (N, H, W, 3) -> model space float32 (N, 3, H, W) in [-1, 1]."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise DiffMixError(f"images must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DiffMixError(f"images must be (H, W, 3) or (N, H, W, 3) RGB, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(device) if device is not None else x


def preview(record_or_x: StepRecord | torch.Tensor, index: int = 0, max_side: int = 512) -> np.ndarray:
    """A cheap uint8 (h, w, 3) view of one item: the record's ``pred_x0`` (the final sample on the
    last record), subsampled by an integer stride so that neither side exceeds ``max_side``."""
    if isinstance(record_or_x, StepRecord):
        x = record_or_x.x_t if record_or_x.done else record_or_x.pred_x0
    else:
        x = record_or_x if record_or_x.ndim == 4 else record_or_x[None]
    item = x[index]
    stride = max(1, math.ceil(max(item.shape[-2:]) / max_side))
    return to_uint8(item[:, ::stride, ::stride])[0]


def condition_key(cond: torch.Tensor) -> str:
    """Content hash of a condition tensor (shape, dtype and values): the SPADE cache key."""
    data = cond.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------------
def _axis_starts(length: int, size: int, overlap: int) -> list[int]:
    if length <= size:
        return [0]
    count = math.ceil((length - overlap) / (size - overlap))
    return sorted({int(round(s)) for s in np.linspace(0, length - size, count)})


def tile_windows(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows ``(y0, x0, h, w)`` covering a canvas, each ``size`` square (or the
    whole side when the canvas is smaller), neighbours overlapping by at least ``overlap``."""
    if size < 1 or not 0 <= overlap < size:
        raise DiffMixError(f"tiles need size >= 1 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    return [
        (y, x, min(size, height), min(size, width))
        for y in _axis_starts(height, size, overlap)
        for x in _axis_starts(width, size, overlap)
    ]


def blend_weights(height: int, width: int, overlap: int) -> torch.Tensor:
    """Window weight (h, w): 1 inside, a linear ramp over ``overlap`` px at each edge, never 0.

    Model outputs of overlapping windows are averaged with these weights at every step, so seams
    fade from one window to the next instead of showing as edges (MultiDiffusion).
    """

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(torch.ones(n), torch.minimum(i + 1, n - i) / (overlap + 1))

    return ramp(height)[:, None] * ramp(width)[None, :]


# Pixels of context around an edit that a local edit renders with it (``Sampler.sample``'s
# ``edit_context="auto"``): a quarter of the model's training crop, at least 16 px. On the demo
# model (64 px crops) a moved nucleus rendered with 16 px of context differed from the
# whole-canvas edit by 5.8 grey levels inside the edit, with 32 px by 5.0, and another seed by
# 6.7, with no visible seam; 16 px took 40 % of 32 px's time (docs/design-notes.md).
EDIT_CONTEXT = "auto"


def _fit(start: int, length: int, size: int, multiple: int) -> tuple[int, int]:
    """Grow ``[start, start + length)`` to a multiple of ``multiple`` (centred) inside ``[0, size)``."""
    grown = min(size, -(-length // multiple) * multiple)
    start -= (grown - length) // 2
    return min(max(start, 0), size - grown), grown


def edit_windows(
    mask: np.ndarray | torch.Tensor, context: int, multiple: int = 1
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y0, x0, h, w)`` that cover the true pixels of ``mask`` ((H, W), or (N, H, W)
    for a batch: their union) with ``context`` px around them, sides rounded up to ``multiple``.

    Edits further apart than twice the context get windows of their own; windows that would
    overlap are merged into one. When the windows together are no smaller than the canvas the
    canvas itself is the one window. An empty mask gives no window.
    """
    from scipy import ndimage

    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.astype(bool)
    while m.ndim > 2:
        m = m.any(axis=0)
    height, width = m.shape
    if not m.any():
        return []
    context = max(0, int(context))
    # Edits whose context squares touch form one component; each component's box is its edits'
    # box grown by the context.
    grown = ndimage.maximum_filter(m, size=2 * context + 1) if context else m
    labels, _ = ndimage.label(grown)
    boxes = []
    for sl in ndimage.find_objects(labels):
        y0, x0 = sl[0].start, sl[1].start
        y1, x1 = sl[0].stop, sl[1].stop
        boxes.append((y0, x0, y1 - y0, x1 - x0))

    def rounded(box):
        y, x, h, w = box
        y, h = _fit(y, h, height, multiple)
        x, w = _fit(x, w, width, multiple)
        return (y, x, h, w)

    def overlap(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    boxes = [rounded(b) for b in boxes]
    merged = True
    while merged:  # rounding can make neighbours overlap; merging can make new overlaps
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if overlap(a, b):
                    y0, x0 = min(a[0], b[0]), min(a[1], b[1])
                    y1, x1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
                    boxes[i] = rounded((y0, x0, y1 - y0, x1 - x0))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    if sum(h * w for _, _, h, w in boxes) >= height * width:
        return [(0, 0, height, width)]
    return sorted(boxes)


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
def _cpu_compile_missing() -> str | None:
    """What torch.compile's CPU backend (C++ kernels that include Python.h) lacks here, or None."""
    import shutil
    import sys
    import sysconfig

    # Inductor runs $CXX, else g++ (clang++ on macOS), and no other.
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if not shutil.which(compiler):
        return f"a C++ compiler ({compiler!r} is not on the PATH; set $CXX to another)"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        return f"Python's C headers ({headers}, e.g. from the python3-dev package)"
    return None


# ---------------------------------------------------------------------------------------------
# schedulers (diffusers)
# ---------------------------------------------------------------------------------------------
# How each solver spaces its steps over the schedule; stores record it with the settings, since
# the same solver and step count give other images under another spacing.
TIMESTEP_SPACING: Mapping[str, str] = MappingProxyType(
    {"dpm++2m": "log-snr", "unipc": "linspace", "ddim": "leading", "ddpm": "leading", "ddim-logsnr": "log-snr"}
)


def _make_scheduler(name: str, base: GaussianDiffusion):
    import diffusers

    # Clipping of x0 happens before the scheduler sees the output (see Sampler._run), so all
    # schedulers run with clipping/thresholding off.
    common = dict(
        num_train_timesteps=base.config.num_timesteps, trained_betas=base.betas, prediction_type="epsilon"
    )
    if name == "ddim":
        # "leading" spacing with offset 0 is improved-diffusion's "ddimN" respacing (0, 10, ..., 990
        # for N = 100) and alpha_bar_prev = 1 after t = 0, as in guided-diffusion.
        return diffusers.DDIMScheduler(
            **common, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=TIMESTEP_SPACING[name]
        )
    if name == "ddpm":
        variance = "learned_range" if base.config.learn_sigma else "fixed_large"
        return diffusers.DDPMScheduler(
            **common, variance_type=variance, clip_sample=False, timestep_spacing=TIMESTEP_SPACING[name]
        )
    # dpm++2m's log-SNR timesteps are passed to set_timesteps; "linspace" is UniPC's spacing.
    solver = dict(solver_order=2, lower_order_final=True, timestep_spacing=TIMESTEP_SPACING["unipc"], thresholding=False)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler(**common, **solver, algorithm_type="dpmsolver++")
    return diffusers.UniPCMultistepScheduler(**common, **solver, predict_x0=True, solver_type="bh2")


def log_snr_timesteps(alphas_cumprod: np.ndarray, start: int, n: int) -> list[int]:
    """``n`` integer timesteps from ``start`` towards 0, evenly spaced in log-SNR.

    The points are ``n + 1`` log-SNR-even ones from ``start`` to 0, less the last: the solver's
    final step goes to sigma = 0 by itself, so evaluating the model at t = 0 (sigma ~ 0.01) would
    spend a step on nothing (in a trial on the demo model this way landed closer to 100-step
    DDIM). With ``n = start + 1`` every timestep down to 0 is used.

    DPM-Solver++ steps in log-SNR, so even spacing there gives every step the same share of
    the work; steps even in time crowd the high-noise end and leave the last, detail-forming
    steps long, which showed as a fine grain with few steps (HF noise 1.9x real at 15 steps
    with the demo model; see docs/design-notes.md). This is diffusers' ``use_lu_lambdas``,
    written here because that option only spans the whole schedule, and an SDEdit run needs the
    same spacing from its own start.
    """
    if not 1 <= n <= start + 1:
        raise DiffMixError(f"{n} steps do not fit between timestep {start} and 0")
    if n == start + 1:
        return list(range(start, -1, -1))
    m = n + 1
    log_sigma = 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)  # increasing in t
    targets = np.linspace(log_sigma[start], log_sigma[0], m)
    steps = np.round(np.interp(targets, log_sigma, np.arange(len(log_sigma)))).astype(np.int64)
    steps[0] = start
    # Rounding merges neighbours near t = 0 when n is large: keep them strictly decreasing, each
    # leaving room for the ones after it (m <= start + 1, so this always fits).
    for i in range(1, m):
        steps[i] = max(min(steps[i], steps[i - 1] - 1), m - 1 - i)
    return [int(t) for t in steps[:-1]]


def _resolve_diffusion(diffusion: Any, model: torch.nn.Module) -> GaussianDiffusion:
    learn_sigma = getattr(getattr(model, "config", None), "learn_sigma", True)
    if diffusion is None:
        return GaussianDiffusion(DiffusionConfig(learn_sigma=learn_sigma))
    if isinstance(diffusion, GaussianDiffusion):
        config = diffusion.config
    elif isinstance(diffusion, DiffusionConfig):
        config = diffusion
    elif isinstance(diffusion, Mapping):
        config = DiffusionConfig.from_dict({"learn_sigma": learn_sigma, **diffusion})
    else:
        raise DiffMixError(
            f"diffusion must be a DiffusionConfig, GaussianDiffusion or a settings mapping, got {type(diffusion).__name__}"
        )
    if config.learn_sigma != learn_sigma:
        raise DiffMixError(
            f"the diffusion settings say learn_sigma={config.learn_sigma} but the model was built with "
            f"learn_sigma={learn_sigma}"
        )
    # Samplers work on the original timesteps; a respaced diffusion only lends its config.
    return GaussianDiffusion(config)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now, or None where it cannot be asked."""
    if device.type == "cuda":
        # Memory PyTorch's allocator holds but does not use is free to this process: without it a
        # long-lived widget's SPADE budget shrank after every render.
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def _randn(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard normal noise, item i drawn from generators[i] on the CPU (device-independent)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def _seeds(seed: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    if seed is None:  # fresh seeds without touching any global RNG
        rng = random.SystemRandom()
        return tuple(rng.randrange(2**31) for _ in range(n))
    if isinstance(seed, (int, np.integer)):
        return tuple(int(seed) + i for i in range(n))
    seeds = tuple(int(s) for s in seed)
    if len(seeds) != n:
        raise DiffMixError(f"got {len(seeds)} seeds for a batch of {n} conditions")
    return seeds


def _init_tensor(image: torch.Tensor | np.ndarray, n: int, height: int, width: int) -> torch.Tensor:
    if isinstance(image, np.ndarray) or (isinstance(image, torch.Tensor) and image.dtype == torch.uint8):
        init = from_uint8(image)
    elif isinstance(image, torch.Tensor):
        init = image[None] if image.ndim == 3 else image
        if init.ndim != 4 or init.shape[1] != 3 or not init.is_floating_point():
            raise DiffMixError(
                f"init_image must be model-space (N, 3, H, W) floats or uint8 (N, H, W, 3), "
                f"got {init.dtype} {tuple(init.shape)}"
            )
    else:
        raise DiffMixError(f"init_image must be a tensor or numpy array, got {type(image).__name__}")
    if init.shape[0] == 1 and n > 1:
        init = init.expand(n, -1, -1, -1)
    if init.shape[0] != n or tuple(init.shape[-2:]) != (height, width):
        raise DiffMixError(
            f"init_image is {init.shape[0]} x {init.shape[-2]}x{init.shape[-1]} but the condition is "
            f"{n} x {height}x{width}"
        )
    return init.float()


def _mask_tensor(mask: torch.Tensor | np.ndarray, n: int, height: int, width: int) -> torch.Tensor:
    """(N, 1, H, W) bool, true where the edit re-renders."""
    mask_t = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if mask_t.ndim == 2:
        mask_t = mask_t[None]
    if mask_t.ndim == 4 and mask_t.shape[1] == 1:
        mask_t = mask_t[:, 0]
    if mask_t.ndim != 3 or tuple(mask_t.shape[-2:]) != (height, width) or mask_t.shape[0] not in (1, n):
        raise LabelError(
            f"the edit mask must be (H, W) or (N, H, W) matching the condition {n} x {height}x{width}, "
            f"got shape {tuple(mask_t.shape)}"
        )
    return (mask_t != 0).expand(n, -1, -1)[:, None]


@dataclass(frozen=True)
class _Run:
    """Everything a validated sampling call needs."""

    cond: torch.Tensor
    sampler: str
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    init: torch.Tensor | None
    strength: float | None
    mask: torch.Tensor | None
    eta: float
    clip: bool
    cfg: str
    windows: list[tuple[int, int, int, int]] | None
    overlap: int
    cond_key: str | None
    spade_budget: int | None  # bytes of SPADE cache per window
    should_stop: Callable[[], bool] | None = None
    noise: torch.Tensor | None = None

    @property
    def total(self) -> int:
        """Steps this run takes: all of them, or ``floor(strength * steps)`` for SDEdit."""
        return self.steps if self.strength is None else math.floor(self.strength * self.steps + 1e-9)


class _Stopped(Exception):
    """``should_stop`` said so inside a step: the run ends without finishing that step."""


class Sampler:
    """A model with its diffusion and SPADE caches, ready to sample label maps into images.

    The sampler owns the model while it lives: it may convert it to ``channels_last`` and
    switches it to eval mode during a run (restored afterwards). The SPADE parameters of the
    current condition (per tile when tiling) are computed once and kept until a different
    condition arrives (keyed by :func:`condition_key`); those of the all-zero condition are
    memoised by the model itself. ``cache=False`` recomputes them inside every decoder pass;
    ``cache_max_bytes`` caps the condition's cache, all tiles together (default: half of the
    device memory free when a run starts); layers beyond the budget are computed at every step,
    the layers saving the most compute per byte are kept. The zero-condition cache is one
    image's worth per size (broadcast over the batch).
    ``precision`` "bf16"/"fp16" runs the network under autocast and stores the cache in that
    precision (half the memory); "auto" (default) picks one for the device
    (:func:`resolve_precision`; ``self.precision`` is the choice), "fp32" gives results that do
    not depend on the hardware; ``compile`` wraps the encoder/decoder in ``torch.compile``.
    ``cfg_decoder``: under batched CFG both branches share one encoder pass; "joint" decodes them
    as one batch of 2N, "split" as two passes of N, "auto" = split on CPU, joint elsewhere.
    ``tile_batch``: windows of one size (tiles, local-edit windows) evaluated per network call,
    default all of them (one call per step instead of one per window; a smaller batch bounds the
    activations' memory and lets ``should_stop`` act between calls).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: DiffusionConfig | GaussianDiffusion | Mapping[str, Any] | None = None,
        *,
        cache: bool = True,
        cache_max_bytes: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        precision: str = "auto",
        cfg_decoder: str = "auto",
        tile_batch: int | None = None,
    ):
        if tile_batch is not None and int(tile_batch) < 1:
            raise DiffMixError(f"tile_batch must be >= 1 or None, got {tile_batch!r}")
        self.tile_batch = None if tile_batch is None else int(tile_batch)
        if cfg_decoder not in ("auto", "joint", "split"):
            raise DiffMixError(f"cfg_decoder must be 'auto', 'joint' or 'split', got {cfg_decoder!r}")
        self.model = model
        self.diffusion = _resolve_diffusion(diffusion, model)
        self.cache = bool(cache)
        self.cache_max_bytes = cache_max_bytes
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        self._forward = model
        self._encode = getattr(model, "encode", None)
        self._decode = getattr(model, "decode", None)
        if compile:
            missing = _cpu_compile_missing() if self.device.type == "cpu" else None
            if missing:
                # Inductor would fail only at the first step, deep inside its C++ build.
                raise DiffMixError(f"compile=True on the CPU needs {missing}; install it or leave compile off")
            self._forward = torch.compile(model)
            if self._encode is not None:
                self._encode, self._decode = torch.compile(self._encode), torch.compile(self._decode)
        # One decoder pass on the 2N batch suits accelerators; on CPUs two passes of N were faster
        # (demo model, 256 px: -15 to -20 %; published model: -3 %), large batches of large
        # feature maps falling out of cache. Same numbers either way.
        if cfg_decoder == "auto":
            cfg_decoder = "split" if self.device.type == "cpu" else "joint"
        self.cfg_decoder = cfg_decoder
        self._spade_key: tuple | None = None
        self._spade: dict[tuple[int, int, int, int], Any] = {}

    # -- public API ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        """Drop the cached SPADE parameters of the current condition."""
        self._spade_key, self._spade = None, {}

    def sample(
        self,
        cond: torch.Tensor,
        *,
        sampler: str = "dpm++2m",
        steps: int = 15,
        guidance: float = 1.5,
        seed: int | Sequence[int] | None = None,
        init_image: torch.Tensor | np.ndarray | None = None,
        strength: float | None = None,
        mask: torch.Tensor | np.ndarray | None = None,
        eta: float = 0.0,
        clip_denoised: bool = True,
        cfg: str = "batched",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        edit_context: int | str | None = EDIT_CONTEXT,
        should_stop: Callable[[], bool] | None = None,
        noise: torch.Tensor | None = None,
    ) -> Iterator[StepRecord]:
        """Render images for conditions ``cond`` ((N, C+2, H, W) or (C+2, H, W)); a generator.

        ``sampler``: "dpm++2m" | "unipc" (few-step ODE solvers), "ddim" (``eta`` 0 =
        deterministic) or "ddpm" (ancestral, learned variance). ``steps``: respaced steps of the
        whole schedule. ``guidance``: CFG scale. ``seed``: int (item i uses ``seed + i``), a list
        of one seed per item, or None (fresh random seeds, reported in the records).
        ``init_image`` (model-space (N, 3, H, W) or uint8 (N, H, W, 3)) with ``strength`` in
        (0, 1]: SDEdit, i.e. start from that image noised to ``strength`` of the schedule and run
        ``floor(strength * steps)`` steps: the last ones of the schedule, or for "dpm++2m" as
        many log-SNR-even steps from the same starting noise level. ``mask`` ((N, H, W) or (H, W), true = render)
        with ``init_image``: local edit; outside the mask the result is ``init_image`` exactly
        and, at every step, the image noised to that step's level. ``tile_size``: render canvases
        larger than this in overlapping square windows (``tile_overlap`` px, default a quarter),
        blending the model outputs at every step. ``clip_denoised``: clamp the x0 prediction to
        [-1, 1] at every step (and use the epsilon consistent with it), as the reference does.
        ``cfg``: "batched" (shared encoder pass, SPADE cache, see ``cfg_decoder``) or "separate"
        (two full forwards per step, no cache: the reference behaviour).
        ``edit_context``: with a ``mask``, the network runs only on windows covering the mask
        grown by this many px (:func:`edit_windows`; "auto" = a quarter of the model's training
        size, at least 16),
        not on the whole canvas; outside them every step keeps the noised ``init_image`` anyway.
        None runs the whole canvas. ``should_stop``: polled between windows and between the two
        CFG branches; when it returns True the generator ends without finishing the step (to
        stop between steps, just stop iterating). ``noise``: start from this (N, 3, H, W) noise
        instead of the seeds' (the distiller pairs a teacher's run with the noise it started from).

        Arguments are checked when this is called; the work happens while iterating.
        """
        return self._run(self._validate(
            cond, sampler=sampler, steps=steps, guidance=guidance, seed=seed, init_image=init_image,
            strength=strength, mask=mask, eta=eta, clip_denoised=clip_denoised, cfg=cfg,
            tile_size=tile_size, tile_overlap=tile_overlap, edit_context=edit_context, should_stop=should_stop,
            noise=noise,
        ))

    def generate(self, cond: torch.Tensor, *, pbar: Any | None = None, **kwargs: Any) -> StepRecord:
        """Run :meth:`sample` to the end with a progress bar; returns the last record."""
        last = None
        with progress_bar(pbar, None, "sampling", unit="step") as bar:
            for last in self.sample(cond, **kwargs):
                if last.step == 1:
                    bar.total = last.total
                bar.update(1)
        return last

    # -- validation ----------------------------------------------------------------------------
    def _validate(self, cond, *, sampler, steps, guidance, seed, init_image, strength, mask, eta, clip_denoised,
                  cfg, tile_size, tile_overlap, edit_context=None, should_stop=None, noise=None) -> _Run:
        device = self.device
        if sampler not in SAMPLERS:
            raise DiffMixError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if cfg not in CFG_MODES:
            raise DiffMixError(f"cfg must be one of {', '.join(CFG_MODES)}, got {cfg!r}")
        if cfg == "batched" and (self._encode is None or self._decode is None):
            raise DiffMixError("batched CFG needs a model with encode/decode (SDMUNet); use cfg='separate'")
        num_timesteps = self.diffusion.config.num_timesteps
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
            raise DiffMixError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}")
        if sampler in ("dpm++2m", "unipc") and steps < 2:
            raise DiffMixError(f"{sampler} needs at least 2 steps, got {steps}")
        if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise DiffMixError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if not 0.0 <= eta <= 1.0:
            raise DiffMixError(f"eta must be in [0, 1], got {eta!r}")
        if eta and sampler != "ddim":
            raise DiffMixError(f"eta only applies to the ddim sampler, not {sampler!r}")

        if not isinstance(cond, torch.Tensor):
            raise LabelError(f"the condition must be a torch tensor (see model.condition), got {type(cond).__name__}")
        if cond.ndim == 3:
            cond = cond[None]
        if cond.ndim != 4 or not cond.is_floating_point():
            raise LabelError(f"the condition must be a float tensor (N, C+2, H, W), got {cond.dtype} {tuple(cond.shape)}")
        expected = getattr(getattr(self.model, "config", None), "cond_channels", cond.shape[1])
        if cond.shape[1] != expected:
            raise LabelError(
                f"the condition has {cond.shape[1]} channels but the model expects {expected} "
                f"(background + {expected - 2} classes + edges); use labels of the model's class scheme"
            )
        n, _, height, width = cond.shape
        cond = cond.to(device=device, dtype=torch.float32)

        seeds = _seeds(seed, n)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n, 3, height, width):
                raise DiffMixError(f"noise must be a tensor of shape {(n, 3, height, width)}, got {getattr(noise, 'shape', type(noise))}")
            noise = noise.to(device=device, dtype=torch.float32)
        init = None if init_image is None else _init_tensor(init_image, n, height, width).to(device)
        if strength is not None:
            if init is None:
                raise DiffMixError("strength (SDEdit) needs an init_image to start from")
            if not 0.0 < strength <= 1.0:
                raise DiffMixError(f"strength must be in (0, 1], got {strength!r}")
            if math.floor(strength * steps + 1e-9) < 1:  # the same count as _Run.total
                raise DiffMixError(f"strength {strength} of {steps} steps leaves no step to run")
        if init is not None and strength is None and mask is None:
            raise DiffMixError("an init_image needs strength (SDEdit) and/or a mask (local edit)")
        if mask is not None and init is None:
            raise DiffMixError("a mask (local edit) needs the init_image whose unmasked part it keeps")
        mask_t = None if mask is None else _mask_tensor(mask, n, height, width).to(device)

        windows = None
        overlap = 0
        multiple = getattr(getattr(self.model, "config", None), "size_multiple", 1)
        if tile_size is not None:
            if tile_size % multiple:
                raise DiffMixError(f"tile_size must be a multiple of {multiple} for this model, got {tile_size}")
            overlap = tile_size // 4 if tile_overlap is None else int(tile_overlap)
            windows = tile_windows(height, width, int(tile_size), overlap)
        if mask_t is not None and edit_context is not None:
            boxes = edit_windows(mask_t, self.edit_context_px(edit_context), multiple)
            if tile_size is not None:  # windows larger than a tile are tiled in turn
                boxes = [
                    (y + ty, x + tx, th, tw)
                    for (y, x, h, w) in boxes
                    for (ty, tx, th, tw) in tile_windows(h, w, int(tile_size), overlap)
                ]
            windows = boxes
        if windows is not None and windows == [(0, 0, height, width)]:
            windows = None
        cond_key = condition_key(cond) if self.cache and cfg == "batched" and guidance != 0 else None
        budget = self._spade_budget(len(windows) if windows else 1) if cond_key else None
        return _Run(cond, sampler, int(steps), float(guidance), seeds, init, strength, mask_t, float(eta),
                    bool(clip_denoised), cfg, windows, overlap, cond_key, budget, should_stop, noise)

    def edit_context_px(self, edit_context: int | str) -> int:
        """The px of context a local edit renders around its mask for ``edit_context`` ("auto" or px)."""
        if edit_context == "auto":
            size = getattr(getattr(self.model, "config", None), "image_size", 64)
            return max(16, int(size) // 4)
        if isinstance(edit_context, (int, np.integer)) and not isinstance(edit_context, bool) and edit_context >= 0:
            return int(edit_context)
        raise DiffMixError(f"edit_context must be 'auto', None or a number of px >= 0, got {edit_context!r}")

    # -- the loop ------------------------------------------------------------------------------
    def _run(self, run: _Run) -> Iterator[StepRecord]:
        base = self.diffusion
        device = self.device
        n, _, height, width = run.cond.shape
        generators = [torch.Generator("cpu").manual_seed(s) for s in run.seeds]
        noise = _randn(generators, (3, height, width), device) if run.noise is None else run.noise

        total = run.total
        scheduler = None if run.sampler == "ddim-logsnr" else _make_scheduler(run.sampler, base)
        if scheduler is None:
            # A student learned exactly these steps: SDEdit runs the last `total` of them rather
            # than a new spacing from its own start (which it never saw).
            timesteps = log_snr_timesteps(base.alphas_cumprod, base.config.num_timesteps - 1, run.steps)
        else:
            if run.sampler == "dpm++2m":
                # SDEdit starts at the noise level of the time-even schedule's first kept step (so a
                # strength means what it means for the other solvers); the steps are then log-SNR even.
                start_t = round((base.config.num_timesteps - 1) * total / run.steps)
                scheduler.set_timesteps(timesteps=log_snr_timesteps(base.alphas_cumprod, start_t, total))
            else:
                scheduler.set_timesteps(run.steps)
            timesteps = [int(t) for t in scheduler.timesteps]
        start = len(timesteps) - total  # SDEdit on a whole schedule: run its last `total` steps
        if start and scheduler is not None and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        timesteps = timesteps[start:]

        def noised(x0: torch.Tensor, t: int) -> torch.Tensor:
            return base.q_sample(x0, torch.full((n,), t, device=device, dtype=torch.long), noise)

        if run.init is None:
            x = noise
        elif run.strength is not None:
            x = noised(run.init, timesteps[0])
        else:
            x = torch.where(run.mask, noise, noised(run.init, timesteps[0]))

        weights = None
        if run.windows is not None:
            weights = [blend_weights(h, w, run.overlap).to(device) for (_, _, h, w) in run.windows]

        was_training = self.model.training
        self.model.eval()
        hooks = self._stop_hooks(run.should_stop)
        try:
            for k, t in enumerate(timesteps):
                if k and run.should_stop is not None and run.should_stop():
                    return
                t_model = base.model_timesteps(torch.full((n,), t, device=device, dtype=torch.long))
                if run.windows is None:
                    out = self._guided(
                        x, t_model, run.cond, run.guidance, run.cfg, run.cond_key, (0, 0, height, width),
                        run.spade_budget, run.should_stop,
                    )
                else:
                    out = self._tiled(x, t_model, run, weights)
                t_index = torch.full((n,), t, device=device, dtype=torch.long)
                eps = out[:, :3]
                pred_x0 = base.predict_x0_from_eps(x, t_index, eps)
                if run.clip:
                    # The epsilon that agrees with the clipped x0, as guided-diffusion's DDIM does;
                    # done here once for every scheduler (diffusers' multistep solvers could only
                    # clip through a quantile that fails on large canvases).
                    pred_x0 = pred_x0.clamp(-1, 1)
                    eps = base.predict_eps_from_x0(x, t_index, pred_x0)
                if run.sampler == "ddim-logsnr":
                    t_next = timesteps[k + 1] if k + 1 < total else -1
                    x_next = base.ddim_step(pred_x0, eps, t_next)
                elif run.sampler == "ddim":
                    variance_noise = _randn(generators, (3, height, width), device) if run.eta > 0 else None
                    x_next = scheduler.step(eps, t, x, eta=run.eta, variance_noise=variance_noise).prev_sample
                elif run.sampler == "ddpm":
                    model_out = torch.cat([eps, out[:, 3:]], dim=1) if base.config.learn_sigma else eps
                    x_next = scheduler.step(model_out, t, x, generator=generators).prev_sample
                else:
                    x_next = scheduler.step(eps, t, x).prev_sample
                if run.mask is not None:
                    known = run.init if k == total - 1 else noised(run.init, timesteps[k + 1])
                    x_next = torch.where(run.mask, x_next, known)
                    pred_x0 = torch.where(run.mask, pred_x0, run.init)
                x = x_next
                # A NaN or Inf would quietly become a black image (to_uint8) in a store or a layer.
                if not bool(torch.isfinite(x).all()):
                    raise RenderError(
                        f"the sample became non-finite (NaN or Inf) at denoising step {k + 1} of {total} (timestep {t}); "
                        "the model's output overflowed: check the model file, or sample in fp32 (--precision fp32)"
                    )
                yield StepRecord(k + 1, total, t, x, pred_x0, run.seeds)
        except _Stopped:
            return
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train(was_training)

    def _stop_hooks(self, should_stop: Callable[[], bool] | None) -> list:
        """Checks of ``should_stop`` before every UNet stage, so that a stop lands within a stage
        of the network (~1/20 of a demo step), not only between the CFG halves (up to half a
        step: 0.55 s on a loaded 2-core CPU). Not with torch.compile (hooks break its graphs)."""
        if should_stop is None or self.compiled:
            return []

        def check(module, args):
            if should_stop():
                raise _Stopped

        stages = [*getattr(self.model, "input_blocks", ()), *getattr(self.model, "output_blocks", ())]
        return [stage.register_forward_pre_hook(check) for stage in stages]

    # -- model evaluation ----------------------------------------------------------------------
    def _autocast(self):
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _tiled(self, x, t_model, run: _Run, weights) -> torch.Tensor:
        """The model output on the run's windows, blended where they overlap; 0 where none covers.

        Windows of one size go through the network as one batch (``tile_batch`` at a time), one
        call per step instead of one per window. On 2 CPU cores (channels_last, fp32) the 25
        windows of 64 px over a 256 px canvas took 1.36 s per step against 3.02 s one by one
        (untiled: 0.77 s), benchmarks/bench_interactive.py.
        """
        n = x.shape[0]
        out_channels = None
        total = None
        norm = torch.zeros(x.shape[-2:], device=x.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, h, w) in enumerate(run.windows):
            groups.setdefault((h, w), []).append(i)
        for members in groups.values():
            chunk = self.tile_batch or len(members)
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                if total is not None and run.should_stop is not None and run.should_stop():
                    raise _Stopped  # between windows
                crops = []
                for i in part:
                    y0, x0, h, w = run.windows[i]
                    crops.append((slice(None), slice(None), slice(y0, y0 + h), slice(x0, x0 + w)))
                xs = torch.cat([x[c] for c in crops])
                conds = torch.cat([run.cond[c] for c in crops])
                budget = None if run.spade_budget is None else run.spade_budget * len(part)
                out = self._guided(
                    xs, t_model.repeat(len(part)), conds, run.guidance, run.cfg, run.cond_key,
                    tuple(run.windows[i] for i in part), budget, run.should_stop,
                )
                if total is None:
                    out_channels = out.shape[1]
                    total = torch.zeros(n, out_channels, *x.shape[-2:], device=x.device)
                for j, (i, c) in enumerate(zip(part, crops)):
                    total[c] += out[j * n : (j + 1) * n] * weights[i]
                    y0, x0, h, w = run.windows[i]
                    norm[y0 : y0 + h, x0 : x0 + w] += weights[i]
        if total is None:  # no window at all (an empty edit mask): nothing to compute
            learn_sigma = getattr(self.diffusion.config, "learn_sigma", False)
            return torch.zeros(n, 6 if learn_sigma else 3, *x.shape[-2:], device=x.device)
        return total / norm.clamp_min(1e-12)

    def guided_output(
        self, x: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor, *, guidance: float = 1.5,
        cfg: str = "batched",
    ) -> torch.Tensor:
        """The network output (float32, (N, 6, H, W) with learned sigma) at original timestep ``t``
        with classifier-free guidance on the epsilon channels: what every sampler step uses."""
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t_model = self.diffusion.model_timesteps(t.expand(n) if t.ndim == 0 else t)
        key = condition_key(cond) if self.cache and cfg == "batched" else ""
        return self._guided(x, t_model, cond, guidance, cfg, key, (0, 0, *x.shape[-2:]), self._spade_budget(1), None)

    def _spade_budget(self, windows: int) -> int | None:
        total = self.cache_max_bytes
        if total is None:
            free = free_bytes(self.device)
            total = None if free is None else free // 2
        return None if total is None else total // windows

    def _guided(self, x, t_model, cond, s: float, cfg: str, cond_key: str | None, window, budget,
                should_stop: Callable[[], bool] | None) -> torch.Tensor:
        use_cond, use_null = s != 0, s != 1
        null = torch.zeros_like(cond)

        def between_halves() -> None:
            if should_stop is not None and should_stop():
                raise _Stopped

        with torch.no_grad():
            if cfg == "separate":
                with self._autocast():
                    out_cond = self._forward(self._layout(x), t_model, self._layout(cond)).float() if use_cond else None
                    if use_cond and use_null:
                        between_halves()
                    out_null = self._forward(self._layout(x), t_model, self._layout(null)).float() if use_null else None
                return self._combine(out_cond, out_null, s)
            spade_cond = self._cond_spade(cond, cond_key, window, budget) if use_cond else None
            spade_null = self._null_spade(cond) if use_null else None
            with self._autocast():
                state = self._encode(self._layout(x), t_model)
                if not use_null:
                    return self._decode(state, self._layout(cond), spade=spade_cond).float()
                if not use_cond:
                    return self._decode(state, self._layout(null), spade=spade_null).float()
                if self.cfg_decoder == "split":
                    out_cond = self._decode(state, self._layout(cond), spade=spade_cond).float()
                    between_halves()
                    out_null = self._decode(state, self._layout(null), spade=spade_null).float()
                else:
                    both = None if spade_cond is None else SpadeCache.cat(spade_cond, spade_null)
                    pair = self._layout(torch.cat([cond, null]))
                    out_cond, out_null = self._decode(state.repeat(2), pair, spade=both).float().chunk(2)
        return self._combine(out_cond, out_null, s)

    @staticmethod
    def _combine(out_cond: torch.Tensor | None, out_null: torch.Tensor | None, s: float) -> torch.Tensor:
        if out_null is None or out_cond is None:
            return out_cond if out_null is None else out_null
        eps = out_null[:, :3] + s * (out_cond[:, :3] - out_null[:, :3])
        # The variance interpolation is not guided: it comes from the conditional branch.
        return torch.cat([eps, out_cond[:, 3:]], dim=1)

    def _weights_stamp(self) -> tuple:
        # Cached gamma/beta go stale when the SPADE weights change (training, load_state_dict).
        norms = getattr(self.model, "spade_norms", ())
        return tuple((p.data_ptr(), p._version) for norm in norms for p in norm.parameters())

    def _cond_spade(self, cond: torch.Tensor, key: str, window, budget: int | None):
        if not self.cache:
            return None
        key = (key, self._weights_stamp())
        if key != self._spade_key:
            self._spade_key, self._spade = key, {}
        if window not in self._spade:
            self._spade[window] = self.model.spade_params(
                self._layout(cond), max_bytes=budget, dtype=_AUTOCAST[self.precision]
            )
        return self._spade[window]

    def _null_spade(self, cond: torch.Tensor):
        if not self.cache:
            return None
        return self.model.null_spade_params(
            cond.shape[-2], cond.shape[-1], batch=cond.shape[0], dtype=_AUTOCAST[self.precision]
        )


def sample(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    diffusion: DiffusionConfig | GaussianDiffusion | Mapping[str, Any] | None = None,
    cache: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
    **kwargs: Any,
) -> Iterator[StepRecord]:
    """One-off sampling: ``Sampler(model, diffusion, ...).sample(cond, **kwargs)``.

    Keep a :class:`Sampler` instead when rendering repeatedly (the SPADE cache lives there).
    """
    return Sampler(model, diffusion, cache=cache, precision=precision, channels_last=channels_last).sample(
        cond, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# few-step quality
# ---------------------------------------------------------------------------------------------
def ode_agreement(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    diffusion: DiffusionConfig | GaussianDiffusion | Mapping[str, Any] | None = None,
    sampler: str = "dpm++2m",
    steps: int = 15,
    reference_steps: int = 100,
    guidance: float = 1.0,
    seed: int = 0,
    other_seed: int | None = None,
) -> dict[str, float]:
    """How well a few-step solver follows the deterministic probability-flow ODE.

    Renders ``cond`` three times: with ``sampler`` at ``steps`` and with deterministic DDIM at
    ``reference_steps`` from the same noise (``seed``), and with DDIM from other noise
    (``other_seed``, default ``seed + 100003``). Returns mean per-pixel absolute differences of
    the uint8 images, in [0, 255] units: ``distance`` (few-step vs reference, the solver's
    error), ``baseline`` (reference vs other noise, how much samples vary at all) and their
    ``ratio``. A solver that tracks the ODE has a small ``distance`` and a ratio far below 1.
    """
    # fp32: it measures the solver, not the arithmetic.
    runner = Sampler(model, diffusion, precision="fp32")
    other = seed + 100003 if other_seed is None else other_seed
    fast = to_uint8(runner.generate(cond, sampler=sampler, steps=steps, guidance=guidance, seed=seed).x_t)
    ref = to_uint8(runner.generate(cond, sampler="ddim", steps=reference_steps, guidance=guidance, seed=seed).x_t)
    alt = to_uint8(runner.generate(cond, sampler="ddim", steps=reference_steps, guidance=guidance, seed=other).x_t)
    distance = float(np.abs(fast.astype(np.int16) - ref).mean())
    baseline = float(np.abs(alt.astype(np.int16) - ref).mean())
    return {"distance": distance, "baseline": baseline, "ratio": distance / max(baseline, 1e-9)}
