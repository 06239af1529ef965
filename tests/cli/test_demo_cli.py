"""``diffmix demo`` (and ``diffmix synthesize`` from the command line) with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_diffmix.classes import CONSEP, DEMO
from napari_diffmix.cli import main
from napari_diffmix.errors import CheckpointError
from napari_diffmix.store import open_store

FAST = ["--patches", "4", "--patch-size", "64", "--stride", "64", "--steps", "4", "--batch-size", "2", "--threads", "1",
        "--device", "cpu"]


@pytest.fixture
def read_info_calls(monkeypatch):
    """The model files :func:`read_info` was asked for (it hashes the whole file: seconds for a 2.6 GB model)."""
    import napari_diffmix.model.checkpoint as checkpoint

    calls, read_info = [], checkpoint.read_info

    def spy(path, **kwargs):
        calls.append(path)
        return read_info(path, **kwargs)

    monkeypatch.setattr(checkpoint, "read_info", spy)
    return calls


def test_demo_end_to_end_then_rerun(tmp_path, tiny_model, capsys, monkeypatch, read_info_calls):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", str(tiny_model), *FAST]) == 0
    assert read_info_calls == [tiny_model]  # the CLI's early check hands its ModelInfo to the job
    out = capsys.readouterr().out
    root = tmp_path / "diffmix-demo"  # the default output folder, in the current folder
    store = open_store(root / "demo.zarr")
    assert store.attrs["status"] == "complete" and store.attrs["created_by"] == "demo" and len(store) == 4
    assert store.done_mask().all() and store.scheme == DEMO
    assert store.attrs["originals"]["mode"] == "referenced" and store.attrs["dataset"]["path"] == "data/train"
    assert store.attrs["settings"]["sampling"]["guidance"] == 2.0  # the model's default
    assert {tuple(store.provenance(i)["maps"]) for i in range(4)} == {("balance",), ("enlarge",)}
    from PIL import Image

    montage = np.asarray(Image.open(root / "demo-montage.png"))
    assert montage.shape == (4 * 64 + 3 * 4, 3 * 64 + 2 * 4, 3)
    first = store.item(0)
    assert np.array_equal(montage[:64, 2 * 68 :], first.image)  # third column: the rendered patch
    for phrase in ("class shares of nuclei, original -> original + synthetic:", "other ", "napari diffmix-demo/demo.zarr",
                   "diffmix-demo/demo-montage.png", "diffmix-demo/demo.zarr/training/train.sh"):
        assert phrase in out, phrase
    assert (root / "data" / "train" / "scheme.json").is_file() and (root / "data" / "held-out").is_dir()
    # train.sh's own downstream command points at the demo's data folder relative to diffmix-demo/
    assert "--data data/train --synthetic demo.zarr" in (root / "demo.zarr" / "training" / "train.sh").read_text()

    assert main(["demo", "--model", str(tiny_model), *FAST]) == 0  # same settings: resumed, nothing to render
    assert "4 of 4 items already done" in capsys.readouterr().out
    more = [*FAST]
    more[1] = "6"
    assert main(["demo", "--model", str(tiny_model), *more]) == 0  # other settings replace the demo's own store
    assert len(open_store(root / "demo.zarr")) == 6


def test_demo_refuses_foreign_store(tmp_path, tiny_model, capsys):
    out = tmp_path / "d"
    (out / "demo.zarr").mkdir(parents=True)
    zarr.open_group(str(out / "demo.zarr"), mode="w").attrs.update({"format": "napari-diffmix-synthetic", "created_by": "synthesize"})
    assert main(["demo", "--out", str(out), "--model", str(tiny_model), *FAST]) == 2
    assert "made with other settings" in capsys.readouterr().err


def test_bundled_model_lookup(tmp_path):
    from napari_diffmix.model.checkpoint import bundled_model_path, require_bundled_model

    assert bundled_model_path(tmp_path) is None and bundled_model_path(tmp_path / "absent") is None
    with pytest.raises(CheckpointError, match="bundled demo model is not installed.*train one with "
                                              "scripts/train_demo_model.py or pass --model"):
        require_bundled_model(folder=tmp_path)
    (tmp_path / ".demo.safetensors.x1.tmp.safetensors").write_bytes(b"")  # a model being written
    (tmp_path / "demo.safetensors").write_bytes(b"")
    assert bundled_model_path(tmp_path) == require_bundled_model(folder=tmp_path) == tmp_path / "demo.safetensors"
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="ambiguous"):
        bundled_model_path(tmp_path)


def test_commands_without_model_use_the_bundled_one(tmp_path, tiny_model, capsys, monkeypatch):
    import napari_diffmix.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL_DIR", tmp_path / "none")
    assert main(["demo", "--out", str(tmp_path / "d"), *FAST]) == 2
    assert main(["synthesize", "demo", "--out", str(tmp_path / "s.zarr"), "--dry-run", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("the bundled demo model is not installed") == 2 and "or pass --model" in err
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "demo.safetensors").write_bytes(tiny_model.read_bytes())
    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL_DIR", bundled)
    assert main(["synthesize", "demo", "--out", str(tmp_path / "s.zarr"), "--dry-run", *FAST]) == 0
    assert f"model {bundled / 'demo.safetensors'}" in capsys.readouterr().out


def test_synthesize_cli_dry_run_and_errors(tmp_path, tiny_model, capsys, read_info_calls):
    args = ["synthesize", "demo", "--model", str(tiny_model), "--out", str(tmp_path / "s.zarr"), *FAST]
    assert main([*args, "--dry-run"]) == 0
    assert read_info_calls == [tiny_model]
    out = capsys.readouterr().out
    assert "synthetic patches by maps: 2 balance, 2 enlarge" in out and "guidance 2" in out
    assert "originals: include" in out  # the bundled demo is not a folder on disk: originals go into the store
    assert not (tmp_path / "s.zarr").exists()
    assert main([*args, "--dry-run", "--scheme", "consep"]) == 2
    assert "demo dataset uses the 'demo' scheme" in capsys.readouterr().err
    assert main([*args, "--dry-run", "--reference-originals"]) == 2
    assert "only be referenced for a dataset folder on disk" in capsys.readouterr().err
    assert main([*args[:-2], "--dry-run", "--steps", "1"]) == 2  # strength 0.55 of 1 step leaves nothing to run
    assert "leaves no denoising step" in capsys.readouterr().err


def test_synthesize_cli_takes_a_plan_from_diffmix_labels(tmp_path, tiny_model, capsys):
    labels = tmp_path / "labels"
    assert main(["labels", "demo", "--out", str(labels), "--patches", "2", "--patch-size", "64", "--stride", "64"]) == 0
    capsys.readouterr()
    args = ["synthesize", "demo", "--model", str(tiny_model), "--out", str(tmp_path / "s.zarr"), "--plan", str(labels / "plan.json")]
    assert main([*args, "--dry-run"]) == 0
    assert "synthetic patches by maps: 1 balance, 1 enlarge" in capsys.readouterr().out
    assert main([*args, "--dry-run", "--patches", "5"]) == 2
    assert "--plan gives the label plan; drop --patches" in capsys.readouterr().err



BAD_SETTINGS = [
    (["--steps", "0"], "steps must be a positive integer, got 0"),
    (["--strength", "2"], "strength must be in (0, 1], got 2.0"),
    (["--guidance", "-1"], "guidance must be a finite number >= 0, got -1.0"),
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--device", "nonsense"], "device 'nonsense' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["--model", "{tmp}/absent.safetensors"], "absent.safetensors: no such model file"),
    (["--model", "{tmp}/junk.safetensors"], "junk.safetensors: neither a napari-diffmix model (.safetensors) nor"),
    (["--model", "{tmp}/truncated.safetensors"], "truncated.safetensors: cannot read the safetensors file"),
]


@pytest.fixture
def no_dataset_work(monkeypatch):
    """Opening, writing or planning a dataset fails the test: bad settings must be refused before any of it."""
    import napari_diffmix.datasets as datasets
    import napari_diffmix.mixing as mixing

    def reached(*args, **kwargs):
        raise AssertionError("a bad setting reached the dataset or the planner")

    for module, name in ((datasets, "open_dataset"), (datasets, "write_generic"), (mixing, "plan_balanced_set")):
        monkeypatch.setattr(module, name, reached)


@pytest.mark.parametrize("command", ["synthesize", "demo"])
@pytest.mark.parametrize("bad,message", BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_settings_fail_before_the_dataset_is_read_or_anything_written(
    command, bad, message, tmp_path, tiny_model, capsys, no_dataset_work
):
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    (tmp_path / "truncated.safetensors").write_bytes(tiny_model.read_bytes()[:100_000])
    out = tmp_path / "out"
    head = ["synthesize", "demo"] if command == "synthesize" else ["demo"]
    argv = [*head, "--out", str(out), "--model", str(tiny_model), *FAST, *(a.format(tmp=tmp_path) for a in bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffmix {command}: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_settings_leave_an_existing_demo_folder_untouched(tmp_path, tiny_model, capsys, no_dataset_work):
    out = tmp_path / "d"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["demo", "--out", str(out), "--model", str(tiny_model), *FAST, "--strength", "0", "--overwrite"]) == 2
    assert "strength must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and (out / "data" / "notes.txt").read_text() == "mine"


@pytest.fixture
def no_planning(monkeypatch):
    """Planning (or writing the demo's data) fails the test: a model that does not fit must be refused first."""
    import napari_diffmix.datasets as datasets
    import napari_diffmix.mixing as mixing

    def reached(*args, **kwargs):
        raise AssertionError("a model that does not fit reached the planner")

    for module, name in ((datasets, "write_generic"), (mixing, "plan_balanced_set")):
        monkeypatch.setattr(module, name, reached)


@pytest.fixture(scope="module")
def consep_model(tmp_path_factory):
    from napari_diffmix.model.checkpoint import save_model
    from napari_diffmix.model.unet import SDMUNet, UNetConfig

    path = tmp_path_factory.mktemp("consep") / "consep.safetensors"
    save_model(SDMUNet(UNetConfig.preset("tiny", cond_channels=6)), path, scheme=CONSEP)
    return path


MISFITS = [
    ("consep", [], "trained on scheme 'consep' with classes ['other', 'inflammatory', 'epithelial', 'spindle'], "
                   "but the dataset uses scheme 'demo'"),
    ("tiny", ["--patch-size", "63"], "the model halves the resolution 1 time, so patches must be a multiple of 2 px; "
                                     "the patches are 63 px"),
]


@pytest.mark.parametrize("command", ["synthesize", "demo"])
@pytest.mark.parametrize("model,extra,message", MISFITS, ids=["scheme", "patch-size"])
def test_a_model_that_does_not_fit_fails_before_planning(
    command, model, extra, message, tmp_path, tiny_model, consep_model, capsys, no_planning
):
    path = {"consep": consep_model, "tiny": tiny_model}[model]
    out = tmp_path / "out"
    head = ["synthesize", "demo"] if command == "synthesize" else ["demo"]
    assert main([*head, "--out", str(out), "--model", str(path), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffmix {command}: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
