"""``diffmix render``: render one label map into tissue with the Generate widget's engine.

  diffmix render nuclei.npz --out render.png                               # from noise
  diffmix render nuclei.npz --init tissue.png --strength 0.5 --out sd.png  # SDEdit
  diffmix render moved.npz --init render.png --edited-from nuclei.npz --out edit.png   # local edit
  diffmix render tile.mat --init tissue.png --mask mask.png --out edit.png             # local edit

LABELS: an ``.npz`` label map (``inst_map`` + ``type_map``, as napari's Save layers writes a
nuclei layer), a labelled ``.mat`` (CoNSeP/GLySAC convention; raw types merged by the model's
scheme), or ``demo`` (the bundled demo tile; ``--crop`` takes a window of any of them).
A local edit renders only the pixels of ``--mask`` (or of the nuclei that differ from
``--edited-from``, grown by 4 px) and keeps every other pixel of ``--init`` exactly; the
network runs only on windows around the edit. Ctrl-C stops within a step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LabelError
from ._common import PRECISIONS, SAMPLER_CHOICES, add_device_arguments

EDIT_MARGIN = 4  # px grown around edited nuclei, as in the Generate widget


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "render",
        help="render one label map into tissue (from noise, SDEdit from an image, or a local edit)",
        description=(
            "Render one label map into tissue with the Generate widget's engine: from noise, SDEdit from --init "
            "(--strength), or a local edit of --init (--mask, or --edited-from the label map --init shows) that keeps "
            "every pixel outside the edit exactly and runs the network only on windows around it. LABELS: an .npz "
            "(inst_map + type_map, as napari saves a nuclei layer), a labelled .mat (CoNSeP/GLySAC), or 'demo'. "
            "Ctrl-C stops within a step."
        ),
    )
    p.add_argument("labels", help="label map: .npz (inst_map + type_map), labelled .mat, or 'demo'")
    p.add_argument("--model", "-m", type=Path, help="diffusion model (.safetensors; default: the bundled demo model)")
    p.add_argument("--preset", help="architecture of an official guided-diffusion .pt checkpoint, e.g. diffmix-consep")
    p.add_argument("--out", "-o", required=True, type=Path, help="output PNG")
    p.add_argument("--crop", type=int, nargs=4, metavar=("Y", "X", "H", "W"), help="render this window of the label map")
    start = p.add_argument_group("starting image")
    start.add_argument("--init", type=Path, help="image to start from (PNG/TIFF/JPEG, the label map's size)")
    start.add_argument("--strength", type=float, help="SDEdit: noise --init to this share of the schedule and re-render it")
    edit = start.add_mutually_exclusive_group()
    edit.add_argument("--mask", type=Path, help="local edit: re-render where this mask (PNG/.npy, nonzero) is set")
    edit.add_argument("--edited-from", type=Path, metavar="OLD_LABELS",
                      help="local edit: re-render the nuclei that differ from this label map (the one --init shows)")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=SAMPLER_CHOICES,
                   help="solver (default: the model's: a distilled student's own, else dpm++2m)")
    s.add_argument("--steps", type=int, help="respaced steps of the whole schedule (default: the model's: a student's own, else 15)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--tile", type=int, help="render in overlapping tiles of this size (default: the whole canvas)")
    h = p.add_argument_group("hardware")
    add_device_arguments(h)
    h.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network precision (default auto: bf16 where the hardware has it, else fp32)")
    p.add_argument("--provenance", type=Path, help="also write the render's provenance as JSON here")
    p.set_defaults(func=run)


def _read_labels(spec: str, scheme) -> tuple:
    """(inst_map int32, type_map uint8) of an .npz, a .mat or 'demo'."""
    import numpy as np

    from ..datasets import read_consep_labels
    from ..errors import DatasetError

    if spec == "demo":
        from ..demo_data import load_demo_tile

        tile = load_demo_tile()
        return tile.inst_map, tile.type_map
    path = Path(spec)
    if not path.is_file():
        raise LabelError(f"{path}: no such label file")
    if path.suffix.lower() == ".mat":
        return read_consep_labels(path, scheme)
    if path.suffix.lower() != ".npz":
        raise LabelError(f"{path}: label maps are read from .npz, .mat or 'demo', not {path.suffix or 'a file without suffix'}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "inst_map" not in data.files:
                raise DatasetError(f"no 'inst_map' array (arrays in file: {sorted(data.files)})", path)
            inst_map = data["inst_map"].astype(np.int32)
            type_map = data["type_map"].astype(np.uint8) if "type_map" in data.files else None
    except DatasetError:
        raise
    except Exception as exc:  # a damaged zip/npy
        raise DatasetError(f"cannot read label file: {exc}", path) from None
    if type_map is None or inst_map.ndim != 2 or type_map.shape != inst_map.shape:
        raise LabelError(f"{path}: needs 2-D 'inst_map' and 'type_map' arrays of one size")
    return inst_map, type_map


def _read_mask(path: Path, shape: tuple[int, int]):
    import numpy as np

    if not path.is_file():
        raise LabelError(f"{path}: no such mask file")
    if path.suffix.lower() == ".npy":
        mask = np.load(path, allow_pickle=False)
    else:
        import imageio.v3 as iio

        mask = iio.imread(path)
        if mask.ndim == 3:
            mask = mask[..., :3].max(axis=-1)
    if mask.shape[:2] != tuple(shape) or mask.ndim != 2:
        raise LabelError(f"{path}: the mask is {mask.shape} but the label map is {tuple(shape)}")
    return mask != 0


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..atomic import save_png, write_json
    from ..datasets import read_image
    from ..model.checkpoint import bundled_model_path
    from ..nuclei import changed_mask
    from ..progress import StopRequests, progress_bar
    from ..render import Renderer, RenderJob, run_to_end

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path()
    if model is None:
        raise LabelError("the bundled demo model is not installed; pass --model")
    if (args.mask or args.edited_from or args.strength is not None) and args.init is None:
        raise LabelError("--strength, --mask and --edited-from start from an image: pass --init")
    if args.strength is not None and (args.mask or args.edited_from):
        raise LabelError("choose SDEdit (--strength) or a local edit (--mask / --edited-from), not both")
    if args.init is not None and args.strength is None and not (args.mask or args.edited_from):
        raise LabelError("--init needs --strength (SDEdit) or --mask / --edited-from (local edit)")

    renderer = Renderer()
    loaded = renderer.load(model, args.device, args.precision, args.preset)
    scheme = loaded.info.scheme
    inst_map, type_map = _read_labels(args.labels, scheme)

    def crop(a):
        if args.crop is None:
            return a
        y, x, h, w = args.crop
        if y < 0 or x < 0 or h < 1 or w < 1 or y + h > a.shape[0] or x + w > a.shape[1]:
            raise LabelError(f"--crop {y} {x} {h} {w} does not fit in the {a.shape[0]}x{a.shape[1]} label map")
        return a[y : y + h, x : x + w]

    inst_map, type_map = crop(inst_map), crop(type_map)
    scheme.check_classes(np.unique(type_map), source=str(args.labels))
    image = mask = None
    mode = "noise"
    if args.init is not None:
        image = read_image(args.init)
        if args.crop and image.shape[:2] != inst_map.shape:  # the whole image of the cropped labels
            image = crop(image)
        if image.shape[:2] != inst_map.shape:
            raise LabelError(f"--init is {image.shape[:2]} but the label map is {inst_map.shape}; they must match")
        mode = "sdedit" if args.strength is not None else "edited"
    if args.mask is not None:
        mask = _read_mask(args.mask, inst_map.shape)
    elif args.edited_from is not None:
        old_inst, old_type = _read_labels(str(args.edited_from), scheme)
        old_inst, old_type = crop(old_inst), crop(old_type)
        mask = changed_mask(old_inst, old_type, inst_map, type_map, EDIT_MARGIN)
    if mode == "edited" and not mask.any():
        raise LabelError("nothing to re-render: the mask is empty (no nucleus differs)" if args.edited_from else
                         "nothing to re-render: the mask is empty")

    job = RenderJob(
        inst_map=inst_map, type_map=type_map, scheme=scheme, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, seed=args.seed, mode=mode, strength=args.strength, image=image,
        image_name=str(args.init) if args.init else None, mask=mask, tile=args.tile, threads=args.threads,
        labels_name=str(args.labels),
    )
    with StopRequests(stopping="stopping within the current step") as stops:
        run_ = renderer.start(loaded, job, should_stop=stops.poll)
        with progress_bar(None, None, "rendering", unit="step") as bar:
            def on_step(record) -> None:
                bar.total = record.total
                if record.step:  # step 0 is the early preview, no step of the schedule
                    bar.update(1)

            result = run_to_end(run_.steps(), on_step)
    if result is None:
        raise KeyboardInterrupt
    save_png(args.out, result.image)
    if args.provenance:
        write_json(args.provenance, result.provenance)
    p = result.provenance
    where = f"{len(p['edit_windows'])} window(s) around {p['edited_pixels']} edited px" if p["edit_windows"] else "whole canvas"
    print(f"wrote {args.out} ({inst_map.shape[0]}x{inst_map.shape[1]}, {mode}, {where}) in {p['seconds']:.1f} s "
          f"on {p['device']} ({p['precision']}, {p['threads'] or '-'} thread(s))")
    return 0
