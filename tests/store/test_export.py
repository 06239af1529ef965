"""The synthetic store layout, its downstream formats and the training commands it carries.

Stores here are filled directly with phantom patches (no diffusion model), so these tests are
about the layout and the formats only; tests/render/test_synthesize.py renders real ones.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import zarr

from napari_diffmix.classes import DEMO
from napari_diffmix.cli import build_parser, main
from napari_diffmix.datasets import open_dataset, write_generic
from napari_diffmix.errors import StoreError, UnsafeOutputError
from napari_diffmix.export import (
    _CONFIG_EDIT,
    export_hovernet,
    export_pannuke,
    hovernet_config_edits,
    hovernet_patch,
    pannuke_masks,
    write_training_files,
)
from napari_diffmix.nuclei import inst_types_from_maps, type_map_from
from napari_diffmix.phantom import make_phantom_dataset
from napari_diffmix.store import create_store, open_store, original_patches, read_done, remove_partial_files, write_items

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    ds = make_phantom_dataset(2, 64, class_probs=[0.2, 0.4, 0.4], seed=3)
    return write_generic(ds, tmp_path_factory.mktemp("data") / "train")


def _fill(path, dataset, origins, *, finish=None, originals="referenced", data_dir=None):
    """A store whose 'synthetic' items are the original patches with inverted images."""
    items = list(original_patches(dataset, origins, SIZE))
    attrs = {
        "scheme": DEMO.to_dict(),
        "dataset": {"path": str(data_dir), "layout": "generic", "tiles": dataset.names},
        "originals": {"mode": originals, "patches": [list(o) for o in origins]},
    }
    create_store(path, count=len(items), shape=(SIZE, SIZE), attrs=attrs, originals=len(items) if originals == "included" else 0)
    group = zarr.open_group(str(path), mode="r+")
    for it in items[: finish if finish is not None else len(items)]:
        prov = {**it.provenance, "kind": "synthetic"}
        write_items(group, it.index, 255 - it.image[None], it.inst_map[None], it.type_map[None], [prov])
    if originals == "included":
        for it in items:
            write_items(group["originals"], it.index, it.image[None], it.inst_map[None], it.type_map[None], [it.provenance])
    return items


def _origins(dataset):
    return [(t, y, x) for t in range(len(dataset)) for y in (0, 32) for x in (0, 32)]


def test_store_layout_chunks_and_done(tmp_path, data_dir):
    ds = open_dataset(data_dir)
    items = _fill(tmp_path / "s.zarr", ds, _origins(ds), finish=5, data_dir=data_dir)
    store = open_store(tmp_path / "s.zarr")
    g = store.group
    assert g["images"].shape == (8, SIZE, SIZE, 3) and g["images"].dtype == np.uint8
    assert g["inst_maps"].dtype == np.int32 and g["type_maps"].dtype == np.uint8
    for name in ("images", "inst_maps", "type_maps", "done", "provenance"):
        assert g[name].chunks[0] == 1, name  # one item per chunk: ranks never share a chunk
    assert store.done_mask().tolist() == [True] * 5 + [False] * 3
    assert [it.index for it in store.items()] == [0, 1, 2, 3, 4]
    it = store.item(2)
    assert np.array_equal(it.image, 255 - items[2].image)
    assert np.array_equal(it.type_map, type_map_from(it.inst_map, inst_types_from_maps(it.inst_map, it.type_map)))
    assert it.provenance["origin"] == list(items[2].provenance["origin"]) and it.name == "synthetic_000002"
    assert store.attrs["format"] == "napari-diffmix-synthetic" and store.scheme == DEMO
    expected = sum(np.array([0] + list(items[i].provenance["nuclei"].values())) for i in range(5))
    assert np.array_equal(store.class_counts(), expected)


def test_torn_done_flag_counts_as_not_done(tmp_path, data_dir):
    ds = open_dataset(data_dir)
    _fill(tmp_path / "s.zarr", ds, _origins(ds)[:3], data_dir=data_dir)
    chunk = tmp_path / "s.zarr" / "done" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:3])  # a crash in the middle of a non-atomic write
    (tmp_path / "s.zarr" / "images" / "c" / "0.abc.partial").write_bytes(b"junk")
    assert read_done(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")).tolist() == [True, False, True]
    assert remove_partial_files(tmp_path / "s.zarr") == 1


def test_store_creation_refuses_existing_and_reports_disk_full(tmp_path, monkeypatch, data_dir):
    ds = open_dataset(data_dir)
    _fill(tmp_path / "s.zarr", ds, _origins(ds)[:2], data_dir=data_dir)
    with pytest.raises(StoreError, match="already exists"):
        create_store(tmp_path / "s.zarr", count=2, shape=(SIZE, SIZE), attrs={})
    import errno

    from zarr.storage import LocalStore

    async def full(self, key, value, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "set", full)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    with pytest.raises(StoreError, match="no space left on device.*run the same command again"):
        write_items(g, 0, np.zeros((1, SIZE, SIZE, 3), np.uint8), np.zeros((1, SIZE, SIZE), np.int32),
                    np.zeros((1, SIZE, SIZE), np.uint8), [{}])


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a zarr v3 store"):
        open_store(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(StoreError, match="missing array"):
        open_store(tmp_path / "other.zarr")


def test_hovernet_export_layout(tmp_path, data_dir):
    ds = open_dataset(data_dir)
    items = _fill(tmp_path / "s.zarr", ds, _origins(ds), finish=6, data_dir=data_dir)
    out = export_hovernet(tmp_path / "s.zarr", tmp_path / "hv", valid=data_dir, valid_stride=SIZE)
    train = sorted(p.name for p in (out / "train").glob("*.npy"))
    assert len(train) == 8 + 6  # referenced originals, re-read from the dataset, + finished synthetic items
    assert sum(n.startswith("synthetic_") for n in train) == 6
    patch = np.load(out / "train" / "synthetic_000003.npy")
    assert patch.shape == (SIZE, SIZE, 5) and patch.dtype == np.int32
    # HoVer-Net's loader: data[..., :3] image, data[..., 3] instances, data[..., 4] types
    assert np.array_equal(patch[..., :3].astype(np.uint8), 255 - items[3].image)
    assert np.array_equal(patch[..., 3], items[3].inst_map) and np.array_equal(patch[..., 4], items[3].type_map)
    assert np.array_equal(patch, hovernet_patch(255 - items[3].image, items[3].inst_map, items[3].type_map))
    name = items[5].provenance["tile_name"]
    y, x = items[5].provenance["origin"]
    orig = np.load(out / "train" / f"original_{name}_y{y}_x{x}.npy")
    assert np.array_equal(orig[..., :3], items[5].image)
    assert len(list((out / "valid").glob("*.npy"))) == 2 * 4  # 64 px tiles cut into 32 px patches
    info = json.loads((out / "type_info.json").read_text())
    assert info["0"][0] == "background" and info["1"] == ["other", list(DEMO.color_rgb(1))]
    assert len((out / "provenance.jsonl").read_text().splitlines()) == 14
    with pytest.raises(UnsafeOutputError, match="not empty"):
        export_hovernet(tmp_path / "s.zarr", tmp_path / "hv")
    skip = export_hovernet(tmp_path / "s.zarr", tmp_path / "hv2", originals="skip")
    assert len(list((skip / "train").glob("*.npy"))) == 6


def test_pannuke_export_reads_back(tmp_path, data_dir):
    ds = open_dataset(data_dir)
    items = _fill(tmp_path / "s.zarr", ds, _origins(ds), originals="included", data_dir=data_dir)
    out = export_pannuke(tmp_path / "s.zarr", tmp_path / "pn")
    back = open_dataset(out)
    assert len(back) == 16 and back.scheme == DEMO
    assert np.array_equal(back[0].image, items[0].image)  # included originals come first
    assert np.array_equal(back[8].image, 255 - items[0].image)
    masks = np.load(out / "masks.npy")
    assert masks.shape == (16, SIZE, SIZE, 4)
    # PanNuke channels: channel c holds the instances of class c + 1, the last channel is background
    for k in (0, 11):
        t = back[k]
        for c in range(3):
            assert np.array_equal(masks[k, ..., c], np.where(t.type_map == c + 1, t.inst_map, 0))
        assert np.array_equal(masks[k, ..., 3], (t.inst_map == 0).astype(np.int32))


def test_pannuke_masks_round_trip_through_the_reader(tmp_path):
    ds = make_phantom_dataset(2, SIZE, seed=5)
    t = ds[0]
    np.save(tmp_path / "images.npy", np.stack([t.image]))
    np.save(tmp_path / "masks.npy", np.stack([pannuke_masks(t.inst_map, t.type_map, 3)]))
    back = open_dataset(tmp_path, DEMO)[0]  # identity merge: raw class c + 1 = class
    assert np.array_equal(back.type_map, t.type_map) and np.array_equal(back.inst_map > 0, t.inst_map > 0)


def test_export_cli(tmp_path, data_dir, capsys):
    ds = open_dataset(data_dir)
    _fill(tmp_path / "s.zarr", ds, _origins(ds), finish=4, data_dir=data_dir)
    assert main(["export", str(tmp_path / "s.zarr"), "--format", "hovernet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 training patches" in out and "not complete (4 of 8 items)" in out
    assert (tmp_path / "s-hovernet" / "train").is_dir()
    assert main(["export", str(tmp_path / "s.zarr"), "--format", "pannuke", "--valid", str(data_dir)]) == 2
    assert "--valid applies to --format hovernet only" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing.zarr"), "--format", "pannuke"]) == 2


def _printed_commands(script, cwd, env):
    done = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # `printf %q` quoting is shell syntax: shlex reads it back into the argument lists.
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("originals", ["referenced", "included"])
def test_training_files_parse_and_dry_run(tmp_path, data_dir, originals):
    counts = {"before": [0, 5, 20, 15], "after": [0, 12, 25, 15]}
    store = tmp_path / "syn.zarr"
    store.mkdir()
    md, sh = write_training_files(store, data=str(data_dir), scheme=DEMO, patch_size=256, counts=counts, originals=originals, items=300)
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert os.access(sh, os.X_OK)
    env = {**os.environ, "DRY_RUN": "1", "HOVERNET_DIR": str(tmp_path / "hover_net")}
    cmds = _printed_commands(sh, tmp_path, env)
    ours = [c[1:] for c in cmds if c[0] == "diffmix"]
    assert [c[0] for c in ours] == (["export", "train-seg", "export"] if originals == "included" else ["train-seg", "export"])
    parser = build_parser()
    for argv in ours:
        args = parser.parse_args(argv)  # every generated command is valid for this CLI
        assert callable(args.func)
    seg = parser.parse_args(next(c for c in ours if c[0] == "train-seg"))
    if originals == "referenced":
        assert seg.data == str(data_dir) and seg.synthetic == "syn.zarr"
    else:
        assert seg.data == "syn.zarr-pannuke" and seg.synthetic is None
    assert any(c[:2] == ["sh", "-c"] and "run_train.py --gpu=" in c[2] for c in cmds)
    text = md.read_text()
    assert "nr_type = 4" in text and 'model_mode = "fast"' in text and "python run_train.py --gpu=0" in text
    assert "| other | 5 | 12.5 % | 12 | 23.1 % |" in text
    if originals == "referenced":  # what share of the crops the store gets, and DiffMix's
        assert "draws `--synthetic-share` of its crops from the 300 synthetic patches" in text
        assert "`--synthetic-share` = 300 / (300 + P)" in text and "P = 2700: 0.100" in text
    else:
        assert "draws each patch equally often: DiffMix's recipe" in text


def test_hovernet_config_edit(tmp_path):
    # The lines train.sh edits, as they stand in HoVer-Net's official config.py.
    config = tmp_path / "config.py"
    config.write_text(
        'class Config(object):\n    def __init__(self):\n        model_mode = "original"\n        nr_type = 5\n'
        '        self.train_dir_list = [\n            "train_patches_path"\n        ]\n'
        '        self.valid_dir_list = [\n            "valid_patches_path"\n        ]\n'
    )
    edits = json.dumps(hovernet_config_edits(4, "fast"))
    run = [sys.executable, "-c", _CONFIG_EDIT, str(config), "/data/hv/train", "/data/hv/valid", edits]
    assert subprocess.run(run, capture_output=True).returncode == 0
    text = config.read_text()
    assert 'model_mode = "fast"' in text and "nr_type = 4" in text
    assert "'/data/hv/train'" in text and "'/data/hv/valid'" in text
    compile(text, "config.py", "exec")
    failed = subprocess.run(run, capture_output=True, text=True)  # already edited: patterns are gone
    assert failed.returncode != 0 and "edit config.py by hand" in failed.stderr


def test_small_patches_skip_hovernet_and_shrink_crops(tmp_path):
    store = tmp_path / "small.zarr"
    store.mkdir()
    md, sh = write_training_files(store, data="d", scheme=DEMO, patch_size=64, counts={}, originals="referenced", items=4)
    text = sh.read_text()
    assert "run_train.py" not in text and "--crop-size 64" in text
    assert "too small for its official training code" in md.read_text()
