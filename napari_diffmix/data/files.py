"""File reading shared by the dataset layouts: images (PNG of any bit depth, TIFF, JPEG),
label files, ``.mat`` variables, stacked ``.npy`` arrays, and the pairing of files by stem
(never by listing order). Every problem is a :class:`~napari_diffmix.errors.DatasetError`
naming the file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DatasetError
from .tiles import as_rgb


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


LABEL_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def child_dir(root: Path, name: str) -> Path | None:
    """Sub-folder of ``root`` called ``name``, case-insensitively (CoNSeP ships ``Images``)."""
    exact = root / name
    if exact.is_dir():
        return exact
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, list[Path]] = {}
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            found.setdefault(p.stem, []).append(p)
    clashes = {s: ps for s, ps in found.items() if len(ps) > 1}
    if clashes:
        s, ps = next(iter(sorted(clashes.items())))
        raise DatasetError(
            f"{len(clashes)} stem(s) have several files, e.g. {sorted(p.name for p in ps)}; keep one file per stem", folder
        )
    return {s: ps[0] for s, ps in found.items()}


def pair_stems(groups: dict[str, dict[str, Path]], root: Path) -> list[str]:
    """Stems present in every group (folder name -> stem -> path), or a DatasetError listing the unpaired."""
    all_stems = set().union(*groups.values())
    problems = []
    for folder, files in groups.items():
        missing = sorted(all_stems - set(files), key=natural_key)
        if missing:
            problems.append(f"no {folder} file for {len(missing)} stem(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if problems:
        raise DatasetError("unpaired files (paired by file stem): " + "; ".join(problems), root)
    return sorted(all_stems, key=natural_key)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for a file that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_png16(path: Path, colour_type: int) -> np.ndarray:
    """The samples of a 16-bit RGB (colour type 2) or RGBA (6) PNG, as uint16.

    Pillow holds RGB in 8 bits and keeps each sample's high byte, so a 16-bit PNG holding
    0..255 reads as zeros. Its PNG decoder also unpacks the little-endian variant of the same
    48/64-bit pixel, which keeps the other byte of each (big-endian) sample. Decoding twice,
    once per byte, and joining the two gives the samples exactly, while zlib, unfiltering and
    interlacing stay Pillow's own.
    """
    from PIL import Image

    mode = "RGB" if colour_type == 2 else "RGBA"
    planes = []
    for rawmode in (f"{mode};16B", f"{mode};16L"):
        with Image.open(path) as im:
            if im.mode != mode or not im.tile or any(t[3] != f"{mode};16B" for t in im.tile):
                raise DatasetError(f"cannot read 16-bit PNG: Pillow opened it as {im.mode} {[t[3] for t in im.tile]}", path)
            im.tile = [t._replace(args=rawmode) if hasattr(t, "_replace") else (*t[:3], rawmode) for t in im.tile]
            im.load()
            planes.append(np.asarray(im, dtype=np.uint16))
    return (planes[0] << 8) | planes[1]


def _decode_image(path: Path) -> np.ndarray:
    """Every pixel of an image file as its decoder gives it (any dtype, any channel count);
    a DatasetError naming the file if it is missing, truncated or not an image."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        png = _png_header(path)
        if png is not None and png[0] == 16 and png[1] in (2, 6):
            return _read_png16(path, png[1])
        if png == (16, 4):  # Pillow would widen grey + alpha to RGBA of high bytes
            raise DatasetError("grey with alpha (16-bit PNG), expected RGB (3 channels) or RGBA", path)
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError("image file does not exist", path) from None
    except Exception as exc:  # decoders raise many types; report the file, not a deep traceback
        raise DatasetError(f"cannot read image: {exc}", path) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image from PNG / TIFF / JPEG; alpha is dropped, grayscale is refused.

    16-bit files (PNG and TIFF) are read in full: values within 0..255 are taken as 8-bit, a
    wider range is scaled by 1/257 with a warning (see :func:`_to_8_bit`); notes come once per folder.
    """
    path = Path(path)
    return as_rgb(_decode_image(path), os.fspath(path), note_key=path.parent)


def image_problem(path: str | os.PathLike, shape: Sequence[int]) -> str | None:
    """Why :func:`read_image` would refuse ``path`` or not pair it with label maps of ``shape`` (H, W),
    as "what was found, what was expected"; None when the image fits.

    The file is decoded in full, as the reader will: a header can be whole while the pixel data
    are truncated or damaged, and the values of a 16-bit image decide how it is read.
    """
    path = Path(path)
    try:
        pixels = _decode_image(path)
        found = tuple(pixels.shape)
        if len(found) == 3 and found[0] in (3, 4) and found[2] not in (3, 4):
            found = (*found[1:], found[0])  # planar (C, H, W), as _as_rgb reads it
        if len(found) != 3 or found[2] not in (3, 4):
            what = "grey (1 channel)" if len(found) == 2 else f"{found[2]} channels" if len(found) == 3 else f"shape {found}"
            return f"{what}, expected RGB (3 channels) or RGBA"
        as_rgb(pixels, os.fspath(path), note_key=path.parent)
    except DatasetError as exc:
        return str(exc).removeprefix(f"{exc.path}: ")
    if tuple(found[:2]) != tuple(shape):
        return f"{found[0]}x{found[1]} px, expected {shape[0]}x{shape[1]} px (the size of its label maps)"
    return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from an image file's header (no pixels decoded), None if it cannot be read."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                return (shape[1], shape[2]) if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4) else shape[:2]
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # unreadable: the caller says what it needed
        return None


def file_check(names: Sequence[str], files: dict[str, Path] | Callable[[str], Path | None] | None) -> Callable:
    """An ``image_check`` (see :meth:`Dataset.check_image`) for layouts with one image file per tile."""

    def check(i: int, shape: tuple[int, int]) -> tuple[str, str | None] | None:
        path = None if files is None else files(names[i]) if callable(files) else files.get(names[i])
        return None if path is None else (os.fspath(path), image_problem(path, shape))

    return check


def read_label_file(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")
    except Exception as exc:  # see read_image
        raise DatasetError(f"cannot read label map: {exc}", path) from None


def check_pair_shapes(image: np.ndarray | None, image_path: Path | None, inst_map: np.ndarray, label_path: Path) -> None:
    if image is not None and image.shape[:2] != inst_map.shape[:2]:
        raise DatasetError(
            f"image {image_path.name} is {image.shape[:2]} but its labels {label_path.name} are {inst_map.shape[:2]}",
            label_path,
        )


def loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except NotImplementedError:
        raise DatasetError("MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7", path) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for damaged files
        raise DatasetError(f"cannot read .mat file: {exc}", path) from None


def mat_keys(path: str | os.PathLike) -> list[str]:
    """The variable names of a ``.mat`` file, read from its header (empty if it cannot be read)."""
    from scipy.io import whosmat

    try:
        return [name for name, _, _ in whosmat(path)]
    except Exception:  # v7.3 or damaged: reading it reports why
        return []


def present_ids(inst_map: np.ndarray) -> np.ndarray:
    ids = np.unique(inst_map)
    return ids[ids > 0]


def find_one(root: Path, filename: str, depth: int = 3) -> Path | None:
    hits = [p for p in root.glob(filename)]
    for level in range(1, depth + 1):
        if hits:
            break
        hits = [p for p in root.glob("/".join(["*"] * level) + "/" + filename) if p.is_file()]
    if len(hits) > 1:
        raise DatasetError(f"several {filename} files found ({sorted(map(str, hits))[:4]}); point at one fold", root)
    return hits[0] if hits else None


def mmap_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # see read_image
        raise DatasetError(f"cannot read array: {exc}", path) from None


def stack_image(images: np.ndarray, i: int, path: Path) -> np.ndarray:
    """Image ``i`` of an ``images.npy`` stack as (H, W, 3) uint8; PanNuke stores 0..255 as float64."""
    image = np.asarray(images[i])
    where = f"{path}[{i}]"
    if np.issubdtype(image.dtype, np.floating):
        nan = np.isnan(image)
        odd = nan if nan.any() else np.isinf(image)
        if odd.any():
            # NaN would become 0 with only a numpy warning: a black pixel in the training data.
            y, x = np.argwhere(odd)[0][:2]
            raise DatasetError(
                f"image {i} has {int(odd.sum())} {'NaN' if nan.any() else 'infinite'} pixel value(s) "
                f"(first at row {y}, column {x}); expected 0..255", path,
            )
        if image.size and (image.min() < 0 or image.max() > 255):
            raise DatasetError(f"image {i} has values outside 0..255", path)
        image = np.rint(image).astype(np.uint8)
    return as_rgb(image, where, note_key=path)


def stack_check(images: np.ndarray | None, path: Path | None) -> Callable:
    """An ``image_check`` for an ``images.npy`` stack: each image is read as the tile loader reads it."""

    def check(i: int, shape: tuple[int, int]) -> tuple[str, str | None] | None:
        if images is None:
            return None
        where = f"{path}[{i}]"
        try:
            image = stack_image(images, i, path)
        except DatasetError as exc:
            return where, str(exc).removeprefix(f"{exc.path}: ")
        if image.shape[:2] != tuple(shape):
            return where, f"{image.shape[0]}x{image.shape[1]} px, expected {shape[0]}x{shape[1]} px (the size of its label maps)"
        return where, None

    return check
