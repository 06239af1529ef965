"""Samplers: generator API, CFG, SPADE cache, seeds, SDEdit, masked edits, tiling, few-step quality."""

import functools
import os
import threading

import numpy as np
import pytest
import torch

from napari_diffmix.errors import DiffMixError, LabelError
from napari_diffmix.model.diffusion import GaussianDiffusion
from napari_diffmix.model import samplers
from napari_diffmix.model.samplers import (
    DIFFMIX_SETTINGS,
    SAMPLERS,
    StepRecord,
    blend_weights,
    condition_key,
    edit_windows,
    from_uint8,
    log_snr_timesteps,
    ode_agreement,
    preview,
    tile_windows,
    to_uint8,
)
from napari_diffmix.model.unet import SDMUNet, UNetConfig

# The exactness checks here compare runs at 1e-5 and need fp32 whatever the CPU; the default
# precision ("auto", bf16 on this kind of CPU) has its own tests at the end.
Sampler = functools.partial(samplers.Sampler, precision="fp32")
sample = functools.partial(samplers.sample, precision="fp32")

SIZE = 16


def _config(**overrides):
    return UNetConfig.preset("tiny", model_channels=16, num_head_channels=16, **overrides)


def _conditions(n, size=SIZE, seed=0):
    """Random one-disc label maps as condition tensors (N, 5, size, size): demo scheme, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy = torch.randint(4, size - 4, (n, 1, 1), generator=g).float()
    cx = torch.randint(4, size - 4, (n, 1, 1), generator=g).float()
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 9).float()
    cls = torch.randint(1, 3, (n, 1, 1), generator=g)
    cond = torch.zeros(n, 5, size, size)
    cond[:, 0] = 1 - disc
    cond[:, 1] = disc * (cls == 1)
    cond[:, 2] = disc * (cls == 2)
    edge = torch.zeros_like(disc)
    edge[:, 1:] += disc[:, 1:] != disc[:, :-1]
    edge[:, :, 1:] += disc[:, :, 1:] != disc[:, :, :-1]
    cond[:, 4] = (edge > 0).float()
    return cond, disc, cls


@pytest.fixture(scope="module")
def model():
    """An untrained tiny SDM UNet whose zero-initialised layers got random weights, so that its
    output depends on the image, the timestep and the label map in every channel."""
    torch.manual_seed(0)
    net = SDMUNet(_config()).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


COND = _conditions(2)[0]


def _final(gen) -> StepRecord:
    last = None
    for last in gen:
        pass
    return last


class Oracle(torch.nn.Module):
    """The exact epsilon for data equal to a per-pixel function of the label map; every correct
    sampler must land on that image (it checks timesteps, tables and solver maths end to end)."""

    def __init__(self):
        super().__init__()
        self.alpha_bar = torch.tensor(GaussianDiffusion().alphas_cumprod, dtype=torch.float32)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the sampler a device

    @staticmethod
    def target(cond):
        return cond[:, 1:4] * 1.6 - 0.8

    def forward(self, x, t, cond):
        ab = self.alpha_bar[t.long()].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.target(cond)) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the inputs of every full forward."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.calls = net, net.config, []

    def forward(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), cond.clone()))
        return self.net(x, t, cond)


# ---- generator API -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps", [("ddim", 5), ("ddpm", 4), ("dpm++2m", 4), ("unipc", 4)])
def test_every_sampler_yields_the_stated_steps(model, name, steps):
    records = list(sample(model, COND, sampler=name, steps=steps, seed=0, guidance=2.0))
    assert [r.step for r in records] == list(range(1, steps + 1))
    assert all(r.total == steps for r in records) and records[-1].done and not records[0].done
    ts = [r.t for r in records]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == steps
    for r in records:
        assert r.x_t.shape == r.pred_x0.shape == (2, 3, SIZE, SIZE)
        assert torch.isfinite(r.x_t).all() and r.pred_x0.abs().max() <= 1
        assert r.seeds == (0, 1)
    assert records[-1].images().shape == (2, SIZE, SIZE, 3)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_recovers_the_data_of_an_exact_model(name):
    cond = COND
    last = _final(sample(Oracle(), cond, sampler=name, steps=8, seed=3, cfg="separate", guidance=1.0))
    torch.testing.assert_close(last.x_t, Oracle.target(cond), atol=2e-3, rtol=0)
    torch.testing.assert_close(last.pred_x0, Oracle.target(cond), atol=2e-3, rtol=0)


def test_stopping_early_leaves_nothing_behind(model):
    model.train()
    rng, threads = torch.get_rng_state(), threading.active_count()
    runner = Sampler(model, precision="bf16")
    gen = runner.sample(COND, steps=6, seed=0)
    first = next(gen)
    # Between steps nothing is held: grad mode and autocast are the caller's, the model is the run's.
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert first.step == 1 and not model.training
    next(gen)
    gen.close()
    assert model.training and gen.gi_frame is None
    assert torch.equal(torch.get_rng_state(), rng) and threading.active_count() == threads
    model.eval()
    # A run after the interrupted one is the same as a run on a fresh sampler.
    again = _final(runner.sample(COND, steps=6, seed=0)).x_t
    fresh = _final(Sampler(model, precision="bf16").sample(COND, steps=6, seed=0)).x_t
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


# ---- classifier-free guidance -------------------------------------------------------------------

def test_guidance_one_is_the_conditional_model(model):
    # DDPM also uses the learned variance, which must come from the conditional branch.
    kwargs = dict(sampler="ddpm", steps=4, seed=5)
    plain = _final(sample(model, COND, guidance=1.0, **kwargs)).x_t
    # 1 + 1e-6 takes the two-branch path: eps(null) + s (eps(cond) - eps(null)).
    near = _final(sample(model, COND, guidance=1.0 + 1e-6, **kwargs)).x_t
    separate = _final(sample(model, COND, guidance=1.0 + 1e-6, cfg="separate", **kwargs)).x_t
    torch.testing.assert_close(near, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(separate, plain, atol=1e-5, rtol=0)
    # Without guidance the model's conditional forward is all there is.
    recorder = Recorder(model)
    _final(sample(recorder, COND, guidance=1.0, cfg="separate", **kwargs))
    assert len(recorder.calls) == 4 and all(torch.equal(c, COND) for _, _, c in recorder.calls)
    guided = _final(sample(model, COND, guidance=3.0, **kwargs)).x_t
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name,decoder", [("ddim", "joint"), ("dpm++2m", "joint"), ("dpm++2m", "split")])
def test_batched_cfg_equals_two_separate_forwards(model, name, decoder):
    kwargs = dict(sampler=name, steps=5, seed=1, guidance=2.5)
    batched = list(Sampler(model, cfg_decoder=decoder).sample(COND, cfg="batched", **kwargs))
    recorder = Recorder(model)
    separate = list(Sampler(recorder).sample(COND, cfg="separate", **kwargs))
    assert len(recorder.calls) == 10  # two full forwards per step, the second with the zero condition
    assert torch.equal(recorder.calls[1][2], torch.zeros_like(COND))
    # Float rounding (~1e-6 per step, see below) grows along the trajectory of a random network.
    for a, b in zip(batched, separate):
        torch.testing.assert_close(a.x_t, b.x_t, atol=2e-4, rtol=0)
        # x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) magnifies eps rounding up to 150x.
        torch.testing.assert_close(a.pred_x0, b.pred_x0, atol=1e-3, rtol=0)


def test_guided_output_batched_equals_separate_forwards(model):
    g = torch.Generator().manual_seed(0)
    for t in (999, 500, 0):
        x = torch.randn(2, 3, SIZE, SIZE, generator=g)
        separate = Sampler(model).guided_output(x, t, COND, guidance=2.5, cfg="separate")
        for cache in (True, False):
            for decoder in ("joint", "split"):
                batched = Sampler(model, cache=cache, cfg_decoder=decoder).guided_output(x, t, COND, guidance=2.5)
                torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)
        with torch.no_grad():
            conditional = model(x, torch.full((2,), t), COND)
            unconditional = model(x, torch.full((2,), t), torch.zeros_like(COND))
        torch.testing.assert_close(separate[:, :3], unconditional[:, :3] + 2.5 * (conditional - unconditional)[:, :3])
        torch.testing.assert_close(separate[:, 3:], conditional[:, 3:])
        torch.testing.assert_close(Sampler(model).guided_output(x, t, COND, guidance=1.0), conditional,
                                   atol=1e-5, rtol=0)


def test_spade_cache_equals_no_cache_and_is_computed_once(model, monkeypatch):
    calls = []  # SPADE parameters computed for a real condition (the model memoises the zero one)
    real = model.spade_params

    def counting(cond, **kw):
        if cond.any():
            calls.append(1)
        return real(cond, **kw)

    monkeypatch.setattr(model, "spade_params", counting)
    kwargs = dict(sampler="dpm++2m", steps=4, seed=2, guidance=2.0)
    cached = Sampler(model, cache=True)
    with_cache = _final(cached.sample(COND, **kwargs)).x_t
    assert len(calls) == 1  # once per run, not once per step
    # Per step the outputs agree to 1e-5 (test above); 2e-4 allows for growth along the trajectory.
    without = _final(Sampler(model, cache=False).sample(COND, **kwargs)).x_t
    torch.testing.assert_close(with_cache, without, atol=2e-4, rtol=0)
    assert len(calls) == 1

    _final(cached.sample(COND.clone(), **kwargs))  # same content: reused
    assert len(calls) == 1
    other = _conditions(2, seed=9)[0]
    on_other = _final(cached.sample(other, **kwargs)).x_t  # new condition: recomputed
    assert len(calls) == 2
    torch.testing.assert_close(on_other, _final(Sampler(model, cache=False).sample(other, **kwargs)).x_t,
                               atol=2e-4, rtol=0)
    assert condition_key(other) != condition_key(COND) and condition_key(COND) == condition_key(COND.clone())

    # A memory cap caches fewer layers (the rest are computed at every step): same result.
    capped = Sampler(model, cache_max_bytes=200_000)
    capped_out = _final(capped.sample(other, **kwargs)).x_t
    cached_layers = next(iter(capped._spade.values())).cached_layers
    assert 0 < cached_layers < len(model.spade_norms)
    torch.testing.assert_close(capped_out, on_other, atol=2e-4, rtol=0)
    calls.clear()

    # Changed SPADE weights invalidate the cache.
    norm = model.spade_norms[0]
    with torch.no_grad():
        norm.mlp_gamma.bias.add_(0.5)
    try:
        changed = _final(cached.sample(other, **kwargs)).x_t
        assert len(calls) == 1
        torch.testing.assert_close(changed, _final(Sampler(model, cache=False).sample(other, **kwargs)).x_t,
                                   atol=2e-4, rtol=0)
    finally:
        with torch.no_grad():
            norm.mlp_gamma.bias.sub_(0.5)


# ---- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpm++2m", 0.0)])
def test_seeds_reproduce_and_batches_match_single_items(model, name, eta):
    kwargs = dict(sampler=name, steps=4, eta=eta, guidance=2.0)
    batch = _final(sample(model, COND, seed=7, **kwargs)).x_t
    torch.testing.assert_close(_final(sample(model, COND, seed=7, **kwargs)).x_t, batch, atol=0, rtol=0)
    torch.testing.assert_close(_final(sample(model, COND, seed=[7, 8], **kwargs)).x_t, batch, atol=0, rtol=0)
    first = _final(sample(model, COND[:1], seed=7, **kwargs)).x_t
    second = _final(sample(model, COND[1:], seed=8, **kwargs)).x_t
    torch.testing.assert_close(torch.cat([first, second]), batch, atol=2e-4, rtol=0)
    other = _final(sample(model, COND, seed=70, **kwargs)).x_t
    assert (other - batch).abs().mean() > 0.05
    fresh = _final(sample(model, COND, seed=None, **kwargs))
    assert len(fresh.seeds) == 2
    torch.testing.assert_close(_final(sample(model, COND, seed=list(fresh.seeds), **kwargs)).x_t, fresh.x_t,
                               atol=0, rtol=0)


# ---- SDEdit and masked edits --------------------------------------------------------------------

def test_log_snr_timesteps_are_even_in_log_snr_and_strictly_decreasing():
    alphas_cumprod = GaussianDiffusion().alphas_cumprod
    log_sigma = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)
    for start, n in ((999, 15), (533, 8), (999, 3)):
        ts = log_snr_timesteps(alphas_cumprod, start, n)
        # n + 1 even points from start to 0, less t = 0 (the solver's last step reaches sigma = 0)
        assert len(ts) == n and ts[0] == start and ts[-1] > 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
        gaps = -np.diff(log_sigma[ts + [0]])
        # even up to rounding to whole timesteps (one timestep moves log-sigma by at most 0.55)
        assert np.abs(gaps - gaps.mean()).max() < 0.3, gaps
    # one step starts where it should (an SDEdit of strength 0.1 at 15 steps)
    assert log_snr_timesteps(alphas_cumprod, 67, 1) == [67]
    # near capacity, rounding collisions near t = 0 are resolved without leaving [0, start]
    for start, n in ((999, 990), (998, 989), (999, 999), (500, 400)):
        ts = log_snr_timesteps(alphas_cumprod, start, n)
        assert len(ts) == n and ts[0] == start and ts[-1] >= 1 and all(a > b for a, b in zip(ts, ts[1:]))
    # as many steps as timesteps: every one of them, down to 0
    assert log_snr_timesteps(alphas_cumprod, 99, 100) == list(range(99, -1, -1))
    with pytest.raises(DiffMixError, match="101 steps do not fit between timestep 99 and 0"):
        log_snr_timesteps(alphas_cumprod, 99, 101)


def test_sdedit_starts_at_the_right_timestep(model):
    init = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    recorder = Recorder(model)
    records = list(sample(recorder, COND[:1], init_image=init, seed=4, **DIFFMIX_SETTINGS))
    # 100-step DDIM respacing, 55 %: start at t = 540 and take 55 steps down to 0.
    assert len(records) == 55 and [r.t for r in records] == list(range(540, -1, -10))
    assert len(recorder.calls) == 110  # CFG as two full forwards, as the reference does
    x_first, t_first, _ = recorder.calls[0]
    assert t_first.tolist() == [540]
    noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x_first, GaussianDiffusion().q_sample(init, torch.tensor([540]), noise))

    # DPM-Solver++: strength 0.5 of 20 steps runs 10 steps from the noise level where the time-even
    # 20-step schedule would be after 10 (t = 500), spaced evenly in log-SNR like the full run.
    alphas_cumprod = GaussianDiffusion().alphas_cumprod
    full = [r.t for r in sample(model, COND[:1], sampler="dpm++2m", steps=20, seed=0)]
    half = [r.t for r in sample(model, COND[:1], sampler="dpm++2m", steps=20, seed=0, init_image=init, strength=0.5)]
    assert full == log_snr_timesteps(alphas_cumprod, 999, 20)
    assert half == log_snr_timesteps(alphas_cumprod, 500, 10)
    # The other solvers take the last steps of their whole schedule.
    full = [r.t for r in sample(model, COND[:1], sampler="unipc", steps=20, seed=0)]
    half = [r.t for r in sample(model, COND[:1], sampler="unipc", steps=20, seed=0, init_image=init, strength=0.5)]
    assert half == full[10:] and half[0] == 500
    # With strength 1 the exact model recovers its data from (almost) pure noise of the init image.
    last = _final(sample(Oracle(), COND, sampler="dpm++2m", steps=10, init_image=init.expand(2, -1, -1, -1),
                         strength=1.0, cfg="separate", guidance=1.0))
    torch.testing.assert_close(last.x_t, Oracle.target(COND), atol=2e-3, rtol=0)


@pytest.mark.parametrize("strength", [None, 0.6])
def test_masked_edit_keeps_the_unmasked_region(model, strength):
    image = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[4:11, 5:12] = True
    records = list(sample(model, COND, sampler="dpm++2m", steps=5, seed=0, init_image=image, mask=mask,
                          strength=strength))
    out = records[-1].images()
    assert np.array_equal(out[:, ~mask], image[:, ~mask])  # exact, after the final paste-back
    assert np.abs(out[:, mask].astype(int) - image[:, mask]).mean() > 5
    init = from_uint8(image)
    for r in records:  # previews show the edit in its context
        assert torch.equal(r.pred_x0[:, :, ~torch.from_numpy(mask)], init[:, :, ~torch.from_numpy(mask)])


# ---- tiling -----------------------------------------------------------------------------------

def test_tile_windows_and_weights():
    windows = tile_windows(40, 28, 16, 4)
    covered = np.zeros((40, 28), int)
    for y, x, h, w in windows:
        assert (h, w) == (16, 16) and y + h <= 40 and x + w <= 28
        covered[y : y + h, x : x + w] += 1
    assert covered.min() >= 1
    assert tile_windows(10, 12, 16, 4) == [(0, 0, 10, 12)]
    w = blend_weights(16, 16, 4)
    assert w.min() > 0 and w.max() == 1 and w[8, 8] == 1 and w[0, 0] < w[2, 2]
    with pytest.raises(DiffMixError, match="overlap"):
        tile_windows(40, 40, 16, 16)


def test_tiled_rendering(model):
    cond = _conditions(1, size=28, seed=3)[0]
    # Exact per-pixel model: blending windows must reproduce its data everywhere, seams included.
    oracle = _final(sample(Oracle(), cond, sampler="ddim", steps=6, seed=0, tile_size=16, tile_overlap=4,
                           cfg="separate", guidance=1.0))
    torch.testing.assert_close(oracle.x_t, Oracle.target(cond), atol=2e-3, rtol=0)
    runner = Sampler(model)
    records = list(runner.sample(cond, steps=4, seed=0, tile_size=16, tile_overlap=4, guidance=2.0))
    assert len(records) == 4 and records[-1].x_t.shape == (1, 3, 28, 28) and torch.isfinite(records[-1].x_t).all()
    # The windows go through the network as one batch: one SPADE cache entry holding all of them.
    assert list(runner._spade) == [tuple(tile_windows(28, 28, 16, 4))]
    # One window per call renders the same image.
    single = Sampler(model, tile_batch=1)
    one_by_one = _final(single.sample(cond, steps=4, seed=0, tile_size=16, tile_overlap=4, guidance=2.0))
    # (batched convolutions round differently: far below one grey level, 1/127.5)
    torch.testing.assert_close(one_by_one.x_t, records[-1].x_t, atol=5e-4, rtol=0)
    assert len(single._spade) == len(tile_windows(28, 28, 16, 4))
    # A tile as large as the canvas is the untiled run.
    whole = _final(Sampler(model).sample(COND, steps=4, seed=0, tile_size=SIZE)).x_t
    torch.testing.assert_close(whole, _final(Sampler(model).sample(COND, steps=4, seed=0)).x_t, atol=0, rtol=0)


def test_edit_windows_cover_the_mask_with_context():
    mask = np.zeros((64, 64), bool)
    mask[10:14, 20:26] = True
    [(y, x, h, w)] = edit_windows(mask, context=4, multiple=8)
    # The edit with 4 px around it, sides rounded up to the multiple, inside the canvas.
    assert y <= 6 and x <= 16 and y + h >= 18 and x + w >= 30 and h % 8 == 0 and w % 8 == 0
    assert y >= 0 and x >= 0 and y + h <= 64 and x + w <= 64 and h * w < 64 * 64 // 8
    # Two edits far apart: a window each; close together: one window.
    mask[50:54, 50:54] = True
    assert len(edit_windows(mask, context=4, multiple=8)) == 2
    assert len(edit_windows(mask, context=20, multiple=8)) == 1
    # An edit at the border: the window is shifted inside the canvas, not cut.
    corner = np.zeros((64, 64), bool)
    corner[:2, 60:] = True
    assert edit_windows(corner, context=4, multiple=8) == [(0, 56, 8, 8)]
    # Windows as large as the canvas: the canvas; no edit: no window; a batch: the union.
    assert edit_windows(np.ones((64, 64), bool), 4, 8) == [(0, 0, 64, 64)]
    assert edit_windows(np.zeros((64, 64), bool), 4, 8) == []
    assert len(edit_windows(np.stack([mask, corner]), 4, 8)) == 3


class ShapeLog(torch.nn.Module):
    """The Oracle, logging the (h, w) of every image it is asked about and every call."""

    def __init__(self):
        super().__init__()
        self.oracle, self.shapes = Oracle(), []
        self.config = type("Config", (), {"image_size": 16, "size_multiple": 4, "cond_channels": 5})()

    def forward(self, x, t, cond):
        self.shapes.append(tuple(x.shape))
        return self.oracle(x, t, cond)


def test_local_edit_computes_only_the_windows_around_the_edit(model):
    size = 48
    cond = _conditions(1, size=size, seed=5)[0]
    image = np.random.default_rng(2).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[6:12, 30:36] = True  # one small edit
    net = ShapeLog()
    kwargs = dict(sampler="dpm++2m", steps=5, seed=0, init_image=image, mask=mask, cfg="separate", guidance=1.0)
    local = _final(sample(net, cond, edit_context=4, **kwargs))
    # Every network call saw the edit's window (6 + 2 * 4 px, rounded up to 4: 16 x 16), never the canvas.
    assert set(net.shapes) == {(1, 3, 16, 16)} and len(net.shapes) == 5
    net.shapes.clear()
    whole = _final(sample(net, cond, edit_context=None, **kwargs))
    assert set(net.shapes) == {(1, 3, size, size)}
    # A per-pixel exact model gives the same image either way; outside the mask the init image, exactly.
    torch.testing.assert_close(local.x_t, whole.x_t, atol=1e-5, rtol=0)
    out = local.images()[0]
    assert np.array_equal(out[~mask], image[0][~mask])
    assert np.abs(out[mask].astype(int) - image[0][mask]).mean() > 5

    # The tiny SDM UNet: same guarantees with batched CFG and two edits far apart (two windows).
    mask[38:42, 4:8] = True
    runner = Sampler(model)
    encoded = []
    encode = runner._encode
    runner._encode = lambda x, t: encoded.append(tuple(x.shape[-2:])) or encode(x, t)
    last = _final(runner.sample(cond, sampler="dpm++2m", steps=3, seed=0, init_image=image, mask=mask, guidance=2.0,
                                edit_context=2))
    assert sorted(set(encoded)) == [(8, 8), (10, 10)] and len(encoded) == 2 * 3
    out = last.images()[0]
    assert np.array_equal(out[~mask], image[0][~mask]) and np.abs(out[mask].astype(int) - image[0][mask]).mean() > 5


def test_should_stop_acts_between_windows_cfg_halves_and_network_stages(model):
    cond = _conditions(1, size=28, seed=3)[0]
    calls = []

    def stop_after(n):
        def should_stop():
            return len(calls) >= n
        return should_stop

    runner = Sampler(model, tile_batch=1, cfg_decoder="split")
    decode = runner._decode
    runner._decode = lambda *a, **k: calls.append(1) or decode(*a, **k)
    windows = len(tile_windows(28, 28, 16, 4))
    # Stop requested after the first decoder pass: the second CFG half of the first window never runs.
    records = list(runner.sample(cond, steps=4, seed=0, tile_size=16, tile_overlap=4, guidance=2.0,
                                 should_stop=stop_after(1)))
    assert records == [] and len(calls) == 1
    # Stop after two windows (two decoder passes each) of the first step: no third window.
    calls.clear()
    records = list(runner.sample(cond, steps=4, seed=0, tile_size=16, tile_overlap=4, guidance=2.0,
                                 should_stop=lambda: len(calls) >= 4 and len(calls) % 2 == 0))
    assert records == [] and len(calls) == 4 < 2 * windows
    # Within a network pass: the stop lands before the next UNet stage, not at the end of the pass.
    stages = []
    hooks = [stage.register_forward_hook(lambda *a: stages.append(1))
             for stage in [*model.input_blocks, *model.output_blocks]]
    try:
        records = list(Sampler(model).sample(cond, steps=4, seed=0, guidance=2.0, should_stop=lambda: len(stages) >= 2))
    finally:
        for hook in hooks:
            hook.remove()
    assert records == [] and len(stages) == 2 < len(model.input_blocks)
    # Never asked to stop: every step, two halves per window.
    calls.clear()
    records = list(runner.sample(cond, steps=2, seed=0, tile_size=16, tile_overlap=4, guidance=2.0,
                                 should_stop=lambda: False))
    assert len(records) == 2 and len(calls) == 2 * 2 * windows


# ---- helpers and errors ---------------------------------------------------------------------------

def test_uint8_round_trip_and_preview():
    image = np.random.default_rng(1).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    x = from_uint8(image)
    assert x.shape == (2, 3, 9, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), image)
    assert preview(x, index=1).shape == (9, 7, 3)
    big = torch.zeros(1, 3, 1000, 600)
    assert preview(big, max_side=256).shape == (250, 150, 3)
    with pytest.raises(DiffMixError, match="uint8"):
        from_uint8(image.astype(np.float32))


def test_clear_errors(model):
    with pytest.raises(DiffMixError, match="unknown sampler"):
        sample(model, COND, sampler="euler")
    with pytest.raises(LabelError, match="channels"):
        sample(model, torch.zeros(1, 6, SIZE, SIZE))
    with pytest.raises(DiffMixError, match="needs an init_image"):
        sample(model, COND, strength=0.5)
    with pytest.raises(DiffMixError, match="needs the init_image"):
        sample(model, COND, mask=np.ones((SIZE, SIZE), bool))
    with pytest.raises(LabelError, match="edit mask"):
        sample(model, COND, init_image=torch.zeros(2, 3, SIZE, SIZE), mask=np.ones((5, 5), bool))
    with pytest.raises(DiffMixError, match="seeds"):
        sample(model, COND, seed=[1, 2, 3])
    with pytest.raises(DiffMixError, match="eta only applies"):
        sample(model, COND, sampler="dpm++2m", eta=0.5)
    with pytest.raises(DiffMixError, match="learn_sigma"):
        Sampler(model, {"learn_sigma": False})


# ---- few-step quality ----------------------------------------------------------------------------

def _synthetic_batch(n, g):
    """Label maps with one nucleus and images: class colours, random brightness and a random
    horizontal ramp, so that samples from different noise differ."""
    cond, disc, cls = _conditions(n, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    xx = torch.arange(SIZE).float() / SIZE - 0.5
    background = torch.tensor([0.7, 0.3, 0.6]).view(1, 3, 1, 1)
    nucleus = torch.where((cls == 1)[:, None], torch.tensor([-0.6, -0.8, 0.1]).view(1, 3, 1, 1),
                          torch.tensor([0.1, -0.6, -0.3]).view(1, 3, 1, 1))
    shift = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.6
    ramp = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.6 * xx
    return (background + disc[:, None] * (nucleus - background) + shift + ramp).clamp(-1, 1), cond


def test_few_step_solvers_follow_the_ode_of_a_trained_model():
    """DPM-Solver++(2M) and UniPC at 15-20 steps land within 4/255 (mean absolute per pixel) of
    100-step deterministic DDIM from the same noise, and at most a tenth of the distance between
    DDIM samples from different noise (measured: ~1 vs ~70 after 120 training steps)."""
    diffusion = GaussianDiffusion()
    torch.manual_seed(0)
    net = SDMUNet(_config())
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0)
    for _ in range(120):
        x0, cond = _synthetic_batch(8, g)
        loss = diffusion.training_losses(net, x0, torch.randint(0, 1000, (8,), generator=g), cond)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    cond = _conditions(2, seed=5)[0]
    for name, steps in (("dpm++2m", 15), ("dpm++2m", 20), ("unipc", 20)):
        result = ode_agreement(net, cond, sampler=name, steps=steps, seed=0)
        assert result["distance"] < 4.0 and result["ratio"] < 0.1, (name, steps, result)


def test_dpm_solver_follows_the_ode_of_the_demo_model(demo_model_file, one_torch_thread):
    """The shipped model at its own guidance: DPM-Solver++(2M) at 15 log-SNR-even steps lands within
    2 grey levels of 100-step DDIM from the same noise (mean absolute per pixel), under an eighth
    of the distance between samples from different noise. Measured at 64 px: 1.2 (ratio 0.07);
    steps even in time gave 2.8 (0.17), and 9.7 vs 12.0 at 128 px (docs/design-notes.md)."""
    from napari_diffmix.classes import DEMO
    from napari_diffmix.demo_data import demo_split
    from napari_diffmix.model.checkpoint import load_model
    from napari_diffmix.model.condition import condition_batch

    net, info = load_model(demo_model_file)
    held_out = demo_split().held_out
    windows = [held_out.crop(y, 32, 64, 64) for y in (0, 256)]
    cond = condition_batch([w.inst_map for w in windows], [w.type_map for w in windows], DEMO)
    result = ode_agreement(net, cond, diffusion=info.diffusion, steps=15, guidance=info.default_guidance)
    assert result["distance"] < 2.0 and result["ratio"] < 0.12, result


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_sampler_renders_what_the_eager_one_does(model, monkeypatch):
    """``compile=True`` (torch.compile of the encoder and decoder) really compiles, and changes
    the numbers only by float rounding; where the CPU backend's toolchain is missing, the sampler
    says so at once. Slow (about 30 s of compiling on 2 cores)."""
    import torch._dynamo

    from napari_diffmix.model.samplers import _cpu_compile_missing

    if _cpu_compile_missing() is None:
        # Inductor leaves variables in os.environ (one holds a pointer into this process); the
        # torchrun tests later start child processes with this environment.
        environ = dict(os.environ)
        try:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            eager = _final(Sampler(model).sample(COND[:1], steps=3, seed=0)).x_t
            compiled = _final(Sampler(model, compile=True).sample(COND[:1], steps=3, seed=0)).x_t
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # encoder and decoder
            torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
        finally:
            torch._dynamo.reset()
            os.environ.clear()
            os.environ.update(environ)
    else:
        with pytest.raises(DiffMixError, match="compile=True on the CPU needs"):
            Sampler(model, compile=True)
    # Without a C++ compiler, or without Python's headers, the sampler refuses before any step.
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(DiffMixError, match="compile=True on the CPU needs a C\\+\\+ compiler"):
        Sampler(model, compile=True)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"include": "/nonexistent"})
    with pytest.raises(DiffMixError, match="needs Python's C headers \\(/nonexistent/Python.h"):
        Sampler(model, compile=True)
