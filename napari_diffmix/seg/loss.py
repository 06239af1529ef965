"""HoVer-Net's loss: NP and TP cross-entropy + soft Dice, HV MSE + MSGE.

- Dice (HoVer-Net's ``dice_loss``): per channel of the softmax against the one-hot target,
  ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` over the whole batch, summed over
  channels, ``s = 1e-3``.
- MSGE: squared difference of the HV maps' gradients (5x5 Sobel-like kernels, x derivative
  of the horizontal map, y derivative of the vertical map, as the paper defines it) averaged
  over nucleus pixels only.

The weights default to the official PyTorch release (all 1; the paper used 2 for MSGE).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-3) -> torch.Tensor:
    """Summed over classes of 1 - soft Dice; logits (N, K, H, W), target (N, H, W) class ids."""
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    total = prob.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).sum()


def _gradient_kernels(size: int = 5, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    denom = x * x + y * y
    denom[size // 2, size // 2] = 1.0  # centre weight is 0 / 1
    return (x / denom)[None, None], (y / denom)[None, None]


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W): d/dx of the horizontal map, d/dy of the vertical map."""
    kx, ky = _gradient_kernels(5, hv.device, hv.dtype)
    gx = F.conv2d(hv[:, :1], kx, padding=2)
    gy = F.conv2d(hv[:, 1:], ky, padding=2)
    return torch.cat([gx, gy], dim=1)


def msge_loss(pred_hv: torch.Tensor, true_hv: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient error over pixels where ``focus`` (N, H, W) is 1."""
    diff = (hv_gradients(pred_hv) - hv_gradients(true_hv)) ** 2
    focus = focus[:, None].to(diff.dtype).expand_as(diff)
    return (diff * focus).sum() / (focus.sum() + 1e-8)


def hovernet_loss(
    outputs: dict[str, torch.Tensor],
    np_target: torch.Tensor,
    hv_target: torch.Tensor,
    tp_target: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """All six terms (``np_ce``, ``np_dice``, ``hv_mse``, ``hv_msge``, ``tp_ce``, ``tp_dice``)
    and their weighted sum ``loss``. Targets: np/tp (N, H, W) int64, hv (N, 2, H, W) float."""
    terms = {
        "np_ce": F.cross_entropy(outputs["np"].float(), np_target),
        "np_dice": soft_dice_loss(outputs["np"].float(), np_target),
        "hv_mse": F.mse_loss(outputs["hv"].float(), hv_target),
        "hv_msge": msge_loss(outputs["hv"].float(), hv_target, np_target),
        "tp_ce": F.cross_entropy(outputs["tp"].float(), tp_target),
        "tp_dice": soft_dice_loss(outputs["tp"].float(), tp_target),
    }
    w = weights.to_dict()
    terms["loss"] = sum(w[k] * v for k, v in terms.items())
    return terms
