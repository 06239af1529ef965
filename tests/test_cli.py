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
