"""Soft Dice loss."""

from __future__ import annotations

import torch
from torch import nn


class SoftDiceLoss(nn.Module):
    """1 - mean over the batch of the per-sample soft Dice
    (2 sum(p g) + smooth) / (sum p + sum g + smooth), computed in float32."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = probabilities.float().flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        g = target.float().flatten(1)
        intersection = (p * g).sum(dim=1)
        dice = (2 * intersection + self.smooth) / (p.sum(dim=1) + g.sum(dim=1) + self.smooth)
        return 1 - dice.mean()
