"""Progressive against consistency distillation of the demo model, at the same budget (issue 14).

Issue 14 asks for the distillation method to be chosen after a measured comparison on the demo
model. This trains two 4-step students of the bundled teacher on the training split of the demo
tile (DEMO scheme) with the same budget: the same number of optimizer updates, the same crops
per update (the preset's 4 crops of 64 px, drawn by the same seeded CropStream, so both arms see
the same crops in the same order), AdamW lr 1e-4, the preset's evaluation EMA (0.99 with
warm-up), gradient clip 1, bf16 autocast where the CPU has bf16 in hardware (fp32 elsewhere),
seed 0, and reports each arm's wall time and quality.

* **progressive**: ``napari_diffmix.distill.distill`` with ``DistillConfig.from_preset("demo",
  steps=N)`` (only precision and threads set here), the product's plain recipe. Per update: the
  teacher's guided 12-step DPM-Solver++ run of 4 crops, 16 student pairs (4 crops x 4 steps).
  ``--progressive-student`` measures a finished student instead, such as the bundled one (the
  plain recipe, then the loss on the whole run and 128 px crops).
* **consistency** (Song et al. 2023, consistency distillation; written here only, not part of
  the package): the student starts as the teacher; its consistency function f(x_t, t) is the x0
  the epsilon-predicting network implies, clipped to [-1, 1] as the samplers clip it. The grid
  is the teacher's 12 log-SNR-even timesteps (999 ... 3) plus the clean end; the 4 sampling
  timesteps (999, 722, 302, 30) are on it, so the student trains at the exact points it samples
  at. Per update, each of the 4 clean crops is noised to ``--pairs-per-crop`` (default 4)
  distinct grid points t_{n+1} (16 student samples per update, as many as progressive's pairs);
  ONE guided teacher DDIM step (CFG at the teacher's default 3.0, x0 clipped) goes to the next
  grid point t_n; the loss is the mean squared x0 difference (weight 1 at every t, Song et al.'s
  lambda = 1) between the student's f at t_{n+1} and a stop-gradient target network's f at
  t_n, the target being an EMA of the student (rate ``--target-ema``, default 0.95 as in Song
  et al.'s CD runs); at the clean end the target is the teacher's clipped x0 itself (the boundary
  condition). The student is evaluated once, with the label map: guidance is folded in, so it
  samples with guidance 1. Sampling: multistep consistency sampling on ``ddim-logsnr``'s 4
  timesteps: predict x0, re-noise it to the next timestep with fresh noise, repeat; the last x0
  is the image. Noise per item comes from a CPU generator seeded ``seed + i``, as the product's
  samplers draw it, so the first step starts from the very noise the other rows start from.

Measuring is scripts/distill_demo_model.py's ``measure`` for its student row: every 128 px
window of the held-out split (4 windows), seeds 0..3, fp32, the model card's acceptance
(napari_diffmix.quality: hematoxylin contrast x real >= 0.7, ring DAB ratio >= 2, noise x real
<= 1.5, off-stain pixels <= real + 1 %) and the mean absolute difference (grey levels) from the
teacher's 15-step guided DPM-Solver++ renders of the same windows and seeds. Each student is
measured with its own sampler (the progressive one ``ddim-logsnr`` 4 steps, guidance 1). For
reference the table also has both 4-step samplers on the teacher, at guidance 1 (each arm at 0
updates) and with its CFG (8 passes: what a student that had only folded the guidance in would
reach); those rows do not depend on the arms and are cached in OUT.

Run (heavy: keep it niced on a shared machine)::

    python benchmarks/compare_distill.py --arms consistency --updates 1300 --keep-at 40,300,700 \
        --threads 2 --out /work/compare_distill
    python benchmarks/compare_distill.py --reuse --updates 1300 --arms progressive,consistency \
        --progressive-student napari_diffmix/resources/models/demo/fast/demo-fast.safetensors \
        --out /work/compare_distill --json /work/compare_distill/compare-1300.json

``--arms progressive`` / ``--arms consistency`` run one arm; ``--reuse`` measures an arm's
finished run folder (its ``result.json`` for the same number of updates) instead of training it
again; ``--keep-at`` keeps a consistency run's student after those updates as finished runs of
that length (nothing in a run depends on its length); ``--progressive-student`` takes a finished
progressive student (the bundled one was made in three stages by
scripts/distill_demo_model.py, its hours from the log beside it) instead of training the plain
preset. Run folders: ``OUT/progressive-N`` (distill's own: checkpoints, log.csv,
model.safetensors) and ``OUT/consistency-N`` (log.csv, ema.pt: the EMA student's state dict);
each has a result.json.

Measured 2026-12-06 on the shared 2-core AMD EPYC (avx512_bf16), 2 threads, bf16 autocast for
students and teacher in training, torch 2.13 CPU; 4 held-out windows of 128 px, seeds 0..3,
rendered in fp32; off-stain of real tissue 0.00 %, HF = noise x real (the card allows 0.5-1.5)::

    run (sampler, steps, guidance)              updates  hours  s/update  h_frac  DAB   HF     off-stain  passes  MAD vs T15
    teacher, dpm++2m 15, CFG 3                  -        -      -         1.58    13.4  0.86   0.01 %     yes     0.0
    teacher, ddim-logsnr 4, g 1                 0        -      -         0.77    3.66  1.80   7.09 %     no      31.1
    teacher, consistency multistep 4, g 1       0        -      -         0.74    4.91  0.55   0.01 %     yes     27.4
    teacher, ddim-logsnr 4, CFG 3 (8 passes)    -        -      -         1.84    12.2  0.88   0.29 %     yes     13.2
    teacher, consistency 4, CFG 3 (8 passes)    -        -      -         2.09    24.3  0.79   0.02 %     yes     16.0
    progressive, plain preset                   40       0.50   44.9 (a)  0.89    4.62  1.82   8.80 %     no      26.6
    progressive, the bundled student (b)        1300     2.45   6.78      1.51    15.2  0.79   0.03 %     yes     4.2
    consistency                                 40       0.02   1.93      0.96    13.3  0.52   0.00 %     yes     16.1
    consistency                                 300      0.18   2.21      1.16    12.0  0.71   0.00 %     yes     15.3
    consistency                                 700      0.41   2.11      1.17    9.81  0.75   0.00 %     yes     16.5
    consistency                                 1300     0.74   2.05      1.16    8.41  0.83   0.00 %     yes     18.0
    consistency 1300, sampled in 1 step         1300     -      -         0.58    2.82  16.9   10.6 %     no      95.1
    consistency 1300, sampled in 2 steps        1300     -      -         0.88    6.21  3.31   17.6 %     no      32.8

(a) at a 1-minute load of 3.5-5.7 from other jobs; (b) 700 updates of the plain preset (261-700
at 3.77 s per update, load 1-2), then 600 with the loss on the whole run and 128 px crops
(README 3b), the first 260 updates at load 5-9. The consistency run was one run of 1,300 updates
(its shorter budgets kept on the way) at a 1-minute load of 0.1-3.5, mean 2.6 (tests ran beside
it part of the time).

What it says. Consistency distillation passes the card from its first 40 updates, but it does
not get closer to its teacher with more: 16.1, 15.3, 16.5, 18.0 grey levels at 40-1,300 updates,
no closer than the guided teacher's own 4-step consistency sampling (16.0 at 8 passes), while its
ring DAB drifts away from the teacher's (13.3 -> 8.4 against 13.4). It has folded the guidance
in but not learned the map from noise to the teacher's image: sampled in one step (what a
consistency model is for) it renders noise (16.9 x real), in two it fails too. The reason is
likely the parameterisation: the teacher predicts epsilon, so x0 at t = 999 divides by
sqrt(alpha_bar) = 0.006, and Song et al.'s skip-connection boundary parameterisation, which
would fix that, needs another output head. Progressive distillation (with the loss on the whole
run) keeps improving and ends 4.2 grey levels from the teacher, with the teacher's stain figures
(1.51 / 15.2 / 0.79 against 1.58 / 13.4 / 0.86). Per update consistency is 1.8x cheaper (2.05
against 3.77 s for the plain progressive preset on a quiet machine); at the same wall time (0.74
h, about 700 progressive updates) the plain progressive student still failed the card (off-stain
3.07 %, 22.1 grey levels away; README 3b). So: consistency gives a passing student sooner,
progressive gives the student that renders what its teacher renders, which is what a fast preview
of the teacher's render needs. The product keeps progressive. One seed per budget.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL_SIZE = 128
STUDENT_STEPS = 4


# ---------------------------------------------------------------------------------------------
# settings shared by both arms
# ---------------------------------------------------------------------------------------------
def cpu_precision() -> str:
    """bf16 where the CPU computes it natively (as the demo preset assumes), else fp32: emulated
    bf16 would slow the arms down and measure the emulation."""
    from napari_diffmix.runtime import native_bf16

    return "bf16" if native_bf16("cpu") else "fp32"


def arm_config(preset: str, teacher: str | os.PathLike, out_dir: str | os.PathLike, updates: int, *,
               precision: str | None = None, threads: int | None = None, **overrides: Any):
    """The distillation preset both arms take their budget from (updates, crops, lr, EMA, seed)."""
    from napari_diffmix.distill import DistillConfig

    precision = precision or cpu_precision()
    return DistillConfig.from_preset(preset, teacher=str(teacher), out_dir=str(out_dir), steps=int(updates),
                                     precision=precision, teacher_precision=precision, num_threads=threads, **overrides)


@dataclass
class ArmRun:
    """One trained student and what it cost."""

    arm: str
    updates: int
    wall_s: float
    model: torch.nn.Module = field(repr=False)
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    load: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    cpu_s: float = float("nan")  # this process's CPU time (all threads): less at the mercy of other jobs than wall time

    def summary(self) -> dict[str, Any]:
        return {"arm": self.arm, "updates": self.updates, "wall_s": self.wall_s, "s_per_update": self.wall_s / max(self.updates, 1),
                "cpu_s": self.cpu_s, "out_dir": str(self.out_dir), "load": self.load, "config": self.config, "reused": self.reused,
                "last_loss": self.history[-1]["loss"] if self.history else None}


class LoadMonitor:
    """1-minute load averages sampled every ``every`` s while a block runs (the runs share the CPU)."""

    def __init__(self, every: float = 20.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        s = self.samples or [float("nan")]
        return {"min": float(min(s)), "mean": float(np.mean(s)), "max": float(max(s)), "samples": len(s)}


# ---------------------------------------------------------------------------------------------
# progressive distillation: the product's
# ---------------------------------------------------------------------------------------------
def run_progressive(config, dataset: Any, scheme: Any, val: Any = None) -> ArmRun:
    """``napari_diffmix.distill.distill`` as it ships; the measured student is its exported EMA."""
    from napari_diffmix.distill import distill

    t0, c0 = time.perf_counter(), time.process_time()
    with LoadMonitor() as load:
        result = distill(config, dataset, scheme=scheme, val=val)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if result.interrupted or result.model_path is None:
        raise RuntimeError(f"the progressive run stopped at update {result.step} of {config.steps}")
    run = ArmRun("progressive", result.step, wall, result.ema_student.eval(), Path(config.out_dir), result.history,
                 load.summary(), config.to_dict(), cpu_s=cpu)
    save_arm(run)
    return run


# ---------------------------------------------------------------------------------------------
# consistency distillation
# ---------------------------------------------------------------------------------------------
@dataclass
class ConsistencySettings:
    grid_points: int = 12  # log-SNR-even timesteps of the discretisation, the clean end added
    pairs_per_crop: int = 4  # grid intervals per crop and update (4 x 4 crops = progressive's 16 pairs)
    target_ema: float = 0.95  # the stop-gradient target network's EMA rate (Song et al.'s CD mu)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def consistency_grid(alphas_cumprod: np.ndarray, points: int, steps: int = STUDENT_STEPS) -> list[int]:
    """The discretisation, from timestep 999 down (the clean end, -1, is implicit after it).
    Refused unless the student's sampling timesteps are on it: a consistency model is only
    trained at grid points."""
    from napari_diffmix.model.samplers import log_snr_timesteps

    start = len(alphas_cumprod) - 1
    grid = log_snr_timesteps(alphas_cumprod, start, points)
    sampling = log_snr_timesteps(alphas_cumprod, start, steps)
    if not set(sampling) <= set(grid):
        raise ValueError(f"the sampling timesteps {sampling} are not all on the {points}-point grid {grid}; "
                         "pick a multiple of the step count")
    return grid


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def consistency_f(net: Any, diffusion: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """f(x_t, t): the network's clipped x0 (float32), one conditional pass (guidance folded in)."""
    eps = net(x, diffusion.model_timesteps(t), cond)[:, :3].float()
    return diffusion.predict_x0_from_eps(x, t, eps).clamp(-1, 1)


def teacher_ode_step(runner: Any, diffusion: Any, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                     cond: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided deterministic DDIM step of the teacher from ``x`` at ``t`` to ``t_next`` (-1 =
    the clean image), x0 clipped and epsilon made to agree, as the product's samplers step.
    Returns (x at t_next, the teacher's clipped x0)."""
    eps = runner.guided_output(x, t, cond, guidance=guidance)[:, :3]
    x0 = diffusion.predict_x0_from_eps(x, t, eps).clamp(-1, 1)
    eps = diffusion.predict_eps_from_x0(x, t, x0)
    return diffusion.ddim_step(x0, eps, t_next), x0


def consistency_batch(x0: torch.Tensor, cond: torch.Tensor, grid: Sequence[int], pairs_per_crop: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, cond, t_{n+1}, t_n, noise) for ``pairs_per_crop`` distinct grid intervals per crop,
    intervals drawn uniformly; t_n = -1 is the clean end."""
    n_items, n_pairs = x0.shape[0], len(grid)
    k = min(pairs_per_crop, n_pairs)
    picks = torch.stack([torch.randperm(n_pairs, generator=gen)[:k] for _ in range(n_items)])  # (items, k)
    n = picks.T.reshape(-1).to(x0.device)  # slot-major, matching x0.repeat(k)
    ext = torch.tensor([*grid, -1], device=x0.device)
    noise = torch.randn((n_items * k, *x0.shape[1:]), generator=gen).to(x0.device)
    return x0.repeat(k, 1, 1, 1), cond.repeat(k, 1, 1, 1), ext[n], ext[n + 1], noise


def consistency_losses(student: Any, target: Any, runner: Any, diffusion: Any, x0: torch.Tensor, cond: torch.Tensor,
                       t_hi: torch.Tensor, t_lo: torch.Tensor, noise: torch.Tensor, guidance: float,
                       autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per-sample consistency-distillation losses (squared x0 distance, mean over pixels) with
    what went into them: ``f_student`` (with grad), ``target`` (no grad) and ``x_lo`` (the
    teacher's state at t_n). ``autocast_dtype``: the student's and target's autocast (the
    teacher runs at its Sampler's own precision)."""
    x_hi = diffusion.q_sample(x0, t_hi, noise)
    with torch.no_grad():
        x_lo, teacher_x0 = teacher_ode_step(runner, diffusion, x_hi, t_hi, t_lo, cond, guidance)
        goal = teacher_x0.clone()  # the boundary condition: f(x, clean) = x
        inner = t_lo >= 0
        if bool(inner.any()):
            with _autocast(x0.device, autocast_dtype):
                goal[inner] = consistency_f(target, diffusion, x_lo[inner], t_lo[inner], cond[inner])
    with _autocast(x0.device, autocast_dtype):
        f_student = consistency_f(student, diffusion, x_hi, t_hi, cond)
    losses = ((f_student - goal) ** 2).mean(dim=(1, 2, 3))
    return {"loss": losses, "f_student": f_student, "target": goal, "x_lo": x_lo}


def run_consistency(config, dataset: Any, scheme: Any, settings: ConsistencySettings | None = None, *,
                    snapshot: list | None = None, keep_at: Sequence[int] = ()) -> ArmRun:
    """Consistency-distil ``config.teacher`` with ``config``'s budget (steps, items, crop size,
    lr, betas, weight decay, grad clip, EMA, precisions, seed, crop stream). ``snapshot``: a list
    that receives (update, student, target, ema) state-dict copies after every update (tests).
    ``keep_at``: updates after which the EMA student is also kept as a finished run of that many
    updates, in ``consistency-N`` beside ``config.out_dir`` (nothing in the run depends on its
    length, so its first N updates are an N-update run: one long run gives every shorter budget)."""
    from napari_diffmix.classes import load_scheme
    from napari_diffmix.data.crops import EXTRA, CropStream
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.model.condition import condition_batch
    from napari_diffmix.model.diffusion import DiffusionConfig, GaussianDiffusion
    from napari_diffmix.model.samplers import Sampler, from_uint8
    from napari_diffmix.runtime import precision_dtype, resolve_precision, seed_int
    from napari_diffmix.train import collect_sources
    from napari_diffmix.trainloop import ema_rate_at, update_ema

    settings = settings or ConsistencySettings()
    config.validate()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    device = torch.device("cpu")
    scheme = load_scheme(scheme)
    teacher, info = load_model(config.teacher, device)
    teacher.requires_grad_(False)
    guidance = info.default_guidance if config.guidance is None else float(config.guidance)
    runner = Sampler(teacher, info.diffusion, precision=resolve_precision(config.teacher_precision, device))
    diffusion = GaussianDiffusion(DiffusionConfig.from_dict(dict(info.diffusion)))
    grid = consistency_grid(diffusion.alphas_cumprod, settings.grid_points, config.steps_to)

    student = copy.deepcopy(teacher).requires_grad_(True).train()
    target = copy.deepcopy(teacher).requires_grad_(False).eval()
    ema = copy.deepcopy(teacher).requires_grad_(False).eval()
    autocast_dtype = precision_dtype(resolve_precision(config.precision, device, training=True))
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas))
    # The progressive trainer's stream and noise seeds: both arms draw the same crops.
    stream = CropStream(collect_sources(dataset, scheme, config.crop_size), config.crop_size, config.items, seed=config.seed,
                        rank=0, augment=config.augment, shares={EXTRA: config.extra_share})
    gen = torch.Generator().manual_seed(seed_int(config.seed, 0, 2))

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ("step", "loss", "loss_clean_end", "grad_norm", "update_s", "elapsed_s", "load_1min")
    history: list[dict[str, float]] = []
    acc: dict[str, list[float]] = {}
    with LoadMonitor() as load, open(out_dir / "log.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        for step in range(config.steps):
            images, insts, types, _ = stream.next(0.0)
            cond = condition_batch(insts, types, scheme.num_classes).to(device)
            x0, cond, t_hi, t_lo, noise = consistency_batch(from_uint8(images, device), cond, grid, settings.pairs_per_crop, gen)
            t0 = time.perf_counter()
            out = consistency_losses(student, target, runner, diffusion, x0, cond, t_hi, t_lo, noise, guidance, autocast_dtype)
            loss = out["loss"].mean()
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"the consistency loss became {float(loss)} at update {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
            if not math.isfinite(float(grad_norm)):
                raise RuntimeError(f"the gradients became {float(grad_norm)} at update {step + 1}")
            opt.step()
            update_ema(target, student, settings.target_ema)
            update_ema(ema, student, ema_rate_at(config.ema_rate, step, config.ema_warmup))
            if snapshot is not None:
                snapshot.append((step + 1, *(copy.deepcopy(m.state_dict()) for m in (student, target, ema))))
            if step + 1 in keep_at and step + 1 < config.steps:
                kept = ArmRun("consistency", step + 1, time.perf_counter() - t_start, ema, out_dir.parent / f"consistency-{step + 1}",
                              list(history), load.summary(), {**config.to_dict(), "steps": step + 1, "kept_from": str(out_dir)},
                              cpu_s=time.process_time() - c_start)
                save_arm(kept)
            clean = out["loss"][t_lo < 0]
            acc.setdefault("loss", []).append(float(loss.detach()))
            acc.setdefault("loss_clean_end", []).extend(clean.detach().tolist())
            acc.setdefault("grad_norm", []).append(float(grad_norm))
            acc.setdefault("update_s", []).append(time.perf_counter() - t0)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                row = {"step": step + 1, **{k: float(np.mean(v)) if v else float("nan") for k, v in acc.items()},
                       "elapsed_s": time.perf_counter() - t_start, "load_1min": os.getloadavg()[0]}
                row.setdefault("loss_clean_end", float("nan"))
                writer.writerow({k: row.get(k) for k in fields})
                fh.flush()
                history.append(row)
                acc = {}
                print(f"consistency {step + 1}/{config.steps}: loss {row['loss']:.5f} ({row['elapsed_s']:.0f} s, load {row['load_1min']:.2f})",
                      file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    run = ArmRun("consistency", config.steps, wall, ema, out_dir, history, load.summary(),
                 {**config.to_dict(), "consistency": settings.to_dict(), "grid": grid, "guidance_folded": guidance}, cpu_s=cpu)
    save_arm(run)
    return run


def save_arm(run: ArmRun) -> None:
    """A run's result.json, which ``--reuse`` reads, with a consistency run's EMA student (ema.pt;
    the progressive arm's model.safetensors is distill's own); weights first, so an interrupted
    run never leaves a result without them."""
    from napari_diffmix.atomic import write_bytes, write_json

    if run.arm == "consistency":
        buf = io.BytesIO()
        torch.save(run.model.state_dict(), buf)
        write_bytes(run.out_dir / "ema.pt", buf.getvalue())
    write_json(run.out_dir / "result.json", run.summary())


def consistency_sample(model: torch.nn.Module, diffusion: Any, cond: torch.Tensor, *, steps: int = STUDENT_STEPS,
                       seed: int | Sequence[int] = 0, precision: str = "fp32") -> torch.Tensor:
    """Multistep consistency sampling on ``ddim-logsnr``'s ``steps`` timesteps: x0 = f(x, t_k),
    then x = x0 noised to t_{k+1} with fresh noise; returns the last x0 (model space, float32).
    Item i draws all its noise from a CPU generator seeded ``seed + i`` (or ``seed[i]``), so its
    first noise is the one the product's samplers start from with that seed."""
    from napari_diffmix.model.samplers import log_snr_timesteps
    from napari_diffmix.runtime import precision_dtype

    n, _, h, w = cond.shape
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    device = next(model.parameters()).device

    def draw() -> torch.Tensor:
        return torch.cat([torch.randn((1, 3, h, w), generator=g) for g in gens]).to(device)

    timesteps = log_snr_timesteps(diffusion.alphas_cumprod, diffusion.config.num_timesteps - 1, steps)
    dtype = precision_dtype(precision)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            x = draw()
            cond = cond.to(device=device, dtype=torch.float32)
            for k, t in enumerate(timesteps):
                t_k = torch.full((n,), t, device=device, dtype=torch.long)
                x0 = consistency_f(model, diffusion, x, t_k, cond)
                if k + 1 < len(timesteps):
                    x = diffusion.q_sample(x0, torch.full((n,), timesteps[k + 1], device=device, dtype=torch.long), draw())
    finally:
        model.train(was_training)
    return x0.float()


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class GuidedNet(torch.nn.Module):
    """``model`` with classifier-free guidance at ``scale`` as one network (two passes: the
    condition and the all-zero one, the product's empty condition; variance channels from the
    conditional pass), so that the consistency sampler can run the guided teacher."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t, cond)
        null = self.model(x, t, torch.zeros_like(cond))
        eps = null[:, :3] + self.scale * (out[:, :3] - null[:, :3])
        return torch.cat([eps, out[:, 3:]], dim=1)


def measure(teacher_file: str | os.PathLike, held_out: Any, scheme: Any, arms: Sequence[ArmRun], *, size: int = EVAL_SIZE,
            ring_classes: tuple[int, int] | None = None, baselines: bool = True, cache: Path | None = None,
            fewer_steps: Sequence[int] = ()) -> dict[str, Any]:
    """Each arm's student on every ``size`` px window of ``held_out`` (seeds 0.., fp32) with the
    card's acceptance and the MAD (grey levels) from the teacher's guided 15-step DPM-Solver++
    renders of the same windows and seeds; with ``baselines``, both 4-step samplers on the
    teacher at guidance 1 (each arm at 0 updates). ``cache``: a folder keeping the teacher's
    rows (they do not depend on the arms; minutes of a loaded CPU). ``fewer_steps``: each
    consistency student also sampled with these step counts (a consistency model maps any noisy
    state to its clean end, so one step should already be an image). The rendered images are
    under the key ``"images"`` (uint8 arrays, not JSON)."""
    from napari_diffmix.classes import load_scheme
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.model.condition import condition_batch
    from napari_diffmix.model.diffusion import DiffusionConfig, GaussianDiffusion
    from napari_diffmix.model.samplers import to_uint8
    from napari_diffmix.quality import acceptance, render_and_measure

    scheme = load_scheme(scheme)
    rings = ring_classes or (scheme.class_id("epithelial"), scheme.class_id("stromal"))
    teacher, tinfo = load_model(teacher_file)
    diffusion = GaussianDiffusion(DiffusionConfig.from_dict(dict(tinfo.diffusion)))

    windows = held_out.windows(size)

    def product(model: torch.nn.Module, sampler: str, steps: int, guidance: float):
        report, rendered, _ = render_and_measure(model, [], scheme, ring_classes=rings, sampler=sampler, steps=steps,
                                                 guidance=guidance, diffusion=tinfo.diffusion, seed=0, windows=windows)
        return report, rendered

    rows: dict[str, dict[str, Any]] = {}
    images: dict[str, np.ndarray] = {}

    def record(name: str, report: Any, rendered: Sequence[np.ndarray], seconds: float, **what: Any) -> None:
        rows[name] = {**report.to_dict(), **what, "render_s": seconds}
        images[name] = np.stack(rendered).astype(np.int16)

    def teacher_row() -> None:
        t0 = time.perf_counter()
        report, rendered = product(teacher, "dpm++2m", 15, tinfo.default_guidance)
        record("teacher_15", report, rendered, time.perf_counter() - t0, sampler="dpm++2m", steps=15,
               guidance=tinfo.default_guidance, passes=30)

    def consistency_row(name: str, model: torch.nn.Module, steps: int = STUDENT_STEPS, guidance: float = 1.0, **what: Any) -> None:
        t0 = time.perf_counter()
        rendered = []
        for i, w in enumerate(windows):  # one window at a time with seed i, as render_and_measure renders
            cond = condition_batch([w.inst_map], [w.type_map], scheme.num_classes)
            rendered.append(to_uint8(consistency_sample(model, diffusion, cond, steps=steps, seed=i, precision="fp32"))[0])
        report = acceptance(rendered, [w.image for w in windows], [w.inst_map for w in windows], [w.inst_types for w in windows],
                            scheme.num_classes, ring_classes=rings)
        record(name, report, rendered, time.perf_counter() - t0, sampler="consistency multistep", steps=steps, guidance=guidance,
               passes=steps * (1 if guidance == 1.0 else 2), **what)

    def progressive_row(name: str, model: torch.nn.Module, steps: int = STUDENT_STEPS, guidance: float = 1.0, **what: Any) -> None:
        t0 = time.perf_counter()
        report, rendered = product(model, "ddim-logsnr", steps, guidance)
        record(name, report, rendered, time.perf_counter() - t0, sampler="ddim-logsnr", steps=steps, guidance=guidance,
               passes=steps * (1 if guidance == 1.0 else 2), **what)

    fixed = [("teacher_15", teacher_row)]
    if baselines:
        guided = GuidedNet(teacher, tinfo.default_guidance)
        fixed += [
            ("teacher_ddim_4_g1", lambda: progressive_row("teacher_ddim_4_g1", teacher, updates=0)),
            ("teacher_consistency_4_g1", lambda: consistency_row("teacher_consistency_4_g1", teacher, updates=0)),
            # The guided teacher (8 passes) on each sampler: what a student that had only folded the
            # guidance in would reach.
            ("teacher_ddim_4_cfg", lambda: progressive_row("teacher_ddim_4_cfg", teacher, guidance=tinfo.default_guidance)),
            ("teacher_consistency_4_cfg", lambda: consistency_row("teacher_consistency_4_cfg", guided, guidance=tinfo.default_guidance)),
        ]
    key = f"{tinfo.sha256[:16]}-{getattr(held_out, 'name', 'tile')}-{size}-{len(windows)}"
    reused = []
    for name, render in fixed:
        cached = None if cache is None else Path(cache) / f"reference-{key}-{name}.npz"
        if cached is not None and cached.exists():
            with np.load(cached) as saved:
                rows[name], images[name] = json.loads(str(saved["row"])), saved["images"]
            reused.append(name)
            continue
        render()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, row=json.dumps(rows[name]), images=images[name])
    for arm in arms:
        name = f"{arm.arm}_{arm.updates}"
        steps = int(arm.config.get("steps_to", STUDENT_STEPS))
        (progressive_row if arm.arm == "progressive" else consistency_row)(name, arm.model, steps, updates=arm.updates,
                                                                           wall_s=arm.wall_s, cpu_s=arm.cpu_s, arm=arm.arm)
        if arm.arm == "consistency":
            for fewer in fewer_steps:
                consistency_row(f"{name}_{fewer}step", arm.model, fewer, updates=arm.updates, arm=arm.arm)
    reference = images["teacher_15"]
    for name, img in images.items():
        rows[name]["mad_vs_teacher_15"] = float(np.abs(img - reference).mean())
    return {"rows": rows, "windows": len(windows), "size": size, "reference_cached": reused,
            "images": {name: img.astype(np.uint8) for name, img in images.items()}}


def table(figures: dict[str, Any]) -> str:
    lines = ["| run | updates | wall s | s/update | CPU s | h_fraction | dab_ratio | hf_ratio | off-stain % (real) | passed | MAD vs teacher 15 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in figures["rows"].items():
        updates = r.get("updates", "")
        wall, cpu = r.get("wall_s"), r.get("cpu_s")
        per = f"{wall / updates:.2f}" if wall and updates else ""
        lines.append(
            f"| {name} ({r['sampler']} {r['steps']}, g {r['guidance']:g}) | {updates} | {f'{wall:.0f}' if wall else ''} | {per} | "
            f"{f'{cpu:.0f}' if cpu and math.isfinite(cpu) else ''} | "
            f"{r['h_fraction']:.2f} | {r['dab_ratio']:.2f} | {r['hf_ratio']:.2f} | {100 * r['off_stain']:.2f} ({100 * r['off_stain_real']:.2f}) | "
            f"{'yes' if r['passed'] else 'no'} | {r.get('mad_vs_teacher_15', 0.0):.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _reused(arm: str, folder: Path, updates: int, teacher: Path) -> ArmRun | None:
    """A finished run of ``arm`` in ``folder`` with ``updates`` updates, or None."""
    from napari_diffmix.model.checkpoint import load_model

    path = folder / "result.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("updates") != updates:
        return None
    if arm == "progressive":
        model, _ = load_model(folder / "model.safetensors")
    else:
        model, _ = load_model(teacher)
        model.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu"))
    return ArmRun(arm, updates, float(saved["wall_s"]), model.eval(), folder, [], saved.get("load", {}), saved.get("config", {}), True,
                  float(saved.get("cpu_s", "nan")))


def finished_student(path: Path) -> ArmRun:
    """A progressive student already distilled (the bundled one, made in stages by
    scripts/distill_demo_model.py) as the progressive arm: its updates from its metadata, its
    hours from the log.csv beside it (``distill_log.csv`` for the bundled one)."""
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.trainloop import logged_hours

    model, info = load_model(path)
    if not info.distilled or info.distilled.get("method") != "progressive":
        raise SystemExit(f"{path} is not a progressively distilled student (its metadata: {info.distilled})")
    logs = [f for f in (path.parent / "distill_log.csv", path.parent / "log.csv") if f.is_file()]
    wall = logged_hours(logs[0]) * 3600 if logs else float("nan")
    return ArmRun("progressive", int(info.distilled["distill_steps"]), wall, model.eval(), path.parent, [], {},
                  {**info.distilled, "student_file": str(path)}, True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=150, help="optimizer updates per arm (default 150)")
    p.add_argument("--out", default="runs/compare-distill", help="folder of the run folders")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--arms", default="progressive,consistency", help="comma-separated: progressive, consistency")
    p.add_argument("--grid", type=int, default=12, help="consistency grid points (log-SNR even; a multiple of 4)")
    p.add_argument("--pairs-per-crop", type=int, default=4, help="consistency grid intervals per crop and update")
    p.add_argument("--target-ema", type=float, default=0.95, help="the consistency target network's EMA rate")
    p.add_argument("--keep-at", type=_counts, default=(), metavar="N,N",
                   help="consistency: also keep the student after these updates as finished runs of that length "
                        "(consistency-N; measure them later with --reuse --updates N)")
    p.add_argument("--progressive-student", type=Path, metavar="FILE",
                   help="measure this finished progressive student as the progressive arm instead of training one "
                        "(e.g. the bundled napari_diffmix/resources/models/demo/fast/demo-fast.safetensors)")
    p.add_argument("--fewer-steps", type=_counts, default=(1, 2), metavar="N,N",
                   help="also sample each consistency student with these step counts (default 1,2)")
    p.add_argument("--reuse", action="store_true", help="measure an arm's finished run folder instead of training it again")
    args = p.parse_args(argv)

    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import demo_split
    from napari_diffmix.model.checkpoint import require_bundled_model

    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - {"progressive", "consistency"}
    if unknown:
        p.error(f"unknown arm(s) {sorted(unknown)}")
    teacher = require_bundled_model()
    split = demo_split()
    out = Path(args.out)
    settings = ConsistencySettings(args.grid, args.pairs_per_crop, args.target_ema)
    conditions = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "precision": cpu_precision(),
                  "torch": torch.__version__, "python": platform.python_version(), "nice": os.nice(0),
                  "load_at_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs = []
    for arm in arms:
        folder = out / f"{arm}-{args.updates}"
        if arm == "progressive" and args.progressive_student:
            runs.append(finished_student(args.progressive_student))
            continue
        run = _reused(arm, folder, args.updates, teacher) if args.reuse else None
        if run is None:
            config = arm_config("demo", teacher, folder, args.updates, threads=args.threads)
            run = run_progressive(config, split.train, DEMO, split.held_out) if arm == "progressive" else \
                run_consistency(config, split.train, DEMO, settings, keep_at=args.keep_at)
        print(f"{arm}: {run.updates} updates in {run.wall_s:.0f} s, {run.cpu_s:.0f} CPU s (load {run.load})", file=sys.stderr, flush=True)
        runs.append(run)
    figures = measure(teacher, split.held_out, DEMO, runs, cache=out, fewer_steps=args.fewer_steps)
    images = figures.pop("images")
    np.savez_compressed(out / f"images-{args.updates}.npz", **images)
    figures.update(conditions=conditions, arms=[r.summary() for r in runs], teacher=str(teacher))
    figures["conditions"]["load_at_end"] = os.getloadavg()
    print(table(figures))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts such as 300,700, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be positive, got {text!r}")
    return values


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
