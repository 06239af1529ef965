"""Downstream formats of a synthetic store, and the training commands it carries.

Downstream formats
------------------
``hovernet`` (:func:`export_hovernet`): HoVer-Net's training patch folders (github
vqdang/hover_net): one ``.npy`` per patch, (H, W, 5) int32 = RGB, instance map, type map,
the layout its ``extract_patches.py`` writes and ``dataloader/train_loader.py`` reads
(``data[..., :3]`` image, ``data[..., 3]`` instances, ``data[..., 4]`` types). ``train/``
holds the original and synthetic patches, ``valid/`` held-out patches when given, plus
``type_info.json`` (class names and colours in HoVer-Net's format).

``pannuke`` (:func:`export_pannuke`): stacked arrays ``images.npy`` (N, H, W, 3) uint8,
``masks.npy`` (N, H, W, C + 1) int32 in PanNuke's channel convention (channel c holds the
instance ids of class c + 1, the last channel is 1 on background), and ``inst_maps.npy`` /
``type_maps.npy`` with ``scheme.json`` so that :func:`napari_diffmix.datasets.open_dataset`
reads the export back with its classes.
"""


from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .atomic import atomic_dir, write_json, write_text
from .classes import ClassScheme
from .errors import DatasetError, SchemeError, StoreError
from .outputs import check_replace, refuse_overlap, write_marker
from .progress import progress_bar


from .store import (
    SyntheticStore,
    StoreItem,
    open_store,
    original_patches,
    os_reason,
    referenced_dataset,
    referenced_originals,
)

EXPORT_FORMATS = ("hovernet", "pannuke")
TRAINING_DIR, TRAINING_MD, TRAIN_SH = "training", "TRAINING.md", "train.sh"


# ---------------------------------------------------------------------------------------------
# downstream formats
# ---------------------------------------------------------------------------------------------
def _originals_for_export(store: SyntheticStore, mode: str) -> tuple[Iterator[StoreItem], int] | None:
    if mode not in ("auto", "include", "skip"):
        raise StoreError(f"originals must be auto, include or skip, got {mode!r}")
    if mode == "skip":
        return None
    included = store.originals
    if included is not None:
        done = included.done_mask()
        return included.items(), int(done.sum())
    ref = referenced_originals(store)
    if ref is None:
        if mode == "include":
            raise StoreError(f"{store.path}: the store neither includes nor references original patches")
        return None
    return ref, len((store.attrs.get("originals") or {}).get("patches", []))


def hovernet_patch(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """(H, W, 5) int32: RGB, instance ids, classes: HoVer-Net's training patch."""
    return np.concatenate([image.astype(np.int32), inst_map[..., None].astype(np.int32), type_map[..., None].astype(np.int32)], axis=-1)


def hovernet_type_info(scheme: ClassScheme) -> dict[str, Any]:
    """HoVer-Net's ``type_info.json``: class id -> [name, [r, g, b]] (0 = background)."""
    return {str(k): [scheme.class_name(k), list(scheme.color_rgb(k))] for k in range(scheme.num_classes + 1)}


def _check_out(out: Path, overwrite: bool, store: SyntheticStore, format: str, valid: Any = None) -> None:
    inputs = [store.path, referenced_dataset(store), valid if isinstance(valid, (str, os.PathLike)) else getattr(valid, "root", None)]
    refuse_overlap(out, inputs)
    check_replace(out, overwrite, [f"export-{format}"])


def _valid_items(valid: Any, scheme: ClassScheme, size: int, stride: int | None) -> tuple[Iterator[StoreItem], int]:
    from .datasets import open_dataset, patch_grid, tile_labels

    dataset = valid if hasattr(valid, "scheme") else open_dataset(valid, scheme)
    if list(dataset.scheme.names) != list(scheme.names):
        raise SchemeError(f"the validation data uses classes {list(dataset.scheme.names)}, the store {list(scheme.names)}")
    origins = []
    for t in range(len(dataset)):
        tile = tile_labels(dataset, t)
        h, w = tile.shape
        if min(h, w) < size:
            raise DatasetError(f"tile {tile.name!r} ({h}x{w}) is smaller than the {size} px patches", tile.source)
        origins += [(t, y, x) for y, x in patch_grid(h, w, size, stride or size, cover=True)]
    return original_patches(dataset, origins, size), len(origins)


def export_hovernet(
    store: str | os.PathLike | SyntheticStore,
    out: str | os.PathLike,
    *,
    originals: str = "auto",
    valid: Any = None,
    valid_stride: int | None = None,
    overwrite: bool = False,
    pbar: Any | None = None,
    min_fidelity: float | None = None,
) -> Path:
    """Write HoVer-Net training patches: ``out/train/*.npy`` (originals + finished synthetic
    items), ``out/valid/*.npy`` (patches of the ``valid`` dataset, if given), ``type_info.json``
    and ``provenance.jsonl`` (one line per training patch). Appears whole or not at all.

    ``originals``: "auto" (those the store includes or references), "include" (error if none)
    or "skip". ``valid``: a dataset (path or Dataset) cut into store-sized patches
    (``valid_stride`` px apart, default the patch size, last row/column flush with the edge).
    ``min_fidelity``: leave out the synthetic items whose fidelity (``diffmix score``) is lower.
    """
    store = store if isinstance(store, SyntheticStore) else open_store(store)
    out = Path(out)
    _check_out(out, overwrite, store, "hovernet", valid)
    scheme = store.scheme
    done, keep = _kept_items(store, min_fidelity)
    orig = _originals_for_export(store, originals)
    val = _valid_items(valid, scheme, store.patch_shape[0], valid_stride) if valid is not None else None
    total = int(done.sum()) + (orig[1] if orig else 0) + (val[1] if val else 0)
    try:
        with atomic_dir(out) as tmp, progress_bar(pbar, total, "export hovernet", unit="patch") as bar:
            (tmp / "train").mkdir()
            lines = []
            sources = [orig[0]] if orig else []
            for item in _chain(*sources, store.items(keep)):
                np.save(tmp / "train" / f"{item.name}.npy", hovernet_patch(item.image, item.inst_map, item.type_map))
                lines.append(json.dumps({"file": f"train/{item.name}.npy", **item.provenance}))
                bar.update(1)
            if val:
                (tmp / "valid").mkdir()
                for item in val[0]:
                    np.save(tmp / "valid" / f"{item.name}.npy", hovernet_patch(item.image, item.inst_map, item.type_map))
                    bar.update(1)
            write_json(tmp / "type_info.json", hovernet_type_info(scheme))
            write_text(tmp / "provenance.jsonl", "\n".join(lines) + "\n")
            write_marker(tmp, "export-hovernet", store=str(store.path), **_fidelity_note(store, keep, min_fidelity))
    except OSError as exc:
        raise StoreError(f"{out}: export failed: {os_reason(exc)}") from None
    return out


def _kept_items(store: SyntheticStore, min_fidelity: float | None) -> tuple[np.ndarray, Any]:
    """(mask of the synthetic items exported, their indices or None for all finished ones)."""
    if min_fidelity is None:
        return store.done_mask(), None
    from .fidelity_records import select_items

    keep = select_items(store, min_fidelity).indices
    mask = np.zeros(len(store), bool)
    mask[keep] = True
    return mask, keep


def _fidelity_note(store: SyntheticStore, keep: Any, min_fidelity: float | None) -> dict[str, Any]:
    # The export records which threshold made it, so a training run can say what it trained on.
    if min_fidelity is None:
        return {}
    return {"min_fidelity": float(min_fidelity), "synthetic_kept": int(len(keep)), "synthetic_finished": int(store.done_mask().sum())}


def _chain(*iterables: Iterator[StoreItem]) -> Iterator[StoreItem]:
    for it in iterables:
        yield from it


def pannuke_masks(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W, C + 1) int32 PanNuke masks: channel c = instance ids of class c + 1, last = background (1)."""
    channel = type_map.astype(np.int64) - 1  # background -> -1
    masks = np.zeros((*inst_map.shape, num_classes + 1), dtype=np.int32)
    fg = inst_map > 0
    ys, xs = np.nonzero(fg)
    masks[ys, xs, channel[fg]] = inst_map[fg]
    masks[..., num_classes] = ~fg
    return masks


def export_pannuke(
    store: str | os.PathLike | SyntheticStore,
    out: str | os.PathLike,
    *,
    originals: str = "auto",
    overwrite: bool = False,
    pbar: Any | None = None,
    min_fidelity: float | None = None,
) -> Path:
    """Write stacked arrays (originals first, then the finished synthetic items): ``images.npy``,
    ``masks.npy`` (PanNuke channels), ``inst_maps.npy``, ``type_maps.npy``, ``scheme.json`` and
    ``provenance.jsonl`` (row by row). Arrays are written through memory maps, so stores larger
    than memory export fine. Appears whole or not at all. ``min_fidelity``: as for :func:`export_hovernet`."""
    from numpy.lib.format import open_memmap

    store = store if isinstance(store, SyntheticStore) else open_store(store)
    out = Path(out)
    _check_out(out, overwrite, store, "pannuke")
    scheme = store.scheme
    c = scheme.num_classes
    h, w = store.patch_shape
    done, keep = _kept_items(store, min_fidelity)
    orig = _originals_for_export(store, originals)
    n = int(done.sum()) + (orig[1] if orig else 0)
    if n == 0:
        raise StoreError(f"{store.path}: no finished items to export; run the synthesis first")
    try:
        with atomic_dir(out) as tmp, progress_bar(pbar, n, "export pannuke", unit="patch") as bar:
            arrays = {
                "images": open_memmap(tmp / "images.npy", "w+", np.uint8, (n, h, w, 3)),
                "masks": open_memmap(tmp / "masks.npy", "w+", np.int32, (n, h, w, c + 1)),
                "inst_maps": open_memmap(tmp / "inst_maps.npy", "w+", np.int32, (n, h, w)),
                "type_maps": open_memmap(tmp / "type_maps.npy", "w+", np.uint8, (n, h, w)),
            }
            lines = []
            sources = [orig[0]] if orig else []
            row = 0
            for item in _chain(*sources, store.items(keep)):
                arrays["images"][row] = item.image
                arrays["masks"][row] = pannuke_masks(item.inst_map, item.type_map, c)
                arrays["inst_maps"][row] = item.inst_map
                arrays["type_maps"][row] = item.type_map
                lines.append(json.dumps({"row": row, **item.provenance}))
                row += 1
                bar.update(1)
            if row != n:
                raise StoreError(f"{store.path}: expected {n} patches but read {row}; the store changed during export")
            for a in arrays.values():
                a.flush()
            del arrays
            scheme.save(tmp / "scheme.json")
            write_text(tmp / "provenance.jsonl", "\n".join(lines) + "\n")
            write_marker(tmp, "export-pannuke", store=str(store.path), **_fidelity_note(store, keep, min_fidelity))
    except OSError as exc:
        raise StoreError(f"{out}: export failed: {os_reason(exc)}") from None
    return out


def export_store(store: str | os.PathLike | SyntheticStore, out: str | os.PathLike, format: str, **kwargs: Any) -> Path:
    """Export ``store`` to ``format`` (``hovernet`` or ``pannuke``); see the format functions."""
    if format not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    fn: Callable[..., Path] = export_hovernet if format == "hovernet" else export_pannuke
    return fn(store, out, **kwargs)


# ---------------------------------------------------------------------------------------------
# training commands carried by the store
# ---------------------------------------------------------------------------------------------
# HoVer-Net (github vqdang/hover_net) facts the generated instructions rely on: patches are
# listed from config.py's train_dir_list / valid_dir_list (glob "*.npy"); nr_type counts the
# background; "original" mode crops 270 px inputs (patches must be >= 270 px), "fast" mode 256 px;
# run_train.py takes --gpu=<comma separated ids>; the ImageNet-pretrained Preact-ResNet50 path is
# set in models/hovernet/opt.py ("pretrained").
HOVERNET_REPO = "https://github.com/vqdang/hover_net"


def hovernet_mode(patch_size: int) -> str | None:
    """HoVer-Net model mode whose input crop fits ``patch_size`` px patches (None: too small)."""
    if patch_size >= 270:
        return "original"
    if patch_size >= 256:
        return "fast"
    return None


def training_commands(
    store_name: str, *, data: str | None, scheme: ClassScheme, patch_size: int, originals: str, min_fidelity: float | None = None
) -> dict[str, list[list[str]]]:
    """The commands (argument lists) ``train.sh`` runs from the folder holding the store.

    ``data``: the original training dataset (referenced originals), or None. ``originals``:
    the store's originals mode ("included" / "referenced" / "none"). With included originals
    the store is exported as stacked arrays (originals + synthetic) and trained on as one
    dataset; otherwise ``train-seg`` reads the dataset (``--data``) and the store
    (``--synthetic``). ``min_fidelity``: the items of a scored store below it are left out.
    """
    base = store_name.rstrip("/")
    scheme_arg = scheme.name if scheme.name in ("consep", "glysac", "demo") else f"{base}/{TRAINING_DIR}/scheme.json"
    crop = ["--crop-size", str(patch_size)] if patch_size < 256 else []
    seg: list[list[str]] = []
    keep = [] if min_fidelity is None else ["--min-fidelity", f"{min_fidelity:g}"]
    if originals == "included":
        seg.append(["diffmix", "export", base, "--format", "pannuke", *keep, "--out", f"{base}-pannuke", "--overwrite"])
        seg.append(["diffmix", "train-seg", "--data", f"{base}-pannuke", "--scheme", scheme_arg, *crop,
                    "--out", f"{base}-seg", "--overwrite"])
    else:
        data_arg = ["--data", data] if data else []
        syn_keep = [] if min_fidelity is None else ["--synthetic-min-fidelity", f"{min_fidelity:g}"]
        seg.append(["diffmix", "train-seg", *data_arg, "--synthetic", base, *syn_keep, "--scheme", scheme_arg, *crop,
                    "--out", f"{base}-seg", "--overwrite"])
    hover = [["diffmix", "export", base, "--format", "hovernet", *keep, "--out", f"{base}-hovernet", "--overwrite"]]
    return {"train_seg": seg, "hovernet_export": hover}


def _q(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def write_training_files(
    path: str | os.PathLike,
    *,
    data: str | None,
    scheme: ClassScheme,
    patch_size: int,
    counts: Mapping[str, Sequence[int]],
    originals: str,
    items: int,
    fidelity: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``TRAINING.md``, ``train.sh`` and ``scheme.json`` into the store's ``training`` group
    (``items``: the store's number of synthetic patches). ``fidelity``: for a scored store, the
    threshold the commands apply and how many items it keeps (``metric``, ``threshold``, ``kept``,
    ``finished``; :meth:`napari_diffmix.fidelity.Selection.to_dict`)."""
    import zarr

    path = Path(path)
    folder = path / TRAINING_DIR
    zarr.open_group(str(folder), mode="a", zarr_format=3).attrs.update(
        {"description": "how to train on original + synthetic data", "files": [TRAINING_MD, TRAIN_SH, "scheme.json"]}
    )
    scheme.save(folder / "scheme.json")
    threshold = None if not fidelity else float(fidelity["threshold"])
    cmds = training_commands(path.name, data=data, scheme=scheme, patch_size=patch_size, originals=originals, min_fidelity=threshold)
    mode = hovernet_mode(patch_size)
    sh = _train_sh(cmds, mode, scheme.num_classes + 1, path.name)
    md = _training_md(cmds, mode, path.name, data, scheme, patch_size, counts, originals, items)
    if fidelity:
        note = _fidelity_text(fidelity)
        sh = sh.replace("set -euo pipefail\n", f"set -euo pipefail\n# {note}\n", 1)
        md = md.replace("\n\n`" + path.name + "/" + TRAINING_DIR + "/train.sh` runs", f"\n\n## Label fidelity\n\n{note}\n\n`{path.name}/{TRAINING_DIR}/train.sh` runs", 1)
    write_text(folder / TRAIN_SH, sh)
    write_text(folder / TRAINING_MD, md)
    os.chmod(folder / TRAIN_SH, 0o755)
    return folder / TRAINING_MD, folder / TRAIN_SH


def _fidelity_text(fidelity: Mapping[str, Any]) -> str:
    return (
        f"Label fidelity filter: synthetic items with {fidelity.get('metric', 'pq').upper()} >= {float(fidelity['threshold']):g} "
        f"(agreement of a segmentation model's prediction on the rendered image with its label map, 'diffmix score') "
        f"are used: {int(fidelity['kept'])} of {int(fidelity['finished'])} items kept, {int(fidelity['finished']) - int(fidelity['kept'])} left out."
    )


def hovernet_config_edits(nr_type: int, mode: str) -> list[tuple[str, str]]:
    """(regex in HoVer-Net's official config.py, replacement) pairs; ``TRAIN_DIR`` / ``VALID_DIR``
    stand for the quoted patch folders, filled in by ``train.sh``."""
    return [
        (r"nr_type = \d+", f"nr_type = {nr_type}"),
        (r'model_mode = "\w+"', f'model_mode = "{mode}"'),
        (r'"train_patches_path"', "TRAIN_DIR"),
        (r'"valid_patches_path"', "VALID_DIR"),
    ]


# The in-place edit of HoVer-Net's config.py that train.sh runs (argv: config, train dir, valid dir, edits JSON).
_CONFIG_EDIT = """import json, pathlib, re, sys
config = pathlib.Path(sys.argv[1])
text = config.read_text()
values = {"TRAIN_DIR": repr(sys.argv[2]), "VALID_DIR": repr(sys.argv[3])}
for pattern, new in json.loads(sys.argv[4]):
    new = values.get(new, new)
    text, n = re.subn(pattern, lambda m: new, text, count=1)
    if n != 1:
        sys.exit(f"{config}: cannot find {pattern!r}; edit config.py by hand (see TRAINING.md)")
config.write_text(text)
"""


def _train_sh(cmds: Mapping[str, list[list[str]]], mode: str | None, nr_type: int, store_name: str) -> str:
    seg = "\n".join(f"run {_q(c)}" for c in cmds["train_seg"])
    export = "\n".join(f"run {_q(c)}" for c in cmds["hovernet_export"])
    hovernet = ""
    if mode is not None:
        edits = shlex.quote(json.dumps(hovernet_config_edits(nr_type, mode)))
        hovernet = f"""
# 3. HoVer-Net's official training ({HOVERNET_REPO}) when HOVERNET_DIR points at a clone:
#    config.py is edited in place (nr_type = classes + background, model_mode, patch folders;
#    VALID_DIR = held-out patches, default the training folder), then run_train.py on GPU(s) $GPU.
if [ -n "${{HOVERNET_DIR:-}}" ]; then
  TRAIN_DIR="$(pwd)/{store_name}-hovernet/train"
  VALID_DIR="${{VALID_DIR:-$TRAIN_DIR}}"
  run python -c {shlex.quote(_CONFIG_EDIT)} "$HOVERNET_DIR/config.py" "$TRAIN_DIR" "$VALID_DIR" {edits}
  run sh -c 'cd "$HOVERNET_DIR" && exec python run_train.py --gpu="${{GPU:-0}}"'
fi
"""
    return f"""#!/usr/bin/env bash
# Train a nuclei segmentation + classification network on original + synthetic data.
# Written by napari-diffmix into the synthetic store {store_name}; see TRAINING.md next to it.
# Runs from the folder that holds the store. DRY_RUN=1 prints the commands without running them.
set -euo pipefail
cd "$(dirname "$0")/../.."

run() {{
  printf '+'; printf ' %q' "$@"; printf '\\n'
  if [ "${{DRY_RUN:-0}}" != 1 ]; then "$@"; fi
}}

# 1. This project's downstream network (HoVer-Net architecture) on original + synthetic patches.
#    With --data and --synthetic, --synthetic-share S sets the share of the training crops drawn
#    from the store (default: its share of the training pixels; TRAINING.md gives DiffMix's).
{seg}

# 2. HoVer-Net training patches (.npy, H x W x 5: RGB, instances, types).
{export}
{hovernet}"""


def _training_md(cmds, mode, store_name: str, data, scheme: ClassScheme, patch_size, counts, originals, n_items: int) -> str:
    hover_out = f"{store_name}-hovernet"
    before, after = counts.get("before"), counts.get("after")
    rows = []
    for k, name in enumerate(scheme.names, start=1):
        b = int(before[k]) if before is not None else 0
        a = int(after[k]) if after is not None else 0
        rows.append(f"| {name} | {b} | {_share(before, k)} | {a} | {_share(after, k)} |")
    table = "\n".join(rows)
    seg = "\n".join(_q(c) for c in cmds["train_seg"])
    export = "\n".join(_q(c) for c in cmds["hovernet_export"])
    if originals == "included":
        where = "The original patches are in the store (`originals/`) and are exported with the synthetic ones."
        mix = (
            "The exported set holds the original and the synthetic patches alike, so `train-seg` draws each patch "
            "equally often: DiffMix's recipe."
        )
    else:
        if originals == "referenced":
            where = f"The original patches come from the dataset `{data}` (`--data`)."
        else:
            where = "The store holds no original patches: add your original training data with `--data DATASET`."
        mix = (
            f"`train-seg` draws `--synthetic-share` of its crops from the {n_items} synthetic patches (default: their share "
            "of the training pixels) and the rest from `--data`. DiffMix's recipe puts the synthetic patches in "
            "HoVer-Net's list of training patches and draws every patch alike: for P original patches that is "
            f"`--synthetic-share` = {n_items} / ({n_items} + P) (CoNSeP's 27 training tiles cut on DiffMix's 10 x 10 "
            f"grid of 256 px patches give P = 2700: {n_items / (n_items + 2700):.3f}). Each run prints and logs the "
            "share it drew."
        )
    if mode is None:
        hover = (
            f"HoVer-Net's smallest network input is 256 px ('fast' mode); these {patch_size} px patches are too small "
            "for its official training code. Synthesize with `--patch-size 256` (or larger) to use it."
        )
    else:
        hover = f"""1. Clone the official code (`git clone {HOVERNET_REPO}`) and install its requirements.
2. Export the patches (`train/` = original + synthetic in HoVer-Net's `.npy` layout; add `--valid DATASET` for a
   `valid/` folder of held-out patches):

   ```
   {export}
   ```
3. Edit `config.py` in the HoVer-Net folder:
   - `nr_type = {scheme.num_classes + 1}` (the {scheme.num_classes} classes of scheme `{scheme.name}` plus background)
   - `model_mode = "{mode}"` ({patch_size} px patches; "original" mode crops 270 px inputs, "fast" mode 256 px)
   - `self.train_dir_list = ["<absolute path>/{hover_out}/train"]`
   - `self.valid_dir_list = ["<absolute path>/{hover_out}/valid"]` (held-out patches)
   - `self.log_dir`: where checkpoints go
   and the `"pretrained"` path (ImageNet Preact-ResNet50 weights) in `models/hovernet/opt.py`.
4. Train: `python run_train.py --gpu=0` (several GPUs: `--gpu=0,1`).

`train.sh` does steps 2-4 when `HOVERNET_DIR` points at the clone (`VALID_DIR`: held-out patches, `GPU`: the
GPU list). `type_info.json` in the export gives HoVer-Net's inference the class names and colours."""
    return f"""# Training on original + synthetic data

`{store_name}` holds DiffMix-synthesised patches ({patch_size} x {patch_size} px) of the class scheme
`{scheme.name}` ({', '.join(scheme.names)}). {where}
Nuclei per class (per patch, summed over patches):

| class | original | share | original + synthetic | share |
|---|---|---|---|---|
{table}

{mix}

`{store_name}/{TRAINING_DIR}/train.sh` runs the commands below from the folder that holds the store;
`DRY_RUN=1 bash {store_name}/{TRAINING_DIR}/train.sh` only prints them.

## This project's downstream network

```
{seg}
```

## HoVer-Net (official repository)

{hover}

## Other tools

`diffmix export {shlex.quote(store_name)} --format pannuke --out DIR` writes stacked arrays: `images.npy`,
PanNuke-style `masks.npy`, `inst_maps.npy`, `type_maps.npy` (readable with `diffmix stats DIR`).
"""


def _share(counts: Sequence[int] | None, k: int) -> str:
    if counts is None:
        return "-"
    total = sum(int(v) for v in list(counts)[1:])
    return f"{100.0 * int(counts[k]) / total:.1f} %" if total else "-"
