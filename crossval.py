"""`train.py --folds K --fold all`: train the K folds one after the other, each in its own
folder under the rules of a single run (checked for every fold before the first trains).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from checkpoint import CheckpointError, load_checkpoint
from distributed import Runtime, TrainingDiverged, on_rank_zero
from patients import DataError
from postprocessing_choice import ensure_postprocessing_choice
from resume import CHECKPOINT_NAMES, check_no_clobber, check_resume_contract, find_resume_checkpoint, run_config
from utils import UsageError, check_writable_dir


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


def plan_folds(args: argparse.Namespace, runtime: Runtime, defaults: Mapping[str, Any]) -> dict[int, str]:
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
                check_resume_contract(checkpoint, path, run_config(one, runtime), defaults)
                if checkpoint["epoch"] >= args.epochs:
                    finished[fold] = (
                        f"finished earlier (epoch {checkpoint['epoch']} of {args.epochs}, best validation Dice "
                        f"{checkpoint['best_dice']:.4f}): skipped"
                    )
            check_no_clobber(one, path)
        return finished

    return on_rank_zero(runtime, work)


def train_folds(
    args: argparse.Namespace,
    runtime: Runtime,
    train: Callable[[argparse.Namespace, Runtime], dict],
    defaults: Mapping[str, Any],
) -> dict:
    """--fold all: train folds 0..K-1 one after the other, each into <checkpoint-dir>/fold<i>/
    with its own TensorBoard sub-folder, under the rules of a single run per fold folder;
    with --resume auto a finished fold is skipped and an unfinished one continues. A fold
    that fails stops the command; the error names the fold. Returns {folds: one `train`
    result per fold (None if skipped), stopped_after}. `train` trains one fold (train.train);
    `defaults` are train.py's flag defaults (the resume contract's)."""
    finished = plan_folds(args, runtime, defaults)
    results: list[dict | None] = []
    for fold in range(args.folds):
        one = fold_args(args, fold)
        if runtime.is_main:
            print(f"\n=== fold {fold} of {args.folds}: checkpoints in {one.checkpoint_dir}", flush=True)
        if fold in finished:
            if runtime.is_main:
                print(f"fold {fold}: {finished[fold]}")
            # a finished fold whose checkpoint has no post-processing record chooses it here (rank 0;
            # the others wait for it)
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
