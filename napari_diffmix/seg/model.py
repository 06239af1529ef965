"""A compact HoVer-Net: residual encoder and three U-Net-style decoder branches.

Branches (Graham et al. 2019): NP (nuclear pixel, 2 logits), HV (horizontal and vertical
distance maps, 2 linear outputs) and TP (nucleus class, C + 1 logits). Each branch has its
own decoder over the shared encoder's skip features, as in HoVer-Net.

Differences from the published network, on purpose: the encoder is a small pre-activation
ResNet written here (no torchvision, no ImageNet weights: nothing is downloaded) whose
width and depth come from :class:`SegConfig`; convolutions are padded so outputs have the
input's size (easy sliding windows); GroupNorm replaces BatchNorm so that small CPU
batches and short runs behave the same in training and evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

BRANCHES = ("np", "hv", "tp")


@dataclass(frozen=True)
class SegConfig:
    """Architecture of :class:`HoVerNet`. ``num_classes`` is C (background excluded)."""

    num_classes: int
    width: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_blocks: int = 2
    decoder_blocks: int = 1
    in_channels: int = 3
    max_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.width < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"width and channel_mult must be positive, got {self.width}, {self.channel_mult}")
        if self.num_blocks < 1 or self.decoder_blocks < 1:
            raise ValueError("num_blocks and decoder_blocks must be >= 1")

    @property
    def stride(self) -> int:
        """Inputs are padded internally to a multiple of this."""
        return 2 ** (len(self.channel_mult) - 1)

    PRESETS = {
        "tiny": dict(width=8, channel_mult=(1, 2, 4), num_blocks=1, decoder_blocks=1),
        "small": dict(width=32, channel_mult=(1, 2, 4, 8), num_blocks=2, decoder_blocks=1),
        "base": dict(width=64, channel_mult=(1, 2, 4, 8), num_blocks=3, decoder_blocks=1),
        # The bundled demo segmentation model and `diffmix demo --compare`: small enough that a
        # shared 2-core CPU trains it in minutes (one res block per level, width 16: 0.65 M parameters).
        "demo": dict(width=16, channel_mult=(1, 2, 4, 8), num_blocks=1, decoder_blocks=1),
    }

    @classmethod
    def preset(cls, name: str, num_classes: int, **overrides: Any) -> "SegConfig":
        """``tiny`` (tests, ~50 k parameters), ``demo`` (the bundled demo model, 0.65 M), ``small``
        (CPU-friendly default) or ``base``."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown segmentation model preset {name!r}; choose {', '.join(cls.PRESETS)}")
        return cls(num_classes=num_classes, **{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"segmentation model config has unknown field(s) {sorted(unknown)}")
        try:
            return cls(**{k: (tuple(v) if k == "channel_mult" else v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid segmentation model config: {exc}") from None


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block; ``stride=2`` halves the resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, max_groups: int = 8):
        super().__init__()
        self.norm1 = _norm(cin, max_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm(cout, max_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin == cout and stride == 1:
            self.skip = None
        elif stride == 1:
            self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        else:
            # ResNet-D shortcut (average, then project) rather than a strided 1x1 conv, which
            # also sidesteps a crash in torch 2.13's CPU backward of strided 1x1 convs on
            # channels-last tensors.
            self.skip = nn.Sequential(nn.AvgPool2d(stride, ceil_mode=True), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x))
        skip = x if self.skip is None else self.skip(h)
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return h + skip


class Decoder(nn.Module):
    """Upsample from the deepest features, fusing each encoder level's skip, to a 1x1 head."""

    def __init__(self, channels: list[int], out_channels: int, blocks: int, max_groups: int):
        super().__init__()
        self.fuse = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(len(channels) - 2, -1, -1):
            cin = channels[level + 1] + channels[level]
            self.fuse.append(nn.Conv2d(cin, channels[level], 1, bias=False))
            self.blocks.append(
                nn.Sequential(*[ResBlock(channels[level], channels[level], max_groups=max_groups) for _ in range(blocks)])
            )
        self.head_norm = _norm(channels[0], max_groups)
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        h = skips[-1]
        for i, (fuse, block) in enumerate(zip(self.fuse, self.blocks)):
            skip = skips[-2 - i]
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(fuse(torch.cat([h, skip], dim=1)))
        return self.head(F.relu(self.head_norm(h)))


class HoVerNet(nn.Module):
    """``forward(x)`` with x (N, 3, H, W) in [-1, 1] -> dict of ``np`` (N, 2, H, W) logits,
    ``hv`` (N, 2, H, W) maps (channel 0 horizontal, 1 vertical) and ``tp`` (N, C + 1, H, W) logits."""

    def __init__(self, config: SegConfig):
        super().__init__()
        self.config = config
        chans = [config.width * m for m in config.channel_mult]
        g = config.max_groups
        self.stem = nn.Conv2d(config.in_channels, chans[0], 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        for i, c in enumerate(chans):
            cin = chans[0] if i == 0 else chans[i - 1]
            blocks = [ResBlock(cin, c, stride=1 if i == 0 else 2, max_groups=g)]
            blocks += [ResBlock(c, c, max_groups=g) for _ in range(config.num_blocks - 1)]
            self.levels.append(nn.Sequential(*blocks))
        outs = {"np": 2, "hv": 2, "tp": config.num_classes + 1}
        self.decoders = nn.ModuleDict({k: Decoder(chans, outs[k], config.decoder_blocks, g) for k in BRANCHES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        x = x.contiguous()  # NHWC-strided inputs (from_numpy + permute) take slower, buggier kernels
        h, w = x.shape[-2:]
        s = self.config.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            # Reflection keeps tissue texture at the border; needs the pad smaller than the side.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = []
        feat = self.stem(x)
        for level in self.levels:
            feat = level(feat)
            skips.append(feat)
        return {k: dec(skips)[..., :h, :w] for k, dec in self.decoders.items()}
