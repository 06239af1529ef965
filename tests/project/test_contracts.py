"""The code's structural rules (DESIGN §4), held by tools rather than by memory: import-linter's
contracts and ruff's checks, both configured in pyproject.toml."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import napari_diffmix

ROOT = Path(__file__).resolve().parents[2]
# Not core: the Qt widgets, the command line, and the napari glue (reader, writer, layer helpers,
# sample data), which has its own contract.
NOT_CORE = {"_widgets", "cli", "__main__", "_layers", "_reader", "_writer", "_sample_data"}


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_under_the_core_contract():
    # A new module would otherwise escape the "core imports no Qt/napari" rule unnoticed.
    core = next(c for c in _contracts() if c["name"].startswith("The core never imports"))
    listed = {m.removeprefix("napari_diffmix.") for m in core["source_modules"]}
    present = {m.name for m in pkgutil.iter_modules(napari_diffmix.__path__)} - NOT_CORE
    assert present == listed, f"add to / remove from the contract: {sorted(present ^ listed)}"


def test_every_module_imports():
    # A moved module with a stale relative import fails here, not when a user opens a dock.
    for info in pkgutil.walk_packages(napari_diffmix.__path__, "napari_diffmix."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def test_import_contracts_hold():
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_ruff_checks_pass():
    run = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "napari_diffmix", "tests", "benchmarks", "scripts"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
