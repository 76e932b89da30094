"""Segmentation losses: soft Dice, and soft Dice + binary cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("dice", "dice+bce")


class SoftDiceLoss(nn.Module):
    """1 - mean over the batch of the per-sample soft Dice
    (2 sum(p g) + smooth) / (sum p + sum g + smooth), computed in float32.

    Input: probabilities p in [0, 1], or with `from_logits=True` logits from which p =
    sigmoid(logits) is computed here in float32 (so that under bf16/fp16 autocast the
    sigmoid's gradient is not rounded to 0 for confident predictions). Shapes (B, C, H, W);
    the target holds 0/1 values of the same shape. Returns a float32 scalar.
    """

    def __init__(self, smooth: float = 1.0, from_logits: bool = False):
        super().__init__()
        self.smooth = smooth
        self.from_logits = from_logits

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = prediction.float().flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        if self.from_logits:
            p = torch.sigmoid(p)
        g = target.float().flatten(1)
        intersection = (p * g).sum(dim=1)
        dice = (2 * intersection + self.smooth) / (p.sum(dim=1) + g.sum(dim=1) + self.smooth)
        return 1 - dice.mean()


class DiceBCELoss(nn.Module):
    """Soft Dice loss + mean binary cross-entropy, weighted 1:1, in float32.

    With `from_logits=True` the cross-entropy is `binary_cross_entropy_with_logits` (the
    numerically stable log-sum-exp form); on probabilities, `binary_cross_entropy` (whose
    log terms PyTorch clamps at -100). Shapes as in `SoftDiceLoss`.
    """

    def __init__(self, smooth: float = 1.0, from_logits: bool = False):
        super().__init__()
        self.dice = SoftDiceLoss(smooth, from_logits)
        self.from_logits = from_logits

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, g = prediction.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(x, g) if self.from_logits else F.binary_cross_entropy(x, g)
        return self.dice(prediction, target) + bce


def build_loss(name: str, from_logits: bool) -> nn.Module:
    """The loss of `--loss NAME` ("dice" or "dice+bce"). Raises ValueError for another name."""
    if name == "dice":
        return SoftDiceLoss(from_logits=from_logits)
    if name == "dice+bce":
        return DiceBCELoss(from_logits=from_logits)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
