"""GPU readiness (issue 21): the published model on one accelerator, in minutes, in one command.

What it measures (each a section; ``--only`` / ``--skip`` pick them, each has a time budget):

  gemm         an 8192^3 matrix product in bf16, fp32 and (CUDA) TF32: the practical peak beside
               the datasheet's
  step         published config (``diffmix-consep``, 652 M parameters, random weights), 256 px,
               at batch 1, 8, 32 in bf16 (autocast) and fp32: one forward (SPADE computed inside,
               what the DiffMix code runs) and one guided step as the Sampler runs it in a render
               (one encoder pass shared by both CFG branches, one decoder batch of 2N on the
               GPU, SPADE gamma/beta from the cache). Seconds, FLOPs (torch FlopCounterMode:
               convolutions, matrix products and attention), achieved TFLOP/s, share of the
               device's dense bf16 peak (datasheet table below) and of the measured GEMM peak;
               on CUDA also the guided step with cuDNN's autotuner on (the product leaves it off)
  render       a 15-step DPM-Solver++ guided render (the product's fast default, precision
               auto) of 256 px patches at batch 1 and at the best batch of ``step``: seconds,
               images/s; DiffMix's default (100-step DDIM, SDEdit 0.55 = 55 steps, CFG as two
               fp32 forwards = 110 forwards, no cache) at batch 1 in the same run, and the ratio
  interactive  the figures of bench_interactive.py on this device: the bundled demo model on its
               256 px window of the demo labels with the Generate widget's defaults: first
               preview, whole render of new labels, SDEdit 0.55 of it, one nucleus moved 6 px
               and re-rendered in its windows, through bench_interactive.measure(device=, size=):
               the one path of both benchmarks
  graphs       the guided step (bf16) captured whole in a CUDA graph and replayed: speed-up
  train        training steps/s of the published preset (batch 16, 256 px crops, precision auto,
               AdamW, EMA) with and without gradient checkpointing, peak memory
  compile      torch.compile on the guided step as ``Sampler(compile=True)`` does it (encoder and
               decoder compiled), bf16: compile time, speed-up, largest difference to eager.
               ``--quick``: mode "default" at batch 1; the full run adds mode "reduce-overhead"
               (inductor's CUDA graphs) and the best batch, as far as the budget goes

A section that fails, runs out of memory or out of its budget is recorded as such in the JSON and
the table; the run goes on. The JSON (``--json FILE``) is rewritten after every measurement, so a
run killed by a timeout still leaves everything measured before. Weights are random (compute does
not depend on their values); the layers ADM starts at zero get PyTorch's default init so that the
outputs compared between eager, CUDA graphs and compiled code are not all zeros.

The guided step is timed through the model's public encoder/decoder API exactly as
``Sampler._guided`` composes it, not through ``Sampler.guided_output``, which hashes the whole
condition (a copy to the host) on every call; a render hashes it once. A test checks that the two
give the same output.

Goals (issue 21): guided step >= 50 % of the bf16 peak at the best batch; a 256 px patch in
<= 0.25 s at batch 1; >= 25 patches/s at the best batch. The JSON's ``goals`` says met / missed.

On a machine without CUDA it refuses, unless asked for ``--device cpu --tiny`` (a 32 px tiny
config, batches 1, 2, 4: the end-to-end check the tests run; its timings mean nothing).

The device command (no accelerator has been lent to this project yet; nothing measured so far).
Here, once per session (fetches the diffusers wheel that the device image lacks into .whl/):

    bash scripts/gpu_check.sh --prepare

then through the device tool, the quick run (<= 3 min of benchmark, 200 s hard limit):

    run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=300)

and, if 10 minutes of device time are left, the full run on the same warm machine (<= 8 min):

    run(command="FULL=1 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)

Each runs ``python benchmarks/bench_gpu.py [--quick] --json $OUT/bench_gpu.json`` under a timeout
and leaves the log in ``$OUT/bench_gpu.log``. By hand on a CUDA machine:
``python benchmarks/bench_gpu.py [--quick] [--json FILE] [--only step,render] [--skip compile]``.

Measured: nothing yet on a GPU (record the device name and figures here after the first run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("napari_diffmix") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from napari_diffmix.classes import load_scheme  # noqa: E402
from napari_diffmix.errors import DiffMixError  # noqa: E402
from napari_diffmix.model.condition import condition_batch  # noqa: E402
from napari_diffmix.model.samplers import DIFFMIX_SETTINGS, FAST_SETTINGS, Sampler, free_bytes, preview, to_uint8  # noqa: E402
from napari_diffmix.model.unet import PRESET_SCHEMES, SDMUNet, SpadeCache, UNetConfig  # noqa: E402

SCHEMA = "napari-diffmix/bench_gpu/1"
SECTIONS = ("gemm", "step", "render", "interactive", "graphs", "train", "compile")
GUIDANCE = 1.5  # the published CFG scale
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: (bf16, tf32).
# Matched against torch.cuda.get_device_name(), first hit wins, so the specific names come first.
PEAKS: tuple[tuple[tuple[str, ...], str, float, float], ...] = (
    (("GH200",), "GH200", 989.4, 494.7),
    (("H200", "NVL"), "H200 NVL", 835.0, 417.5),
    (("H200",), "H200 SXM", 989.4, 494.7),
    (("H100", "NVL"), "H100 NVL", 835.0, 417.5),
    (("H100", "PCIE"), "H100 PCIe", 756.0, 378.0),
    (("H100",), "H100 SXM", 989.4, 494.7),  # "NVIDIA H100 80GB HBM3"
    (("H800", "PCIE"), "H800 PCIe", 756.0, 378.0),
    (("H800",), "H800 SXM", 989.4, 494.7),
    (("A100",), "A100", 312.0, 156.0),
    (("A800",), "A800", 312.0, 156.0),
    (("L40S",), "L40S", 362.1, 183.0),
    (("L4",), "L4", 121.0, 60.0),
    (("A10G",), "A10G", 70.0, 35.0),
    (("A10",), "A10", 125.0, 62.5),
)

# Seconds per section (full run, --quick); the whole run is also capped by --budget.
BUDGETS = {
    "gemm": (20, 10),
    "step": (120, 50),
    "render": (90, 40),
    "interactive": (30, 15),
    "graphs": (45, 20),
    "train": (100, 40),
    "compile": (240, 90),
}
TOTAL_BUDGET = (450, 160)  # seconds; start-up (imports, CUDA context, model build) fits inside 8 / 3 min
GOALS = {"guided_share_of_bf16_peak": 0.5, "patch_seconds_batch1": 0.25, "patches_per_s_best": 25.0}


# ---------------------------------------------------------------------------------------------
# small tools
# ---------------------------------------------------------------------------------------------
class SectionTimeout(Exception):
    """A section ran past its budget (raised from the SIGALRM handler)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_table(name: str) -> tuple[str | None, float | None, float | None]:
    upper = name.upper()
    for keys, label, bf16, tf32 in PEAKS:
        if all(k in upper for k in keys):
            return label, bf16, tf32
    return None, None, None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return ("out of memory: " if is_oom(exc) else "") + first[:400]


def label_maps(batch: int, size: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random discs as nuclei (ids 1..K, classes 1..C): label maps with realistic edge density."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((batch, size, size), np.int32)
    types = np.zeros((batch, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for b in range(batch):
        for k in range(1, max(2, size * size // 600) + 1):
            cy, cx = rng.integers(0, size, 2)
            r = 3 + 5 * rng.random()
            lo_y, hi_y, lo_x, hi_x = max(0, int(cy - r)), int(cy + r) + 1, max(0, int(cx - r)), int(cx + r) + 1
            disc = (yy[lo_y:hi_y, lo_x:hi_x] - cy) ** 2 + (xx[lo_y:hi_y, lo_x:hi_x] - cx) ** 2 < r * r
            inst[b, lo_y:hi_y, lo_x:hi_x][disc] = k
            types[b, lo_y:hi_y, lo_x:hi_x][disc] = rng.integers(1, classes + 1)
    return inst, types


def conditions(model: SDMUNet, batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    classes = model.config.cond_channels - 2
    inst, types = label_maps(batch, size, classes, seed)
    return condition_batch(inst, types, classes).to(device)


def build_model(config: UNetConfig, device: torch.device) -> SDMUNet:
    """The network with random weights, allocated on ``device`` directly (no 2.6 GB host copy)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = SDMUNet(config)
    with torch.no_grad():
        for module in model.modules():
            # ADM zero-inits each residual branch's last layer; give those a default init so that
            # outputs (compared across eager, graphs and compiled code) carry signal.
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and weight is not None and not weight.any():
                module.reset_parameters()
    return model.eval()


class GuidedStep:
    """One classifier-free-guided network evaluation with the SPADE cache, composed from the model's
    public API the way ``Sampler._guided`` does it in a render: the condition's cache (budget: half
    the free device memory, as the Sampler sets it), the memoised all-zero-condition cache, one
    shared encoder pass, then one decoder batch of 2N ("joint", the Sampler's choice on GPUs) or two
    decoder passes of N ("split", its choice on CPUs), and ``eps = eps0 + s (eps_y - eps0)``.
    ``encode`` / ``decode`` replace the model's (compiled versions)."""

    def __init__(self, model: SDMUNet, cond: torch.Tensor, precision: str, *, guidance: float = GUIDANCE,
                 encode: Callable | None = None, decode: Callable | None = None):
        device = cond.device
        self.dtype = AUTOCAST[precision]
        self.device_type = device.type
        self.guidance = guidance
        self.joint = device.type != "cpu"
        free = free_bytes(device)
        budget = None if free is None else free // 2
        n, _, height, width = cond.shape
        self.spade_cond = model.spade_params(cond, max_bytes=budget, dtype=self.dtype)
        self.spade_null = model.null_spade_params(height, width, batch=n, dtype=self.dtype)
        self.spade_both = SpadeCache.cat(self.spade_cond, self.spade_null)
        self.encode = encode or model.encode
        self.decode = decode or model.decode

    @property
    def cached_layers(self) -> int:
        return self.spade_cond.cached_layers

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, cache_enabled: bool = True) -> torch.Tensor:
        # cache_enabled=False inside CUDA-graph capture (autocast's weight-cast cache must not be used there).
        autocast = (torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache_enabled)
                    if self.dtype is not None else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            state = self.encode(x, t)
            if self.joint:
                out_cond, out_null = self.decode(state.repeat(2), spade=self.spade_both).float().chunk(2)
            else:
                out_cond = self.decode(state, spade=self.spade_cond).float()
                out_null = self.decode(state, spade=self.spade_null).float()
        eps = out_null[:, :3] + self.guidance * (out_cond[:, :3] - out_null[:, :3])
        return torch.cat([eps, out_cond[:, 3:]], dim=1)


def forward(model: SDMUNet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, precision: str) -> torch.Tensor:
    """One full conditional forward, SPADE gamma/beta computed inside (the DiffMix code's pass)."""
    dtype = AUTOCAST[precision]
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return model(x, t, cond)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# the run: sections, budgets, partial JSON
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.quick = args.quick
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.section_deadline = self.deadline
        self.timed_out = False
        self.model: SDMUNet | None = None
        self.size = args.size
        self.batches = args.batches
        self.reps = args.reps
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "status": "running",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in vars(args).items()},
            "env": {},
            "sections": {name: self._initial(name) for name in SECTIONS},
            "goals": {},
            "elapsed_s": 0.0,
        }

    def _initial(self, name: str) -> dict[str, Any]:
        if name not in (self.args.only or SECTIONS):
            return {"status": "skipped", "reason": "--only"}
        if name in self.args.skip:
            return {"status": "skipped", "reason": "--skip"}
        return {"status": "pending"}

    # -- JSON ------------------------------------------------------------------------------------
    def save(self) -> None:
        """Rewrite the JSON whole (temporary file + rename), SIGALRM held off meanwhile."""
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        if not self.args.json:
            return
        path = Path(self.args.json)
        text = json.dumps(self.data, indent=2, default=_json_default) + "\n"
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def record(self, section: str, key: str, row: dict[str, Any], line: str | None = None) -> None:
        """Append a measurement to a section's list ``key`` and save at once."""
        self.data["sections"][section].setdefault(key, []).append(row)
        if line:
            print(line, flush=True)
        self.save()

    # -- time ------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def check(self) -> None:
        # Library code (dynamo) may catch the SIGALRM exception; the flag still ends the section.
        if self.timed_out or self.left() <= 0:
            self.timed_out = True
            raise SectionTimeout

    def time_call(self, fn: Callable[[], Any], *, warmup: int = 1, reps: int | None = None,
                  max_s: float | None = None) -> dict[str, float]:
        """Median / min wall seconds of ``fn`` (device synchronised), after ``warmup`` calls;
        stops early once the timed calls took ``max_s`` (default a fifth of the section left)."""
        reps = reps or self.reps
        for _ in range(warmup):
            self.check()
            fn()
            sync(self.device)
        limit = max_s if max_s is not None else max(1.0, self.left() / 5)
        times: list[float] = []
        for _ in range(reps):
            self.check()
            start = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - start)
            if sum(times) > limit:
                break
        return {"seconds": statistics.median(times), "seconds_min": min(times), "reps": len(times)}

    def run_section(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        rec = self.data["sections"][name]
        if rec["status"] == "skipped":  # by --only / --skip
            return
        budget = BUDGETS[name][1 if self.quick else 0] * self.args.budget_scale
        left = self.deadline - time.perf_counter()
        if left < 5:
            rec.update(status="skipped", reason=f"the run's budget ({self.args.budget:.0f} s) is spent")
            print(f"\n== {name}: skipped, the run's budget is spent", flush=True)
            self.save()
            return
        budget = min(budget, left)
        rec.update(status="running", budget_s=round(budget, 1))
        self.save()
        print(f"\n== {name} (budget {budget:.0f} s)", flush=True)
        self.section_deadline = time.perf_counter() + budget
        self.timed_out = False

        def on_alarm(signum, frame):
            self.timed_out = True
            raise SectionTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        start = time.perf_counter()
        try:
            fn(rec)
            rows = rec.get("rows", [])
            failed = sum(1 for r in rows if "error" in r)
            status = "error" if rows and failed == len(rows) else "partial" if failed else "ok"
            rec["status"] = "timeout" if self.timed_out else rec.get("status_override", status)
        except SectionTimeout:
            rec["status"] = "timeout"
        except Exception as exc:  # a failing section is a finding, not the end of the run
            rec["status"] = "timeout" if self.timed_out else "error"
            rec["error"] = error_text(exc)
            rec["traceback"] = traceback.format_exc(limit=8)[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.section_deadline = self.deadline
        rec.pop("status_override", None)
        rec["seconds"] = round(time.perf_counter() - start, 2)
        if rec["status"] == "timeout":
            rec.setdefault("reason", f"ran past its budget of {budget:.0f} s; rows above were measured")
        print(f"   -> {name}: {rec['status']} in {rec['seconds']:.1f} s" + (f" ({rec.get('error')})" if rec.get("error") else ""),
              flush=True)
        try:
            release(self.device)
        except Exception:  # noqa: BLE001  (a broken CUDA context is reported by the next section)
            pass
        self.save()

    # -- shared pieces -----------------------------------------------------------------------------
    def get_model(self) -> SDMUNet:
        if self.model is None:
            start = time.perf_counter()
            self.model = build_model(self.args.config, self.device)
            sync(self.device)
            self.data["env"]["model"] = {
                "preset": self.args.preset, "parameters": self.model.num_parameters(),
                "build_s": round(time.perf_counter() - start, 2), "size_px": self.size,
            }
            self.save()
        return self.model

    def peak(self) -> float | None:
        return self.data["env"].get("peak_bf16_tflops")

    def practical(self) -> float | None:
        rows = self.data["sections"]["gemm"].get("rows", [])
        return next((r["tflops"] for r in rows if r.get("dtype") == "bf16" and "tflops" in r), None)

    def throughput(self, flops: int, seconds: float) -> dict[str, float | None]:
        tflops = flops / seconds / 1e12
        peak, practical = self.peak(), self.practical()
        return {"tflops": tflops, "share_of_bf16_peak": tflops / peak if peak else None,
                "share_of_gemm_bf16": tflops / practical if practical else None}

    def best_batch(self) -> int:
        rows = [r for r in self.data["sections"]["step"].get("rows", [])
                if r.get("kind") == "guided" and r.get("precision") == "bf16" and "images_per_s" in r]
        if rows:
            return max(rows, key=lambda r: r["images_per_s"])["batch"]
        return max(self.batches)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (torch.device, torch.dtype, Path, UNetConfig)):
        return str(obj)
    return repr(obj)


def _fmt_share(value: float | None) -> str:
    return f"{100 * value:5.1f} %" if value is not None else "   n/a"


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def collect_env(bench: Bench) -> None:
    device = bench.device
    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None), "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        probes = {  # each read on its own: a flag renamed in another torch must not stop the run
            "capability": lambda: list(torch.cuda.get_device_capability(device)),
            "multiprocessors": lambda: torch.cuda.get_device_properties(device).multi_processor_count,
            "memory_gib": lambda: round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2),
            "cudnn": torch.backends.cudnn.version,
            "cudnn_benchmark": lambda: torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
            "matmul_precision": torch.get_float32_matmul_precision,
        }
        for key, probe in probes.items():
            try:
                env[key] = probe()
            except Exception as exc:  # noqa: BLE001
                env[key] = f"unavailable: {error_text(exc)}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
        label, bf16, tf32 = peak_table(env["device_name"])
    else:
        env["device_name"] = platform.processor() or platform.machine()
        label, bf16, tf32 = None, None, None
    env.update(peak_device=label, peak_bf16_tflops=bf16, peak_tf32_tflops=tf32,
               peak_source="NVIDIA datasheet, dense" if label else "no datasheet peak for this device")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    bench.data["env"] = env
    bench.save()
    print(f"device: {env['device_name']} ({device}); torch {env['torch']}, CUDA {env['cuda']}, "
          f"cuDNN {env.get('cudnn')}, Python {env['python']}", flush=True)
    if device.type == "cuda":
        print(f"datasheet dense bf16 peak: {bf16 if bf16 else 'unknown'} TFLOP/s ({label or 'device not in the table'}); "
              f"fp32 convolutions use TF32: {env['cudnn_allow_tf32']}, fp32 matmuls: {env['matmul_precision']}", flush=True)


def section_gemm(bench: Bench, rec: dict[str, Any]) -> None:
    device = bench.device
    n = 8192 if device.type == "cuda" and not bench.args.tiny else 512
    kinds = [("bf16", torch.bfloat16, None), ("fp32", torch.float32, "highest")]
    if device.type == "cuda":  # fp32 convolutions run on TF32 tensor cores by default (cudnn.allow_tf32)
        kinds.append(("tf32", torch.float32, "high"))
    saved = torch.get_float32_matmul_precision()
    for dtype_name, dtype, matmul_precision in kinds:
        bench.check()
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        try:
            if matmul_precision:
                torch.set_float32_matmul_precision(matmul_precision)
            timing = bench.time_call(lambda: torch.mm(a, b), warmup=3, reps=20 if device.type == "cuda" else 3,
                                     max_s=bench.left() / 4)
        finally:
            torch.set_float32_matmul_precision(saved)
        flops = 2 * n**3
        row = {"dtype": dtype_name, "n": n, "flops": flops, **timing, "tflops": flops / timing["seconds_min"] / 1e12}
        peak = bench.peak()
        row["share_of_bf16_peak"] = row["tflops"] / peak if peak else None
        bench.record("gemm", "rows", row,
                     f"   {n}x{n}x{n} {dtype_name:>4} matmul: {row['tflops']:7.1f} TFLOP/s (best of {timing['reps']}), "
                     f"{_fmt_share(row['share_of_bf16_peak'])} of the bf16 datasheet peak")


def _measure_step(bench: Bench, model: SDMUNet, kind: str, precision: str, batch: int,
                  flops: dict[tuple[str, int], int]) -> tuple[dict[str, Any], str]:
    """One row of the step section; everything it allocates is freed when it returns."""
    device, size = bench.device, bench.size
    row: dict[str, Any] = {"kind": kind, "precision": precision, "batch": batch}
    try:
        x = torch.randn(batch, 3, size, size, device=device)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
        cond = conditions(model, batch, size, seed=batch, device=device)
        if kind == "forward":
            def fn():
                return forward(model, x, t, cond, precision)
        else:
            start = time.perf_counter()
            step = GuidedStep(model, cond, precision)
            sync(device)
            row["cache_fill_s"] = time.perf_counter() - start
            row["spade_layers_cached"] = f"{step.cached_layers}/{len(model.spade_norms)}"

            def fn():
                return step(x, t)
        if (kind, batch) not in flops:  # the same count in every precision
            flops[(kind, batch)] = count_flops(fn)
        timing = bench.time_call(fn)
        count = flops[(kind, batch)]
        row.update(timing, flops=count, flops_per_image=count / batch, images_per_s=batch / timing["seconds"],
                   **bench.throughput(count, timing["seconds"]))
        if device.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        line = (f"   {kind:<7} {precision} batch {batch:3d}: {timing['seconds'] * 1e3:9.2f} ms  "
                f"{row['images_per_s']:8.2f} img/s  {row['tflops']:7.2f} TFLOP/s  "
                f"{_fmt_share(row['share_of_bf16_peak'])} of bf16 peak  ({row['flops_per_image'] / 1e9:.0f} GFLOP/img)")
    except (SectionTimeout, KeyboardInterrupt):
        raise
    except Exception as exc:  # OOM at a large batch is a result
        row["error"] = error_text(exc)
        line = f"   {kind:<7} {precision} batch {batch:3d}: {row['error']}"
    return row, line


def section_step(bench: Bench, rec: dict[str, Any]) -> None:
    model = bench.get_model()
    device, size = bench.device, bench.size
    rec["cfg_decoder"] = "joint (one decoder batch of 2N)" if device.type != "cpu" else "split (two decoder passes of N)"
    rec["spade_cache_gib_per_image"] = {p: sum(d["nbytes"] for d in model.spade_layout(size, size, element_size=e)) / 2**30
                                        for p, e in (("bf16", 2), ("fp32", 4))}
    flops: dict[tuple[str, int], int] = {}
    for precision in ("bf16", "fp32"):
        for batch in bench.batches:
            for kind in ("forward", "guided"):
                bench.check()
                row, line = _measure_step(bench, model, kind, precision, batch, flops)
                bench.record("step", "rows", row, line)
                release(device)  # the SPADE cache of a batch of 32 is ~30 GiB: gone before the next
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
    rec["best_batch"] = best = bench.best_batch()
    if device.type == "cuda" and not torch.backends.cudnn.benchmark:
        # The product leaves cuDNN's autotuner off; how much would turning it on give?
        torch.backends.cudnn.benchmark = True
        try:
            for batch in sorted({1, best}):
                bench.check()
                row, line = _measure_step(bench, model, "guided", "bf16", batch, flops)
                row["kind"] = "guided+cudnn.benchmark"
                bench.record("step", "rows", row, line.replace("guided ", "guided+cudnn.benchmark ", 1))
                release(device)
        finally:
            torch.backends.cudnn.benchmark = False


def _render(runner: Sampler, cond: torch.Tensor, device: torch.device, **kwargs: Any) -> dict[str, float]:
    """Run a render to the end: seconds to the first step's preview (host uint8) and to the images."""
    start = time.perf_counter()
    first = None
    last = None
    steps = 0
    for last in runner.sample(cond, seed=0, **kwargs):
        steps += 1
        if first is None:
            preview(last)  # what a live view shows: copies one image to the host (synchronises)
            first = time.perf_counter() - start
    images = to_uint8(last.x_t)
    seconds = time.perf_counter() - start
    if not np.isfinite(last.x_t.float().cpu().numpy()).all():
        raise RuntimeError("the render produced non-finite values")
    return {"seconds": seconds, "first_preview_s": first, "steps": steps, "images": int(images.shape[0])}


def section_render(bench: Bench, rec: dict[str, Any]) -> None:
    model = bench.get_model()
    device, size = bench.device, bench.size
    best = bench.best_batch()
    rec["best_batch"] = best
    fast = dict(FAST_SETTINGS, guidance=GUIDANCE)
    runs = [("fast default", "auto", 1), ("fast default", "auto", best), ("fast, fp32", "fp32", 1)]
    seen_batches: set[tuple[str, int]] = set()
    for name, precision, batch in runs:
        if (precision, batch) in seen_batches:
            continue
        seen_batches.add((precision, batch))
        bench.check()
        sampler = Sampler(model, precision=precision)
        row: dict[str, Any] = {"name": name, "precision": sampler.precision, "batch": batch, "settings": dict(FAST_SETTINGS)}
        try:
            # Warm-up render on other labels (kernel selection, allocator); the timed one fills its
            # own SPADE cache, as a render of new labels does.
            _render(sampler, conditions(model, batch, size, seed=100 + batch, device=device), device, **fast)
            bench.check()
            row.update(_render(sampler, conditions(model, batch, size, seed=200 + batch, device=device), device, **fast))
            row.update(s_per_image=row["seconds"] / batch, images_per_s=batch / row["seconds"])
            line = (f"   {name:<14} ({sampler.precision}) batch {batch:3d}: {row['seconds']:8.3f} s  "
                    f"{row['images_per_s']:8.2f} img/s  first preview {row['first_preview_s']:.3f} s")
        except (SectionTimeout, KeyboardInterrupt):
            raise
        except Exception as exc:
            row["error"] = error_text(exc)
            line = f"   {name} batch {batch}: {row['error']}"
        bench.record("render", "rows", row, line)
        del sampler
        release(device)

    # DiffMix's default: 100-step DDIM respacing, SDEdit 0.55 (55 steps), CFG as two fp32 forwards.
    bench.check()
    sampler = Sampler(model, cache=False, precision="fp32")
    row = {"name": "DiffMix default", "precision": "fp32", "batch": 1, "settings": dict(DIFFMIX_SETTINGS)}
    calls = {"forwards": 0}
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
    try:
        cond = conditions(model, 1, size, seed=300, device=device)
        init = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
        forward(model, torch.zeros(1, 3, size, size, device=device), torch.full((1,), 500, device=device), cond, "fp32")
        sync(device)
        calls["forwards"] = 0
        row.update(_render(sampler, cond, device, **dict(DIFFMIX_SETTINGS, init_image=init)))
        row.update(s_per_image=row["seconds"], images_per_s=1 / row["seconds"], forwards=calls["forwards"])
        line = f"   DiffMix default (fp32) batch   1: {row['seconds']:8.3f} s  ({row['forwards']} forwards)"
    except (SectionTimeout, KeyboardInterrupt):
        raise
    except Exception as exc:
        row["error"] = error_text(exc)
        line = f"   DiffMix default: {row['error']}"
    finally:
        hook.remove()
    bench.record("render", "rows", row, line)

    rows = rec.get("rows", [])
    ref = next((r for r in rows if r["name"] == "DiffMix default" and "s_per_image" in r), None)
    ratios = {}
    for r in rows:
        if ref and r is not ref and "s_per_image" in r:
            ratios[f"{r['name']} ({r['precision']}) batch {r['batch']}"] = ref["s_per_image"] / r["s_per_image"]
    rec["speedup_vs_diffmix_default"] = ratios
    for key, value in ratios.items():
        print(f"   {key}: {value:.1f}x fewer seconds per image than DiffMix's default", flush=True)


def _interactive_module():
    """benchmarks/bench_interactive.py, whose ``measure(device=, size=)`` gives the CPU figures."""
    spec = importlib.util.spec_from_file_location("bench_interactive", Path(__file__).with_name("bench_interactive.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section_interactive(bench: Bench, rec: dict[str, Any]) -> None:
    device = bench.device
    size = max(32, bench.size) if bench.args.tiny else 256  # the demo model halves 3 times: multiples of 8
    rec["source"] = "benchmarks/bench_interactive.py: measure()"

    def on_row(row: dict[str, Any]) -> None:
        bench.check()
        bench.record("interactive", "rows", row,
                     f"   demo model {size} px, {row['render']:<36}: first preview {row['first_preview_s']:.3f} s, "
                     f"whole {row['seconds']:.3f} s ({row['steps']} steps)")

    # precision auto: the Generate widget's default (bf16 where the device has it).
    result = _interactive_module().measure(device=str(device), size=size, precision="auto", on_row=on_row)
    for key in ("labels", "renderer", "loaded", "image"):  # objects for further measures, not JSON
        result.pop(key)
    result.pop("rows")  # recorded one by one by on_row
    rec.update(result, settings=dict(FAST_SETTINGS))


def _graph_row(bench: Bench, model: SDMUNet, batch: int) -> dict[str, Any]:
    device, size = bench.device, bench.size
    row: dict[str, Any] = {"batch": batch, "precision": "bf16"}
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    cond = conditions(model, batch, size, seed=batch, device=device)
    step = GuidedStep(model, cond, "bf16")
    eager = bench.time_call(lambda: step(x, t))
    reference = step(x, t)
    static_x, static_t = x.clone(), t.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(2):
            step(static_x, static_t, cache_enabled=False)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    start = time.perf_counter()
    with torch.cuda.graph(graph):
        static_out = step(static_x, static_t, cache_enabled=False)
    graph.replay()
    sync(device)
    row["capture_s"] = time.perf_counter() - start
    graphed = bench.time_call(graph.replay)
    row.update(eager_s=eager["seconds"], graph_s=graphed["seconds"], speedup=eager["seconds"] / graphed["seconds"],
               max_abs_diff=float((static_out - reference).abs().max()), images_per_s=batch / graphed["seconds"])
    return row


def section_graphs(bench: Bench, rec: dict[str, Any]) -> None:
    device = bench.device
    if device.type != "cuda":
        rec.update(status_override="skipped", reason="CUDA graphs need a CUDA device")
        print("   skipped: CUDA graphs need a CUDA device", flush=True)
        return
    model = bench.get_model()
    for batch in sorted({1, bench.best_batch()}):
        bench.check()
        try:
            row = _graph_row(bench, model, batch)
            line = (f"   CUDA graph, guided step bf16 batch {batch:3d}: eager {row['eager_s'] * 1e3:.2f} ms, graph "
                    f"{row['graph_s'] * 1e3:.2f} ms: {row['speedup']:.2f}x (max |diff| {row['max_abs_diff']:.2e})")
        except (SectionTimeout, KeyboardInterrupt):
            raise
        except Exception as exc:
            row = {"batch": batch, "precision": "bf16", "error": error_text(exc)}
            line = f"   CUDA graph batch {batch}: {row['error']}"
        bench.record("graphs", "rows", row, line)
        release(device)


def _compile_row(bench: Bench, model: SDMUNet, mode: str, batch: int) -> dict[str, Any]:
    device, size = bench.device, bench.size
    row: dict[str, Any] = {"mode": mode, "batch": batch, "precision": "bf16"}
    torch.compiler.reset()  # one compile per batch, as one render uses one batch size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    cond = conditions(model, batch, size, seed=batch, device=device)
    eager_step = GuidedStep(model, cond, "bf16")
    eager = bench.time_call(lambda: eager_step(x, t))
    reference = eager_step(x, t)
    options = {} if mode == "default" else {"mode": mode}
    # What Sampler(compile=True) does: the encoder and the decoder compiled separately.
    step = GuidedStep(model, cond, "bf16", encode=torch.compile(model.encode, **options),
                      decode=torch.compile(model.decode, **options))

    def call():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return step(x, t)

    start = time.perf_counter()
    first = call().clone()
    sync(device)
    row["compile_s"] = time.perf_counter() - start
    bench.check()
    compiled = bench.time_call(call, warmup=2)
    row.update(eager_s=eager["seconds"], compiled_s=compiled["seconds"], speedup=eager["seconds"] / compiled["seconds"],
               images_per_s=batch / compiled["seconds"], max_abs_diff=float((first - reference).abs().max()))
    return row


def section_compile(bench: Bench, rec: dict[str, Any]) -> None:
    device = bench.device
    model = bench.get_model()
    try:  # the check Sampler(compile=True) makes (on the CPU: a C++ compiler and Python's headers)
        Sampler(model, compile=True)
    except DiffMixError as exc:
        rec.update(status_override="skipped", reason=str(exc))
        print(f"   skipped: {exc}", flush=True)
        return
    # Most telling first: latency at batch 1 (where launch overhead shows), then throughput.
    plan = [("default", 1)]
    if bench.args.full_compile:
        best = bench.best_batch()
        plan += [("reduce-overhead", 1)] if device.type == "cuda" else []
        plan += [("default", best)] if best != 1 else []
        plan += [("reduce-overhead", best)] if device.type == "cuda" and best != 1 else []
    rec["plan"] = [f"{mode} batch {batch}" for mode, batch in plan]
    try:
        for mode, batch in plan:
            bench.check()
            try:
                row = _compile_row(bench, model, mode, batch)
                line = (f"   torch.compile mode={mode} batch {batch:3d}: compile {row['compile_s']:.1f} s, eager "
                        f"{row['eager_s'] * 1e3:.2f} ms, compiled {row['compiled_s'] * 1e3:.2f} ms: "
                        f"{row['speedup']:.2f}x (max |diff| {row['max_abs_diff']:.2e})")
            except (SectionTimeout, KeyboardInterrupt):
                raise
            except Exception as exc:
                if bench.timed_out:  # dynamo wrapped the SIGALRM exception in its own
                    raise SectionTimeout from None
                row = {"mode": mode, "batch": batch, "precision": "bf16", "error": error_text(exc)}
                line = f"   torch.compile mode={mode} batch {batch}: {row['error']}"
            bench.record("compile", "rows", row, line)
            release(device)
    finally:
        torch.compiler.reset()


def section_train(bench: Bench, rec: dict[str, Any]) -> None:
    from napari_diffmix import train as train_module
    from napari_diffmix.runtime import precision_dtype, resolve_precision

    device = bench.device
    preset = "tiny" if bench.args.tiny else "diffmix-consep"
    overrides: dict[str, Any] = {"batch_size": bench.args.train_batch or (2 if bench.args.tiny else None)}
    overrides = {k: v for k, v in overrides.items() if v}
    if bench.args.tiny:
        overrides["crop_size"] = bench.size
    config = train_module.TrainConfig.from_preset(preset, **overrides)
    scheme = load_scheme(PRESET_SCHEMES[config.model])
    dtype = precision_dtype(resolve_precision(config.precision, device, training=True))
    rec.update(preset=preset, batch=config.batch_size, crop_px=config.crop_size,
               precision="fp32" if dtype is None else str(dtype).replace("torch.", ""),
               published_default_checkpointing=config.grad_checkpointing)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rec["memory_before_gib"] = baseline / 2**30
    torch.manual_seed(0)
    with torch.device(device):  # build_model allocates its 652 M parameters on the device directly
        model, model_cfg = train_module.build_model(config, scheme)
    model.to(device).train()
    diffusion = train_module.build_diffusion(config, bool(model_cfg.get("learn_sigma", True)))
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=config.stages[0].lr, weight_decay=config.weight_decay,
                            betas=tuple(config.adam_betas))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n, size = config.batch_size, config.crop_size
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(n, 3, size, size, device=device, generator=g) * 2 - 1
    cond = conditions(model, n, size, seed=7, device=device)
    t = torch.randint(0, config.num_timesteps, (n,), device=device, generator=g)
    noise = torch.randn(x0.shape, device=device, generator=g)
    step_no = [0]

    def train_step() -> float:
        # The step of napari_diffmix.train._run (which has no function of its own for one step):
        # the library's loss, optimiser, scaler, gradient norm and EMA, no data loading.
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = diffusion.training_losses(model, x0, t, cond, noise=noise)
        loss = losses["loss"].float().mean()
        value = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
        scaler.step(opt)
        scaler.update()
        train_module.update_ema(ema_model, model, train_module.ema_rate_at(config.ema_rate, step_no[0], config.ema_warmup))
        step_no[0] += 1
        return value

    try:
        for checkpointing in (True, False):
            bench.check()
            model.set_gradient_checkpointing(checkpointing)
            row: dict[str, Any] = {"gradient_checkpointing": checkpointing, "batch": n}
            opt.zero_grad(set_to_none=True)
            release(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                losses = []
                timing = bench.time_call(lambda: losses.append(train_step()), warmup=2,
                                         reps=3 if bench.quick else 6, max_s=bench.left() / 3)
                row.update(timing, steps_per_s=1 / timing["seconds"], images_per_s=n / timing["seconds"],
                           loss_finite=all(math.isfinite(v) for v in losses))
                if device.type == "cuda":
                    row.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                               peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
                else:
                    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                mem = row.get("peak_memory_gib")
                line = (f"   train batch {n} checkpointing {'on ' if checkpointing else 'off'}: {row['steps_per_s']:.2f} steps/s "
                        f"({timing['seconds']:.3f} s/step)" + (f", peak memory {mem:.1f} GiB" if mem is not None else ""))
            except (SectionTimeout, KeyboardInterrupt):
                raise
            except Exception as exc:
                row["error"] = error_text(exc)
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                line = f"   train batch {n} checkpointing {checkpointing}: {row['error']}"
                opt.zero_grad(set_to_none=True)
            bench.record("train", "rows", row, line)
    finally:
        opt.zero_grad(set_to_none=True)  # the model, EMA and optimiser state go with this frame


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def evaluate_goals(bench: Bench) -> None:
    """The issue's three goals, each {value, target, met}; value None where its section did not measure it."""
    sections = bench.data["sections"]
    goals: dict[str, Any] = {key: {"value": None, "target": target, "met": None} for key, target in GOALS.items()}
    guided = [r for r in sections["step"].get("rows", []) if r.get("kind") == "guided" and r.get("precision") == "bf16"
              and "images_per_s" in r]
    if guided:
        best = max(guided, key=lambda r: r["images_per_s"])
        if best.get("share_of_bf16_peak") is not None:
            goals["guided_share_of_bf16_peak"].update(value=best["share_of_bf16_peak"], batch=best["batch"])
        elif best.get("share_of_gemm_bf16") is not None:  # a device missing from the datasheet table
            goals["guided_share_of_bf16_peak"].update(value=best["share_of_gemm_bf16"], batch=best["batch"],
                                                      basis="measured bf16 GEMM (no datasheet peak for this device)")
    renders = [r for r in sections["render"].get("rows", []) if r.get("name") == "fast default" and "s_per_image" in r]
    one = next((r for r in renders if r["batch"] == 1), None)
    if one:
        goals["patch_seconds_batch1"].update(value=one["seconds"], batch=1)
    if renders:
        best = max(renders, key=lambda r: r["images_per_s"])
        goals["patches_per_s_best"].update(value=best["images_per_s"], batch=best["batch"])
    applies = not bench.args.tiny and bench.device.type == "cuda"
    for key, goal in goals.items():
        if goal["value"] is None:
            continue
        if not applies:
            goal["note"] = "tiny config / CPU: not the published model on a GPU; the goal does not apply"
        elif key == "patch_seconds_batch1":
            goal["met"] = goal["value"] <= goal["target"]
        else:
            goal["met"] = goal["value"] >= goal["target"]
    bench.data["goals"] = goals


def print_summary(bench: Bench) -> None:
    env, sections = bench.data["env"], bench.data["sections"]
    print(f"\n== summary: {env.get('device_name')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
          f"bf16 peak {env.get('peak_bf16_tflops') or 'n/a'} TFLOP/s ({env.get('peak_device') or 'not in the table'})")
    header = f"{'section':<12} {'what':<44} {'batch':>5} {'seconds':>10} {'img/s':>9} {'TFLOP/s':>8} {'% peak':>7}"
    print(header)
    print("-" * len(header))

    def line(section, what, batch="", seconds=None, ips=None, tflops=None, share=None, note=""):
        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else ""
        print(f"{section:<12} {what[:44]:<44} {str(batch):>5} {num(seconds, '10.4f'):>10} {num(ips, '9.2f'):>9} "
              f"{num(tflops, '8.1f'):>8} {(num(100 * share, '6.1f') + '%') if share is not None else '':>7} {note}")

    for name in SECTIONS:
        rec = sections[name]
        if rec["status"] != "ok" or not rec.get("rows"):
            line(name, f"[{rec['status']}] {rec.get('reason') or rec.get('error') or ''}")
        for r in rec.get("rows", []):
            err = r.get("error")
            if name == "gemm":
                line(name, f"{r['n']}^3 matmul {r['dtype']}", "", r.get("seconds_min"), None, r.get("tflops"), r.get("share_of_bf16_peak"))
            elif name == "step":
                line(name, f"{r['kind']} {r['precision']}", r["batch"], r.get("seconds"), r.get("images_per_s"), r.get("tflops"),
                     r.get("share_of_bf16_peak"), err or "")
            elif name == "render":
                line(name, f"{r['name']} ({r['precision']})", r["batch"], r.get("seconds"), r.get("images_per_s"), note=err or "")
            elif name == "interactive":
                line(name, f"{r['render'][:28]}: preview {r['first_preview_s']:.3f} s", 1, r.get("seconds"))
            elif name == "graphs":
                line(name, f"CUDA graph guided bf16 ({r['speedup']:.2f}x)" if "speedup" in r else "CUDA graph guided bf16",
                     r["batch"], r.get("graph_s"), r.get("images_per_s"), note=err or "")
            elif name == "compile":
                what = f"compile {r['mode']} ({r['speedup']:.2f}x, {r['compile_s']:.0f} s)" if "speedup" in r else f"compile {r['mode']}"
                line(name, what, r["batch"], r.get("compiled_s"), r.get("images_per_s"), note=err or "")
            elif name == "train":
                mem = f"peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else ""
                line(name, f"train ckpt {'on' if r['gradient_checkpointing'] else 'off'} {mem}", r["batch"], r.get("seconds"),
                     r.get("images_per_s"), note=err or "")
        if name == "render" and rec.get("speedup_vs_diffmix_default"):
            for key, value in rec["speedup_vs_diffmix_default"].items():
                line(name, f"vs DiffMix default: {key}", "", note=f"{value:.1f}x")
    for key, goal in bench.data["goals"].items():
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[goal["met"]]
        value = "not measured" if goal["value"] is None else format(goal["value"], ".3g")
        print(f"goal {key}: {value} (target {goal['target']}) {verdict}")


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the 32 px tiny config (with --device cpu: the end-to-end test)")
    ap.add_argument("--quick", action="store_true", help="shorter budgets (<= 3 min on an H100)")
    ap.add_argument("--json", metavar="FILE", help="write results here (rewritten after every measurement)")
    ap.add_argument("--only", default="", help=f"comma-separated sections to run: {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all sections together (default 450, --quick 160)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's budget")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: the config's, 256; --tiny 32)")
    ap.add_argument("--batches", default=None, help="batches of the step section (default 1,8,32; --tiny 1,2,4)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch (default: the preset's, 16; --tiny 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 5, --quick 3)")
    ap.add_argument("--full-compile", action="store_true",
                    help="with --quick: also compile mode=reduce-overhead and the best batch, as the full run does "
                         "(--quick alone: mode default at batch 1)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark (product default: off)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args(argv)
    for opt in ("only", "skip"):
        names = [s.strip() for s in getattr(args, opt).split(",") if s.strip()]
        unknown = [s for s in names if s not in SECTIONS]
        if unknown:
            ap.error(f"--{opt}: unknown section(s) {unknown}; sections are {', '.join(SECTIONS)}")
        setattr(args, opt, tuple(names))
    args.preset = "tiny" if args.tiny else "diffmix-consep"
    args.config = UNetConfig.preset(args.preset)
    args.size = args.size or args.config.image_size
    if args.size % args.config.size_multiple:
        ap.error(f"--size must be a multiple of {args.config.size_multiple} for {args.preset}")
    default_batches = "1,2,4" if args.tiny else "1,8,32"
    args.batches = tuple(int(b) for b in (args.batches or default_batches).split(","))
    if args.budget is None:
        args.budget = float(TOTAL_BUDGET[1 if args.quick else 0])
    args.full_compile = args.full_compile or not args.quick
    if args.reps is None:
        args.reps = 2 if args.tiny else 3 if args.quick else 5
    return args


def refuse(message: str) -> int:
    print(f"bench_gpu.py: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return refuse(
            f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU. "
            "This benchmark measures the published model on an accelerator; to check it end to end on the CPU "
            "run it with --device cpu --tiny (its timings mean nothing)."
        )
    if args.device == "cpu" and not args.tiny:
        return refuse("--device cpu runs only the tiny config (add --tiny): the published 652 M model takes minutes "
                      "per step on a CPU; see benchmarks/bench_sampler.py for CPU figures.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    bench = Bench(args, device)
    print(f"bench_gpu: {args.preset} ({args.size} px), {'quick' if args.quick else 'full'} run, budget {args.budget:.0f} s"
          + (f", JSON -> {args.json}" if args.json else ""), flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # a timeout's SIGTERM still marks the JSON as interrupted
    sections = {
        "gemm": section_gemm, "step": section_step, "render": section_render, "interactive": section_interactive,
        "graphs": section_graphs, "train": section_train, "compile": section_compile,
    }
    try:
        collect_env(bench)
        for name in SECTIONS:
            bench.run_section(name, lambda rec, fn=sections[name]: fn(bench, rec))
        evaluate_goals(bench)
        bench.data["status"] = "done"
    except KeyboardInterrupt as exc:
        bench.data["status"] = f"interrupted ({exc or 'SIGINT'})"
        for rec in bench.data["sections"].values():
            if rec["status"] == "running":
                rec["status"] = "interrupted"
            elif rec["status"] == "pending":
                rec.update(status="not run", reason="the run was interrupted before it")
        evaluate_goals(bench)
    bench.save()
    print_summary(bench)
    return 0 if bench.data["status"] == "done" else 130


if __name__ == "__main__":
    sys.exit(main())
