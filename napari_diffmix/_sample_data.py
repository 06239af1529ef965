"""napari sample data: the bundled demo tile with its nuclei labels, and a blank canvas.

Both come with their class scheme in the layer metadata, so the nuclei editor and the
generate widget pick them up without further set-up. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from ._layers import image_layer_data, nuclei_layer_data

BLANK_SIZE = 256


def demo_tile() -> list[tuple]:
    """The demo tile (scikit-image's IHC image) and its nuclei (scheme ``demo``)."""
    from .classes import DEMO
    from .demo_data import load_demo_tile

    tile = load_demo_tile()
    inst_types = tile.inst_types
    return [
        image_layer_data(tile.image, "demo IHC", inst_map=tile.inst_map, type_map=tile.type_map, source=tile.source),
        nuclei_layer_data(tile.inst_map, inst_types, DEMO, "demo nuclei", source=tile.source),
    ]


def blank_canvas() -> list[tuple]:
    """An empty 256 x 256 nuclei canvas (scheme ``demo``) to paint on."""
    from .classes import DEMO

    inst_map = np.zeros((BLANK_SIZE, BLANK_SIZE), dtype=np.int32)
    return [nuclei_layer_data(inst_map, np.zeros(1, np.int32), DEMO, "canvas nuclei")]
