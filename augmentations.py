"""Batched, on-device training augmentation: random isotropic scale, rotation and
horizontal flip composed into one affine transform and applied with one resampling.

Everything training knows about augmentation is here: the flags and their checks
(`add_augmentation_flags`, `validate_augmentation_args`) and `build_augmentation`, which
gives train.py one callable per epoch, `images, masks = augment(images, masks)` once per
batch. That callable (`EpochAugmentation`) draws the whole epoch's parameters at once
(`BatchAugmentation.epoch_matrices`) and copies them to the device in one transfer, so the
step loop never waits for the host."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from utils import UsageError

# What training calls once per batch: (images (B, C, H, W), masks (B, 1, H, W)) -> the same.
Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def add_augmentation_flags(add: Callable[..., Any]) -> None:
    """Declare the augmentation's flags through `add` (`utils.RunFlags.add`); each defines
    the run, so a resumed run may not change it."""
    add("--aug-scale", defines_run=True, type=float, default=0.05, help="random scale in [1-s, 1+s]")
    add("--aug-angle", defines_run=True, type=float, default=15.0, help="random rotation in [-a, a] degrees")
    add("--aug-flip", defines_run=True, type=float, default=0.5, help="probability of a horizontal flip")


def validate_augmentation_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for values `BatchAugmentation` cannot use."""
    if not 0 <= args.aug_scale < 1 or not (math.isfinite(args.aug_angle) and args.aug_angle >= 0):
        raise UsageError("--aug-scale must be in [0, 1) and --aug-angle >= 0")
    if not 0 <= args.aug_flip <= 1:
        raise UsageError(f"--aug-flip {args.aug_flip}: must be in [0, 1]")


def build_augmentation(
    args: argparse.Namespace, seed: int, steps: int, batch_size: int, device: torch.device, first_step: int = 0
) -> Augment:
    """The augmentation of one training epoch of `steps` batches of `batch_size` slices on
    `device`, from the run's flags and this epoch's `seed`: a callable, once per batch. Its
    first call applies batch `first_step` (0-based) of the epoch: a run resumed within an
    epoch gets the transforms an uninterrupted one would have applied from there."""
    augmentation = BatchAugmentation(args.aug_scale, args.aug_angle, args.aug_flip, seed=seed)
    return EpochAugmentation(augmentation, steps, batch_size, device, first_step)


def random_affine_parameters(
    batch: int, scale: float, angle: float, flip_prob: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per-sample parameters drawn on the CPU: scale ~ U(1-s, 1+s), angle ~ U(-a, a)
    degrees, flip ~ Bernoulli(flip_prob). Returns float32 tensors of shape (B,)."""
    u = torch.rand(3, batch, generator=generator)
    return {"scale": 1 + scale * (2 * u[0] - 1), "angle": angle * (2 * u[1] - 1), "flip": (u[2] < flip_prob).float()}


def affine_matrices(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2, 3) matrices for `F.affine_grid`, mapping output to input coordinates:
    content is flipped, rotated by `angle` and magnified by `scale` about the centre."""
    radians = params["angle"] * (math.pi / 180)
    cos, sin = torch.cos(radians) / params["scale"], torch.sin(radians) / params["scale"]
    sign = 1 - 2 * params["flip"]  # -1 mirrors x
    zero = torch.zeros_like(cos)
    row_x = torch.stack([cos * sign, -sin, zero], dim=1)
    row_y = torch.stack([sin * sign, cos, zero], dim=1)
    return torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)


def apply_affine(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample images (bilinear) and masks (nearest) with the same transform. Pixels
    from outside the frame get each image channel's background (its minimum) and 0 in masks.
    images (B, C, H, W), masks (B, 1, H, W), theta (B, 2, 3) -> same shapes."""
    theta = theta.to(device=images.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = images.float()
    background = images.amin(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    warped = F.grid_sample(images - background, grid, mode="bilinear", align_corners=False) + background
    warped_masks = F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False)
    return warped, warped_masks


class BatchAugmentation:
    """Random scale / rotation / flip of a whole batch on its own device, seeded."""

    def __init__(self, scale: float = 0.05, angle: float = 15.0, flip_prob: float = 0.5, seed: int = 0):
        if not 0 <= scale < 1 or angle < 0 or not 0 <= flip_prob <= 1:
            raise ValueError(f"need 0 <= scale < 1, angle >= 0, 0 <= flip_prob <= 1; got {scale}, {angle}, {flip_prob}")
        self.scale, self.angle, self.flip_prob = scale, angle, flip_prob
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def is_identity(self) -> bool:
        return self.scale == 0 and self.angle == 0 and self.flip_prob == 0

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch with freshly drawn parameters (a host-to-device copy per call; training
        uses `EpochAugmentation`, which draws an epoch's at once)."""
        if self.is_identity:
            return images, masks
        params = random_affine_parameters(images.shape[0], self.scale, self.angle, self.flip_prob, self.generator)
        return apply_affine(images, masks, affine_matrices(params))

    def epoch_matrices(self, steps: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """The affine matrices of `steps` batches of `batch` samples, float32
        (steps, batch, 2, 3) on `device`: drawn on the host in one go and copied once (from
        pinned memory, without blocking, on CUDA), so that `apply_affine(images, masks,
        matrices[step])` in the step loop needs no host sync. None for the identity."""
        if self.is_identity:
            return None
        params = random_affine_parameters(steps * batch, self.scale, self.angle, self.flip_prob, self.generator)
        matrices = affine_matrices(params).view(steps, batch, 2, 3)
        if device.type == "cuda":
            matrices = matrices.pin_memory()
        return matrices.to(device, non_blocking=True)


class EpochAugmentation:
    """`BatchAugmentation` for the batches of one epoch: the transforms of all `steps`
    batches are drawn and copied to `device` when it is made (`epoch_matrices`); each call
    applies the next batch's, with no host sync. Should more batches come than planned, the
    next `steps` batches' transforms are drawn from the same generator."""

    def __init__(
        self, augmentation: BatchAugmentation, steps: int, batch_size: int, device: torch.device, first_step: int = 0
    ):
        self.augmentation, self.steps, self.batch_size, self.device = augmentation, steps, batch_size, device
        self.matrices = augmentation.epoch_matrices(steps, batch_size, device)  # None: the identity
        self.next = first_step  # the batch whose transforms the next call applies

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.matrices is None:
            return images, masks
        if self.next == len(self.matrices):
            self.matrices, self.next = self.augmentation.epoch_matrices(self.steps, self.batch_size, self.device), 0
        theta = self.matrices[self.next][: len(images)]
        self.next += 1
        return apply_affine(images, masks, theta)  # on the device, the whole batch at once
