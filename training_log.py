"""What a training run writes about itself: the epoch line, the progress bar (its label with
the time left, its settings, the text after the step), TensorBoard scalars and overlays, the
learning-curves file and the next command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataset import Volume
from pictures import thumbnail
from tb_logger import TBLogger
from utils import UsageError, atomic_write_bytes, format_duration

LEARNING_CURVES = "learning_curves.png"  # in --checkpoint-dir, rewritten after every validated epoch


def log_overlays(logger: TBLogger, volumes: list[Volume], predictions: dict, limit: int, epoch: int) -> None:
    """Up to `limit` validation slices with truth or prediction, composed with array
    operations (`pictures.thumbnail` at full size, no matplotlib figure): FLAIR in grey,
    agreement yellow, prediction only vermillion, truth only sky blue."""
    shown = 0
    for volume in volumes:
        prediction, truth = predictions[volume.patient_id], np.asarray(volume.masks)
        for s in np.flatnonzero(prediction.any(axis=(1, 2)) | truth.any(axis=(1, 2))):
            if shown >= limit:
                return
            flair = np.asarray(volume.images[s, 1], dtype=np.float32)
            k = volume.geometry.slice_numbers[s]
            picture = thumbnail(flair, prediction[s], truth[s], size=max(flair.shape))
            logger.image(f"overlay/{volume.patient_id}_{k}", picture, epoch)
            shown += 1


EPOCH_HEADER = "epoch     train loss val loss Dice mean  median       lr slices/s  step/val/ckpt/pics s  out"


def epoch_line(epoch: int, epochs: int, train_stats: dict, val: dict | None, lr: float, seconds: dict) -> str:
    """One row under EPOCH_HEADER (under 100 columns with "  *best*"). `val` is None for an
    epoch that --val-interval skips. `seconds`: "step" (training steps), "val", "ckpt",
    "pics" (the work of each part, on either thread) and "outside" (the training thread's
    time outside the steps); `out` is that share of the epoch's wall time."""
    losses = f"{train_stats['loss']:>11.4f}"
    if val is None:
        losses += f"{'-':>9}{'-':>10}{'-':>8}"
    else:
        losses += f"{val['loss']:>9.4f}{val['dice_mean']:>10.4f}{val['dice_median']:>8.4f}"
    parts = "/".join(f"{seconds[k]:.{1 if seconds[k] < 99.95 else 0}f}" for k in ("step", "val", "ckpt", "pics"))
    share = seconds["outside"] / max(seconds["step"] + seconds["outside"], 1e-9)
    return f"{f'{epoch}/{epochs}':<9}{losses}{lr:>9.1e}{train_stats['slices_per_s']:>9.0f}{parts:>22}{share:>5.0%}"


CPU_RUN_WARNING_HOURS = 2.0  # a projected CPU run longer than this gets a line pointing at the CPU recipe
QUIET_PROGRESS_SECONDS = 300.0  # with stdout not a terminal, a progress line at most this often


def projected_seconds(seconds_per_step: float, steps: int, epochs_left: int, val_slices: int, batch_size: int) -> float:
    """The wall time of the epochs left, from the training steps timed so far: each epoch's
    `steps` steps plus its validation, estimated as a forward pass over `val_slices` (a third
    of a training step per batch of `batch_size`, forward only)."""
    validation = val_slices / batch_size * seconds_per_step / 3
    return epochs_left * (steps * seconds_per_step + validation)


def projection_lines(seconds: float, epochs_left: int, seconds_per_step: float, device: str) -> list[str]:
    """What train.py prints once the first steps are timed: the projected time of the run and,
    on a CPU where it exceeds CPU_RUN_WARNING_HOURS, where the recipe that fits a CPU is."""
    lines = [
        f"projected: {format_duration(seconds)} for the {epochs_left} epoch(s) to go on {device} "
        f"({seconds_per_step:.2f} s per step, validation included by estimate; the label refines it each epoch)"
    ]
    if device == "cpu" and seconds > CPU_RUN_WARNING_HOURS * 3600:
        lines.append(
            f"that is over {CPU_RUN_WARNING_HOURS:g} hours on this CPU: a GPU is meant for this recipe; the CPU recipe "
            "in docs/training.md#on-a-cpu (the published model's) trains on the LGG set in about 1 h 20 min"
        )
    return lines


PROJECTION_STEPS = 3  # steps timed before the projection (one step alone includes warm-up)


class ProgressReporter:
    """The progress train.py writes besides the bar, called after every training step: once,
    when this process has timed PROJECTION_STEPS steps of an epoch (or its last step), the
    projected time (`projection_lines`); and, when stdout is not a terminal (a log file, where
    the bar is hidden), a line at most every `every` seconds with the epoch, the step and the
    run's time left."""

    def __init__(self, steps: int, epochs_left: int, val_slices: int, batch_size: int, device: str,
                 every: float = QUIET_PROGRESS_SECONDS, quiet: bool | None = None):  # fmt: skip
        self.steps, self.epochs_left, self.val_slices, self.batch_size = steps, epochs_left, val_slices, batch_size
        self.device, self.every = device, every
        self.quiet = (not sys.stdout.isatty()) if quiet is None else quiet
        self.projected, self.last_line = False, time.monotonic()

    def __call__(self, epoch_index: int, step: int, per_step: float, timed: int | None = None) -> None:
        """`step` steps into the `epoch_index`-th epoch of this process (0: the first), at
        `per_step` seconds per training step over the `timed` steps this process ran of it
        (default `step`; fewer in an epoch resumed from a save within it)."""
        timed = step if timed is None else timed
        if not self.projected and timed < PROJECTION_STEPS and step < self.steps:
            return
        total = projected_seconds(per_step, self.steps, self.epochs_left, self.val_slices, self.batch_size)
        if not self.projected:
            self.projected = True
            for line in projection_lines(total, self.epochs_left, per_step, self.device):
                print_line(line)
        if self.quiet and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            left = max(total - (epoch_index * self.steps + step) * per_step, 0.0)
            print_line(f"epoch {epoch_index + 1} of the {self.epochs_left} to go: step {step}/{self.steps}, "
                       f"run about {format_duration(left)} left")  # fmt: skip


def progress_label(epoch: int, epochs: int, epoch_seconds: list[float], stop_after: int | None = None) -> str:
    """The progress bar's label: the epoch, and the time the run has left (to `stop_after`
    when set), estimated from the mean of the last three `epoch_seconds` of this process
    (training, validation and saving)."""
    label = f"epoch {epoch}/{epochs}"
    if not epoch_seconds:
        return label
    recent = epoch_seconds[-3:]
    last = min(epochs, stop_after or epochs)
    left = sum(recent) / len(recent) * (last - epoch + 1)
    return f"{label}, run {format_duration(left)} left"


# tqdm's settings for the training bar: `progress_label`, the percentage, the bar, the step,
# then `progress_postfix`, at the terminal's width (read again at each redraw), cleared at the
# end of the epoch. tqdm's own elapsed<remaining and step/s are left out (the label says the
# run's time left, the postfix the slice rate): "epoch 100/100, run 10 h 02 min left" fits 80
# columns.
PROGRESS_BAR = {
    "leave": False,
    "dynamic_ncols": True,
    "bar_format": "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
}


def progress_postfix(loss: float, slices_per_s: float) -> str:
    """The progress bar's text after the step count: the mean training loss so far and the
    slices per second of all processes (`loss=0.434, 57.8 sl/s`; no decimal from 100 sl/s)."""
    rate = f"{slices_per_s:.{1 if slices_per_s < 99.95 else 0}f}"
    return f"loss={loss:.3f}, {rate} sl/s"


def write_learning_curves(png: bytes, path: Path, epoch: int) -> None:
    """`atomic_write_bytes` of the PNG (never half a picture), with a failed write as one
    UsageError line that says the epoch's checkpoints were written before it."""
    try:
        atomic_write_bytes(png, path)
    except OSError as error:
        raise UsageError(
            f"{path}: the learning curves could not be written ({error}); the checkpoints of epoch {epoch} are kept"
        ) from error


def log_epoch(logger: TBLogger, epoch: int, train_stats: dict, lr: float, val: dict | None, seconds: dict) -> None:
    """TensorBoard scalars of one epoch: losses, Dice, learning rate and where the time went
    (`train_stats` from train_one_epoch, `val` from summarize_validation or None, `seconds`
    as in `epoch_line`)."""
    scalars = {"train/loss": train_stats["loss"], "lr": lr, "time/slices_per_s": train_stats["slices_per_s"]}
    if val is not None:
        scalars |= {"val/loss": val["loss"], "val/dice_mean": val["dice_mean"], "val/dice_median": val["dice_median"]}
    scalars |= {"time/epoch_s": seconds["step"], "time/val_s": seconds["val"], "time/checkpoint_s": seconds["ckpt"]}
    scalars |= {"time/pictures_s": seconds["pics"], "time/outside_step_s": seconds["outside"]}
    logger.scalars(scalars, epoch)


def print_line(line: str) -> None:
    """Print above the progress bar, from either thread."""
    tqdm.write(line)
    sys.stdout.flush()


def learning_curves_path(args: argparse.Namespace) -> Path:
    """<checkpoint-dir>/learning_curves.png (per fold under --fold all: fold<i>/learning_curves.png)."""
    folder = Path(args.checkpoint_dir)
    return folder / "fold*" / LEARNING_CURVES if args.fold == "all" else folder / LEARNING_CURVES


def predict_command(args: argparse.Namespace) -> str:
    """The predict.py command for the model(s) this run trained, writing to ./demo_predictions
    for the demo and to <checkpoint-dir>/predictions otherwise: the K fold checkpoints of
    --fold all (pooled: every patient scored by the model it was a test patient of)."""
    folder = Path(args.checkpoint_dir)
    if args.fold == "all":
        models = [str(folder / f"fold{i}" / "best_model.pt") for i in range(args.folds)]
        out = str(folder / "predictions")
    else:
        models, out = (
            [str(folder / "best_model.pt")],
            "./demo_predictions" if args.demo else str(folder / "predictions"),
        )
    command = ["python", "predict.py", "--model-path", *models, "--data-dir", args.data_dir, "--output-dir", out]
    return shlex.join([*command, "--figure-path", f"{out}/dice_distribution.png"])


def add_logging_flags(add: Callable[..., Any]) -> None:
    """Declare what a run writes about itself through `add` (`utils.RunFlags.add`)."""
    add("--log-dir", default="./tb_logs", help="TensorBoard: one sub-folder per run")
    add("--vis-frequency", type=int, default=10, help="validation overlays every N epochs (0: never)")
    add("--n-vis-images", type=int, default=200, help="at most this many overlays each time")
    add(
        "--no-learning-curves",
        action="store_true",
        help="do not draw learning_curves.png each epoch (the checkpoints keep the history it is drawn from)",
    )
    add("--log-interval", type=int, default=20, help="steps between progress-bar loss updates")


def validate_logging_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for a logging flag out of range."""
    if args.log_interval <= 0:
        raise UsageError(f"--log-interval {args.log_interval}: must be positive")
    if args.vis_frequency < 0 or args.n_vis_images < 0:
        raise UsageError("--vis-frequency and --n-vis-images must be >= 0")
