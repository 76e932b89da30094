"""Train the U-Net on a kaggle_3m-style data set.

python train.py --data-dir kaggle_3m                 # one GPU (or the CPU)
torchrun --nproc_per_node=4 train.py --data-dir ...  # DistributedDataParallel
python train.py --demo                               # phantom data, about 3 min on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from augmentations import BatchAugmentation
from dataset import (
    DataError,
    MRISegmentationDataset,
    Volume,
    discover_patients,
    load_volumes,
    make_split,
    make_synthetic_dataset,
    preprocessing_config,
    select_patients,
)
from losses import SoftDiceLoss
from network import UNetModel, count_parameters
from predict import binarize, predict_volume
from tb_logger import TBLogger
from utils import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    UsageError,
    atomic_write_bytes,
    dice_score,
    load_checkpoint,
    overlay,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

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
}
DEMO_PATIENTS = 20


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


# -------------------------------------------------------------------------- arguments


def demo_flags() -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in DEMO_DEFAULTS.items())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="./kaggle_3m", help="kaggle_3m-style folder of patient sub-folders")
    p.add_argument("--checkpoint-dir", default="./checkpoints", help="best_model.pt, last.pt, args.json")
    p.add_argument("--log-dir", default="./tb_logs", help="TensorBoard event files")
    p.add_argument("--epochs", type=int, default=100, help="number of epochs")
    p.add_argument("--batch-size", type=int, default=16, help="slices per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (cosine-annealed to 0)")
    p.add_argument("--image-size", type=int, default=256, help="preprocessed slice size, divisible by 16")
    p.add_argument("--aug-scale", type=float, default=0.05, help="random scale in [1-s, 1+s]")
    p.add_argument("--aug-angle", type=float, default=15.0, help="random rotation in [-a, a] degrees")
    p.add_argument("--device", default=None, help="default: cuda:0 when CUDA is available, else cpu")
    p.add_argument("--num-workers", type=int, default=4, help="preprocessing threads and loader workers")
    p.add_argument("--vis-frequency", type=int, default=10, help="validation overlays every N epochs (0: never)")
    p.add_argument("--n-vis-images", type=int, default=200, help="at most this many overlays each time")
    p.add_argument("--val-patients", type=int, default=10, help="patients held out for validation")
    p.add_argument("--seed", type=int, default=42, help="seed for split, sampling, augmentation, init")
    p.add_argument("--folds", type=int, default=None, help="K-fold cross-validation: number of folds")
    p.add_argument("--fold", type=int, default=None, help="which fold (0..K-1) is the validation set")
    p.add_argument("--base-filters", type=int, default=32, help="U-Net width (32: 7.8 M parameters)")
    p.add_argument("--cache-dir", default="./cache", help="preprocessing cache")
    p.add_argument("--no-cache", action="store_true", help="preprocess in memory, write no cache")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the training slices")
    p.add_argument(
        "--amp",
        choices=["auto", "fp16", "bf16", "off"],
        default="auto",
        help="mixed precision; auto = bf16 on GPUs that support it, else fp16; off on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", default=None, help="'auto' (last.pt in --checkpoint-dir, if any) or a path")
    p.add_argument("--no-lcc", action="store_true", help="validation without the largest-component step")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across processes")
    p.add_argument(
        "--data-placement",
        choices=["auto", "device", "stream"],
        default="auto",
        help="device: keep the training set on the training device; stream: DataLoader from "
        "the cache; auto: device if it fits in GPU memory (always on CPU)",
    )
    p.add_argument("--log-interval", type=int, default=20, help="steps between progress-bar loss updates")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        help="exit after this epoch (split a run over jobs; continue with --resume auto)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"write a phantom to ./demo_3m if absent and train a small model on it (sets {demo_flags()} unless given)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # demo values become defaults: flags given on the command line still win
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject invalid values before any work starts."""
    positive = ["epochs", "batch_size", "image_size", "val_patients", "base_filters", "log_interval"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.image_size % 16:
        raise UsageError(f"--image-size {args.image_size}: must be divisible by 16 (the U-Net pools 4 times)")
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
    if args.folds is not None and not 0 <= args.fold < args.folds:
        raise UsageError(f"--fold {args.fold}: must be in 0..{args.folds - 1}")
    if args.stop_after_epoch is not None and args.stop_after_epoch <= 0:
        raise UsageError("--stop-after-epoch must be positive")


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


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device and process group (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if world_size > 1:
        if device.type == "cuda":
            device = resolve_device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn: SyncBatchNorm works only on CUDA devices")
    amp = args.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, rank, world_size, amp_dtype)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, stream): independent generators per
    epoch make a resumed run draw exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------ training data


class ResidentSlices:
    """The whole training set as tensors on the training device; batches are drawn with
    `torch.multinomial` (what WeightedRandomSampler with replacement does) and gathered
    on the device, so the host does no per-step work."""

    def __init__(self, dataset: MRISegmentationDataset, device: torch.device):
        images, masks = dataset.stacked()
        self.images = torch.from_numpy(images).to(device)  # (N, 3, H, W) float16
        self.masks = torch.from_numpy(masks).to(device)[:, None]  # (N, 1, H, W) uint8
        self.weights = torch.as_tensor(dataset.slice_weights(), dtype=torch.double)
        self.device = device

    def batches(
        self, steps: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.multinomial(self.weights, steps * batch_size, True, generator=generator)
        indices = indices.to(self.device, non_blocking=True).view(steps, batch_size)
        for row in indices:
            yield self.images[row].float(), self.masks[row].float()


class StreamedSlices:
    """A DataLoader with WeightedRandomSampler over the memory-mapped cache."""

    def __init__(self, dataset: MRISegmentationDataset, device: torch.device, num_workers: int):
        self.dataset, self.device, self.num_workers = dataset, device, num_workers
        self.weights = torch.as_tensor(dataset.slice_weights(), dtype=torch.double)

    def batches(
        self, steps: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = WeightedRandomSampler(self.weights, steps * batch_size, replacement=True, generator=generator)
        loader = DataLoader(
            self.dataset,
            batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        for images, masks in loader:
            yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)


def training_data(dataset: MRISegmentationDataset, runtime: Runtime, placement: str, num_workers: int):
    """Keep the set on the device when asked, or (auto) when it takes under 40 % of free GPU memory."""
    if placement == "auto":
        if runtime.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(runtime.device)
            nbytes = sum(v.images.nbytes + v.masks.nbytes for v in dataset.volumes)
            placement = "device" if nbytes < 0.4 * free else "stream"
        else:
            placement = "device"
    if placement == "device":
        return ResidentSlices(dataset, runtime.device), placement
    return StreamedSlices(dataset, runtime.device, num_workers), placement


# ------------------------------------------------------------------------- train / eval


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
) -> dict[str, float]:
    """One epoch of `steps` weighted-sampled batches. Returns loss, slices/s and seconds."""
    model.train()
    device = runtime.device
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch}",
        unit="step",
        disable=not (progress and runtime.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    for step, (images, masks) in enumerate(data.batches(steps, batch_size, generator), start=1):
        images, masks = augment(images, masks)  # on the device, whole batch at once
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=runtime.amp_dtype or torch.float32, enabled=runtime.amp_dtype is not None
        ):
            probabilities = model(images)  # (B, 3, H, W) -> (B, 1, H, W)
        loss = criterion(probabilities, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()
        if step % log_interval == 0 or step == steps:
            mean_loss = loss_sum.item() / step  # the only host sync, at the logging interval
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"the training loss became {mean_loss} at epoch {epoch}, step {step}")
            rate = step * batch_size * runtime.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", slices_per_s=f"{rate:.1f}")
        bar.update(1)
    bar.close()
    if runtime.distributed:
        dist.all_reduce(loss_sum)
        loss_sum /= runtime.world_size
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum.item() / steps,
        "slices_per_s": steps * batch_size * runtime.world_size / seconds,
        "seconds": seconds,
    }


def evaluate(
    model: nn.Module,
    volumes: list[Volume],
    runtime: Runtime,
    batch_size: int,
    lcc: bool = True,
    keep_predictions: bool = False,
) -> dict:
    """Per-patient validation with the shared volume inference: soft-Dice loss over slices,
    Dice of each whole volume (threshold 0.5, 3-D LCC) in preprocessed space; mean and
    median over patients. Patients are shared out across ranks and gathered."""
    criterion = SoftDiceLoss()
    local = []
    for volume in volumes[runtime.rank :: runtime.world_size]:
        probs = predict_volume(model, volume.images, runtime.device, batch_size, amp_dtype=runtime.amp_dtype)
        truth = np.array(volume.masks)  # a writable copy of the memory map
        loss = criterion(torch.from_numpy(probs)[:, None], torch.from_numpy(truth)[:, None]).item()
        prediction = binarize(probs, 0.5, lcc)
        local.append(
            {
                "patient": volume.patient_id,
                "loss": loss,
                "slices": len(probs),
                "dice": dice_score(prediction, truth),
                "prediction": prediction if keep_predictions else None,
            }
        )
    results = local
    if runtime.distributed:
        gathered: list = [None] * runtime.world_size
        dist.all_gather_object(gathered, local)
        results = [r for part in gathered for r in part]
    results.sort(key=lambda r: r["patient"])
    dice = np.array([r["dice"] for r in results])
    slices = sum(r["slices"] for r in results)
    return {
        "loss": sum(r["loss"] * r["slices"] for r in results) / slices,
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "dice": {r["patient"]: r["dice"] for r in results},
        "predictions": {r["patient"]: r["prediction"] for r in results} if keep_predictions else {},
    }


def log_overlays(logger: TBLogger, volumes: list[Volume], predictions: dict, limit: int, epoch: int) -> None:
    """Up to `limit` validation slices with truth or prediction: FLAIR, red prediction, green truth."""
    shown = 0
    for volume in volumes:
        prediction, truth = predictions[volume.patient_id], np.asarray(volume.masks)
        for s in np.flatnonzero(prediction.any(axis=(1, 2)) | truth.any(axis=(1, 2))):
            if shown >= limit:
                return
            flair = np.asarray(volume.images[s, 1], dtype=np.float32)
            k = volume.geometry.slice_numbers[s]
            logger.image(f"overlay/{volume.patient_id}_{k}", overlay(flair, prediction[s], truth[s]), epoch)
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


def make_checkpoint(
    raw_model: UNetModel,
    optimizer,
    scheduler,
    scaler,
    split: dict,
    epoch: int,
    best_dice: float,
    args: argparse.Namespace,
) -> dict:
    """The checkpoint contract of DESIGN.md: weights of the unwrapped model plus everything to resume."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": raw_model.state_dict(),
        "model_config": dict(raw_model.config),
        "preprocessing": preprocessing_config(args.image_size),
        "split": split,
        "epoch": epoch,
        "best_dice": best_dice,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "args": vars(args),
    }


def find_resume_checkpoint(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.checkpoint_dir) / "last.pt"
        return path if path.is_file() else None
    path = Path(args.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: file not found")
    return path


def check_resume_compatible(checkpoint: dict, path: Path, args: argparse.Namespace) -> None:
    """A resumed run must keep the model width and the preprocessing of the checkpoint."""
    if not {"model", "model_config", "preprocessing", "optimizer", "epoch"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a training checkpoint of this project; cannot resume from it")
    saved = {
        "--base-filters": checkpoint["model_config"]["base_filters"],
        "--image-size": checkpoint["preprocessing"]["image_size"],
    }
    given = {"--base-filters": args.base_filters, "--image-size": args.image_size}
    for flag, value in saved.items():
        if given[flag] != value:
            raise CheckpointError(
                f"{path} was trained with {flag} {value}, not {given[flag]}; pass {flag} {value} to resume"
            )


# ---------------------------------------------------------------------------- main


def prepare_demo_data(args: argparse.Namespace, runtime: Runtime) -> None:
    if runtime.is_main and not Path(args.data_dir).exists():
        print(f"demo: writing a {DEMO_PATIENTS}-patient phantom to {args.data_dir}")
        make_synthetic_dataset(args.data_dir, patients=DEMO_PATIENTS, seed=args.seed, slices=(20, 32))
    if runtime.distributed:
        dist.barrier()


def load_split_volumes(
    args: argparse.Namespace, runtime: Runtime, split: dict | None
) -> tuple[dict, list[Volume], list[Volume]]:
    """Discover patients, load their volumes (rank 0 fills the cache first), then make the
    split stratified by lesion presence, or reuse the split of the checkpoint resumed from."""
    patients = discover_patients(args.data_dir)
    if split is not None:
        patients = select_patients(patients, split["train"] + split["val"])
    unlabelled = [p.patient_id for p in patients if not p.labelled]
    if unlabelled:
        raise DataError(f"training needs masks, but these patients have no _mask.tif files: {', '.join(unlabelled)}")
    if split is None:  # checks --val-patients / --folds against the data before any preprocessing
        make_split([p.patient_id for p in patients], args.val_patients, args.seed, args.folds, args.fold)
    cache_dir = None if args.no_cache else args.cache_dir
    if runtime.distributed and not runtime.is_main and cache_dir is not None:
        dist.barrier()  # wait for rank 0 to fill the cache
    volumes = load_volumes(patients, args.image_size, cache_dir, max(1, args.num_workers), progress=runtime.is_main)
    if runtime.distributed and runtime.is_main and cache_dir is not None:
        dist.barrier()
    by_id = {v.patient_id: v for v in volumes}
    if split is None:
        has_lesion = {v.patient_id: bool(np.asarray(v.masks).any()) for v in volumes}
        split = make_split(list(by_id), args.val_patients, args.seed, args.folds, args.fold, strata=has_lesion)
    return split, [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]


def train(args: argparse.Namespace, runtime: Runtime) -> dict:
    """Wire data, model and loop together; returns the final metrics (used by tests)."""
    checkpoint_dir = Path(args.checkpoint_dir)
    resume_path = find_resume_checkpoint(args)
    resumed = load_checkpoint(resume_path) if resume_path else None
    if resumed:
        check_resume_compatible(resumed, resume_path, args)
    if args.demo:
        prepare_demo_data(args, runtime)
    split, train_volumes, val_volumes = load_split_volumes(args, runtime, resumed["split"] if resumed else None)
    train_set = MRISegmentationDataset(train_volumes)
    data, placement = training_data(train_set, runtime, args.data_placement, args.num_workers)

    seed_everything(args.seed)
    raw_model = UNetModel(base_filters=args.base_filters).to(runtime.device).to(memory_format=torch.channels_last)
    model: nn.Module = raw_model
    if runtime.distributed:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            raw_model = model
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=0.0)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    start_epoch, best_dice = 1, -1.0
    if resumed:
        raw_model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        restore_rng_state(resumed["rng"])
        start_epoch, best_dice = resumed["epoch"] + 1, resumed["best_dice"]

    samples_per_rank = (
        args.steps_per_epoch * args.batch_size
        if args.steps_per_epoch
        else math.ceil(len(train_set) / runtime.world_size)
    )
    steps = max(1, math.ceil(samples_per_rank / args.batch_size))
    logger = TBLogger(args.log_dir, enabled=runtime.is_main)
    if runtime.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json.dumps(vars(args), indent=2).encode(), checkpoint_dir / "args.json")
        amp = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[runtime.amp_dtype]
        print(
            f"device {runtime.device} x {runtime.world_size} process(es), amp {amp}, data on "
            f"{'device' if placement == 'device' else 'host (streamed)'}, "
            f"{count_parameters(raw_model) / 1e6:.2f} M parameters"
        )
        print(
            f"{len(split['train'])} training patients ({len(train_set)} slices), {len(split['val'])} validation "
            f"patients; {steps} steps of {args.batch_size} x {runtime.world_size} per epoch"
        )
        if resumed:
            print(f"resumed from {resume_path} after epoch {start_epoch - 1} (best Dice {best_dice:.4f})")
        elif args.resume == "auto":
            print(f"--resume auto: no last.pt in {checkpoint_dir}, starting from scratch")

    criterion = SoftDiceLoss()
    history = []
    for epoch in range(start_epoch, args.epochs + 1):
        generator = torch.Generator().manual_seed(stream_seed(args.seed, epoch, runtime.rank, 0))
        augment = BatchAugmentation(
            args.aug_scale, args.aug_angle, 0.5, seed=stream_seed(args.seed, epoch, runtime.rank, 1)
        )
        train_stats = train_one_epoch(
            model,
            data,
            optimizer,
            scaler,
            criterion,
            augment,
            runtime,
            steps,
            args.batch_size,
            generator,
            epoch,
            args.log_interval,
        )
        visualise = args.vis_frequency > 0 and epoch % args.vis_frequency == 0 and args.n_vis_images > 0
        val_start = time.perf_counter()
        val = evaluate(raw_model, val_volumes, runtime, args.batch_size * 2, not args.no_lcc, visualise)
        val_seconds = time.perf_counter() - val_start
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        is_best = val["dice_mean"] > best_dice
        best_dice = max(best_dice, val["dice_mean"])
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_stats["loss"],
                "val_loss": val["loss"],
                "dice_mean": val["dice_mean"],
                "dice_median": val["dice_median"],
            }
        )
        if runtime.is_main:
            checkpoint = make_checkpoint(raw_model, optimizer, scheduler, scaler, split, epoch, best_dice, args)
            save_checkpoint(checkpoint, checkpoint_dir / "last.pt")
            if is_best:
                save_checkpoint(checkpoint, checkpoint_dir / "best_model.pt")
            logger.scalars(
                {
                    "train/loss": train_stats["loss"],
                    "val/loss": val["loss"],
                    "val/dice_mean": val["dice_mean"],
                    "val/dice_median": val["dice_median"],
                    "lr": lr,
                    "time/epoch_s": train_stats["seconds"],
                    "time/val_s": val_seconds,
                    "time/slices_per_s": train_stats["slices_per_s"],
                },
                epoch,
            )
            if visualise:
                log_overlays(logger, val_volumes, val["predictions"], args.n_vis_images, epoch)
            print(
                f"epoch {epoch:3d}/{args.epochs}  loss {train_stats['loss']:.4f}  val loss {val['loss']:.4f}  "
                f"Dice mean {val['dice_mean']:.4f} median {val['dice_median']:.4f}  lr {lr:.2e}  "
                f"{train_stats['slices_per_s']:.1f} slices/s  {train_stats['seconds']:.1f} s + val {val_seconds:.1f} s"
                + ("  *best*" if is_best else ""),
                flush=True,
            )
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            break
    logger.close()
    return {"history": history, "best_dice": best_dice, "split": split, "raw_model": raw_model}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        validate_args(args)
        runtime = setup_runtime(args)
    except UsageError as error:
        sys.exit(f"error: {error}")
    try:
        result = train(args, runtime)
    except (DataError, CheckpointError, UsageError, TrainingDiverged) as error:
        sys.exit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main and args.demo:
        out = "./demo_predictions"
        print(
            f"\nnext: python predict.py --model-path {Path(args.checkpoint_dir) / 'best_model.pt'} "
            f"--data-dir {args.data_dir} --output-dir {out} --figure-path {out}/dice_distribution.png"
        )
    return result


if __name__ == "__main__":
    main()
