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
import contextlib
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from augmentations import BatchAugmentation, apply_affine
from background import BackgroundWorker
from dataset import (
    PLACEMENTS,
    SAMPLING_SCHEMES,
    DataError,
    MRISegmentationDataset,
    Patient,
    ResidentSlices,
    StreamedSlices,
    Volume,
    discover_inputs,
    load_volumes,
    make_sampler,
    make_split,
    make_synthetic_dataset,
    select_patients,
    training_data,
)
from inference import (
    AMP_CHOICES,
    CheckpointError,
    amp_name,
    autocast_dtype,
    choose_postprocessing,
    context_slices_of,
    load_checkpoint,
    load_model,
    make_checkpoint,
    postprocessing_name,
    predict_probabilities,
    require_training_checkpoint,
    save_checkpoint,
    save_postprocessing_choice,
    score_postprocessing,
    training_state,
)
from losses import LOSSES, build_loss
from network import UNetModel, count_parameters
from tb_logger import TBLogger
from utils import (
    NORM_REGIONS,
    CLIParser,
    HelpFormatter,
    UsageError,
    atomic_write_bytes,
    check_writable_dir,
    dice_score,
    ensure_writable_dir,
    largest_connected_component,
    one_line_warnings,
    plot_learning_curves,
    png_bytes,
    resolve_device,
    seed_everything,
    shared_flags,
    thumbnail,
)

# The recommended recipe (docs/ablation.md): soft Dice + BCE was the one candidate that won
# clearly on every seed on the hard phantom's test patients. Sampling, normalisation region,
# context slices and flip TTA showed no clear win, so their defaults stay, as do the loss and
# input channels of the seed recipe; `--demo` trains with this recipe.
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
DEMO_PATIENTS = 20

# The resume contract: the flags that define a run. `--resume` refuses a change of any of
# them, naming the flag with the saved and the given value; every other flag says only how
# to run (device, workers, logging, data placement, cache, compile, determinism) and may
# change. A new run-defining flag is one more line here. `world_size` is the number of
# processes (torchrun --nproc_per_node), recorded with the flags in the checkpoint's `args`.
RUN_DEFINING_FLAGS = (
    "epochs",
    "lr",
    "batch_size",
    "seed",
    "folds",
    "fold",
    "val_patients",
    "test_patients",
    "image_size",
    "base_filters",
    "aug_scale",
    "aug_angle",
    "amp",
    "loss",
    "steps_per_epoch",
    "sync_bn",
    "no_lcc",
    "world_size",
    "sampling",
    "sampling_floor",
    "lesion_fraction",
    "norm_region",
    "context_slices",
)
CHECKPOINT_NAMES = ("last.pt", "best_model.pt")
LEARNING_CURVES = "learning_curves.png"  # in --checkpoint-dir, rewritten after every validated epoch
# What a checkpoint saved before a run-defining flag existed was trained with (the behaviour
# of the code then), whatever the flag's default is now.
VALUES_BEFORE_FLAG = {"sampling": "area", "sampling_floor": 0.1, "norm_region": "crop", "context_slices": 0}


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


class FollowRankZero(Exception):
    """Rank 0 reported an error (and printed it); this rank only stops."""


# -------------------------------------------------------------------------- arguments


def demo_flags() -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in DEMO_DEFAULTS.items())


def fold_choice(text: str) -> int | str:
    """--fold: a fold number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number (0..K-1) or 'all', not {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI. Each flag lands in the help group that RUN_DEFINING_FLAGS gives it."""
    parser = CLIParser(
        description=__doc__,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        parents=[shared_flags("--data-dir", "--cache-dir", "--num-workers", "--device")],
    )
    groups = (
        parser.add_argument_group("flags that define the run (--resume refuses a change)"),
        parser.add_argument_group("flags that say how to run (may change on --resume)"),
    )

    def add(flag: str, **kwargs: Any) -> None:
        groups[flag[2:].replace("-", "_") not in RUN_DEFINING_FLAGS].add_argument(flag, **kwargs)

    add("--epochs", type=int, default=100, help="number of epochs")
    add("--batch-size", type=int, default=16, help="slices per step (per process under torchrun)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (cosine-annealed to 0)")
    add("--image-size", type=int, default=256, help="preprocessed slice size, divisible by 16")
    add("--aug-scale", type=float, default=0.05, help="random scale in [1-s, 1+s]")
    add("--aug-angle", type=float, default=15.0, help="random rotation in [-a, a] degrees")
    add("--loss", choices=LOSSES, default="dice", help="soft Dice, or soft Dice + BCE (1:1)")
    add("--val-patients", type=int, default=10, help="patients whose Dice chooses best_model.pt (validation)")
    add(
        "--test-patients",
        type=int,
        default=0,
        help="patients held out as a test set, never used in training (not with --folds)",
    )
    add("--seed", type=int, default=42, help="seed for split, sampling, augmentation, init")
    add("--folds", type=int, default=None, help="K-fold cross-validation: number of folds (default: none)")
    add(
        "--fold",
        type=fold_choice,
        default=None,
        help="fold i (0..K-1) is the TEST set; --val-patients come from the other folds, the rest train. "
        "'all': train folds 0..K-1 one after the other into <checkpoint-dir>/fold<i>/",
    )
    add("--base-filters", type=int, default=32, help="U-Net width (32: 7.8 M parameters)")
    add("--steps-per-epoch", type=int, default=None, help="default: one pass over the training slices")
    add(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision; auto = bf16 on GPUs that support it, else fp16; off on CPU",
    )
    add("--no-lcc", action="store_true", help="validation without the largest-component step")
    add("--sync-bn", action="store_true", help="synchronise BatchNorm across processes (CUDA)")
    add_recipe_flags(add)
    add_runtime_flags(add)
    return parser


def add_recipe_flags(add: Callable[..., None]) -> None:
    """Sampling, normalisation region and 2.5-D input (issue 13; see docs/ablation.md)."""
    add(
        "--sampling",
        choices=SAMPLING_SCHEMES,
        default="area",
        help="training slices: area = weight lesion area + floor (pooled); foreground = nnU-Net's "
        "foreground oversampling (--lesion-fraction of each batch from lesion slices by area, the rest "
        "uniform); patient = a patient uniformly, then a slice by area + floor within it",
    )
    add("--sampling-floor", type=float, default=0.1, help="area/patient: floor weight as a share of the mean area")
    add("--lesion-fraction", type=float, default=0.333, help="foreground: share of each batch from lesion slices")
    add(
        "--norm-region",
        choices=NORM_REGIONS,
        default="crop",
        help="normalisation statistics per channel and volume from the whole padded crop or the head only",
    )
    add("--context-slices", type=int, default=0, help="2.5-D: C neighbouring slices on each side as channels")


def add_runtime_flags(add: Callable[..., None]) -> None:
    """Flags that say where and how to run: they may change when a run is resumed."""
    add("--checkpoint-dir", default="./checkpoints", help="best_model.pt, last.pt, args.json, learning_curves.png")
    add("--log-dir", default="./tb_logs", help="TensorBoard: one sub-folder per run")
    add("--no-cache", action="store_true", help="preprocess in memory, write no cache")
    add("--vis-frequency", type=int, default=10, help="validation overlays every N epochs (0: never)")
    add("--n-vis-images", type=int, default=200, help="at most this many overlays each time")
    add(
        "--no-learning-curves",
        action="store_true",
        help="do not draw learning_curves.png each epoch (the checkpoints keep the history it is drawn from)",
    )
    add("--compile", action="store_true", help="torch.compile the model")
    add(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms, cudnn.benchmark off: two GPU runs with the same seed match",
    )
    add(
        "--data-placement",
        choices=PLACEMENTS,
        default="auto",
        help="device: keep the training set on the training device; stream: DataLoader from "
        "the cache; auto: device if it fits in GPU memory (always on CPU)",
    )
    add("--log-interval", type=int, default=20, help="steps between progress-bar loss updates")
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
    add("--resume", default=None, help="'auto' (last.pt in --checkpoint-dir, if any) or a checkpoint path")
    add(
        "--overwrite",
        action="store_true",
        help="start a new run in a --checkpoint-dir that holds one (deletes its last.pt and best_model.pt)",
    )
    add("--stop-after-epoch", type=int, default=None, help="exit after this epoch, to split a run over jobs")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values become defaults: flags given on the command line still win
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject invalid values before any work starts."""
    positive = ["epochs", "batch_size", "image_size", "val_patients", "base_filters", "log_interval", "val_interval"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.image_size % 16:
        raise UsageError(f"--image-size {args.image_size}: must be divisible by 16 (the U-Net pools 4 times)")
    if args.image_size == 16 and args.batch_size == 1:
        raise UsageError(
            "--image-size 16 --batch-size 1: the U-Net's bottleneck is then 1x1 and BatchNorm needs more "
            "than one value per channel in training; use --batch-size 2 or more, or a larger --image-size"
        )
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be positive")
    if not 0 <= args.aug_scale < 1 or args.aug_angle < 0:
        raise UsageError("--aug-scale must be in [0, 1) and --aug-angle >= 0")
    if args.steps_per_epoch is not None and args.steps_per_epoch <= 0:
        raise UsageError(f"--steps-per-epoch {args.steps_per_epoch}: must be positive")
    if args.num_workers < 0 or args.vis_frequency < 0 or args.n_vis_images < 0:
        raise UsageError("--num-workers, --vis-frequency and --n-vis-images must be >= 0")
    if (args.folds is None) != (args.fold is None):
        raise UsageError("--folds and --fold go together")
    validate_split_args(args)
    validate_recipe_args(args)
    if args.stop_after_epoch is not None and args.stop_after_epoch <= 0:
        raise UsageError("--stop-after-epoch must be positive")
    if args.overwrite and args.resume is not None:
        raise UsageError(f"--overwrite starts a new run and --resume {args.resume} continues one: pass only one")


def validate_split_args(args: argparse.Namespace) -> None:
    """--test-patients, --folds and --fold (a number or 'all')."""
    if args.test_patients < 0:
        raise UsageError(f"--test-patients {args.test_patients}: must be >= 0")
    if args.folds is None:
        return
    if args.folds < 2:
        raise UsageError(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if args.fold != "all" and not 0 <= args.fold < args.folds:
        raise UsageError(f"--fold {args.fold}: must be in 0..{args.folds - 1} or 'all'")
    if args.test_patients:
        raise UsageError(f"--test-patients {args.test_patients}: not used with --folds (there fold i is the test set)")
    if args.fold == "all" and args.resume not in (None, "auto"):
        raise UsageError(
            f"--fold all --resume {args.resume}: each fold continues from its own folder; use --resume auto"
        )


def validate_recipe_args(args: argparse.Namespace) -> None:
    """The issue-13 flags: sampling floor, lesion fraction, context slices."""
    if not (math.isfinite(args.sampling_floor) and args.sampling_floor >= 0):
        raise UsageError(f"--sampling-floor {args.sampling_floor}: must be >= 0 (a share of the mean lesion area)")
    if not 0 <= args.lesion_fraction <= 1:
        raise UsageError(f"--lesion-fraction {args.lesion_fraction}: must be in [0, 1]")
    if args.context_slices < 0:
        raise UsageError(f"--context-slices {args.context_slices}: must be >= 0")
    default = get_args_parser().get_default
    if args.sampling != "foreground" and args.lesion_fraction != default("lesion_fraction"):
        raise UsageError(f"--lesion-fraction {args.lesion_fraction}: only used with --sampling foreground")
    if args.sampling == "foreground" and args.sampling_floor != default("sampling_floor"):
        raise UsageError(f"--sampling-floor {args.sampling_floor}: used with --sampling area or patient only")


# ---------------------------------------------------------------------- distributed


@dataclass
class Runtime:
    """Where this process runs: device, rank, world size, mixed precision."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_name(self) -> str:
        return amp_name(self.amp_dtype)


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device and process group (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn: SyncBatchNorm works only on CUDA devices")
    if world_size > 1:
        if device.type == "cuda":
            device = resolve_device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size, autocast_dtype(device, args.amp))


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """--deterministic: deterministic algorithms (an op without one raises), cuDNN's
    deterministic kernels and no cudnn.benchmark autotuning. Without it, cudnn.benchmark is
    on for CUDA. The previous process-wide settings come back on exit (tests run in-process)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    before += (torch.backends.cudnn.deterministic,)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = device.type == "cuda" and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def on_rank_zero(runtime: Runtime, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only and hand its result to every rank, so that all ranks follow
    one decision. An error it raises is re-raised on rank 0 and stops the others quietly."""
    outcome: list[Any] = [None, None]
    if runtime.is_main:
        try:
            outcome[0] = work()
        except (UsageError, CheckpointError, DataError) as error:
            if not runtime.distributed:
                raise
            outcome[1] = error
    if runtime.distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        if runtime.is_main:
            raise outcome[1]
        raise FollowRankZero()
    return outcome[0]


def stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, stream): independent generators per
    epoch make a resumed run draw exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------- train / eval


def mean_over_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of a tensor over all processes (a copy); NaN or inf on any rank reaches all."""
    value = value.detach().clone()
    if runtime.distributed:
        dist.all_reduce(value)
        value /= runtime.world_size
    return value


def train_one_epoch(
    model: nn.Module,
    data,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    augment: BatchAugmentation,
    runtime: Runtime,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    log_interval: int,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, float]:
    """One epoch of `steps` weighted-sampled batches. `criterion` takes the model's logits
    (e.g. `SoftDiceLoss(from_logits=True)`): the sigmoid then runs in float32 even under
    autocast. Every `log_interval` steps (and at the last) the loss is averaged over all
    ranks, so a non-finite loss on any rank stops every rank at the same step.
    `desc` labels the progress bar (default "epoch N"). Returns the loss (mean over steps
    and ranks), slices/s and seconds."""
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    mean_loss = 0.0
    start = time.perf_counter()
    hide = None if progress and runtime.is_main else True  # None: tqdm hides the bar when stderr is no terminal
    bar = tqdm(total=steps, desc=desc or f"epoch {epoch}", unit="step", disable=hide, leave=False)
    matrices = augment.epoch_matrices(steps, batch_size, runtime.device)  # one host-to-device copy per epoch
    for step, (images, masks) in enumerate(data.batches(steps, batch_size, generator), start=1):
        if matrices is not None:
            images, masks = apply_affine(images, masks, matrices[step - 1])  # on the device, whole batch at once
        images = images.contiguous(memory_format=torch.channels_last)
        device_type, amp_dtype = runtime.device.type, runtime.amp_dtype
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images, return_logits=True)  # (B, 3, H, W) -> (B, 1, H, W)
        loss = criterion(logits, masks)  # float32, sigmoid inside
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # fp16 only: the scaler reads its inf check on the host, a sync per step
        scaler.update()
        loss_sum += loss.detach()
        if step % log_interval == 0 or step == steps:
            mean_loss = mean_over_ranks(loss_sum, runtime).item() / step  # the only host sync (bf16, fp32)
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"the training loss became {mean_loss} at epoch {epoch}, step {step}")
            rate = step * batch_size * runtime.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", slices_per_s=f"{rate:.1f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": mean_loss, "slices_per_s": steps * batch_size * runtime.world_size / seconds, "seconds": seconds}


def sync_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them
    only at the start of a training forward pass, after which each rank's batches move its
    own copy; validating without this would score a different model on each rank."""
    if runtime.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@dataclass
class ValidationVolume:
    """A validation patient for `validation_masks`: its preprocessed images (S, 3, H, W) and
    masks (S, H, W), as tensors kept on the training device between epochs when the
    training set is there too (`validation_inputs`), else as the host arrays."""

    patient_id: str
    images: torch.Tensor | np.ndarray
    masks: torch.Tensor


def validation_inputs(volumes: list[Volume], device: torch.device, placement: str) -> list[ValidationVolume]:
    """The validation volumes, copied to `device` once for the whole run when `placement` is
    "device" (CUDA: no copy from the disk cache each epoch), else read from the host."""
    on_device = placement == "device"
    inputs = []
    for volume in volumes:
        images = torch.from_numpy(np.array(volume.images)).to(device) if on_device else volume.images
        masks = torch.from_numpy(np.array(volume.masks)).to(device if on_device else "cpu")
        inputs.append(ValidationVolume(volume.patient_id, images, masks))
    return inputs


@torch.no_grad()
def validation_masks(
    model: nn.Module,
    volumes: list[ValidationVolume],
    runtime: Runtime,
    batch_size: int,
    criterion: nn.Module,
) -> list[dict]:
    """The device part of validation for this rank's share of the patients (every
    world_size-th): per patient the loss (`criterion` on the probabilities, averaged over
    slices) and the thresholded mask (probability >= 0.5), computed on the device; only the
    mask (bool (S, H, W)) and the loss come to the host, one transfer each per patient.
    `score_patients` does the rest (the 3-D component step and Dice) on the host."""
    context = context_slices_of(model.config["in_channels"], "model")
    parts = []
    for volume in volumes[runtime.rank :: runtime.world_size]:
        amp = runtime.amp_dtype
        probs = predict_probabilities(
            model, volume.images, runtime.device, batch_size, amp_dtype=amp, context_slices=context
        )
        truth = volume.masks.to(probs.device)
        loss = criterion(probs[:, None], truth[:, None].float())
        parts.append({"patient": volume.patient_id, "loss": loss, "slices": len(probs), "mask": probs >= 0.5})
    return [{**part, "loss": part["loss"].item(), "mask": part["mask"].cpu().numpy()} for part in parts]


def score_patients(parts: list[dict], truths: dict[str, np.ndarray], lcc: bool, keep_predictions: bool) -> list[dict]:
    """The host part of validation: each patient's thresholded mask after the 3-D largest
    connected component step (`lcc`; all components otherwise) and its Dice with the truth
    (`truths`: patient -> (S, H, W) mask), in preprocessed space. The mask is kept only with
    `keep_predictions` (for overlays)."""
    scored = []
    for part in parts:
        prediction = largest_connected_component(part["mask"]) if lcc else part["mask"]
        dice = dice_score(prediction, truths[part["patient"]])
        kept = prediction if keep_predictions else None
        scored.append(
            {
                "patient": part["patient"],
                "loss": part["loss"],
                "slices": part["slices"],
                "dice": dice,
                "prediction": kept,
            }
        )
    return scored


def gather_over_ranks(results: list[dict], runtime: Runtime) -> list[dict]:
    """Every rank's per-patient results on every rank (a collective: the training thread
    calls it, never the background worker)."""
    if not runtime.distributed:
        return results
    gathered: list = [None] * runtime.world_size
    dist.all_gather_object(gathered, results)
    return [r for part in gathered for r in part]


def summarize_validation(results: list[dict]) -> dict:
    """Loss (slice-weighted mean), Dice mean and median over patients, per-patient Dice and
    the kept predictions, from `score_patients`' records of all ranks."""
    results = sorted(results, key=lambda r: r["patient"])
    dice = np.array([r["dice"] for r in results])
    slices = sum(r["slices"] for r in results)
    return {
        "loss": sum(r["loss"] * r["slices"] for r in results) / slices,
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "dice": {r["patient"]: r["dice"] for r in results},
        "predictions": {r["patient"]: r["prediction"] for r in results if r["prediction"] is not None},
    }


def evaluate(
    model: nn.Module,
    volumes: list[Volume],
    runtime: Runtime,
    batch_size: int,
    lcc: bool = True,
    keep_predictions: bool = False,
    criterion: nn.Module | None = None,
) -> dict:
    """Per-patient validation in one call, on the calling thread, as the epoch loop does it
    in parts (`validation_masks` on the device, `score_patients` on the host): the loss
    (`criterion` on probabilities, default soft Dice) averaged over slices, Dice of each
    whole volume (threshold 0.5, 3-D LCC) in preprocessed space; mean and median over
    patients (a 2.5-D `UNetModel` gets its context slices stacked as in training). Each rank
    validates every world_size-th patient; results are gathered. Under DDP call
    `sync_buffers` first, so that every rank scores the same model."""
    criterion = criterion or build_loss("dice", from_logits=False)
    inputs = validation_inputs(volumes, runtime.device, "host")
    parts = validation_masks(model, inputs, runtime, batch_size, criterion)
    truths = {v.patient_id: np.asarray(v.masks) for v in volumes}
    return summarize_validation(gather_over_ranks(score_patients(parts, truths, lcc, keep_predictions), runtime))


def log_overlays(logger: TBLogger, volumes: list[Volume], predictions: dict, limit: int, epoch: int) -> None:
    """Up to `limit` validation slices with truth or prediction, composed with array
    operations (`utils.thumbnail` at full size, no matplotlib figure): FLAIR in grey,
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


# ---------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_config(args: argparse.Namespace, runtime: Runtime) -> dict:
    """The run's configuration as saved in checkpoints and args.json: every flag, plus the
    number of processes and the precision --amp resolved to on this device (bf16, fp16, off)."""
    return {**vars(args), "world_size": runtime.world_size, "precision": runtime.amp_name}


def flag_text(name: str, value: Any) -> str:
    """How a configuration entry reads on a command line: `--epochs 5`, `--sync-bn`, `no --folds`."""
    if name == "world_size":
        return f"{value} process(es) (torchrun --nproc_per_node)"
    flag = f"--{name.replace('_', '-')}"
    if value is True:
        return flag
    if value is None or value is False:
        return f"no {flag}"
    return f"{flag} {value}"


def check_resume_contract(checkpoint: dict, path: Path, config: dict) -> None:
    """Refuse to resume with a change of any flag in RUN_DEFINING_FLAGS. A flag missing from
    an older checkpoint counts as VALUES_BEFORE_FLAG's value, else as its default."""
    require_training_checkpoint(checkpoint, path, resume=True)
    defaults = {**vars(get_args_parser().parse_args([])), "world_size": 1, **VALUES_BEFORE_FLAG}
    saved_config = checkpoint["args"]
    for name in RUN_DEFINING_FLAGS:
        saved, given = saved_config.get(name, defaults[name]), config[name]
        if saved != given:
            raise CheckpointError(
                f"{path} was trained with {flag_text(name, saved)}, this run asks for {flag_text(name, given)}; "
                f"resume with {flag_text(name, saved)}, or start a new run (another --checkpoint-dir, or --overwrite)"
            )
    # `--amp auto` resolves per device (bf16 where supported, else fp16): the same flag can ask
    # for another precision on another GPU, and the saved GradScaler state would not fit it.
    precision = saved_config.get("precision")  # absent before it was recorded
    if precision is not None and precision != config["precision"]:
        raise CheckpointError(
            f"{path} was trained in {precision} precision (--amp {saved_config.get('amp', 'auto')}), this run "
            f"resolves --amp {config['amp']} to {config['precision']} on this device; resume on a device where "
            f"--amp {config['amp']} gives {precision}, or start a new run (another --checkpoint-dir, or --overwrite)"
        )


def find_resume_checkpoint(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.checkpoint_dir) / "last.pt"
        return path if path.is_file() else None
    path = Path(args.resume)
    if path.is_dir():
        raise CheckpointError(f"--resume {path}: is a folder; pass {path / 'last.pt'} (or --resume auto)")
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: file not found")
    return path


def check_no_clobber(args: argparse.Namespace, resume_path: Path | None) -> None:
    """A new run never silently replaces the checkpoints of an earlier one."""
    folder = Path(args.checkpoint_dir)
    existing = [name for name in CHECKPOINT_NAMES if (folder / name).is_file()]
    continues_it = resume_path is not None and resume_path.resolve().parent == folder.resolve()
    if not existing or args.overwrite or continues_it:
        return
    how = "--resume auto" if "last.pt" in existing else f"--resume {folder / existing[0]}"
    how = f"`python train.py --demo {how}`" if args.demo else how
    raise UsageError(
        f"--checkpoint-dir {folder} already holds {' and '.join(existing)} of an earlier run: continue it "
        f"with {how}, or pass --overwrite to start a new run there (deletes them)"
    )


# ----------------------------------------------------------------- checks before any work


def prepare_demo_data(args: argparse.Namespace) -> None:
    if not Path(args.data_dir).exists():
        print(f"demo: writing a {DEMO_PATIENTS}-patient phantom to {args.data_dir}")
        make_synthetic_dataset(args.data_dir, patients=DEMO_PATIENTS, seed=args.seed, slices=(20, 32))


def check_before_work(args: argparse.Namespace, config: dict) -> tuple[Path | None, dict | None, list[Patient]]:
    """Everything that can fail before preprocessing and training (run on rank 0): the
    output folders, the checkpoint to resume from and its contract, an earlier run in
    --checkpoint-dir, the patients and the split. Returns (resume path, the loaded
    checkpoint, the patients to load)."""
    folders = {"--checkpoint-dir": args.checkpoint_dir, "--log-dir": args.log_dir}
    if not args.no_cache:
        folders["--cache-dir"] = args.cache_dir
    for flag, folder in folders.items():
        check_writable_dir(folder, flag)
    resume_path = find_resume_checkpoint(args)
    resumed = load_checkpoint(resume_path) if resume_path else None
    if resumed is not None:
        check_resume_contract(resumed, resume_path, config)
    check_no_clobber(args, resume_path)
    if args.demo:
        prepare_demo_data(args)
    patients = discover_inputs(args.data_dir)  # TIFF folders and NIfTI files, as predict.py reads them
    if resumed is not None:
        patients = select_patients(patients, resumed["split"]["train"] + resumed["split"]["val"])
    unlabelled = [p for p in patients if not p.labelled]
    if unlabelled:
        kinds = " or ".join(sorted({"_mask.nii.gz" if p.nifti else "_mask.tif" for p in unlabelled}, reverse=True))
        listing = ", ".join(p.patient_id for p in unlabelled)
        raise DataError(f"training needs masks, but these patients have no {kinds} files: {listing}")
    if resumed is None:  # checks --val-patients / --folds against the data
        ids = [p.patient_id for p in patients]
        make_split(ids, args.val_patients, args.seed, args.folds, args.fold, test_patients=args.test_patients)
    # every check passed: preprocessing may start. --checkpoint-dir and --log-dir are made when
    # the first file is written to them (args.json, TensorBoard), after the data has loaded,
    # so that an unreadable slice found while preprocessing leaves no empty run folders.
    if "--cache-dir" in folders:
        ensure_writable_dir(folders["--cache-dir"], "--cache-dir")
    return resume_path, resumed, patients


def load_split_volumes(
    args: argparse.Namespace, runtime: Runtime, patients: list[Patient], split: dict | None
) -> tuple[dict, list[Volume], list[Volume]]:
    """Load the patients' volumes (rank 0 fills the cache first), then make the split
    stratified by lesion presence, or reuse the split of the checkpoint resumed from."""
    cache_dir = None if args.no_cache else args.cache_dir
    if runtime.distributed and not runtime.is_main and cache_dir is not None:
        dist.barrier()  # wait for rank 0 to fill the cache
    workers = max(1, args.num_workers)
    volumes = load_volumes(patients, args.image_size, cache_dir, workers, runtime.is_main, args.norm_region)
    if runtime.distributed and runtime.is_main and cache_dir is not None:
        dist.barrier()
    by_id = {v.patient_id: v for v in volumes}
    if split is None:
        has_lesion = {v.patient_id: bool(np.asarray(v.masks).any()) for v in volumes}
        split = make_split(
            list(by_id), args.val_patients, args.seed, args.folds, args.fold, has_lesion, args.test_patients
        )
    return split, [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the epoch loop needs; built by `set_up`."""

    args: argparse.Namespace
    runtime: Runtime
    config: dict
    raw_model: UNetModel
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: ResidentSlices | StreamedSlices
    placement: str
    train_slices: int
    steps: int
    split: dict
    val_volumes: list[Volume]
    start_epoch: int = 1
    best_dice: float = -1.0
    log_run: str = ""
    logger: TBLogger | None = None
    history: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)  # every validated epoch, resumed ones too (with lr)
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch this process ran
    val_inputs: list[ValidationVolume] = field(default_factory=list)  # on the device with --data-placement device
    val_truths: dict[str, np.ndarray] = field(default_factory=dict)  # patient -> host mask (S, H, W)
    worker: BackgroundWorker = field(default_factory=lambda: BackgroundWorker(enabled=False))
    epoch_parts: list[dict] = field(default_factory=list)  # rank 0: finish_epoch's seconds of each epoch


def agree_on_inputs(args: argparse.Namespace, runtime: Runtime, config: dict) -> tuple[Path | None, dict | None, list]:
    """Rank 0 runs `check_before_work`; every rank follows its decision on whether and from
    where to resume (each loads that checkpoint itself)."""
    own: dict = {}

    def work() -> tuple[Path | None, list[Patient]]:
        path, own["resumed"], patients = check_before_work(args, config)
        if path is None and args.overwrite:
            for name in CHECKPOINT_NAMES:
                if (Path(args.checkpoint_dir) / name).is_file():
                    (Path(args.checkpoint_dir) / name).unlink()
                    print(f"--overwrite: deleted {Path(args.checkpoint_dir) / name} of the earlier run")
        return path, patients

    path, patients = on_rank_zero(runtime, work)
    resumed = own["resumed"] if runtime.is_main else (load_checkpoint(path) if path else None)
    return path, resumed, patients


def build_training_model(args: argparse.Namespace, runtime: Runtime) -> tuple[UNetModel, nn.Module]:
    """The unwrapped model (what checkpoints save) and the one to train (DDP, compiled)."""
    seed_everything(args.seed)  # weight initialisation
    in_channels = 3 * (2 * args.context_slices + 1)  # 3 sequences per slice, C neighbours on each side
    raw_model = UNetModel(in_channels, base_filters=args.base_filters)
    raw_model = raw_model.to(runtime.device).to(memory_format=torch.channels_last)
    model: nn.Module = raw_model
    if runtime.distributed:
        if args.sync_bn:
            raw_model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        model = torch.compile(model)
    return raw_model, model


def steps_per_epoch(args: argparse.Namespace, train_slices: int, world_size: int) -> int:
    """--steps-per-epoch, or one pass over the training slices shared by all ranks."""
    if args.steps_per_epoch:
        return args.steps_per_epoch
    return max(1, math.ceil(math.ceil(train_slices / world_size) / args.batch_size))


def set_up(args: argparse.Namespace, runtime: Runtime) -> Run:
    """Checks, data, model, optimiser; the state of the checkpoint resumed from, if any."""
    config = run_config(args, runtime)
    resume_path, resumed, patients = agree_on_inputs(args, runtime, config)
    split, train_volumes, val_volumes = load_split_volumes(args, runtime, patients, resumed and resumed["split"])
    train_set = MRISegmentationDataset(train_volumes, args.context_slices)
    sampler = make_sampler(train_set, args.sampling, args.sampling_floor, args.lesion_fraction)
    data, placement = training_data(train_set, runtime.device, args.data_placement, args.num_workers, sampler)
    raw_model, model = build_training_model(args, runtime)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=0.0)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    run = Run(
        args, runtime, config, raw_model, model, optimizer, scheduler, scaler, data, placement,
        len(train_set), steps_per_epoch(args, len(train_set), runtime.world_size), split, val_volumes,
    )  # fmt: skip
    if resumed is not None:
        restore(run, resumed)
    run.val_inputs = validation_inputs(val_volumes, runtime.device, placement)
    run.val_truths = {v.patient_id: np.asarray(v.masks) for v in val_volumes}
    run.worker = BackgroundWorker(enabled=not args.no_background)
    open_log(run)
    if runtime.is_main:
        atomic_write_bytes(json.dumps(config, indent=2).encode(), Path(args.checkpoint_dir) / "args.json")
        print_start(run, resume_path)
    return run


def restore(run: Run, checkpoint: dict) -> None:
    """Continue from a checkpoint: weights, optimiser, schedule, scaler, RNG, epoch, best Dice."""
    run.raw_model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    run.start_epoch, run.best_dice = checkpoint["epoch"] + 1, checkpoint["best_dice"]
    run.log_run = checkpoint.get("log_run", "")
    run.curves = [h for h in checkpoint.get("history", []) if h["epoch"] < run.start_epoch]


def open_log(run: Run) -> None:
    """TensorBoard in <log-dir>/<run>: a new run gets a new sub-folder named by its start
    time and checkpoint folder; a resumed run continues its own (points logged after the
    checkpoint's epoch are purged, so curves never double back)."""
    log_dir = Path(run.args.log_dir)
    resumed = bool(run.log_run)
    if run.runtime.is_main and not resumed:
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(run.args.checkpoint_dir).resolve().name}"
        run.log_run, n = stem, 1
        while (log_dir / run.log_run).exists():
            n += 1
            run.log_run = f"{stem}-{n}"
    purge_step = run.start_epoch if resumed else None
    run.logger = TBLogger(log_dir / run.log_run, enabled=run.runtime.is_main, purge_step=purge_step)


def print_start(run: Run, resume_path: Path | None) -> None:
    args, runtime = run.args, run.runtime
    print(
        f"device {runtime.device} x {runtime.world_size} process(es), amp {runtime.amp_name}, data on "
        f"{'device' if run.placement == 'device' else 'host (streamed)'}, "
        f"{count_parameters(run.raw_model) / 1e6:.2f} M parameters, loss {args.loss}"
    )
    split = run.split
    fold = f" (fold {split['fold']} of {split['folds']})" if split.get("folds") else ""
    print(
        f"patients: {len(split['train'])} train ({run.train_slices} slices), {len(split['val'])} val, "
        f"{len(split.get('test', []))} test{fold}; {run.steps} steps of {args.batch_size} x {runtime.world_size} "
        "per epoch"
    )
    share = run.data.sampler.lesion_share(args.batch_size)
    print(
        f"sampling {args.sampling}: {share:.0%} lesion slices expected per batch; normalisation over the "
        f"{args.norm_region}; {args.context_slices} context slice(s) per side ({run.raw_model.config['in_channels']} "
        "input channels)"
    )
    lesion_free = sum(1 for v in run.val_volumes if not np.asarray(v.masks).any())
    if lesion_free:
        print(
            f"validation: {lesion_free} of {len(run.val_volumes)} patients are lesion-free; each scores Dice 1 "
            "(nothing predicted) or 0, so the mean can jump between epochs (the median is steadier)"
        )
    curves = "" if args.no_learning_curves else f"; after each epoch: {learning_curves_path(args)}"
    print(f"TensorBoard: {Path(args.log_dir) / run.log_run}{curves}")
    if resume_path is not None:
        print(f"resumed from {resume_path} after epoch {run.start_epoch - 1} (best Dice {run.best_dice:.4f})")
    elif args.resume == "auto":
        print(f"--resume auto: no last.pt in {args.checkpoint_dir}, starting from scratch")
    print(EPOCH_HEADER, flush=True)


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


def run_epoch(run: Run, epoch: int) -> None:
    """Train one epoch on this rank's own random streams, then hand its end (validation,
    checkpoints, pictures, the epoch line) to `end_epoch`."""
    args, runtime = run.args, run.runtime
    generator = torch.Generator().manual_seed(stream_seed(args.seed, epoch, runtime.rank, 0))
    augment = BatchAugmentation(
        args.aug_scale, args.aug_angle, 0.5, seed=stream_seed(args.seed, epoch, runtime.rank, 1)
    )
    criterion = build_loss(args.loss, from_logits=True)
    start = time.perf_counter()
    train_stats = train_one_epoch(
        run.model, run.data, run.optimizer, run.scaler, criterion, augment, runtime,
        run.steps, args.batch_size, generator, epoch, args.log_interval, desc=progress_label(run, epoch),
    )  # fmt: skip
    end_epoch(run, epoch, train_stats)
    run.epoch_seconds.append(time.perf_counter() - start)


def progress_label(run: Run, epoch: int) -> str:
    """The progress bar's label: the epoch, and the time the run has left, estimated from
    the mean of the last three epochs of this process (training, validation and saving)."""
    label = f"epoch {epoch}/{run.args.epochs}"
    if not run.epoch_seconds:
        return label
    recent = run.epoch_seconds[-3:]
    last = min(run.args.epochs, run.args.stop_after_epoch or run.args.epochs)
    left = sum(recent) / len(recent) * (last - epoch + 1)
    return f"{label}, run {format_duration(left)} left"


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def is_validation_epoch(args: argparse.Namespace, epoch: int) -> bool:
    """Every --val-interval-th epoch and the last one (so best_model.pt always exists)."""
    return epoch % args.val_interval == 0 or epoch == args.epochs


@dataclass
class EpochEnd:
    """What the training thread hands over at the end of an epoch (host data only)."""

    epoch: int
    train_stats: dict
    lr: float
    state: dict | None  # inference.training_state on rank 0, else None
    parts: list[dict] | None  # validation_masks (or, under DDP, every rank's scored records); None: not validated
    scored: bool  # parts are score_patients records already (DDP)
    visualise: bool
    seconds: dict  # the training thread's: "val" (device part), "ckpt" (host copy), "outside", "waited"


def end_epoch(run: Run, epoch: int, train_stats: dict) -> None:
    """The training thread's part of an epoch's end: validation on the device (`validation_masks`,
    on the model every rank shares), the schedule step, a host copy of the training state;
    the rest (`finish_epoch`) goes to the background worker, which overlaps the next epoch.
    Under DDP the component step and the gather of the results stay here (a collective)."""
    args, runtime = run.args, run.runtime
    start = time.perf_counter()
    validated = is_validation_epoch(args, epoch)
    visualise = validated and args.vis_frequency > 0 and epoch % args.vis_frequency == 0 and args.n_vis_images > 0
    parts, scored = None, runtime.distributed
    if validated:
        sync_buffers(run.raw_model, runtime)  # validate exactly the model that rank 0 saves
        criterion = build_loss(args.loss, from_logits=False)
        parts = validation_masks(run.raw_model, run.val_inputs, runtime, args.batch_size * 2, criterion)
        if scored:
            parts = gather_over_ranks(score_patients(parts, run.val_truths, not args.no_lcc, visualise), runtime)
    val_seconds = time.perf_counter() - start
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    copy_start = time.perf_counter()
    state = None
    if runtime.is_main:
        state = training_state(run.raw_model, run.optimizer, run.scheduler, run.scaler, rng_state())
    copy_seconds = time.perf_counter() - copy_start
    seconds = {"val": val_seconds, "val_device": val_seconds, "ckpt": copy_seconds, "ckpt_copy": copy_seconds}
    waited = run.worker.make_room()  # while the previous epoch's end still runs
    seconds["outside"] = time.perf_counter() - start  # this thread outside the steps (in-line: plus finish_epoch)
    seconds["waited"] = waited
    handover = EpochEnd(epoch, train_stats, lr, state, parts, scored, visualise, seconds)
    run.worker.submit(lambda: finish_epoch(run, handover))


def finish_epoch(run: Run, end: EpochEnd) -> None:
    """The rest of an epoch's end, on the background worker (or in line with --no-background):
    the component step and Dice, the best-epoch rule (best mean validation Dice so far),
    last.pt and best_model.pt (atomic), learning_curves.png, TensorBoard scalars and
    overlays, and the epoch line. Only this function changes best_dice, history and curves
    while the run trains."""
    args, runtime = run.args, run.runtime
    begun = time.perf_counter()
    seconds = {"step": end.train_stats["seconds"], **end.seconds, "pics": 0.0}
    val, is_best = None, False
    if end.parts is not None:
        start = time.perf_counter()
        results = end.parts if end.scored else score_patients(end.parts, run.val_truths, not args.no_lcc, end.visualise)
        val = summarize_validation(results)
        seconds["val"] += time.perf_counter() - start
        is_best = val["dice_mean"] > run.best_dice
        run.best_dice = max(run.best_dice, val["dice_mean"])
        record = {"epoch": end.epoch, "train_loss": end.train_stats["loss"], "val_loss": val["loss"]}
        run.history.append({**record, "dice_mean": val["dice_mean"], "dice_median": val["dice_median"]})
        run.curves.append({**run.history[-1], "lr": end.lr})
    if not runtime.is_main:
        return
    start = time.perf_counter()
    checkpoint = make_checkpoint(end.state, run.split, end.epoch, run.best_dice, run.config, run.log_run, run.curves)
    write_checkpoint(checkpoint, Path(args.checkpoint_dir) / "last.pt")
    if is_best:
        write_checkpoint(checkpoint, Path(args.checkpoint_dir) / "best_model.pt")
    seconds["ckpt"] += time.perf_counter() - start
    start = time.perf_counter()
    if val is not None and not args.no_learning_curves:
        curves = plot_learning_curves(run.curves, f"{Path(args.checkpoint_dir).name} ({args.loss} loss)")
        write_learning_curves(png_bytes(curves), Path(args.checkpoint_dir) / LEARNING_CURVES, end.epoch)
    if end.visualise:
        log_overlays(run.logger, run.val_volumes, val["predictions"], args.n_vis_images, end.epoch)
    seconds["pics"] += time.perf_counter() - start
    if not run.worker.enabled:  # in line, all of this kept the training thread from training
        seconds["outside"] += time.perf_counter() - begun
    log_epoch(run, end, val, seconds)
    run.epoch_parts.append({"epoch": end.epoch, **seconds})
    print_line(
        epoch_line(end.epoch, args.epochs, end.train_stats, val, end.lr, seconds) + ("  *best*" if is_best else "")
    )


def write_checkpoint(checkpoint: dict, path: Path) -> None:
    """`save_checkpoint` (atomic), with a failed write (disk full, folder gone) as one
    CheckpointError line that says the earlier file is intact."""
    try:
        save_checkpoint(checkpoint, path)
    except OSError as error:
        raise CheckpointError(
            f"{path}: the checkpoint could not be written ({error}); the earlier {path.name} is kept"
        ) from error


def write_learning_curves(png: bytes, path: Path, epoch: int) -> None:
    """`atomic_write_bytes` of the PNG (never half a picture), with a failed write as one
    UsageError line that says the epoch's checkpoints were written before it."""
    try:
        atomic_write_bytes(png, path)
    except OSError as error:
        raise UsageError(
            f"{path}: the learning curves could not be written ({error}); the checkpoints of epoch {epoch} are kept"
        ) from error


def log_epoch(run: Run, end: EpochEnd, val: dict | None, seconds: dict) -> None:
    """TensorBoard scalars of one epoch: losses, Dice, learning rate and where the time went."""
    scalars = {
        "train/loss": end.train_stats["loss"],
        "lr": end.lr,
        "time/slices_per_s": end.train_stats["slices_per_s"],
    }
    if val is not None:
        scalars |= {"val/loss": val["loss"], "val/dice_mean": val["dice_mean"], "val/dice_median": val["dice_median"]}
    scalars |= {"time/epoch_s": seconds["step"], "time/val_s": seconds["val"], "time/checkpoint_s": seconds["ckpt"]}
    scalars |= {"time/pictures_s": seconds["pics"], "time/outside_step_s": seconds["outside"]}
    run.logger.scalars(scalars, end.epoch)


def print_line(line: str) -> None:
    """Print above the progress bar, from either thread."""
    tqdm.write(line)
    sys.stdout.flush()


def train(args: argparse.Namespace, runtime: Runtime) -> dict:
    """Set up, run the epochs (up to --stop-after-epoch), return the history (used by tests)."""
    run = set_up(args, runtime)
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
        on_rank_zero(runtime, lambda: ensure_postprocessing_choice(args, runtime.device))
    return {
        "history": run.history,
        "best_dice": run.best_dice,
        "split": run.split,
        "raw_model": run.raw_model,
        "stopped_after": last if run.start_epoch <= last < args.epochs else None,
        "epoch_seconds": run.epoch_seconds,  # wall time of each epoch on the training thread
        "epoch_parts": run.epoch_parts,  # rank 0: step, val, ckpt, pics, outside, waited seconds per epoch
    }


def finish_background_work(run: Run, failing: bool) -> None:
    """Wait for the background worker before the run exits, so that every finished epoch's
    checkpoint is written. When the run is failing already, a worker error is printed, not
    raised, so the first error is the one the user sees."""
    if not failing:
        run.worker.close()
        return
    try:
        run.worker.close()
    except Exception as exc:  # the training error is raised after this
        print(f"error: while stopping, an epoch's end also failed: {exc}", file=sys.stderr)


# ------------------------------------------------------------------- post-processing choice


def ensure_postprocessing_choice(args: argparse.Namespace, device: torch.device) -> dict | None:
    """At the end of a finished run: choose best_model.pt's post-processing unless it holds a
    choice already (a best_model.pt written in this run never does). None when there is no
    best_model.pt."""
    path = Path(args.checkpoint_dir) / "best_model.pt"
    if not path.is_file():
        return None
    if "postprocessing" in load_checkpoint(path):
        return None
    cache_dir = None if args.no_cache else args.cache_dir
    return record_postprocessing_choice(path, args.data_dir, device, cache_dir, args.batch_size * 2)


def record_postprocessing_choice(
    path: str | Path, data_dir: str | Path, device: torch.device, cache_dir: str | Path | None, batch_size: int = 32
) -> dict:
    """Choose the post-processing of the checkpoint at `path` on its validation patients only
    (read from `data_dir`; no other patient is read): the Dice of every candidate of
    `inference.POSTPROCESSING_CANDIDATES` on the native grid, one forward pass per patient
    (`inference.score_postprocessing`), the best mean wins, ties go to the largest component
    (`inference.choose_postprocessing`). Prints the table, saves the record in the checkpoint
    (atomically) and in args.json beside it, and returns the selection record. Raises
    CheckpointError (no split, no validation patient) or DataError (patients missing)."""
    path = Path(path)
    loaded = load_model(path, device)
    val_ids = list((loaded.split or {}).get("val") or [])
    if not val_ids:
        raise CheckpointError(f"{path}: has no validation patients in its split; the post-processing choice needs them")
    found = {p.patient_id: p for p in discover_inputs(data_dir)}
    missing = [i for i in val_ids if i not in found]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{path}: {len(missing)} of its {len(val_ids)} validation patients are not in --data-dir {data_dir} "
            f"({listed}); pass the data folder the run was trained on"
        )
    scores = score_postprocessing(loaded, [found[i] for i in val_ids], device, cache_dir, batch_size)
    record, table = choose_postprocessing(scores)
    epoch = load_checkpoint(path).get("epoch")
    selection = {
        "chosen": postprocessing_name(record),
        "role": "val",
        "patients": val_ids,
        "epoch": epoch,
        "grid": "native (as predict.py scores)",
        "threshold": 0.5,
        "rule": "best mean Dice over the validation patients; ties go to lcc (nnU-Net's determine_postprocessing)",
        "table": table,
        "dice": scores,
    }
    save_postprocessing_choice(path, record, selection)
    saved_in = [path.name]
    args_json = path.parent / "args.json"
    if args_json.is_file():
        try:
            config = json.loads(args_json.read_text())
        except (OSError, ValueError) as error:
            print(f"note: {args_json} is not readable JSON ({error}); the choice is saved in {path.name} only")
        else:
            config |= {"postprocessing": record, "postprocessing_selection": selection}
            atomic_write_bytes(json.dumps(config, indent=2).encode(), args_json)
            saved_in.append(args_json.name)
    print_postprocessing_table(path, selection, " and ".join(saved_in))
    return selection


def print_postprocessing_table(path: Path, selection: dict, saved_in: str) -> None:
    """The validation table of the choice: candidate, mean and median Dice, the chosen one marked."""
    count = len(selection["patients"])
    print(
        f"\npost-processing of {path} (epoch {selection['epoch']}), chosen on its {count} validation patient(s), "
        "native grid, threshold 0.5:"
    )
    print(f"  {'candidate':<16}{'Dice mean':>10}{'median':>9}")
    for row in selection["table"]:
        mark = "  <- chosen" if row["candidate"] == selection["chosen"] else ""
        print(f"  {row['candidate']:<16}{row['mean']:>10.4f}{row['median']:>9.4f}{mark}")
    print(f"chosen: {selection['chosen']} (best mean; ties go to lcc), saved in {saved_in}", flush=True)


def choose_command(args: argparse.Namespace) -> dict:
    """`train.py --choose-postprocessing CKPT`: the choice for an existing checkpoint, no training."""
    for name in ("resume", "overwrite", "fold", "stop_after_epoch"):
        if getattr(args, name) not in (None, False):
            raise UsageError(
                f"--choose-postprocessing trains nothing; drop {flag_text(name, getattr(args, name))} "
                "(it takes --data-dir, --device, --cache-dir, --no-cache and --batch-size)"
            )
    if not Path(args.choose_postprocessing).exists():
        raise CheckpointError(f"--choose-postprocessing {args.choose_postprocessing}: checkpoint not found")
    device = resolve_device(args.device)
    cache_dir = None if args.no_cache else ensure_writable_dir(args.cache_dir, "--cache-dir")
    return record_postprocessing_choice(args.choose_postprocessing, args.data_dir, device, cache_dir, args.batch_size)


# ------------------------------------------------------------------------ --fold all


def fold_args(args: argparse.Namespace, fold: int) -> argparse.Namespace:
    """The arguments of one fold of --fold all: --fold i, checkpoints in <checkpoint-dir>/fold<i>."""
    folder = str(Path(args.checkpoint_dir) / f"fold{fold}")
    return argparse.Namespace(**{**vars(args), "fold": fold, "checkpoint_dir": folder})


def clear_stale_folds(args: argparse.Namespace) -> None:
    """Checkpoints in <checkpoint-dir>/fold<j> for j >= --folds (an earlier run with more
    folds) would be pooled by `predict.py --model-path <dir>/fold*/best_model.pt`: refused,
    or deleted with --overwrite."""
    stale = [
        path
        for path in sorted(Path(args.checkpoint_dir).glob("fold*/*.pt"))
        if path.name in CHECKPOINT_NAMES and path.parent.name[4:].isdigit() and int(path.parent.name[4:]) >= args.folds
    ]
    if stale and not args.overwrite:
        raise UsageError(
            f"--checkpoint-dir {args.checkpoint_dir} holds {stale[0].parent.name}/ of an earlier run with more "
            f"than {args.folds} folds: use another --checkpoint-dir, or pass --overwrite (deletes its checkpoints)"
        )
    for path in stale:
        path.unlink()
        print(f"--overwrite: deleted {path} of an earlier run with more folds")


def plan_folds(args: argparse.Namespace, runtime: Runtime) -> dict[int, str]:
    """Check every fold folder before any fold trains (rank 0 checks, every rank follows):
    the resume contract and the no-clobber rule of each fold, and no stale fold beyond
    --folds. Returns the folds already trained to --epochs (only with --resume auto), each
    with a line that says so."""

    def work() -> dict[int, str]:
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
        clear_stale_folds(args)
        finished = {}
        for fold in range(args.folds):
            one = fold_args(args, fold)
            check_writable_dir(one.checkpoint_dir, "--checkpoint-dir")
            path = find_resume_checkpoint(one)
            if path is not None:
                checkpoint = load_checkpoint(path)
                check_resume_contract(checkpoint, path, run_config(one, runtime))
                if checkpoint["epoch"] >= args.epochs:
                    finished[fold] = (
                        f"finished earlier (epoch {checkpoint['epoch']} of {args.epochs}, best validation Dice "
                        f"{checkpoint['best_dice']:.4f}): skipped"
                    )
            check_no_clobber(one, path)
        return finished

    return on_rank_zero(runtime, work)


def train_folds(args: argparse.Namespace, runtime: Runtime) -> dict:
    """--fold all: train folds 0..K-1 one after the other, each into <checkpoint-dir>/fold<i>/
    with its own TensorBoard sub-folder, under the rules of a single run per fold folder;
    with --resume auto a finished fold is skipped and an unfinished one continues. A fold
    that fails stops the command; the error names the fold. Returns {folds: one `train`
    result per fold (None if skipped), stopped_after}."""
    finished = plan_folds(args, runtime)
    results: list[dict | None] = []
    for fold in range(args.folds):
        one = fold_args(args, fold)
        if runtime.is_main:
            print(f"\n=== fold {fold} of {args.folds}: checkpoints in {one.checkpoint_dir}", flush=True)
        if fold in finished:
            if runtime.is_main:
                print(f"fold {fold}: {finished[fold]}")
            # a fold finished before the choice existed chooses now (rank 0; the others wait for it)
            on_rank_zero(runtime, lambda one=one: ensure_postprocessing_choice(one, runtime.device))
            results.append(None)
            continue
        try:
            results.append(train(one, runtime))
        except (DataError, CheckpointError, UsageError, TrainingDiverged) as error:
            later = f"folds {fold + 1}..{args.folds - 1} not trained; " if fold + 1 < args.folds else ""
            raise type(error)(
                f"fold {fold} of {args.folds} ({one.checkpoint_dir}): {error} ({later}once fixed, "
                "--resume auto skips the finished folds and continues this one)"
            ) from error
    stopped = [r["stopped_after"] for r in results if r is not None and r["stopped_after"] is not None]
    return {"folds": results, "stopped_after": max(stopped, default=None)}


def continue_command(argv: list[str], world_size: int) -> str:
    """The command that continues a run stopped by --stop-after-epoch: the same flags,
    without --stop-after-epoch, --resume and --overwrite, plus --resume auto."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip or name == "--overwrite":
            skip = False
            continue
        if name in ("--stop-after-epoch", "--resume"):
            skip = "=" not in token
            continue
        kept.append(token)
    launcher = ["python"] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}"]
    return shlex.join([*launcher, "train.py", *kept, "--resume", "auto"])


def exit_now(message: str) -> None:
    """Print before leaving the process group: once one rank exits, torchrun stops the others."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    one_line_warnings()
    if args.choose_postprocessing is not None:
        try:
            return choose_command(args)
        except (DataError, CheckpointError, UsageError) as error:
            sys.exit(f"error: {error}")
    try:
        validate_args(args)
        runtime = setup_runtime(args)
    except UsageError as error:
        sys.exit(f"error: {error}")
    try:
        with determinism(args.deterministic, runtime.device):
            result = train_folds(args, runtime) if args.fold == "all" else train(args, runtime)
            if runtime.distributed:  # leave together: a rank tearing down gloo while a peer still talks aborts it
                dist.barrier()
    except FollowRankZero:
        sys.exit(1)
    except (DataError, CheckpointError, UsageError, TrainingDiverged) as error:
        if runtime.is_main:
            sys.exit(f"error: {error}")
        exit_now(f"error: rank {runtime.rank}: {error}")
    except dist.DistError as error:  # another rank failed and left: it printed its own error
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        exit_now(f"error: rank {runtime.rank}: stopped, another process failed ({first})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main and result["stopped_after"] is not None:
        print(f"\nstopped after epoch {result['stopped_after']} of {args.epochs}; continue with:")
        print(f"  {continue_command(argv, runtime.world_size)}")
    if runtime.is_main and (args.demo or args.fold == "all") and result["stopped_after"] is None:
        if args.demo and not args.no_learning_curves:
            print(f"\nlearning curves: {learning_curves_path(args)}")
        print(f"\nnext: {predict_command(args)}")
    return result


def learning_curves_path(args: argparse.Namespace) -> Path:
    """<checkpoint-dir>/learning_curves.png (per fold under --fold all: fold<i>/learning_curves.png)."""
    folder = Path(args.checkpoint_dir)
    return folder / "fold*" / LEARNING_CURVES if args.fold == "all" else folder / LEARNING_CURVES


def predict_command(args: argparse.Namespace) -> str:
    """The predict.py command for the model(s) this run trained: the K fold checkpoints of
    --fold all (pooled: every patient scored by the model it was a test patient of)."""
    folder = Path(args.checkpoint_dir)
    if args.fold == "all":
        models = [str(folder / f"fold{i}" / "best_model.pt") for i in range(args.folds)]
        out = str(folder / "predictions")
    else:
        models, out = [str(folder / "best_model.pt")], "./demo_predictions"
    command = ["python", "predict.py", "--model-path", *models, "--data-dir", args.data_dir, "--output-dir", out]
    return shlex.join([*command, "--figure-path", f"{out}/dice_distribution.png"])


if __name__ == "__main__":
    main()
