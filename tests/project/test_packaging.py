"""A non-editable wheel install in a fresh virtual environment: the console script runs and
npe2 finds and validates the manifest (which lives at the repository root and is shipped
inside the package)."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("napari_diffmix-*.whl")
    return whl


def test_wheel_ships_manifest_and_resources(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        manifest = zf.read("napari_diffmix/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        eps = zf.read(entry_points).decode()
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "[napari.manifest]" in eps and "napari_diffmix:napari.yaml" in eps
    assert "diffmix = napari_diffmix.cli:main" in eps
    shipped = {n for n in names if n.startswith("napari_diffmix/resources/")}
    on_disk = {
        "napari_diffmix/" + p.relative_to(ROOT / "napari_diffmix").as_posix()
        for p in (ROOT / "napari_diffmix" / "resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert on_disk <= shipped, sorted(on_disk - shipped)


@pytest.mark.slow
def test_fresh_venv_non_editable_install(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # torch first: a bare torch requirement would resolve to a multi-GB CUDA build.
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel), "npe2"], check=True, env=env)
    help_text = subprocess.run(
        [bin_dir / "diffmix", "--help"], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    ).stdout
    assert "usage: diffmix" in help_text
    # Run outside the source tree so nothing but the installed wheel can be found.
    validated = subprocess.run(
        [bin_dir / "npe2", "validate", "napari-diffmix"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "valid" in (validated.stdout + validated.stderr).lower()
    # The README's main job runs from the wheel alone: the bundled demo data and model ship in it.
    demo = subprocess.run(
        [bin_dir / "diffmix", "demo", "--out", "demo", "--patches", "2", "--patch-size", "64", "--stride", "64", "--threads", "1"],
        capture_output=True, text=True, env={**env, "DIFFMIX_QUIET": "1"}, cwd=tmp_path,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert (tmp_path / "demo" / "demo-montage.png").is_file() and (tmp_path / "demo" / "demo.zarr").is_dir()
