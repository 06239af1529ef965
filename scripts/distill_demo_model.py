"""Distil, measure and ship the bundled 4-step student of the demo model ("demo model (fast)").

    python scripts/distill_demo_model.py --out /work/distill_demo/run            # distil (resumes)
    python scripts/distill_demo_model.py --out RUN --measure                     # + measure
    python scripts/distill_demo_model.py --out RUN --ship                        # + ship if it passes

Distilling runs in three stages on the training split of the demo tile, as the CLI would:

    diffmix distill demo --teacher <bundled demo model> --out RUN   # 700 steps: the demo preset
    diffmix distill --resume --out RUN --steps 1000 --chain-weight 1 --chain-from 700 --crop-size 128 --items 1
    diffmix distill --resume --out RUN --steps 1300 --crop-cycle 64 128

The first is napari_diffmix.distill.PRESETS["demo"]: the pair losses on 4 crops of 64 px. That
student passed the card's first three criteria but painted green speckle, worse on the plugin's
256 px canvas than at the 64 px it learned on. The second adds the loss on the student's whole
run and learns on one 128 px crop per step (the same pixels): clean at 128-256 px, but noise on
a 64 px canvas. The third takes 64 and 128 px crops in turn. (The stages are what happened, in
order; one run with all of it from the start was not tried.)

Measuring
renders every 128 px window of the held-out split from its label map alone (seeds 0..3, fp32,
the same noise for every model) with the student at its own settings, the teacher at the
product default (guided DPM-Solver++, 15 steps) and, for comparison, the teacher at the
student's step count; each is scored with the model card's measure (napari_diffmix.quality),
with the mean absolute difference from the 15-step teacher's images; then the student alone on
whole canvases of the sizes the plugin renders, untiled: the teacher card's 256 px windows and
the held-out strip's 64 px ones. ``--ship`` writes
``resources/models/demo/fast/{demo-fast.safetensors, quality.json, MODEL_CARD.md,
distill_log.csv}``; the teacher's card points to it (a fixed line of its template in
scripts/train_demo_model.py). It refuses a student that fails the measure unless ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVAL_SIZE = 128
# The stages after the preset's, each resumed from the one before with these settings changed.
LATER_STAGES = (
    dict(steps=1000, chain_weight=1.0, chain_from=700, crop_size=128, items=1),
    dict(steps=1300, crop_cycle=(64, 128)),
)


def stage_configs(**settings) -> list:
    """The ``demo`` preset's config with ``settings``, then each later stage's."""
    from napari_diffmix.distill import DistillConfig

    stages = [DistillConfig.from_preset("demo", **settings)]
    for changes in LATER_STAGES:
        stages.append(dataclasses.replace(stages[-1], **changes))
    return stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo-fast", help="run folder (resumed when it has checkpoints)")
    p.add_argument("--measure", action="store_true", help="measure the student against the teacher")
    p.add_argument("--ship", action="store_true", help="measure, then ship the student if it passes")
    p.add_argument("--force", action="store_true", help="ship even if the acceptance measure fails")
    p.add_argument("--teacher", help="the teacher (default: the bundled demo model)")
    p.add_argument("--conditions", default="a 2-core CPU",
                   help="the machine and its load while distilling, for the card (e.g. 'a shared 2-core AMD EPYC, load 1-2')")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import demo_split
    from napari_diffmix.distill import distill
    from napari_diffmix.model.checkpoint import require_bundled_model
    from napari_diffmix.trainloop import list_checkpoints

    run = Path(args.out)
    split = demo_split()
    teacher = Path(args.teacher) if args.teacher else require_bundled_model()
    done = list_checkpoints(run)
    reached = int(done[-1].stem.split("-")[1]) if done else 0
    stages = stage_configs(teacher=str(teacher), out_dir=str(run))
    # The stages not yet done, and the last always (it exports the student).
    for stage in [c for c in stages[:-1] if c.steps > reached] + stages[-1:]:
        result = distill(stage, split.train, scheme=DEMO, val=split.held_out, resume="auto")
        if result.interrupted:
            print(f"interrupted at step {result.step}; run the same command again to resume", file=sys.stderr)
            return 130
    if not (args.measure or args.ship):
        return 0
    figures = measure(run / "model.safetensors", teacher, split.held_out)
    (run / "measure.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "reports"}, indent=2))
    if not args.ship:
        return 0 if figures["passed"] else 1
    if not figures["passed"] and not args.force:
        print("the student fails the acceptance measure; not shipped (--force ships anyway)", file=sys.stderr)
        return 1
    ship(run, figures, args.conditions)
    return 0


def measure(student_file: Path, teacher_file: Path, held_out) -> dict:
    """Quality reports and mean absolute differences (grey levels) from the teacher's 15-step images."""
    import time

    from napari_diffmix.classes import DEMO
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.quality import render_and_measure

    rings = (DEMO.class_id("epithelial"), DEMO.class_id("stromal"))
    teacher, tinfo = load_model(teacher_file)
    student, sinfo = load_model(student_file)
    own = sinfo.default_sampling()
    runs = {
        "teacher_15": (teacher, tinfo, "dpm++2m", 15, tinfo.default_guidance),
        "student": (student, sinfo, own["sampler"], own["steps"], 1.0),
        # The teacher at the student's step count, guided (8 network passes against the student's 4).
        "teacher_4": (teacher, tinfo, "dpm++2m", own["steps"], tinfo.default_guidance),
        # The student's own sampler on the teacher: what distillation adds over a plain 4-step DDIM.
        "teacher_ddim_4": (teacher, tinfo, own["sampler"], own["steps"], tinfo.default_guidance),
    }
    reports, images, seconds = {}, {}, {}
    for name, (model, info, sampler, steps, guidance) in runs.items():
        t0 = time.perf_counter()
        report, rendered, _ = render_and_measure(model, [held_out], DEMO, ring_classes=rings, size=EVAL_SIZE, sampler=sampler,
                                                  steps=steps, guidance=guidance, diffusion=info.diffusion, seed=0)
        seconds[name] = time.perf_counter() - t0
        reports[name] = {**report.to_dict(), "sampler": sampler, "steps": steps, "guidance": guidance}
        images[name] = np.stack(rendered).astype(np.int16)
    reference = images["teacher_15"]
    mad = {name: float(np.abs(img - reference).mean()) for name, img in images.items() if name != "teacher_15"}
    wide = {}
    for name, windows in canvas_windows().items():
        report, _, _ = render_and_measure(student, [], DEMO, ring_classes=rings, sampler=own["sampler"], steps=own["steps"],
                                          guidance=1.0, diffusion=sinfo.diffusion, seed=0, windows=windows)
        wide[name] = report.to_dict()
    return {
        "passed": reports["student"]["passed"], "passed_canvases": all(r["passed"] for r in wide.values()),
        "reports": reports, "student_canvases": wide, "mad_vs_teacher_15": mad, "seconds": seconds,
        "student_sha256": sinfo.sha256, "distilled": sinfo.distilled, "windows": len(reference),
    }


def canvas_windows() -> dict:
    """Whole canvases of the plugin's sizes: the teacher card's 256 px ones
    (``demo_data.demo_canvases``) and the held-out strip's sixteen 64 px windows."""
    from napari_diffmix.demo_data import demo_canvases, demo_split

    return {**demo_canvases(256), "held_out_64": demo_split().held_out.windows(64)}


def ship(run: Path, figures: dict, conditions: str) -> None:
    from napari_diffmix.atomic import write_bytes, write_text
    from napari_diffmix.model.checkpoint import BUNDLED_STUDENT_DIR, read_info
    from napari_diffmix.trainloop import logged_hours

    BUNDLED_STUDENT_DIR.mkdir(parents=True, exist_ok=True)
    target = BUNDLED_STUDENT_DIR / "demo-fast.safetensors"
    write_bytes(target, (run / "model.safetensors").read_bytes())
    info = read_info(target)
    write_text(BUNDLED_STUDENT_DIR / "quality.json", json.dumps({k: v for k, v in figures.items()}, indent=2) + "\n")
    write_text(BUNDLED_STUDENT_DIR / "MODEL_CARD.md", student_card(info, figures, target, logged_hours(run / "log.csv"), conditions))
    shutil.copy(run / "log.csv", BUNDLED_STUDENT_DIR / "distill_log.csv")
    print(f"shipped {target}")


def failed(report: dict) -> str:
    """``": fails X, Y"`` naming the acceptance criteria a report (``QualityReport.to_dict``) misses ("" when it passes)."""
    from napari_diffmix.quality import QualityReport

    misses = QualityReport.from_dict(report).failures()
    return ": fails " + "; ".join(misses) if misses else ""


def student_card(info, figures: dict, target: Path, hours: float, conditions: str) -> str:
    d = info.distilled
    r = figures["reports"]
    mad = figures["mad_vs_teacher_15"]

    def row(name: str, label: str, passes: int) -> str:
        x = r[name]
        return (f"| {label} | {passes} | {x['h_fraction']:.2f} | {x['dab_ratio']:.2f} | {x['hf_ratio']:.2f} | "
                f"{x['off_stain']:.2%} | {'yes' if x['passed'] else 'no'} | {mad.get(name, 0.0):.1f} |")

    def wide(name: str) -> str:
        x = figures["student_canvases"][name]
        return (f"hematoxylin contrast {x['h_fraction']:.2f} x real, ring DAB ratio {x['dab_ratio']:.2f}, noise "
                f"{x['hf_ratio']:.2f} x real, off-stain pixels {x['off_stain']:.2%}: {'PASS' if x['passed'] else 'FAIL'}{failed(x)}")

    stages, start = [], 0
    for config in stage_configs():
        sizes = config.crop_cycle or (config.crop_size,)
        crops = " and ".join(f"{config.crops_at(k)[1]} of {config.crops_at(k)[0]} px" for k in range(len(sizes)))
        chain = ", with the loss on the student's whole run (weight {:g})".format(config.chain_weight) if config.chain_weight else ""
        stages.append(f"steps {start + 1}-{config.steps}: {crops} label-map crops per step{' in turn' if len(sizes) > 1 else ''}{chain}")
        start = config.steps
    history = "; ".join(stages) if start == d["distill_steps"] else (
        f"{d['distill_steps']} steps of {d['items_per_step']} label-map crops of {d['crop_size']} px")

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    steps = d["steps"]
    return "\n".join([
        "# Demo model (fast) card",
        "",
        f"`demo-fast.safetensors`: a {steps}-step student of the demo model (`../demo.safetensors`, its card is",
        "`../MODEL_CARD.md`), made by `diffmix distill` (guided progressive distillation in one round,",
        f"README: Distillation): one network pass per step with the teacher's guidance {d['guidance']:g} folded in, sampler",
        f"`{d['sampler']}` (deterministic DDIM on log-SNR-even steps). Its file records the sampler, the step count and the",
        "teacher's sha256; every renderer uses them by default and refuses other settings.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `../demo.safetensors`, sha256 `{d['teacher_sha256']}` |",
        f"| distilled | {history}; against the teacher's guided DPM-Solver++ at {d['teacher_steps']} steps; AdamW lr {d['lr']:g}, EMA, bf16 "
        f"autocast, seed {d['seed']}; {hours:.2f} h on {conditions} |",
        f"| weights | float32, {target.stat().st_size / 2**20:.1f} MB, sha256 `{info.sha256}` |",
        f"| code | napari-diffmix commit {commit or 'unknown'}; reproduce with `python scripts/distill_demo_model.py --out RUN --ship` |",
        "",
        "## Measured quality (held-out label maps)",
        "",
        f"The teacher card's measure on the held-out split ({figures['windows']} windows of {EVAL_SIZE} px, seeds 0..{figures['windows'] - 1},"
        " fp32, the same noise for every row); the last column is the mean absolute difference (grey levels) from the",
        "teacher's 15-step images:",
        "",
        "| model, sampler | network passes | hematoxylin contrast (x real) | ring DAB ratio | high-frequency noise (x real) "
        "| off-stain pixels | passes | MAD vs teacher 15 |",
        "|---|---|---|---|---|---|---|---|",
        row("teacher_15", "teacher, DPM-Solver++ 15 steps, CFG", 30),
        row("student", f"student, {d['sampler']} {steps} steps", steps),
        row("teacher_4", f"teacher, DPM-Solver++ {steps} steps, CFG", 2 * steps),
        row("teacher_ddim_4", f"teacher, {d['sampler']} {steps} steps, CFG", 2 * steps),
        "",
        f"Student: {'PASS' if figures['passed'] else 'FAIL'} (the same acceptance as the teacher){failed(r['student'])}. "
        f"Measured {datetime.date.today().isoformat()}.",
        "",
        "### On whole canvases of the plugin's sizes, untiled",
        "",
        "Rendered whole with the student's own settings (seeds 0.., fp32). The teacher card's 256 px windows: the demo tile's",
        f"four 256 x 256 windows: {wide('tile')}; the held-out columns as two 256 x 128 windows: {wide('held_out')}.",
        f"The held-out strip's sixteen 64 px windows: {wide('held_out_64')}.",
        "The plugin's default model is the student only if it passes on these too: "
        f"{'it does' if figures['passed_canvases'] else 'it does not'}.",
        "",
        "Good for and not good for: as the teacher (`../MODEL_CARD.md`); it is faster, not better.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
