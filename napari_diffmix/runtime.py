"""Where and how the computation runs: the torch device, the training precisions, the process
group of a ``torchrun`` job and its collectives, and the RNG state a resumed run restores.

Both trainers, synthesis and the CLIs share these, as guided-diffusion's ``dist_util`` and
diffusers' ``torch_utils`` keep them apart from any model or loop. The widgets and the CLI
parsers read its tables (``PRECISIONS``), so torch is imported by the functions that use it:
opening a dock or building the parser does not pay torch's import.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np

from .errors import DiffMixError, TrainingError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for a user's choice (CLI option or widget); 'auto' prefers CUDA, then MPS."""
    import torch

    spec = str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TrainingError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {spec!r} was asked for but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); use 'auto' or 'cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"device {spec!r} was asked for but the MPS backend is not available; use 'auto' or 'cpu'")
    return device


# The precisions a user picks from (cli/_common spells them out: the parsers import no numpy).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_name() -> str:
    """The CPU's model name and core count, for the figures that state where they were measured."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass  # not Linux: the platform module's (vaguer) name
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next tensors instead of returning it to the system.

    A 256 px CPU render allocates and frees feature maps of 17-34 MB at every layer. glibc
    serves those with fresh ``mmap`` pages (the largest are always over its mmap threshold) and
    unmaps them on free, so every elementwise operator first page-faults its output in;
    taking them from a heap that is never trimmed made 256 px renders of the demo model 12 %
    faster (four interleaved pairs, fp32, 2 threads). The price: the process keeps its peak heap
    until it ends. Process-wide and once; ``DIFFMIX_KEEP_FREED_MEMORY=0`` turns it off. True when
    in effect (False off Linux/glibc)."""
    return os.environ.get("DIFFMIX_KEEP_FREED_MEMORY", "1") != "0" and _mallopt_keep()


def _mallopt_keep() -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(param, value) == 1 for param, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20)))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware (GPUs from Ampere on, CPUs with
    avx512_bf16 or AMX). Elsewhere bf16 autocast still works but is emulated, and slower."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        # is_bf16_supported() also says yes where bf16 is only emulated (T4, V100), which is
        # slower than fp16; ROCm reports it right.
        if torch.version.hip:
            return torch.cuda.is_bf16_supported()
        return torch.cuda.get_device_capability(device)[0] >= 8  # this device, not the current one
    if device.type == "cpu":
        # torch.cpu's probes are private; a torch without them counts as "no" (fp32 is never wrong).
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe is not None and probe() for probe in probes)
    return False


def resolve_precision(precision: str, device: torch.device | str, *, training: bool = False) -> str:
    """The precision a run uses: ``precision`` itself, or for "auto" bf16 where the hardware has
    it, fp16 on other CUDA GPUs and fp32 elsewhere.

    Sampling in reduced precision is what makes the fast default fast on a bf16 CPU, and its
    accuracy is tested (renders of the demo model within about half a grey level of fp32).
    Training (``training=True``) takes reduced precision only on GPUs: bf16 training on CPUs is
    not validated, so "auto" trains in fp32 there.
    """
    import torch

    if precision not in PRECISIONS:
        raise DiffMixError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if native_bf16(device) else "fp16"
    return "bf16" if not training and native_bf16(device) else "fp32"


def preset_precision(precision: str, device_spec: str | torch.device) -> str:
    """A preset's precision on the device a run will use: the demo presets' bf16 was measured
    where the CPU computes it (1.4-2.4x faster); where bf16 is emulated it is slower than fp32,
    so there the preset takes "auto"'s choice instead."""
    if precision != "bf16":
        return precision
    return precision if native_bf16(resolve_device(device_spec)) else "auto"


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision, None for plain fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1 in the environment).

    NCCL on GPUs, gloo on CPU. Each rank uses GPU ``LOCAL_RANK``.
    """
    import torch

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "mps":
        raise TrainingError("multi-process training is not supported on MPS; use one process or CUDA/CPU")
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def all_reduce_max(flags: list[float], info: DistInfo, device: torch.device) -> list[float]:
    import torch

    if not info.enabled:
        return flags
    import torch.distributed as dist

    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def pooled_means(acc: Mapping[str, list[float]], keys: Sequence[str], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Means of the accumulated values over all ranks (sum and count reduced, so ranks that
    saw no value for a key, e.g. no timestep in a quartile, do not skew the mean)."""
    import torch

    sums = [float(np.sum(acc.get(k, []))) for k in keys] + [float(len(acc.get(k, []))) for k in keys]
    if info.enabled:
        import torch.distributed as dist

        t = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sums = t.tolist()
    n = len(keys)
    return {k: sums[i] / sums[n + i] for i, k in enumerate(keys) if sums[n + i] > 0}


def check_ranks_in_sync(model: torch.nn.Module, info: DistInfo, device: torch.device, step: int) -> None:
    import torch

    # DDP keeps replicas identical only if every rank does the same updates; a cheap exact
    # checksum at each checkpoint catches silent divergence before it is saved as "the" model.
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(info.world_size)]
    dist.all_gather(gathered, sums)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise TrainingError(f"the {info.world_size} training processes hold different weights at step {step}; stopping")


# RNG state: everything random in a training step draws from state saved in the checkpoint


def seed_int(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def capture_rng(stream: Any, noise_gen: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a resumed run needs; ``noise_gen``: the diffusion trainer's noise generator."""
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "stream": json.dumps(stream.state()),
    }
    if noise_gen is not None:
        state["noise"], state["noise_device"] = noise_gen.get_state(), str(noise_gen.device)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any], stream: Any, noise_gen: torch.Generator | None = None) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    stream.set_state(json.loads(state["stream"]))
    if noise_gen is not None:
        noise_gen.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
