"""Sampling speed: the DiffMix reference style against the product's fast default.

Per guided step (one classifier-free-guided network evaluation, CFG 1.5, 256 px), for the
published config (``diffmix-consep``, 652 M parameters) and the demo config, batch 1 and 4:

  reference      two full forwards (condition, zero condition), SPADE gamma/beta computed inside
                 every pass: what the DiffMix code does at every step
  batched        one encoder pass shared by both branches; the decoder as two passes of N on
                 CPUs (measured faster there), one pass on a batch of 2N elsewhere ("joint")
  batched+cache  the same with the SPADE cache, fp32; also "joint" and bf16 (the product
                 default, precision "auto", is the bf16 row where the CPU has bf16)
  forward        one conditional forward (no CFG), SPADE computed inside
  forward+cache  one conditional forward with the SPADE cache

End to end, seconds per image: DiffMix default (``DIFFMIX_SETTINGS``: 100-step DDIM respacing,
SDEdit 0.55 = 55 DDIM steps, CFG as two fp32 forwards, no cache) against the fast default
(``FAST_SETTINGS``: DPM-Solver++(2M), 15 log-SNR-even steps, batched CFG, SPADE cache, precision
"auto", which is bf16 autocast on GPUs and CPUs with avx512_bf16/AMX) and the same in fp32.
A distilled student (``diffmix distill``, README: Distillation) is the row "4-step student":
``ddim-logsnr``, 4 steps, guidance folded in, so one conditional pass per step with the SPADE
cache and the default precision; weights are random here, the cost does not depend on them.
Measured for the demo config; for the published config measured with ``--e2e-published``,
otherwise estimated from the per-step figures (steps x step time + cache fill) and marked "est.".

Targets (2 CPU cores): the product default <= 0.5x the reference per step; the fast default
takes >= 10x fewer seconds per image than the DiffMix default.

Run by hand: ``python benchmarks/bench_sampler.py [--quick] [--threads 2] [--reps 2]``.
``--quick`` skips batch 4 of the published config (several minutes per step on 2 cores).
Weights are random: compute does not depend on their values.

Measured 2026-11-25 (shared 2-core AMD EPYC with avx512_bf16, ``--quick --threads 1 --clock cpu``,
256 px), one run:
diffmix-consep batch 1: reference 79.8 s/step, batched+cache fp32 45.6 s (0.57), the default
(auto = bf16) 25.6 s (0.32); end to end (est.) 4390 s/image DiffMix default vs 412 s fast
default (10.7x), 715 s fast in fp32 (6.1x).
demo batch 1 / 4: per step the default 0.49 / 0.46 (fp32 0.67 / 0.86); end to end 7.2x / 8.4x
(fp32 5.6x / 4.3x).
In float32 the published targets are out of reach by arithmetic: per image the encoder costs
575 GFLOP, the decoder 1665 and the SPADE gamma/beta 1183 (torch FlopCounterMode), so a cached,
encoder-sharing CFG step is at best (575 + 2 * 1665) / (2 * 3423) = 0.57 of two full forwards,
and 15 such steps are at best 6.4x cheaper than 110 forwards. The demo config spends less in
its encoder (7 of 62 GFLOP; SPADE 18, decoder 37): its fp32 bound at 15 steps is 5.7x.

4-step student, measured 2026-12-06 (demo config, ``--presets demo --threads 2 --reps 1``, wall
clock, shared 2-core AMD EPYC at 1-minute load 1.9-3.3, random weights): batch 1 1.40 s/image
against the DiffMix default's 52.8 s (37.7x; the fast default 8.37 s, 6.3x), batch 4 1.97 s
against 71.8 s (36.4x). Network passes per patch: 4 (one encoder and one decoder pass each, no CFG
pair) against DiffMix's 110 full forwards. Published config, by the FLOPs above (not run: minutes
per step here): 4 cached conditional passes cost 4 * (575 + 1665) + 1183 (the SPADE fill) =
10,143 GFLOP, 3.0 full-forward equivalents against 110 (376,530 GFLOP): at best 37x fewer; the
"4-step student" row of the estimate is 4 x the "forward+cache" step time + its fill.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from napari_diffmix.model.samplers import DIFFMIX_SETTINGS, FAST_SETTINGS, Sampler
from napari_diffmix.runtime import native_bf16, resolve_precision
from napari_diffmix.model.unet import SDMUNet, UNetConfig

TARGET_STEP_RATIO = 0.5
TARGET_E2E_SPEEDUP = 10.0
GUIDANCE = 1.5
MODES = {
    # name: (cfg mode, guidance, SPADE cache, precision, decoder passes under batched CFG)
    "reference": ("separate", GUIDANCE, False, "fp32", "auto"),
    "batched": ("batched", GUIDANCE, False, "fp32", "auto"),
    "batched+cache": ("batched", GUIDANCE, True, "fp32", "auto"),
    "batched+cache joint": ("batched", GUIDANCE, True, "fp32", "joint"),
    "batched+cache bf16": ("batched", GUIDANCE, True, "bf16", "auto"),
    "forward": ("separate", 1.0, False, "fp32", "auto"),
    "forward+cache": ("batched", 1.0, True, "fp32", "auto"),
    "forward+cache bf16": ("batched", 1.0, True, "bf16", "auto"),
}
STUDENT_STEPS = 4  # the bundled student's (resources/models/demo/fast)
STUDENT_SETTINGS = {"sampler": "ddim-logsnr", "steps": STUDENT_STEPS, "guidance": 1.0}


def default_mode() -> str:
    """The per-step mode the product's default precision ("auto") runs on this CPU."""
    return "batched+cache bf16" if resolve_precision("auto", "cpu") == "bf16" else "batched+cache"


def condition(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random-disc label maps as a condition (background, classes, edges)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cond = torch.zeros(batch, channels, size, size)
    cls_map = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for _ in range(size * size // 600):
            cy, cx = torch.randint(0, size, (2,), generator=g).float()
            r = 3 + 5 * torch.rand((), generator=g)
            cls_map[b][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = int(torch.randint(1, channels - 1, (), generator=g))
    cond[:, : channels - 1] = torch.nn.functional.one_hot(cls_map, channels - 1).permute(0, 3, 1, 2).float()
    edge = torch.zeros(batch, size, size, dtype=torch.bool)
    edge[:, 1:] |= cls_map[:, 1:] != cls_map[:, :-1]
    edge[:, :, 1:] |= cls_map[:, :, 1:] != cls_map[:, :, :-1]
    cond[:, -1] = edge.float()
    return cond


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_steps(model: SDMUNet, batch: int, size: int, reps: int, clock) -> dict[str, dict[str, float]]:
    """Seconds per guided step for every mode; ``fill``: the first step's extra (cache build)."""
    cond = condition(batch, model.config.cond_channels, size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # warm-up (allocator, oneDNN kernels) so that no mode pays for it
        model(x, torch.full((batch,), 500), cond)
    out = {}
    for name, (cfg, guidance, cache, precision, decoder) in MODES.items():
        runner = Sampler(model, cache=cache, precision=precision, cfg_decoder=decoder)
        times = []
        for _ in range(reps + (1 if cache else 0)):  # with a cache the first call also fills it
            t0 = clock()
            runner.guided_output(x, 500, cond, guidance=guidance, cfg=cfg)
            times.append(clock() - t0)
        step = min(times[1:]) if cache else min(times)
        out[name] = {"step": step, "fill": times[0] - step if cache else 0.0}
        runner.clear_cache()
    return out


def time_end_to_end(model: SDMUNet, size: int, batch: int, clock) -> dict[str, dict[str, float]]:
    cond = condition(batch, model.config.cond_channels, size, seed=2)
    init = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    runs = {
        "DiffMix default": (Sampler(model, cache=False, precision="fp32"), dict(DIFFMIX_SETTINGS, init_image=init)),
        "fast default": (Sampler(model, cache=True), dict(FAST_SETTINGS, guidance=GUIDANCE)),
        "fast, fp32": (Sampler(model, cache=True, precision="fp32"), dict(FAST_SETTINGS, guidance=GUIDANCE)),
        "4-step student": (Sampler(model, cache=True), dict(STUDENT_SETTINGS)),
    }
    out = {}
    for name, (runner, kwargs) in runs.items():
        counts = {"forward": 0, "encoder": 0, "decoder": 0}

        def counter(key):
            def hook(*_):
                counts[key] += 1
            return hook

        hooks = [model.register_forward_pre_hook(counter("forward")),
                 model.input_blocks[0].register_forward_pre_hook(counter("encoder")),
                 model.out.register_forward_pre_hook(counter("decoder"))]
        try:
            t0 = clock()
            last = runner.generate(cond, seed=0, **kwargs)
            seconds = clock() - t0
        finally:
            for h in hooks:
                h.remove()
        out[name] = {"s_per_image": seconds / batch, "steps": last.total, "full_forwards": counts["forward"],
                     "encoder_passes": counts["encoder"], "decoder_passes": counts["decoder"]}
    return out


def estimate_end_to_end(steps: dict[str, dict[str, float]], decoders_per_step: int) -> dict[str, dict[str, float]]:
    diffmix_steps = int(DIFFMIX_SETTINGS["steps"] * DIFFMIX_SETTINGS["strength"])
    fast_steps = FAST_SETTINGS["steps"]
    out = {
        "DiffMix default": {"s_per_image": diffmix_steps * steps["reference"]["step"], "steps": diffmix_steps,
                            "full_forwards": 2 * diffmix_steps, "encoder_passes": 2 * diffmix_steps,
                            "decoder_passes": 2 * diffmix_steps},
    }
    for name, mode in (("fast default", default_mode()), ("fast, fp32", "batched+cache")):
        out[name] = {"s_per_image": fast_steps * steps[mode]["step"] + steps[mode]["fill"], "steps": fast_steps,
                     "full_forwards": 0, "encoder_passes": fast_steps, "decoder_passes": decoders_per_step * fast_steps}
    # One conditional pass per step: no CFG pair to batch or split.
    student = "forward+cache bf16" if default_mode() == "batched+cache bf16" else "forward+cache"
    out["4-step student"] = {"s_per_image": STUDENT_STEPS * steps[student]["step"] + steps[student]["fill"],
                             "steps": STUDENT_STEPS, "full_forwards": 0, "encoder_passes": STUDENT_STEPS,
                             "decoder_passes": STUDENT_STEPS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip batch 4 of the published config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per step (published config: 1)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--presets", default="diffmix-consep,demo")
    ap.add_argument("--e2e-published", action="store_true", help="also run the published config end to end")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    bf16 = "native" if native_bf16("cpu") else "emulated (slow)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px, CFG {GUIDANCE}, "
          f"{args.clock} clock, CPU bf16 {bf16}: the default precision 'auto' is {resolve_precision('auto', 'cpu')}")

    for preset in args.presets.split(","):
        model = SDMUNet(UNetConfig.preset(preset)).eval()
        published = preset.startswith("diffmix")
        batches = (1,) if (published and args.quick) else (1, 4)
        reps = 1 if published else args.reps
        cache_gib = sum(d["nbytes"] for d in model.spade_layout(args.size, args.size)) / 2**30
        print(f"\n== {preset}: {model.num_parameters() / 1e6:.1f} M parameters, SPADE cache {cache_gib:.2f} GiB "
              f"per image at {args.size} px")
        print(f"{'batch':>5} {'mode':<20} {'s/step':>9} {'ratio':>6} {'cache fill s':>12}")
        per_step = {}
        for batch in batches:
            per_step[batch] = time_steps(model, batch, args.size, reps, clock)
            ref = per_step[batch]["reference"]["step"]
            for name, t in per_step[batch].items():
                fill = f"{t['fill']:12.2f}" if MODES[name][2] else f"{'':12}"
                print(f"{batch:5d} {name:<20} {t['step']:9.3f} {t['step'] / ref:6.2f} {fill}")
            for mode in ("batched+cache", "batched+cache bf16"):
                ratio = per_step[batch][mode]["step"] / ref
                default = " (the product default here)" if mode == default_mode() else ""
                print(f"      {mode}{default} / reference = {ratio:.2f} (target <= {TARGET_STEP_RATIO}) "
                      f"{'OK' if ratio <= TARGET_STEP_RATIO else 'MISSED'}")
        print(f"peak RSS so far {peak_rss_gib():.1f} GiB")

        for batch in batches:
            if published and not args.e2e_published:
                decoders = 2 if Sampler(model).cfg_decoder == "split" else 1
                e2e, tag = estimate_end_to_end(per_step[batch], decoders), " (est.)"
            else:
                e2e, tag = time_end_to_end(model, args.size, batch, clock), ""
            print(f"end to end, batch {batch}{tag}:")
            for name, r in e2e.items():
                print(f"  {name:<16} {r['s_per_image']:9.2f} s/image  {r['steps']:3d} steps  network passes: "
                      f"{r['encoder_passes']:3d} encoder, {r['decoder_passes']:3d} decoder "
                      f"({r['full_forwards']} as full forwards)")
            for name in ("fast default", "fast, fp32", "4-step student"):
                speedup = e2e["DiffMix default"]["s_per_image"] / e2e[name]["s_per_image"]
                print(f"  {name}: speed-up {speedup:.1f}x (target >= {TARGET_E2E_SPEEDUP}x) "
                      f"{'OK' if speedup >= TARGET_E2E_SPEEDUP else 'MISSED'}")
        del model


if __name__ == "__main__":
    main()
