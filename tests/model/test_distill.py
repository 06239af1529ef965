"""diffmix distill: a tiny teacher distilled in seconds; resume, metadata, refusals, the student's sampler."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_diffmix.classes import DEMO
from napari_diffmix.demo_data import demo_split
from napari_diffmix.distill import (
    DistillConfig,
    chain_losses,
    distill,
    distill_losses,
    student_timesteps,
    teacher_states,
)
from napari_diffmix.errors import CheckpointError, RenderError, TrainingError
from napari_diffmix.model.checkpoint import load_model, read_info, save_model
from napari_diffmix.model.condition import condition_batch
from napari_diffmix.model.diffusion import GaussianDiffusion
from napari_diffmix.model.samplers import Sampler, log_snr_timesteps
from napari_diffmix.train import weights_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiles():
    split = demo_split()
    return split.train.crop(0, 0, 96, 96), split.held_out.crop(0, 0, 64, 64)


def config(tmp_path: Path, teacher: Path, name: str = "run", **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), out_dir=str(tmp_path / name), num_threads=1, num_val_samples=2)
    base.update(kw)
    return DistillConfig.from_preset("tiny", **base)


def test_student_timesteps_nest_in_the_teachers():
    a = GaussianDiffusion().alphas_cumprod
    assert student_timesteps(a, 12, 3) == [999, 722, 302, 30] == log_snr_timesteps(a, 999, 4)
    assert student_timesteps(a, 16, 4) == log_snr_timesteps(a, 999, 4)
    assert student_timesteps(a, 8, 2) == log_snr_timesteps(a, 999, 4)


def test_config_refuses_teacher_steps_that_do_not_nest(tmp_path, tiny_model):
    with pytest.raises(TrainingError, match="multiple of the student's"):
        config(tmp_path, tiny_model, teacher_steps=5, steps_to=2).validate()
    with pytest.raises(TrainingError, match="--teacher"):
        DistillConfig().validate()


def test_ddim_logsnr_sampler_takes_ddim_steps_on_log_snr_timesteps(tiny_model):
    model, info = load_model(tiny_model)
    runner = Sampler(model, info.diffusion, precision="fp32")
    cond = condition_batch([np.zeros((32, 32), np.int32)], [np.zeros((32, 32), np.uint8)], DEMO.num_classes)
    records = list(runner.sample(cond, sampler="ddim-logsnr", steps=3, guidance=1.0, seed=5))
    diffusion = runner.diffusion
    assert [r.t for r in records] == log_snr_timesteps(diffusion.alphas_cumprod, 999, 3)
    # The last step lands on the clean-image prediction itself (alpha_bar 1).
    assert torch.equal(records[-1].x_t, records[-1].pred_x0)
    # Any step: x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps, eps consistent with x0 and x_t.
    x_t, rec = records[0].x_t, records[1]
    t, t_next = rec.t, records[2].t
    eps = diffusion.predict_eps_from_x0(x_t, torch.tensor([t]), rec.pred_x0)
    a = diffusion.alphas_cumprod[t_next]
    assert torch.allclose(rec.x_t, np.sqrt(a) * rec.pred_x0 + np.sqrt(1 - a) * eps, atol=1e-5)


def test_teacher_states_are_its_run_at_the_student_timesteps(tiny_model):
    model, info = load_model(tiny_model)
    runner = Sampler(model, info.diffusion, precision="fp32")
    cond = condition_batch([np.zeros((32, 32), np.int32)] * 2, [np.zeros((32, 32), np.uint8)] * 2, DEMO.num_classes)
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    states = teacher_states(runner, cond, noise, 4, 2, 2.0)
    assert len(states) == 3 and states[0] is noise
    final = runner.generate(cond, sampler="dpm++2m", steps=4, guidance=2.0, noise=noise).x_t
    assert torch.equal(states[-1], final)


def test_the_initial_student_is_scored_against_the_teacher_and_learns(tiny_model, tiles):
    """The loss is the student's landing error; a few steps on one batch lower it (it can fail)."""
    model, info = load_model(tiny_model)
    runner = Sampler(model, info.diffusion, precision="fp32")
    diffusion = runner.diffusion
    tile = tiles[0]
    cond = condition_batch([tile.inst_map[:32, :32]], [tile.type_map[:32, :32]], DEMO.num_classes)
    noise = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    timesteps = student_timesteps(diffusion.alphas_cumprod, 4, 2)
    states = teacher_states(runner, cond, noise, 4, 2, 2.0)
    import copy

    student = copy.deepcopy(model).train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    first = None
    for _ in range(15):
        losses, ks = distill_losses(student, diffusion, states, cond, timesteps)
        assert losses.shape == (2,) and ks.tolist() == [0, 1]
        first = float(losses.mean().detach()) if first is None else first
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    with torch.no_grad():
        assert float(distill_losses(student, diffusion, states, cond, timesteps)[0].mean()) < 0.5 * first


def test_the_chain_loss_scores_exactly_what_the_student_samples(tiny_model, tiles):
    model, info = load_model(tiny_model)
    runner = Sampler(model, info.diffusion, precision="fp32")
    diffusion = runner.diffusion
    tile = tiles[0]
    cond = condition_batch([tile.inst_map[:32, :32]] * 2, [tile.type_map[:32, :32]] * 2, DEMO.num_classes)
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    timesteps = student_timesteps(diffusion.alphas_cumprod, 4, 2)
    final = runner.generate(cond, sampler="ddim-logsnr", steps=2, guidance=1.0, noise=noise).x_t
    with torch.no_grad():
        assert torch.allclose(chain_losses(model, diffusion, noise, final, cond, timesteps), torch.zeros(2), atol=1e-9)
        target = final + 0.1
        floor = 1 - float(diffusion.alphas_cumprod[timesteps[-1]])
        assert torch.allclose(chain_losses(model, diffusion, noise, target, cond, timesteps), torch.full((2,), 0.01 / floor))


def test_the_chain_loss_starts_at_its_step_and_changes_the_student(tmp_path, tiny_model, tiles):
    plain = distill(config(tmp_path, tiny_model, "plain", save_every=0), [tiles[0]], scheme=DEMO)
    chained = distill(config(tmp_path, tiny_model, "chained", save_every=0, chain_weight=1.0, chain_from=4),
                      [tiles[0]], scheme=DEMO)
    rows = [r.split(",") for r in (Path(chained.out_dir) / "log.csv").read_text().splitlines()]
    column = rows[0].index("chain_loss")
    assert [r[column] != "" for r in rows[1:]] == [False, False, True]  # logged at steps 2, 4, 6: on from step 5
    assert float(rows[3][column]) > 0
    # Steps 1-4 are the same run; the chain term then moves the weights elsewhere.
    assert [r[:3] for r in rows[1:3]] == [r.split(",")[:3] for r in (Path(plain.out_dir) / "log.csv").read_text().splitlines()[1:3]]
    assert weights_digest(chained.student) != weights_digest(plain.student)
    with pytest.raises(TrainingError, match="chain loss"):
        config(tmp_path, tiny_model, chain_weight=-1.0).validate()


def test_distill_writes_a_student_whose_metadata_round_trips(tmp_path, tiny_model, tiles):
    result = distill(config(tmp_path, tiny_model), [tiles[0]], scheme=DEMO, val=[tiles[1]])
    assert result.step == 6 and not result.interrupted
    run = Path(result.out_dir)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000003.pt", "step-0000006.pt"]
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,samples,loss,loss_k0,loss_k1") and len(rows) == 4
    assert (run / "samples" / "step-0000006.png").is_file()
    teacher = read_info(tiny_model)
    info = read_info(result.model_path)
    assert info.distilled["sampler"] == "ddim-logsnr" and info.distilled["steps"] == 2
    assert info.distilled["teacher_sha256"] == teacher.sha256 and info.distilled["guidance"] == 2.0
    assert info.default_guidance == 1.0 and info.diffusion == teacher.diffusion
    assert info.default_sampling() == {"sampler": "ddim-logsnr", "steps": 2}
    assert info.summary() == "2-step distilled model"
    assert teacher.distilled is None and teacher.default_sampling() == {"sampler": "dpm++2m", "steps": 15}
    assert json.loads((run / "config.json").read_text())["student_timesteps"] == [999, 302]
    # The student renders with its own settings and refuses others.
    info.check_sampling("ddim-logsnr", 2, None)
    info.check_sampling("ddim-logsnr", 2, 1.0)
    for bad, word in ((("dpm++2m", 2, None), "sampler 'dpm\\+\\+2m'"), (("ddim-logsnr", 15, None), "15 steps"),
                      (("ddim-logsnr", 2, 3.0), "guidance 3")):
        with pytest.raises(RenderError, match=f"2-step distilled model.*{word}"):
            info.check_sampling(*bad)
    teacher.check_sampling("unipc", 40, 7.0)  # any settings for a plain model
    with pytest.raises(TrainingError, match="already a distilled student"):
        distill(config(tmp_path, result.model_path, "again"), [tiles[0]], scheme=DEMO)


def test_a_reader_that_knows_no_students_refuses_one(tmp_path, tiny_model):
    from safetensors import safe_open

    model, _ = load_model(tiny_model)
    path = tmp_path / "student.safetensors"
    save_model(model, path, scheme=DEMO, default_guidance=1.0,
               distilled={"sampler": "ddim-logsnr", "steps": 4, "guidance": 3.0, "teacher_sha256": "0" * 64})
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()["napari_diffmix"])["version"] == 2
    with safe_open(str(tiny_model), framework="pt") as fh:
        assert json.loads(fh.metadata()["napari_diffmix"])["version"] == 1
    with pytest.raises(CheckpointError, match="lacks teacher_sha256"):
        save_model(model, tmp_path / "bad.safetensors", scheme=DEMO, distilled={"sampler": "ddim-logsnr", "steps": 4, "guidance": 3.0})


def test_resume_is_bit_for_bit(tmp_path, tiny_model, tiles):
    whole = distill(config(tmp_path, tiny_model, "whole", save_every=0), [tiles[0]], scheme=DEMO)
    cfg = config(tmp_path, tiny_model, "parts", save_every=0)
    first = distill(cfg, [tiles[0]], scheme=DEMO, max_steps=4)
    assert first.interrupted and first.step == 4
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        distill(cfg, [tiles[0]], scheme=DEMO)
    second = distill(cfg, [tiles[0]], scheme=DEMO, resume="auto")
    assert second.step == 6
    assert weights_digest(second.ema_student) == weights_digest(whole.ema_student)
    assert weights_digest(second.student) == weights_digest(whole.student)
    log_rows = (Path(cfg.out_dir) / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log_rows[1:]] == ["2", "4", "6"]


def test_a_crop_cycle_alternates_sizes_at_equal_pixels_and_resumes_exactly(tmp_path, tiny_model, tiles):
    cfg = config(tmp_path, tiny_model, "cycle", save_every=0, crop_size=32, items=1, crop_cycle=(16, 32))
    assert [cfg.crops_at(k) for k in range(3)] == [(16, 4), (32, 1), (16, 4)]
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    drawn = []
    from napari_diffmix.data import crops

    original = crops.CropStream.next

    def spy(self, dropout):
        out = original(self, dropout)
        drawn.append(out[1].shape)
        return out

    crops.CropStream.next = spy
    try:
        whole = distill(cfg, [tiles[0]], scheme=DEMO)
    finally:
        crops.CropStream.next = original
    assert drawn[:4] == [(4, 16, 16), (1, 32, 32), (4, 16, 16), (1, 32, 32)]
    rows = (Path(whole.out_dir) / "log.csv").read_text().splitlines()[1:]  # logged at steps 2, 4, 6
    assert [r.split(",")[1] for r in rows] == [str(sum(s[0] for s in drawn[:k])) for k in (2, 4, 6)]
    parts = config(tmp_path, tiny_model, "cycle-parts", save_every=0, crop_size=32, items=1, crop_cycle=(16, 32))
    distill(parts, [tiles[0]], scheme=DEMO, max_steps=3)
    resumed = distill(parts, [tiles[0]], scheme=DEMO, resume="auto")
    assert weights_digest(resumed.ema_student) == weights_digest(whole.ema_student)
    assert read_info(whole.model_path).distilled["crop_cycle"] == [16, 32]


def test_log_counts_the_crops_of_every_stage_of_a_resumed_run(tmp_path, tiny_model, tiles):
    """Stages resumed with other crop settings, as the bundled student was made: log.csv's
    samples column counts what each stage drew (2 crops a step, then 1), not the last stage's
    settings applied to every step."""
    first = config(tmp_path, tiny_model, "staged", save_every=0, steps=4, items=2, crop_size=32)
    distill(first, [tiles[0]], scheme=DEMO)
    distill(dataclasses.replace(first, steps=6, items=1, crop_size=16), [tiles[0]], scheme=DEMO, resume="auto")
    with open(tmp_path / "staged" / "log.csv", newline="") as fh:
        assert [(int(r["step"]), int(r["samples"])) for r in csv.DictReader(fh)] == [(2, 4), (4, 8), (6, 10)]


def test_stop_request_saves_a_checkpoint_and_resume_refuses_another_teacher(tmp_path, tiny_model, tiles):
    calls = []
    cfg = config(tmp_path, tiny_model, save_every=0)
    result = distill(cfg, [tiles[0]], scheme=DEMO, should_stop=lambda: calls.append(1) or len(calls) >= 2)
    assert result.interrupted and result.step == 2 and result.checkpoint.name == "step-0000002.pt"
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    from napari_diffmix.model.unet import SDMUNet, UNetConfig

    save_model(SDMUNet(UNetConfig.preset("tiny")), other, scheme=DEMO, default_guidance=2.0)
    with pytest.raises(CheckpointError, match="another teacher"):
        distill(config(tmp_path, other, save_every=0), [tiles[0]], scheme=DEMO, resume="auto")


def test_cli_distill_resume_and_export(tmp_path, tiny_model):
    from napari_diffmix.cli import main

    out = tmp_path / "cli"
    common = ["--teacher", str(tiny_model), "--threads", "1"]
    assert main(["distill", "demo", *common, "--preset", "tiny", "--crop-size", "32", "--out", str(out), "--max-steps", "3"]) == 0
    assert not (out / "model.safetensors").exists()
    assert main(["distill", "--resume", "--out", str(out)]) == 0  # data and teacher from the run folder
    info = read_info(out / "model.safetensors")
    assert info.distilled["distill_steps"] == 6 and info.distilled["crop_size"] == 32
    assert main(["distill", "--export-only", "--resume", "--out", str(out), "--export", str(tmp_path / "s.safetensors")]) == 0
    assert read_info(tmp_path / "s.safetensors").distilled["steps"] == 2


def test_renderer_uses_the_students_settings_by_default_and_refuses_others(tmp_path, tiny_model, tiles):
    from napari_diffmix.render import Renderer, RenderJob, run_to_end

    model, info = load_model(tiny_model)
    path = tmp_path / "student.safetensors"
    save_model(model, path, scheme=DEMO, diffusion=info.diffusion, default_guidance=1.0,
               distilled={"sampler": "ddim-logsnr", "steps": 2, "guidance": 2.0, "teacher_sha256": info.sha256})
    tile = tiles[1].crop(0, 0, 32, 32)
    renderer = Renderer()
    loaded = renderer.load(path, "cpu", "fp32")
    records = []
    result = run_to_end(renderer.start(loaded, RenderJob(tile.inst_map, tile.type_map, DEMO, threads=1)).steps(),
                        records.append)
    p = result.provenance
    assert (p["sampler"], p["steps"], p["guidance"]) == ("ddim-logsnr", 2, 1.0)
    assert [r.step for r in records] == [1, 2]  # no early preview: the first step is one network pass
    with pytest.raises(RenderError, match="2-step distilled model"):
        renderer.start(loaded, RenderJob(tile.inst_map, tile.type_map, DEMO, sampler="dpm++2m", steps=15))
    teacher = renderer.load(tiny_model, "cpu", "fp32")
    p = run_to_end(renderer.start(teacher, RenderJob(tile.inst_map, tile.type_map, DEMO, threads=1)).steps()).provenance
    assert (p["sampler"], p["steps"]) == ("dpm++2m", 15)


def test_cli_sampler_choices_are_the_samplers():
    from napari_diffmix.cli._common import SAMPLER_CHOICES
    from napari_diffmix.model.samplers import SAMPLERS

    assert SAMPLER_CHOICES == SAMPLERS


def test_the_bundled_student_is_a_student_of_the_bundled_teacher():
    from napari_diffmix.model.checkpoint import BUNDLED_STUDENT_DIR, bundled_model_path

    student, teacher = bundled_model_path(BUNDLED_STUDENT_DIR), bundled_model_path()
    if student is None or teacher is None:
        pytest.skip("the demo models are not shipped in this checkout")
    info, teacher_info = read_info(student), read_info(teacher)
    assert info.distilled["teacher_sha256"] == teacher_info.sha256
    assert info.default_sampling() == {"sampler": "ddim-logsnr", "steps": 4} and info.default_guidance == 1.0
    assert info.distilled["guidance"] == teacher_info.default_guidance
    assert student.stat().st_size <= 20 * 2**20
    quality = json.loads((BUNDLED_STUDENT_DIR / "quality.json").read_text())
    card = (BUNDLED_STUDENT_DIR / "MODEL_CARD.md").read_text()
    assert quality["student_sha256"] == info.sha256 and info.sha256 in card
    assert ("Student: PASS" in card) == quality["passed"]
    # The plugin's default is the student if, and only if, it passes the teacher's acceptance
    # on the held-out windows and on the plugin's canvases, 64 and 256 px.
    from napari_diffmix._widgets import _model_picker

    passes = quality["passed"] and quality.get("passed_canvases", False)
    assert (_model_picker.DEFAULT_MODEL == _model_picker.FAST) == passes


def test_torchrun_two_cpu_processes(tmp_path, tiny_model):
    """Data-parallel distillation: the ranks stay identical (checked at every checkpoint) and
    each checkpoint holds both ranks' RNG states; the chain loss is on from step 3 (its gradients,
    taken outside DDP's wrapper, must be averaged too)."""
    import os
    import sys

    from _subprocess import run_group

    from napari_diffmix.distill import load_checkpoint

    out = tmp_path / "ddp"
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "napari_diffmix",
         "distill", "demo", "--teacher", str(tiny_model), "--preset", "tiny", "--crop-size", "32", "--steps", "4",
         "--chain-weight", "1", "--chain-from", "2",
         "--out", str(out), "--threads", "1"],
        300, env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoints" / "step-0000004.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["rng"][0]["stream"] != ckpt["rng"][1]["stream"]  # each rank draws its own crops
    assert read_info(out / "model.safetensors").distilled["distill_steps"] == 4


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_presets_keep_bf16_only_where_it_is_native(monkeypatch, tmp_path, tiny_model, native):
    """Emulated bf16 is slower than fp32: on such a CPU the presets take auto's choice, and what
    that runs is fp32; a precision the user names is kept."""
    from napari_diffmix import distill as distill_module
    from napari_diffmix import runtime
    from napari_diffmix.cli import main
    from napari_diffmix.train import TrainConfig

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    chosen = "bf16" if native else "auto"
    student = DistillConfig.from_preset("demo", device="cpu")
    assert (student.precision, student.teacher_precision) == (chosen, chosen)
    assert TrainConfig.from_preset("demo", device="cpu").precision == chosen
    runs = {runtime.resolve_precision(chosen, "cpu", training=True), runtime.resolve_precision(chosen, "cpu")}
    assert runs == ({"bf16"} if native else {"fp32"})
    assert DistillConfig.from_preset("demo", precision="bf16").precision == "bf16"
    assert TrainConfig.from_preset("demo", precision="bf16", device="cpu").precision == "bf16"

    seen = []

    def stop(config, *args, **kwargs):  # the CLI's config, before any training
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(distill_module, "distill", stop)
    with pytest.raises(SystemExit):
        main(["distill", "demo", "--teacher", str(tiny_model), "--device", "cpu", "--out", str(tmp_path / "run")])
    assert (seen[0].precision, seen[0].teacher_precision) == (chosen, chosen)
    with pytest.raises(SystemExit):
        main(["distill", "demo", "--teacher", str(tiny_model), "--precision", "bf16", "--out", str(tmp_path / "run2")])
    assert seen[1].precision == "bf16" and seen[1].teacher_precision == chosen
