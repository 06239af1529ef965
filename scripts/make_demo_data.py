#!/usr/bin/env python
"""Regenerate the bundled demo labels (napari_diffmix/resources/demo/demo_labels.npz).

    python scripts/make_demo_data.py                 # rewrite the shipped file, print class counts
    python scripts/make_demo_data.py --check         # exit 1 if the shipped file differs from a fresh derivation
    python scripts/make_demo_data.py --preview p.png # also save the image with class-coloured contours

The derivation rules live in napari_diffmix.demo_data (module docstring).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def preview(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, path: Path, scale: int = 2) -> None:
    import imageio.v3 as iio

    from napari_diffmix.classes import DEMO
    from napari_diffmix.nuclei import instance_edges

    edges = instance_edges(inst_map) & (inst_map > 0)
    out = image.copy()
    out[edges] = DEMO.palette()[type_map[edges]]
    iio.imwrite(path, np.repeat(np.repeat(out, scale, axis=0), scale, axis=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    parser.add_argument("--preview", type=Path, help="save an overlay PNG (image + class-coloured contours) here")
    args = parser.parse_args(argv)

    from napari_diffmix import demo_data
    from napari_diffmix.classes import DEMO
    from napari_diffmix.nuclei import inst_types_from_maps

    image = demo_data.demo_image()
    if args.check:
        inst_map, type_map = demo_data.derive_demo_labels(image)
        shipped_inst, shipped_type = demo_data.load_demo_labels()
        same = np.array_equal(inst_map, shipped_inst) and np.array_equal(type_map, shipped_type)
        print("shipped demo labels match the derivation" if same else "shipped demo labels DIFFER from the derivation")
        if not same:
            return 1
    else:
        inst_map, type_map = demo_data.write_demo_labels(demo_data.DEMO_LABELS, image)
        size = demo_data.DEMO_LABELS.stat().st_size
        print(f"wrote {demo_data.DEMO_LABELS} ({size / 1024:.1f} KiB)")

    features = demo_data.demo_features(image, inst_map)
    types = inst_types_from_maps(inst_map, type_map)[1:]
    counts = np.bincount(types, minlength=DEMO.num_classes + 1)
    n = int(inst_map.max())
    print(f"{n} nuclei: " + ", ".join(f"{name} {counts[k]} ({100 * counts[k] / n:.1f} %)" for k, name in enumerate(DEMO.names, 1)))
    epi, stroma = features.ring_dab[types == demo_data.EPITHELIAL], features.ring_dab[types == demo_data.STROMAL]
    print(f"ring DAB: Otsu cut {features.dab_cut:.4f}; mean epithelial / stromal = {epi.mean() / stroma.mean():.2f}")
    if args.preview:
        preview(image, inst_map, type_map, args.preview)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
