"""The rendering engine (napari_diffmix.render) and ``diffmix render``, with the tiny random model."""

import json

import numpy as np
import pytest

from napari_diffmix.errors import LabelError, SchemeError

CROP = (slice(200, 264), slice(160, 224))  # a 64 x 64 window of the demo tile


@pytest.fixture(scope="module")
def labels():
    """(inst_map, type_map) of a 64 px window of the demo tile."""
    from napari_diffmix.demo_data import load_demo_tile

    tile = load_demo_tile()
    return tile.inst_map[CROP].copy(), tile.type_map[CROP].copy()


def _job(labels, **kw):
    from napari_diffmix.classes import DEMO
    from napari_diffmix.render import RenderJob

    inst_map, type_map = labels
    kw.setdefault("steps", 3)
    kw.setdefault("threads", 1)
    return RenderJob(inst_map=inst_map, type_map=type_map, scheme=DEMO, **kw)


def _deleted_nucleus(labels):
    """The labels with their largest nucleus deleted, and that nucleus's id."""
    inst_map, type_map = labels
    ids, counts = np.unique(inst_map[inst_map > 0], return_counts=True)
    nid = int(ids[np.argmax(counts)])
    new_inst, new_type = inst_map.copy(), type_map.copy()
    new_type[new_inst == nid] = 0
    new_inst[new_inst == nid] = 0
    return (new_inst, new_type), nid


def test_renderer_caches_the_model_per_file_device_and_precision(tiny_model, labels):
    from napari_diffmix.render import Renderer, run_to_end

    renderer = Renderer()
    first = renderer.load(tiny_model, "cpu", "fp32")
    assert not first.reused
    result = run_to_end(renderer.start(first, _job(labels)).steps())
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    p = result.provenance
    assert p["mode"] == "noise" and p["precision"] == "fp32" and p["threads"] == 1 and p["edit_windows"] is None
    assert not p["reused_model"] and not p["reused_spade"]
    again = renderer.load(tiny_model, "cpu", "fp32")
    assert again.reused and again.runner is first.runner
    run = renderer.start(again, _job(labels, seed=1))
    assert run.reused_spade  # same label map: SPADE features of the last run
    assert run_to_end(run.steps()).provenance["reused_spade"]
    other = renderer.load(tiny_model, "cpu", "bf16")
    assert other.reused and other.runner is not first.runner and other.runner.model is first.runner.model


def test_local_edit_renders_windows_around_the_edit_and_keeps_the_rest(tiny_model, labels):
    from napari_diffmix.nuclei import changed_mask
    from napari_diffmix.render import Renderer, run_to_end

    renderer = Renderer()
    loaded = renderer.load(tiny_model, "cpu", "fp32")
    before = run_to_end(renderer.start(loaded, _job(labels)).steps()).image
    edited, _ = _deleted_nucleus(labels)
    mask = changed_mask(*labels, *edited, 4)
    shapes = []
    encode = loaded.runner._encode
    loaded.runner._encode = lambda x, t: shapes.append(tuple(x.shape[-2:])) or encode(x, t)
    try:
        result = run_to_end(renderer.start(loaded, _job(edited, mode="edited", image=before, mask=mask, seed=5)).steps())
    finally:
        loaded.runner._encode = encode
    assert np.array_equal(result.image[~mask], before[~mask])  # outside the edit: the old image, exactly
    assert np.abs(result.image[mask].astype(int) - before[mask]).max() > 0
    windows = result.provenance["edit_windows"]
    covered = np.zeros(mask.shape, bool)
    for y, x, h, w in windows:
        covered[y : y + h, x : x + w] = True
    assert covered[mask].all() and covered.sum() < mask.size
    # The network saw those windows only, never the whole canvas.
    assert set(shapes) == {(h, w) for _, _, h, w in windows} and (64, 64) not in shapes
    assert result.provenance["edited_pixels"] == int(mask.sum())


def test_stop_and_errors(tiny_model, labels, monkeypatch):
    from napari_diffmix.classes import CONSEP
    from napari_diffmix.model import samplers
    from napari_diffmix.render import Renderer, run_to_end

    renderer = Renderer()
    loaded = renderer.load(tiny_model, "cpu", "fp32")
    seen = []
    assert run_to_end(renderer.start(loaded, _job(labels), should_stop=lambda: len(seen) >= 1).steps(),
                      seen.append) is None
    assert len(seen) == 1  # stopped after the first step; no image
    job = _job(labels)
    job.scheme = CONSEP
    with pytest.raises(SchemeError, match="trained on classes"):
        renderer.start(loaded, job)
    with pytest.raises(LabelError, match="nothing to re-render"):
        renderer.start(loaded, _job(labels, mode="edited", image=np.zeros((64, 64, 3), np.uint8),
                                    mask=np.zeros((64, 64), bool)))
    monkeypatch.setattr(samplers, "free_bytes", lambda device: 100_000)
    with pytest.raises(LabelError, match="too large for memory"):
        renderer.start(loaded, _job(labels))


def test_cpu_threads_and_following_the_other_processes(tiny_model, labels, monkeypatch):
    import torch

    from napari_diffmix import render
    from napari_diffmix.render import Renderer, cpu_threads, run_to_end, threads_for

    assert cpu_threads(3) == 3 and cpu_threads(0) == 1
    # Passive OpenMP waiters (the package's default): every core, whatever the load.
    assert cpu_threads(passive=True, load=5.0, cores=4) == 4
    # Spinning waiters: one thread per core the other work leaves free, at least one.
    assert cpu_threads(passive=False, load=1.2, cores=4) == 3 and cpu_threads(passive=False, load=7.0, cores=2) == 1
    assert cpu_threads(passive=False, load=0.0, cores=2) == 2
    assert threads_for(0.3, cores=2) == 2 and threads_for(0.8, cores=2) == 1 and threads_for(3.0, cores=2) == 1

    # With spinning waiters a run starts with the free cores and follows the other processes'
    # load after every step.
    monkeypatch.setattr(render, "passive_waiting", lambda: False)
    seen = iter([0.0, 1.0, 1.0, 0.0])

    class FakeLoad:
        def cores(self):
            return next(seen, 0.0)

    monkeypatch.setattr(render, "OtherLoad", FakeLoad)
    monkeypatch.setattr(render.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(render.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    threads_during = []
    renderer = Renderer()
    loaded = renderer.load(tiny_model, "cpu", "fp32")
    job = _job(labels, steps=4)
    job.threads = None
    before = torch.get_num_threads()
    try:
        result = run_to_end(renderer.start(loaded, job).steps(), lambda r: threads_during.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert threads_during == [2, 1, 1, 2] and result.provenance["threads"] == [2, 1, 2]
    # Passive waiters: all cores throughout.
    monkeypatch.setattr(render, "passive_waiting", lambda: True)
    seen = iter([1.0, 1.0, 1.0, 1.0])
    threads_during.clear()
    try:
        result = run_to_end(renderer.start(loaded, job).steps(), lambda r: threads_during.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert threads_during == [2, 2, 2, 2] and result.provenance["threads"] == 2


def test_other_load_reads_the_kernel_counters():
    import sys
    import time

    from napari_diffmix.render import OtherLoad

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc counters are Linux's")
    probe = OtherLoad()
    time.sleep(0.1)
    cores = probe.cores()
    assert cores is not None and cores >= 0


def test_import_sets_passive_openmp_waiting_before_torch():
    import subprocess
    import sys

    code = "import napari_diffmix, os, sys; print(napari_diffmix.OMP_PASSIVE, os.environ.get('OMP_WAIT_POLICY'))"
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert env_out == ["True", "PASSIVE"]
    late = "import torch, napari_diffmix; print(napari_diffmix.OMP_PASSIVE)"  # too late to take effect
    assert subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ---- diffmix render ------------------------------------------------------------------------------

def _save_labels(path, inst_map, type_map):
    np.savez(path, inst_map=inst_map, type_map=type_map)
    return path


def test_cli_render_from_noise_and_local_edit(tiny_model, labels, tmp_path, capsys, monkeypatch):
    import imageio.v3 as iio

    from napari_diffmix.cli import main
    from napari_diffmix.nuclei import changed_mask

    monkeypatch.setenv("DIFFMIX_QUIET", "1")
    common = ["--model", str(tiny_model), "--steps", "3", "--precision", "fp32", "--device", "cpu", "--threads", "1"]
    old = _save_labels(tmp_path / "old.npz", *labels)
    assert main(["render", str(old), "--out", str(tmp_path / "a.png"), "--provenance", str(tmp_path / "a.json"), *common]) == 0
    first = iio.imread(tmp_path / "a.png")
    assert first.shape == (64, 64, 3)
    assert json.loads((tmp_path / "a.json").read_text())["mode"] == "noise"
    # Same seed, same image.
    assert main(["render", str(old), "--out", str(tmp_path / "b.png"), *common]) == 0
    assert np.array_equal(iio.imread(tmp_path / "b.png"), first)

    edited, _ = _deleted_nucleus(labels)
    new = _save_labels(tmp_path / "new.npz", *edited)
    assert main(["render", str(new), "--init", str(tmp_path / "a.png"), "--edited-from", str(old),
                 "--out", str(tmp_path / "edit.png"), "--provenance", str(tmp_path / "edit.json"), "--seed", "5", *common]) == 0
    out = iio.imread(tmp_path / "edit.png")
    mask = changed_mask(*labels, *edited, 4)
    assert np.array_equal(out[~mask], first[~mask]) and not np.array_equal(out[mask], first[mask])
    provenance = json.loads((tmp_path / "edit.json").read_text())
    assert provenance["mode"] == "edited" and provenance["edited_pixels"] == int(mask.sum()) and provenance["edit_windows"]
    assert "window(s) around" in capsys.readouterr().out

    # A mask file: only its pixels change.
    box = np.zeros((64, 64), np.uint8)
    box[40:52, 8:20] = 255
    iio.imwrite(tmp_path / "mask.png", box)
    assert main(["render", str(old), "--init", str(tmp_path / "a.png"), "--mask", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "m.png"), "--seed", "5", *common]) == 0
    masked = iio.imread(tmp_path / "m.png")
    assert np.array_equal(masked[box == 0], first[box == 0]) and not np.array_equal(masked[box > 0], first[box > 0])

    # SDEdit keeps the size and changes the image.
    assert main(["render", str(old), "--init", str(tmp_path / "a.png"), "--strength", "0.5",
                 "--out", str(tmp_path / "s.png"), *common]) == 0
    assert iio.imread(tmp_path / "s.png").shape == (64, 64, 3)


def test_cli_render_errors(tiny_model, labels, tmp_path, capsys):
    from napari_diffmix.cli import main

    old = _save_labels(tmp_path / "old.npz", *labels)
    common = ["--model", str(tiny_model), "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    assert main(["render", str(old), "--mask", str(tmp_path / "mask.png"), *common]) == 2
    assert "pass --init" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "missing.npz"), *common]) == 2
    assert "no such label file" in capsys.readouterr().err
    np.savez(tmp_path / "same.npz", inst_map=labels[0], type_map=labels[1])
    from imageio.v3 import imwrite

    imwrite(tmp_path / "init.png", np.zeros((64, 64, 3), np.uint8))
    assert main(["render", str(old), "--init", str(tmp_path / "init.png"), "--edited-from", str(tmp_path / "same.npz"),
                 *common]) == 2
    assert "nothing to re-render" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_early_preview_from_noise_on_a_large_canvas(tiny_model):
    from napari_diffmix.classes import DEMO
    from napari_diffmix.render import Renderer, RenderJob, run_to_end

    inst_map = np.zeros((160, 160), np.int32)  # over 128 px: an early look at 80 px
    inst_map[100:120, 60:80] = 1
    type_map = (inst_map > 0).astype(np.uint8)
    renderer = Renderer()
    loaded = renderer.load(tiny_model, "cpu", "fp32")
    job = RenderJob(inst_map=inst_map, type_map=type_map, scheme=DEMO, steps=2, threads=1)
    records = []
    result = run_to_end(renderer.start(loaded, job).steps(), records.append)
    # Step 0: the half-resolution look, full size; then the schedule's steps as usual.
    assert [r.step for r in records] == [0, 1, 2] and records[0].pred_x0.shape == (1, 3, 160, 160)
    assert records[0].images().shape == (1, 160, 160, 3) and result.image.shape == (160, 160, 3)
    # It leaves the run's SPADE cache alone: the next run of the same labels computes no SPADE.
    loaded = renderer.load(tiny_model, "cpu", "fp32")
    calls = []
    spade = loaded.runner.model.spade_params
    loaded.runner.model.spade_params = lambda *a, **k: calls.append(1) or spade(*a, **k)
    try:
        run = renderer.start(loaded, job)
        run_to_end(run.steps())
    finally:
        del loaded.runner.model.spade_params
    assert run.reused_spade and calls == []
    records.clear()
    job.early_preview = False
    run_to_end(renderer.start(loaded, job).steps(), records.append)
    assert [r.step for r in records] == [1, 2]


def test_cpu_renders_keep_freed_memory_in_the_heap_unless_told_not_to():
    """glibc's mallopt is applied once per process by the first CPU runner (render.Renderer);
    the environment variable turns it off."""
    import os
    import platform
    import subprocess
    import sys

    code = "from napari_diffmix.runtime import keep_freed_memory as k; first = k(); print(first, k() == first)"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DIFFMIX_KEEP_FREED_MEMORY": "0"}).stdout.split()
    assert off == ["False", "True"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on == ["True", "True"]
