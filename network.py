"""U-Net for FLAIR abnormality segmentation: `UNetModel` and its building blocks."""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """[Conv3x3 -> BatchNorm -> ReLU] x 2; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a double conv: halves the size, changes the width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed conv (stride 2), concatenate the skip, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C, h, w) -> (B, C/2, 2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))  # (B, C, 2h, 2w) -> (B, C/2, 2h, 2w)


class UNetModel(nn.Module):
    """U-Net with four down/up levels; returns per-pixel probabilities (sigmoid), or logits."""

    DEPTH = 4  # input height and width must be divisible by 2**DEPTH

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_filters: int = 32):
        super().__init__()
        f = base_filters
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_filters": f}
        self.inc = DoubleConv(in_channels, f)
        self.down1, self.down2, self.down3 = Down(f, 2 * f), Down(2 * f, 4 * f), Down(4 * f, 8 * f)
        self.bottleneck = Down(8 * f, 16 * f)
        self.up4, self.up3 = Up(16 * f, 8 * f), Up(8 * f, 4 * f)
        self.up2, self.up1 = Up(4 * f, 2 * f), Up(2 * f, f)
        self.head = nn.Conv2d(f, out_channels, 1)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        """x: (B, in_channels, H, W), H and W divisible by 16.

        Returns float32 probabilities in [0, 1] of shape (B, out_channels, H, W): the sigmoid
        runs in float32 even under autocast. With `return_logits=True` it returns the logits
        (in the autocast dtype, if any) for a loss that applies the sigmoid itself in float32
        (every loss in `losses.py`): in bf16, sigmoid(x) rounds to exactly 1.0 above
        x ~ 6.2, which would make the gradient of a confident false positive exactly 0.
        """
        height, width = x.shape[-2:]
        multiple = 2**self.DEPTH
        if height % multiple or width % multiple:
            raise ValueError(
                f"UNetModel input height and width must be divisible by {multiple}, got "
                f"{height} x {width}; resize or pad the input (preprocessing does this)"
            )
        x1 = self.inc(x)  # (B, 3, H, W) -> (B, f, H, W)
        x2 = self.down1(x1)  # -> (B, 2f, H/2, W/2)
        x3 = self.down2(x2)  # -> (B, 4f, H/4, W/4)
        x4 = self.down3(x3)  # -> (B, 8f, H/8, W/8)
        x = self.bottleneck(x4)  # -> (B, 16f, H/16, W/16)
        x = self.up4(x, x4)  # -> (B, 8f, H/8, W/8)
        x = self.up3(x, x3)
        x = self.up2(x, x2)
        x = self.up1(x, x1)  # -> (B, f, H, W)
        logits = self.head(x)  # -> (B, out_channels, H, W)
        if return_logits:
            return logits
        return torch.sigmoid(logits.float())  # in [0, 1], float32


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
