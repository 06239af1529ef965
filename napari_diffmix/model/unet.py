"""SDM UNet: the ADM (guided-diffusion) UNet with a SPADE-modulated middle and decoder.

Structure (Wang et al., "Semantic Image Synthesis via Diffusion Models", as used by DiffMix):

* the encoder (``input_blocks``) sees only the noisy image and the timestep;
* every residual block of the ``middle_block`` and the ``output_blocks`` normalises with
  ``GroupNorm(affine=False)`` and then modulates with ``x * (1 + gamma(seg)) + beta(seg)``,
  gamma/beta coming from two 3x3 convolutions on the condition resized (nearest) to the
  feature size;
* timestep embedding with scale-shift norm, residual up/down sampling, multi-head attention at
  chosen resolutions, learned sigma (6 output channels).

Module and parameter names follow guided-diffusion / SDM exactly (``time_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, ``in_layers``, ``in_norm``,
``mlp_shared``, ``qkv``, ...) so their EMA ``.pt`` state dicts load without a key map.

Speed API (what the samplers use)
---------------------------------
``forward(x, t, cond)`` equals ``decode(encode(x, t), cond)``. The split exists because

* the encoder never sees the label map, so under classifier-free guidance the conditional
  and the all-zero-condition branches share one encoder pass: ``state.repeat(2)`` and one
  decoder pass on a batch of 2N;
* the label map does not change across sampling steps, so gamma/beta of every SPADE norm can
  be computed once per run with :meth:`SDMUNet.spade_params` (optionally under a memory
  budget; layers that do not fit are computed on the fly) and reused by every step. For the
  all-zero condition they do not depend on the input at all:
  :meth:`SDMUNet.null_spade_params` computes them once per model and image size.

One classifier-free-guidance run, N label maps, 2N decoder batch per step::

    spade = SpadeCache.cat(model.spade_params(cond, max_bytes=budget),
                           model.null_spade_params(H, W, batch=N, max_bytes=budget))
    for t in steps:
        out = model.decode(model.encode(x, t).repeat(2), spade=spade)
        eps_cond, eps_null = out[:N, :3], out[N:, :3]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ..errors import CheckpointError, LabelError, SchemeError

__all__ = [
    "UNetConfig",
    "SDMUNet",
    "EncoderState",
    "SpadeCache",
    "PRESET_SCHEMES",
    "timestep_embedding",
]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an :class:`SDMUNet`; defaults are the published DiffMix/SDM model.

    ``attention_resolutions`` are feature-map sizes in pixels *at* ``image_size`` (the
    guided-diffusion command-line convention, e.g. ``32,16,8`` at 256 px); the network is
    fully convolutional and runs at any size divisible by ``2 ** (len(channel_mult) - 1)``,
    attention staying at the same levels. ``num_head_channels = -1`` means "use
    ``num_heads`` heads" instead of a fixed head width. ``out_channels`` defaults to
    ``in_channels`` (x2 with ``learn_sigma``).
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int | None = None
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    num_heads: int = 4
    cond_channels: int = 6
    spade_hidden: int = 128
    norm_groups: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    learn_sigma: bool = True
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        set_("channel_mult", tuple(int(m) if float(m).is_integer() else float(m) for m in self.channel_mult))
        expected_out = self.in_channels * (2 if self.learn_sigma else 1)
        if self.out_channels is None:
            set_("out_channels", expected_out)
        self._validate(expected_out)

    def _validate(self, expected_out: int) -> None:
        def bad(msg: str) -> CheckpointError:
            return CheckpointError(f"invalid UNet config: {msg}")

        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "cond_channels",
                     "spade_hidden", "norm_groups", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.out_channels != expected_out:
            raise bad(
                f"out_channels={self.out_channels} but in_channels={self.in_channels} with "
                f"learn_sigma={self.learn_sigma} needs {expected_out}"
            )
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise bad(f"channel_mult must be positive numbers, got {self.channel_mult}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise bad(f"num_head_channels must be positive or -1, got {self.num_head_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad(f"dropout must be in [0, 1), got {self.dropout}")
        factor = self.size_multiple
        if self.image_size % factor:
            raise bad(
                f"image_size {self.image_size} is not a multiple of {factor} "
                f"({len(self.channel_mult) - 1} downsamplings)"
            )
        sizes = [self.image_size // 2**level for level in range(len(self.channel_mult))]
        wrong = [r for r in self.attention_resolutions if r not in sizes]
        if wrong:
            raise bad(
                f"attention_resolutions {wrong} are not feature sizes of a {self.image_size} px model "
                f"(feature sizes: {sizes})"
            )

    # -- derived facts ------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_downsample(self) -> tuple[int, ...]:
        """Attention positions as downsampling factors (guided-diffusion's internal form)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def num_classes(self) -> int:
        """Nucleus classes C implied by the condition (background + C one-hot + edge)."""
        return self.cond_channels - 2

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention_resolutions"] = list(self.attention_resolutions)
        data["channel_mult"] = list(self.channel_mult)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Config from :meth:`to_dict` output; unknown keys are an error (likely a newer file)."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"a UNet config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"UNet config has unknown field(s) {unknown}; known fields: {sorted(known)} "
                "(was it written by a newer napari-diffmix?)"
            )
        kwargs = dict(data)
        for key in ("attention_resolutions", "channel_mult"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise CheckpointError(f"invalid UNet config {dict(data)}: {exc}") from None

    def replace(self, **changes: Any) -> "UNetConfig":
        return replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "UNetConfig":
        """A named configuration, optionally with some fields changed.

        ``diffmix-consep`` / ``diffmix-glysac``: the published 256 px models (~652 M
        parameters; 6 / 5 condition channels); ``diffmix-lizard``: the same network for
        Lizard/CoNIC's six classes (8 condition channels). ``demo``: the ~3.5 M-parameter model of the
        bundled demo (3-class scheme, trained on 64 px crops). ``tiny``: 32 px, for tests.
        """
        try:
            base = _PRESETS[name.lower()]
        except KeyError:
            raise CheckpointError(f"unknown model preset {name!r}; presets are {sorted(_PRESETS)}") from None
        return replace(base, **overrides) if overrides else base

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(_PRESETS)


_PRESETS: dict[str, UNetConfig] = {
    "diffmix-consep": UNetConfig(cond_channels=6),
    "diffmix-glysac": UNetConfig(cond_channels=5),
    # Lizard / CoNIC: the same network for their six classes (background + 6 + edges).
    "diffmix-lizard": UNetConfig(cond_channels=8),
    "demo": UNetConfig(
        image_size=64,
        model_channels=32,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=32,
        cond_channels=5,
        spade_hidden=16,
    ),
    "tiny": UNetConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        num_head_channels=16,
        cond_channels=5,
        spade_hidden=16,
        norm_groups=8,
    ),
}

# The class scheme each preset's condition was built for (names in napari_diffmix.classes).
PRESET_SCHEMES: dict[str, str] = {
    "diffmix-consep": "consep",
    "diffmix-glysac": "glysac",
    "diffmix-lizard": "lizard",
    "demo": "demo",
    "tiny": "demo",
}


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _check_groups(groups: int, channels: int) -> None:
    if channels % groups:
        raise CheckpointError(
            f"invalid UNet config: norm_groups={groups} does not divide a {channels}-channel feature map; "
            "choose norm_groups dividing every level's width (and the sums at skip concatenations)"
        )


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with statistics in float32 (half precision loses them over large groups)."""

    def __init__(self, num_groups: int, num_channels: int, affine: bool = True):
        _check_groups(num_groups, num_channels)
        super().__init__(num_groups, num_channels, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # ADM starts every residual branch's last layer at zero: each block is the identity at init.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class SPADEGroupNorm(nn.Module):
    """Parameter-free GroupNorm followed by a condition-dependent per-pixel scale and shift.

    ``downsample`` (the feature map's factor below the input size) lets the cache size and
    compute its gamma/beta before any feature map exists.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, groups: int, downsample: int):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)
        self.channels = channels
        self.downsample = downsample
        self.index = -1  # position among the model's SPADE norms, set by SDMUNet

    def modulation(self, cond: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + gamma, beta)`` for ``cond`` at feature size ``size``."""
        if tuple(cond.shape[-2:]) != tuple(size):
            cond = F.interpolate(cond, size=tuple(size), mode="nearest")
        actv = self.mlp_shared(cond)
        return 1 + self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x: torch.Tensor, spade: "SpadeCache") -> torch.Tensor:
        return spade.modulate(self, self.norm(x))

    def flops_per_pixel(self, cond_channels: int) -> int:
        """Multiply-adds x 2 per output pixel of computing gamma and beta."""
        hidden = self.mlp_shared[0].out_channels
        return 2 * 9 * (cond_channels * hidden + 2 * hidden * self.channels)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """ADM residual block; with ``cond_channels`` its two norms are SPADE norms (SDMResBlock).

    The parameter-free SiLU / Dropout modules sit in the ``nn.Sequential`` containers only so
    that parameter indices match guided-diffusion's (``in_layers.2``, ``out_layers.3``, ...).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dropout: float,
        groups: int,
        use_scale_shift_norm: bool,
        resample: str | None = None,
        cond_channels: int | None = None,
        spade_hidden: int = 128,
        downsample: int = 1,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.conditioned = cond_channels is not None
        if self.conditioned:
            out_ds = downsample // 2 if resample == "up" else downsample * 2 if resample == "down" else downsample
            self.in_norm = SPADEGroupNorm(channels, cond_channels, spade_hidden, groups, downsample)
            self.in_layers = nn.Sequential(nn.SiLU(), _conv3x3(channels, out_channels))
            self.out_norm = SPADEGroupNorm(out_channels, cond_channels, spade_hidden, groups, out_ds)
            self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(_conv3x3(out_channels, out_channels)))
        else:
            self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), _conv3x3(channels, out_channels))
            self.out_layers = nn.Sequential(
                GroupNorm32(groups, out_channels),
                nn.SiLU(),
                nn.Dropout(dropout),
                _zero(_conv3x3(out_channels, out_channels)),
            )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, spade: "SpadeCache | None") -> torch.Tensor:
        h = self.in_norm(x, spade) if self.conditioned else self.in_layers[0](x)
        h = F.silu(h)
        if self.resample:
            h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = self.in_layers[-1](h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self._out_norm(h, spade), 1 + scale)
        else:
            h = self._out_norm(h + emb_out, spade)
        h = self.out_layers[-1](self.out_layers[-2](F.silu(h)))
        return self.skip_connection(x) + h

    def _out_norm(self, h: torch.Tensor, spade: "SpadeCache | None") -> torch.Tensor:
        return self.out_norm(h, spade) if self.conditioned else self.out_layers[0](h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions (guided-diffusion's legacy QKV layout)."""

    def __init__(self, channels: int, *, num_heads: int, num_head_channels: int, groups: int):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise CheckpointError(
                    f"invalid UNet config: num_head_channels={num_head_channels} does not divide "
                    f"the {channels} channels of an attention layer"
                )
            num_heads = channels // num_head_channels
        elif channels % num_heads:
            raise CheckpointError(f"invalid UNet config: num_heads={num_heads} does not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        # 1x1 Conv1d (not Linear) so weight shapes equal guided-diffusion's (C_out, C_in, 1).
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C); a view for channels_last
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        # Legacy order: the 3C channels are grouped per head, each group being [q | k | v].
        q, k, v = qkv.view(b, -1, self.num_heads, 3, c // self.num_heads).permute(3, 0, 2, 1, 4).unbind(0)
        # guided-diffusion scales q and k by ch**-0.25 each: the same 1/sqrt(ch) as SDPA's default.
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, height * width, c)
        out = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + out.view(b, height, width, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Plain downsampling (used when ``resblock_updown`` is off)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op = _conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x) if hasattr(self, "op") else _resample(x, "down")


class Upsample(nn.Module):
    """Plain nearest upsampling with an optional convolution (``resblock_updown`` off)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resample(x, "up")
        return self.conv(x) if hasattr(self, "conv") else x


class _Stage(nn.Sequential):
    """One entry of input_blocks / output_blocks / middle_block (TimestepEmbedSequential)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, spade: "SpadeCache | None", ckpt: bool = False):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = grad_checkpoint(layer, h, emb, spade, use_reentrant=False) if ckpt else layer(h, emb, spade)
            elif isinstance(layer, AttentionBlock) and ckpt:
                h = grad_checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return h


# ---------------------------------------------------------------------------------------------
# encoder state and SPADE cache
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderState:
    """What the decoder needs from the encoder: timestep embedding and skip activations.

    ``skips[-1]`` is the deepest feature map (the middle block's input). ``size`` is the input
    image's (height, width).
    """

    emb: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    size: tuple[int, int]

    @property
    def batch(self) -> int:
        return self.emb.shape[0]

    def repeat(self, k: int) -> "EncoderState":
        """The batch tiled ``k`` times ([x0..xN-1, x0..xN-1, ...]), e.g. for CFG's two branches.

        With a batch of one this is a zero-copy ``expand``.
        """
        if k < 1:
            raise ValueError(f"repeat count must be >= 1, got {k}")
        if k == 1:
            return self

        def tile(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == 1:
                return t.expand(k, *t.shape[1:])
            return t.repeat(k, *([1] * (t.dim() - 1)))

        return EncoderState(tile(self.emb), tuple(tile(s) for s in self.skips), self.size)


@dataclass(frozen=True)
class _SpadePart:
    batch: int
    cond: torch.Tensor | None  # (batch or 1, C, H, W); used for layers missing from ``entries``
    entries: Mapping[int, tuple[torch.Tensor, torch.Tensor]]  # SPADE index -> (1 + gamma, beta)


class SpadeCache:
    """Per-SPADE-norm ``(1 + gamma, beta)`` for one condition batch, reused across steps.

    Built by :meth:`SDMUNet.spade_params` / :meth:`SDMUNet.null_spade_params`; combine the
    caches of CFG's two branches with :meth:`cat` (the order must match the decoder batch).
    Layers absent from the cache (memory budget) are computed from the stored condition on the
    fly, so any cache gives the same output as no cache.
    """

    def __init__(self, parts: Sequence[_SpadePart], size: tuple[int, int], num_layers: int):
        self.parts = tuple(parts)
        self.size = tuple(size)
        self.num_layers = num_layers

    @classmethod
    def on_the_fly(cls, cond: torch.Tensor, num_layers: int) -> "SpadeCache":
        """A cache that caches nothing: the plain forward pass."""
        return cls([_SpadePart(cond.shape[0], cond, {})], tuple(cond.shape[-2:]), num_layers)

    @classmethod
    def cat(cls, *caches: "SpadeCache") -> "SpadeCache":
        """Caches of consecutive batch slices, e.g. ``cat(cond_cache, null_cache)`` for CFG."""
        if not caches:
            raise ValueError("SpadeCache.cat needs at least one cache")
        sizes = {c.size for c in caches}
        if len(sizes) > 1:
            raise ValueError(f"cannot concatenate SPADE caches for different image sizes {sorted(sizes)}")
        return cls([p for c in caches for p in c.parts], caches[0].size, caches[0].num_layers)

    @property
    def batch(self) -> int:
        return sum(p.batch for p in self.parts)

    @property
    def cached_layers(self) -> int:
        """SPADE norms cached in every part (the rest are computed per step)."""
        return min(len(p.entries) for p in self.parts)

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for part in self.parts:
            for pair in part.entries.values():
                for t in pair:
                    if t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
        return total

    def with_batch(self, batch: int) -> "SpadeCache":
        """This single-sample cache broadcast to ``batch`` samples (no copy)."""
        if len(self.parts) != 1 or not self._broadcasts(self.parts[0]):
            raise ValueError("only a cache built from a single condition (batch 1) can be broadcast")
        part = self.parts[0]
        return SpadeCache([_SpadePart(batch, part.cond, part.entries)], self.size, self.num_layers)

    @staticmethod
    def _broadcasts(part: _SpadePart) -> bool:
        tensors = [part.cond] if part.cond is not None else []
        tensors += [t for pair in part.entries.values() for t in pair]
        return all(t.shape[0] == 1 for t in tensors)

    def modulate(self, norm: SPADEGroupNorm, xn: torch.Tensor) -> torch.Tensor:
        if xn.shape[0] != self.batch:
            raise ValueError(f"SPADE cache covers a batch of {self.batch} but the decoder runs {xn.shape[0]}")
        if len(self.parts) == 1:
            return self._modulate_part(self.parts[0], norm, xn)
        outs, start = [], 0
        for part in self.parts:
            outs.append(self._modulate_part(part, norm, xn[start : start + part.batch]))
            start += part.batch
        return torch.cat(outs)

    @staticmethod
    def _modulate_part(part: _SpadePart, norm: SPADEGroupNorm, xn: torch.Tensor) -> torch.Tensor:
        pair = part.entries.get(norm.index)
        if pair is None:
            pair = norm.modulation(part.cond, xn.shape[-2:])
        scale, shift = pair
        return torch.addcmul(shift, xn, scale)


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------
class SDMUNet(nn.Module):
    """Semantic diffusion UNet predicting epsilon (and the sigma interpolation when learned).

    ``forward(x, t, cond)``: ``x`` (N, in_channels, H, W) in model space, ``t`` (N,) or scalar
    timesteps (fractional allowed), ``cond`` (N, cond_channels, H, W) from
    :mod:`napari_diffmix.model.condition`. Returns (N, out_channels, H, W); with learned sigma
    the first ``in_channels`` are epsilon and the rest the variance interpolation ``v``.
    Supports ``channels_last`` (``model.to(memory_format=torch.channels_last)`` and
    channels_last inputs), autocast (bf16/fp16; norms compute in float32) and gradient
    checkpointing (``config.use_checkpoint`` or :meth:`set_gradient_checkpointing`).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = c.use_checkpoint
        mc, groups, emb_dim = c.model_channels, c.norm_groups, 4 * c.model_channels
        attn_ds = set(c.attention_downsample)

        def resblock(cin: int, cout: int, ds: int, *, resample: str | None = None, spade: bool = False) -> ResBlock:
            return ResBlock(
                cin, emb_dim, cout, dropout=c.dropout, groups=groups, use_scale_shift_norm=c.use_scale_shift_norm,
                resample=resample, cond_channels=c.cond_channels if spade else None,
                spade_hidden=c.spade_hidden, downsample=ds,
            )

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=c.num_heads, num_head_channels=c.num_head_channels, groups=groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = input_ch = int(c.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Stage(_conv3x3(c.in_channels, ch))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, int(mult * mc), ds)]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(_Stage(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = resblock(ch, ch, ds, resample="down") if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(_Stage(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = _Stage(resblock(ch, ch, ds, spade=True), attention(ch), resblock(ch, ch, ds, spade=True))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), int(mc * mult), ds, spade=True)]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attention(ch))
                if level and i == c.num_res_blocks:
                    up = resblock(ch, ch, ds, resample="up", spade=True) if c.resblock_updown else Upsample(ch, c.conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), _zero(_conv3x3(input_ch, c.out_channels)))

        # A plain list, so the norms are not registered twice in the state dict.
        self._spade_norms: list[SPADEGroupNorm] = [m for m in self.modules() if isinstance(m, SPADEGroupNorm)]
        for i, norm in enumerate(self._spade_norms):
            norm.index = i
        self._null_cache: dict[tuple, tuple[tuple, SpadeCache]] = {}

    # -- small facts ---------------------------------------------------------------------------
    @property
    def spade_norms(self) -> tuple[SPADEGroupNorm, ...]:
        return tuple(self._spade_norms)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30 % more time)."""
        self.gradient_checkpointing = bool(enabled)

    def _param(self) -> torch.Tensor:
        return self.time_embed[0].weight

    def _use_ckpt(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _check_size(self, height: int, width: int, what: str) -> None:
        m = self.config.size_multiple
        if height % m or width % m:
            raise LabelError(
                f"{what} size {height}x{width} is not a multiple of {m} (the model halves the resolution "
                f"{len(self.config.channel_mult) - 1} times); crop or pad it to a multiple of {m}"
            )

    def _check_cond(self, cond: torch.Tensor, size: tuple[int, int], batch: int | None) -> None:
        if cond.dim() != 4:
            raise ValueError(f"the condition must be (N, C, H, W), got shape {tuple(cond.shape)}")
        if cond.shape[1] != self.config.cond_channels:
            raise SchemeError(
                f"the condition has {cond.shape[1]} channels ({cond.shape[1] - 2} classes) but this model expects "
                f"{self.config.cond_channels} (background + {self.config.num_classes} classes + edges); "
                "use labels of the model's class scheme"
            )
        if tuple(cond.shape[-2:]) != tuple(size):
            raise LabelError(
                f"the label map is {cond.shape[-2]}x{cond.shape[-1]} but the image is {size[0]}x{size[1]}"
            )
        if batch is not None and cond.shape[0] != batch:
            raise ValueError(f"condition batch {cond.shape[0]} does not match the image batch {batch}")

    # -- the network ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, t: torch.Tensor | float) -> EncoderState:
        """Timestep embedding and encoder skip activations (the encoder never sees the labels)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (N, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        self._check_size(x.shape[-2], x.shape[-1], "image")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(self._param().dtype))
        ckpt = self._use_ckpt()
        skips, h = [], x
        for stage in self.input_blocks:
            h = stage(h, emb, None, ckpt)
            skips.append(h)
        return EncoderState(emb, tuple(skips), (x.shape[-2], x.shape[-1]))

    def decode(
        self, state: EncoderState, cond: torch.Tensor | None = None, spade: SpadeCache | None = None
    ) -> torch.Tensor:
        """Middle and decoder blocks. ``spade`` (a cache) replaces ``cond`` when given."""
        if spade is None:
            if cond is None:
                raise ValueError("decode needs a condition or a SPADE cache")
            self._check_cond(cond, state.size, state.batch)
            spade = SpadeCache.on_the_fly(cond, len(self._spade_norms))
        else:
            if spade.size != tuple(state.size):
                raise LabelError(
                    f"the SPADE cache was built for {spade.size[0]}x{spade.size[1]} labels but the image is "
                    f"{state.size[0]}x{state.size[1]}"
                )
            if spade.batch != state.batch:
                raise ValueError(f"SPADE cache batch {spade.batch} does not match the decoder batch {state.batch}")
        ckpt = self._use_ckpt()
        h = self.middle_block(state.skips[-1], state.emb, spade, ckpt)
        for i, stage in enumerate(self.output_blocks):
            h = stage(torch.cat([h, state.skips[-1 - i]], dim=1), state.emb, spade, ckpt)
        return self.out(h)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None, spade: SpadeCache | None = None
    ) -> torch.Tensor:
        return self.decode(self.encode(x, t), cond, spade)

    # -- SPADE caches ---------------------------------------------------------------------------
    def spade_layout(self, height: int, width: int, batch: int = 1, element_size: int = 4) -> list[dict[str, int]]:
        """Per SPADE norm: index, channels, feature size, cache bytes and FLOPs of gamma/beta."""
        out = []
        for norm in self._spade_norms:
            h, w = height // norm.downsample, width // norm.downsample
            out.append({
                "index": norm.index, "channels": norm.channels, "height": h, "width": w,
                "nbytes": 2 * batch * norm.channels * h * w * element_size,
                "flops": batch * h * w * norm.flops_per_pixel(self.config.cond_channels),
            })
        return out

    @torch.no_grad()
    def spade_params(
        self, cond: torch.Tensor, *, max_bytes: int | None = None, dtype: torch.dtype | None = None
    ) -> SpadeCache:
        """Precompute ``(1 + gamma, beta)`` of every SPADE norm for ``cond`` (no autograd).

        With ``max_bytes`` the cache holds the layers that save the most compute per byte
        until the budget is used; the others are computed on the fly at every step, so the
        output is the same either way. ``dtype`` stores the cache in another precision
        (e.g. ``torch.bfloat16`` to halve it; outputs then differ at bf16 precision).
        """
        self._check_cond(cond, tuple(cond.shape[-2:]), None)
        self._check_size(cond.shape[-2], cond.shape[-1], "label map")
        height, width = cond.shape[-2:]
        elem = torch.empty((), dtype=dtype or self._param().dtype).element_size()
        layout = self.spade_layout(height, width, cond.shape[0], elem)
        if max_bytes is not None:
            layout.sort(key=lambda d: -d["flops"] / d["nbytes"])
        entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        used = 0
        for item in layout:
            if max_bytes is not None and used + item["nbytes"] > max_bytes:
                continue
            scale, shift = self._spade_norms[item["index"]].modulation(cond, (item["height"], item["width"]))
            if dtype is not None:
                scale, shift = scale.to(dtype), shift.to(dtype)
            entries[item["index"]] = (scale, shift)
            used += item["nbytes"]
        return SpadeCache([_SpadePart(cond.shape[0], cond, entries)], (height, width), len(self._spade_norms))

    def null_spade_params(
        self,
        height: int,
        width: int,
        *,
        batch: int = 1,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> SpadeCache:
        """Cache for the all-zero (CFG "empty") condition, broadcast to ``batch`` samples.

        Computed once per model, size and dtype and memoised; recomputed automatically when
        the SPADE weights change (training steps, ``load_state_dict``).
        """
        param = self._param()
        key = (height, width, dtype, param.device, max_bytes)
        stamp = tuple((p.data_ptr(), p._version) for n in self._spade_norms for p in n.parameters())
        hit = self._null_cache.get(key)
        if hit is None or hit[0] != stamp:
            zeros = torch.zeros(1, self.config.cond_channels, height, width, device=param.device, dtype=param.dtype)
            self._null_cache[key] = (stamp, self.spade_params(zeros, max_bytes=max_bytes, dtype=dtype))
        return self._null_cache[key][1].with_batch(batch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
