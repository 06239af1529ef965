"""Fault cases of issue 15, run as a careful user would: outputs that would destroy inputs or
foreign folders, non-finite models, signals, bad scheme files, missed goals. Every case checks
what is left on disk and the exit code, not only that an error was raised."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _phantom import phantom_and_tiny_model
from napari_diffmix.cli import main
from napari_diffmix.datasets import open_dataset, write_generic
from napari_diffmix.errors import UnsafeOutputError
from napari_diffmix.outputs import MARKER, check_replace, output_kind, refuse_overlap

FAST = ["--patch-size", "32", "--stride", "32", "--patches", "4", "--steps", "2", "--strength", "0.5",
        "--batch-size", "2", "--threads", "1", "--device", "cpu"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash: 'untouched' means this is unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A user's dataset (written without our marker, as any other tool would), a tiny model."""
    root = tmp_path_factory.mktemp("rel")
    user, model = root / "DATASET" / "Train", root / "tiny.safetensors"
    phantom_and_tiny_model(user, model)
    (user / MARKER).unlink()  # a dataset the user made, not one of our outputs
    return {"root": root, "dataset": user, "model": model}


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


# -- item 1: never delete a user's data --------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_synthesize_never_writes_over_or_into_its_dataset(data, where, capsys):
    train = data["dataset"]
    out = {"same": train, "parent": train.parent, "inside": train / "synthetic.zarr"}[where]
    before = snapshot(train.parent)
    argv = ["synthesize", str(train), "--model", str(data["model"]), "--out", str(out), *FAST, "--overwrite"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "input" in err and str(train) in err, err
    assert snapshot(train.parent) == before and len(open_dataset(train)) == 2


def test_synthesize_overwrite_never_replaces_a_foreign_folder(data, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(out), *FAST]
    for extra in ([], ["--overwrite"]):
        assert main(argv + extra) == 2
        err = _err(capsys)
        assert "not a napari-diffmix output" in err and "--overwrite" not in err, err
        assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]


def test_export_refuses_its_store_and_foreign_folders_and_replaces_its_own(data, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(store), *FAST]) == 0
    capsys.readouterr()
    before = snapshot(store)
    for fmt in ("pannuke", "hovernet"):
        assert main(["export", str(store), "--format", fmt, "--out", str(store), "--overwrite"]) == 2
        assert "is the input" in _err(capsys)
        assert main(["export", str(store), "--format", fmt, "--out", str(store / "exp"), "--overwrite"]) == 2
        assert "lies inside the input" in _err(capsys)
    assert snapshot(store) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.npy").write_bytes(b"x")
    assert main(["export", str(store), "--format", "pannuke", "--out", str(foreign), "--overwrite"]) == 2
    assert "--overwrite" not in _err(capsys) and (foreign / "a.npy").read_bytes() == b"x"
    out = tmp_path / "exp"
    assert main(["export", str(store), "--format", "pannuke", "--out", str(out)]) == 0
    assert output_kind(out) == "export-pannuke" and open_dataset(out).scheme.names == open_dataset(data["dataset"]).scheme.names
    capsys.readouterr()
    assert main(["export", str(store), "--format", "pannuke", "--out", str(out)]) == 2
    assert "pass --overwrite" in _err(capsys)
    assert main(["export", str(store), "--format", "hovernet", "--out", str(out), "--overwrite"]) == 2  # another kind
    assert "holds a PanNuke export, not a HoVer-Net export" in _err(capsys)
    assert main(["export", str(store), "--format", "pannuke", "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(store), "--format", "hovernet", "--out", str(tmp_path / "hv")]) == 0
    assert output_kind(tmp_path / "hv") == "export-hovernet"


def test_predict_never_replaces_ground_truth(data, tmp_path, capsys):
    from napari_diffmix.seg.checkpoint import save_seg_model
    from napari_diffmix.seg.model import HoVerNet, SegConfig

    scheme = open_dataset(data["dataset"]).scheme
    model = save_seg_model(HoVerNet(SegConfig(num_classes=scheme.num_classes, width=4, channel_mult=(1, 2), num_blocks=1)),
                           tmp_path / "seg", scheme)
    truth = tmp_path / "truth"
    write_generic(open_dataset(data["dataset"]), truth)
    (truth / MARKER).unlink()
    before = snapshot(truth)
    args = ["predict", str(model), str(truth), "--out", str(truth), "--overwrite", "--device", "cpu"]
    assert main(args) == 2
    assert "is the input" in _err(capsys) and snapshot(truth) == before
    other = tmp_path / "other-truth"  # a foreign folder that is not an input: refused even with --overwrite
    write_generic(open_dataset(data["dataset"]), other)
    (other / MARKER).unlink()
    kept = snapshot(other)
    assert main(["predict", str(model), str(truth), "--out", str(other), "--overwrite", "--device", "cpu"]) == 2
    assert "not a napari-diffmix output" in _err(capsys) and snapshot(other) == kept
    pred = tmp_path / "pred"
    assert main(["predict", str(model), str(truth), "--out", str(pred), "--device", "cpu"]) == 0
    assert main(["predict", str(model), str(truth), "--out", str(pred), "--device", "cpu", "--overwrite"]) == 0  # its own


def test_labels_refuses_inside_its_dataset_and_foreign_folders(data, tmp_path, capsys):
    train = data["dataset"]
    before = snapshot(train.parent)
    common = ["--patches", "2", "--patch-size", "32", "--stride", "32", "--overwrite"]
    assert main(["labels", str(train), "--out", str(train / "labels"), *common]) == 2
    assert "lies inside the input" in _err(capsys)
    assert main(["labels", str(train), "--out", str(train.parent), *common]) == 2
    assert "holds the input" in _err(capsys)
    assert snapshot(train.parent) == before
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("k")
    assert main(["labels", str(train), "--out", str(foreign), *common]) == 2
    assert "--overwrite" not in _err(capsys) and (foreign / "keep.txt").read_text() == "k"
    out = tmp_path / "labels"
    assert main(["labels", str(train), "--out", str(out), *common]) == 0
    assert main(["labels", str(train), "--out", str(out), *common]) == 0 and output_kind(out) == "labels"


def test_demo_data_and_demo_never_replace_foreign_folders(data, tmp_path, capsys):
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("k")
    assert main(["demo-data", "--out", str(foreign), "--overwrite"]) == 2
    assert "--overwrite" not in _err(capsys) and sorted(os.listdir(foreign)) == ["keep.txt"]
    # the demo's data folder holds a user's file: --overwrite must not delete it
    demo = tmp_path / "d"
    (demo / "data" / "train").mkdir(parents=True)
    (demo / "data" / "train" / "keep.txt").write_text("k")
    assert main(["demo", "--out", str(demo), "--model", str(data["model"]), "--overwrite", "--patch-size", "32",
                 "--stride", "32", "--patches", "2", "--steps", "2", "--device", "cpu"]) == 2
    assert "not a napari-diffmix output" in _err(capsys)
    assert (demo / "data" / "train" / "keep.txt").read_text() == "k"


def test_shared_helpers_on_their_own(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    refuse_overlap(tmp_path / "elsewhere", [src, None, "demo"])  # fine
    for out in (src, tmp_path, src / "x"):
        with pytest.raises(UnsafeOutputError, match="input"):
            refuse_overlap(out, [src])
    assert check_replace(tmp_path / "new", False, ["store"]) is False
    (tmp_path / "empty").mkdir()
    assert check_replace(tmp_path / "empty", False, ["store"]) is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeOutputError, match="is a file"):
        check_replace(tmp_path / "file", True, ["store"])


# -- item 3: non-finite weights and renders ----------------------------------------------------
def _poisoned(model_path: Path, name: str, value: float):
    from napari_diffmix.model.checkpoint import load_model

    model, info = load_model(model_path)
    with torch.no_grad():
        model.state_dict()[name].view(-1)[3] = value
    return model, info


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(data, tmp_path, value, capsys):
    from napari_diffmix.errors import CheckpointError
    from napari_diffmix.model.checkpoint import load_model, save_model

    name = "out.2.weight"
    model, info = _poisoned(data["model"], name, value)
    native = tmp_path / "bad.safetensors"
    save_model(model, native, scheme=info.scheme, default_guidance=2.0)
    official = tmp_path / "bad.pt"
    torch.save(model.state_dict(), official)  # a guided-diffusion style state dict
    for path, kwargs in ((native, {}), (official, {"preset": "tiny"})):
        with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds 1 non-finite value"):
            load_model(path, **kwargs)
    out = tmp_path / "s.zarr"
    assert main(["synthesize", str(data["dataset"]), "--model", str(native), "--out", str(out), *FAST]) == 2
    assert f"tensor '{name}' holds 1 non-finite" in _err(capsys) and not out.exists()


def test_a_render_that_turns_non_finite_stops_naming_the_step(data, tmp_path):
    from napari_diffmix.errors import RenderError
    from napari_diffmix.mixing import plan_balanced_set
    from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob

    model = _poisoned(data["model"], "out.2.weight", float("nan"))  # a loaded model skips the load check
    dataset = open_dataset(data["dataset"])
    plan = plan_balanced_set(dataset, patches=2, patch_size=32, stride=32, seed=0)
    out = tmp_path / "s.zarr"
    config = SynthesisConfig(steps=4, strength=0.5, batch_size=2, threads=1, device="cpu")
    with pytest.raises(RenderError, match=r"items 0..1: the sample became non-finite .* at denoising step 1 of 2"):
        SynthesisJob(dataset, plan, model, out, config).run()
    import zarr

    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["status"] != "complete" and not g["done"][:].any()


def test_every_renderer_stops_a_non_finite_sample_naming_the_step(data):
    """The check lives in the sampler: the Generate widget and `diffmix render` get it too."""
    from napari_diffmix.classes import load_scheme
    from napari_diffmix.errors import RenderError
    from napari_diffmix.model.condition import condition_batch
    from napari_diffmix.model.samplers import Sampler

    model, info = _poisoned(data["model"], "out.2.weight", float("inf"))
    tile = open_dataset(data["dataset"])[0]
    cond = condition_batch([tile.inst_map[:32, :32]], [tile.type_map[:32, :32]], load_scheme(info.scheme).num_classes)
    sampler = Sampler(model, precision="fp32")
    with pytest.raises(RenderError, match=r"non-finite \(NaN or Inf\) at denoising step 1 of 3"):
        for _ in sampler.sample(cond, steps=3, seed=0):
            pass


# -- item 6: a signal that leaves a store unfinished is not a success ----------------------------
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_synthesis_exits_128_plus_signal_with_the_store_stopped(data, tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    import zarr
    from _subprocess import process_group

    out = tmp_path / "s.zarr"
    argv = [sys.executable, "-m", "napari_diffmix", "synthesize", str(data["dataset"]), "--model", str(data["model"]),
            "--out", str(out), *FAST, "--patches", "12", "--batch-size", "1", "--steps", "8"]
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    with process_group(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "done" / "c").is_dir() and any((out / "done" / "c").iterdir()):
                proc.send_signal(getattr(signal, sig))
                break
            time.sleep(0.02)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), output
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["status"] == "stopped" and 1 <= int(g["done"][:].sum()) < 12, output
    assert f"stopped by {sig}" in output


def test_second_ctrl_c_aborts_with_the_store_stopped(data, tmp_path):
    import signal

    import zarr

    from napari_diffmix.mixing import plan_balanced_set
    from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob

    class DoubleCtrlC:
        total, n = None, 0

        def set_description(self, desc):
            pass

        def update(self, k):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    dataset = open_dataset(data["dataset"])
    plan = plan_balanced_set(dataset, patches=4, patch_size=32, stride=32, seed=0)
    out = tmp_path / "s.zarr"
    config = SynthesisConfig(steps=2, strength=0.5, batch_size=2, threads=1, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        SynthesisJob(dataset, plan, data["model"], out, config).run(pbar=DoubleCtrlC())
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "stopped"


# -- item 8: a full disk while saving a model gives the OutputError every other write gives -----
@contextlib.contextmanager
def file_size_limit(nbytes: int = 64 * 1024):
    """Writes past ``nbytes`` fail (EFBIG) as a full disk makes them fail: part-way through."""
    import resource
    import signal

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_torch_and_safetensors_writes_that_fail_part_way_are_output_errors(data, tmp_path, monkeypatch):
    import napari_diffmix.atomic as atomic
    from napari_diffmix.atomic import atomic_path
    from napari_diffmix.errors import OutputError
    from napari_diffmix.model.checkpoint import load_model, save_model
    from napari_diffmix.seg.checkpoint import save_seg_model
    from napari_diffmix.seg.model import HoVerNet, SegConfig

    model, info = load_model(data["model"])
    state = {"weights": torch.zeros(100_000)}
    seg = HoVerNet(SegConfig(num_classes=3, width=4, channel_mult=(1, 2), num_blocks=1))
    cases = {
        "ckpt.pt": lambda p: _torch_save(atomic_path, state, p),  # how train.py writes its checkpoints
        "model.safetensors": lambda p: save_model(model, p, scheme=info.scheme),
        "seg": lambda p: save_seg_model(seg, p, info.scheme, state={"opt": torch.zeros(100_000)}),
    }
    for name, write in cases.items():
        with pytest.raises(OutputError, match=rf"cannot write {tmp_path / name}: ") as caught:
            with file_size_limit():
                write(tmp_path / name)
        assert isinstance(caught.value, OSError) and not (tmp_path / name).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary left behind"
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 0)  # the disk really is full
    with pytest.raises(OutputError, match="No space left on device"), file_size_limit():
        _torch_save(atomic_path, state, tmp_path / "full.pt")


def _torch_save(atomic_path, obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -- item 9: a malicious checkpoint is refused in one line of our own ----------------------------
class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_refused_in_one_line_without_torch_advice(data, tmp_path, capsys):
    from napari_diffmix.errors import CheckpointError
    from napari_diffmix.model.checkpoint import load_tensors_only

    pwned = tmp_path / "pwned"
    evil = tmp_path / "step-0000100.pt"
    torch.save({"format": "napari-diffmix-train", "model": {"w": torch.zeros(2)}, "x": _Payload(pwned)}, evil)
    with pytest.raises(CheckpointError) as caught:
        load_tensors_only(evil, what="training checkpoint")
    message = str(caught.value)
    assert "\n" not in message and "weights_only" not in message and "found posix.system" in message, message
    assert not pwned.exists()
    # the official-model path through the CLI: one line on stderr, nothing ran
    assert main(["synthesize", str(data["dataset"]), "--model", str(evil), "--preset", "tiny",
                 "--out", str(tmp_path / "s.zarr"), *FAST]) == 2
    err = _err(capsys)
    assert "refused: the file contains pickled Python objects" in err and "weights_only" not in err
    assert not pwned.exists() and not (tmp_path / "s.zarr").exists()
    evil.write_bytes(evil.read_bytes()[:200])  # truncated: one line too
    with pytest.raises(CheckpointError, match="cannot read the training checkpoint") as caught:
        load_tensors_only(evil, what="training checkpoint")
    assert "\n" not in str(caught.value)


def test_training_resumes_refuse_malicious_state_in_one_line(data, tmp_path, capsys):
    from napari_diffmix.errors import CheckpointError
    from napari_diffmix.seg.checkpoint import TRAIN_STATE, load_seg_run
    from napari_diffmix.train import load_checkpoint

    pwned = tmp_path / "pwned"
    evil = tmp_path / "step-0000100.pt"
    torch.save({"format": "napari-diffmix-train/1", "x": _Payload(pwned)}, evil)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(evil)
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value) and not pwned.exists()
    # a segmentation model folder whose train_state.pt carries code
    model = tmp_path / "seg"
    assert main(["train-seg", "--data", str(data["dataset"]), "--out", str(model), "--preset", "tiny", "--steps", "1",
                 "--batch-size", "1", "--crop-size", "32", "--device", "cpu", "--threads", "1"]) == 0
    torch.save({"x": _Payload(pwned)}, model / TRAIN_STATE)
    with pytest.raises(CheckpointError) as caught:
        load_seg_run(model)
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value) and not pwned.exists()


@pytest.mark.parametrize("command", ["train-seg", "predict", "compare", "train"])
def test_trainers_and_predict_never_write_into_their_inputs(data, tmp_path, command, capsys):
    train = data["dataset"]
    before = snapshot(train.parent)
    inside = train / "out"
    argv = {
        "train-seg": ["train-seg", "--data", str(train), "--out", str(inside), "--steps", "1"],
        "predict": ["predict", str(tmp_path / "nomodel"), str(train), "--out", str(train)],
        "compare": ["compare", "--data", str(train), "--synthetic", str(tmp_path / "none.zarr"), "--test", str(train),
                    "--out", str(train.parent)],
        "train": ["train", str(train), "--preset", "tiny", "--steps", "1", "--out", str(inside)],
    }[command]
    assert main(argv) == 2
    err = _err(capsys)
    assert "write outside every input (nothing was written)" in err, err
    assert snapshot(train.parent) == before


def test_compare_overwrite_replaces_only_its_own_folder(data, finished_store, tmp_path, capsys):
    foreign = tmp_path / "results"
    (foreign / "baseline").mkdir(parents=True)
    (foreign / "baseline" / "notes.txt").write_text("mine")
    argv = ["compare", "--data", str(data["dataset"]), "--synthetic", str(finished_store), "--test", str(data["dataset"]),
            "--preset", "tiny", "--steps", "1", "--batch-size", "1", "--crop-size", "32", "--device", "cpu", "--threads", "1",
            "--window", "32", "--overlap", "8"]
    assert main([*argv, "--out", str(foreign), "--overwrite"]) == 2
    assert "is not a napari-diffmix output; nothing there is replaced" in _err(capsys)
    assert (foreign / "baseline" / "notes.txt").read_text() == "mine"
    # its own folder: refused without --overwrite, replaced with it
    ours = tmp_path / "cmp"
    assert main([*argv, "--out", str(ours)]) == 0
    assert output_kind(ours) == "compare"
    capsys.readouterr()
    assert main([*argv, "--out", str(ours)]) == 2
    assert "pass --overwrite to replace it" in _err(capsys)
    assert main([*argv, "--out", str(ours), "--overwrite"]) == 0


def test_a_second_training_run_on_one_folder_is_refused(data, tmp_path, capsys):
    from napari_diffmix.outputs import WriterLock

    run = tmp_path / "run"
    with WriterLock(run, what="training run"):
        assert main(["train", str(data["dataset"]), "--preset", "tiny", "--steps", "1", "--sample-every", "0",
                     "--threads", "1", "--out", str(run)]) == 2
        assert "another process is writing this training run" in _err(capsys)
    assert main(["train", str(data["dataset"]), "--preset", "tiny", "--steps", "1", "--sample-every", "0",
                 "--threads", "1", "--out", str(run)]) == 0


# -- item 10: scheme files and missed goals ------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("name: mine\nclasses: [a, b, c]\nrar: [a]\n", r"unknown key\(s\) 'rar' in a class scheme \(did you mean 'rare'\?\); known keys: name, classes, merge, rare"),
    ("name: mine\nclasses:\n  - {name: a, colour: red}\n  - b\n", r"unknown key\(s\) 'colour' in class entry 1 \(did you mean 'color'\?\); known keys: name, color"),
])
def test_scheme_file_with_unknown_keys_is_refused(tmp_path, text, message, capsys):
    from napari_diffmix.classes import load_scheme
    from napari_diffmix.errors import SchemeError

    path = tmp_path / "scheme.yaml"
    path.write_text(text)
    with pytest.raises(SchemeError, match=rf"^{path}: {message}$"):
        load_scheme(path)


@pytest.mark.parametrize("name, text, where", [
    ("s.yaml", "name: mine\nclasses: [a, b\nrare: [a]\n", ":3:5: "),
    ("s.json", '{"name": "mine",\n "classes": ["a" "b"]}', ":2:18: "),
])
def test_scheme_syntax_error_is_one_line_with_file_line_and_column(data, tmp_path, name, text, where, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert main(["stats", str(data["dataset"]), "--scheme", str(path)]) == 2
    err = _err(capsys)
    assert f"{path}{where}cannot parse class scheme file" in err, err


def test_labels_missing_its_target_share_exits_non_zero_naming_max_variants(data, tmp_path, capsys):
    out = tmp_path / "labels"
    args = ["labels", str(data["dataset"]), "--target-share", "33", "--max-variants", "1", "--patch-size", "32",
            "--stride", "32"]
    assert main(args + ["--dry-run"]) == 1
    assert main(args + ["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "goal NOT reached" in captured.out and "--max-variants, now 1" in captured.out
    assert "--target-share 33 NOT reached" in captured.err and len(open_dataset(out)) > 0  # written all the same
    assert main(["labels", str(data["dataset"]), "--target-share", "5", "--patch-size", "32", "--stride", "32",
                 "--dry-run"]) == 0


# -- item 2: one writer per store ----------------------------------------------------------------
def _start_synthesize(data, out, *extra):
    import subprocess
    import sys

    from _subprocess import process_group

    argv = [sys.executable, "-m", "napari_diffmix", "synthesize", str(data["dataset"]), "--model", str(data["model"]),
            "--out", str(out), *FAST, "--patches", "12", "--batch-size", "1", "--steps", "8", *extra]
    env = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return process_group(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_first_item(proc, out, timeout=240.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "done" / "c").is_dir() and any((out / "done" / "c").iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no item was written in time:\n{proc.stdout.read() if proc.poll() is not None else ''}")


def test_a_second_writer_is_refused_while_the_first_runs_and_a_killed_one_leaves_no_lock(data, tmp_path, capsys):
    import signal

    import zarr

    from napari_diffmix.errors import OutputLockedError
    from napari_diffmix.outputs import WriterLock

    out = tmp_path / "s.zarr"
    with _start_synthesize(data, out) as first:
        _wait_for_first_item(first, out)
        # the same store with other settings and --overwrite: what mixed 4- and 20-step items before
        argv = ["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(out), *FAST,
                "--patches", "12", "--batch-size", "1", "--steps", "4", "--overwrite"]
        assert main(argv) == 2
        err = _err(capsys)
        assert "another process is writing this store: host" in err and f"pid {first.pid}" in err, err
        output, _ = first.communicate(timeout=240)
        assert first.returncode == 0, output
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["status"] == "complete" and g["done"][:].all()
    steps = {json.loads(str(p))["steps"] for p in g["provenance"][:]}
    assert steps == {8} and g.attrs["settings"]["sampling"]["steps"] == 8
    assert not (tmp_path / ".s.zarr.lock").exists()  # released at the end

    killed = tmp_path / "k.zarr"
    with _start_synthesize(data, killed) as proc:
        _wait_for_first_item(proc, killed)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert (tmp_path / ".k.zarr.lock").exists()  # left behind by the killed run ...
    with WriterLock(killed):  # ... but not held: the kernel let go of it
        pass
    with WriterLock(killed), pytest.raises(OutputLockedError, match=rf"pid {os.getpid()}"):
        WriterLock(killed).acquire()


# -- item 5: diffmix verify, clear StoreErrors, resume re-renders damaged items -----------------
@pytest.fixture(scope="module")
def finished_store(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "ref.zarr"
    assert main(["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(out), *FAST]) == 0
    return out


def _damage(store: Path, how: str) -> str:
    """Damage a copy of a finished store as a disk or a careless user would; returns what verify must say."""
    if how == "deleted chunk":
        (store / "images" / "c" / "1" / "0" / "0" / "0").unlink()
        return "item 1: its images chunk is missing"
    if how == "flipped bytes":
        chunk = store / "inst_maps" / "c" / "2" / "0" / "0"
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
        return "item 2: its inst_maps chunk cannot be decoded"
    if how == "other settings":
        import zarr

        g = zarr.open_group(str(store), mode="r+")
        prov = json.loads(str(g["provenance"][3]))
        prov["steps"] = 20
        g["provenance"][3] = json.dumps(prov)
        return "item 3: rendered with steps 20, the store's settings say 2"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["deleted chunk", "flipped bytes", "other settings"])
def test_verify_finds_damaged_items_export_refuses_them_and_resume_renders_them_again(data, finished_store, tmp_path, how, capsys):
    import shutil

    import zarr

    store = tmp_path / "s.zarr"
    shutil.copytree(finished_store, store)
    assert main(["verify", str(store)]) == 0 and "every finished item verified" in capsys.readouterr().out
    expected = _damage(store, how)
    assert main(["verify", str(store)]) == 1
    assert expected in capsys.readouterr().out
    if how != "other settings":  # the reader and export: one clear line, never zeros or a zstd traceback
        assert main(["export", str(store), "--format", "pannuke", "--out", str(tmp_path / "exp")]) == 2
        err = _err(capsys)
        assert expected in err and "diffmix verify" in err and not (tmp_path / "exp").exists()
    argv = ["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(store), *FAST]
    assert main(argv) == 0
    assert "1 finished item(s) failed verification and are rendered again" in capsys.readouterr().out
    assert main(["verify", str(store)]) == 0
    a, b = zarr.open_group(str(finished_store), mode="r"), zarr.open_group(str(store), mode="r")
    for name in ("images", "inst_maps", "type_maps", "provenance", "done"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert b.attrs["status"] == "complete"


@pytest.mark.parametrize("how, expected", [
    ("garbage array metadata", "the store's array metadata cannot be read"),
    ("no done array", "missing array(s) ['done']"),
])
def test_a_store_that_cannot_be_opened_is_one_store_error(finished_store, tmp_path, how, expected, capsys):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(finished_store, store)
    if how == "no done array":
        shutil.rmtree(store / "done")
    else:
        (store / "images" / "zarr.json").write_text("{ not json")
    for argv in (["verify", str(store)], ["export", str(store), "--format", "hovernet", "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = _err(capsys)
        assert expected in err and "StoreError" not in err, err


# -- the crash suite: SIGKILL at random points, resume, compare -----------------------------------
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_store(data, tmp_path):
    """Three kills at seeded random moments of one store's life (including before the first item
    and during writes), each followed by the same command; the end result equals a run that was
    never interrupted, chunk for chunk."""
    import random
    import signal
    import time

    import zarr

    reference = tmp_path / "ref.zarr"
    start = time.perf_counter()
    with _start_synthesize(data, reference) as proc:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    # Kill moments in proportion to how long a whole run takes here (a faster renderer or CPU
    # must not move them all past the end).
    whole = time.perf_counter() - start
    out = tmp_path / "k.zarr"
    rng = random.Random(15)
    kills = 0
    for _ in range(3):
        with _start_synthesize(data, out) as proc:
            time.sleep(rng.uniform(0.1, 0.8) * whole)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=120)
    with _start_synthesize(data, out) as proc:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    assert kills >= 2  # the run is long enough that most kills land mid-run
    a, b = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("images", "inst_maps", "type_maps", "provenance", "done"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert b.attrs["status"] == "complete" and a.attrs["fingerprint"] == b.attrs["fingerprint"]
    assert not list(out.rglob("*.partial"))


# -- item 7: a synthesis that will not fit memory is refused up front ----------------------------
def _free(monkeypatch, nbytes):
    """The device's free memory as the sampler asks for it (samplers.free_bytes), set to ``nbytes``."""
    import napari_diffmix.model.samplers as samplers

    monkeypatch.setattr(samplers, "free_bytes", lambda device: nbytes)


def test_synthesis_that_will_not_fit_memory_is_refused_before_planning_with_the_numbers(data, tmp_path, monkeypatch, capsys):
    import napari_diffmix.mixing as mixing
    from napari_diffmix.model.unet import UNetConfig
    from napari_diffmix.render import estimate_synthesis_memory

    need8 = estimate_synthesis_memory(UNetConfig.preset("tiny"), 64, 8, "cpu", "fp32").needed
    need2 = estimate_synthesis_memory(UNetConfig.preset("tiny"), 64, 2, "cpu", "fp32").needed
    assert need2 < need8
    _free(monkeypatch, (need2 + need8) // 2)
    monkeypatch.setattr(mixing, "plan_balanced_set", lambda *a, **k: pytest.fail("planned a run that cannot fit"))
    out = tmp_path / "synthetic.zarr"
    argv = ["synthesize", str(data["dataset"]), "--model", str(data["model"]), "--out", str(out), *FAST,
            "--patch-size", "64", "--batch-size", "8", "--precision", "fp32"]
    assert main(argv) == 2  # was: ran, and on a real machine swapped or was killed part-way
    err = _err(capsys)
    assert "sampling 8 patches of 64 px at a time will not fit in memory on cpu: it needs about" in err, err
    assert "activations" in err and "are free; use --batch-size" in err and "or lower" in err, err
    k = int(err.split("use --batch-size ")[1].split()[0])
    assert 2 <= k < 8
    assert not out.exists() and not (tmp_path / ".synthetic.zarr.lock").exists()  # nothing written
    # The advice holds: the batch it names fits, one more does not.
    assert estimate_synthesis_memory(UNetConfig.preset("tiny"), 64, k, "cpu", "fp32").fits
    assert not estimate_synthesis_memory(UNetConfig.preset("tiny"), 64, k + 1, "cpu", "fp32").fits
    _free(monkeypatch, 1)
    assert main(argv) == 2
    assert "even one item does not fit: use a smaller --patch-size" in _err(capsys)


def test_demo_refuses_a_batch_that_will_not_fit_before_writing_its_data(data, tmp_path, monkeypatch, capsys):
    _free(monkeypatch, 2**20)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(data["model"]), "--patch-size", "32", "--stride", "32",
                 "--patches", "2", "--steps", "2", "--device", "cpu"]) == 2
    assert "will not fit in memory on cpu" in _err(capsys) and not out.exists()


def test_the_library_job_refuses_a_batch_that_will_not_fit_before_writing(data, tmp_path, monkeypatch):
    from napari_diffmix.errors import RenderError
    from napari_diffmix.mixing import plan_balanced_set
    from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob

    ds = open_dataset(data["dataset"])
    plan = plan_balanced_set(ds, patches=2, patch_size=32, stride=32, maps=["balance"], seed=0)
    out = tmp_path / "s.zarr"
    job = SynthesisJob(ds, plan, data["model"], out, SynthesisConfig(steps=2, strength=0.5, batch_size=2, device="cpu"))
    _free(monkeypatch, 2**20)
    with pytest.raises(RenderError, match=r"sampling 2 patches of 32 px at a time will not fit in memory on cpu: .* only 1\.0 MiB are free"):
        job.run()
    assert not out.exists()


def test_memory_estimate_parts_and_the_cache_budget(monkeypatch):
    from napari_diffmix.model.unet import SDMUNet, UNetConfig
    from napari_diffmix.render import estimate_synthesis_memory

    config = UNetConfig.preset("tiny")
    _free(monkeypatch, 2**40)
    e = estimate_synthesis_memory(config, 64, 4, "cpu", "fp32")
    model = SDMUNet(config)
    assert e.weights == 4 * model.num_parameters()
    assert e.spade_cond == sum(d["nbytes"] for d in model.spade_layout(64, 64, 4, 4))  # the model's own layout
    assert e.spade_null == e.spade_cond // 4  # one image's worth
    assert e.fits and e.cache_budget == 2**39  # plenty free: the sampler's own default, half of it
    half = estimate_synthesis_memory(config, 64, 4, "cpu", "bf16")
    assert half.spade_cond == e.spade_cond // 2 and half.weights == 6 * model.num_parameters()
    assert estimate_synthesis_memory(config, 64, 4, "cpu", "fp32", weights_on_device=True).weights == 0
    # Activations grow with the batch and the patch area.
    e8 = estimate_synthesis_memory(config, 64, 8, "cpu", "fp32")
    assert e8.activations == 2 * e.activations
    assert estimate_synthesis_memory(config, 128, 4, "cpu", "fp32").activations > 3 * e.activations
    # Little to spare: the cache gets what is left beside the rest, never more.
    _free(monkeypatch, e.needed + 1000)
    tight = estimate_synthesis_memory(config, 64, 4, "cpu", "fp32")
    assert tight.fits and tight.cache_budget == 1000
    _free(monkeypatch, None)  # a device that cannot say: nothing is refused
    unknown = estimate_synthesis_memory(config, 64, 4, "cpu", "fp32")
    assert unknown.fits and unknown.cache_budget is None
