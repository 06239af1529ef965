"""The GUI-test contract of conftest.py: no display -> skip with the reason, unless CI demands one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.mark.parametrize("require", [False, True])
def test_gui_tests_skip_or_fail_without_a_usable_display(tmp_path, require):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_gui.py").write_text(
        "import pytest\n\n@pytest.mark.gui\ndef test_window():\n    pass\n\ndef test_plain():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DIFFMIX_REQUIRE_DISPLAY"}
    env["QT_QPA_PLATFORM"] = "offscreen"  # renders black: as good as no display
    if require:
        env["DIFFMIX_REQUIRE_DISPLAY"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:xvfb", "-p", "no:cacheprovider", "-W", "ignore", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    out = done.stdout + done.stderr
    if require:
        assert done.returncode == 1 and "1 passed, 1 error" in out, out  # fails in setup, before any Qt call
        assert "DIFFMIX_REQUIRE_DISPLAY=1" in out and "offscreen" in out
    else:
        assert done.returncode == 0 and "1 passed, 1 skipped" in out, out
        assert "GUI test skipped" in out and "offscreen has no OpenGL" in out
