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
import json
import math
import sys
import time
from dataclasses import dataclass, field
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
from background import BackgroundWorker
from crossval import train_folds
from inference import context_slices_of, predict_logits
from losses import add_loss_flag, build_loss
from metrics import dice_score
from patients import DataError, Patient
from pictures import plot_learning_curves, png_bytes
from postprocessing import largest_connected_component
from postprocessing_choice import ensure_postprocessing_choice, record_postprocessing_choice
from preprocessing import add_preprocessing_flags
from splits import add_split_flags, split_of_args, validate_split_args
from tb_logger import TBLogger

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
        training_log.add_logging_flags,
    ):
        add_flags(add)
    add(
        "--steps-per-epoch", defines_run=True, type=int, default=None, help="default: one pass over the training slices"
    )
    add(
        "--no-lcc",
        defines_run=True,
        note="for the per-epoch validation masks, whose Dice picks best_model.pt (without it: the largest "
        "component only); the post-processing chosen at the end of the run is not affected",
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
    them was trained with, unless resume.VALUES_BEFORE_FLAG says otherwise)."""
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
    if args.lr <= 0:
        raise utils.UsageError(f"--lr {args.lr}: must be positive")
    if args.steps_per_epoch is not None and args.steps_per_epoch <= 0:
        raise utils.UsageError(f"--steps-per-epoch {args.steps_per_epoch}: must be positive")
    if args.num_workers < 0:
        raise utils.UsageError("--num-workers, --vis-frequency and --n-vis-images must be >= 0")
    if args.context_slices < 0:
        raise utils.UsageError(f"--context-slices {args.context_slices}: must be >= 0")
    for validate in (
        augmentations.validate_augmentation_args,
        validate_split_args,
        sampling.validate_sampling_args,
        training_log.validate_logging_args,
        resume.validate_resume_args,
    ):
        validate(args)


# ---------------------------------------------------------------------- distributed


def stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, stream): independent generators per
    epoch make a resumed run draw exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------- train / eval


def train_one_epoch(
    model: nn.Module,
    data,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    augment: augmentations.Augment,
    runtime: distributed.Runtime,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    log_interval: int,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, float]:
    """One epoch of `steps` sampled batches, each augmented (`augment`, built for this epoch
    by `augmentations.build_augmentation`) and trained on (`train_step`). Every `log_interval`
    steps (and at the last) the loss is averaged over all ranks, so a non-finite loss on any
    rank stops every rank at the same step. `desc` labels the progress bar (default "epoch
    N"). Returns the loss (mean over steps and ranks), slices/s and seconds."""
    model.train()
    loss_sum, mean_loss = torch.zeros((), device=runtime.device), 0.0
    start = time.perf_counter()
    hide = None if progress and runtime.is_main else True  # None: tqdm hides the bar when stderr is no terminal
    bar = tqdm(total=steps, desc=desc or f"epoch {epoch}", unit="step", disable=hide, leave=False)
    for step, (images, masks) in enumerate(data.batches(steps, batch_size, generator), start=1):
        images, masks = augment(images, masks)
        loss_sum += train_step(model, optimizer, scaler, criterion, images, masks, runtime)
        if step % log_interval == 0 or step == steps:
            mean_loss = distributed.mean_over_ranks(loss_sum, runtime).item() / step  # the only host sync (bf16, fp32)
            if not math.isfinite(mean_loss):
                message = f"the training loss became {mean_loss} at epoch {epoch}, step {step}"
                raise distributed.TrainingDiverged(message)
            rate = step * batch_size * runtime.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", slices_per_s=f"{rate:.1f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": mean_loss, "slices_per_s": steps * batch_size * runtime.world_size / seconds, "seconds": seconds}


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


@dataclass
class ValidationVolume:
    """A validation patient for `validation_masks`: its preprocessed images (S, 3, H, W) and
    masks (S, H, W), as tensors kept on the training device between epochs when the
    training set is there too (`validation_inputs`), else as the host arrays."""

    patient_id: str
    images: torch.Tensor | np.ndarray
    masks: torch.Tensor


def validation_inputs(volumes: list[dataset.Volume], device: torch.device, placement: str) -> list[ValidationVolume]:
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
    runtime: distributed.Runtime,
    batch_size: int,
    criterion: nn.Module,
) -> list[dict]:
    """The device part of validation for this rank's share of the patients (every
    world_size-th): per patient the loss (`criterion`, the training loss, on the logits,
    averaged over slices) and the thresholded mask (sigmoid(logits) >= 0.5, as predict.py
    thresholds probabilities), computed on the device; only the mask (bool (S, H, W)) and
    the loss come to the host, one transfer each per patient. `score_patients` does the
    rest (the 3-D component step and Dice) on the host."""
    context = context_slices_of(model.config["in_channels"], "model")
    parts = []
    for volume in volumes[runtime.rank :: runtime.world_size]:
        amp = runtime.amp_dtype
        logits = predict_logits(model, volume.images, runtime.device, batch_size, amp_dtype=amp, context_slices=context)
        truth = volume.masks.to(logits.device)
        loss = criterion(logits[:, None], truth[:, None].float())
        mask = torch.sigmoid(logits) >= 0.5
        parts.append({"patient": volume.patient_id, "loss": loss, "slices": len(logits), "mask": mask})
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


# ----------------------------------------------------------------- checks before any work


def load_split_volumes(
    args: argparse.Namespace, runtime: distributed.Runtime, patients: list[Patient], split: dict | None
) -> tuple[dict, list[dataset.Volume], list[dataset.Volume]]:
    """Load the patients' volumes (rank 0 fills the cache first), then make the split
    stratified by lesion presence, or reuse the split of the checkpoint resumed from."""
    cache_dir = None if args.no_cache else args.cache_dir
    if runtime.distributed and not runtime.is_main and cache_dir is not None:
        dist.barrier()  # wait for rank 0 to fill the cache
    workers = max(1, args.num_workers)
    volumes = dataset.load_volumes(patients, args.image_size, cache_dir, workers, runtime.is_main, args.norm_region)
    if runtime.distributed and runtime.is_main and cache_dir is not None:
        dist.barrier()
    by_id = {v.patient_id: v for v in volumes}
    if split is None:
        has_lesion = {v.patient_id: bool(np.asarray(v.masks).any()) for v in volumes}
        split = split_of_args(args, list(by_id), has_lesion)
    return split, [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the epoch loop needs; built by `set_up`."""

    args: argparse.Namespace
    runtime: distributed.Runtime
    config: dict
    raw_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: sampling.ResidentSlices | sampling.StreamedSlices
    placement: str
    train_slices: int
    steps: int
    split: dict
    val_volumes: list[dataset.Volume]
    criterion: nn.Module  # --loss: training and validation call this one object, on logits
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


def build_training_model(args: argparse.Namespace, runtime: distributed.Runtime) -> tuple[nn.Module, nn.Module]:
    """The unwrapped model (what checkpoints save) and the one to train (DDP, compiled)."""
    utils.seed_everything(args.seed)  # weight initialisation
    in_channels = 3 * (2 * args.context_slices + 1)  # 3 sequences per slice, C neighbours on each side
    record = {"architecture": args.architecture, "in_channels": in_channels, "base_filters": args.base_filters}
    raw_model = network.build_model(record, "--architecture")
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


def set_up(args: argparse.Namespace, runtime: distributed.Runtime) -> Run:
    """Checks, data, model, optimiser; the state of the checkpoint resumed from, if any."""
    config = resume.run_config(args, runtime)
    resume_path, resumed, patients = resume.agree_on_inputs(args, runtime, config, run_defining_flags())
    split, train_volumes, val_volumes = load_split_volumes(args, runtime, patients, resumed and resumed["split"])
    train_set = dataset.MRISegmentationDataset(train_volumes, args.context_slices)
    sampler = sampling.make_sampler(train_set, args.sampling, args.sampling_floor, args.lesion_fraction)
    data, placement = sampling.training_data(train_set, runtime.device, args.data_placement, args.num_workers, sampler)
    raw_model, model = build_training_model(args, runtime)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=0.0)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    run = Run(
        args,
        runtime,
        config,
        raw_model,
        model,
        optimizer,
        scheduler,
        scaler,
        data,
        placement,
        len(train_set),
        steps_per_epoch(args, len(train_set), runtime.world_size),
        split,
        val_volumes,
        build_loss(args.loss),
    )
    if resumed is not None:
        restore(run, resumed)
    run.val_inputs = validation_inputs(val_volumes, runtime.device, placement)
    run.val_truths = {v.patient_id: np.asarray(v.masks) for v in val_volumes}
    run.worker = BackgroundWorker(enabled=not args.no_background)
    open_log(run)
    if runtime.is_main:
        utils.atomic_write_bytes(json.dumps(config, indent=2).encode(), Path(args.checkpoint_dir) / "args.json")
        print_start(run, resume_path)
    return run


def restore(run: Run, checkpoint: dict) -> None:
    """Continue from a checkpoint: weights, optimiser, schedule, scaler, RNG, epoch, best Dice."""
    run.raw_model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    resume.restore_rng_state(checkpoint["rng"])
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
        f"{network.count_parameters(run.raw_model) / 1e6:.2f} M parameters, loss {args.loss}"
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
    curves = "" if args.no_learning_curves else f"; after each epoch: {training_log.learning_curves_path(args)}"
    print(f"TensorBoard: {Path(args.log_dir) / run.log_run}{curves}")
    if resume_path is not None:
        print(f"resumed from {resume_path} after epoch {run.start_epoch - 1} (best Dice {run.best_dice:.4f})")
    elif args.resume == "auto":
        print(f"--resume auto: no last.pt in {args.checkpoint_dir}, starting from scratch")
    print(training_log.EPOCH_HEADER, flush=True)


def run_epoch(run: Run, epoch: int) -> None:
    """Train one epoch on this rank's own random streams, then hand its end (validation,
    checkpoints, pictures, the epoch line) to `end_epoch`."""
    args, runtime = run.args, run.runtime
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(stream_seed(args.seed, epoch, runtime.rank, 0))
    augment_seed = stream_seed(args.seed, epoch, runtime.rank, 1)
    augment = augmentations.build_augmentation(args, augment_seed, run.steps, args.batch_size, runtime.device)
    label = training_log.progress_label(epoch, args.epochs, run.epoch_seconds, args.stop_after_epoch)
    train_stats = train_one_epoch(
        run.model,
        run.data,
        run.optimizer,
        run.scaler,
        run.criterion,
        augment,
        runtime,
        run.steps,
        args.batch_size,
        generator,
        epoch,
        args.log_interval,
        desc=label,
    )
    end_epoch(run, epoch, train_stats)
    run.epoch_seconds.append(time.perf_counter() - start)


def is_validation_epoch(args: argparse.Namespace, epoch: int) -> bool:
    """Every --val-interval-th epoch and the last one (so best_model.pt always exists)."""
    return epoch % args.val_interval == 0 or epoch == args.epochs


@dataclass
class EpochEnd:
    """What the training thread hands over at the end of an epoch (host data only)."""

    epoch: int
    train_stats: dict
    lr: float
    state: dict | None  # checkpoint.training_state on rank 0, else None
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
        distributed.sync_buffers(run.raw_model, runtime)  # validate exactly the model that rank 0 saves
        parts = validation_masks(run.raw_model, run.val_inputs, runtime, args.batch_size * 2, run.criterion)
        if scored:
            scored_parts = score_patients(parts, run.val_truths, not args.no_lcc, visualise)
            parts = distributed.gather_over_ranks(scored_parts, runtime)
    val_seconds = time.perf_counter() - start
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    copy_start = time.perf_counter()
    state = None
    if runtime.is_main:
        state = checkpoint.training_state(run.raw_model, run.optimizer, run.scheduler, run.scaler, resume.rng_state())
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
    saved = checkpoint.make_checkpoint(
        end.state, run.split, end.epoch, run.best_dice, run.config, run.log_run, run.curves
    )
    checkpoint.write_checkpoint(saved, Path(args.checkpoint_dir) / "last.pt")
    if is_best:
        checkpoint.write_checkpoint(saved, Path(args.checkpoint_dir) / "best_model.pt")
    seconds["ckpt"] += time.perf_counter() - start
    start = time.perf_counter()
    if val is not None and not args.no_learning_curves:
        curves = plot_learning_curves(run.curves, f"{Path(args.checkpoint_dir).name} ({args.loss} loss)")
        path = Path(args.checkpoint_dir) / training_log.LEARNING_CURVES
        training_log.write_learning_curves(png_bytes(curves), path, end.epoch)
    if end.visualise:
        training_log.log_overlays(run.logger, run.val_volumes, val["predictions"], args.n_vis_images, end.epoch)
    seconds["pics"] += time.perf_counter() - start
    if not run.worker.enabled:  # in line, all of this kept the training thread from training
        seconds["outside"] += time.perf_counter() - begun
    training_log.log_epoch(run.logger, end.epoch, end.train_stats, end.lr, val, seconds)
    run.epoch_parts.append({"epoch": end.epoch, **seconds})
    line = training_log.epoch_line(end.epoch, args.epochs, end.train_stats, val, end.lr, seconds)
    training_log.print_line(line + ("  *best*" if is_best else ""))


def train(args: argparse.Namespace, runtime: distributed.Runtime) -> dict:
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


# ------------------------------------------------------------------------ --fold all


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
    try:
        with distributed.determinism(args.deterministic, runtime.device):
            result = (
                train_folds(args, runtime, train, run_defining_flags()) if args.fold == "all" else train(args, runtime)
            )
            if runtime.distributed:  # leave together: a rank tearing down gloo while a peer still talks aborts it
                dist.barrier()
    except distributed.FollowRankZero:
        sys.exit(1)
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
    if runtime.is_main and (args.demo or args.fold == "all") and result["stopped_after"] is None:
        if args.demo and not args.no_learning_curves:
            print(f"\nlearning curves: {training_log.learning_curves_path(args)}")
        print(f"\nnext: {training_log.predict_command(args)}")
    return result


if __name__ == "__main__":
    main()
