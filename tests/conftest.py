import functools
import importlib
import os
import subprocess
import sys

import pytest

os.environ.setdefault("DIFFMIX_QUIET", "1")

# GUI tests (marked ``gui``) need napari, Qt and a display with OpenGL: pytest-xvfb starts an
# Xvfb server on Linux when one is installed. Without those they are skipped with the reason,
# except under DIFFMIX_REQUIRE_DISPLAY=1 (set by .ci/run), where a missing display is an error.
# QT_QPA_PLATFORM=offscreen is refused: it has no OpenGL, so the canvas renders black.


@functools.lru_cache(maxsize=None)
def _display_problem() -> str | None:
    """Why GUI tests cannot run here, or None when they can."""
    try:
        for module in ("napari", "qtpy"):
            importlib.import_module(module)
    except Exception as exc:  # ImportError, or a Qt binding that fails to load
        return f"napari/Qt not importable ({exc}); install the 'testing' extra"
    if os.environ.get("QT_QPA_PLATFORM", "").lower() == "offscreen":
        return "QT_QPA_PLATFORM=offscreen has no OpenGL (the canvas renders black); use Xvfb (pytest-xvfb or xvfb-run)"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display: install Xvfb (pytest-xvfb starts it) or run under xvfb-run -a"
    # Qt aborts the whole process when it cannot open the display: probe in a child first.
    probe = "from qtpy.QtWidgets import QApplication; QApplication([])"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "starting a Qt application timed out"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"cannot start a Qt application on this display: {tail[0]}"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gui") is None:
        return
    problem = _display_problem()
    if problem is None:
        return
    if os.environ.get("DIFFMIX_REQUIRE_DISPLAY") == "1":
        pytest.fail(f"GUI test needs a display but DIFFMIX_REQUIRE_DISPLAY=1: {problem}", pytrace=False)
    pytest.skip(f"GUI test skipped: {problem}")


# -- label maps and viewers for the plugin tests ------------------------------------------------------
DISKS = (  # (centre y, centre x, semi-axis y, semi-axis x, class) on a demo-scheme map; class 1 is rare
    (20, 20, 5, 5, 2), (20, 50, 6, 6, 2), (20, 80, 5, 5, 3), (50, 20, 5, 5, 3), (50, 50, 3, 6, 1),
    (50, 80, 6, 6, 2), (80, 20, 5, 5, 3), (80, 50, 5, 5, 2), (80, 80, 4, 4, 3),
)


@pytest.fixture
def disk_map():
    """(inst_map, inst_types) of nine nuclei on a 96 x 96 map (ids 1..9, demo classes; #5 an ellipse)."""
    import numpy as np

    yy, xx = np.mgrid[:96, :96]
    inst_map = np.zeros((96, 96), np.int32)
    inst_types = np.zeros(len(DISKS) + 1, np.int32)
    for nid, (cy, cx, ry, rx, k) in enumerate(DISKS, start=1):
        inst_map[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = nid
        inst_types[nid] = k
    return inst_map, inst_types


@pytest.fixture
def editor(make_napari_viewer, disk_map):
    """(viewer, nuclei editor widget) editing the disk map (scheme demo)."""
    from napari_diffmix._layers import nuclei_layer_data
    from napari_diffmix._widgets.editor import NucleiEditorWidget
    from napari_diffmix.classes import DEMO

    viewer = make_napari_viewer(show=True)
    widget = NucleiEditorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    data, kwargs, _ = nuclei_layer_data(*disk_map, DEMO, "disks")
    viewer.add_labels(data, **kwargs)
    assert widget.canvas is not None and widget.canvas.layer.name == "disks"
    return viewer, widget


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 32 px SDM UNet with random weights, saved as a native model of the demo scheme."""
    import torch

    from napari_diffmix.classes import DEMO
    from napari_diffmix.model.checkpoint import save_model
    from napari_diffmix.model.unet import SDMUNet, UNetConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(SDMUNet(UNetConfig.preset("tiny")), path, scheme=DEMO, default_guidance=2.0)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the test machine's cores are shared, and oversubscribed
    threads cost more than they give."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_model_file():
    """The bundled demo model's file; tests that need it skip in a checkout without it."""
    from napari_diffmix.model.checkpoint import bundled_model_path

    path = bundled_model_path()
    if path is None:
        pytest.skip("the demo model is not shipped in this checkout")
    return path
