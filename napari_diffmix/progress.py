"""Progress reporting that works the same from the CLI, tests and napari.

Long functions take ``pbar``: any tqdm-like object (``update``, ``total``,
``set_description``, ``close``). napari's ``napari.utils.progress`` is a tqdm subclass, so
widgets pass one in and the core never imports napari. ``None`` gives a tqdm bar on stderr,
silenced when ``DIFFMIX_QUIET=1``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(pbar: Any | None, total: int | None, desc: str = "", unit: str = "it") -> Iterator[Any]:
    """Use ``pbar`` if given (setting its total), else open a tqdm bar closed on exit."""
    if pbar is not None:
        if total is not None:
            pbar.total = total
        if desc:
            pbar.set_description(desc)
        yield pbar
        return
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=os.environ.get("DIFFMIX_QUIET") == "1")
    try:
        yield bar
    finally:
        bar.close()
