"""Does napari stay responsive while the plugin works? (issue 13: event-loop stalls)

A pathologist feels a frozen window before any render time. This opens napari (a real window:
run it under ``xvfb-run -a`` on a machine without a screen), then, with a 10 ms ``QTimer``
recording the gap between its ticks (a gap of g ms = the event loop was busy for g - 10 ms):

  idle          a few seconds of the bare viewer (the floor this machine and napari give)
  open_dock     opening *Generate tissue* as napari's plugin menu does (import of the widget
                module + construction) until its "loading the renderer" state ends
  render        the 256 px window of the demo tile (bench_interactive's) rendered with the
                dock's default settings (bundled demo model, device and precision auto,
                standard quality = 15 steps, no tiles), from the return of the Generate click
                to the result layer (``click_ms``: the click itself, which adds the preview
                layer); the model loads inside the run (first render) and again from the cache
                (second render, another seed)

For each: the largest gap and the 99th percentile (ms), the number of ticks, and the seconds
the phase took; for a render also the time to its first preview. ``--json FILE`` writes them.
Targets: while rendering, max <= 100 ms and p99 <= 30 ms; opening the dock never blocks (its
max gap <= 100 ms too).

Run: ``xvfb-run -a python benchmarks/bench_gui.py [--renders 2] [--model teacher|student] [--json out.json]``.

Measured 2026-12-06 18:04 on the same CPU, quiet (load 1.5-1.8): the teacher (``--model
teacher``, bf16, 8.3-9.7 s renders): rendering max 49 / 45 ms, p99 27 / 26 ms (both targets met);
the dock's default, the 4-step student (1.1-1.4 s renders): max 44 / 39 ms, p99 30 / 37 ms (108-155
ticks per render: the p99 is the second-largest gap, a preview repaint); opening the dock: call
0.08-0.10 s, max 232-252 ms (torch's extension initialising in the background thread holds the
GIL), ready after 4.0-4.5 s.

Measured 2026-12-06 14:28 on a shared 2-core AMD EPYC, Xvfb + Mesa software OpenGL, load 4.1-4.3
from other engineers' jobs (before these changes, same conditions, load 4.2, in parentheses):
idle max 14 ms; opening the dock: call 0.12 s, max 334 ms, p99 140 ms, ready after 7.2 s
(call 2.69 s, max 2739 ms); rendering (bf16, 2 threads, ~19 s per render): max 144 / 113 ms,
p99 31 / 35 ms for the first / second render (127 / 96, 39 / 34); the click 85-215 ms
(208-212). Targets missed by 1.1-1.4x (max) and 1.0-1.2x (p99); every gap left over 30 ms
while rendering is a repaint of a preview (software OpenGL). At load 7-9 earlier the same day:
rendering max 250-440 ms, p99 32-46 ms (before: 270-570, 39-78 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import napari_diffmix  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
import numpy as np

from napari_diffmix.runtime import cpu_name

# bench_interactive's window of the demo tile (y, x, h, w). Not imported from there: it imports
# torch, and torch must not be loaded before the dock opens, or the opening is measured without
# its heaviest import.
WINDOW = (128, 128, 256, 256)
TICK_MS = 10


class StallClock:
    """A 10 ms QTimer on the event loop; each tick records the wall ms since the previous one."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last: float | None = None
        self._timer = QTimer()
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(1000 * (now - self._last))
        self._last = now

    def start(self) -> None:
        self.gaps, self._last = [], time.perf_counter()
        self._timer.start()

    def stop(self) -> dict[str, float]:
        """Stop and summarise; the gap still open counts too (a stall at the very end)."""
        self._tick()
        self._timer.stop()
        gaps = np.asarray(self.gaps)
        return {"max_ms": round(float(gaps.max()), 1), "p99_ms": round(float(np.percentile(gaps, 99)), 1),
                "median_ms": round(float(np.median(gaps)), 1), "ticks": int(gaps.size)}


def wait_until(condition, timeout: float) -> bool:
    """Run the event loop (not a polling loop: the timer must see it as napari runs) until
    ``condition()`` holds; False on timeout."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.perf_counter() + timeout
    poll = QTimer()
    poll.setInterval(20)
    poll.timeout.connect(lambda: loop.quit() if condition() or time.perf_counter() > deadline else None)
    poll.start()
    if not condition():
        loop.exec()
    poll.stop()
    return condition()


def add_demo_window(viewer) -> None:
    """The demo sample (File > Open Sample > DiffMix), cut to bench_interactive's 256 px window."""
    viewer.open_sample("napari-diffmix", "demo")
    y, x, h, w = WINDOW
    for layer in viewer.layers:
        layer.data = np.array(layer.data[y:y + h, x:x + w])


def measure_render(widget, clock: StallClock, seed: int, timeout: float) -> dict:
    widget.seed.setValue(seed)
    shown_before = len([layer for layer in widget.viewer.layers if layer.name.startswith("render")])
    first: list[float] = []
    t0 = time.perf_counter()
    widget.generate()  # the click: reads the settings, adds the preview layer
    click = time.perf_counter() - t0
    clock.start()

    def done() -> bool:
        if not first and widget.previews_shown:
            first.append(time.perf_counter() - t0)
        return not widget._running

    if not wait_until(done, timeout):
        raise SystemExit(f"the render did not finish within {timeout:.0f} s")
    row = clock.stop()
    renders = [layer for layer in widget.viewer.layers if layer.name.startswith("render")]
    if len(renders) != shown_before + 1:
        raise SystemExit(f"the render added no result layer: status {widget.status.text()!r}")
    provenance = renders[-1].metadata["diffmix"]["provenance"]
    row.update(click_ms=round(1000 * click, 1), seconds=round(time.perf_counter() - t0, 2), first_preview_s=round(first[0], 2) if first else None,
               previews=widget.previews_shown, render_s=provenance["seconds"], precision=provenance["precision"],
               threads=provenance["threads"], reused_model=provenance["reused_model"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--renders", type=int, default=2, help="renders in a row (the first loads the model)")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of the bare viewer to measure first")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a phase may take")
    p.add_argument("--model", choices=("default", "teacher", "student"), default="default",
                   help="the dock's default model, or the bundled teacher / its 4-step student")
    p.add_argument("--json", type=str)
    args = p.parse_args(argv)
    os.environ.setdefault("DIFFMIX_QUIET", "1")

    import napari

    out: dict = {"cpu": cpu_name(), "load_before": round(os.getloadavg()[0], 2)}
    if "torch" in sys.modules:
        raise SystemExit("torch was imported before the dock opened: the opening would be measured without it")
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    clock = StallClock()
    wait_until(lambda: False, 1.0)  # let the window settle

    clock.start()
    wait_until(lambda: False, args.idle)
    out["idle"] = clock.stop()
    print("idle", json.dumps(out["idle"]), flush=True)

    clock.start()
    t0 = time.perf_counter()
    # As Plugins > DiffMix > Generate tissue does it: npe2 imports the module, builds the widget.
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffmix", "Generate tissue")
    out_call = time.perf_counter() - t0
    if not wait_until(lambda: widget.ready, args.timeout):
        raise SystemExit("the Generate dock never left its loading state")
    out["open_dock"] = {**clock.stop(), "call_s": round(out_call, 2), "until_ready_s": round(time.perf_counter() - t0, 2)}
    print("open_dock", json.dumps(out["open_dock"]), flush=True)

    if args.model != "default":
        widget.picker.combo.setCurrentIndex(0 if args.model == "teacher" else 1)  # the two bundled models, in this order
    out["model"] = widget.picker.combo.currentText()
    add_demo_window(viewer)
    wait_until(lambda: False, 0.5)
    for i in range(args.renders):
        row = measure_render(widget, clock, seed=i, timeout=args.timeout)
        out[f"render_{i + 1}"] = row
        print(f"render_{i + 1}", json.dumps(row), flush=True)
    out["load_after"] = round(os.getloadavg()[0], 2)
    renders = [out[f"render_{i + 1}"] for i in range(args.renders)]
    out["render_max_ms"] = max(r["max_ms"] for r in renders)
    out["render_p99_ms"] = max(r["p99_ms"] for r in renders)
    out["open_dock_max_ms"] = out["open_dock"]["max_ms"]
    print(json.dumps(out, indent=1))
    print(f"render: max {out['render_max_ms']} ms (target <= 100), p99 {out['render_p99_ms']} ms (target <= 30); "
          f"opening the dock: max {out['open_dock_max_ms']} ms; load {out['load_before']} -> {out['load_after']}, "
          f"{out['cpu']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
