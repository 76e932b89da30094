"""The resume contract and the checks before a training run does any work: which flags
define a run (a resumed run may not change them), where to resume from, no silent overwrite
of an earlier run, the data and the split checked on rank 0.
"""

from __future__ import annotations

import argparse
import random
import shlex
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from checkpoint import CheckpointError, load_checkpoint, require_training_checkpoint
from dataset import discover_inputs, select_patients
from distributed import Runtime, on_rank_zero
from patients import DataError, Patient
from phantom import ensure_demo_data
from splits import split_of_args
from utils import UsageError, check_writable_dir, ensure_writable_dir

CHECKPOINT_NAMES = ("last.pt", "best_model.pt")


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


def check_resume_contract(checkpoint: dict, path: Path, config: dict, defining: Mapping[str, Any]) -> None:
    """Refuse to resume with a change of any run-defining flag or of the number of processes.
    `defining` (train.run_defining_flags): flag name -> what a checkpoint that does not record
    the flag was trained with (its default unless its declaration says `absent=`)."""
    require_training_checkpoint(checkpoint, path, resume=True)
    defaults = {**defining, "world_size": 1}
    saved_config = checkpoint["args"]
    for name in [*defining, "world_size"]:
        saved, given = saved_config.get(name, defaults[name]), config[name]
        if saved != given:
            raise CheckpointError(
                f"{path} was trained with {flag_text(name, saved)}, this run asks for {flag_text(name, given)}; "
                f"resume with {flag_text(name, saved)}, or start a new run (another --checkpoint-dir, or --overwrite)"
            )
    # `--amp auto` resolves per device (bf16 where supported, else fp16): the same flag can ask
    # for another precision on another GPU, and the saved GradScaler state would not fit it.
    precision = saved_config.get("precision")  # None for a checkpoint that does not record it
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


def check_before_work(
    args: argparse.Namespace, config: dict, defaults: Mapping[str, Any]
) -> tuple[Path | None, dict | None, list[Patient]]:
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
        check_resume_contract(resumed, resume_path, config, defaults)
    check_no_clobber(args, resume_path)
    if args.demo:
        ensure_demo_data(args.data_dir, args.seed)
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
        split_of_args(args, ids)
    # every check passed: preprocessing may start. --checkpoint-dir and --log-dir are made when
    # the first file is written to them (args.json, TensorBoard), after the data has loaded,
    # so that an unreadable slice found while preprocessing leaves no empty run folders.
    if "--cache-dir" in folders:
        ensure_writable_dir(folders["--cache-dir"], "--cache-dir")
    return resume_path, resumed, patients


def agree_on_inputs(
    args: argparse.Namespace, runtime: Runtime, config: dict, defaults: Mapping[str, Any]
) -> tuple[Path | None, dict | None, list]:
    """Rank 0 runs `check_before_work`; every rank follows its decision on whether and from
    where to resume (each loads that checkpoint itself)."""
    own: dict = {}

    def work() -> tuple[Path | None, list[Patient]]:
        path, own["resumed"], patients = check_before_work(args, config, defaults)
        if path is None and args.overwrite:
            for name in CHECKPOINT_NAMES:
                if (Path(args.checkpoint_dir) / name).is_file():
                    (Path(args.checkpoint_dir) / name).unlink()
                    print(f"--overwrite: deleted {Path(args.checkpoint_dir) / name} of the earlier run")
        return path, patients

    path, patients = on_rank_zero(runtime, work)
    resumed = own["resumed"] if runtime.is_main else (load_checkpoint(path) if path else None)
    return path, resumed, patients


def add_resume_flags(add: Callable[..., Any]) -> None:
    """Declare where a run's checkpoints go and how it continues, through `add`
    (`utils.RunFlags.add`)."""
    add("--checkpoint-dir", default="./checkpoints", help="best_model.pt, last.pt, args.json, learning_curves.png")
    add("--resume", default=None, help="'auto' (last.pt in --checkpoint-dir, if any) or a checkpoint path")
    add(
        "--overwrite",
        action="store_true",
        help="start a new run in a --checkpoint-dir that holds one (deletes its last.pt and best_model.pt)",
    )
    add("--stop-after-epoch", type=int, default=None, help="exit after this epoch, to split a run over jobs")


def validate_resume_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for --stop-after-epoch out of range or --overwrite with --resume."""
    if args.stop_after_epoch is not None and args.stop_after_epoch <= 0:
        raise UsageError("--stop-after-epoch must be positive")
    if args.overwrite and args.resume is not None:
        raise UsageError(f"--overwrite starts a new run and --resume {args.resume} continues one: pass only one")


def stop_on_sigterm() -> None:
    """Let SIGTERM (a batch system's stop, `kill`) stop training as Ctrl-C does: as a
    KeyboardInterrupt in the main thread, so the run ends through the same path. Only from
    the main thread (signal handlers can be set nowhere else)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def held_text(path: Path, epochs: int) -> str:
    """What last.pt at `path` holds: `... holds epoch 3 of 40` (its last finished epoch), plus
    `and 75 steps of epoch 4` when it was saved within an epoch."""
    saved = load_checkpoint(path)
    text = f"{path} holds epoch {saved['epoch']} of {epochs}"
    position = saved.get("partial_epoch")
    return text + (f" and {position['step']} steps of epoch {position['epoch']}" if position else "")


def interrupted_message(args: argparse.Namespace, argv: list[str], world_size: int) -> str:
    """The one line train.py ends with when interrupted: what each last.pt holds (the steps
    after its save are lost) and the exact command that continues the run."""
    folder = Path(args.checkpoint_dir)
    paths = sorted(folder.glob("fold*/last.pt")) if args.fold == "all" else [folder / "last.pt"]
    held = [held_text(path, args.epochs) for path in paths if path.is_file()]
    what = "; ".join(held) or f"nothing had been saved yet in {folder}"
    return f"interrupted: {what}; continue with: {continue_command(argv, world_size)}"
