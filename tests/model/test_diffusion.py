"""Gaussian diffusion: schedules, respacing, learned-range reverse process, hybrid loss."""

import math

import numpy as np
import pytest
import torch

from napari_diffmix.errors import DiffMixError
from napari_diffmix.model.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)
from napari_diffmix.model.unet import SDMUNet, UNetConfig


def test_linear_schedule_is_the_published_one():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(d.betas) > 0)
    np.testing.assert_allclose(d.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    # Fewer steps keep the overall noise level: betas scale by 1000 / T.
    short = GaussianDiffusion(DiffusionConfig(num_timesteps=100))
    assert short.betas[-1] == pytest.approx(0.2)


def test_cosine_schedule():
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    s = np.arange(1, 1001) / 1000
    expected = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(d.alphas_cumprod[:-5], expected[:-5], rtol=1e-9)
    assert d.betas.max() <= 0.999


def test_config_round_trip_and_errors():
    cfg = DiffusionConfig(schedule="cosine", learn_sigma=False)
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DiffMixError, match="unknown diffusion setting"):
        DiffusionConfig.from_dict({"num_timesteps": 1000, "sigma": 1})
    with pytest.raises(DiffMixError, match="schedule"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(DiffMixError, match="num_timesteps"):
        DiffusionConfig(num_timesteps=1)


def test_space_timesteps():
    np.testing.assert_array_equal(space_timesteps(1000, "ddim100"), np.arange(0, 1000, 10))
    np.testing.assert_array_equal(space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
    ten = space_timesteps(1000, 10)
    assert len(ten) == 10 and ten[0] == 0 and ten[-1] == 999
    sections = space_timesteps(1000, "10,5")
    assert len(sections) == 15 and sections[9] == 499 and sections[10] == 500 and sections[-1] == 999
    np.testing.assert_array_equal(space_timesteps(1000, [2, 2]), [0, 499, 500, 999])
    with pytest.raises(DiffMixError, match="exactly 600 steps"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(DiffMixError, match="cannot take"):
        space_timesteps(10, 11)
    with pytest.raises(DiffMixError, match="bad timestep respacing"):
        space_timesteps(1000, "fast")


def test_respaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    base = GaussianDiffusion()
    r = base.respace("ddim100")
    assert r.num_timesteps == 100 and r.is_respaced and not base.is_respaced
    np.testing.assert_allclose(r.alphas_cumprod, base.alphas_cumprod[::10], rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - r.betas), r.alphas_cumprod, rtol=1e-12)
    t = torch.tensor([0, 54, 99])
    assert r.model_timesteps(t).tolist() == [0, 540, 990]
    rescaled = GaussianDiffusion(DiffusionConfig(num_timesteps=100, rescale_timesteps=True))
    assert rescaled.model_timesteps(torch.tensor([50])).tolist() == [500.0]


def test_q_sample_and_posterior_formulas():
    d = GaussianDiffusion()
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    ab = torch.tensor(d.alphas_cumprod[[0, 500, 999]], dtype=torch.float32).view(-1, 1, 1, 1)
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t[:2].new_tensor([1, 500, 999]), x0)[1:], noise[1:],
                               atol=1e-4, rtol=1e-4)
    # Posterior of q(x_{t-1} | x_t, x0): the Gaussian product of q(x_t | x_{t-1}) and q(x_{t-1} | x0).
    i = 500
    beta, ab_prev = d.betas[i], d.alphas_cumprod[i - 1]
    mean, var, _ = d.q_posterior(x0[1:2], x_t[1:2], torch.tensor([i]))
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    expected_mean = (math.sqrt(ab_prev) / (1 - ab_prev) * x0[1:2] + math.sqrt(1 - beta) / beta * x_t[1:2]) / prec
    torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-5)
    assert float(var.flatten()[0]) == pytest.approx(1 / prec, rel=1e-6)


def test_learned_range_matches_diffusers_ddpm_on_a_respaced_schedule():
    from diffusers import DDPMScheduler

    r = GaussianDiffusion().respace("ddim100")
    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=True, timestep_spacing="leading")
    scheduler.set_timesteps(100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    out = (torch.randn(2, 6, 6, 6, generator=g)).clamp(-1, 1)
    for i in (99, 54, 1, 0):
        t = int(scheduler.timesteps[99 - i])
        assert t == r.timestep_map[i]
        pmv = r.p_mean_variance(out, x, torch.tensor([i, i]), clip_denoised=True)
        step = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        mine = pmv["mean"] + (i > 0) * torch.exp(0.5 * pmv["log_variance"]) * noise
        torch.testing.assert_close(step.pred_original_sample, pmv["pred_x0"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(step.prev_sample, mine, atol=5e-5, rtol=1e-4)


def test_likelihood_helpers():
    zero = torch.zeros(3)
    torch.testing.assert_close(normal_kl(zero, zero, zero, zero), zero)
    assert float(normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))) == 0.5
    # The 256 bins of a Gaussian sum to probability 1.
    levels = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(levels, torch.tensor(0.1), torch.tensor(math.log(0.3)))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def _model(**overrides):
    torch.manual_seed(0)
    return SDMUNet(UNetConfig.preset("tiny", model_channels=16, num_head_channels=16, **overrides))


def test_hybrid_loss_is_per_sample_finite_and_vb_trains_only_sigma():
    d = GaussianDiffusion()
    model = _model()
    with torch.no_grad():  # the ADM output layer starts at zero; give it a signal
        model.out[-1].weight.normal_(0, 0.05)
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    cond = torch.zeros(3, 5, 16, 16)
    cond[:, 0] = 1
    t = torch.tensor([0, 400, 999])
    losses = d.training_losses(model, x0, t, cond, noise=torch.randn_like(x0))
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (3,) and torch.isfinite(value).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()

    # The bound reaches the network only through the variance channels.
    captured = {}

    def spy(x, t, c):
        out = model(x, t, c)
        out.retain_grad()
        captured["out"] = out
        return out

    d.training_losses(spy, x0, t, cond)["vb"].sum().backward()
    grad = captured["out"].grad
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0

    fixed = GaussianDiffusion(DiffusionConfig(learn_sigma=False))
    small = _model(learn_sigma=False, out_channels=3)
    out = fixed.training_losses(small, x0, t, cond)
    assert (out["vb"] == 0).all() and torch.equal(out["loss"], out["mse"])

    with pytest.raises(ValueError, match="6 channels"):
        d.training_losses(small, x0, t, cond)


def test_vb_at_t0_is_the_decoder_nll():
    d = GaussianDiffusion()
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    x_t = d.q_sample(x0, torch.tensor([0]))
    out = torch.zeros(1, 6, 4, 4)
    pmv = d.p_mean_variance(out, x_t, torch.tensor([0]), clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, pmv["mean"], 0.5 * pmv["log_variance"]).mean() / math.log(2)
    assert float(d.vb_terms_bpd(out, x0, x_t, torch.tensor([0]))) == pytest.approx(float(nll), rel=1e-5)


def test_tiny_model_overfits_one_patch():
    """The hybrid loss trains: on one synthetic 16 px patch the loss on a fixed set of
    (t, noise) pairs falls at least 5x within 60 AdamW steps (about 10x in practice)."""
    d = GaussianDiffusion()
    model = _model()
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disc = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 20).float()
    x0 = torch.stack([0.8 - 1.4 * disc, 0.2 - 0.9 * disc, 0.9 - 0.5 * disc])[None]
    cond = torch.stack([1 - disc, disc, torch.zeros_like(disc), torch.zeros_like(disc), torch.zeros_like(disc)])[None]
    g = torch.Generator().manual_seed(0)
    eval_t = torch.randint(0, 1000, (16,), generator=g)
    eval_noise = torch.randn(16, 3, 16, 16, generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(d.training_losses(model, x0.expand(16, -1, -1, -1), eval_t, cond.expand(16, -1, -1, -1),
                                           noise=eval_noise)["loss"].mean())

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    for _ in range(60):
        t = torch.randint(0, 1000, (8,), generator=g)
        loss = d.training_losses(model, x0.expand(8, -1, -1, -1), t, cond.expand(8, -1, -1, -1))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert math.isfinite(after) and after < before / 5, (before, after)
