"""Segmentation losses, and the registry that `--loss` chooses from.

Every loss here takes the model's logits (B, C, H, W) and 0/1 targets of the same shape and
returns a float32 scalar. The sigmoid runs inside the loss, in float32: under bf16 (or fp16)
autocast a sigmoid in the autocast dtype rounds confident predictions to exactly 0 or 1 and
their gradient to 0. Training and validation call the same loss on the same kind of input.

A new loss is a class (or any function returning an `nn.Module`) decorated with
`@register_loss(name, description)`: train.py's `--loss` choices, its help text and
`build_loss` all read `LOSSES`, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: `build()` makes the module, `description` is its line in --help."""

    build: Callable[[], nn.Module]
    description: str


# name -> LossEntry, in the order of registration (the order --help lists them in).
LOSSES: dict[str, LossEntry] = {}
DEFAULT_LOSS = "dice"


def register_loss(name: str, description: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: make `build` (called with no arguments; a loss class will do) `--loss name`."""

    def register(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossEntry(build, description)
        return build

    return register


def build_loss(name: str) -> nn.Module:
    """A new instance of the loss registered as `name`. Raises ValueError for another name."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name].build()


def add_loss_flag(add: Callable[..., Any]) -> None:
    """Declare `--loss` through `add` (`utils.RunFlags.add`; it defines the run): its choices
    and help come from LOSSES as registered at that moment."""
    described = "; ".join(f"{name}: {entry.description}" for name, entry in LOSSES.items())
    help = f"training and validation loss ({described})"
    add("--loss", defines_run=True, choices=list(LOSSES), default=DEFAULT_LOSS, help=help)


def soft_dice(p: torch.Tensor, g: torch.Tensor, smooth: float) -> torch.Tensor:
    """Mean over the batch of the per-sample soft Dice of probabilities `p` and 0/1 `g`,
    both (B, N) float32: (2 sum(p g) + smooth) / (sum p + sum g + smooth)."""
    intersection = (p * g).sum(dim=1)
    return ((2 * intersection + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)).mean()


@register_loss("dice", "soft Dice")
class SoftDiceLoss(nn.Module):
    """1 - soft Dice of p = sigmoid(logits) and the target, per sample, averaged over the batch
    (`soft_dice`). The logits are cast to float32 before the sigmoid."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.float().flatten(1))  # (B, C, H, W) -> (B, C*H*W)
        return 1 - soft_dice(p, target.float().flatten(1), self.smooth)


@register_loss("dice+bce", "soft Dice + binary cross-entropy, 1:1")
class DiceBCELoss(nn.Module):
    """`SoftDiceLoss` + mean binary cross-entropy, weighted 1:1, in float32. The cross-entropy
    is `binary_cross_entropy_with_logits` (the numerically stable log-sum-exp form)."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.dice = SoftDiceLoss(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.dice(logits, target) + bce
