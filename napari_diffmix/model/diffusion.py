"""Gaussian diffusion: noise schedules, the forward process, the learned-range reverse process and
the hybrid training loss (improved DDPM, as used by SDM and DiffMix).

Conventions (ADM / guided-diffusion family, so official checkpoints behave as trained):

- ``t`` indexes the diffusion's own timesteps, ``0 .. num_timesteps - 1``; ``t = 0`` is one step of
  noise. A *respaced* diffusion (``respace("ddim100")``) keeps a subset of the original timesteps,
  has its own betas (``1 - alpha_bar[t_i] / alpha_bar[t_{i-1}]``) and a ``timestep_map`` back to
  the original timesteps, which is what the network is evaluated at (:meth:`model_timesteps`).
- The network predicts 6 channels with learned sigma: 3 of epsilon, then 3 values ``v`` in
  roughly [-1, 1] that interpolate the log variance between the posterior variance (beta-tilde,
  ``v = -1``) and beta (``v = +1``).
- All schedule tables are float64 numpy arrays; values are gathered per sample and cast to the
  dtype of the tensor they multiply.
- The training loss is ``mse(eps) + vb_weight * L_vb`` per sample, where ``L_vb`` is the KL term of
  the variational bound for this timestep in bits per dimension (the decoder NLL at ``t = 0``),
  computed with the predicted mean detached so that it only trains the variance channels.
  ``vb_weight = 1`` on the per-timestep term equals the paper's ``lambda = 0.001`` on the summed
  bound of 1000 steps.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from napari_diffmix.errors import DiffMixError

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class DiffusionConfig:
    """Settings of the forward process and the loss; stored next to a model's weights.

    ``beta_start``/``beta_end`` are the linear schedule's ends for 1000 steps; other step counts
    scale both by ``1000 / num_timesteps`` so the process keeps its overall noise level.
    ``rescale_timesteps`` feeds the network ``t * 1000 / num_timesteps`` (float) instead of the
    integer index, as improved-diffusion did for models trained with fewer steps.
    """

    num_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True
    rescale_timesteps: bool = False
    vb_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_timesteps, (int, np.integer)) or self.num_timesteps < 2:
            raise DiffMixError(f"DiffusionConfig.num_timesteps must be an integer >= 2, got {self.num_timesteps!r}")
        if self.schedule not in SCHEDULES:
            raise DiffMixError(
                f"DiffusionConfig.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.schedule == "linear":
            scale = 1000.0 / self.num_timesteps
            if not (0 < self.beta_start * scale <= self.beta_end * scale < 1):
                raise DiffMixError(
                    "DiffusionConfig: the linear schedule needs 0 < beta_start <= beta_end and "
                    f"beta_end * 1000 / num_timesteps < 1, got beta_start={self.beta_start}, "
                    f"beta_end={self.beta_end}, num_timesteps={self.num_timesteps}"
                )
        if self.vb_weight < 0:
            raise DiffMixError(f"DiffusionConfig.vb_weight must be >= 0, got {self.vb_weight}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DiffMixError(
                f"unknown diffusion setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**data)

    def betas(self) -> np.ndarray:
        """The beta table (float64, length ``num_timesteps``)."""
        n = self.num_timesteps
        if self.schedule == "linear":
            scale = 1000.0 / n
            return np.linspace(scale * self.beta_start, scale * self.beta_end, n, dtype=np.float64)
        # Cosine schedule (Nichol & Dhariwal): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
        # betas capped at 0.999 so the last step stays invertible.
        s = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> np.ndarray:
    """Original timesteps kept by a respacing, sorted ascending (improved-diffusion semantics).

    ``spec`` is ``"ddimN"`` (a uniform stride giving exactly N steps starting at 0, e.g. ``ddim100``
    on 1000 steps keeps 0, 10, ..., 990; as in DDIM), an int N (N steps spread evenly over the whole
    range, first and last included), or section counts (a list, or a string ``"10,15,20"``): the
    range is cut into equal sections and each section gets its count of evenly spread steps.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            match = re.fullmatch(r"ddim(\d+)", text)
            if match is None:
                raise DiffMixError(f"bad timestep respacing {spec!r}: expected 'ddimN' with an integer N")
            count = int(match.group(1))
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == count:
                    return np.arange(0, num_timesteps, stride, dtype=np.int64)
            raise DiffMixError(
                f"cannot respace {num_timesteps} steps to exactly {count} steps with a uniform stride "
                f"('{spec}'); use a step count such as {num_timesteps // 10} or an int/section list"
            )
        try:
            sections = [int(part) for part in text.split(",")]
        except ValueError:
            raise DiffMixError(
                f"bad timestep respacing {spec!r}: expected 'ddimN', an integer or comma-separated section counts"
            ) from None
    elif isinstance(spec, (int, np.integer)):
        sections = [int(spec)]
    else:
        sections = [int(s) for s in spec]
    if not sections or any(s < 1 for s in sections):
        raise DiffMixError(f"bad timestep respacing {spec!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(sections))
    kept = []
    start = 0
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise DiffMixError(
                f"bad timestep respacing {spec!r}: cannot take {count} steps from a section of {size} "
                f"(of {num_timesteps} timesteps)"
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept.append(start + np.round(np.arange(count) * stride).astype(np.int64))
        start += size
    return np.unique(np.concatenate(kept))


# Schedule tables on each device they were gathered on, so a sampler step on a GPU copies no
# table (each blocking copy synchronised the stream and kept a step out of a CUDA graph).
# Keyed by id with the table itself kept, so a freed table's id is never mistaken for it.
_ON_DEVICE: dict[tuple[int, torch.device, torch.dtype], tuple[np.ndarray, torch.Tensor]] = {}


def _gather(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[t]`` per sample, shaped to broadcast over ``like`` (N, ...)."""
    # MPS has no float64; everywhere else gather in float64 and round once.
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    key = (id(table), t.device, dtype)
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0] is not table:
        if len(_ON_DEVICE) > 512:  # schedules come and go with respacing: bound the cache
            _ON_DEVICE.clear()
        hit = _ON_DEVICE[key] = (table, torch.from_numpy(table).to(t.device, dtype))
    return hit[1][t.long()].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log probability (nats) of 8-bit data ``x`` in [-1, 1] under a Gaussian, per element.

    Each of the 256 levels owns a bin of width 2/255; the outermost bins extend to +-infinity.
    Uses the exact normal CDF (log-space in the tails) rather than a tanh approximation.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


class GaussianDiffusion:
    """Schedule tables and the maths of one diffusion process (full or respaced).

    Build with a :class:`DiffusionConfig`; :meth:`respace` derives a shorter process over a subset
    of the timesteps (for sampling or evaluating with fewer steps).
    """

    def __init__(self, config: DiffusionConfig | None = None, *, timesteps: Sequence[int] | None = None):
        self.config = config if config is not None else DiffusionConfig()
        base_alpha_bar = np.cumprod(1.0 - self.config.betas())
        if timesteps is None:
            kept = np.arange(self.config.num_timesteps, dtype=np.int64)
        else:
            kept = np.unique(np.asarray(timesteps, dtype=np.int64))
            if kept.size == 0 or kept[0] < 0 or kept[-1] >= self.config.num_timesteps:
                raise DiffMixError(
                    f"respaced timesteps must lie in 0..{self.config.num_timesteps - 1}, got {list(timesteps)[:8]}..."
                )
        self.timestep_map = kept
        alpha_bar = base_alpha_bar[kept]
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        betas = 1.0 - alpha_bar / alpha_bar_prev
        self.num_timesteps = len(kept)
        self.betas = betas
        self.alphas_cumprod = alpha_bar
        self.alphas_cumprod_prev = alpha_bar_prev
        self.sqrt_alphas_cumprod = np.sqrt(alpha_bar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alpha_bar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alpha_bar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alpha_bar - 1.0)
        self.posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # The posterior variance is 0 at t = 0; its log is taken from t = 1 there (it is only
        # the lower end of the learned range and never used to add noise at t = 0).
        posterior = self.posterior_variance if self.num_timesteps == 1 else np.append(
            self.posterior_variance[1], self.posterior_variance[1:]
        )
        self.posterior_log_variance_clipped = np.log(np.maximum(posterior, 1e-20))
        self.log_betas = np.log(betas)
        # The fixed "large" variance (beta, with beta-tilde at t = 0) of models without learned sigma.
        self.log_large_variance = np.log(np.append(self.posterior_variance[1] if len(kept) > 1 else betas[0], betas[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef2 = (1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar)

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.config}, steps={self.num_timesteps})"

    @property
    def is_respaced(self) -> bool:
        return self.num_timesteps != self.config.num_timesteps

    def respace(self, spec: str | int | Sequence[int]) -> "GaussianDiffusion":
        """A diffusion over the original timesteps kept by :func:`space_timesteps` ``(spec)``."""
        return GaussianDiffusion(self.config, timesteps=space_timesteps(self.config.num_timesteps, spec))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network is evaluated at for this diffusion's indices ``t``."""
        original = _gather(self.timestep_map, t, t.long()).reshape(t.shape)
        if self.config.rescale_timesteps:
            return original.float() * (1000.0 / self.config.num_timesteps)
        return original

    # ---- forward process -------------------------------------------------------------------

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        t = self._as_t(t, x0)
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        t = self._as_t(t, x_t)
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t), _gather(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = self._as_t(t, x_t)
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        t = self._as_t(t, x_t)
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def ddim_step(self, pred_x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor | int) -> torch.Tensor:
        """Deterministic DDIM (eta 0): the state at timestep ``t_next`` (per sample; -1 = the
        clean image, alpha_bar 1) on the line through ``pred_x0`` and ``eps``. The sampler of a
        distilled student and the distiller's targets both take this step, so they agree exactly."""
        t_next = torch.as_tensor(t_next, device=pred_x0.device)
        if t_next.ndim == 0:
            t_next = t_next.expand(pred_x0.shape[0])
        final = (t_next < 0).reshape(-1, *([1] * (pred_x0.ndim - 1)))
        index = self._as_t(t_next.clamp_min(0), pred_x0)
        a = torch.where(final, 1.0, _gather(self.sqrt_alphas_cumprod, index, pred_x0))
        s = torch.where(final, 0.0, _gather(self.sqrt_one_minus_alphas_cumprod, index, pred_x0))
        return a * pred_x0 + s * eps

    # ---- reverse process -------------------------------------------------------------------

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``p(x_{t-1} | x_t)`` from the network output at ``x_t``.

        Returns ``mean``, ``variance``, ``log_variance`` and ``pred_x0`` (clamped to [-1, 1] when
        ``clip_denoised``). With learned sigma the variance interpolates log beta-tilde and log beta
        by ``(v + 1) / 2``; without it the fixed "large" variance (beta, with beta-tilde at t = 0) is
        used, as in improved-diffusion.
        """
        t = self._as_t(t, x_t)
        channels = x_t.shape[1]
        if self.config.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned sigma needs {2 * channels} output channels, the model gave {model_output.shape[1]}"
                )
            eps, v = model_output[:, :channels], model_output[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :channels]
            log_variance = _gather(self.log_large_variance, t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_x0": pred_x0}

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim: KL to the true posterior, decoder NLL at t = 0."""
        t = self._as_t(t, x_t)
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss per sample: ``{"loss", "mse", "vb"}``, each of shape (N,).

        ``model(x_t, timesteps, cond)`` is called once; ``cond`` is passed through unchanged
        (zero it for the samples that train the unconditional branch). Without learned sigma
        ``vb`` is zeros and ``loss == mse``.
        """
        t = self._as_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), cond)
        channels = x0.shape[1]
        expected = 2 * channels if self.config.learn_sigma else channels
        if output.shape[1] != expected or output.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"model output {tuple(output.shape)} does not fit the diffusion: expected {expected} channels "
                f"of size {tuple(x0.shape[2:])} (learn_sigma={self.config.learn_sigma})"
            )
        eps = output[:, :channels]
        mse = _mean_flat((noise - eps.float()) ** 2)
        if self.config.learn_sigma:
            # The variance channels learn from the bound; the mean is trained by the MSE only.
            frozen = torch.cat([eps.detach(), output[:, channels:]], dim=1).float()
            vb = self.vb_terms_bpd(frozen, x0.float(), x_t.float(), t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + self.config.vb_weight * vb, "mse": mse, "vb": vb}

    def _as_t(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.shape != (like.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({like.shape[0]},), got {tuple(t.shape)}")
        # The range is checked on CPU only: on an accelerator it would force a sync every call.
        if t.dtype.is_floating_point or (
            t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps)
        ):
            raise ValueError(f"t must be integer indices in 0..{self.num_timesteps - 1}")
        return t.long()
