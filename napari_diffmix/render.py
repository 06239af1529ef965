"""Render label maps into tissue: the engine behind the Generate widget, ``diffmix render`` and
the batches of :class:`~napari_diffmix.synthesize.SynthesisJob`.

A :class:`Renderer` owns what a session of rendering keeps between runs and the rules of one
run, so that its callers (a Qt widget, the command line, a synthesis job, a test) only pass
options in and consume steps:

* the model, loaded once and cached per (file, its modification time, preset, device) with one
  :class:`~napari_diffmix.model.samplers.Sampler` per precision (one model in memory at a
  time; the sampler keeps the SPADE modulation of the last label map); a model the caller
  already holds is taken in with :meth:`Renderer.adopt`;
* the memory checks before a run (one canvas: :meth:`Renderer.check_memory`; a synthesis
  batch: :func:`estimate_synthesis_memory`) and :func:`out_of_memory`, which tells the one-line
  out-of-memory message from other errors during it;
* the CPU threads of a run (:func:`cpu_threads`): every core while OpenMP waits passively (the
  package's default), else one per core the other processes leave free, followed step by step
  (:class:`OtherLoad`);
* local edits: the sampler renders only the windows around the edit mask (their count and
  pixels go into the provenance);
* the one provenance schema of a render.

:meth:`Renderer.start` checks a :class:`RenderJob` and returns a :class:`RenderRun`, whose
:meth:`RenderRun.steps` is a generator of :class:`~napari_diffmix.model.samplers.StepRecord`
returning a :class:`Rendered` (image + provenance); :func:`run_to_end` drains it.
The module never imports Qt or napari.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator

import numpy as np

from .errors import LabelError, RenderError, SchemeError

if TYPE_CHECKING:
    from .classes import ClassScheme
    from .model.samplers import StepRecord

# Canvas-sized float32 tensors a run keeps besides the network's own activations: x_t,
# pred_x0, noise, the model output and its blend accumulator, init image, mask, condition.
CANVAS_TENSORS = 24
MODES = ("noise", "sdedit", "edited")
EARLY_STEPS = 3  # solver steps of the early preview


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA, MPS or a CPU allocation)."""
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------
def passive_waiting() -> bool:
    """Whether torch's OpenMP threads sleep while they wait (``napari_diffmix.OMP_PASSIVE``)."""
    from . import OMP_PASSIVE

    return OMP_PASSIVE


def cpu_threads(requested: int | None = None, *, passive: bool | None = None, load: float | None = None,
                cores: int | None = None) -> int:
    """Torch threads to start a CPU run with: ``requested`` if given; else every core while
    OpenMP waits passively (the package's default); else, with spinning waiters (torch was
    loaded before this package), one per core the other work leaves free by the 1-minute load
    average (``load``, default: read now, less this process's own last run), at least 1, and
    :class:`OtherLoad` follows the load step by step.

    Measured on 2 cores with one other CPU-bound process, seconds per 256 px step (bench_interactive,
    interleaved): passive waiters 1.70 with 2 threads, 2.05 with 1, 2.01 when dropping to 1 while
    the other process ran; spinning waiters 2.24 with 2 threads, 1.45 with 1. So fewer threads
    pay only when the waiters spin.
    """
    if requested is not None:
        return max(1, int(requested))
    cores = cores or os.cpu_count() or 1
    if passive is None:
        passive = passive_waiting()
    if passive:
        return cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows: no load average
            return cores
        # Our own last run's threads still count in the load average for a while.
        load = max(0.0, load - (_last_threads[-1] if _last_threads else 0))
    return max(1, min(cores, cores - math.floor(load + 0.5)))


_last_threads: list[int] = []


class OtherLoad:
    """Cores that other processes kept busy since the last :meth:`cores` call, from the kernel's
    counters (Linux ``/proc``: the machine's busy time less this process's own); None where
    they cannot be read. Cheap (two small file reads), so a run can ask after every step."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
            with open("/proc/self/stat") as fh:
                own = fh.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return float(busy), float(int(own[11]) + int(own[12])), time.monotonic()  # utime + stime

    def cores(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] < 0.05:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / self._tick / (now[2] - last[2])


def threads_for(other_cores: float, cores: int | None = None) -> int:
    """One thread per core the other processes leave free (at least 1)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, cores - math.floor(other_cores + 0.5)))


# ---------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A model ready to render: its sampler, file info and whether it came from the cache."""

    runner: Any  # model.samplers.Sampler
    info: Any  # model.checkpoint.ModelInfo
    reused: bool
    path: Path


@dataclass
class Rendered:
    """The final image (uint8 (H, W, 3)) and its provenance."""

    image: np.ndarray
    provenance: dict[str, Any]


@dataclass
class RenderJob:
    """One render. ``mode``: "noise" (from noise), "sdedit" (``image`` noised to ``strength``),
    "edited" (re-render ``mask`` of ``image``, keep the rest exactly). ``tile``: render in
    overlapping windows of this size (None: the whole canvas at once). ``threads``: CPU threads
    (None: the free cores, followed step by step). ``early_preview``: from noise on canvases
    over 128 px, first yield a record of step 0 whose ``pred_x0`` is the network's estimate at
    half resolution (:func:`early_estimate`), shown while the first full step runs.
    ``sampler``/``steps``: None = the model's own (a distilled student's, else the fast settings,
    :meth:`~napari_diffmix.model.checkpoint.ModelInfo.default_sampling`)."""

    inst_map: np.ndarray
    type_map: np.ndarray
    scheme: "ClassScheme"
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None  # None: the model's default
    seed: int = 0
    mode: str = "noise"
    strength: float | None = None
    image: np.ndarray | None = None
    image_name: str | None = None
    mask: np.ndarray | None = None
    tile: int | None = None
    edit_context: int | str | None = "auto"
    threads: int | None = None
    early_preview: bool = True  # from noise: a record of step 0, a cheap half-resolution estimate
    labels_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Renderer:
    """Loads models (cached) and renders :class:`RenderJob` s with them; see the module docstring."""

    def __init__(self) -> None:
        self._models: dict[tuple, tuple[Any, Any]] = {}  # key -> (model, info)
        self._runners: dict[tuple, Any] = {}  # (key, precision) -> Sampler
        self._last_condition: tuple | None = None

    def load(self, path: str | os.PathLike, device: Any = "auto", precision: str = "auto",
             preset: str | None = None, *, sha256: str | None = None, cache_max_bytes: int | None = None) -> Loaded:
        """The model at ``path`` on ``device`` with a sampler in ``precision``, loaded once.
        ``sha256``: the file's hash when the caller has it (hashing a 2.6 GB ``.pt`` takes
        seconds); ``cache_max_bytes``: the sampler's SPADE cache budget for this caller (None:
        the sampler's default, half of the free memory)."""
        from .model.checkpoint import load_model
        from .runtime import resolve_device

        path = Path(path)
        dev = resolve_device(device)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        key = (str(path), stamp, preset, str(dev))
        reused = key in self._models
        if not reused:
            self._forget()
            self._models[key] = load_model(path, dev, preset=preset, sha256=sha256)
        model, info = self._models[key]
        return Loaded(self._runner(key, model, info, dev, precision, cache_max_bytes), info, reused, path)

    def adopt(self, model: Any, info: Any, precision: str = "auto", *, cache_max_bytes: int | None = None) -> Loaded:
        """A model the caller already holds (a training run's weights, a test's network), run
        under the same rules as a loaded one; it replaces the cached model."""
        dev = next(model.parameters()).device
        key = ("adopted", id(model), str(dev))
        reused = key in self._models
        if not reused:
            self._forget()
            self._models[key] = (model, info)
        return Loaded(self._runner(key, model, info, dev, precision, cache_max_bytes), info, reused, Path(info.source))

    def _forget(self) -> None:
        self._models.clear()  # one model in memory at a time
        self._runners.clear()
        self._last_condition = None

    def _runner(self, key: tuple, model: Any, info: Any, dev: Any, precision: str, cache_max_bytes: int | None) -> Any:
        from .model.samplers import Sampler
        from .runtime import keep_freed_memory, resolve_precision

        if dev.type == "cpu":
            keep_freed_memory()
        resolved = resolve_precision(precision, dev)
        runner = self._runners.get((key, resolved))
        if runner is None:
            # One sampler per precision: the SPADE cache is stored in the precision. channels_last
            # on CPUs: oneDNN's convolutions then skip their layout reorders; a 256 px step of the
            # demo model took 0.74x the time (interleaved runs, 2 threads, fp32), images within
            # 1 grey level.
            runner = Sampler(model.eval(), info.diffusion or None, precision=resolved, channels_last=dev.type == "cpu")
            self._runners[(key, resolved)] = runner
        runner.cache_max_bytes = cache_max_bytes
        return runner

    @staticmethod
    def check_memory(shape: tuple[int, int], loaded: Loaded) -> None:
        """Refuse a canvas that cannot fit in the device's free memory (a clear message, not an OOM)."""
        from .model.samplers import free_bytes

        h, w = shape
        need = h * w * 4 * (CANVAS_TENSORS + loaded.info.scheme.condition_channels)
        free = free_bytes(loaded.runner.device)
        if free is not None and need > free:
            raise LabelError(
                f"the {h}x{w} label map is too large for memory: it needs about {size_text(need)} on "
                f"{loaded.runner.device} but only {size_text(free)} are free; render a smaller region"
            )

    def start(self, loaded: Loaded, job: RenderJob, should_stop: Callable[[], bool] | None = None) -> "RenderRun":
        """Check ``job`` against ``loaded`` (scheme, mode, memory) and prepare it; iterate the
        returned run's :meth:`RenderRun.steps` to render. ``should_stop`` can end it within a step."""
        from .model.condition import make_condition
        from .model.samplers import condition_key

        runner, info = loaded.runner, loaded.info
        if job.mode not in MODES:
            raise LabelError(f"mode must be one of {', '.join(MODES)}, got {job.mode!r}")
        if info.scheme.names != job.scheme.names:
            raise SchemeError(
                f"the model was trained on classes {list(info.scheme.names)} (scheme {info.scheme.name!r}) but "
                f"{'layer ' + repr(job.labels_name) if job.labels_name else 'the labels'} uses "
                f"{list(job.scheme.names)} (scheme {job.scheme.name!r}); choose a model of that scheme"
            )
        if job.mode != "noise" and job.image is None:
            raise LabelError(f"mode {job.mode!r} starts from an image; give one")
        if job.mode == "edited" and (job.mask is None or not np.asarray(job.mask).any()):
            raise LabelError("nothing to re-render: the edit mask is empty")
        self.check_memory(job.inst_map.shape, loaded)
        cond = make_condition(job.inst_map, job.type_map, info.scheme)
        key = (id(runner), condition_key(cond))
        reused_spade = bool(loaded.reused and key == self._last_condition and runner.cache)
        self._last_condition = key
        return RenderRun(loaded, job, cond, reused_spade, should_stop)


class RenderRun:
    """One prepared render (:meth:`Renderer.start`): ``reused_spade`` says whether the label
    map's SPADE features come from the last run, ``windows`` which windows a local edit renders
    (None: the whole canvas), ``sampler``/``step_count`` the settings it runs with (the job's, or
    the model's own)."""

    def __init__(self, loaded: Loaded, job: RenderJob, cond: Any, reused_spade: bool,
                 should_stop: Callable[[], bool] | None):
        self.loaded, self.job, self.cond, self.reused_spade = loaded, job, cond, reused_spade
        self.should_stop = should_stop
        own = loaded.info.default_sampling()
        self.sampler = own["sampler"] if job.sampler is None else job.sampler
        self.step_count = own["steps"] if job.steps is None else int(job.steps)
        # A distilled student renders only with what it was distilled for: a clear error, not a
        # quietly wrong image.
        loaded.info.check_sampling(self.sampler, self.step_count, job.guidance)
        self.guidance = loaded.info.default_guidance if job.guidance is None else float(job.guidance)
        self.strength = job.strength if job.mode == "sdedit" else None
        self.mask = job.mask if job.mode == "edited" else None
        self.windows = _edit_windows(loaded.runner, self.mask, job)

    def steps(self) -> Generator["StepRecord", None, Rendered | None]:
        """Yields every step's record; returns the :class:`Rendered` (None when stopped early)."""
        import torch

        runner, info, job = self.loaded.runner, self.loaded.info, self.job
        h, w = job.inst_map.shape
        threads = None
        used: list[int] = []
        follow = None
        if runner.device.type == "cpu":
            threads = cpu_threads(job.threads)
            torch.set_num_threads(threads)
            used.append(threads)
            # With spinning OpenMP waiters, and unless the caller fixed the threads, follow the
            # other processes' load step by step (see cpu_threads).
            follow = OtherLoad() if job.threads is None and not passive_waiting() else None
        start = time.perf_counter()
        # A student's first step is a single network pass: it is the early look.
        if job.early_preview and job.mode == "noise" and not info.distilled:
            early = early_estimate(runner, self.cond, self.step_count, self.guidance, job.seed)
            if early is not None:
                yield early
        gen = runner.sample(
            self.cond, sampler=self.sampler, steps=self.step_count, guidance=self.guidance, seed=job.seed,
            init_image=None if job.mode == "noise" else job.image, strength=self.strength, mask=self.mask,
            tile_size=job.tile, edit_context=job.edit_context, should_stop=self.should_stop,
        )
        last = None
        try:
            for last in gen:
                if follow is not None:
                    others = follow.cores()
                    if others is not None and threads_for(others) != threads:
                        threads = threads_for(others)
                        torch.set_num_threads(threads)
                        used.append(threads)
                yield last
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if out_of_memory(exc):
                raise LabelError(f"out of memory on {runner.device} rendering {h}x{w}: lower the tile size, or use the CPU") from None
            raise
        finally:
            if used:
                _last_threads[:] = [threads]
        if last is None or not last.done:
            return None
        provenance = {
            "model": str(self.loaded.path), "model_sha256": info.sha256, "scheme": info.scheme.name,
            "device": str(runner.device), "precision": runner.precision,
            "threads": (used[0] if len(used) == 1 else used) if used else None,
            "sampler": self.sampler, "steps": self.step_count, "guidance": self.guidance, "seed": int(last.seeds[0]),
            "mode": job.mode, "strength": self.strength, "image": job.image_name,
            "edited_pixels": int(np.asarray(self.mask).sum()) if self.mask is not None else None,
            "edit_windows": self.windows, "tile": job.tile, "labels": job.labels_name,
            "seconds": round(time.perf_counter() - start, 3), "reused_model": self.loaded.reused,
            "reused_spade": self.reused_spade, **job.extra,
        }
        return Rendered(last.images()[0], provenance)


# ---------------------------------------------------------------------------------------------
# memory of a synthesis batch
# ---------------------------------------------------------------------------------------------
# Live tensors of a decoder block, as multiples of its input plus output feature maps, counted
# in float32 (the norms compute in float32 under autocast too): the concatenated input stays
# alive while its norm, the modulated copy, SiLU and the convolution's output exist. 3 was
# what the tensors add up to; 4 covers the allocator's slack measured on the CPU (demo model,
# README, Reliability: the real peak stayed 0-25 % under the estimate from 64 to 480 px).
_BLOCK_WORKING_SET = 4
# What a run holds whatever its size: the allocator's arenas, oneDNN's kernels and scratch.
_RUNTIME_OVERHEAD = 256 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """What one synthesis batch needs on its device, in bytes, beside what it has free.

    ``weights``: the model's parameters (and their half-precision copies under autocast); 0
    when the model already sits on the device. ``runtime``: what any run holds (allocator
    arenas, kernel scratch). ``activations``: the encoder's skip tensors the
    decoder reads, the largest block's working set and the sampler's per-item tensors.
    ``spade_null``: the all-zero condition's SPADE cache (one image's worth, always kept).
    ``spade_cond``: the label maps' SPADE cache in full; the sampler keeps only what its
    budget allows (:attr:`cache_budget`) and recomputes the rest at every step, so it is not
    part of :attr:`needed`.
    """

    patch_size: int
    batch_size: int
    device: str
    precision: str
    weights: int
    runtime: int
    activations: int
    spade_null: int
    spade_cond: int
    free: int | None

    @property
    def needed(self) -> int:
        """The least the run needs (no label-map SPADE cache)."""
        return self.weights + self.runtime + self.activations + self.spade_null

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free

    @property
    def cache_budget(self) -> int | None:
        """Bytes of label-map SPADE cache that fit beside the rest: the sampler's own default
        (half of the free memory) where that leaves room, else what remains; None where the
        free memory is unknown (the sampler's default then applies)."""
        if self.free is None:
            return None
        return max(0, min(self.free // 2, self.free - self.needed))

    @property
    def max_batch(self) -> int:
        """The largest batch whose estimate fits the free memory (0: not even one item)."""
        if self.free is None:
            return self.batch_size
        per_item = self.activations / self.batch_size  # every activation term grows with the batch
        return max(0, int((self.free - self.weights - self.runtime - self.spade_null) // per_item)) if per_item else self.batch_size

    def parts(self) -> str:
        out = [f"model {size_text(self.weights)}"] if self.weights else []
        out += [f"runtime {size_text(self.runtime)}", f"activations {size_text(self.activations)}", f"SPADE cache of the empty condition {size_text(self.spade_null)}"]
        return ", ".join(out)

    def text(self) -> str:
        free = "unknown" if self.free is None else size_text(self.free)
        return (f"{self.patch_size} px x {self.batch_size} items on {self.device} ({self.precision}): needs about "
                f"{size_text(self.needed)} ({self.parts()}) of {free} free; label-map SPADE cache "
                f"{size_text(self.spade_cond)} in full, kept up to {size_text(self.cache_budget or 0)}")


def estimate_synthesis_memory(
    config: Any, patch_size: int, batch_size: int, device: Any, precision: str = "auto", *,
    weights_on_device: bool = False,
) -> MemoryEstimate:
    """How much memory sampling a batch of ``batch_size`` patches of ``patch_size`` px with a
    model of ``config`` (:class:`~napari_diffmix.model.unet.UNetConfig`) takes on ``device``, as
    the :class:`~napari_diffmix.model.samplers.Sampler` runs it (encoder once, classifier-free
    guidance decoded as one 2N batch or as two N batches, SPADE caches in the network
    precision), beside the device's free memory (the sampler's own ``free_bytes``).

    The feature-map sizes come from the network itself: it is built on torch's "meta" device
    (no memory, no arithmetic) and run once at the patch size, so any configuration is
    measured the same way; the SPADE cache sizes are the model's own ``spade_layout``.
    """
    import torch

    from .model.samplers import free_bytes
    from .runtime import resolve_precision
    from .model.unet import AttentionBlock, ResBlock, SDMUNet

    device = torch.device(device)
    precision = resolve_precision(precision, device)
    half = precision in ("bf16", "fp16")
    elem = 2 if half else 4  # activations and caches are stored in the network precision
    with torch.device("meta"):
        model = SDMUNet(config)
    # Sampler's cfg_decoder="auto" (what SynthesisJob uses): two N-batch decoder passes on the
    # CPU, one 2N pass elsewhere.
    joint = device.type != "cpu"
    blocks: list[int] = []

    def record(module: Any, args: Any, out: Any) -> None:
        blocks.append(args[0].numel() + out.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    n, s = int(batch_size), int(patch_size)
    try:
        with torch.no_grad():
            state = model.encode(torch.empty(n, config.in_channels, s, s, device="meta"), torch.zeros(n, device="meta"))
            model.decode(state, torch.empty(n, config.cond_channels, s, s, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    skips = sum(t.numel() for t in state.skips)
    decoded = 2 if joint else 1  # a joint decoder pass repeats the skips for the 2N batch
    network = skips * (1 + 2 * joint) * elem + _BLOCK_WORKING_SET * max(blocks) * decoded * 4
    # float32 tensors of the sampler and the scheduler per item (x_t, noise, init, outputs, ...)
    items = CANVAS_TENSORS * n * s * s * 4
    weights = 0
    if not weights_on_device:
        params = model.num_parameters()
        weights = params * 4 + (params * 2 if half else 0)  # autocast keeps half-precision copies of the weights
    spade_null = sum(d["nbytes"] for d in model.spade_layout(s, s, 1, elem))
    spade_cond = sum(d["nbytes"] for d in model.spade_layout(s, s, n, elem))
    return MemoryEstimate(
        s, n, str(device), precision, weights, _RUNTIME_OVERHEAD, network + items, spade_null, spade_cond, free_bytes(device)
    )


def check_synthesis_memory(estimate: MemoryEstimate) -> MemoryEstimate:
    """Refuse a synthesis that will not fit in memory, with the numbers and what would fit."""
    if estimate.fits:
        return estimate
    e = estimate
    advice = (f"use --batch-size {e.max_batch} or lower" if e.max_batch >= 1 else
              "even one item does not fit: use a smaller --patch-size")
    raise RenderError(
        f"sampling {e.batch_size} patches of {e.patch_size} px at a time will not fit in memory on {e.device}: it needs "
        f"about {size_text(e.needed)} ({e.parts()}) but only {size_text(e.free)} are free; {advice}, "
        "or use a device with more memory"
    )


def early_estimate(runner: Any, cond: Any, total: int, guidance: float, seed: int,
                   side: int = 128) -> "StepRecord | None":
    """A first look at a render from noise, in a fraction of its time: the label map subsampled
    to at most ``side`` px (nearest) rendered in :data:`EARLY_STEPS` solver steps, upsampled
    back; as a :class:`StepRecord` of step 0. None when the canvas is small enough for the first
    step itself to be quick, or its reduced size does not fit the network.

    Guidance 1 (one conditional pass per step) and no SPADE cache, so the run's cache is left
    alone: at 256 px about 3/8 of one guided step's FLOPs.
    """
    import torch
    import torch.nn.functional as F

    from .model.samplers import StepRecord

    cond = cond[None] if cond.ndim == 3 else cond
    n, _, h, w = cond.shape
    factor = 1
    while max(h, w) // factor > side:
        factor *= 2
    multiple = getattr(getattr(runner.model, "config", None), "size_multiple", 1)
    if factor == 1 or h % factor or w % factor or (h // factor) % multiple or (w // factor) % multiple:
        return None
    small = cond[:, :, ::factor, ::factor]
    # A few solver steps on the small canvas: one network pass at the first timestep only gives
    # noise (its x0 estimate at t = 999 is no picture), three give a blurry but faithful one.
    last = None
    for last in runner.sample(small, steps=EARLY_STEPS, guidance=1.0, seed=seed, cfg="separate"):
        pass
    with torch.no_grad():
        x0 = F.interpolate(last.x_t, scale_factor=factor, mode="bilinear", align_corners=False).clamp(-1, 1)
    t = runner.diffusion.config.num_timesteps - 1
    return StepRecord(0, total, t, x0, x0, (int(seed),) * n)


def _edit_windows(runner: Any, mask: np.ndarray | None, job: RenderJob) -> list[list[int]] | None:
    """The windows a local edit renders (for the provenance), None for a whole-canvas run."""
    if mask is None or job.edit_context is None:
        return None
    from .model.samplers import edit_windows

    multiple = getattr(getattr(runner.model, "config", None), "size_multiple", 1)
    boxes = edit_windows(mask, runner.edit_context_px(job.edit_context), multiple)
    return [list(b) for b in boxes]


def run_to_end(gen: Generator["StepRecord", None, Rendered | None],
               on_step: Callable[["StepRecord"], None] | None = None) -> Rendered | None:
    """Drain :meth:`RenderRun.steps`, calling ``on_step`` with every record; returns its result."""
    while True:
        try:
            record = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_step is not None:
            on_step(record)
