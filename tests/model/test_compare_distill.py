"""benchmarks/compare_distill.py on the tiny model: what each arm's functions compute, not how well.

Two updates per arm. The consistency arm: its target network is the EMA of the student (not the
student, not the teacher), the clean end of the grid is the boundary condition, gradients reach
the student only, the weights move, the loss is finite; its sampler starts from the product
samplers' noise for a seed and returns images. The progressive arm runs the product's distill
and both are measured the way the benchmark reports them.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_diffmix.classes import DEMO
from napari_diffmix.demo_data import demo_split
from napari_diffmix.model.checkpoint import load_model, save_model
from napari_diffmix.model.condition import condition_batch
from napari_diffmix.model.diffusion import DiffusionConfig, GaussianDiffusion
from napari_diffmix.model.samplers import Sampler, from_uint8, to_uint8
from napari_diffmix.trainloop import ema_rate_at, logged_hours

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_distill.py"
GRID = 4  # the tiny preset's 2-step student samples at 2 of these 4 timesteps


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiles():
    split = demo_split()
    return split.train.crop(0, 0, 96, 96), split.held_out.crop(0, 0, 64, 64)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model, tmp_path_factory):
    """The tiny model with its zero-initialised layers made random: as initialised, its epsilon is
    0 everywhere, every x0 clips to +-1, every sampler paints the same image and no gradient
    passes the clip, so neither arm would have anything to learn or to measure."""
    model, info = load_model(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher.safetensors"
    save_model(model, path, scheme=DEMO, default_guidance=2.0)
    return path


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    model, info = load_model(tiny_teacher)
    return model.requires_grad_(False), info, GaussianDiffusion(DiffusionConfig.from_dict(dict(info.diffusion)))


def tiny_config(bench, tmp_path, teacher_file, arm, **kw):
    return bench.arm_config("tiny", teacher_file, tmp_path / arm, 2, precision="fp32", threads=1, num_val_samples=2, **kw)


def test_the_grid_holds_the_sampling_timesteps_and_refuses_one_that_does_not(bench, teacher):
    a = teacher[2].alphas_cumprod
    grid = bench.consistency_grid(a, 12)
    assert len(grid) == 12 and grid[0] == 999 and all(x > y for x, y in zip(grid, grid[1:]))
    assert {999, 722, 302, 30} <= set(grid)
    with pytest.raises(ValueError, match="not all on the 10-point grid"):
        bench.consistency_grid(a, 10)


def test_targets_come_from_the_ema_target_network_and_the_clean_end_is_the_teachers_x0(bench, teacher, tiles):
    model, info, diffusion = teacher
    runner = Sampler(model, info.diffusion, precision="fp32")
    student = copy.deepcopy(model).requires_grad_(True).train()
    target = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():  # a target that differs from the student, as an EMA does after updates
        for p in target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tile = tiles[0].crop(0, 0, 32, 32)
    cond = condition_batch([tile.inst_map] * 2, [tile.type_map] * 2, DEMO.num_classes)
    x0 = from_uint8(np.stack([tile.image] * 2))
    grid = bench.consistency_grid(diffusion.alphas_cumprod, GRID, 2)
    gen = torch.Generator().manual_seed(0)
    x0b, condb, t_hi, t_lo, noise = bench.consistency_batch(x0, cond, grid, GRID, gen)
    # Every crop gets every interval once: 2 crops x 4 intervals, consecutive grid points.
    assert x0b.shape[0] == 8 and sorted(t_hi.tolist()) == sorted(grid * 2)
    ext = [*grid, -1]
    assert all(ext[ext.index(h) + 1] == lo for h, lo in zip(t_hi.tolist(), t_lo.tolist()))

    out = bench.consistency_losses(student, target, runner, diffusion, x0b, condb, t_hi, t_lo, noise, 2.0)
    x_hi = diffusion.q_sample(x0b, t_hi, noise)
    x_lo, teacher_x0 = bench.teacher_ode_step(runner, diffusion, x_hi, t_hi, t_lo, condb, 2.0)
    assert torch.allclose(out["x_lo"], x_lo, atol=1e-5)
    clean, inner = t_lo < 0, t_lo >= 0
    assert int(clean.sum()) == 2 and torch.allclose(out["target"][clean], teacher_x0[clean], atol=1e-5)
    with torch.no_grad():
        by_target = bench.consistency_f(target, diffusion, x_lo[inner], t_lo[inner], condb[inner])
        by_student = bench.consistency_f(student, diffusion, x_lo[inner], t_lo[inner], condb[inner])
    assert torch.allclose(out["target"][inner], by_target, atol=1e-5)
    assert not torch.allclose(out["target"][inner], by_student, atol=1e-3)
    # f is the clipped x0 of the student at the noisier point; the loss is its squared distance.
    assert out["f_student"].abs().max() <= 1.0
    assert torch.allclose(out["loss"], ((out["f_student"] - out["target"]) ** 2).mean(dim=(1, 2, 3)))
    out["loss"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in target.parameters()) and all(p.grad is None for p in model.parameters())


def test_two_consistency_updates_move_the_student_and_the_target_is_its_ema(bench, tmp_path, tiny_teacher, tiles, teacher):
    config = tiny_config(bench, tmp_path, tiny_teacher, "consistency", log_every=1)
    settings = bench.ConsistencySettings(grid_points=GRID, pairs_per_crop=2, target_ema=0.5)
    snaps = []
    run = bench.run_consistency(config, tiles[0], DEMO, settings, snapshot=snaps)
    assert run.arm == "consistency" and run.updates == 2 and run.wall_s > 0 and len(snaps) == 2
    assert [row["step"] for row in run.history] == [1, 2] and all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in run.history)
    start = {k: v.float() for k, v in teacher[0].state_dict().items()}
    (_, s1, g1, e1), (_, s2, g2, e2) = snaps
    moved = [k for k in start if not torch.equal(s2[k], s1[k])]
    assert moved and any(not torch.equal(s1[k], start[k]) for k in start)  # both updates changed weights
    r0, r1 = ema_rate_at(config.ema_rate, 0, True), ema_rate_at(config.ema_rate, 1, True)
    saved = torch.load(tmp_path / "consistency" / "ema.pt")
    for k in start:
        # target <- 0.5 target + 0.5 student after each update, from the teacher: an EMA, not a copy.
        assert torch.allclose(g1[k], 0.5 * start[k] + 0.5 * s1[k], atol=1e-6)
        assert torch.allclose(g2[k], 0.5 * g1[k] + 0.5 * s2[k], atol=1e-6)
        # The measured model is the preset's EMA (warm-up rates), another average than the target.
        e1_expected = r0 * start[k] + (1 - r0) * s1[k]
        assert torch.allclose(e1[k], e1_expected, atol=1e-6)
        assert torch.allclose(e2[k], r1 * e1_expected + (1 - r1) * s2[k], atol=1e-6)
        assert torch.equal(run.model.state_dict()[k], e2[k]) and torch.equal(saved[k], e2[k])
    assert any(not torch.allclose(g2[k], s2[k]) for k in moved)
    with open(tmp_path / "consistency" / "log.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2]


def test_a_long_run_keeps_its_shorter_budgets_as_runs_that_reuse_measures(bench, tmp_path, tiny_teacher, tiles):
    config = tiny_config(bench, tmp_path, tiny_teacher, "consistency-2")
    settings = bench.ConsistencySettings(grid_points=GRID, pairs_per_crop=2)
    snaps = []
    run = bench.run_consistency(config, tiles[0], DEMO, settings, snapshot=snaps, keep_at=(1, 2))
    kept = bench._reused("consistency", tmp_path / "consistency-1", 1, tiny_teacher)
    assert kept is not None and kept.updates == 1 and 0 < kept.wall_s < run.wall_s and kept.cpu_s > 0
    # The EMA student after update 1, not the final one; the run's own length is its own folder.
    for k, v in kept.model.state_dict().items():
        assert torch.equal(v, snaps[0][3][k]) and torch.equal(run.model.state_dict()[k], snaps[1][3][k])
    assert bench._reused("consistency", tmp_path / "consistency-2", 2, tiny_teacher).updates == 2
    assert bench._reused("consistency", tmp_path / "consistency-1", 2, tiny_teacher) is None  # another budget
    with pytest.raises(SystemExit):
        bench.main(["--keep-at", "0,3", "--updates", "1"])


def test_the_consistency_sampler_starts_from_the_product_samplers_noise(bench, teacher, tiles):
    model, info, diffusion = teacher
    tile = tiles[1].crop(0, 0, 32, 32)
    cond = condition_batch([tile.inst_map] * 2, [tile.type_map] * 2, DEMO.num_classes)
    # One step is one clipped x0 from the seed's noise: exactly ddim-logsnr's single step.
    one = bench.consistency_sample(model, diffusion, cond, steps=1, seed=5)
    product = Sampler(model, info.diffusion, precision="fp32").generate(cond, sampler="ddim-logsnr", steps=1, guidance=1.0, seed=5)
    assert torch.allclose(one, product.x_t, atol=1e-4)
    images = to_uint8(bench.consistency_sample(model, diffusion, cond, steps=2, seed=5))
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    # Item i is seed + i, alone or in a batch; fresh noise makes the 2-step image another one.
    alone = to_uint8(bench.consistency_sample(model, diffusion, cond[1:], steps=2, seed=6))
    assert np.array_equal(images[1], alone[0])
    assert not np.array_equal(images, to_uint8(bench.consistency_sample(model, diffusion, cond, steps=2, seed=7)))
    assert not np.array_equal(images, to_uint8(one))
    # The guided wrapper is the product's classifier-free guidance.
    guided = bench.consistency_sample(bench.GuidedNet(model, 2.0), diffusion, cond, steps=1, seed=5)
    product = Sampler(model, info.diffusion, precision="fp32").generate(cond, sampler="ddim-logsnr", steps=1, guidance=2.0, seed=5)
    assert torch.allclose(guided, product.x_t, atol=1e-4) and not torch.allclose(guided, one, atol=1e-3)


def test_both_arms_train_two_updates_and_are_measured_against_the_teacher(bench, tmp_path, tiny_teacher, tiles):
    progressive = bench.run_progressive(tiny_config(bench, tmp_path, tiny_teacher, "progressive"), tiles[0], DEMO, tiles[1])
    assert progressive.arm == "progressive" and progressive.updates == 2 and progressive.wall_s > 0
    assert (tmp_path / "progressive" / "model.safetensors").exists()
    settings = bench.ConsistencySettings(grid_points=GRID, pairs_per_crop=2)
    consistency = bench.run_consistency(tiny_config(bench, tmp_path, tiny_teacher, "consistency"), tiles[0], DEMO, settings)
    figures = bench.measure(tiny_teacher, tiles[1], DEMO, [progressive, consistency], size=32, cache=tmp_path / "cache")
    rows = figures["rows"]
    assert figures["windows"] == 4 and not figures["reference_cached"] and figures["images"]["consistency_2"].shape == (4, 32, 32, 3)
    assert list(rows) == ["teacher_15", "teacher_ddim_4_g1", "teacher_consistency_4_g1", "teacher_ddim_4_cfg", "teacher_consistency_4_cfg",
                          "progressive_2", "consistency_2"]
    assert rows["teacher_15"]["mad_vs_teacher_15"] == 0.0
    for name, row in rows.items():
        assert isinstance(row["passed"], bool) and 0.0 <= row["off_stain"] <= 1.0
        assert all(np.isfinite(row[k]) for k in ("h_fraction", "dab_ratio", "hf_ratio", "mad_vs_teacher_15"))
        if name != "teacher_15":
            assert row["mad_vs_teacher_15"] > 0
            assert row["guidance"] == (2.0 if name.endswith("cfg") else 1.0) and row["passes"] == (8 if name.endswith("cfg") else row["steps"])
    # Each student with its own sampler and step count (the tiny preset's 2).
    assert rows["progressive_2"]["sampler"] == "ddim-logsnr" and rows["progressive_2"]["steps"] == 2
    assert rows["consistency_2"]["sampler"] == "consistency multistep" and rows["consistency_2"]["steps"] == 2
    assert rows["consistency_2"]["wall_s"] == consistency.wall_s
    # A finished student (the bundled one is made in stages) is the progressive arm as it stands.
    finished = bench.finished_student(tmp_path / "progressive" / "model.safetensors")
    assert finished.arm == "progressive" and finished.updates == 2 and finished.reused
    assert finished.wall_s == pytest.approx(logged_hours(tmp_path / "progressive" / "log.csv") * 3600) and finished.wall_s > 0
    assert all(torch.equal(v, progressive.model.state_dict()[k]) for k, v in finished.model.state_dict().items())
    with pytest.raises(SystemExit, match="not a progressively distilled student"):
        bench.finished_student(tiny_teacher)
    text = bench.table(figures)
    assert text.count("\n") == len(rows) + 1 and "consistency_2" in text
    # A consistency student sampled with fewer steps too: its own row, its own images.
    fewer = bench.measure(tiny_teacher, tiles[1], DEMO, [consistency], size=32, cache=tmp_path / "cache", fewer_steps=(1,))
    assert list(fewer["rows"])[-2:] == ["consistency_2", "consistency_2_1step"] and fewer["rows"]["consistency_2_1step"]["steps"] == 1
    assert not np.array_equal(fewer["images"]["consistency_2_1step"], fewer["images"]["consistency_2"])
    # The teacher's rows come back from the cache as rendered; the students' are rendered again.
    again = bench.measure(tiny_teacher, tiles[1], DEMO, [consistency], size=32, cache=tmp_path / "cache")
    assert again["reference_cached"] == list(rows)[:5] and list(again["rows"]) == [*list(rows)[:5], "consistency_2"]
    for name in again["rows"]:
        same = {k: v for k, v in rows[name].items() if k != "render_s"}
        assert {k: again["rows"][name][k] for k in same} == same and np.array_equal(again["images"][name], figures["images"][name])
