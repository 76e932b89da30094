"""Everything a training run needs before its first epoch (`set_up` builds the `Run`): the
checks on rank 0, the data and the split, the model, optimiser and schedule, the state of a
resumed run, TensorBoard, args.json and the lines printed at the start."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import checkpoint
import dataset
import distributed
import network
import resume
import sampling
import training_log
import utils
from background import BackgroundWorker
from losses import build_loss
from patients import Patient
from splits import split_of_args
from tb_logger import TBLogger
from validation import ValidationVolume, validation_inputs


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
    position: checkpoint.EpochPosition | None = None  # where start_epoch resumes within (a save within it)
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
    progress: training_log.ProgressReporter | None = None  # the projection and the log-file progress lines


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


def set_up(args: argparse.Namespace, runtime: distributed.Runtime, defining: dict[str, Any]) -> Run:
    """Checks, data, model, optimiser; the state of the checkpoint resumed from, if any.
    `defining`: the run-defining flags and their defaults (train.run_defining_flags)."""
    config = resume.run_config(args, runtime)
    resume_path, resumed, patients = resume.agree_on_inputs(args, runtime, config, defining)
    split, train_volumes, val_volumes = load_split_volumes(args, runtime, patients, resumed and resumed["split"])
    train_set = dataset.MRISegmentationDataset(train_volumes, args.context_slices)
    sampler = sampling.make_sampler(train_set, args.sampling, args.sampling_floor, args.lesion_fraction)
    data, placement = sampling.training_data(train_set, runtime.device, args.data_placement, args.num_workers, sampler)
    raw_model, model = build_training_model(args, runtime)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=0.0)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    run = Run(
        args, runtime, config, raw_model, model, optimizer, scheduler, scaler, data, placement, len(train_set),
        steps_per_epoch(args, len(train_set), runtime.world_size), split, val_volumes, build_loss(args.loss),
    )  # fmt: skip
    if resumed is not None:
        restore(run, resumed, resume_path)
    run.val_inputs = validation_inputs(val_volumes, runtime.device, placement)
    run.val_truths = {v.patient_id: np.asarray(v.masks) for v in val_volumes}
    run.worker = BackgroundWorker(enabled=not args.no_background)
    epochs_left = max(min(args.epochs, args.stop_after_epoch or args.epochs) - run.start_epoch + 1, 0)
    val_slices = sum(len(v.images) for v in val_volumes)
    run.progress = training_log.ProgressReporter(
        run.steps, epochs_left, val_slices, args.batch_size, runtime.device.type
    )
    open_log(run)
    if runtime.is_main:
        utils.atomic_write_bytes(json.dumps(config, indent=2).encode(), Path(args.checkpoint_dir) / "args.json")
        print_start(run, resume_path)
    return run


def restore(run: Run, saved: dict, path: Path) -> None:
    """Continue from checkpoint `saved` (read from `path`): weights, optimiser, schedule,
    scaler, RNG, epoch, best Dice, and the position within the next epoch of a save within it."""
    run.raw_model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    resume.restore_rng_state(saved["rng"])
    run.start_epoch, run.best_dice = saved["epoch"] + 1, saved["best_dice"]
    run.position = checkpoint.epoch_position(saved, path, run.steps)
    run.log_run = saved.get("log_run", "")
    run.curves = [h for h in saved.get("history", []) if h["epoch"] < run.start_epoch]


def open_log(run: Run) -> None:
    """TensorBoard in <log-dir>/<run>: a new run gets a new sub-folder named by its start
    time and checkpoint folder; a resumed run continues its own (points logged after the
    checkpoint's epoch are purged, so curves never double back). The folder is made with
    the first event, at the end of the first epoch (`TBLogger`)."""
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
        within = f", step {run.position.step} of {run.steps} of epoch {run.start_epoch}" if run.position else ""
        best = f"best Dice {run.best_dice:.4f}" if run.best_dice >= 0 else "no validation yet"
        print(f"resumed from {resume_path} after epoch {run.start_epoch - 1}{within} ({best})")
    elif args.resume == "auto":
        print(f"--resume auto: no last.pt in {args.checkpoint_dir}, starting from scratch")
    print(training_log.EPOCH_HEADER, flush=True)
