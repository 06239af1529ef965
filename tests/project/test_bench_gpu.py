"""benchmarks/bench_gpu.py runs end to end on the CPU (tiny config) and refuses without CUDA.

No accelerator has been lent to this project yet, so the GPU benchmark must be known to work
before one is: these tests run it whole on the tiny config and check what it wrote (every key,
sane values), never how fast anything was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
SECTIONS = ("gemm", "step", "render", "interactive", "graphs", "train", "compile")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    from _subprocess import run_group

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_group([sys.executable, str(SCRIPT), *args], timeout, capture_output=True, env=full_env, cwd=ROOT)


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    # 16 px, batches 1 and 2, one timed repetition: the whole script in well under a minute of
    # CPU. compile is skipped (inductor's C++ build takes minutes on 2 cores), which also
    # exercises --skip.
    done = _run("--device", "cpu", "--tiny", "--quick", "--threads", "1", "--reps", "1", "--size", "16",
                "--batches", "1,2", "--skip", "compile", "--json", str(out))
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    return json.loads(out.read_text()), done.stdout.decode()


def test_tiny_cpu_run_writes_every_key(tiny_run):
    data, stdout = tiny_run
    assert data["schema"] == "napari-diffmix/bench_gpu/1"
    assert data["status"] == "done"
    env = data["env"]
    for key in ("device", "device_name", "torch", "cuda", "python", "peak_bf16_tflops", "peak_source", "model"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["model"]["preset"] == "tiny" and env["model"]["parameters"] > 0
    assert set(data["sections"]) == set(SECTIONS)
    status = {name: rec["status"] for name, rec in data["sections"].items()}
    assert status == {"gemm": "ok", "step": "ok", "render": "ok", "interactive": "ok", "graphs": "skipped",
                      "train": "ok", "compile": "skipped"}, status
    assert data["sections"]["compile"]["reason"] == "--skip"
    assert "CUDA" in data["sections"]["graphs"]["reason"]
    for rec in data["sections"].values():
        assert "error" not in rec
    assert set(data["goals"]) == {"guided_share_of_bf16_peak", "patch_seconds_batch1", "patches_per_s_best"}
    # The printed table names the device and versions, and every section.
    assert "torch " + torch.__version__ in stdout and "== summary" in stdout
    for name in SECTIONS:
        assert name in stdout


def test_tiny_cpu_run_values_are_sane(tiny_run):
    data, _ = tiny_run
    sections = data["sections"]

    gemm = sections["gemm"]["rows"]
    assert {r["dtype"] for r in gemm} == {"bf16", "fp32"}
    assert all(r["flops"] == 2 * r["n"] ** 3 and r["tflops"] > 0 for r in gemm)

    rows = sections["step"]["rows"]
    assert {(r["kind"], r["precision"], r["batch"]) for r in rows} == {
        (k, p, b) for k in ("forward", "guided") for p in ("bf16", "fp32") for b in (1, 2)
    }
    for r in rows:
        assert "error" not in r, r
        assert r["flops"] > 0 and r["seconds"] > 0 and r["images_per_s"] > 0 and r["tflops"] > 0
        assert r["flops_per_image"] == pytest.approx(r["flops"] / r["batch"])
        assert r["share_of_bf16_peak"] is None  # no datasheet peak for a CPU
    by_key = {(r["kind"], r["precision"], r["batch"]): r for r in rows}
    for b in (1, 2):
        fwd, guided = by_key[("forward", "bf16", b)]["flops"], by_key[("guided", "bf16", b)]["flops"]
        # FLOPs do not depend on the precision; a cached guided step skips SPADE but runs two decoders.
        assert by_key[("forward", "fp32", b)]["flops"] == fwd
        assert fwd < guided < 2 * fwd
        assert by_key[("guided", "bf16", b)]["cache_fill_s"] >= 0
    assert by_key[("forward", "bf16", 2)]["flops"] == 2 * by_key[("forward", "bf16", 1)]["flops"]
    assert sections["step"]["best_batch"] in (1, 2)

    render = {(r["name"], r["batch"]): r for r in sections["render"]["rows"]}
    best = sections["render"]["best_batch"]
    for key in (("fast default", 1), ("fast default", best), ("fast, fp32", 1), ("DiffMix default", 1)):
        r = render[key]
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["seconds"] >= r["first_preview_s"] > 0
        assert r["images"] == key[1]
    assert render[("fast default", 1)]["steps"] == 15
    assert render[("DiffMix default", 1)]["steps"] == 55 and render[("DiffMix default", 1)]["forwards"] == 110
    assert all(v > 0 for v in sections["render"]["speedup_vs_diffmix_default"].values())

    inter = sections["interactive"]
    # Measured by bench_interactive.py's own function (one path for the CPU and device figures).
    assert inter["source"] == "benchmarks/bench_interactive.py: measure()"
    assert inter["model"].endswith(".safetensors") and inter["parameters"] > 0 and inter["device"] == "cpu"
    assert [r["render"] for r in inter["rows"]] == [
        "warm-up (other labels, first render)", "render (new labels)", "SDEdit 0.55 of that render",
        "local edit (one nucleus moved 6 px)"]
    assert all(r["seconds"] >= r["first_preview_s"] > 0 for r in inter["rows"])
    assert [r["steps"] for r in inter["rows"]] == [15, 15, 8, 15]  # SDEdit: floor(0.55 * 15) steps
    # The figure names of benchmarks/bench_interactive.py (its CPU figures), here per device.
    assert set(inter["figures"]) == {"first_preview_s", "render_256_s", "sdedit_256_s", "local_edit_s"}
    assert all(v > 0 for v in inter["figures"].values()) and inter["local_edit_pixels"] > 0

    train = sections["train"]["rows"]
    assert [r["gradient_checkpointing"] for r in train] == [True, False]
    assert all(r["steps_per_s"] > 0 and r["loss_finite"] and r["batch"] == 2 for r in train)

    for goal in data["goals"].values():
        assert goal["met"] is None  # goals are for the published model on a GPU only
    assert data["goals"]["patches_per_s_best"]["value"] > 0


def test_refuses_without_cuda():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a machine that has one too.
    done = _run("--json", "unused.json", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "no CUDA device" in err and "--device cpu --tiny" in err
    assert not (ROOT / "unused.json").exists()


def test_refuses_the_published_model_on_the_cpu():
    done = _run("--device", "cpu", timeout=120)
    assert done.returncode == 2
    assert "--tiny" in done.stderr.decode()


def test_only_and_skip_name_sections():
    done = _run("--device", "cpu", "--tiny", "--only", "step,nonsense", timeout=120)
    assert done.returncode == 2 and "unknown section" in done.stderr.decode()


def test_guided_step_is_the_samplers_guided_output():
    # The benchmark times the guided step through the model's public API; it must compute what
    # the Sampler computes (same cache, same CFG combination).
    from napari_diffmix.model.samplers import Sampler
    from napari_diffmix.model.unet import UNetConfig

    bench = _load_module()
    model = bench.build_model(UNetConfig.preset("tiny"), torch.device("cpu"))
    cond = bench.conditions(model, 2, 16, seed=0, device=torch.device("cpu"))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500, dtype=torch.long)
    mine = bench.GuidedStep(model, cond, "fp32")(x, t)
    theirs = Sampler(model, precision="fp32").guided_output(x, 500, cond, guidance=bench.GUIDANCE)
    assert mine.shape == theirs.shape == (2, 6, 16, 16)
    assert theirs.abs().max() > 0  # the zero-initialised layers were given weights
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_peak_table_reads_device_names():
    bench = _load_module()
    assert bench.peak_table("NVIDIA H100 80GB HBM3")[1] == pytest.approx(989.4)
    assert bench.peak_table("NVIDIA H100 PCIe")[1] == 756.0
    assert bench.peak_table("NVIDIA H100 NVL")[1] == 835.0
    assert bench.peak_table("NVIDIA H200")[1] == pytest.approx(989.4)
    assert bench.peak_table("NVIDIA A100-SXM4-80GB")[1] == 312.0
    assert bench.peak_table("Some Future GPU") == (None, None, None)
