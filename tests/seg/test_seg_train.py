"""train-seg's robustness: resume to the same weights, mixed precision, stop requests and
DDP agreement (a NaN or a stop request on one rank stops every rank)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import pytest
import torch

from napari_diffmix.cli import main
from napari_diffmix.errors import CheckpointError
from napari_diffmix.phantom import make_phantom_dataset
from napari_diffmix.seg.checkpoint import TRAIN_STATE, load_seg_model
from napari_diffmix.seg.model import SegConfig
from napari_diffmix.seg.train import SegTrainConfig, train_segmentation
from napari_diffmix.errors import TrainingError

TINY = dict(batch_size=2, crop_size=32, lr=3e-3, device="cpu", num_threads=1, log_every=2, checkpoint_every=4)
FAST_CLI = ["--preset", "tiny", "--batch-size", "2", "--crop-size", "32", "--lr", "3e-3", "--device", "cpu", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiles():
    return make_phantom_dataset(3, 96, seed=11)


def tiny_model():
    return SegConfig.preset("tiny", 3)


def stop_after(n):
    """should_stop that asks for a stop while step ``n`` runs (it is polled once per step)."""
    calls = iter(range(10**6))
    return lambda: next(calls) >= n - 1


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiles, tmp_path, precision):
    cfg = SegTrainConfig(steps=6, precision=precision, **TINY)
    straight = train_segmentation(tiles, model_config=tiny_model(), config=cfg, out_dir=tmp_path / "straight")

    stopped = train_segmentation(tiles, model_config=tiny_model(), config=cfg, out_dir=tmp_path / "run", should_stop=stop_after(3))
    assert stopped.interrupted and stopped.steps == 3
    state = torch.load(tmp_path / "run" / TRAIN_STATE, weights_only=True)
    assert state["step"] == 3 and len(state["rng"]) == 1
    assert bool(state["scaler"]) == (precision == "fp16")  # the loss scale travels with an fp16 run

    # settings, model and scheme come from the folder
    resumed = train_segmentation(tiles, out_dir=tmp_path / "run", resume=True)
    assert resumed.start_step == 3 and resumed.steps == 6 and not resumed.interrupted
    assert_same_weights(resumed.model, straight.model)
    assert [(r["step"], r["loss"]) for r in resumed.history] == [(r["step"], r["loss"]) for r in straight.history]
    model, info = load_seg_model(tmp_path / "run")
    assert_same_weights(model, straight.model)
    assert info.training["step"] == 6 and [r["step"] for r in info.training["history"]] == [2, 4, 6]


def test_a_finished_run_extends_like_a_longer_one(tiles, tmp_path):
    train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=4, **TINY), out_dir=tmp_path / "run")
    longer = train_segmentation(tiles, config=SegTrainConfig(steps=6, **TINY), out_dir=tmp_path / "run", resume=True)
    straight = train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=6, **TINY))
    assert longer.start_step == 4 and longer.steps == 6
    assert_same_weights(longer.model, straight.model)
    # resume of an empty folder starts a new run
    fresh = train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=6, **TINY), out_dir=tmp_path / "new", resume=True)
    assert fresh.start_step == 0
    assert_same_weights(fresh.model, straight.model)


def test_resume_refuses_another_run(tiles, tmp_path, caplog):
    cfg = SegTrainConfig(steps=4, **TINY)
    out = tmp_path / "run"
    train_segmentation(tiles, model_config=tiny_model(), config=cfg, out_dir=out, should_stop=stop_after(2))

    def resume(data=tiles, **kw):
        return train_segmentation(data, out_dir=out, resume=True, **kw)

    with pytest.raises(CheckpointError, match=r"other settings \(seed 0 -> 5\)"):
        resume(config=SegTrainConfig(steps=4, **{**TINY, "seed": 5}))
    with pytest.raises(CheckpointError, match="the model differs from the saved one .*width 8 -> 16"):
        resume(model_config=SegConfig.preset("tiny", 3, width=16))
    with pytest.raises(CheckpointError, match=r"training data differs from the run's \(3 tiles then, 2 now"):
        resume(data=make_phantom_dataset(2, 96, seed=11))
    with pytest.raises(CheckpointError, match="already at step 2, past the 1 steps"):
        resume(config=SegTrainConfig(steps=1, **TINY))
    with pytest.raises(TrainingError, match="choose one"):
        train_segmentation(tiles, out_dir=out, resume=True, overwrite=True)
    with pytest.raises(CheckpointError, match="--overwrite to replace it or --resume"):
        train_segmentation(tiles, model_config=tiny_model(), config=cfg, out_dir=out)

    # a tunable setting may change, with a warning
    with caplog.at_level(logging.WARNING, logger="napari_diffmix.seg.train"):
        assert resume(config=SegTrainConfig(steps=4, **{**TINY, "lr": 1e-3})).steps == 4
    assert "changed settings (lr 0.003 -> 0.001)" in caplog.text

    (out / TRAIN_STATE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read the training state"):
        resume()
    (out / TRAIN_STATE).unlink()
    with pytest.raises(CheckpointError, match="no training state"):
        resume()


def test_mixed_precision_and_bad_settings(tiles):
    for precision in ("bf16", "fp16"):
        result = train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=2, precision=precision, **TINY))
        assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
        assert result.model.stem.weight.dtype == torch.float32  # autocast, not half weights
    with pytest.raises(TrainingError, match="precision 'fp8' is not one of auto|fp32|bf16|fp16"):
        train_segmentation(tiles, config=SegTrainConfig(precision="fp8"))
    with pytest.raises(TrainingError, match="resume needs out_dir"):
        train_segmentation(tiles, resume=True)


def test_a_nan_loss_stops_with_a_clear_error(tiles, tmp_path, monkeypatch):
    from napari_diffmix.seg import train as seg_train

    real = seg_train.hovernet_loss
    calls = iter(range(100))

    def loss_turning_nan(*args, **kwargs):
        terms = real(*args, **kwargs)
        if next(calls) >= 4:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(seg_train, "hovernet_loss", loss_turning_nan)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became NaN or infinite at step 5; .*holds the model of step 4: continue from there with --resume"):
        train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=8, **TINY), out_dir=out)
    assert load_seg_model(out)[1].training["step"] == 4


def test_a_failed_save_is_a_clear_error(tiles, tmp_path, monkeypatch):
    from napari_diffmix.seg import train as seg_train

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(seg_train, "save_seg_model", disk_full)
    with pytest.raises(TrainingError, match=r"cannot write the model folder .* at step 4 \(\[Errno 28\] No space left on device\)"):
        train_segmentation(tiles, model_config=tiny_model(), config=SegTrainConfig(steps=8, **TINY), out_dir=tmp_path / "run")


# -- command line -----------------------------------------------------------------------------


def test_cli_resume_remembers_the_data_and_settings(tiles, tmp_path, capsys):
    from napari_diffmix.datasets import write_generic

    write_generic(tiles, tmp_path / "train")
    assert main(["train-seg", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "m"), "--steps", "3", "--precision", "fp32", *FAST_CLI]) == 0
    assert main(["train-seg", "--out", str(tmp_path / "m"), "--resume", "--steps", "5"]) == 0
    assert "trained steps 3-5" in capsys.readouterr().out
    assert main(["train-seg", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "m2"), "--steps", "5", *FAST_CLI]) == 0
    assert_same_weights(load_seg_model(tmp_path / "m")[0], load_seg_model(tmp_path / "m2")[0])
    assert load_seg_model(tmp_path / "m")[1].training["train"]["precision"] == "fp32"

    capsys.readouterr()
    assert main(["train-seg", "--out", str(tmp_path / "m"), "--resume", "--steps", "6", "--seed", "3"]) == 2
    assert main(["train-seg", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "m"), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "seed 0 -> 3" in err and "--resume to continue" in err
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main(["train-seg", "--out", str(tmp_path / "m"), "--resume", "--overwrite"])


def test_sigterm_saves_and_says_how_to_continue(tiles, tmp_path):
    """SIGTERM (a cluster's pre-emption) finishes the step, saves the state, exits 0 and
    prints the resume command; the run then continues from where it stopped."""
    from _subprocess import process_group

    from napari_diffmix.datasets import write_generic

    write_generic(tiles, tmp_path / "train")
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "napari_diffmix", "train-seg", "--data", str(tmp_path / "train"), "--out", str(out),
           "--steps", "100000", "--checkpoint-every", "1", *FAST_CLI]
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    with process_group(cmd, env=env, stdout=-1, stderr=-1, text=True) as proc:
        deadline = time.monotonic() + 90
        while not (out / TRAIN_STATE).is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / TRAIN_STATE).is_file(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"Continue with: diffmix train-seg --out {out} --resume" in stderr and "model saved to" in stdout
    step = json.loads((out / "config.json").read_text())["training"]["step"]
    assert 1 <= step < 100000
    assert main(["train-seg", "--out", str(out), "--resume", "--steps", str(step + 1)]) == 0
    assert load_seg_model(out)[1].training["step"] == step + 1


# -- torchrun ---------------------------------------------------------------------------------

DDP_SCRIPT = r'''
import json, os, sys
from datetime import timedelta
import torch, torch.distributed as dist
from napari_diffmix.errors import DiffMixError
from napari_diffmix.phantom import make_phantom_dataset
from napari_diffmix.seg import train as seg_train
from napari_diffmix.seg.model import SegConfig

out = sys.argv[1]
# A rank left waiting in a collective fails after the timeout instead of hanging (torchrun's
# workers run in sessions of their own, out of reach of the test's process-group kill).
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
torch.set_num_threads(1)
tiles = make_phantom_dataset(3, 96, seed=11)
cfg = seg_train.SegTrainConfig(steps=4, batch_size=2, crop_size=32, lr=3e-3, device="cpu", log_every=1)
run = lambda **kw: seg_train.train_segmentation(tiles, model_config=SegConfig.preset("tiny", 3), config=cfg, **kw)
report = {}

calls = iter(range(100))  # only rank 1 asks to stop, during step 2
stopped = run(out_dir=out + "/a", should_stop=lambda: rank == 1 and next(calls) >= 1)
report["stopped"] = [stopped.steps, stopped.interrupted]
resumed = run(out_dir=out + "/a", resume=True)
straight = run(out_dir=out + "/b")
a, b = resumed.model.state_dict(), straight.model.state_dict()
report["same_weights"] = all(torch.equal(a[k], b[k]) for k in a)

real = seg_train.hovernet_loss
losses = iter(range(100))
def nan_on_rank_1(*args, **kwargs):
    terms = real(*args, **kwargs)
    if rank == 1 and next(losses) >= 1:
        terms["loss"] = terms["loss"] * float("nan")
    return terms
seg_train.hovernet_loss = nan_on_rank_1
try:
    run()
except DiffMixError as exc:
    report["error"] = str(exc)
with open(f"{out}/report-{rank}.json", "w") as fh:  # not stdout: torchrun's unbuffered ranks interleave there
    json.dump(report, fh)
dist.destroy_process_group()
# torch 2.13's gloo sometimes aborts in interpreter teardown after this script has destroyed
# its group ("terminate called without an active exception", ~1 run in 30 here; never seen
# with `diffmix train-seg` itself): the report is written, so leave without that teardown.
os._exit(0)
'''


@pytest.mark.slow
def test_torchrun_ranks_agree_on_stop_nan_and_resume(tmp_path):
    """Two gloo ranks: a stop request on rank 1 alone stops both after the same step; the
    resumed run matches an uninterrupted one; a NaN loss on rank 1 alone stops both ranks
    with the same error instead of leaving rank 0 waiting in the gradient all-reduce."""
    from _subprocess import run_group

    script = tmp_path / "ddp_seg.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = run_group(cmd, timeout=180, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, other = (json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1))
    assert report == other
    assert report["stopped"] == [2, True] and report["same_weights"]
    assert "loss became NaN or infinite at step 2 on at least one of the 2 processes" in report["error"]
    state = torch.load(tmp_path / "a" / TRAIN_STATE, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
