"""A report a person looks at: one self-contained HTML page about a synthetic store.

The page holds, as PNG figures embedded in base64 (no file beside it, no network):

- nuclei per class before (the original patches), planned (the synthetic label maps the plan
  asked for) and after (originals + synthetic), as grouped bars;
- the histogram of the items' label fidelity (``diffmix score``) and its means;
- a montage of the best and the worst items by fidelity: label map | render | predicted nuclei
  (predicted again with the scoring model, or the model given, for these few items only);
- the settings that decided the store and the provenance of the diffusion and scoring models.

Figures are drawn with Pillow (a dependency already): the report adds no plotting library.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import StoreError

BAR_COLOURS = {"before": (120, 120, 120), "planned": (230, 159, 0), "after": (0, 114, 178)}
# Series without a colour of their own (the runs of a comparison) take these in order (Okabe-Ito).
SERIES_COLOURS = ((120, 120, 120), (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233))
# Montage tiles are shown at least this many pixels wide (nearest-neighbour upscaling keeps label edges sharp).
MIN_TILE_PX = 160


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _png(image: Any) -> str:
    """A PIL image or uint8 array as a base64 PNG data URI."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def label_rgb(inst_map: np.ndarray, type_map: np.ndarray, colours: Sequence[str]) -> np.ndarray:
    """Class colours (the scheme's) on black, with every nucleus outlined in white so touching
    nuclei stay apart."""
    lut = np.zeros((len(colours) + 1, 3), np.uint8)
    for k, c in enumerate(colours, start=1):
        lut[k] = _hex_rgb(c)
    rgb = lut[np.clip(type_map, 0, len(colours))]
    edge = np.zeros(inst_map.shape, bool)
    edge[:-1] |= inst_map[:-1] != inst_map[1:]
    edge[1:] |= inst_map[1:] != inst_map[:-1]
    edge[:, :-1] |= inst_map[:, :-1] != inst_map[:, 1:]
    edge[:, 1:] |= inst_map[:, 1:] != inst_map[:, :-1]
    rgb[edge & (inst_map > 0)] = 255
    return rgb


def _upscale(image: np.ndarray) -> np.ndarray:
    f = max(1, math.ceil(MIN_TILE_PX / max(image.shape[:2])))
    return np.repeat(np.repeat(image, f, axis=0), f, axis=1) if f > 1 else image


def bar_chart(
    groups: Mapping[str, Sequence[float]],
    names: Sequence[str],
    title: str,
    width: int = 640,
    height: int = 300,
    *,
    value_format: str = "{:.0f}",
    vmax: float | None = None,
    errors: Mapping[str, Sequence[float]] | None = None,
):
    """Grouped bars: one group per class, one bar per series (``groups``: series -> value per class).

    ``vmax``: the top of the axis (default: the largest value). ``errors``: series -> a
    half-length per class, drawn as a whisker (e.g. the sd over seeds). A NaN value (undefined,
    e.g. the F1 of a class no run predicted nor held) draws no bar and is labelled n/a.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, 10, 30, 40
    d.text((left, 8), title, fill="black")
    finite = [float(v) for vals in groups.values() for v in vals if not math.isnan(float(v))]
    vmax = vmax if vmax is not None else max(finite + [1.0])
    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for frac in (0.5, 1.0):
        y = height - bottom - frac * (height - top - bottom)
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((4, y - 6), value_format.format(vmax * frac), fill="black")
    colours = {series: BAR_COLOURS.get(series, SERIES_COLOURS[k % len(SERIES_COLOURS)]) for k, series in enumerate(groups)}
    n_series = max(len(groups), 1)
    slot = (width - left - right) / max(len(names), 1)
    bar = slot * 0.8 / n_series
    scale = (height - top - bottom) / vmax
    for k, name in enumerate(names):
        x0 = left + k * slot + slot * 0.1
        for s, (series, vals) in enumerate(groups.items()):
            v = float(vals[k])
            xa = x0 + s * bar
            if math.isnan(v):
                d.text((xa, height - bottom - 12), "n/a", fill="black")
                continue
            h = v * scale
            d.rectangle([xa, height - bottom - h, xa + bar - 2, height - bottom], fill=colours[series])
            err = float(errors[series][k]) if errors and series in errors else 0.0
            if err > 0:
                xm = xa + (bar - 2) / 2
                y_lo, y_hi = height - bottom - max(v - err, 0.0) * scale, height - bottom - (v + err) * scale
                d.line([(xm, y_lo), (xm, y_hi)], fill="black")
                d.line([(xm - 3, y_hi), (xm + 3, y_hi)], fill="black")
                d.line([(xm - 3, y_lo), (xm + 3, y_lo)], fill="black")
                h = max(h, (v + err) * scale)
            d.text((xa, height - bottom - h - 12), value_format.format(v), fill="black")
        d.text((x0, height - bottom + 6), str(name)[:18], fill="black")
    # Legend slots as wide as their names (Pillow's default font: about 6 px per character).
    slots = [max(90, 6 * len(str(series)) + 24) for series in groups]
    x = width - right - sum(slots)
    for series, slot_w in zip(groups, slots):
        d.rectangle([x, 10, x + 10, 20], fill=colours[series])
        d.text((x + 14, 8), str(series), fill="black")
        x += slot_w
    return img


def histogram(values: Sequence[float], title: str, threshold: float | None = None, bins: int = 20, width: int = 640, height: int = 260):
    """Histogram of values in [0, 1]; the threshold (if any) as a red line."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 40, 10, 30, 30
    d.text((left, 8), title, fill="black")
    counts, edges = np.histogram(np.clip(np.asarray(values, float), 0, 1), bins=bins, range=(0.0, 1.0))
    cmax = max(int(counts.max()) if counts.size else 0, 1)
    pw, ph = width - left - right, height - top - bottom
    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    d.text((4, top - 6), str(cmax), fill="black")
    for k, c in enumerate(counts):
        x0 = left + k * pw / bins
        h = c / cmax * ph
        d.rectangle([x0 + 1, height - bottom - h, x0 + pw / bins - 1, height - bottom], fill=(0, 114, 178))
    for v in (0.0, 0.5, 1.0):
        d.text((left + v * pw - 8, height - bottom + 6), f"{v:g}", fill="black")
    if threshold is not None and 0 <= threshold <= 1:
        x = left + threshold * pw
        d.line([(x, top), (x, height - bottom)], fill=(213, 94, 0), width=2)
        d.text((x + 4, top), f"min {threshold:g}", fill=(213, 94, 0))
    return img


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _pre(obj: Any) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, default=str))}</pre>"


def _scorer_for(store: Any, seg_model: str | os.PathLike | None, device: str) -> tuple[Any, str]:
    """The model that predicts the montage's nuclei: the one given, else the one that scored the store
    (when its folder still exists). (None, why) when there is none."""
    from .fidelity import load_scorer

    path = seg_model or ((store.attrs.get("fidelity") or {}).get("model") or {}).get("path")
    if not path:
        return None, "no segmentation model: the store is not scored and --seg-model was not given"
    if seg_model is None and not Path(path).is_dir():
        return None, f"the scoring model {path} is no longer there; pass --seg-model to show predicted nuclei"
    scorer = load_scorer(path, device=device)
    scorer.check_scheme(store.scheme, store.path)
    return scorer, ""


def build_report(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seg_model: str | os.PathLike | None = None,
    items: int = 4,
    metric: str = "pq",
    device: str = "cpu",
) -> Path:
    """Write the HTML report of the store at ``store`` to ``out`` (atomically); returns ``out``.

    ``items``: how many best and how many worst items the montage shows. ``seg_model``: the model
    that predicts their nuclei (default: the one that scored the store).
    """
    from .fidelity_records import metric_value, read_records
    from .store import open_store

    st = open_store(store)
    scheme = st.scheme
    names = list(scheme.names)
    attrs = st.attrs
    done = st.done_mask()
    sections: list[str] = []

    counts = attrs.get("class_counts") or {}
    series = {k: [int(v) for v in counts[k][1:]] for k in ("before", "planned", "after") if counts.get(k)}
    if series:
        chart = bar_chart(series, names, "nuclei per class: before / planned / after")
        rows = [[n, *(series[k][i] for k in series)] for i, n in enumerate(names)]
        sections.append(f'<h2>Class counts</h2><img id="class-counts" alt="class counts" src="{_png(chart)}">'
                        + _table(rows, ["class", *series]))
    else:
        sections.append("<h2>Class counts</h2><p>The store records no class counts yet (synthesis not finished).</p>")

    records = read_records(st.group)
    fid = attrs.get("fidelity") or {}
    scored = [i for i in np.flatnonzero(done) if records[i]]
    if scored:
        values = np.array([metric_value(records[i], metric) for i in scored])
        finite = values[~np.isnan(values)]
        hist = histogram(finite, f"label fidelity ({metric.upper()}) of {len(scored)} items", fid.get("min_fidelity"))
        from .fidelity_records import summary

        # From the records themselves: the attrs' means date from the last scoring run.
        summ = summary([records[i] for i in scored], names)
        rows = [[k.removeprefix("mean_"), v] for k, v in summ.items() if k.startswith("mean_")]
        sections.append(f'<h2>Label fidelity</h2><p>{len(scored)} of {int(done.sum())} finished items scored; '
                        f'rare-class recall basis: {html.escape(str(fid.get("rare_basis", "")))}.</p>'
                        f'<img id="fidelity-histogram" alt="fidelity histogram" src="{_png(hist)}">' + _table(rows, ["mean", "value"]))
        order = [i for _, i in sorted(zip(np.nan_to_num(values, nan=1.0), scored))]
        picks = {"Worst": order[:items], "Best": order[::-1][:items]}
    else:
        sections.append("<h2>Label fidelity</h2><p>The store is not scored: run <code>diffmix score STORE --seg-model MODEL</code>.</p>")
        finished = [int(i) for i in np.flatnonzero(done)]
        picks = {"Items": finished[:items]}

    scorer, why = _scorer_for(st, seg_model, device)
    montage = [f"<h2>Montage</h2><p>label map | render{' | predicted nuclei' if scorer else ''}"
               f"{'' if scorer else ' (' + html.escape(why) + ')'}. Class colours: "
               + ", ".join(f'<span style="color:{c}">&#9632;</span> {html.escape(n)}' for n, c in zip(names, scheme.colors)) + "</p>"]
    for title, idx in picks.items():
        montage.append(f"<h3>{title}</h3><div class='montage'>")
        for i in idx:
            item = st.item(int(i))
            panels = [label_rgb(item.inst_map, item.type_map, scheme.colors), item.image]
            if scorer is not None:
                panels.append(label_rgb(*scorer.predict(item.image), scheme.colors))
            gap = np.full((item.image.shape[0], 4, 3), 255, np.uint8)
            row = np.concatenate([p for panel in panels for p in (_upscale(panel), _upscale(gap))][:-1], axis=1)
            label = f"item {int(i)}" + (f": {metric.upper()} {_fmt(metric_value(records[int(i)], metric))}" if records[int(i)] else "")
            montage.append(f'<figure><img class="montage-item" alt="{html.escape(label)}" src="{_png(row)}">'
                           f"<figcaption>{html.escape(label)}</figcaption></figure>")
        montage.append("</div>")
    sections.append("".join(montage))

    sections.append("<h2>Settings</h2>" + _pre(attrs.get("settings", {})))
    model = dict(attrs.get("model") or {})
    sections.append("<h2>Diffusion model</h2>" + _pre(model))
    if fid:
        sections.append("<h2>Scoring model</h2>" + _pre({k: fid.get(k) for k in ("model", "metric", "min_fidelity", "rare_classes", "definitions")}))
    intro = (f"{html.escape(str(st.path))}: {int(done.sum())} of {len(st)} items finished (status {html.escape(str(attrs.get('status', '?')))}),\n"
             f"scheme {html.escape(scheme.name)} ({html.escape(', '.join(names))}), {st.patch_shape[0]} x {st.patch_shape[1]} px.")
    return write_page(out, f"napari-diffmix report: {st.path.name}", intro, sections)


def write_page(out: str | os.PathLike, title: str, intro_html: str, sections: Sequence[str]) -> Path:
    """Write one self-contained HTML page (title, an introductory paragraph, the sections' HTML)
    atomically to ``out``; returns ``out``."""
    from .atomic import write_text

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
pre {{ background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 85%; }}
figure {{ display: inline-block; margin: 4px; }} figcaption {{ font-size: 85%; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{intro_html}</p>
{"".join(sections)}
</body></html>
"""
    out = Path(out)
    if out.is_dir():
        raise StoreError(f"{out}: is a folder; the report is one HTML file, e.g. {out / 'report.html'}")
    write_text(out, page)
    return out


# ---------------------------------------------------------------------------------------------
# comparing training runs (diffmix compare, diffmix demo --compare)
# ---------------------------------------------------------------------------------------------
def mean_sd_text(values: Sequence[float | None]) -> str:
    """Repeated runs' values as "mean ± sd" (the value alone for one run, n/a when none is defined)."""
    from .metrics import mean_sd

    mean, sd, n = mean_sd(values)
    if n == 0:
        return "n/a"
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {_fmt(sd)}" + (f" ({n} of {len(values)})" if n < len(values) else "")


def build_comparison_report(
    out: str | os.PathLike,
    *,
    title: str,
    intro_html: str,
    class_names: Sequence[str],
    rare: Sequence[str],
    runs: Mapping[str, Mapping[str, Sequence[float | None]]],
    metrics: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    notes_html: Sequence[str] = (),
) -> Path:
    """Write the HTML page comparing training runs on one test set; returns ``out``.

    ``runs``: run name -> metric -> its value in each repetition (one per seed; None or NaN when
    undefined). The per-class F1 values are keyed ``f1_<class>``. The page shows the per-class F1
    of the runs side by side, the ``rare`` classes first (mean, with the sd over repetitions as
    whiskers), then a table of every per-class F1 and ``metrics`` per run, with each run's
    difference from the first, then ``notes_html`` and the ``settings``.
    """
    from .metrics import mean_sd

    order = [n for n in rare if n in class_names] + [n for n in class_names if n not in rare]
    means = {run: [mean_sd(vals.get(f"f1_{n}", []))[0] for n in order] for run, vals in runs.items()}
    sds = {run: [np.nan_to_num(mean_sd(vals.get(f"f1_{n}", []))[1]) for n in order] for run, vals in runs.items()}
    repeats = max((len(v) for vals in runs.values() for v in vals.values()), default=1)
    what = f"mean ± sd over {repeats} seeds" if repeats > 1 else "one run each"
    chart = bar_chart(means, [n + (" (rare)" if n in rare else "") for n in order],
                      f"held-out F1 per class, rare class first ({what})", value_format="{:.2f}", vmax=1.0,
                      errors=sds if repeats > 1 else None, width=max(640, 70 * len(order) * len(runs) + 120))
    names = list(runs)
    first = names[0]
    rows = []
    for key in [f"f1_{n}" for n in order] + list(metrics):
        row: list[Any] = [key.replace("f1_", "F1 ") + (" (rare)" if key.removeprefix("f1_") in rare else "")]
        row += [mean_sd_text(runs[r].get(key, [])) for r in names]
        base = mean_sd(runs[first].get(key, []))[0]
        diffs = [mean_sd(runs[r].get(key, []))[0] - base for r in names[1:]]
        row += ["n/a" if math.isnan(d) else f"{d:+.3f}" for d in diffs]
        rows.append(row)
    head = ["metric", *names, *(f"{r} − {first}" for r in names[1:])]
    sections = [
        f'<h2>Per-class F1</h2><img id="f1-per-class" alt="per-class F1 of each run" src="{_png(chart)}">'
        + _table(rows, head),
        *notes_html,
    ]
    if settings:
        sections.append("<h2>Settings</h2>" + _pre(settings))
    return write_page(out, title, intro_html, sections)


def comparison_report(comparison: Any, path: str | os.PathLike) -> Path:
    """The page of a :class:`napari_diffmix.seg.compare.Comparison` (``diffmix compare``)."""
    from .seg.compare import SUMMARY_KEYS

    return build_comparison_report(
        path, title=f"napari-diffmix compare: {comparison.out_dir.name}",
        intro_html="Two runs of one recipe on one test set: <b>baseline</b> (the data alone) and <b>augmented</b> "
                   f"(the data + the synthetic store). {html.escape(comparison.shares_line())}.",
        class_names=comparison.baseline.class_names, rare=comparison.rare, runs=comparison.runs(), metrics=SUMMARY_KEYS,
        settings=comparison.settings,
    )
