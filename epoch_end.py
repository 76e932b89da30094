"""The end of each training epoch. On the training thread (`end_epoch`): validation's device
part, the schedule step and a host copy of the state. On the background worker
(`finish_epoch`, overlapping the next epoch): the component step and Dice, the best-epoch
rule, last.pt and best_model.pt, the learning curves, TensorBoard and the epoch line."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import checkpoint
import distributed
import resume
import training_log
from pictures import plot_learning_curves, png_bytes
from run_setup import Run
from validation import score_patients, summarize_validation, validation_masks


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
