"""Train the U-Net on a kaggle_3m-style data set.

python train.py --data-dir kaggle_3m                 # one GPU (or the CPU)
torchrun --nproc_per_node=4 train.py --data-dir ...  # DistributedDataParallel
python train.py --demo                               # phantom data, about 3 min on a CPU
python train.py --folds 5 --fold all --checkpoint-dir cv  # cross-validation: cv/fold0/ ... cv/fold4/
python train.py --choose-postprocessing checkpoints/best_model.pt --data-dir kaggle_3m

Writes best_model.pt, last.pt, args.json and learning_curves.png (losses, validation Dice,
learning rate; rewritten after every epoch) to --checkpoint-dir and TensorBoard curves to
a sub-folder of --log-dir per run (<date>-<time>-<checkpoint folder name>). A folder that
already holds a run is continued with --resume auto or replaced with --overwrite. At the end
of the last epoch, best_model.pt's validation patients choose its post-processing (none, the
largest component, or components of at least 5-50 % of the largest; nnU-Net's rule), saved
in best_model.pt and args.json as `postprocessing` for predict.py and the hub pipeline.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import augmentations
import checkpoint
import dataset
import distributed
import network
import resume
import sampling
import training_log
import utils
from crossval import train_folds
from epoch_end import end_epoch, finish_background_work
from losses import add_loss_flag
from partial_epoch import add_partial_epoch_flags, make_saver, validate_partial_epoch_args
from patients import DataError
from postprocessing_choice import ensure_postprocessing_choice, record_postprocessing_choice
from preprocessing import add_preprocessing_flags
from run_setup import Run, set_up
from splits import add_split_flags, validate_split_args

# The recommended recipe (docs/ablation.md): soft Dice + BCE was the one candidate that won
# clearly on every seed on the hard phantom's test patients. Sampling, normalisation region,
# context slices and flip TTA showed no clear win, so train.py keeps their defaults, and the
# reference implementation's loss (soft Dice) and 3 input channels; `--demo` trains with this recipe.
RECOMMENDED_RECIPE = {"loss": "dice+bce"}
DEMO_DEFAULTS = {
    "data_dir": "./demo_3m",
    "checkpoint_dir": "./demo_checkpoints",
    "log_dir": "./tb_logs/demo",
    "cache_dir": "./cache",
    "epochs": 30,
    "image_size": 64,
    "base_filters": 16,
    "val_patients": 4,
    "vis_frequency": 4,
    "n_vis_images": 20,
    "lr": 2e-3,
    **RECOMMENDED_RECIPE,
}


# -------------------------------------------------------------------------- arguments


def demo_flags() -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in DEMO_DEFAULTS.items())


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI: this script's own flags, then each part's (declared beside the code they
    steer), in the two help groups of `utils.RunFlags`; `parser.run_defining` holds the
    run-defining flags' defaults."""
    parser = utils.CLIParser(
        description=__doc__,
        formatter_class=utils.HelpFormatter,
        allow_abbrev=False,
        parents=[utils.shared_flags("--data-dir", "--cache-dir", "--num-workers", "--device")],
    )
    add = utils.RunFlags(parser).add
    add("--epochs", defines_run=True, type=int, default=100, help="number of epochs")
    add("--batch-size", defines_run=True, type=int, default=16, help="slices per step (per process under torchrun)")
    add("--lr", defines_run=True, type=float, default=1e-4, help="Adam learning rate (cosine-annealed to 0)")
    add("--seed", defines_run=True, type=int, default=42, help="seed for split, sampling, augmentation, init")
    for add_flags in (
        add_preprocessing_flags,
        augmentations.add_augmentation_flags,
        add_loss_flag,
        add_split_flags,
        network.add_network_flags,
        dataset.add_dataset_flags,
        sampling.add_sampling_flags,
        distributed.add_runtime_flags,
        resume.add_resume_flags,
        add_partial_epoch_flags,
        training_log.add_logging_flags,
    ):
        add_flags(add)
    add(
        "--steps-per-epoch", defines_run=True, type=int, default=None, help="default: one pass over the training slices"
    )
    add(
        "--no-lcc",
        defines_run=True,
        note="applies to the per-epoch validation masks, whose Dice picks best_model.pt (without it they keep "
        "the largest component only); the post-processing chosen for best_model.pt at the end of the run is "
        "chosen among all candidates either way",
    )
    add(
        "--val-interval",
        type=int,
        default=1,
        help="validate (and choose best_model.pt) every N epochs and after the last; last.pt is saved every epoch",
    )
    add(
        "--no-background",
        action="store_true",
        help="validate, save and draw on the training thread instead of overlapping the next epoch (slower)",
    )
    add(
        "--choose-postprocessing",
        default=None,
        metavar="CKPT",
        help="train nothing: choose the post-processing of an existing checkpoint on its validation patients "
        "(found in --data-dir) and save it there and in args.json beside it, as a finished run does",
    )
    add(
        "--demo",
        action="store_true",
        help=f"write a phantom to ./demo_3m if absent and train a small model on it (sets {demo_flags()} unless given)",
    )
    return parser


def run_defining_flags() -> dict[str, Any]:
    """The flags that define a run, with their defaults (what a checkpoint without one of
    them was trained with: the default, or the `absent=` value of the flag's declaration)."""
    return dict(get_args_parser().run_defining)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values become defaults: flags given on the command line still win
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject invalid values before any work starts (each part checks its own flags)."""
    for name in ["epochs", "batch_size", "image_size", "base_filters", "val_interval"]:
        if getattr(args, name) <= 0:
            raise utils.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.image_size % 16:
        raise utils.UsageError(f"--image-size {args.image_size}: must be divisible by 16 (the U-Net pools 4 times)")
    if args.image_size == 16 and args.batch_size == 1:
        raise utils.UsageError(
            "--image-size 16 --batch-size 1: the U-Net's bottleneck is then 1x1 and BatchNorm needs more "
            "than one value per channel in training; use --batch-size 2 or more, or a larger --image-size"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise utils.UsageError(f"--lr {args.lr}: must be a positive number")
    if args.seed < 0:
        raise utils.UsageError(f"--seed {args.seed}: must be >= 0")
    if args.steps_per_epoch is not None and args.steps_per_epoch <= 0:
        raise utils.UsageError(f"--steps-per-epoch {args.steps_per_epoch}: must be positive")
    if args.context_slices < 0:
        raise utils.UsageError(f"--context-slices {args.context_slices}: must be >= 0")
    for validate in (
        augmentations.validate_augmentation_args,
        validate_split_args,
        sampling.validate_sampling_args,
        training_log.validate_logging_args,
        resume.validate_resume_args,
        validate_partial_epoch_args,
    ):
        validate(args)


# ----------------------------------------------------------------------- randomness


def stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, stream): independent generators per
    epoch make a resumed run draw exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


# -------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module, data, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, criterion: nn.Module,
    augment: augmentations.Augment, runtime: distributed.Runtime, steps: int, batch_size: int,
    generator: torch.Generator, epoch: int, log_interval: int, progress: bool = True, desc: str | None = None,
    on_progress: Callable[[int, float, int], None] | None = None, start: checkpoint.EpochPosition | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """One epoch of `steps` sampled batches, each augmented (`augment`, built for this epoch
    by `augmentations.build_augmentation`) and trained on (`train_step`); from `start` (a save
    within the epoch) when given. `on_step(step, loss_sum)` follows every step (the saves
    within an epoch). Every `log_interval` steps (and at the last) the loss is averaged over
    all ranks, so a non-finite loss on any rank stops every rank at the same step; `desc`
    labels the progress bar (default "epoch N"); `on_progress(step, seconds per step, steps
    timed)` follows every step on the CPU and those steps elsewhere (on a GPU a step is only
    timed after the host sync). Returns the loss (mean over steps and ranks), slices/s and seconds."""
    model.train()
    first = start.step if start else 0
    loss_sum = start.loss_sum.to(runtime.device, copy=True) if start else torch.zeros((), device=runtime.device)
    mean_loss, begun = 0.0, time.perf_counter()
    hide = None if progress and runtime.is_main else True  # None: tqdm hides the bar when stderr is no terminal
    bar = tqdm(total=steps, initial=first, desc=desc or f"epoch {epoch}", disable=hide, **training_log.PROGRESS_BAR)
    for step, (images, masks) in enumerate(data.batches(steps, batch_size, generator, first), start=first + 1):
        images, masks = augment(images, masks)
        loss_sum += train_step(model, optimizer, scaler, criterion, images, masks, runtime)
        if on_step is not None:
            on_step(step, loss_sum)
        synced = step % log_interval == 0 or step == steps
        if synced:
            mean_loss = distributed.mean_over_ranks(loss_sum, runtime).item() / step  # the only host sync (bf16, fp32)
            if not math.isfinite(mean_loss):
                message = f"the training loss became {mean_loss} at epoch {epoch}, step {step}"
                raise distributed.TrainingDiverged(message)
        per_step = (time.perf_counter() - begun) / (step - first)
        if synced:
            bar.set_postfix_str(training_log.progress_postfix(mean_loss, batch_size * runtime.world_size / per_step))
        if on_progress is not None and (synced or runtime.device.type == "cpu"):  # elsewhere only timed after a sync
            on_progress(step, per_step, step - first)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - begun
    slices = (steps - first) * batch_size * runtime.world_size
    return {"loss": mean_loss, "slices_per_s": slices / seconds, "seconds": seconds}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    runtime: distributed.Runtime,
) -> torch.Tensor:
    """One optimiser step on a batch: the model in channels_last under autocast, `criterion`
    on its logits (the losses apply the sigmoid in float32), the GradScaler (active for fp16).
    Returns the loss, detached, on the device (no host sync)."""
    images = images.contiguous(memory_format=torch.channels_last)
    amp_dtype = runtime.amp_dtype
    with torch.autocast(runtime.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(images, return_logits=True)  # (B, 3 (2C+1), H, W) -> (B, 1, H, W), C context slices
    loss = criterion(logits, masks)  # float32
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # fp16 only: the scaler reads its inf check on the host, a sync per step
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------- the epoch loop


def run_epoch(run: Run, epoch: int) -> None:
    """Train one epoch on this rank's own random streams (from the saved position when the run
    resumes within it), then hand its end (validation, checkpoints, pictures, the epoch
    line) to `end_epoch`."""
    args, runtime = run.args, run.runtime
    start = time.perf_counter()
    position, run.position = run.position, None
    generator = torch.Generator().manual_seed(stream_seed(args.seed, epoch, runtime.rank, 0))
    augment_seed = stream_seed(args.seed, epoch, runtime.rank, 1)
    augment = augmentations.build_augmentation(
        args, augment_seed, run.steps, args.batch_size, runtime.device, position.step if position else 0
    )
    label = training_log.progress_label(epoch, args.epochs, run.epoch_seconds, args.stop_after_epoch)
    progress = functools.partial(run.progress, len(run.epoch_seconds)) if runtime.is_main else None
    train_stats = train_one_epoch(
        run.model, run.data, run.optimizer, run.scaler, run.criterion, augment, runtime, run.steps,
        args.batch_size, generator, epoch, args.log_interval, desc=label, on_progress=progress, start=position,
        on_step=make_saver(run, epoch),
    )  # fmt: skip
    end_epoch(run, epoch, train_stats)
    run.epoch_seconds.append(time.perf_counter() - start)


def train(args: argparse.Namespace, runtime: distributed.Runtime) -> dict:
    """Set up, run the epochs (up to --stop-after-epoch), return the history (used by tests)."""
    run = set_up(args, runtime, run_defining_flags())
    last = min(args.epochs, args.stop_after_epoch or args.epochs)
    if run.start_epoch > args.epochs and runtime.is_main:
        print(f"nothing to do: the run in {args.checkpoint_dir} already finished epoch {args.epochs} of {args.epochs}")
    try:
        for epoch in range(run.start_epoch, last + 1):
            run_epoch(run, epoch)
    except BaseException:
        finish_background_work(run, failing=True)
        raise
    else:
        finish_background_work(run, failing=False)
    finally:
        run.logger.close()
    if last == args.epochs:  # rank 0 chooses; the others wait for it (or for its error)
        distributed.on_rank_zero(runtime, lambda: ensure_postprocessing_choice(args, runtime.device))
    return {
        "history": run.history,
        "best_dice": run.best_dice,
        "split": run.split,
        "raw_model": run.raw_model,
        "stopped_after": last if run.start_epoch <= last < args.epochs else None,
        "epoch_seconds": run.epoch_seconds,  # wall time of each epoch on the training thread
        "epoch_parts": run.epoch_parts,  # rank 0: step, val, ckpt, pics, outside, waited seconds per epoch
    }


# ------------------------------------------------------------------- post-processing choice


def choose_command(args: argparse.Namespace) -> dict:
    """`train.py --choose-postprocessing CKPT`: the choice for an existing checkpoint, no training."""
    for name in ("resume", "overwrite", "fold", "stop_after_epoch"):
        if getattr(args, name) not in (None, False):
            raise utils.UsageError(
                f"--choose-postprocessing trains nothing; drop {resume.flag_text(name, getattr(args, name))} "
                "(it takes --data-dir, --device, --cache-dir, --no-cache and --batch-size)"
            )
    if not Path(args.choose_postprocessing).exists():
        raise checkpoint.CheckpointError(f"--choose-postprocessing {args.choose_postprocessing}: checkpoint not found")
    device = utils.resolve_device(args.device)
    cache_dir = None if args.no_cache else utils.ensure_writable_dir(args.cache_dir, "--cache-dir")
    return record_postprocessing_choice(args.choose_postprocessing, args.data_dir, device, cache_dir, args.batch_size)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    utils.one_line_warnings()
    if args.choose_postprocessing is not None:
        try:
            return choose_command(args)
        except (DataError, checkpoint.CheckpointError, utils.UsageError) as error:
            sys.exit(f"error: {error}")
    try:
        validate_args(args)
        runtime = distributed.setup_runtime(args)
    except utils.UsageError as error:
        sys.exit(f"error: {error}")
    resume.stop_on_sigterm()
    try:
        with distributed.determinism(args.deterministic, runtime.device):
            result = (
                train_folds(args, runtime, train, run_defining_flags()) if args.fold == "all" else train(args, runtime)
            )
            if runtime.distributed:  # leave together: a rank tearing down gloo while a peer still talks aborts it
                dist.barrier()
    except distributed.FollowRankZero:
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (resume.stop_on_sigterm); the worker has written what it had
        sys.exit(resume.interrupted_message(args, argv, runtime.world_size))
    except (DataError, checkpoint.CheckpointError, utils.UsageError, distributed.TrainingDiverged) as error:
        if runtime.is_main:
            sys.exit(f"error: {error}")
        distributed.exit_now(f"error: rank {runtime.rank}: {error}")
    except dist.DistError as error:  # another rank failed and left: it printed its own error
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        distributed.exit_now(f"error: rank {runtime.rank}: stopped, another process failed ({first})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main and result["stopped_after"] is not None:
        print(f"\nstopped after epoch {result['stopped_after']} of {args.epochs}; continue with:")
        print(f"  {resume.continue_command(argv, runtime.world_size)}")
    if runtime.is_main and result["stopped_after"] is None:
        if not args.no_learning_curves:
            print(f"\nlearning curves: {training_log.learning_curves_path(args)}")
        print(f"\nnext: {training_log.predict_command(args)}")
    return result


if __name__ == "__main__":
    main()
