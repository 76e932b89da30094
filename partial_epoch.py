"""Saves within a long epoch. Every --save-minutes of training, last.pt is rewritten with the
state after the step just taken and the epoch's position (`checkpoint.EpochPosition`), so that an
interruption loses at most that much training. A run resumed from such a last.pt redraws the
epoch's batches and transforms from the epoch's seeds and starts at the saved step, so it
trains exactly what an uninterrupted run would (bit-exact on the CPU; tests/test_train.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import checkpoint
import resume
from run_setup import Run
from utils import UsageError


class PartialEpochSaver:
    """Called after each training step of `epoch` (`saver(step, loss_sum)`): when `minutes` of
    training have passed since the epoch began or since its last save, and the background
    worker has finished the previous epoch's end, it copies the training state to the host
    and has the worker write last.pt with the epoch's position. The check costs a clock read;
    a save costs a host copy of the state on this thread (the write happens on the worker)."""

    def __init__(self, run: Run, epoch: int, minutes: float):
        self.run, self.epoch, self.every = run, epoch, minutes * 60
        self.last = time.monotonic()

    def __call__(self, step: int, loss_sum: torch.Tensor) -> None:
        if step >= self.run.steps or time.monotonic() - self.last < self.every or not self.run.worker.idle:
            return
        self.last = time.monotonic()
        run = self.run
        state = checkpoint.training_state(run.raw_model, run.optimizer, run.scheduler, run.scaler, resume.rng_state())
        position = checkpoint.EpochPosition(self.epoch, step, loss_sum.detach().to("cpu", copy=True))
        run.worker.submit(lambda: write_partial(run, state, position))


def write_partial(run: Run, state: dict, position: checkpoint.EpochPosition) -> None:
    """On the worker, after the previous epoch's end: last.pt with the state after
    `position.step` steps of `position.epoch`; the best epoch and curves are the run's so far."""
    saved = checkpoint.make_checkpoint(
        state, run.split, position.epoch - 1, run.best_dice, run.config, run.log_run, run.curves, position
    )
    checkpoint.write_checkpoint(saved, Path(run.args.checkpoint_dir) / "last.pt")


def make_saver(run: Run, epoch: int) -> Callable[[int, torch.Tensor], None] | None:
    """The epoch's saver, or None: with --save-minutes 0, and under torchrun (the ranks would
    have to agree on the step to save at; there epochs end often enough)."""
    if run.args.save_minutes <= 0 or run.runtime.world_size > 1:
        return None
    return PartialEpochSaver(run, epoch, run.args.save_minutes)


def add_partial_epoch_flags(add: Callable[..., Any]) -> None:
    """Declare --save-minutes through `add` (`utils.RunFlags.add`); it does not define the run."""
    add(
        "--save-minutes",
        type=float,
        default=5.0,
        help="also rewrite last.pt within an epoch after this many minutes of training, so an interruption "
        "loses at most that much (0: only at epoch ends; one process only, not under torchrun)",
    )


def validate_partial_epoch_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for a negative or non-finite --save-minutes."""
    if not (args.save_minutes >= 0 and args.save_minutes != float("inf")):
        raise UsageError(f"--save-minutes {args.save_minutes}: must be a number >= 0")
