"""A real render of the demo labels with the bundled demo model, checked on napari's screenshot.

The screenshot is saved as ``render.png`` in the test's tmp dir. The crop is the model's
training size (64 px, one window: ~10 s on two CPU cores). Set
``DIFFMIX_PLUGIN_SCREENSHOT=docs/images/plugin_screenshot.png`` to render a 256 px region
instead and also save the full window (docks included) there: that is how the README's
screenshot is made.
"""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.gui

CROP = (slice(224, 288), slice(192, 256))  # 64 x 64 of the 512 x 512 demo tile
DOCS_CROP = (slice(128, 384), slice(128, 384))


def test_render_of_the_demo_labels_looks_like_tissue(make_napari_viewer, qtbot, tmp_path):
    import imageio.v3 as iio

    from napari_diffmix._layers import image_layer_data, nuclei_layer_data
    from napari_diffmix._widgets.editor import NucleiEditorWidget
    from napari_diffmix._widgets.generate import GenerateWidget
    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import load_demo_tile
    from napari_diffmix.model.checkpoint import bundled_model_path
    from napari_diffmix.nuclei import remap_ids

    if bundled_model_path() is None:
        pytest.skip("the bundled demo model (napari_diffmix/resources/models/demo/*.safetensors) is not installed")
    docs_shot = os.environ.get("DIFFMIX_PLUGIN_SCREENSHOT")
    tile = load_demo_tile()
    window = DOCS_CROP if docs_shot else CROP
    inst_map, inst_types = remap_ids(tile.inst_map[window], tile.inst_types)
    type_map = inst_types[inst_map].astype(np.uint8)
    original = tile.image[window].copy()

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)  # a laptop screen: what the README shows
    data, kwargs, _ = image_layer_data(original, "demo IHC", inst_map=inst_map, type_map=type_map)
    viewer.add_image(data, **kwargs)
    data, kwargs, _ = nuclei_layer_data(inst_map, inst_types, DEMO, "demo nuclei")
    viewer.add_labels(data, **kwargs)
    editor = NucleiEditorWidget(viewer)
    viewer.window.add_dock_widget(editor, name="Nuclei editor")
    generate = GenerateWidget(viewer)
    viewer.window.add_dock_widget(generate, name="Generate tissue")
    # The model's summary is read once torch has been imported in the background.
    qtbot.waitUntil(lambda: generate.ready, timeout=60_000)
    assert generate.picker.info is not None and generate.picker.info.scheme.names == DEMO.names
    generate.seed.setValue(3)
    generate.generate(block=True)
    result = generate.last_result
    assert result is not None and result.data.shape == original.shape

    # What the user sees: the render alone on the canvas.
    for layer in viewer.layers:
        layer.visible = layer is result
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    iio.imwrite(tmp_path / "render.png", shot)
    rgb = shot[..., :3].reshape(-1, 3).astype(float)
    tissue = rgb[rgb.max(axis=1) > 8]  # drop the canvas's black margin
    assert tissue.shape[0] > 0.2 * rgb.shape[0], "the render is not on the canvas"
    assert tissue.std(axis=0).min() > 12, "the render is (nearly) flat"
    reference = original.reshape(-1, 3).astype(float)
    assert np.abs(tissue.mean(axis=0) - reference.mean(axis=0)).max() < 45, (tissue.mean(axis=0), reference.mean(axis=0))
    # Stain colours only (brown DAB, blue hematoxylin, white): no green (noise has plenty).
    green = (tissue[:, 1] > tissue[:, 0] + 10) & (tissue[:, 1] > tissue[:, 2] + 10)
    assert green.mean() < 0.02, f"{green.mean():.1%} green pixels"
    # Smooth like tissue, not speckled like noise: neighbour differences are small next to the
    # image's contrast (the demo tile: 0.17; the same model half-trained: 0.77).
    gray = result.data.astype(float).mean(axis=-1)
    rough = (np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()) / 2 / gray.std()
    assert rough < 0.4, f"roughness {rough:.2f}"
    # Label-conditioned: the painted nuclei come out darker than their surroundings, as in the tile.
    assert gray[inst_map > 0].mean() < gray[inst_map == 0].mean() - 8

    if docs_shot:
        # The render with the painted nuclei outlined in their class colours, and the docked
        # widgets: the whole main window (viewer.screenshot leaves the docks out).
        nuclei = viewer.layers["demo nuclei classes"]
        viewer.layers.move(viewer.layers.index(nuclei), len(viewer.layers))
        nuclei.contour = 2
        for layer in viewer.layers:
            layer.visible = layer in (result, nuclei)
        viewer.layers.selection.active = nuclei
        viewer.reset_view()
        from qtpy.QtWidgets import QApplication, QDockWidget

        from napari_diffmix._widgets.batch import BatchExportWidget

        viewer.window.add_dock_widget(BatchExportWidget(viewer), name="Batch export")
        # Docks added to the test fixture's window start hidden; a user's napari shows them.
        docks = {d.windowTitle(): d for d in viewer.window._qt_window.findChildren(QDockWidget)}
        for title in ("Nuclei editor", "Generate tissue", "Batch export"):
            docks[title].show()
            QApplication.processEvents()
        shots = {"Generate tissue": docs_shot}
        stem = docs_shot.rsplit(".", 1)[0]
        shots.update({"Nuclei editor": f"{stem}_editor.png", "Batch export": f"{stem}_batch.png"})
        for title, path in shots.items():  # the docks are tabs: one picture per tab, as a user sees it
            docks[title].raise_()
            for _ in range(5):
                QApplication.processEvents()
            iio.imwrite(path, viewer.window.screenshot(canvas_only=False, flash=False))
