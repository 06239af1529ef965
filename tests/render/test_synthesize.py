"""Batch synthesis into the zarr store: end to end, resume after SIGKILL / Ctrl-C / a full disk,
two torchrun ranks, bad input. A tiny random model at 32 px keeps every run to seconds."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from _phantom import phantom_and_tiny_model
from _subprocess import process_group, run_group

from napari_diffmix.classes import CONSEP
from napari_diffmix.datasets import Dataset, open_dataset
from napari_diffmix.errors import CheckpointError, DatasetError, SchemeError, StoreError, UnsafeOutputError
from napari_diffmix.store import open_store
from napari_diffmix.mixing import make_item, plan_balanced_set
from napari_diffmix.model.checkpoint import load_model, read_info, save_model
from napari_diffmix.runtime import resolve_precision
from napari_diffmix.model.unet import SDMUNet, UNetConfig
from napari_diffmix.nuclei import inst_types_from_maps, type_map_from
from napari_diffmix.synthesize import SynthesisConfig, SynthesisJob, check_model_fits, item_seed

ITEMS, SIZE = 8, 32
# The same run as CLI flags and as library arguments.
CLI = ["--patch-size", "32", "--stride", "32", "--patches", str(ITEMS), "--steps", "4", "--strength", "0.5",
       "--batch-size", "2", "--threads", "1", "--device", "cpu"]
CONFIG = SynthesisConfig(steps=4, strength=0.5, batch_size=2, threads=1, device="cpu")
ARRAYS = ("images", "inst_maps", "type_maps", "done", "provenance")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    model = root / "tiny.safetensors"
    _, data = phantom_and_tiny_model(root / "data", model)
    dataset = open_dataset(data)
    plan = plan_balanced_set(dataset, patches=ITEMS, patch_size=SIZE, stride=SIZE, seed=0)
    reference = root / "reference.zarr"
    result = SynthesisJob(dataset, plan, model, reference, CONFIG).run()
    return {"root": root, "data": data, "model": model, "dataset": dataset, "plan": plan, "ref": reference, "result": result}


def _same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert ga.attrs["class_counts"] == gb.attrs["class_counts"]
    assert ga.attrs["fingerprint"] == gb.attrs["fingerprint"] and gb.attrs["status"] == "complete"


CLI_ENV = {**os.environ, "DIFFMIX_QUIET": "1", "OMP_NUM_THREADS": "1"}
CLI_OUTPUT = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_end_to_end_store(setup):
    result, plan, ds = setup["result"], setup["plan"], setup["dataset"]
    assert result.complete and result.done == result.rendered == ITEMS and not result.stopped
    store = open_store(setup["ref"])
    g = store.group
    assert g["images"].shape == (ITEMS, SIZE, SIZE, 3) and g["images"].dtype == np.uint8
    assert g["inst_maps"].dtype == np.int32 and g["type_maps"].dtype == np.uint8
    assert store.done_mask().all()
    attrs = store.attrs
    assert attrs["scheme"] == ds.scheme.to_dict() and attrs["status"] == "complete" and attrs["items_done"] == ITEMS
    assert attrs["model"]["sha256"] == attrs["settings"]["model_sha256"] and attrs["model"]["config"]["image_size"] == 32
    assert attrs["software"]["napari_diffmix"] and attrs["originals"]["mode"] == "referenced"
    assert attrs["settings"]["sampling"] == {"sampler": "dpm++2m", "steps": 4, "guidance": 2.0, "init": "original",
                                             "strength": 0.5, "seed": 0, "cfg": "batched", "spacing": "log-snr"}
    counts = attrs["class_counts"]
    assert counts["before"] == plan.original_counts.tolist()
    assert np.all(np.array(counts["synthetic"]) >= np.array(counts["planned"]))
    assert counts["after"] == (np.array(counts["before"]) + counts["synthetic"]).tolist()
    assert np.array_equal(store.class_counts(), counts["synthetic"])
    for i in range(ITEMS):
        item = store.item(i)
        inst_map, type_map, label_prov = make_item(plan, ds, i)
        assert np.array_equal(item.inst_map, inst_map) and np.array_equal(item.type_map, type_map)
        assert np.array_equal(item.type_map, type_map_from(item.inst_map, inst_types_from_maps(item.inst_map, item.type_map)))
        assert np.unique(item.inst_map[item.inst_map > 0]).tolist() == list(range(1, item.inst_map.max() + 1))
        p = item.provenance
        assert p["index"] == i and p["tile_name"] == ds.names[p["tile"]] and p["origin"] == label_prov["origin"]
        assert p["maps"] == label_prov["maps"] and p["seed"] == item_seed(0, i)
        assert (p["sampler"], p["steps"], p["guidance"], p["init"]) == ("dpm++2m", 4, 2.0, "original")
        assert p["precision"] == resolve_precision("auto", "cpu")  # what "auto" chose here, recorded per item
        assert p["spacing"] == "log-snr"
    training = setup["ref"] / "training"
    assert (training / "TRAINING.md").is_file() and (training / "train.sh").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training files sit in a group: listing the store finds only zarr nodes
        assert sorted(store.group) == ["done", "images", "inst_maps", "provenance", "training", "type_maps"]
    t = result.timings
    assert t["sampling"] > 0 and t["total"] >= t["sampling"] + t["labels"]


def test_rerun_resumes_and_other_settings_are_refused(setup, tmp_path):
    ds, plan, model = setup["dataset"], setup["plan"], setup["model"]
    job = SynthesisJob(ds, plan, model, setup["ref"], CONFIG, overwrite=True)  # same settings: resumed, not replaced
    again = job.run()
    assert again.rendered == 0 and again.complete and f"{ITEMS} of {ITEMS} items already done" in job.message
    other = SynthesisConfig(steps=6, strength=0.5, batch_size=2, threads=1, device="cpu")
    with pytest.raises(StoreError, match=r"other settings \(sampling.steps: store has 4, this run 6\).*--overwrite"):
        SynthesisJob(ds, plan, model, setup["ref"], other).run()
    other_plan = plan_balanced_set(ds, patches=2, patch_size=SIZE, stride=SIZE, seed=1)
    with pytest.raises(StoreError, match="plan"):
        SynthesisJob(ds, other_plan, model, setup["ref"], CONFIG).run()
    with pytest.raises(StoreError, match="no store to resume"):
        SynthesisJob(ds, plan, model, tmp_path / "new.zarr", CONFIG, resume=True).run()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces stores only, never a folder that is not one
        with pytest.raises(UnsafeOutputError, match="not a napari-diffmix output"):
            SynthesisJob(ds, other_plan, model, tmp_path / "taken", CONFIG, overwrite=overwrite).run()
        assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_official_pt_checkpoint_with_a_preset(setup, tmp_path, capsys):
    from napari_diffmix.cli import main

    official = tmp_path / "ema_0.9999_000100.pt"
    torch.save(load_model(setup["model"])[0].state_dict(), official)  # what guided-diffusion writes: a bare state dict
    ds, plan = setup["dataset"], setup["plan"]
    with pytest.raises(CheckpointError, match="carries no model config: pass preset= / --preset"):
        SynthesisJob(ds, plan, official, tmp_path / "x.zarr", CONFIG)
    with pytest.raises(CheckpointError, match="carries its own config"):
        SynthesisJob(ds, plan, setup["model"], tmp_path / "x.zarr", CONFIG, preset="tiny")
    same_guidance = SynthesisConfig(steps=4, strength=0.5, batch_size=2, threads=1, device="cpu", guidance=2.0)
    out = tmp_path / "official.zarr"
    job = SynthesisJob(ds, plan, official, out, same_guidance, preset="tiny")
    assert job.info.format == "guided-diffusion" and job.info.extra == {"preset": "tiny"}
    assert job.run().complete
    store = open_store(out)
    assert store.attrs["model"]["format"] == "guided-diffusion" and store.attrs["model"]["source"] == str(official)
    # the same weights, guidance and seeds as the native model render the same images
    reference = open_store(setup["ref"])
    assert np.array_equal(store.group["images"][:], reference.group["images"][:])

    args = ["synthesize", str(setup["data"]), "--model", str(official), "--out", str(tmp_path / "cli.zarr"), *CLI, "--dry-run"]
    assert main(args) == 2
    assert "pass preset=" in capsys.readouterr().err
    assert main([*args, "--preset", "tiny"]) == 0
    assert f"model {official}" in capsys.readouterr().out


def test_model_scheme_mismatch_and_missing_images(setup, tmp_path):
    ds, plan = setup["dataset"], setup["plan"]
    consep_model = tmp_path / "consep.safetensors"
    save_model(SDMUNet(UNetConfig.preset("tiny", cond_channels=6)), consep_model, scheme=CONSEP)
    with pytest.raises(SchemeError, match=r"trained on scheme 'consep' with classes \['other', 'inflammatory'.*"
                                          r"dataset uses scheme 'demo'"):
        SynthesisJob(ds, plan, consep_model, tmp_path / "x.zarr", CONFIG)
    labels_only = Dataset([t.__class__(t.name, None, t.inst_map, t.type_map) for t in ds], ds.scheme)
    with pytest.raises(DatasetError, match="has no image.*--from-noise"):
        SynthesisJob(labels_only, plan, setup["model"], tmp_path / "y.zarr", CONFIG)


def test_model_fit_check_and_an_already_read_model_info(setup, tmp_path, monkeypatch):
    ds, plan, model = setup["dataset"], setup["plan"], setup["model"]
    info = read_info(model)
    check_model_fits(info, ds.scheme, SIZE)
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: the model halves the resolution 1 time, so patches "
                                              r"must be a multiple of 2 px; the patches are 33 px"):
        check_model_fits(info, ds.scheme, 33)
    with pytest.raises(SchemeError, match="trained on scheme 'demo'.*dataset uses scheme 'consep'"):
        check_model_fits(info, CONSEP, SIZE)

    import napari_diffmix.model.checkpoint as checkpoint

    def no_read(*args, **kwargs):
        raise AssertionError("the model file was read again")

    monkeypatch.setattr(checkpoint, "read_info", no_read)
    job = SynthesisJob(ds, plan, model, tmp_path / "x.zarr", CONFIG, model_info=info)
    assert job.info is info and job.settings()["model_sha256"] == info.sha256
    other = tmp_path / "other.safetensors"
    other.write_bytes(model.read_bytes())
    with pytest.raises(CheckpointError, match=r"model_info describes .*tiny.safetensors, not the model file .*other"):
        SynthesisJob(ds, plan, other, tmp_path / "y.zarr", CONFIG, model_info=info)
    with pytest.raises(CheckpointError, match="a loaded model carries its own"):
        SynthesisJob(ds, plan, (object(), info), tmp_path / "z.zarr", CONFIG, model_info=info)


def test_ctrl_c_finishes_the_batch_then_resume_is_identical(setup, tmp_path):
    class InterruptingBar:
        """A tqdm-like bar whose first update sends this process SIGINT, like Ctrl-C would."""

        total, n = None, 0

        def set_description(self, desc):
            pass

        def update(self, k):
            self.n += k
            if self.n == k:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "s.zarr"
    job = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG)
    stopped = job.run(pbar=InterruptingBar())
    assert stopped.stopped and not stopped.complete and stopped.done == 2
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "stopped"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert not (out / "training").exists()
    done = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    assert done.rendered == ITEMS - 2 and done.complete
    _same_store(setup["ref"], out)


def test_a_stop_inside_a_batch_lands_within_the_step_and_drops_that_batch(setup, tmp_path):
    """A stop request reaches the sampler: the batch being rendered is not finished (a batch of
    large patches ran for minutes after Ctrl-C) and not written; a resume renders it again."""
    out = tmp_path / "s.zarr"
    job = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG)
    steps_seen = []
    stop = {"now": False}
    for event in job.events(should_stop=lambda: stop["now"]):
        if event.kind == "preview":
            steps_seen.append((event.indices, event.step, event.steps))
            if event.indices == (2, 3) and event.step == 1:
                stop["now"] = True  # asked during the second batch's first step
    second = [(step, total) for idx, step, total in steps_seen if idx == (2, 3)]
    assert second and max(step for step, _ in second) < second[0][1]  # it did not run to the end
    assert open_store(out).done_mask().tolist() == [True, True] + [False] * (ITEMS - 2)
    assert zarr.open_group(str(out), mode="r").attrs["status"] == "stopped"
    SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    _same_store(setup["ref"], out)


def test_events_generator_cancel_and_preview(setup, tmp_path):
    from napari_diffmix.synthesize import RenderedBatch

    out = tmp_path / "s.zarr"
    job = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG)
    events = job.events()
    start = next(events)
    assert (start.kind, start.done, start.total, job.pending) == ("progress", 0, ITEMS, ITEMS)
    assert start.message == f"rendering {ITEMS} item(s) into {out}"
    kinds = []
    for ev in events:
        kinds.append(ev.kind)
        if ev.kind == "preview" and ev.indices == (2, 3):
            assert ev.preview.images().shape == (2, SIZE, SIZE, 3) and (ev.step, ev.steps) == (1, 2)
            events.close()  # cancel in the middle of the second batch
            break
        if ev.kind == "item":
            assert ev.indices == (0, 1) and ev.done == 2 and isinstance(ev.data, RenderedBatch)
            assert ev.data.images.shape == (2, SIZE, SIZE, 3)
            assert np.array_equal(ev.data.inst_maps[1], open_store(out).group["inst_maps"][1])
    assert kinds.count("item") == 1 and kinds.count("preview") == 2 + 1  # strength 0.5: 2 of the 4 steps
    assert open_store(out).done_mask().tolist() == [True, True] + [False] * (ITEMS - 2)
    SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    _same_store(setup["ref"], out)


def test_jobs_sharing_a_renderer_load_the_model_once(setup, tmp_path, monkeypatch):
    import napari_diffmix.model.checkpoint as checkpoint
    from napari_diffmix.render import Renderer

    loads = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **kw: loads.append(a[0]) or real(*a, **kw))
    renderer = Renderer()
    first = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], tmp_path / "a.zarr", CONFIG, renderer=renderer)
    first.run()
    second = SynthesisJob(setup["dataset"], setup["plan"], setup["model"], tmp_path / "b.zarr", CONFIG, renderer=renderer)
    second.run()
    assert loads == [setup["model"]] and second.model is first.model and second.sampler is first.sampler
    _same_store(setup["ref"], tmp_path / "b.zarr")  # the second job's items are those of a fresh run


def test_out_of_memory_mid_batch_is_one_clear_error_and_the_store_resumes(setup, tmp_path, monkeypatch):
    from napari_diffmix.errors import RenderError
    from napari_diffmix.model.samplers import Sampler

    out = tmp_path / "s.zarr"
    real = Sampler.sample
    calls = {"n": 0}

    def second_batch_runs_out(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield from real(self, *a, **kw)

    monkeypatch.setattr(Sampler, "sample", second_batch_runs_out)
    with pytest.raises(RenderError, match=r"out of memory on cpu rendering items 2..3 \(2 x 32 px\).*lower --batch-size"):
        SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    monkeypatch.setattr(Sampler, "sample", real)
    assert open_store(out).done_mask().tolist() == [True, True] + [False] * (ITEMS - 2)
    SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    _same_store(setup["ref"], out)


def test_disk_full_then_resume(setup, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    real_set = LocalStore.set
    writes = {"n": 0}

    async def filling_disk(self, key, value, *a, **kw):
        if "/c/" in key:
            writes["n"] += 1
            if writes["n"] > 13:  # the first batch and part of the second reach the disk
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *a, **kw)

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(LocalStore, "set", filling_disk)
    with pytest.raises(StoreError, match="writing items 2..3 failed: no space left on device"):
        SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    monkeypatch.setattr(LocalStore, "set", real_set)
    g = zarr.open_group(str(out), mode="r")
    assert g["done"][:].tolist() == [True, True] + [False] * (ITEMS - 2)
    assert g["images"][2].any()  # item 2 was partly written before the disk filled; it is redone
    SynthesisJob(setup["dataset"], setup["plan"], setup["model"], out, CONFIG).run()
    _same_store(setup["ref"], out)


def test_sigkill_mid_run_then_same_command_resumes_identically(setup, tmp_path):
    out = tmp_path / "killed.zarr"
    args = ["-m", "napari_diffmix", "synthesize", str(setup["data"]), "--model", str(setup["model"]), "--out", str(out), *CLI]
    with process_group([sys.executable, *args], env=CLI_ENV, **CLI_OUTPUT) as proc:
        deadline = time.monotonic() + 240
        done_dir = out / "done" / "c"
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.is_dir() and len(list(done_dir.iterdir())) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    n_done = int(open_store(out).done_mask().sum())
    assert 2 <= n_done < ITEMS
    again = run_group([sys.executable, *args], timeout=300, env=CLI_ENV, **CLI_OUTPUT)
    output = again.stdout
    assert again.returncode == 0, output
    assert f"{n_done} of {ITEMS} items already done" in output
    assert not list(out.rglob("*.partial"))
    _same_store(setup["ref"], out)


def test_torchrun_two_ranks_equal_one_process(setup, tmp_path):
    out = tmp_path / "ranks.zarr"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "napari_diffmix", "synthesize",
            str(setup["data"]), "--model", str(setup["model"]), "--out", str(out), *CLI]
    proc = run_group([sys.executable, *args], timeout=300, env=CLI_ENV, **CLI_OUTPUT)
    assert proc.returncode == 0, proc.stdout
    provs = [open_store(out).provenance(i) for i in range(ITEMS)]
    assert [p["index"] for p in provs] == list(range(ITEMS))
    _same_store(setup["ref"], out)
