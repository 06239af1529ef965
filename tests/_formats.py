"""Small files in other tools' own conventions (HoVer-Net run_infer, Lizard, CoNIC, QuPath), written
by the format tests (tests/data/test_formats.py) and the napari reader tests."""

import json

import imageio.v3 as iio
import numpy as np
from scipy.io import savemat

from napari_diffmix import datasets as ds

H, W = 60, 80

# (row0, col0, height, width): wide and tall boxes off the diagonal, so swapping x and y shows.
BOXES = [(4, 10, 6, 14), (20, 50, 12, 5), (40, 5, 8, 9), (45, 60, 5, 16)]


def box_map(boxes=BOXES, ids=None, shape=(H, W)):
    inst = np.zeros(shape, np.int32)
    for k, (r, c, h, w) in enumerate(boxes):
        inst[r : r + h, c : c + w] = k + 1 if ids is None else ids[k]
    return inst


def cv2_contour(r, c, h, w):
    """The outline OpenCV's findContours (CHAIN_APPROX_SIMPLE) gives a filled box: its corner pixels, x first."""
    return [[c, r], [c, r + h - 1], [c + w - 1, r + h - 1], [c + w - 1, r]]


def hovernet_output(out, stem="test_1", types=(1, 2, 3, 4), with_overlay=True):
    """What HoVer-Net's infer/tile.py writes for one tile: mat/, json/, overlay/ (no type_map, no image).

    A fifth, tiny instance sits in inst_map but not in the lists (HoVer-Net drops instances whose
    contour has fewer than 3 points).
    """
    inst = box_map()
    inst[0:1, 0:2] = 5
    uid = np.arange(1, len(BOXES) + 1)
    centroid_xy = np.array([[c + (w - 1) / 2, r + (h - 1) / 2] for r, c, h, w in BOXES])
    (out / "mat").mkdir(parents=True)
    savemat(
        out / "mat" / f"{stem}.mat",
        {
            "inst_map": inst,  # int32
            "inst_uid": uid[:, None],
            "inst_type": np.asarray(types)[:, None],
            "inst_centroid": centroid_xy,
        },
    )
    nuc = {}
    for k, (r, c, h, w) in enumerate(BOXES, start=1):
        nuc[str(k)] = {
            "bbox": [[r, c], [r + h, c + w]],
            "centroid": centroid_xy[k - 1].tolist(),
            "contour": cv2_contour(r, c, h, w),
            "type_prob": 0.9,
            "type": int(types[k - 1]),
        }
    (out / "json").mkdir()
    (out / "json" / f"{stem}.json").write_text(json.dumps({"mag": None, "nuc": nuc}))
    if with_overlay:
        (out / "overlay").mkdir()
        iio.imwrite(out / "overlay" / f"{stem}.png", np.zeros((H, W, 3), np.uint8))
    return inst


def consep_truth(root, stem="test_1", raw=(1, 2, 4, 6)):
    """CoNSeP ground truth of the same boxes, raw types (4 -> epithelial 3, 6 -> spindle 4)."""
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    inst = box_map()
    raw = np.asarray(raw)
    savemat(
        root / "Labels" / f"{stem}.mat",
        {
            "inst_map": inst.astype(float),
            "type_map": np.r_[0, raw][inst].astype(float),
            "inst_type": raw[:, None].astype(float),
            "inst_centroid": np.zeros((len(raw), 2)),
        },
    )
    iio.imwrite(root / "Images" / f"{stem}.png", np.full((H, W, 3), 200, np.uint8))


def lizard_mat(path, ids, classes, boxes=BOXES):
    """A Lizard label file: inst_map plus per-nucleus id, class, bbox (y1, y2, x1, x2), centroid (x, y)."""
    inst = box_map(boxes, ids)
    order = np.argsort(-np.asarray(ids))  # Lizard's lists need not follow the ids' order
    ids, classes = np.asarray(ids)[order], np.asarray(classes)[order]
    bx = np.asarray(boxes)[order]
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(
        path,
        {
            "inst_map": inst,
            "id": ids[:, None].astype(np.int32),
            "class": classes[:, None].astype(np.int32),
            "bbox": np.stack([bx[:, 0], bx[:, 0] + bx[:, 2], bx[:, 1], bx[:, 1] + bx[:, 3]], axis=1),
            "centroid": np.stack([bx[:, 1] + (bx[:, 3] - 1) / 2, bx[:, 0] + (bx[:, 2] - 1) / 2], axis=1),
        },
    )
    return inst


def conic_folder(root, n=2, size=64):
    """CoNIC's arrays: images (N, H, W, 3) uint8, labels (N, H, W, 2) uint16 = instance ids, Lizard class."""
    root.mkdir(parents=True)
    boxes = [(4, 10, 6, 14), (20, 40, 12, 5), (40, 5, 8, 9)]
    labels = np.zeros((n, size, size, 2), np.uint16)
    images = np.zeros((n, size, size, 3), np.uint8)
    classes = [[1, 2, 5], [3, 4, 6]]
    for i in range(n):
        inst = box_map(boxes, [3, 9, 14], shape=(size, size))
        labels[i, ..., 0] = inst
        labels[i, ..., 1] = np.r_[0, classes[i]][np.searchsorted([0, 3, 9, 14], inst)]
        images[i, ..., 1] = 30 + i
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    counts = "neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective\n1,1,0,0,1,0\n0,0,1,1,0,1\n"
    (root / "counts.csv").write_text(counts)
    return labels, classes


def blob_tiles(n=2, size=(72, 96), seed=0):
    """Tiles of ellipses (elongated along x or y) with CoNSeP classes; one nucleus has a hole, one two pieces."""
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    tiles = []
    for t in range(n):
        inst = np.zeros(size, np.int32)
        types = [0]
        for k in range(1, 9):
            r, c = 10 + 17 * ((k - 1) // 3) + t, 12 + 30 * ((k - 1) % 3)
            ry, rx = (4, 9) if k % 2 else (8, 3)
            rr, cc = ellipse(r, c, ry, rx, shape=size)
            inst[rr, cc] = k
            types.append(int(rng.integers(1, 5)))
        inst[9:11, 14:17] = 0  # a hole in nucleus 1
        inst[64:67, 80:84] = 9  # nucleus 9 in two pieces
        inst[68:71, 88:92] = 9
        types.append(2)
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        tiles.append(ds.Tile(f"tile_{t}", image, inst, np.asarray(types, np.uint8)[inst]))
    return tiles
