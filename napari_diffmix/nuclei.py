"""Instance-level operations on nuclei label maps (pure numpy / scikit-image).

Data contract: ``inst_map`` int32 (H, W), 0 = background, 1..N nuclei; ``type_map`` uint8,
``type_map == inst_types[inst_map]``.
"""

from __future__ import annotations

import numpy as np


def instance_edges(inst_map: np.ndarray) -> np.ndarray:
    """Boolean map, True where the instance id differs from a 4-neighbour.

    Both sides of a boundary are marked (nucleus/background and nucleus/nucleus), which is
    the edge channel SDM feeds the model next to the one-hot classes.
    """
    inst_map = np.asarray(inst_map)
    edges = np.zeros(inst_map.shape, dtype=bool)
    dy = inst_map[1:, :] != inst_map[:-1, :]
    dx = inst_map[:, 1:] != inst_map[:, :-1]
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    return edges
