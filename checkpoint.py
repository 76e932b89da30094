"""The checkpoint format: what a training checkpoint holds, its version, writing it
atomically and reading it back with `torch.load(weights_only=True)`.

`training_state` copies an epoch's state to the host, `make_checkpoint` assembles the dict,
`save_checkpoint` / `write_checkpoint` / `load_checkpoint` put it on disk and read it back,
`require_training_checkpoint` says whether a dict is one of ours (`CheckpointError` if not).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from background import host_copy
from network import model_record
from preprocessing import NORM_REGIONS, preprocessing_config
from utils import atomic_write_bytes

CHECKPOINT_FORMAT_VERSION = 1
# The keys that make a dict a training checkpoint of this project (what prediction needs),
# and the ones a resumed run needs on top of them.
TRAINING_KEYS = ("model", "model_config", "preprocessing")
RESUME_KEYS = ("optimizer", "epoch", "args")


class CheckpointError(Exception):
    """A checkpoint file that is missing, unsafe or not one of ours."""


@dataclass
class EpochPosition:
    """How far an epoch got: `step` of its steps done, the sum of their losses (a float32
    scalar tensor on the host, as train_one_epoch accumulates it)."""

    epoch: int
    step: int
    loss_sum: torch.Tensor

    def record(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores as `partial_epoch`."""
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum}


def epoch_position(saved: dict, path: str | Path, steps: int) -> EpochPosition | None:
    """The position stored in checkpoint `saved` (None for a checkpoint written at an epoch's
    end). Raises CheckpointError naming `path` when it does not fit the run: another epoch
    than the one after the checkpoint's, or a step outside 1 .. `steps` - 1."""
    record = saved.get("partial_epoch")
    if record is None:
        return None
    epoch, step = int(record["epoch"]), int(record["step"])
    if epoch != saved["epoch"] + 1 or not 0 < step < steps:
        raise CheckpointError(
            f"{path}: its saved position (step {step} of epoch {epoch}, after epoch {saved['epoch']}) does not fit "
            f"this run's {steps} steps per epoch; resume from a checkpoint saved at an epoch's end"
        )
    return EpochPosition(epoch, step, torch.as_tensor(record["loss_sum"], dtype=torch.float32))


def training_state(
    raw_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    rng: dict,
) -> dict[str, Any]:
    """A host copy of everything an epoch changes (`background.host_copy`: CPU tensors that
    share no memory with the live ones), taken on the training thread at the end of an epoch
    so that another thread can write it while training goes on: the unwrapped model's
    state_dict and `model_config` record, the optimiser, schedule and scaler states, `rng`."""
    return host_copy(
        {
            "model": raw_model.state_dict(),
            "model_config": model_record(raw_model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
        }
    )


def make_checkpoint(
    state: Mapping[str, Any],
    split: dict,
    epoch: int,
    best_dice: float,
    config: dict,
    log_run: str,
    history: list[dict] | None = None,
    partial_epoch: EpochPosition | None = None,
) -> dict[str, Any]:
    """The one writer of the checkpoint dict (docs/design.md, "Checkpoint"): the weights of the
    unwrapped model and its `model_config` record (from `state`, a `training_state`), the
    preprocessing it was trained with, the split, and everything to resume (optimiser,
    schedule, scaler and RNG state from `state`, the run's `config`, its TensorBoard
    sub-folder `log_run`, and `history`: one plain dict of floats per validated epoch so far,
    which learning_curves.png draws and a resumed run continues). `partial_epoch`: for a save
    within an epoch, how far the epoch after `epoch` got."""
    saved = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": state["model"],
        "model_config": state["model_config"],
        "preprocessing": preprocessing_config(config["image_size"], config.get("norm_region", "crop")),
        "split": split,
        "epoch": epoch,
        "best_dice": best_dice,
        "optimizer": state["optimizer"],
        "scheduler": state["scheduler"],
        "scaler": state["scaler"],
        "rng": state["rng"],
        "args": config,
        "log_run": log_run,
        "history": list(history or []),
    }
    if partial_epoch is not None:
        saved["partial_epoch"] = partial_epoch.record()
    return saved


# What a published checkpoint leaves out: the state that only continues training.
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng", "partial_epoch")


def published_checkpoint(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of training checkpoint `saved` for publishing: everything prediction and
    provenance need (weights, model and preprocessing records, split, configuration,
    history, the chosen post-processing), without `TRAINING_ONLY_KEYS`; the weights stay
    float32. It cannot be resumed from (no optimiser state)."""
    return {key: value for key, value in saved.items() if key not in TRAINING_ONLY_KEYS}


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` a plain dict atomically: a crash never leaves a half-written file."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` cannot be a torch.save file (a zip archive, or a pickle in the legacy
    format), judged from its first bytes; None when it may be one."""
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # zip; pickle protocol >= 2
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is neither a zip archive nor a pickle (it starts with bytes {head[:8].hex(' ')})"
    return f"it is a text file (it starts with {text.splitlines()[0][:40]!r})"


def _load_failure(path: Path, error: Exception) -> str:
    """One line for the user from torch.load's exception: what the file is not."""
    first_line = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        lines = [line.split("error: ")[-1].split(". ")[0].strip(" .") for line in str(error).splitlines()]
        found = [line for line in lines if "GLOBAL " in line]  # torch names the refused object
        if found:
            return (
                f"refused to load: it holds a Python object that weights_only=True does not load ({found[0]}); "
                "re-save it with only tensors, numbers, strings, lists and dicts (e.g. a state_dict())"
            )
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
        detail = detail[1] if detail else first_line
        return f"not a PyTorch checkpoint: weights_only=True cannot read its pickle data ({detail})"
    if isinstance(error, RuntimeError) and "torch.cuda.is_available() is False" in str(error):
        return "it holds CUDA tensors and CUDA is not available on this machine (load it with map_location='cpu')"
    if isinstance(error, RuntimeError) and zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint: it is a zip archive, but not one written by torch.save"
    return f"not a PyTorch checkpoint: it is truncated or damaged ({type(error).__name__}: {first_line})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` onto `map_location`.

    Raises CheckpointError with one line naming the file and saying what it is not: missing,
    a folder, empty, text, random bytes, a zip archive that torch.save did not write,
    truncated or damaged data, or a pickle holding objects that weights_only refuses (torch's
    "Unsupported global: ..." is kept, so the user knows which object to remove); and when
    `map_location` asks for CUDA on a machine without it.
    """
    path = Path(path)
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            f"{path}: map_location={str(device)!r}, but CUDA is not available on this machine (use 'cpu')"
        )
    if path.is_dir():
        inside = ", ".join(sorted(f.name for f in path.glob("*.pt"))) or "no .pt file"
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (it holds {inside}); pass the file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    reason = _not_a_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: {reason}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: {_load_failure(path, error)}") from error


def is_training_checkpoint(obj: Any) -> bool:
    """Whether `obj` is a training checkpoint of this project (holds every TRAINING_KEYS entry)."""
    return isinstance(obj, dict) and all(key in obj for key in TRAINING_KEYS)


def require_training_checkpoint(obj: Any, path: str | Path, resume: bool = False) -> dict[str, Any]:
    """`obj` itself when it is a training checkpoint of this format version, for prediction
    or (`resume`) for continuing its run. Raises CheckpointError naming `path` otherwise."""
    if resume and not (is_training_checkpoint(obj) and all(key in obj for key in RESUME_KEYS)):
        raise CheckpointError(f"{path}: not a training checkpoint of this project; cannot resume from it")
    if not is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (needs 'model', 'model_config' and "
            "'preprocessing'); bare state_dicts can be loaded with hubconf.unet_segmentation"
        )
    version = obj.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if version != CHECKPOINT_FORMAT_VERSION:
        action = "resume it" if resume else "predict"
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this code reads version {CHECKPOINT_FORMAT_VERSION}; "
            f"{action} with the code version that trained it"
        )
    return obj


def check_preprocessing(saved: dict, path: str | Path) -> None:
    """Refuse a checkpoint trained with preprocessing other than `preprocessing.preprocessing_config`
    for its image size and normalisation region (another clip percentile, brain threshold,
    an unknown region, ...); CheckpointError names the differing keys. A checkpoint without
    `norm_region` was normalised over the crop."""
    if "image_size" not in saved:
        raise CheckpointError(f"{path}: its 'preprocessing' has no 'image_size'")
    saved = {"norm_region": "crop", **saved}
    region = saved["norm_region"] if saved["norm_region"] in NORM_REGIONS else "crop"
    expected = preprocessing_config(int(saved["image_size"]), region)
    differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this code {expected.get(k)!r}" for k in differing)
        raise CheckpointError(
            f"{path}: trained with other preprocessing than this code does ({details}); "
            "predict with the code version that trained it, or retrain"
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


def unwrap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from keys."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned
