"""The job runner behind every dock widget (napari_diffmix._widgets._workers): the widget is
reset whatever happens after the job ends. No window needed: the synchronous runner fires the
same callbacks in the same order as the threaded one."""

from __future__ import annotations

import pytest

from napari_diffmix._widgets._workers import run_in_thread
from napari_diffmix.errors import DiffMixError


def _job():
    yield "step 1"
    yield "step 2"
    return "result"


def test_on_finish_runs_when_showing_the_result_fails():
    calls = []

    def broken_display(result):
        calls.append(("return", result))
        raise RuntimeError("a bug while showing the result")

    with pytest.raises(RuntimeError, match="showing the result"):
        run_in_thread(_job, on_yield=lambda v: calls.append(("yield", v)), on_return=broken_display,
                      on_finish=lambda: calls.append(("finish",)), block=True)
    assert calls == [("yield", "step 1"), ("yield", "step 2"), ("return", "result"), ("finish",)]


def test_user_error_goes_to_on_error_then_on_finish():
    calls = []

    def job():
        yield "opening"
        raise DiffMixError("the dataset folder does not exist")

    run_in_thread(job, on_yield=calls.append, on_return=lambda r: calls.append("returned"),
                  on_error=lambda exc: calls.append(f"error: {exc}"), on_finish=lambda: calls.append("finish"), block=True)
    assert calls == ["opening", "error: the dataset folder does not exist", "finish"]
