"""Progress reporting, stop requests and the events of long jobs, the same from the CLI, tests
and napari.

Long functions take ``pbar``: any tqdm-like object (``update``, ``total``,
``set_description``, ``close``). napari's ``napari.utils.progress`` is a tqdm subclass, so
widgets pass one in and the core never imports napari. ``None`` gives a tqdm bar on stderr,
silenced when ``DIFFMIX_QUIET=1``.

They stop at their next safe point when :class:`StopRequests` says so: on Ctrl-C / SIGTERM
from the command line, or when a GUI's ``should_stop()`` returns True.

A long job that a widget follows is a generator of :class:`JobEvent` (a batch synthesis, a
render in the Generate widget, the batch export's planning): one event type, so a consumer
reads ``kind`` and never a job-specific tuple or class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


JOB_EVENTS = ("status", "progress", "preview", "item", "done")


@dataclass
class JobEvent:
    """What a long job reports while it runs. ``kind``:

    * ``"status"``: ``message`` says what the job does now (opening, planning, loading a
      model); ``data`` may carry what that phase produced (the batch export's plan);
    * ``"progress"``: ``done`` of ``total`` units are finished (items of a store, steps of a
      render); ``message`` describes the work ahead;
    * ``"preview"``: step ``step`` of ``steps`` of the current sampling ran (``elapsed``
      seconds since it began); ``preview`` is the sampler's
      :class:`~napari_diffmix.model.samplers.StepRecord` or a picture made from it (None when
      this step is not shown) and ``indices`` the items it renders;
    * ``"item"``: the items ``indices`` are finished; ``data`` holds them;
    * ``"done"``: the job finished; its result is the generator's return value or the job's
      ``result``.

    ``done``/``total`` are kept current on every event. Errors are raised, not yielded (a
    :class:`~napari_diffmix.errors.DiffMixError` for what the user can fix), and a worker
    reports them.
    """

    kind: str
    done: int = 0
    total: int = 0
    message: str = ""
    step: int = 0
    steps: int = 0
    elapsed: float = 0.0
    indices: tuple[int, ...] = ()
    preview: Any = None
    data: Any = None

    def __post_init__(self) -> None:
        if self.kind not in JOB_EVENTS:
            raise ValueError(f"event kind must be one of {', '.join(JOB_EVENTS)}, got {self.kind!r}")


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


class StopRequests:
    """Ctrl-C / SIGTERM, or ``should_stop()``, ask long work to stop at its next safe point;
    a second Ctrl-C aborts at once (KeyboardInterrupt).

    Signal handlers are installed only from the main thread (a napari worker passes
    ``should_stop`` instead) and restored on exit. ``stopping`` is what the log says the work
    does when asked, e.g. "stopping within the current step". Poll with :meth:`poll`.
    """

    def __init__(self, should_stop: Callable[[], bool] | None = None, stopping: str = "stopping after the current step"):
        self.should_stop = should_stop
        self.stopping = stopping
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: %s", self.requested, self.stopping)

    def poll(self) -> bool:
        """Whether the work should stop now."""
        if self.requested is None and self.should_stop is not None and self.should_stop():
            self.requested = "stop request"
        return self.requested is not None


def set_bar_start(bar: Any, step: int) -> None:
    # A resumed run starts part-way: start the bar there without counting those steps into
    # its rate (tqdm's ``initial``), else the ETA is nonsense for a while.
    if step <= 0:
        return
    if all(hasattr(bar, a) for a in ("n", "last_print_n", "initial")):
        bar.n = bar.last_print_n = bar.initial = step
        with contextlib.suppress(Exception):
            bar.refresh()
    else:
        bar.update(step)
