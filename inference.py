"""A checkpoint in, masks out: the one implementation that training validation, predict.py,
the torch.hub pipeline, export.py and bench.py share.

- The checkpoint format: `training_state` copies an epoch's state to the host,
  `make_checkpoint` writes the dict, `save_checkpoint` / `load_checkpoint` put it on disk and
  read it back (weights_only=True), `require_training_checkpoint` says whether it is one of
  ours, `CHECKPOINT_FORMAT_VERSION` is its version.
- The model from a checkpoint: `ModelConfig` is the record saved beside the weights,
  `build_model` rebuilds the network from it, `load_model` does all of it for a file.
- Inference: `predict_probabilities` / `predict_volume` (batched forward pass, on the device
  / as a host array), `binarize` and `to_native` (post-processing in the native grid),
  `autocast_dtype` (mixed precision), `resolve_backend` (torch or onnxruntime).
- The post-processing choice: the candidates (`POSTPROCESSING_CANDIDATES`: none, the largest
  component, components of at least a share of the largest), `postprocess`, the Dice of every
  candidate on one forward pass (`candidate_dice`, `score_postprocessing`), the choice
  (`choose_postprocessing`) and its record in a checkpoint (`save_postprocessing_choice`).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from background import host_copy
from dataset import DataError, Patient, load_volume, read_volume, stack_context
from network import UNetModel
from utils import (
    NORM_REGIONS,
    Geometry,
    UsageError,
    atomic_write_bytes,
    dice_score,
    largest_connected_component,
    preprocessing_config,
    restore_geometry,
    unwrap_state_dict,
)

CHECKPOINT_FORMAT_VERSION = 1
# The keys that make a dict a training checkpoint of this project (what prediction needs),
# and the ones a resumed run needs on top of them.
TRAINING_KEYS = ("model", "model_config", "preprocessing")
RESUME_KEYS = ("optimizer", "epoch", "args")


class CheckpointError(Exception):
    """A checkpoint file that is missing, unsafe or not one of ours."""


# ------------------------------------------------------------------------ the model record


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a `UNetModel`, saved as `model_config` beside its weights (the
    nanoGPT `model_args` pattern), so a reader never guesses it from tensor shapes."""

    in_channels: int = 3
    out_channels: int = 1
    base_filters: int = 32

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str | Path = "checkpoint") -> ModelConfig:
        """The config of a saved `model_config` dict; CheckpointError for unknown or non-integer entries."""
        unknown = sorted(set(record) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(f"{source}: unknown entries in 'model_config': {', '.join(unknown)}")
        if not all(isinstance(v, int) and v > 0 for v in record.values()):
            raise CheckpointError(f"{source}: 'model_config' must hold positive integers, got {dict(record)}")
        return cls(**record)

    @classmethod
    def of_state_dict(cls, state: Mapping[str, torch.Tensor], source: str | Path = "state_dict") -> ModelConfig:
        """The config of a bare state_dict, which has no record: read off its first and last
        layers. Used only for bare state_dicts given to the torch.hub entry points."""
        first, head = state.get("inc.0.weight"), state.get("head.weight")
        if first is None or head is None:
            raise CheckpointError(f"{source}: not a UNetModel state_dict (no 'inc.0.weight')")
        return cls(int(first.shape[1]), int(head.shape[0]), int(first.shape[0]))

    def record(self) -> dict[str, int]:
        """The plain dict saved in a checkpoint (loadable with weights_only=True)."""
        return asdict(self)


def model_config_of(model: UNetModel) -> ModelConfig:
    """The record of a built model (`UNetModel.config` holds its constructor arguments)."""
    return ModelConfig.from_record(model.config, "model")


# ------------------------------------------------------------------ the checkpoint format


def training_state(
    raw_model: UNetModel,
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
            "model_config": model_config_of(raw_model).record(),
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
) -> dict[str, Any]:
    """The one writer of the checkpoint dict (docs/design.md, "Checkpoint"): the weights of the
    unwrapped model and its `model_config` record (from `state`, a `training_state`), the
    preprocessing it was trained with, the split, and everything to resume (optimiser,
    schedule, scaler and RNG state from `state`, the run's `config`, its TensorBoard
    sub-folder `log_run`, and `history`: one plain dict of floats per validated epoch so far,
    which learning_curves.png draws and a resumed run continues)."""
    return {
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
    """Refuse a checkpoint trained with preprocessing other than `utils.preprocessing_config`
    for its image size and normalisation region (another clip percentile, brain threshold,
    an unknown region, ...); CheckpointError names the differing keys. A checkpoint without
    `norm_region` predates the choice and was normalised over the crop."""
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


# ------------------------------------------------------------------------ model loading


def _has_model_record(obj: Any) -> bool:
    """Whether `obj` holds weights with their `model_config` record (a checkpoint of ours),
    rather than being a bare state_dict."""
    return isinstance(obj, dict) and "model" in obj and "model_config" in obj


def _state_dict_of(obj: Any, source: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict of a checkpoint with a model record, or of a bare state_dict."""
    state = obj["model"] if _has_model_record(obj) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{source}: not a checkpoint of this project (expected a dict with 'model' and "
            "'model_config', or a state_dict of tensors)"
        )
    return unwrap_state_dict(state)


def build_model(checkpoint: dict, source: str | Path = "checkpoint") -> UNetModel:
    """A UNetModel in eval mode, on the CPU, from a checkpoint's `model_config` record and
    weights; a bare state_dict (no record) gets `ModelConfig.of_state_dict`. DDP and
    torch.compile prefixes are stripped. Raises CheckpointError when the weights do not fit."""
    state = _state_dict_of(checkpoint, source)
    if _has_model_record(checkpoint):
        config = ModelConfig.from_record(checkpoint["model_config"], source)
    else:
        config = ModelConfig.of_state_dict(state, source)
    model = UNetModel(**config.record())
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit UNetModel{config.record()}: {error}") from error
    return model.eval()


def context_slices_of(in_channels: int, source: str | Path = "checkpoint") -> int:
    """The context slices C of a model with `in_channels` = 3 (2C + 1) input channels (3 per
    slice: pre-contrast, FLAIR, post-contrast). Raises CheckpointError for any other count."""
    if in_channels < 3 or in_channels % 6 != 3:
        raise CheckpointError(f"{source}: the model takes {in_channels} input channels; expected 3 (2C + 1)")
    return (in_channels // 3 - 1) // 2


@dataclass
class LoadedModel:
    """A training checkpoint ready to predict: its network and what its inputs must look like."""

    path: Path
    model: UNetModel  # or export.OnnxRuntimeModel with --backend onnxruntime
    image_size: int
    split: dict | None
    norm_region: str = "crop"  # where the normalisation statistics came from in training
    context_slices: int = 0  # neighbouring slices on each side fed as channels (2.5-D)
    # the checkpoint's `postprocessing` record, or the seed's largest component when it has none
    postprocessing: dict = field(default_factory=lambda: dict(LCC))
    postprocessing_chosen: bool = False  # True when the record came from the checkpoint


DEMO_CHECKPOINT = Path("demo_checkpoints") / "best_model.pt"  # where `train.py --demo` saves its model


def missing_checkpoint(path: str | Path, demo_flags: str = "") -> str:
    """The message for a --model-path that does not exist: points at the demo's checkpoint
    when `train.py --demo` has written one here (`demo_flags`: what else the calling CLI
    needs for it, e.g. "--data-dir demo_3m"), otherwise says how to get a checkpoint."""
    if DEMO_CHECKPOINT.is_file():
        command = " ".join(filter(None, (f"--model-path {DEMO_CHECKPOINT}", demo_flags)))
        hint = f"the demo's model is {DEMO_CHECKPOINT}: pass {command}"
    else:
        hint = "train one first: python train.py --data-dir kaggle_3m (or python train.py --demo on phantom data)"
    return f"checkpoint not found: {path}; {hint}"


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Load a training checkpoint (weights_only) and rebuild its model on `device`.
    Raises CheckpointError naming the file; a missing file gets `missing_checkpoint`'s hint."""
    if not Path(path).exists():
        raise CheckpointError(missing_checkpoint(path))
    checkpoint = require_training_checkpoint(load_checkpoint(path), path)
    preprocessing = checkpoint["preprocessing"]
    check_preprocessing(preprocessing, path)
    model = build_model(checkpoint, path).to(device).to(memory_format=torch.channels_last)
    context = context_slices_of(model.config["in_channels"], path)
    size, region = int(preprocessing["image_size"]), preprocessing.get("norm_region", "crop")
    record = postprocessing_of(checkpoint, path)
    chosen = "postprocessing" in checkpoint
    return LoadedModel(Path(path), model, size, checkpoint.get("split"), region, context, record, chosen)


# ------------------------------------------------------------------------- running it

AMP_CHOICES = ("auto", "fp16", "bf16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The mixed-precision dtype for `amp` (one of AMP_CHOICES) on `device`; "auto" is bf16
    on a CUDA device that supports it, else fp16 on CUDA, and full fp32 (None) on the CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """The --amp word of a resolved dtype: bf16, fp16 or off."""
    return {dtype_: name for name, dtype_ in AMP_DTYPES.items()}[dtype]


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    context_slices: int = 0,
) -> torch.Tensor:
    """Probabilities (S, H, W) float32 on `device` for a preprocessed volume (S, 3, H, W)
    (a host array, or a tensor that may already be on `device`), in batches of `batch_size`
    slices, with no host sync: training's validation keeps them on the device.
    With `tta` the prediction is averaged with that of the horizontally flipped input.
    `context_slices` C > 0 (a 2.5-D model, `context_slices_of`): each slice is fed with its
    C neighbours on each side as channels, (S, 3, H, W) -> (S, 3 (2C+1), H, W), as in training."""
    device = torch.device(device)
    model.eval()
    images = stack_context(images, context_slices)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        batch = batch.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            probs = model(batch)  # (B, 3 (2C+1), H, W) -> (B, 1, H, W)
            if tta:
                probs = (probs + model(batch.flip(-1)).flip(-1)) / 2
        out.append(probs[:, 0].float())
    return torch.cat(out) if out else torch.zeros((0, *images.shape[-2:]), device=device)


def predict_volume(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    context_slices: int = 0,
) -> np.ndarray:
    """`predict_probabilities` as a host array: float32 (S, H, W) for a preprocessed volume
    (S, 3, H, W); the arguments are the same."""
    probs = predict_probabilities(model, images, device, batch_size, tta, amp_dtype, context_slices)
    return probs.cpu().numpy()


def binarize(
    probabilities: np.ndarray, threshold: float = 0.5, lcc: bool = True, postprocessing: Mapping | None = None
) -> np.ndarray:
    """Threshold, then filter the 3-D connected components: bool (S, H, W) from float
    probabilities (S, H, W). `postprocessing` is a record of POSTPROCESSING_CANDIDATES (see
    `postprocess`); without it, the largest component (`lcc` True, the seed's) or all of them."""
    record = postprocessing if postprocessing is not None else (LCC if lcc else NO_FILTER)
    return postprocess(probabilities >= threshold, record)


def to_native(
    probabilities: np.ndarray,
    geometry: Geometry,
    threshold: float = 0.5,
    lcc: bool = True,
    postprocessing: Mapping | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Post-processing in native space: resample the model-grid probabilities (S, size, size)
    onto the native grid (bilinear, `utils.restore_geometry`), then threshold and filter the
    3-D components there (`binarize`: `postprocessing`, else the largest component unless
    `lcc` is False). Returns uint8 0/1 masks and float32 probabilities (S, H, W), so the
    written mask is exactly the post-processed thresholded probability map."""
    native_probs = restore_geometry(probabilities, geometry, mode="bilinear")  # (S, size, size) -> (S, H, W)
    return binarize(native_probs, threshold, lcc, postprocessing).astype(np.uint8), native_probs


# ------------------------------------------------------------------ the post-processing choice
# nnU-Net decides its post-processing from cross-validation (Isensee et al. 2021, Nature
# Methods 18:203-211, `determine_postprocessing`: keep the largest component only where it
# improves the validation Dice). Here a run's validation patients choose among these
# candidates, applied to the thresholded mask on the native grid. Their order is the tie
# rule: an equal mean Dice goes to the earlier candidate, the seed's largest component first,
# then the candidates that remove the most, and no filtering last.

LCC = {"method": "lcc"}  # the seed's: keep the largest 3-D component; a checkpoint without a record gets it
NO_FILTER = {"method": "none"}
MIN_SHARES = (0.5, 0.25, 0.1, 0.05)  # remove components smaller than this share of the largest
POSTPROCESSING_CANDIDATES: tuple[dict, ...] = (
    LCC,
    *({"method": "min_share", "share": share} for share in MIN_SHARES),
    NO_FILTER,
)
TIE_TOLERANCE = 1e-9  # mean Dice closer than this counts as a tie


def check_postprocessing(record: Any, source: str | Path = "checkpoint") -> dict:
    """A copy of a valid post-processing record: {"method": "none"}, {"method": "lcc"} or
    {"method": "min_share", "share": s} with s in (0, 1]. Raises CheckpointError naming
    `source` for anything else."""
    if not isinstance(record, Mapping) or record.get("method") not in ("none", "lcc", "min_share"):
        raise CheckpointError(
            f"{source}: 'postprocessing' must be {{'method': 'none' | 'lcc' | 'min_share', ...}}, got {record!r}"
        )
    expected = {"method", "share"} if record["method"] == "min_share" else {"method"}
    share = record.get("share", 1.0)
    if set(record) != expected or isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise CheckpointError(
            f"{source}: 'postprocessing' {dict(record)!r}: 'min_share' takes one 'share' in (0, 1], "
            "'none' and 'lcc' take nothing else"
        )
    return dict(record)


def postprocessing_of(checkpoint: Mapping, source: str | Path = "checkpoint") -> dict:
    """The checkpoint's `postprocessing` record (checked), or LCC when it has none (a
    checkpoint written before the choice existed, or a run stopped before its last epoch)."""
    record = checkpoint.get("postprocessing")
    return dict(LCC) if record is None else check_postprocessing(record, source)


def postprocessing_name(record: Mapping) -> str:
    """A candidate's short name for tables and summary.json: `none`, `lcc`, `min_share 10%`."""
    if record["method"] == "min_share":
        return f"min_share {100 * record['share']:g}%"
    return str(record["method"])


def keep_components(mask: np.ndarray, min_share: float) -> np.ndarray:
    """The 3-D connected components of `mask` with at least `min_share` (0, 1] of the voxels
    of the largest one, as bool of the same shape. Full connectivity (26 neighbours in 3-D),
    as `utils.largest_connected_component`; an empty mask is returned empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min_share * sizes.max()
    keep[0] = False
    return keep[labels]


def postprocess(mask: np.ndarray, record: Mapping) -> np.ndarray:
    """Apply a post-processing record (`check_postprocessing`) to a binary mask (S, H, W):
    bool of the same shape. `lcc` is exactly `utils.largest_connected_component`."""
    method = record["method"]
    if method == "lcc":
        return largest_connected_component(mask)
    if method == "min_share":
        return keep_components(mask, float(record["share"]))
    if method == "none":
        return np.asarray(mask, dtype=bool)
    raise ValueError(f"unknown post-processing method {method!r}")


def candidate_dice(
    probabilities: np.ndarray,
    truth: np.ndarray,
    threshold: float = 0.5,
    candidates: Sequence[Mapping] = POSTPROCESSING_CANDIDATES,
) -> dict[str, float]:
    """Dice (utils.dice_score) of each candidate applied to the same probabilities
    (S, H, W) float against `truth` (S, H, W) bool, both on the same grid; keyed by
    `postprocessing_name`."""
    mask = np.asarray(probabilities) >= threshold
    return {postprocessing_name(c): dice_score(postprocess(mask, c), truth) for c in candidates}


def choose_postprocessing(
    scores: Mapping[str, Mapping[str, float]], candidates: Sequence[Mapping] = POSTPROCESSING_CANDIDATES
) -> tuple[dict, list[dict]]:
    """The candidate with the best mean Dice over the patients of `scores` (patient id ->
    candidate name -> Dice, e.g. from `score_postprocessing` on validation patients). Ties
    (within TIE_TOLERANCE) go to the earlier candidate of `candidates`: the largest component
    first. Returns (the chosen record, the table: one dict per candidate with `candidate`,
    `record`, `mean`, `median`, in `candidates` order). Raises ValueError without patients."""
    if not scores:
        raise ValueError("choosing the post-processing needs at least one scored patient")
    table = []
    for candidate in candidates:
        name = postprocessing_name(candidate)
        values = np.array([patient[name] for patient in scores.values()], dtype=float)
        table.append(
            {
                "candidate": name,
                "record": dict(candidate),
                "mean": float(values.mean()),
                "median": float(np.median(values)),
            }
        )
    best = max(row["mean"] for row in table)
    chosen = next(row for row in table if row["mean"] >= best - TIE_TOLERANCE)
    return dict(chosen["record"]), table


def score_postprocessing(
    loaded: LoadedModel,
    patients: Sequence[Patient],
    device: torch.device,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    threshold: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Patient id -> candidate name -> Dice on the native grid, as predict.py scores it: one
    forward pass per patient (no TTA, autocast as predict.py), probabilities resampled to the
    native grid, every candidate applied to the same thresholded map, against the patient's
    native masks. Reads only `patients`. Raises DataError for a patient without masks."""
    amp = autocast_dtype(device)
    scores = {}
    for patient in patients:
        volume = load_volume(patient, loaded.image_size, cache_dir, loaded.norm_region)
        probs = predict_volume(loaded.model, volume.images, device, batch_size, False, amp, loaded.context_slices)
        native = restore_geometry(probs, volume.geometry, mode="bilinear")  # (S, size, size) -> (S, H, W)
        _, truth = read_volume(patient)
        if truth is None:
            raise DataError(f"patient {patient.patient_id}: has no masks; the post-processing choice needs them")
        scores[patient.patient_id] = candidate_dice(native, truth, threshold)
    return scores


def save_postprocessing_choice(path: str | Path, record: Mapping, selection: Mapping) -> None:
    """Write `record` (checked) as the checkpoint's `postprocessing` and `selection` (plain
    data: how it was chosen) as `postprocessing_selection` into the training checkpoint at
    `path`, atomically (`save_checkpoint`): a crash leaves the old file. Raises CheckpointError."""
    checkpoint = require_training_checkpoint(load_checkpoint(path), path)
    checkpoint["postprocessing"] = check_postprocessing(record, path)
    checkpoint["postprocessing_selection"] = dict(selection)
    save_checkpoint(checkpoint, path)


BACKENDS = ("torch", "onnxruntime")


def resolve_backend(name: str | None, device: torch.device) -> str:
    """--backend: None picks onnxruntime on the CPU (faster there, see bench.py) and torch
    on CUDA. Raises UsageError for onnxruntime on a non-CPU device (CPU provider only)."""
    if name is None:
        return "onnxruntime" if device.type == "cpu" else "torch"
    if name == "onnxruntime" and device.type != "cpu":
        raise UsageError(
            f"--backend onnxruntime runs on the CPU only; pass --device cpu or --backend torch (not {device})"
        )
    return name
