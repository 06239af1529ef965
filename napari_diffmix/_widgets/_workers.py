"""Run long jobs off the event loop (napari thread workers), or synchronously on request.

A job is a plain function or a generator function. In a thread, each value a generator
yields reaches ``on_yield`` on the main thread and ``quit()`` stops it at its next ``yield``;
the function's return value reaches ``on_return``. Setting ``DIFFMIX_NAPARI_NOTHREADS=1``
(or ``block=True``) runs the very same job synchronously in the calling thread: the same
callbacks fire in the same order, which is what debuggers and CI want (as stardist-napari's
``STARDIST_NAPARI_NOTHREADS``).

User errors (:class:`~napari_diffmix.errors.DiffMixError`) raised by the job reach
``on_error`` only (a widget shows them as a plain notification). Other exceptions are bugs:
napari shows them with their traceback, and ``on_error`` still runs so the widget can reset.

:class:`JobWidget` is the bookkeeping of a dock widget that runs one such job at a time
(start, Cancel, errors, reset), and :func:`show_progress` updates its progress bar.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterator

from ..errors import DiffMixError

NOTHREADS_ENV = "DIFFMIX_NAPARI_NOTHREADS"


def threads_enabled() -> bool:
    return os.environ.get(NOTHREADS_ENV, "") not in ("1", "true", "yes")


class _Failed:
    """A user error carried out of the worker as a value (so napari does not add a traceback)."""

    def __init__(self, exc: DiffMixError):
        self.exc = exc


def _guarded_gen(func: Callable[[], Any]) -> Iterator[Any]:
    try:
        result = func()
        if inspect.isgenerator(result):
            result = yield from result
        return result
    except DiffMixError as exc:
        return _Failed(exc)


class SyncWorker:
    """The synchronous stand-in for a napari worker: ``quit`` is honoured between yields."""

    def __init__(self) -> None:
        self.abort_requested = False
        self.is_running = False

    def quit(self) -> None:
        self.abort_requested = True

    def run(self, gen: Iterator[Any], on_yield, on_return, on_error, on_finish) -> None:
        self.is_running = True
        result: Any = None
        try:
            while True:
                try:
                    value = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                if on_yield:
                    on_yield(value)
                if self.abort_requested:
                    gen.close()
                    result = None
                    break
        except Exception as exc:
            self.is_running = False
            if on_error:
                on_error(exc)
            if on_finish:
                on_finish()
            raise
        self.is_running = False
        _deliver_then_finish(result, on_return, on_error, on_finish, aborted=self.abort_requested)


def _deliver_then_finish(result: Any, on_return, on_error, on_finish, aborted: bool) -> None:
    # on_finish runs even when showing the result fails (a bug in on_return): else the widget
    # would stay "running" with every button disabled until napari is restarted.
    try:
        if isinstance(result, _Failed):
            if on_error:
                on_error(result.exc)
        elif on_return and not aborted:
            on_return(result)
    finally:
        if on_finish:
            on_finish()


def run_in_thread(
    func: Callable[[], Any],
    *,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    block: bool = False,
) -> Any:
    """Start ``func`` (see the module docstring); returns the worker (``quit()`` cancels)."""
    gen = _guarded_gen(func)
    if block or not threads_enabled():
        worker = SyncWorker()
        worker.run(gen, on_yield, on_return, on_error, on_finish)
        return worker
    from napari.qt.threading import create_worker

    worker = create_worker(lambda: (yield from gen), _start_thread=False)
    state = {"result": None}

    def returned(value: Any) -> None:
        state["result"] = value

    def finished() -> None:
        # A cancelled job stops at a yield: close it now so its cleanup (a store's writer lock,
        # open files) runs before the user can start again, not whenever the worker is collected.
        gen.close()
        _deliver_then_finish(state["result"], on_return, on_error, on_finish, aborted=worker.abort_requested)

    if on_yield:
        worker.yielded.connect(on_yield)
    worker.returned.connect(returned)
    if on_error:
        worker.errored.connect(on_error)
    worker.finished.connect(finished)
    worker.start()
    return worker


CANCELLING = "cancelling…"


class JobWidget:
    """Mixin for a dock widget that runs one job at a time in a worker.

    The widget adds its ``progress`` bar and ``status`` line with :meth:`_add_job_status` and
    provides ``_update_enabled()`` (its buttons follow ``_running``). :meth:`cancel` stops the
    job at its next yield, user errors become notifications, and the widget's ``on_finish``
    calls :meth:`_job_finished` to reset.
    """

    busy_message = "a job is already running; cancel it first"
    # Command-line words in the core's error messages -> this widget's own controls.
    cli_words: tuple[tuple[str, str], ...] = ()
    worker: Any = None
    _running = False
    _cancel_requested = False

    def _add_job_status(self, layout: Any) -> None:
        from qtpy.QtWidgets import QLabel, QProgressBar

        self.progress = QProgressBar()
        self.progress.setFormat("idle")
        layout.addWidget(self.progress)
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

    def _check_idle(self) -> None:
        if self._running:
            raise DiffMixError(self.busy_message)

    def _start_job(self, job: Callable[[], Any], *, on_yield, on_return, on_finish, block: bool) -> Any:
        self._running = True
        self._cancel_requested = False
        self._update_enabled()
        worker = run_in_thread(
            job, on_yield=on_yield, on_return=on_return, on_error=self._on_error, on_finish=on_finish, block=block
        )
        if self._running:  # a thread worker: it finishes later, on the event loop
            self.worker = worker
        return worker

    def cancel(self) -> None:
        """Stop the running job at its next step."""
        if self.worker is not None:
            self._cancel_requested = True
            self.status.setText(CANCELLING)
            self.worker.quit()

    def _on_error(self, exc: BaseException) -> None:
        from ._notify import notify_error

        self.status.setText("failed")
        self.progress.setFormat("failed")
        if isinstance(exc, DiffMixError):
            message = str(exc)
            for cli, ours in self.cli_words:
                message = message.replace(cli, ours)
            notify_error(message)

    def _job_finished(self) -> bool:
        """Back to idle; True when the job ended because it was cancelled."""
        cancelled = self._cancel_requested
        if cancelled:  # the bar would otherwise keep the last ETA of a job that is gone
            self.progress.setFormat("cancelled")
        self._cancel_requested = False
        self.worker = None
        self._running = False
        self._update_enabled()
        return cancelled


def show_progress(bar: Any, value: int, total: int, text: str) -> None:
    """Set a QProgressBar without repainting it on the spot.

    ``setValue`` repaints synchronously, and in napari's window that repaints the OpenGL canvas
    too (tens of ms per update): updates are suppressed while it changes and Qt paints it on
    its own time.
    """
    bar.setUpdatesEnabled(False)
    bar.setRange(0, total)
    bar.setValue(value)
    bar.setFormat(text)
    bar.setUpdatesEnabled(True)
    bar.update()
