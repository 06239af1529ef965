"""The machinery of a resumable training run, shared by the diffusion trainer (``train.py``) and
the distiller (``distill.py``).

A run folder holds ``config.json``, ``checkpoints/step-NNNNNNN.pt`` (written atomically, the
newest ``keep_last`` kept), ``log.csv`` (rows after a resumed step dropped) and ``samples/``.
:class:`TrainState` is what a checkpoint restores bit for bit: the weights, their EMA, the
optimizer, the gradient scaler, the crop stream, the noise generator and every RNG state, per
``torchrun`` rank. Each trainer keeps its own loop (what one step computes differs) and its
own checkpoint ``format`` string, so that a distillation checkpoint is never resumed as a
training run or the other way round.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .atomic import atomic_path
from .errors import CheckpointError, TrainingError
from .runtime import capture_rng, check_ranks_in_sync, restore_rng, seed_int, setup_distributed

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step-(\d{7,})\.pt$")


# ----------------------------------------------------------------------------------------
# a run: its processes, its folder, its result


@contextlib.contextmanager
def training_session(device: str, num_threads: int | None, out_dir: Path, what: str) -> Iterator[tuple[Any, torch.device]]:
    """``(DistInfo, device)`` for one run: joins the ``torchrun`` process group (left at the
    end), sets the CPU threads and holds the run folder's writer lock on rank 0 (a second
    process writing the same run would interleave checkpoints)."""
    from .outputs import WriterLock

    info, device = setup_distributed(device)
    if num_threads:
        torch.set_num_threads(num_threads)
    lock = WriterLock(out_dir, what=what) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            yield info, device
    finally:
        if info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def barrier(info: Any) -> None:
    """Wait for every rank (no-op outside ``torchrun``)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def resume_step(state: "TrainState", ckpt_in: Path | None, out_dir: Path, restore: Callable[[Path], int], info: Any) -> int:
    """The step a run starts at: ``restore(ckpt_in)``'s when resuming, else 0, refusing a fresh
    start in a folder that holds another run's checkpoints."""
    if ckpt_in is None:
        if list_checkpoints(out_dir):
            raise TrainingError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it or pick another --out")
        return 0
    step = restore(ckpt_in)
    if info.is_main:
        log.info("resumed from %s at step %d", ckpt_in, step)
    return step


@dataclass
class RunResult:
    """How a training or distillation call ended."""

    step: int
    total_steps: int
    interrupted: bool
    out_dir: Path
    checkpoint: Path | None
    model_path: Path | None
    last_loss: float | None
    elapsed_s: float
    steps_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# EMA


def ema_rate_at(rate: float, step: int, warmup: bool) -> float:
    """EMA decay used after optimizer step ``step`` (0-based)."""
    return min(rate, (1.0 + step) / (10.0 + step)) if warmup else rate


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model for parameters; buffers are copied."""
    ema_p = [p for p in ema_model.parameters()]
    src_p = [p.detach() for p in model.parameters()]
    if rate == 0.0:
        torch._foreach_copy_(ema_p, src_p)
    else:
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1.0 - rate)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)


# ----------------------------------------------------------------------------------------
# checkpoint files


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:07d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first (temporary files of interrupted saves excluded)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: str | os.PathLike, fmt: str, what: str, hint: str = "",
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of format ``fmt`` (safe unpickling: tensors and plain containers only);
    ``what`` names it in errors, ``hint`` follows the refusal of another format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    from .model.checkpoint import load_tensors_only

    ckpt = load_tensors_only(path, what=what, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise CheckpointError(f"{path}: not a napari-diffmix {what}{hint}")
    return ckpt


def find_resume(resume: str | os.PathLike, out_dir: str | os.PathLike, read: Callable[[Path], Any]) -> Path | None:
    """The checkpoint ``--resume`` means: a file, a run folder's newest one that ``read`` accepts,
    or for ``"auto"`` the newest in ``out_dir`` (None when the run has none yet)."""
    target = Path(out_dir) if str(resume) == "auto" else Path(resume)
    if target.is_file():
        return target
    if not target.exists() and str(resume) != "auto":
        raise CheckpointError(f"{target}: nothing to resume from (no such file or run folder)")
    candidates = list_checkpoints(target)
    if not candidates and str(resume) != "auto":
        raise CheckpointError(f"{target}: the run folder has no checkpoints in {CHECKPOINT_DIR}/")
    for path in reversed(candidates):
        try:
            read(path)
        except CheckpointError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
            continue
        return path
    if candidates:
        raise CheckpointError(f"{target}: none of its {len(candidates)} checkpoints can be read")
    return None


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


def remove_stale_temporaries(out_dir: Path) -> None:
    # A process killed mid-save leaves its temporary file (never under a trusted name).
    folder = out_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for p in folder.glob(".step-*.tmp*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ----------------------------------------------------------------------------------------
# the state a checkpoint restores


@dataclass
class TrainState:
    """The weights and everything else a resumed run needs to continue as if never stopped.

    ``format``: the checkpoint format string of the trainer that owns the state.
    """

    format: str
    model: torch.nn.Module
    ema_model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler
    stream: Any  # data.crops.CropStream
    noise_gen: torch.Generator

    def optimize(self, loss: torch.Tensor, grad_clip: float, diverged: Callable[[str], Exception],
                 local_loss: torch.Tensor | None = None) -> float:
        """Backward, unscale, clip (0 = off), step; returns the gradient norm. A non-finite
        gradient raises ``diverged(what)`` before the weights change.

        ``local_loss`` comes from the bare module, not its DistributedDataParallel wrapper (DDP's
        reducer refuses a module called several times before one backward). Its gradients are
        taken with ``autograd.grad``, which leaves the parameters' accumulators, and so DDP's
        hooks on them, alone (a ``.backward()`` would have fired them and spent the reducer's one
        sync on these gradients); they are averaged over the ranks here and added to ``loss``'s."""
        self.opt.zero_grad(set_to_none=True)
        local: dict[torch.nn.Parameter, torch.Tensor] = {}
        if local_loss is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(self.scaler.scale(local_loss), params, allow_unused=True)
            local = {p: g for p, g in zip(params, grads) if g is not None}
        self.scaler.scale(loss).backward()
        if local:
            _add_rank_mean(local)
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        # fp16's scaler skips steps with overflowing gradients by design; otherwise a
        # non-finite gradient would poison the weights (gradients are identical on all ranks).
        if not self.scaler.is_enabled() and not math.isfinite(float(grad_norm)):
            raise diverged(f"the gradients became {float(grad_norm)}")
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(grad_norm)

    def save(self, out_dir: Path, step: int, header: Mapping[str, Any], info: Any, device: torch.device,
             keep_last: int) -> Path:
        """Write ``checkpoints/step-NNNNNNN.pt`` atomically (rank 0; every rank's RNG state in it)
        with ``header`` (JSON strings: config, model_config, scheme, ...); keep the newest ``keep_last``."""
        check_ranks_in_sync(self.model, info, device, step)
        rng = capture_rng(self.stream, self.noise_gen)
        if info.enabled:
            import torch.distributed as dist

            rng_all: list[Any] = [None] * info.world_size
            dist.all_gather_object(rng_all, rng)
        else:
            rng_all = [rng]
        path = checkpoint_path(out_dir, step)
        if info.is_main:
            state = {
                "format": self.format, "step": step, **header, "world_size": info.world_size,
                "model": self.model.state_dict(), "ema": self.ema_model.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_all,
            }
            try:
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
            except OSError as exc:
                previous = list_checkpoints(out_dir)
                raise TrainingError(
                    f"cannot write checkpoint {path} ({exc}); "
                    + (f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists")
                ) from None
            prune_checkpoints(out_dir, keep_last)
        if info.enabled:
            import torch.distributed as dist

            dist.barrier()
        return path

    def restore(self, ckpt: Mapping[str, Any], path: Path, model_cfg: Mapping[str, Any], scheme: Any, info: Any,
                seed: int) -> int:
        """Load a checkpoint read with :func:`read_checkpoint` into this state; returns its step.

        The model config (less gradient checkpointing) and the scheme's channels must be the
        run's own. With another world size the data order is reseeded from the step."""
        from .classes import ClassScheme

        def plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in cfg.items() if k != "use_checkpoint"}

        if plain(json.loads(ckpt["model_config"])) != plain(model_cfg):
            raise CheckpointError(f"{path}: the checkpoint's model config differs from this run's; resume with the run's own settings")
        saved_scheme = ClassScheme.from_dict(json.loads(ckpt["scheme"]))
        if saved_scheme.condition_channels != scheme.condition_channels:
            raise CheckpointError(f"{path}: the checkpoint was trained with scheme {saved_scheme.name!r}, not {scheme.name!r}")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema_model.load_state_dict(ckpt["ema"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot restore the training state ({exc})") from None
        rng = ckpt["rng"]
        if len(rng) == info.world_size:
            restore_rng(rng[info.rank], self.stream, self.noise_gen)
        else:
            # Another world size: there is no per-rank state to continue; reseed from the step.
            self.stream.reseed(seed, info.rank, int(ckpt["step"]))
            self.noise_gen.manual_seed(seed_int(seed, info.rank, 1, ckpt["step"]))
            if info.is_main:
                log.warning("checkpoint from %d processes resumed on %d: data order reseeded", len(rng), info.world_size)
        return int(ckpt["step"])


def _add_rank_mean(grads: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
    """``p.grad += mean over ranks of grads[p]`` (one all-reduce of them all, flattened)."""
    import torch.distributed as dist

    params = list(grads)
    flat = torch.cat([grads[p].reshape(-1) for p in params])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    offset = 0
    for p in params:
        part = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad += part


def changed_settings(saved: Mapping[str, Any], config: Any, keys: Sequence[str]) -> list[str]:
    """The ``keys`` whose value in a checkpoint's saved config differs from ``config``'s."""
    return [k for k in keys if saved.get(k) != getattr(config, k)]


# ----------------------------------------------------------------------------------------
# log.csv


class CsvLog:
    """Append-only CSV of a run's curves with the columns ``fields``; on resume, rows after the
    resumed step are dropped so the file always describes the weights that exist. With the
    optional tensorboard package, the same rows go to ``tensorboard/`` under ``tag/``."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int, tag: str = "train"):
        self.path, self.fields, self.tag = path, tuple(fields), tag
        rows = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(float(r["step"])) <= resume_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
        except ImportError:
            pass
        else:
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: Mapping[str, float]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields, extrasaction="ignore").writerow({k: row.get(k, "") for k in self.fields})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"{self.tag}/{k}", v, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def logged_hours(path: str | os.PathLike) -> float:
    """The hours of work a run's log.csv records, resumed invocations included: ``elapsed_s``
    counts from the start of each invocation, so it drops where a resumed one begins."""
    with open(path, newline="") as fh:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(fh) if row.get("elapsed_s")]
    ends = [a for a, b in zip(elapsed, elapsed[1:]) if b < a] + elapsed[-1:]
    return sum(ends) / 3600
