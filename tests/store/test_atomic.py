"""atomic.py: outputs appear whole or not at all, and an unwritable output is a clear error."""

import errno

import numpy as np
import pytest

from napari_diffmix.atomic import atomic_dir, atomic_path, save_png, write_text
from napari_diffmix.cli import main
from napari_diffmix.errors import DiffMixError, OutputError


def test_failed_body_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_body_leaves_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("crash")
    assert (target / "w").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("writer", ["file", "folder"])
def test_a_file_in_the_way_is_an_output_error(tmp_path, writer):
    blocker = tmp_path / "notdir"
    blocker.write_text("x")
    target = blocker / "sub" / "out.png"
    with pytest.raises(OutputError) as info:
        if writer == "file":
            save_png(target, np.zeros((4, 4, 3), np.uint8))
        else:
            with atomic_dir(target):
                pass
    err = info.value
    assert isinstance(err, DiffMixError) and isinstance(err, OSError)
    assert err.errno in (errno.ENOTDIR, errno.EEXIST)
    assert str(err).startswith(f"cannot write {target}: ")
    assert blocker.read_text() == "x"


def test_cli_reports_an_unwritable_output_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "notdir"
    blocker.write_text("x")
    assert main(["demo-data", "--out", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and str(blocker) in err and "Traceback" not in err


def test_outputs_get_the_users_usual_permissions(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
