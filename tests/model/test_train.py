"""Training loop: learning, EMA, bit-for-bit resume, atomic checkpoints, DDP, bad input,
extra label maps paired with their original images, fine-tuning from official checkpoints.

All runs use the ``tiny`` UNet preset (~1 M parameters) on 32 px crops of small synthetic
tiles (or of the demo's training split), so each takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _subprocess import process_group, run_group

from napari_diffmix.classes import DEMO
from napari_diffmix.errors import DatasetError, DiffMixError, LabelError, SchemeError
from napari_diffmix.data.crops import CropStream, dihedral
from napari_diffmix.trainloop import list_checkpoints
from napari_diffmix.train import (
    Stage,
    TrainConfig,
    TrainingError,
    collect_sources,
    ema_rate_at,
    find_resume_checkpoint,
    load_checkpoint,
    pair_label_patches,
    stage_at,
    train,
    update_ema,
    weights_digest,
)

REPO = Path(__file__).resolve().parents[2]


def make_tile(seed: int, size: int = 48):
    """An H&E-like tile: pink background, class-coloured disk nuclei."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (228, 196, 216)
    colours = [(70, 40, 140), (100, 60, 170), (130, 80, 120)]
    for i in range(1, 10):
        rr, cc = disk(tuple(rng.integers(4, size - 4, 2)), int(rng.integers(3, 6)), shape=inst.shape)
        cls = int(rng.integers(1, 4))
        inst[rr, cc] = i
        types[rr, cc] = cls
        img[rr, cc] = colours[cls - 1]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, inst, types


@pytest.fixture(scope="module")
def data():
    return [make_tile(i) for i in range(3)]


def tiny(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), stages=(Stage(20, 1e-3, 0.1),), save_every=0, log_every=5,
                sample_every=0, num_threads=1)
    base.update(kw)
    return TrainConfig.from_preset("tiny", **base)


@pytest.fixture(autouse=True)
def no_export(monkeypatch, request):
    # Exporting writes a model file per run; only the tests about exports keep it.
    if "export" not in request.node.name:
        monkeypatch.setattr("napari_diffmix.train.export_model", lambda *a, **k: None)


# ---------------------------------------------------------------------------------------------
# small pieces


def test_stage_and_ema_schedules():
    stages = (Stage(3, 1e-4, 0.0), Stage(2, 2e-5, 0.2))
    assert [stage_at(stages, k)[0] for k in range(6)] == [0, 0, 0, 1, 1, 1]
    assert ema_rate_at(0.9999, 0, True) == pytest.approx(0.1)
    assert ema_rate_at(0.9999, 90, True) == pytest.approx(91 / 100)
    assert ema_rate_at(0.9, 10_000, True) == 0.9
    assert ema_rate_at(0.9999, 0, False) == 0.9999


def test_update_ema_formula():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.75)
    for b, e, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p.detach())
    update_ema(ema, model, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_dihedral_gives_eight_distinct_symmetries():
    a = np.arange(12).reshape(3, 4)
    outs = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}
    assert len(outs) == 8


def test_crop_stream_is_seeded_per_rank(data):
    sources = collect_sources(data, DEMO, 32)
    a, b, c = (CropStream(sources, 32, 4, seed=1, rank=r) for r in (0, 0, 1))
    xa, xb, xc = a.next(0.0), b.next(0.0), c.next(0.0)
    assert all(np.array_equal(u, v) for u, v in zip(xa, xb))
    assert not np.array_equal(xa[0], xc[0])
    # crops keep images and label maps aligned: nuclei pixels are the dark ones
    img, inst = xa[0][0], xa[1][0]
    if (inst > 0).any() and (inst == 0).any():
        assert img[inst > 0].mean() < img[inst == 0].mean()


# ---------------------------------------------------------------------------------------------
# training behaviour


def test_loss_decreases(tmp_path, data):
    result = train(tiny(tmp_path, stages=(Stage(30, 1e-3, 0.0),), log_every=10), data, scheme=DEMO)
    losses = [row["loss"] for row in result.history]
    assert result.step == 30 and len(losses) == 3
    assert losses[-1] < 0.5 * losses[0], losses
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 4


def test_ema_tracks_weights(tmp_path, data):
    short = (Stage(10, 1e-3, 0.1),)
    lagging = train(tiny(tmp_path, "a", stages=short, ema_rate=0.9, ema_warmup=False), data, scheme=DEMO)
    assert weights_digest(lagging.ema_model) != weights_digest(lagging.model)
    # an EMA with rate 0.9 stays between the start and the trained weights: closer to the start
    # than the raw weights are
    torch.manual_seed(0)
    from napari_diffmix.model.unet import SDMUNet

    init = SDMUNet(lagging.model.config).state_dict()
    raw, ema = lagging.model.state_dict(), lagging.ema_model.state_dict()
    dist = lambda sd: sum(float((sd[k] - init[k]).float().norm()) for k in init)  # noqa: E731
    assert 0 < dist(ema) < dist(raw)
    exact = train(tiny(tmp_path, "b", stages=short, ema_rate=0.0, ema_warmup=False), data, scheme=DEMO)
    assert weights_digest(exact.ema_model) == weights_digest(exact.model)


def test_resume_is_bit_for_bit(tmp_path, data):
    """2N steps in one go == N steps, stop, resume, N steps.

    N = 12 is enough: every piece of state (weights, EMA, AdamW moments, data-stream and noise
    RNG, stage schedule) is touched on every step, so anything not restored shows up in the
    first resumed step; the stage boundary at 15 and the warm-up EMA are crossed after the
    resume point so the schedule is exercised too.
    """
    stages = (Stage(15, 1e-3, 0.0), Stage(9, 4e-4, 0.3))
    one = train(tiny(tmp_path, "one", stages=stages, ema_rate=0.99, offset_noise=0.1), data, scheme=DEMO)
    cfg = tiny(tmp_path, "two", stages=stages, ema_rate=0.99, offset_noise=0.1, save_every=5)
    first = train(cfg, data, scheme=DEMO, max_steps=12)
    assert first.interrupted and first.step == 12 and first.checkpoint.name == "step-0000012.pt"
    second = train(cfg, data, scheme=DEMO, resume="auto")
    assert second.step == 24 and not second.interrupted
    a, b = load_checkpoint(one.checkpoint), load_checkpoint(second.checkpoint)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert weights_digest(one.ema_model) == weights_digest(second.ema_model)
    # the log describes one continuous run
    steps = [int(r.split(",")[0]) for r in (tmp_path / "two" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [5, 10, 12, 15, 20, 24]
    # keep_last (3) pruned the older checkpoints
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["step-0000015.pt", "step-0000020.pt", "step-0000024.pt"]


def test_refuses_to_overwrite_a_run(tmp_path, data):
    cfg = tiny(tmp_path, stages=(Stage(2, 1e-3, 0.0),))
    train(cfg, data, scheme=DEMO)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, data, scheme=DEMO)


def test_sigterm_finishes_step_and_saves(tmp_path, data):
    calls = []

    def kill_at_step_4():
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    result = train(tiny(tmp_path), data, scheme=DEMO, should_stop=kill_at_step_4)
    assert result.interrupted and result.step in (4, 5)
    assert result.checkpoint == list_checkpoints(tmp_path / "run")[-1]
    assert load_checkpoint(result.checkpoint)["step"] == result.step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_failed_checkpoint_write_keeps_previous(tmp_path, data, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if obj.get("step") == 10:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(TrainingError, match="previous checkpoint .*step-0000005.pt is intact"):
        train(tiny(tmp_path, save_every=5), data, scheme=DEMO)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000005.pt"]
    assert load_checkpoint(folder / "step-0000005.pt")["step"] == 5


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path, data):
    """A process killed while writing a checkpoint leaves the previous one as the newest
    loadable checkpoint; resuming continues from it and removes the debris."""
    np.savez(tmp_path / "data.npz", *[a for tile in data for a in tile])
    marker = tmp_path / "writing"
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import time, numpy as np, torch
        from pathlib import Path
        import napari_diffmix.train as T
        from napari_diffmix.classes import DEMO
        T.export_model = lambda *a, **k: None
        z = np.load({str(tmp_path / "data.npz")!r}); arrs = [z[f"arr_{{i}}"] for i in range(len(z.files))]
        data = [tuple(arrs[i:i + 3]) for i in range(0, len(arrs), 3)]
        real_save = torch.save
        def slow_save(obj, path, *a, **k):
            if obj["step"] == 10:
                with open(path, "wb") as fh:
                    fh.write(b"PK\\x03\\x04" + bytes(4096)); fh.flush()
                Path({str(marker)!r}).touch()
                time.sleep(120)
            return real_save(obj, path, *a, **k)
        torch.save = slow_save
        cfg = T.TrainConfig.from_preset("tiny", out_dir={str(tmp_path / "run")!r}, stages=(T.Stage(20, 1e-3, 0.1),),
                                        save_every=5, sample_every=0, num_threads=1)
        T.train(cfg, data, scheme=DEMO)
    """))
    env = {**os.environ, "DIFFMIX_QUIET": "1"}
    with process_group([sys.executable, str(script)], env=env, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the training process never reached the checkpoint write"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    folder = tmp_path / "run" / "checkpoints"
    debris = [p for p in folder.iterdir() if p.name.startswith(".step-0000010")]
    assert debris, "the killed save should have left its temporary file"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000005.pt"]
    assert find_resume_checkpoint("auto", tmp_path / "run").name == "step-0000005.pt"
    result = train(tiny(tmp_path, stages=(Stage(20, 1e-3, 0.1),), save_every=5), data, scheme=DEMO, resume="auto", max_steps=3)
    assert result.step == 8
    assert not any(p.name.startswith(".") for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# bad input and failures


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda d: [], DatasetError, "empty"),
        (lambda d: [(None, d[0][1], d[0][2])], DatasetError, "no image"),
        (lambda d: [(d[0][0], None, None)], DatasetError, "no label maps"),
        (lambda d: [(d[0][0], d[0][1], np.where(d[0][2] > 0, 7, 0).astype(np.uint8))], SchemeError, "outside 0..3"),
        (lambda d: [(d[0][0], d[0][1][:20], d[0][2][:20])], LabelError, "do not match the image size"),
        (lambda d: [(d[0][0].astype(np.float32), d[0][1], d[0][2])], DatasetError, "uint8 RGB"),
        (lambda d: [(d[0][0][:30, :30], d[0][1][:30, :30], d[0][2][:30, :30])], DatasetError, "smaller than the 32 px"),
        (lambda d: ["not a tile"], DatasetError, "expected a dataset"),
    ],
)
def test_bad_training_data(tmp_path, data, mutate, error, match):
    with pytest.raises(error, match=match):
        train(tiny(tmp_path), mutate(data), scheme=DEMO)


def test_bad_settings(tmp_path, data):
    with pytest.raises(TrainingError, match="multiple of 2"):
        train(tiny(tmp_path, crop_size=33), data, scheme=DEMO)
    with pytest.raises(TrainingError, match="precision"):
        train(tiny(tmp_path, precision="fp8"), data, scheme=DEMO)
    with pytest.raises(TrainingError, match="unknown training preset"):
        TrainConfig.from_preset("huge")
    with pytest.raises(DiffMixError, match="no CUDA GPU"):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        train(tiny(tmp_path, device="cuda"), data, scheme=DEMO)


class _Sabotage:
    """Wraps the diffusion so that training_losses fails on a chosen call."""

    def __init__(self, inner, at: int, kind: str):
        self.inner, self.at, self.kind, self.calls = inner, at, kind, 0

    def training_losses(self, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            if self.kind == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            out = self.inner.training_losses(*a, **k)
            return {key: v * float("nan") for key, v in out.items()}
        return self.inner.training_losses(*a, **k)


def _sabotage(monkeypatch, at, kind):
    import napari_diffmix.train as T

    real = T.build_diffusion
    monkeypatch.setattr(T, "build_diffusion", lambda *a, **k: _Sabotage(real(*a, **k), at, kind))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    _sabotage(monkeypatch, 8, "nan")
    with pytest.raises(TrainingError, match=r"loss became nan at step 8.*step-0000005\.pt"):
        train(tiny(tmp_path, save_every=5), data, scheme=DEMO)
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-0000005.pt"]
    state = load_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_gradient_stops_before_the_update(tmp_path, data, monkeypatch):
    import napari_diffmix.train as T

    real = T.build_model

    def poisoned(*a, **k):
        model, cfg = real(*a, **k)
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == 3 else grad

        model.out[-1].weight.register_hook(hook)
        return model, cfg

    monkeypatch.setattr(T, "build_model", poisoned)
    with pytest.raises(TrainingError, match="gradients became nan at step 3.*No checkpoint"):
        train(tiny(tmp_path), data, scheme=DEMO)


def test_out_of_memory_message(tmp_path, data, monkeypatch):
    _sabotage(monkeypatch, 2, "oom")
    with pytest.raises(TrainingError, match="out of memory.*--batch-size.*--grad-checkpointing"):
        train(tiny(tmp_path), data, scheme=DEMO)


# ---------------------------------------------------------------------------------------------
# distributed


def test_ddp_two_cpu_processes_stay_identical(tmp_path, data):
    np.savez(tmp_path / "data.npz", *[a for tile in data for a in tile])
    script = tmp_path / "ddp_job.py"
    script.write_text(textwrap.dedent(f"""
        import os, numpy as np
        import napari_diffmix.train as T
        from napari_diffmix.classes import DEMO
        T.export_model = lambda *a, **k: None
        z = np.load({str(tmp_path / "data.npz")!r}); arrs = [z[f"arr_{{i}}"] for i in range(len(z.files))]
        data = [tuple(arrs[i:i + 3]) for i in range(0, len(arrs), 3)]
        cfg = T.TrainConfig.from_preset("tiny", out_dir={str(tmp_path / "run")!r}, stages=(T.Stage(6, 1e-3, 0.2),),
                                        save_every=3, log_every=2, sample_every=0, num_threads=1)
        r = T.train(cfg, data, scheme=DEMO)
        rank = os.environ["RANK"]
        open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w").write(T.weights_digest(r.model) + " " + T.weights_digest(r.ema_model))
    """))
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        300, env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000006.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each rank drew its own crops
    assert ckpt["rng"][0]["stream"] != ckpt["rng"][1]["stream"]
    # only rank 0 logged
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]


# ---------------------------------------------------------------------------------------------
# command line, export, the shipped demo model


def test_cli_train_resume_export(tmp_path, capsys):
    from napari_diffmix.cli import main
    from napari_diffmix.model.checkpoint import load_model

    run = tmp_path / "run"
    common = ["--out", str(run), "--threads", "1"]
    assert main(["train", "demo", "--preset", "tiny", "--steps", "5", "--log-every", "1", "--sample-every", "3",
                 "--max-steps", "3", *common]) == 0
    grid = run / "samples" / "step-0000003.png"
    assert grid.is_file() and grid.stat().st_size > 1000
    assert "Continue with: diffmix train --resume" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "tiny" and saved["stages"][0]["steps"] == 5 and saved["scheme"]["name"] == "demo"
    # --resume needs neither the data nor the recipe again
    assert main(["train", "--resume", *common]) == 0
    assert (run / "model.safetensors").is_file()
    model, info = load_model(run / "model.safetensors")
    assert info.default_guidance == 2.0 and info.scheme.name == "demo" and info.extra["training"]["step"] == 5
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    ema = {k: v for k, v in ckpt["ema"].items()}
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    assert main(["train", "--export-only", "--resume", str(run), "--export", str(tmp_path / "again.safetensors")]) == 0
    assert load_model(tmp_path / "again.safetensors")[1].extra["training"]["step"] == 5
    # errors are one clear line, exit code 2
    assert main(["train", str(tmp_path / "missing"), "--scheme", "demo", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "demo", "--stages", "10:fast", "--out", str(tmp_path / "y")]) == 2
    assert "STEPS:LR" in capsys.readouterr().err


def test_fine_tune_from_exported_model(tmp_path, data):
    from napari_diffmix.classes import CONSEP
    from napari_diffmix.errors import CheckpointError
    from napari_diffmix.model.checkpoint import load_model, save_model
    from napari_diffmix.model.unet import SDMUNet, UNetConfig

    torch.manual_seed(3)
    source = SDMUNet(UNetConfig.preset("tiny"))
    path = tmp_path / "start.safetensors"
    save_model(source, path, scheme=DEMO)
    started = train(tiny(tmp_path, init=str(path)), data, scheme=DEMO, max_steps=0)
    assert weights_digest(started.model) == weights_digest(load_model(path)[0])
    with pytest.raises(CheckpointError, match="trained for 3 classes"):
        train(tiny(tmp_path, "other", init=str(path)), data, scheme=CONSEP, max_steps=0)


def test_fine_tune_from_official_pt(tmp_path, data):
    """An official guided-diffusion ``.pt`` (a bare state dict whose key names are written from
    the reference code, not ours) is where fine-tuning starts: by preset name and by a config."""
    from test_checkpoint import guided_diffusion_shapes, random_state_dict

    from napari_diffmix.classes import CONSEP
    from napari_diffmix.model.unet import UNetConfig

    shapes = guided_diffusion_shapes(32, (1, 2), 1, {2}, DEMO.condition_channels, 16)  # the tiny preset
    state = random_state_dict(shapes, seed=5)
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save(state, path)
    started = train(tiny(tmp_path, "a", init=str(path)), data, scheme=DEMO, max_steps=0)
    assert started.step == 0
    for model in (started.model, started.ema_model):
        sd = model.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
        assert all(torch.equal(sd[k], state[k]) for k in state)
    # one AdamW step (weight decay 0) moves every weight by at most the learning rate
    stepped = train(tiny(tmp_path, "b", init=str(path), stages=(Stage(1, 1e-3, 0.0),)), data, scheme=DEMO)
    moved = [float((v - state[k]).abs().max()) for k, v in stepped.model.state_dict().items()]
    assert 0 < max(moved) <= 1e-3 * 1.001

    # the published architecture at small width, read with an explicit config (--model FILE)
    config = UNetConfig.preset("diffmix-consep", model_channels=32, spade_hidden=16)
    big = random_state_dict(guided_diffusion_shapes(32, (1, 1, 2, 2, 4, 4), 2, {8, 16, 32}, 6, 16), seed=6)
    torch.save(big, tmp_path / "consep.pt")
    started = train(tiny(tmp_path, "c", model=config.to_dict(), init=str(tmp_path / "consep.pt")), data, scheme=CONSEP, max_steps=0)
    assert weights_digest(started.model) == weights_digest(started.ema_model)
    assert all(torch.equal(started.model.state_dict()[k], big[k]) for k in big)


# ---------------------------------------------------------------------------------------------
# balancing/enlarging label maps from `diffmix labels` as extra training conditions


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory):
    """4 label-map patches (128 px: 64 px inside the 32 px band that enlarging keeps) that
    `diffmix labels` planned on the demo's training tile."""
    from napari_diffmix.cli import main
    from napari_diffmix.datasets import Dataset, write_generic
    from napari_diffmix.demo_data import demo_split

    root = tmp_path_factory.mktemp("labels")
    write_generic(Dataset([demo_split().train], DEMO), root / "train")
    out = root / "lab"
    assert main(["labels", str(root / "train"), "--out", str(out), "--patches", "4", "--patch-size", "128", "--stride", "64"]) == 0
    return out


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "provenance.json").read_text())["patches"]


def test_label_patches_pair_with_their_original_window(labels_dir):
    from napari_diffmix.demo_data import demo_split

    train_tile = demo_split().train
    pairs = pair_label_patches(labels_dir, collect_sources([train_tile], DEMO, 32), DEMO, 32)
    records = sorted(_records(labels_dir), key=lambda r: r["name"])
    assert [p.name for p in pairs] == [f"lab/{r['name']}" for r in records] and len(pairs) == 4
    assert {tuple(r["maps"]) for r in records} == {("balance",), ("enlarge",)}
    assert all(r["retyped_nuclei"] + r["shifted_nuclei"] > 0 for r in records)
    edited = 0
    for pair, rec in zip(pairs, records):
        assert rec["tile_name"] == "ihc-demo-train"
        (y, x), s = rec["origin"], rec["size"]
        np.testing.assert_array_equal(pair.image, train_tile.image[y : y + s, x : x + s])
        np.testing.assert_array_equal(pair.inst_map, np.load(labels_dir / "inst_maps" / f"{rec['name']}.npy"))
        np.testing.assert_array_equal(pair.type_map, np.load(labels_dir / "type_maps" / f"{rec['name']}.npy"))
        edited += not np.array_equal(pair.type_map, train_tile.type_map[y : y + s, x : x + s])
    assert edited == 4  # the maps are the edited ones, not the tile's own


def test_cli_train_with_extra_labels_and_resume(tmp_path, labels_dir, monkeypatch, capsys):
    import napari_diffmix.train as T
    from napari_diffmix.cli import main

    seen = []

    class Spy(T.CropStream):
        def __init__(self, sources, *a, **k):
            seen.append([s.name for s in sources])
            super().__init__(sources, *a, **k)

    monkeypatch.setattr(T, "CropStream", Spy)
    names = sorted(f"lab/{r['name']}" for r in _records(labels_dir))
    run = tmp_path / "run"
    monkeypatch.chdir(labels_dir.parent)  # a relative folder is remembered absolute
    assert main(["train", "demo", "--extra-labels", "lab", "--preset", "tiny", "--steps", "2", "--max-steps", "1",
                 "--sample-every", "0", "--threads", "1", "--out", str(run)]) == 0
    assert seen[-1] == ["ihc-demo-train", *names]
    assert json.loads((run / "data.json").read_text())["extra_labels"] == [str(labels_dir.resolve())]
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "--threads", "1", "--out", str(run)]) == 0
    assert seen[-1] == ["ihc-demo-train", *names] and load_checkpoint(list_checkpoints(run)[-1])["step"] == 2
    # `diffmix labels demo` plans on the whole demo tile, held-out columns included: refused
    whole = tmp_path / "whole"
    assert main(["labels", "demo", "--out", str(whole), "--patches", "2", "--patch-size", "64", "--stride", "64"]) == 0
    capsys.readouterr()
    assert main(["train", "demo", "--extra-labels", str(whole), "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "comes from tile 'ihc-demo', which is not among the training tiles (ihc-demo-train)" in err
    assert "'ihc-demo-train' is a part of that tile" in err


def test_extra_label_maps_are_drawn_at_the_requested_share(tmp_path, labels_dir, capsys):
    import csv
    import math

    from napari_diffmix.cli import main

    common = ["--preset", "tiny", "--steps", "25", "--batch-size", "8", "--crop-size", "32", "--log-every", "5",
              "--sample-every", "0", "--threads", "1"]
    draws = 25 * 8
    for share, out in ((0.5, "half"), (None, "pixels")):
        run = tmp_path / out
        extra = [] if share is None else ["--extra-share", str(share)]
        assert main(["train", str(labels_dir.parent / "train"), "--extra-labels", str(labels_dir), *extra, *common, "--out", str(run)]) == 0
        printed = capsys.readouterr().out
        with open(run / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        realised = float(rows[-1]["extra_share"])
        if share is None:  # the default: the extra maps' share of the training pixels
            tile = np.load(labels_dir.parent / "train" / "inst_maps" / "ihc-demo-train.npy")
            extra_px = sum(np.load(p).size for p in (labels_dir / "inst_maps").glob("*.npy"))
            share = extra_px / (extra_px + tile.size)
        assert abs(realised - share) <= 4 * math.sqrt(share * (1 - share) / draws), (share, realised)
        assert f"crops drawn: extra {realised:.1%} of the crops (asked {share:.1%})" in printed
    assert main(["train", str(labels_dir.parent / "train"), "--extra-share", "0.3", *common, "--out", str(tmp_path / "none")]) == 2
    assert "30% of the crops were asked to come from extra data, but the training pool has none" in capsys.readouterr().err


def _rewrite_records(folder: Path, change) -> None:
    doc = json.loads((folder / "provenance.json").read_text())
    change(doc["patches"])
    (folder / "provenance.json").write_text(json.dumps(doc))


def _shrink_first(folder: Path) -> None:
    name = sorted(r["name"] for r in _records(folder))[0]
    for sub in ("inst_maps", "type_maps"):
        np.save(folder / sub / f"{name}.npy", np.load(folder / sub / f"{name}.npy")[:124])


@pytest.mark.parametrize(
    "mutate, sources, error, match",
    [
        (lambda f: None, "renamed", DatasetError, r"comes from tile 'ihc-demo-train', which is not among the training tiles \(other\)"),
        (lambda f: None, "twice", DatasetError, "2 training tiles have that name"),
        (_shrink_first, "train", DatasetError, r"lab: label map '000000_ihc-demo-train_y\d+_x\d+' is 128x124 px but provenance.json records a 128 px"),
        (lambda f: _rewrite_records(f, lambda ps: ps[0].update(origin=[0, 300])), "train", DatasetError, r"window \(y 0, x 300, 128 px\) does not fit the 384x512"),
        (lambda f: _rewrite_records(f, lambda ps: ps.pop(0)), "train", DatasetError, "has no record in provenance.json"),
        (lambda f: (f / "provenance.json").unlink(), "train", DatasetError, "no provenance.json"),
        (lambda f: (f / "provenance.json").write_text("{"), "train", DatasetError, "cannot read the patch records"),
        (lambda f: None, "cropped", DatasetError, "is 256x256 px but the label maps were planned on a 384x512 px tile"),
        (lambda f: None, "consep", SchemeError, "the label maps use classes"),
    ],
)
def test_bad_extra_labels(tmp_path, labels_dir, mutate, sources, error, match):
    from dataclasses import replace

    from napari_diffmix.classes import CONSEP
    from napari_diffmix.demo_data import demo_split

    folder = tmp_path / "lab"
    shutil.copytree(labels_dir, folder)
    mutate(folder)
    tile = demo_split().train
    tiles = {
        "train": [tile], "renamed": [replace(tile, name="other")], "twice": [tile, tile], "consep": [tile],
        "cropped": [replace(tile.crop(0, 0, 256, 256), name=tile.name)],
    }[sources]
    scheme = CONSEP if sources == "consep" else DEMO
    with pytest.raises(error, match=match):
        pair_label_patches(folder, collect_sources(tiles, scheme, 32), scheme, 32)


def test_label_only_training_data_points_to_extra_labels(tmp_path, labels_dir):
    from napari_diffmix.datasets import open_dataset

    with pytest.raises(DatasetError, match="no image.*--extra-labels"):
        train(tiny(tmp_path), open_dataset(labels_dir), scheme=DEMO)


def test_render_and_measure_runs_on_a_tiny_model(data):
    from napari_diffmix import quality
    from napari_diffmix.datasets import Tile
    from napari_diffmix.model.unet import SDMUNet, UNetConfig

    torch.manual_seed(0)
    model = SDMUNet(UNetConfig.preset("tiny")).eval()
    tiles = [Tile(f"t{i}", *d) for i, d in enumerate(data[:2])]
    report, images, windows = quality.render_and_measure(model, tiles, DEMO, ring_classes=(1, 2), size=32, steps=2, guidance=2.0)
    assert len(images) == len(windows) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert report.n_images == 2 and np.isfinite(report.h_contrast_real)
    # an untrained model does not know where nuclei are
    assert not report.passed


def test_shipped_demo_model_loads_and_renders(demo_model_file):
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.model.condition import condition_batch
    from napari_diffmix.model.samplers import sample
    from napari_diffmix.model.unet import UNetConfig
    from napari_diffmix.demo_data import demo_split

    assert demo_model_file.stat().st_size <= 25 * 2**20
    model, info = load_model(demo_model_file)
    assert info.config == UNetConfig.preset("demo")
    assert info.scheme == DEMO and info.default_guidance == TrainConfig.from_preset("demo").guidance
    card = (demo_model_file.parent / "MODEL_CARD.md").read_text()
    assert info.sha256 in card and str(info.extra["training"]["step"]) in card
    tile = demo_split().held_out.crop(0, 0, 64, 64)
    cond = condition_batch([tile.inst_map], [tile.type_map], DEMO)
    *_, last = sample(model, cond, steps=4, guidance=info.default_guidance, seed=0, diffusion=info.diffusion)
    image = last.images()[0]
    assert image.shape == (64, 64, 3) and image.std() > 5


def test_logged_hours_add_up_the_invocations_of_a_resumed_run(tmp_path):
    from napari_diffmix.trainloop import logged_hours

    log = tmp_path / "log.csv"
    # elapsed_s restarts with each invocation: 1800 s, then a resumed 900 s, then 360 s.
    log.write_text("step,loss,elapsed_s\n10,1,600\n20,1,1800\n30,1,300\n40,1,900\n50,1,360\n")
    assert logged_hours(log) == pytest.approx((1800 + 900 + 360) / 3600)


def test_log_counts_the_crops_drawn_across_a_resume_with_another_batch_size(tmp_path, data):
    first = tiny(tmp_path, "batches", stages=(Stage(10, 1e-3, 0.1),), batch_size=2, save_every=5)
    train(first, data, scheme=DEMO)
    train(dataclasses.replace(first, stages=(Stage(15, 1e-3, 0.1),), batch_size=1), data, scheme=DEMO, resume="auto")
    with open(tmp_path / "batches" / "log.csv", newline="") as fh:
        assert [(int(r["step"]), int(r["samples"])) for r in csv.DictReader(fh)] == [(5, 10), (10, 20), (15, 25)]
