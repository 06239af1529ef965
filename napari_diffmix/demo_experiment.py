"""The demo's segmentation side: the recipe of the bundled demo segmentation model and the
miniature DiffMix experiment of ``diffmix demo --compare``.

Both train the ``demo`` preset of the compact HoVer-Net (:mod:`napari_diffmix.seg.model`) on
the training split of the bundled tile (columns 0..383) and measure it on the held-out strip
(columns 384..511) with :mod:`napari_diffmix.metrics`. One recipe serves both, so the bundled
model (``scripts/train_demo_seg.py``) and the experiment's arms differ only in their step budget,
seed and training pool.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .classes import DEMO

# The recipe (measured on a shared 2-core CPU; see resources/models/demo-seg/MODEL_CARD.md).
# 128 px crops: the held-out strip is 128 px wide, and a larger crop of the 384 px training
# split would repeat the same nuclei in every batch.
DEMO_SEG_PRESET = "demo"
DEMO_SEG_CROP = 128
DEMO_SEG_BATCH = 8
# A short run from scratch needs a larger step than train-seg's default 1e-4 (tuned for long runs).
DEMO_SEG_LR = 1e-3
DEMO_SEG_STEPS = 800


def demo_seg_configs(
    steps: int = DEMO_SEG_STEPS, seed: int = 0, *, threads: int | None = None, checkpoint_every: int = 100,
    batch_size: int = DEMO_SEG_BATCH, crop_size: int = DEMO_SEG_CROP, synthetic_share: float | None = None,
):
    """(SegConfig, SegTrainConfig) of the demo recipe (on the CPU: the demo is for any laptop)."""
    from .seg.model import SegConfig
    from .seg.train import SegTrainConfig

    model_config = SegConfig.preset(DEMO_SEG_PRESET, DEMO.num_classes)
    config = SegTrainConfig(
        steps=steps, batch_size=batch_size, crop_size=crop_size, lr=DEMO_SEG_LR, seed=seed, device="cpu",
        checkpoint_every=checkpoint_every, log_every=25, num_threads=threads, synthetic_share=synthetic_share,
    )
    return model_config, config


def demo_train_data():
    """The demo's training split as a one-tile dataset (scheme ``demo``)."""
    from .data.tiles import Dataset
    from .demo_data import demo_split

    return Dataset([demo_split().train], DEMO)


def held_out_evaluation(model: Any):
    """:class:`~napari_diffmix.metrics.Evaluation` of ``model`` on the demo's held-out strip, with
    the prediction settings that scoring uses (256 px windows, 64 px overlap)."""
    from .demo_data import demo_split
    from .metrics import evaluate
    from .seg.predict import predict_tiles

    held_out = demo_split().held_out
    return evaluate(list(predict_tiles(model, [held_out])), [held_out], DEMO.names)


# ---------------------------------------------------------------------------------------------
# diffmix demo --compare: does the synthetic set help the rare class?
# ---------------------------------------------------------------------------------------------
# The three training pools; the same seeds (initial weights and crop order) in each.
ARMS = ("originals", "+synthetic", "+synthetic filtered")
# Steps per run: 9 runs must take minutes on a laptop CPU.
DEMO_COMPARE_STEPS = 150
DEMO_COMPARE_SEEDS = (0, 1, 2)
COMPARE_JSON = "demo-compare.json"
COMPARE_REPORT = "report.html"


@dataclass
class DemoComparison:
    """Held-out results of every run: ``runs[arm]`` is one record per seed (``seed``, ``model``
    folder, ``train_s``, ``synthetic_share``, ``metrics``: the evaluation summary)."""

    out_dir: Path
    runs: dict[str, list[dict[str, Any]]]
    skipped: dict[str, str]
    settings: dict[str, Any]
    machine: dict[str, Any]
    interrupted: bool = False

    @property
    def rare(self) -> list[str]:
        return [DEMO.names[c - 1] for c in DEMO.rare]

    def values(self, arm: str, key: str) -> list[float | None]:
        return [r["metrics"].get(key) for r in self.runs.get(arm, [])]

    def summary(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """arm -> metric -> mean, sd, n over the seeds (None where undefined)."""
        from .metrics import mean_sd
        from .seg.compare import SUMMARY_KEYS

        keys = [f"f1_{n}" for n in DEMO.names] + list(SUMMARY_KEYS)
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for arm in self.runs:
            out[arm] = {}
            for k in keys:
                mean, sd, n = mean_sd(self.values(arm, k))
                out[arm][k] = {"mean": _none(mean), "sd": _none(sd), "n": n}
        return out

    def table(self) -> str:
        from .report import mean_sd_text as cell  # one formatter for the page and the terminal

        names = self.rare + [n for n in DEMO.names if n not in self.rare]
        head = f"{'arm':<22} {'items':>5}  " + "  ".join(f"{('F1 ' + n + (' (rare)' if n in self.rare else '')):<19}" for n in names) + f"  {'PQ':<19}"
        lines = [head]
        for arm, records in self.runs.items():
            items = self.settings["items"][arm]
            row = f"{arm:<22} {items:>5}  " + "  ".join(f"{cell(self.values(arm, 'f1_' + n)):<19}" for n in names)
            lines.append(row + f"  {cell(self.values(arm, 'pq')):<19}")
        for arm, why in self.skipped.items():
            lines.append(f"{arm:<22} {'0':>5}  not trained: {why}")
        rare_key = "f1_" + self.rare[0]
        lines.append("")
        lines.append(f"F1 {self.rare[0]} per seed ({', '.join(str(s) for s in self.settings['seeds'])}): " + "; ".join(
            f"{arm} " + " ".join("n/a" if v is None else f"{v:.3f}" for v in self.values(arm, rare_key)) for arm in self.runs))
        return "\n".join(lines)

    def machine_line(self) -> str:
        m = self.machine
        # A re-run reuses finished runs: their own training time, not this call's, is the cost of the experiment.
        trained = sum(r["train_s"] for records in self.runs.values() for r in records)
        return (f"Measured on {m['cpu']}, {m['threads']} torch thread(s), fp32, load average {m['load_before']:.1f} before / "
                f"{m['load_after']:.1f} after; training the {sum(map(len, self.runs.values()))} runs took {trained / 60:.1f} min, "
                f"this call {m['wall_s'] / 60:.1f} min")

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "machine": self.machine, "skipped": self.skipped, "summary": self.summary(),
                "runs": self.runs, "interrupted": self.interrupted}


def _none(v: float) -> float | None:
    return None if v != v else float(v)  # JSON has no NaN


def _slug(arm: str) -> str:
    return arm.strip("+").replace(" ", "-")


def _same_run(folder: Path, record: dict[str, Any], model_config: Any, config: Any) -> bool:
    """Whether ``folder`` holds this run, finished or not: same arm, seed, store items and recipe,
    at most ``config.steps`` steps. train-seg's own resume checks know the pool by its items' names
    and sizes only, not which store rendered them nor how they were selected."""
    from .errors import CheckpointError
    from .seg.checkpoint import read_seg_meta

    try:
        meta = read_seg_meta(folder)
    except CheckpointError:
        return False  # nothing (readable) there: a new run
    training, saved = meta.get("training", {}), meta.get("training", {}).get("train", {})
    recipe = ("batch_size", "crop_size", "lr", "seed", "synthetic_share")
    return (all(training.get(k) == v for k, v in record.items()) and all(saved.get(k) == getattr(config, k) for k in recipe)
            and meta.get("model") == model_config.to_dict() and int(training.get("step", 0)) <= config.steps)


def run_demo_compare(
    store: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seeds: Sequence[int] = DEMO_COMPARE_SEEDS,
    steps: int = DEMO_COMPARE_STEPS,
    seg_model: str | os.PathLike = "demo",
    min_fidelity: float | None = None,
    batch_size: int = DEMO_SEG_BATCH,
    synthetic_share: float | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> DemoComparison:
    """The miniature DiffMix experiment on the demo: score ``store`` (a ``diffmix demo`` store of
    the training split) with ``seg_model``, then train the demo recipe for ``steps`` on each of
    :data:`ARMS` (the training split alone; + every synthetic item; + the items whose label
    fidelity PQ reaches ``min_fidelity``, default: the median of the items' PQ, so the better half)
    with each seed, and measure every model on the held-out strip.

    ``synthetic_share``: the share of the training crops drawn from the synthetic items (default:
    their share of the training pixels). ``out_dir`` gets ``runs/ARM-seedS/`` (the models), :data:`COMPARE_JSON` and :data:`COMPARE_REPORT`.
    Re-running continues: a run folder that holds the same run (arm, seed, recipe, store and its
    items) is resumed, or only measured again when finished; any other run there is trained afresh.
    So a new threshold retrains only the filtered arm. Ctrl-C stops after the current training step
    (then ``interrupted``).
    """
    import time

    import numpy as np
    import torch

    from .atomic import write_json
    from .errors import DiffMixError
    from .fidelity import DEFAULT_MIN_FIDELITY, fidelity_values, load_scorer, score_store, select_items
    from .outputs import check_replace, write_marker
    from .report import build_comparison_report
    from .runtime import cpu_name
    from .seg.compare import SUMMARY_KEYS
    from .seg.data import open_synthetic_store
    from .seg.train import train_segmentation
    from .store import open_store

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise DiffMixError(f"give one or more different seeds, got {seeds}")
    if steps < 1 or batch_size < 1:
        raise DiffMixError(f"steps and batch size must be >= 1, got {steps}, {batch_size}")
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    out_dir = Path(out_dir)
    check_replace(out_dir, True, ["compare"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, "compare")

    log(f"[score] label fidelity of {store} with the segmentation model {seg_model}")
    scorer = load_scorer(seg_model, device="cpu")
    scored = score_store(store, scorer, min_fidelity=DEFAULT_MIN_FIDELITY if min_fidelity is None else min_fidelity)
    if scored.stopped:
        return DemoComparison(out_dir, {}, {}, {}, {}, interrupted=True)
    st = open_store(store)
    rule = "given"
    if min_fidelity is None:
        # The better half by fidelity. The product's default threshold (0.5) keeps every item of
        # the default demo (PQ 0.78-0.89 measured), which would make this arm a copy of the unfiltered one.
        values = fidelity_values(st)
        min_fidelity, rule = float(np.median(values[np.isfinite(values)])), "median PQ of the items"
    selection = select_items(st, min_fidelity)
    log(f"[score] {selection.text()}")
    pools: dict[str, Any] = {ARMS[0]: None, ARMS[1]: open_synthetic_store(store, DEMO)}
    items = {ARMS[0]: [], ARMS[1]: [int(i) for i in pools[ARMS[1]].indices], ARMS[2]: [int(i) for i in selection.indices]}
    skipped: dict[str, str] = {}
    if selection.kept:
        pools[ARMS[2]] = open_synthetic_store(store, DEMO, min_fidelity=min_fidelity)
    else:
        skipped[ARMS[2]] = f"no synthetic item reaches PQ {min_fidelity:g}"
    crop = min(DEMO_SEG_CROP, *st.patch_shape)  # a crop never larger than the synthetic patches
    settings = {
        "seeds": seeds, "steps": steps, "batch_size": batch_size, "crop_size": crop, "synthetic_share": synthetic_share, "lr": DEMO_SEG_LR, "preset": DEMO_SEG_PRESET,
        "store": str(st.path), "store_fingerprint": st.attrs.get("fingerprint"), "seg_model": str(scorer.info.path),
        "seg_model_sha256": scorer.model_sha256, "min_fidelity": min_fidelity, "min_fidelity_rule": rule,
        "fidelity_selection": selection.to_dict(),
        "kept_items": [int(i) for i in selection.indices],
        "items": {ARMS[0]: 0, ARMS[1]: selection.finished, ARMS[2]: selection.kept},
    }

    data = demo_train_data()
    runs: dict[str, list[dict[str, Any]]] = {}
    interrupted = False
    for arm, pool in pools.items():
        runs[arm] = []
        for seed in seeds:
            model_config, config = demo_seg_configs(steps, seed, threads=threads, checkpoint_every=steps, batch_size=batch_size, crop_size=crop,
                                                    synthetic_share=None if pool is None else synthetic_share)
            folder = out_dir / "runs" / f"{_slug(arm)}-seed{seed}"
            log(f"[{arm}] seed {seed}: training {steps} steps" + ("" if pool is None else f" with {len(pool)} synthetic items"))
            record = {"arm": arm, "seed": seed, "store": str(st.path), "store_fingerprint": settings["store_fingerprint"], "items": items[arm]}
            same = _same_run(folder, record, model_config, config)
            trained = train_segmentation(data, scheme=DEMO, synthetic=pool, model_config=model_config, config=config,
                                         out_dir=folder, resume=same, overwrite=not same, record=record)
            if trained.interrupted:
                interrupted = True
                break
            summary = held_out_evaluation(trained.model).summary()
            runs[arm].append({
                "seed": seed, "model": str(folder),
                "train_s": float(trained.history[-1]["elapsed_s"]) if trained.history else trained.elapsed_s,
                "synthetic_share": {"requested": trained.requested_shares.get("synthetic", 0.0),
                                    "realised": trained.realised_shares.get("synthetic", 0.0)},
                "metrics": {k: _none(float(v)) for k, v in summary.items()},
            })
        if interrupted:
            break
    machine = {"cpu": cpu_name(), "threads": threads or torch.get_num_threads(), "precision": "fp32",
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
               "wall_s": round(time.perf_counter() - t0, 1)}
    result = DemoComparison(out_dir, runs, skipped, settings, machine, interrupted)
    if interrupted:
        return result
    write_json(out_dir / COMPARE_JSON, result.to_dict())
    notes = [f"<h2>Synthetic items</h2><p>{html.escape(selection.text())} (label fidelity scored by "
             f"{html.escape(str(scorer.info.path))}).</p>"]
    notes += [f"<p>{html.escape(arm)}: not trained, {html.escape(why)}.</p>" for arm, why in skipped.items()]
    build_comparison_report(
        out_dir / COMPARE_REPORT, title="napari-diffmix demo --compare",
        intro_html=(f"The demo recipe ({DEMO_SEG_PRESET} preset, {steps} steps, batch {batch_size}, {crop} px crops) trained on "
                    f"the demo tile's training split alone and with the synthetic set (all items, and those with label "
                    f"fidelity PQ &ge; {min_fidelity:g}), seeds {', '.join(map(str, seeds))}; F1 and PQ on the held-out strip. "
                    + html.escape(result.machine_line()) + "."),
        class_names=DEMO.names, rare=result.rare,
        runs={arm: {k: [r["metrics"].get(k) for r in records] for k in records[0]["metrics"]} for arm, records in runs.items()},
        metrics=SUMMARY_KEYS, settings={**settings, "machine": machine}, notes_html=notes,
    )
    return result
