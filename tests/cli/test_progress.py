"""progress.StopRequests: Ctrl-C / SIGTERM or should_stop() ask long work to stop; a second Ctrl-C aborts."""

import os
import signal
import threading

import pytest

from napari_diffmix.progress import StopRequests


def test_signals_request_a_stop_then_a_second_ctrl_c_aborts_and_handlers_are_restored(caplog):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests(stopping="finishing the batch") as requests:
        assert not requests.poll()
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.poll() and requests.requested == "SIGTERM"
        assert "SIGTERM received: finishing the batch" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_should_stop_and_worker_threads():
    flag = []
    seen = {}

    def worker():
        with StopRequests(lambda: bool(flag)) as requests:  # off the main thread: no signal handlers
            seen["before"] = requests.poll()
            flag.append(1)
            seen["after"], seen["why"] = requests.poll(), requests.requested

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"before": False, "after": True, "why": "stop request"}
