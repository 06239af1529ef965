"""The ``diffmix`` dispatcher: every command module registers, lists a one-line help and answers --help."""

import argparse
import subprocess
import sys

import pytest

from napari_diffmix.cli import COMMAND_MODULES, build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help_lines() -> dict[str, str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in sub._choices_actions}


COMMANDS = sorted(_commands())


def test_every_command_module_registers_commands_with_a_one_line_help():
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"napari_diffmix.cli._{name}")  # each listed module exists
    helps = _help_lines()
    assert set(helps) == set(COMMANDS)
    assert {"demo", "stats", "labels", "train", "synthesize", "export", "evaluate", "train-seg", "predict"} <= set(COMMANDS)
    for name, text in helps.items():
        assert text and "\n" not in text and not text.endswith("."), name


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, text in _help_lines().items():
        assert name in out and text.split()[0] in out, name
    assert main([]) == 1  # no command: the help again, and a non-zero status


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: diffmix {command}") and "options:" in out


def test_help_stays_light():
    # Command modules import torch, zarr and napari inside their functions, not at registration.
    code = "import sys; from napari_diffmix.cli import build_parser; build_parser(); print(sorted({'torch', 'zarr', 'napari'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "demo", "--layout", "tiff"],
        ["labels", "demo", "--layout", "tiff"],
        ["synthesize", "demo", "--out", "x.zarr", "--layout", "tiff"],
        ["train-seg", "--out", "m", "--layout", "tiff"],
        ["predict", "m", "t", "--out", "p", "--layout", "tiff"],
        ["compare", "--data", "d", "--synthetic", "s", "--test", "t", "--out", "c", "--test-layout", "tiff"],
        ["evaluate", "p", "g", "--gt-layout", "tiff"],
    ],
)
def test_shared_layout_option_takes_only_known_layouts(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tiff'" in err and all(layout in err for layout in ("auto", "consep", "generic", "pannuke"))


def test_stats_checks_every_image_and_lists_all_bad_tiles(tmp_path, capsys):
    import imageio.v3 as iio
    import numpy as np
    import tifffile

    import napari_diffmix.datasets as datasets
    from napari_diffmix.phantom import make_phantom_dataset

    root = datasets.write_generic(make_phantom_dataset(5, 32, seed=3), tmp_path / "data")
    images = root / "images"
    names = sorted(p.stem for p in images.iterdir())
    rgb = iio.imread(images / f"{names[0]}.png")
    iio.imwrite(images / f"{names[1]}.png", rgb[..., 0])  # grey
    iio.imwrite(images / f"{names[2]}.png", rgb[:24])  # 24x32 where the labels are 32x32
    (images / f"{names[3]}.png").unlink()
    tifffile.imwrite(images / f"{names[3]}.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    iio.imwrite(images / f"{names[4]}.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))  # RGBA: accepted
    assert main(["stats", str(root)]) == 2
    captured = capsys.readouterr()
    assert "class" in captured.out  # the statistics come first
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"diffmix stats: error: {root}: 2 of 5 tile image(s) do not fit") and "--no-check-images" in lines[0]
    assert lines[1:] == [
        f"  {images / names[1]}.png: grey (1 channel), expected RGB (3 channels) or RGBA",
        f"  {images / names[2]}.png: 24x32 px, expected 32x32 px (the size of its label maps)",
    ]
    assert main(["stats", str(root), "--no-check-images"]) == 0
    assert "images:" not in capsys.readouterr().out
    iio.imwrite(images / f"{names[1]}.png", rgb)
    iio.imwrite(images / f"{names[2]}.png", rgb)
    assert main(["stats", str(root)]) == 0
    assert "images: 5 decoded (8-bit RGB, the size of their label maps)" in capsys.readouterr().out


def test_stats_image_check_reads_wide_integer_images_as_the_reader_does(tmp_path, capsys):
    import numpy as np
    import tifffile

    from napari_diffmix.datasets import image_problem

    wide = tmp_path / "wide.tif"
    tifffile.imwrite(wide, np.full((8, 8, 3), 300, np.int32), photometric="rgb")
    assert image_problem(wide, (8, 8)) == "image must be 8-bit RGB (uint8) or 16-bit; got int32 with values up to 300: convert it to 8-bit RGB"
    tifffile.imwrite(wide, np.full((8, 8, 3), 300, np.uint16), photometric="rgb")  # 16-bit range: scaled, with a warning
    assert image_problem(wide, (8, 8)) is None
    tifffile.imwrite(wide, np.full((8, 8, 3), 200, np.uint16), photometric="rgb")  # values that fit 8 bits: the reader takes them
    assert image_problem(wide, (8, 8)) is None and image_problem(wide, (8, 9)).startswith("8x8 px, expected 8x9 px")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"no image")
    assert image_problem(junk, (8, 8)).startswith("cannot read image: ")
    assert image_problem(tmp_path / "absent.png", (8, 8)) == "image file does not exist"


def test_parser_choices_spelled_out_match_the_core():
    # cli/_common spells these out so that building the parser imports no numpy/torch.
    from napari_diffmix import datasets, runtime
    from napari_diffmix.cli._common import LAYOUT_CHOICES, PRECISIONS

    assert set(LAYOUT_CHOICES) == {"auto", *datasets.LAYOUTS}
    assert PRECISIONS == runtime.PRECISIONS
