"""Does the synthetic data help? Train baseline and baseline + synthetic, evaluate both.

Both runs share the seed, model, step budget and every other setting; only the training
pool differs. Each model predicts the test set and is scored with :mod:`napari_diffmix.metrics`.
The output folder holds ``baseline/`` and ``augmented/`` (models), ``pred_baseline/`` and
``pred_augmented/`` (generic-format predictions), ``results_*.json`` and ``compare.json``;
``diffmix compare`` adds ``report.html`` (:func:`napari_diffmix.report.comparison_report`: the
per-class F1 of both runs side by side, rare class first, and every metric on one page).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classes import load_scheme
from ..data.crops import SYNTHETIC
from ..errors import DatasetError
from ..metrics import Evaluation, evaluate
from ..outputs import check_replace, write_marker
from .model import SegConfig
from .predict import predict_to_folder
from .train import SegTrainConfig, train_segmentation

RUNS = ("baseline", "augmented")
REPORT = "report.html"
SUMMARY_KEYS = ("f_d", "type_accuracy", "dice", "aji", "aji_plus", "dq", "sq", "pq")


@dataclass
class Comparison:
    baseline: Evaluation
    augmented: Evaluation
    out_dir: Path
    # Share of the training crops drawn from the synthetic store, per run (asked and drawn).
    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    rare: tuple[str, ...] = ()  # the scheme's rare classes, shown first
    settings: dict[str, Any] = field(default_factory=dict)  # what both runs shared (recipe, network, data)

    def runs(self) -> dict[str, dict[str, list[float]]]:
        """run -> metric -> [value]: the shape :func:`napari_diffmix.report.build_comparison_report` takes."""
        return {run: {k: [v] for k, v in ev.summary().items()} for run, ev in zip(RUNS, (self.baseline, self.augmented))}

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(metric, baseline, augmented, augmented - baseline): per-class F1 first."""
        b, a = self.baseline.summary(), self.augmented.summary()
        keys = [f"f1_{n}" for n in self.baseline.class_names] + list(SUMMARY_KEYS)
        return [(k, b[k], a[k], a[k] - b[k]) for k in keys]

    def table(self) -> str:
        lines = [f"{'metric':<22} {'baseline':>9} {'+synthetic':>11} {'diff':>8}"]
        for k, b, a, d in self.rows():
            lines.append(f"{k:<22} {_fmt(b):>9} {_fmt(a):>11} {_fmt(d, signed=True):>8}")
        return "\n".join(lines)

    def shares_line(self) -> str:
        """What each run drew from the synthetic store: without it, the comparison means nothing."""
        parts = []
        for run in RUNS:
            s = self.shares.get(run, {})
            parts.append(f"{run} {s.get('realised', 0.0):.1%}" + (f" (asked {s['requested']:.1%})" if run != "baseline" else ""))
        return "synthetic share of the training crops: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "metrics": {k: {"baseline": clean(b), "augmented": clean(a), "diff": clean(d)} for k, b, a, d in self.rows()},
            "synthetic_share": self.shares,
            "baseline": self.baseline.to_dict(),
            "augmented": self.augmented.to_dict(),
        }


def _fmt(v: float, signed: bool = False) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def compare(
    data: Any,
    synthetic: Any,
    test: Any,
    out_dir: str | os.PathLike,
    *,
    scheme: Any = None,
    model_config: SegConfig | None = None,
    config: SegTrainConfig | None = None,
    overwrite: bool = False,
    predict_kwargs: dict[str, Any] | None = None,
    log: Any = print,
) -> Comparison:
    """Train, predict and evaluate both runs; ``data``/``test`` are datasets, ``synthetic`` a store path."""
    from ..atomic import write_json
    from ..datasets import open_dataset

    scheme = load_scheme(scheme if scheme is not None else data.scheme)
    test_scheme = getattr(test, "scheme", scheme)
    if test_scheme.names != scheme.names:
        raise DatasetError(f"the test set uses classes {list(test_scheme.names)}, the training data {list(scheme.names)}")
    out_dir = Path(out_dir)
    # Only a compare folder of ours is ever cleared: --overwrite on another folder is refused.
    if check_replace(out_dir, overwrite, ["compare"]):
        for name in (*RUNS, *(f"pred_{r}" for r in RUNS)):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, "compare")
    config = config or SegTrainConfig()
    results, shares = {}, {}
    for run in RUNS:
        log(f"[{run}] training {config.steps} steps" + (" with the synthetic store" if run == "augmented" else ""))
        trained = train_segmentation(
            data,
            scheme=scheme,
            synthetic=synthetic if run == "augmented" else None,
            model_config=model_config,
            # The baseline has no synthetic data to draw a share from.
            config=config if run == "augmented" else dataclasses.replace(config, synthetic_share=None),
            out_dir=out_dir / run,
            record={"run": run, "synthetic": None if run == "baseline" else os.fspath(getattr(synthetic, "path", synthetic))},
        )
        shares[run] = {
            "requested": trained.requested_shares.get(SYNTHETIC, 0.0),
            "realised": trained.realised_shares.get(SYNTHETIC, 0.0),
        }
        log(f"[{run}] drew {shares[run]['realised']:.1%} of its training crops from the synthetic store")
        log(f"[{run}] predicting {len(test)} test tile(s)")
        pred_dir = predict_to_folder(trained.model, test, out_dir / f"pred_{run}", scheme, **(predict_kwargs or {}))
        results[run] = evaluate(open_dataset(pred_dir, scheme), test, scheme.names)
        results[run].write(out_dir / f"results_{run}.json")
    settings = {"train": config.to_dict(), "model": trained.model.config.to_dict(),
                "synthetic": os.fspath(getattr(synthetic, "path", synthetic)), "test_tiles": len(test), "scheme": scheme.name}
    comparison = Comparison(results["baseline"], results["augmented"], out_dir, shares,
                            tuple(scheme.names[c - 1] for c in scheme.rare), settings)
    write_json(out_dir / "compare.json", comparison.to_dict())
    return comparison
