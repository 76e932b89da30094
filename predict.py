r"""Predict FLAIR-abnormality masks and score them per patient (Dice, precision, recall, hd95).

    python predict.py --model-path checkpoints/best_model.pt --data-dir kaggle_3m
    python predict.py --model-path demo_checkpoints/best_model.pt --data-dir demo_3m  # after train.py --demo
    python predict.py --model-path cv/fold0/best_model.pt cv/fold1/best_model.pt cv/fold2/best_model.pt \
        --data-dir kaggle_3m --output-dir cv/predictions    # the folds of train.py --fold all, pooled

Writes to --output-dir: masks/<patient>/<patient>_<k>_mask.tif (input size, 0/255), overlays/,
metrics.csv (one row per patient, written as each one finishes) and summary.json. Each
patient's role (train, val, test, or unseen) comes from the checkpoints' saved splits; the
headline pools the test and unseen patients only. Checkpoints with disjoint test sets are the
folds of one cross-validation: each patient is scored by the model it was a test patient of.
Other checkpoints are averaged (an ensemble).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from tqdm import tqdm

from dataset import (
    DataError,
    Patient,
    discover_inputs,
    load_volume,
    preprocessing_config,
    read_volume,
    select_patients,
    stack_context,
    write_nifti_mask,
)
from network import UNetModel
from utils import (
    CHECKPOINT_FORMAT_VERSION,
    NORM_REGIONS,
    CheckpointError,
    Geometry,
    HelpFormatter,
    UsageError,
    dice_score,
    ensure_writable_dir,
    hd95,
    is_training_checkpoint,
    largest_connected_component,
    load_checkpoint,
    model_state_from,
    one_line_warnings,
    overlay,
    plot_dice_distribution,
    precision_recall,
    resolve_device,
    restore_geometry,
)

METRIC_COLUMNS = ["dice", "precision", "recall", "hd95", "gt_pixels", "pred_pixels"]
TABLE_COLUMNS = ["patient", "slices", "role", *METRIC_COLUMNS, "models", "error"]
ROLES = ("train", "val", "test", "unseen", "unknown")  # unknown: a checkpoint without a saved split
HEADLINE_ROLES = ("test", "unseen")
BIAS = {
    "val": "biased by model selection: these patients chose the checkpoint (best validation Dice)",
    "train": "biased by training: the model was fitted on these patients",
    "unknown": "of unknown bias: a checkpoint has no saved split",
}


# ------------------------------------------------------------------- shared inference
# The one implementation of "predict a volume" (`predict_volume`, `binarize`, `to_native`)
# that training validation, this CLI and the torch.hub pipeline share.


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Inference precision: bf16 (or fp16) on CUDA, full fp32 on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def predict_volume(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    context_slices: int = 0,
) -> np.ndarray:
    """Probabilities (S, H, W) float32 for a preprocessed volume (S, 3, H, W), in batches.
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
        out.append(probs[:, 0].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *images.shape[-2:]), np.float32)


def context_slices_of(in_channels: int, source: str | Path = "checkpoint") -> int:
    """The context slices C of a model with `in_channels` = 3 (2C + 1) input channels (3 per
    slice: pre-contrast, FLAIR, post-contrast). Raises CheckpointError for any other count."""
    if in_channels < 3 or in_channels % 6 != 3:
        raise CheckpointError(f"{source}: the model takes {in_channels} input channels; expected 3 (2C + 1)")
    return (in_channels // 3 - 1) // 2


def binarize(probabilities: np.ndarray, threshold: float = 0.5, lcc: bool = True) -> np.ndarray:
    """Threshold, then keep the 3-D largest connected component (unless `lcc` is False)."""
    mask = probabilities >= threshold
    return largest_connected_component(mask) if lcc else mask


def to_native(
    probabilities: np.ndarray, geometry: Geometry, threshold: float = 0.5, lcc: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Post-processing in native space: resample the model-grid probabilities (S, size, size)
    onto the native grid (bilinear, `utils.restore_geometry`), then threshold and keep the
    3-D largest component there. Returns uint8 0/1 masks and float32 probabilities
    (S, H, W), so the written mask is exactly the thresholded probability map."""
    native_probs = restore_geometry(probabilities, geometry, mode="bilinear")  # (S, size, size) -> (S, H, W)
    return binarize(native_probs, threshold, lcc).astype(np.uint8), native_probs


def build_model(checkpoint: dict, source: str | Path = "checkpoint") -> UNetModel:
    """A UNetModel in eval mode from a training checkpoint or a bare state_dict."""
    config = checkpoint.get("model_config", {}) if is_training_checkpoint(checkpoint) else {}
    state = model_state_from(checkpoint, source)
    if not config:
        first = state.get("inc.0.weight")
        if first is None:
            raise CheckpointError(f"{source}: not a UNetModel state_dict (no 'inc.0.weight')")
        config = {
            "in_channels": first.shape[1],
            "out_channels": state["head.weight"].shape[0],
            "base_filters": first.shape[0],
        }
    model = UNetModel(**config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit UNetModel{config}: {error}") from error
    return model.eval()


@dataclass
class LoadedModel:
    path: Path
    model: UNetModel  # or export.OnnxRuntimeModel with --backend onnxruntime
    image_size: int
    split: dict | None
    norm_region: str = "crop"  # where the normalisation statistics came from in training
    context_slices: int = 0  # neighbouring slices on each side fed as channels (2.5-D)


DEMO_CHECKPOINT = Path("demo_checkpoints") / "best_model.pt"  # where `train.py --demo` saves its model


def missing_checkpoint(path: str | Path) -> str:
    """The message for a --model-path that does not exist: points at the demo's checkpoint
    when `train.py --demo` has written one here, otherwise says how to get a checkpoint."""
    if DEMO_CHECKPOINT.is_file():
        hint = f"the demo's model is {DEMO_CHECKPOINT}: pass --model-path {DEMO_CHECKPOINT} --data-dir demo_3m"
    else:
        hint = "train one first: python train.py --data-dir kaggle_3m (or python train.py --demo on phantom data)"
    return f"checkpoint not found: {path}; {hint}"


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Load a training checkpoint (weights_only) and rebuild its model on `device`.
    Raises CheckpointError naming the file (a missing one with a hint where to find one)."""
    if not Path(path).exists():
        raise CheckpointError(missing_checkpoint(path))
    checkpoint = load_checkpoint(path)
    if not is_training_checkpoint(checkpoint) or "preprocessing" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (needs 'model', 'model_config' and "
            "'preprocessing'); bare state_dicts can be loaded with hubconf.unet_segmentation"
        )
    version = checkpoint.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this code reads version {CHECKPOINT_FORMAT_VERSION}; "
            "predict with the code version that trained it"
        )
    preprocessing = checkpoint["preprocessing"]
    check_preprocessing(preprocessing, path)
    model = build_model(checkpoint, path).to(device).to(memory_format=torch.channels_last)
    context = context_slices_of(model.config["in_channels"], path)
    size, region = int(preprocessing["image_size"]), preprocessing.get("norm_region", "crop")
    return LoadedModel(Path(path), model, size, checkpoint.get("split"), region, context)


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


_EXPORTED: dict[tuple, bytes] = {}  # checkpoint (path, size, mtime, ctime) -> checked ONNX bytes


def with_onnxruntime(loaded: LoadedModel) -> LoadedModel:
    """The same checkpoint with its network exported to ONNX (in memory, checked against
    PyTorch like export.py does) and run by onnxruntime. The export takes seconds, so it is
    done once per checkpoint file and process (the last 4 are kept)."""
    from export import OnnxRuntimeModel  # needs onnxruntime, only for this backend

    stat = loaded.path.stat()
    key = (str(loaded.path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _EXPORTED:
        _EXPORTED[key] = checked_onnx(loaded)
        while len(_EXPORTED) > 4:
            del _EXPORTED[next(iter(_EXPORTED))]
    return dataclasses.replace(loaded, model=OnnxRuntimeModel(_EXPORTED[key]))


def checked_onnx(loaded: LoadedModel) -> bytes:
    """ONNX bytes of a checkpoint's network. Raises CheckpointError when onnxruntime does
    not reproduce PyTorch's probabilities within export.TOLERANCE."""
    from export import TOLERANCE, OnnxRuntimeModel, export_onnx, max_abs_difference

    data = export_onnx(loaded.model, loaded.image_size)
    difference = max_abs_difference(loaded.model, OnnxRuntimeModel(data), loaded.image_size)
    if not difference <= TOLERANCE:
        raise CheckpointError(
            f"{loaded.path}: onnxruntime differs from PyTorch by {difference:.3g}; use --backend torch"
        )
    return data


def check_preprocessing(saved: dict, path: str | Path) -> None:
    """Refuse a checkpoint trained with preprocessing other than `dataset.preprocessing_config`
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


# ----------------------------------------------------------------------------- metrics


def patient_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, precision, recall, hd95 (NaN if either is empty) and pixel counts, 3-D."""
    precision, recall = precision_recall(prediction, truth)
    return {
        "dice": dice_score(prediction, truth),
        "precision": precision,
        "recall": recall,
        "hd95": hd95(prediction, truth),
        "gt_pixels": int(truth.sum()),
        "pred_pixels": int(prediction.sum()),
    }


def metric_stats(labelled: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean and median of each metric over rows with metrics; NaN (undefined hd95) skipped."""
    stats = {}
    for name in METRIC_COLUMNS:
        values = np.array([r[name] for r in labelled], dtype=float)
        finite = values[np.isfinite(values)]
        stats[name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
        }
    return stats


def headline(labelled: list[dict]) -> dict:
    """The publishable figure: metrics pooled over `test` and `unseen` patients only. When no
    such patient was scored, the statistics of the others with a note on their bias."""
    honest = [r for r in labelled if r.get("role") in HEADLINE_ROLES]
    if honest or not labelled:
        roles, rows, note = list(HEADLINE_ROLES), honest, None
    else:
        roles = sorted({r.get("role", "unknown") for r in labelled})
        rows = labelled
        note = "no test or unseen patient scored; this figure is " + " and ".join(BIAS[r] for r in roles if r in BIAS)
    return {"roles": roles, "count": len(rows), "biased": note is not None, "note": note, "metrics": metric_stats(rows)}


def summarize(rows: list[dict], protocol: dict) -> dict:
    """Mean and median of each metric over all labelled patients (`metrics`), per role
    (`by_role`: count, labelled count, metrics) and pooled over test + unseen (`headline`);
    counts, failed patients and the protocol."""
    labelled = [r for r in rows if r.get("dice") is not None]
    summary: dict = {"patients": len(rows), "labelled_patients": len(labelled), "metrics": metric_stats(labelled)}
    summary["by_role"] = {}
    for role in ROLES:
        members = [r for r in rows if r.get("role") == role]
        if members:
            scored = [r for r in members if r.get("dice") is not None]
            summary["by_role"][role] = {"count": len(members), "labelled": len(scored), "metrics": metric_stats(scored)}
    summary["headline"] = headline(labelled)
    summary["hd95_undefined_patients"] = int(sum(1 for r in labelled if not math.isfinite(r["hd95"])))
    summary["empty_truth_patients"] = int(sum(1 for r in labelled if r["gt_pixels"] == 0))
    summary["empty_prediction_patients"] = int(sum(1 for r in labelled if r["pred_pixels"] == 0))
    summary["failed_patients"] = {r["patient"]: r["error"] for r in rows if r.get("error")}
    summary["protocol"] = protocol
    return summary


# ------------------------------------------------------------------- model assignment


def are_folds(models: Sequence[LoadedModel]) -> bool:
    """Several checkpoints whose splits cover the same patients and whose test sets are
    non-empty and pairwise disjoint: the folds of one cross-validation (each patient is then
    scored by the model it was a test patient of). Runs on other data sets are an ensemble."""
    if len(models) < 2 or any(not m.split or not m.split.get("test") for m in models):
        return False
    cohorts = {frozenset(p for role in ("train", "val", "test") for p in m.split.get(role, [])) for m in models}
    if len(cohorts) != 1:
        return False
    seen: set[str] = set()
    for m in models:
        if seen & set(m.split["test"]):
            return False
        seen |= set(m.split["test"])
    return True


def role_for(patient_id: str, split: dict | None) -> str:
    """The patient's role for one model: train, val, test, unseen (in none of its lists), or
    unknown (the checkpoint saved no split)."""
    if not split:
        return "unknown"
    for role in ("train", "val", "test"):
        if patient_id in split.get(role, []):
            return role
    return "unseen"


def combined_role(roles: Sequence[str]) -> str:
    """The role of a patient for an ensemble: its most compromising role over the members
    (train > val > unknown > test > unseen); test only when no member trained or selected on it."""
    for role in ("train", "val", "unknown", "test"):
        if role in roles:
            return role
    return "unseen"


def assign(patient_id: str, models: Sequence[LoadedModel], folds: bool) -> tuple[list[int], str]:
    """Indices of the models that predict this patient, and its role for them. In a
    cross-validation a test patient is predicted by its fold's model alone; any other
    patient by all models (an ensemble)."""
    if folds:
        for i, m in enumerate(models):
            if patient_id in m.split["test"]:
                return [i], "test"
    return list(range(len(models))), combined_role([role_for(patient_id, m.split) for m in models])


def default_selection(models: Sequence[LoadedModel]) -> list[str]:
    """`test` when every checkpoint has test patients, else `val`."""
    return ["test"] if all(m.split and m.split.get("test") for m in models) else ["val"]


def requested_patients(selection: list[str], models: Sequence[LoadedModel], folds: bool) -> list[str] | None:
    """Patient ids from --patients (`test`, `val`, `train`, `all` or ids); None means every
    patient. A role picks the patients of the checkpoints' splits that have that role."""
    if selection == ["all"]:
        return None
    if len(selection) != 1 or selection[0] not in ("train", "val", "test"):
        return selection
    role = selection[0]
    if any(not m.split for m in models):
        raise CheckpointError(f"--patients {role}: a checkpoint has no saved split; pass --patients all or ids")
    candidates = set().union(*(set(m.split.get(r, [])) for m in models for r in ("train", "val", "test")))
    ids = sorted(p for p in candidates if assign(p, models, folds)[1] == role)
    if not ids:
        raise CheckpointError(
            f"--patients {role}: no patient has the role {role} for these checkpoints; pass --patients all or ids"
        )
    return ids


# ------------------------------------------------------------------------------ output


def all_slices(patient: Patient, kept: np.ndarray) -> np.ndarray:
    """(kept S, H, W) -> (all slices, H, W) with zeros for the dropped first and last slice."""
    full = np.zeros((len(patient.slices), *kept.shape[1:]), kept.dtype)
    full[1:-1] = kept
    return full


def write_masks(patient: Patient, native: np.ndarray, out_dir: Path) -> None:
    """One uint8 0/255 TIFF per input slice, named after its image (`P_001.tif` ->
    `masks/P/P_001_mask.tif`, extension spelling kept); the dropped first/last slices are empty."""
    if patient.nifti is not None:
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        write_nifti_mask(patient, all_slices(patient, native), out_dir / "masks" / f"{patient.patient_id}_mask.nii.gz")
        return
    folder = out_dir / "masks" / patient.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    for item, mask in zip(patient.slices, all_slices(patient, native), strict=True):
        tifffile.imwrite(folder / item.mask_name, mask.astype(np.uint8) * 255)


def write_overlays(
    patient: Patient,
    images: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None,
    out_dir: Path,
    dice: float | None = None,
) -> int:
    """One PNG per kept slice with truth or prediction (`utils.overlay`), titled with the
    patient, the slice number and the patient's Dice; `overlays/<patient>_<k>.png` with k
    zero-padded to 3 digits (more if needed) so `ls` lists the slices in order."""
    from skimage.io import imsave

    folder = out_dir / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    has_truth = truth.any(axis=(1, 2)) if truth is not None else np.zeros(len(pred), bool)
    shown = np.flatnonzero(pred.any(axis=(1, 2)) | has_truth)
    digits = max(3, len(str(max(item.number for item in patient.slices))))
    score = "no ground truth" if dice is None else f"patient Dice {dice:.3f}"
    for s in shown:
        number = patient.kept[s].number
        title = f"{patient.patient_id}   slice {number}   {score}"
        rgb = overlay(images[s, ..., 1], pred[s], None if truth is None else truth[s], title=title)
        imsave(folder / f"{patient.patient_id}_{number:0{digits}d}.png", rgb, check_contrast=False)
    return len(shown)


def start_table(path: Path) -> None:
    """Write metrics.csv's header (replacing an older table)."""
    with path.open("w", newline="") as handle:
        csv.DictWriter(handle, fieldnames=TABLE_COLUMNS).writeheader()


def append_row(path: Path, row: dict) -> None:
    """Append one patient's row and flush it to disk, so a later failure loses nothing."""
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in TABLE_COLUMNS})
        handle.flush()
        os.fsync(handle.fileno())


def print_table(rows: list[dict], summary: dict) -> None:
    """One line per patient with its role, the Dice per role, and last the headline line."""
    print(f"{'patient':<32} {'slices':>6} {'role':>7} {'dice':>7} {'prec':>7} {'recall':>7} {'hd95':>7}")
    for r in rows:
        start = f"{r['patient']:<32} {r['slices']:>6} {r['role']:>7}"
        if r.get("error"):
            print(f"{start} FAILED: {r['error']}")
        elif r.get("dice") is None:
            print(f"{start} (unlabelled: masks written, no metrics)")
        else:
            print(f"{start} {r['dice']:7.4f} {r['precision']:7.4f} {r['recall']:7.4f} {r['hd95']:7.2f}")
    for role, stats in summary["by_role"].items():
        dice = stats["metrics"]["dice"]
        if dice["mean"] is not None:
            print(f"{role:>7}: Dice mean {dice['mean']:.4f}, median {dice['median']:.4f} over {stats['labelled']}")
    print(headline_line(summary))


def headline_line(summary: dict) -> str:
    """The closing line of the printed table: the headline Dice and what it is worth."""
    head = summary["headline"]
    dice = head["metrics"]["dice"]
    if dice["mean"] is None:
        return "headline: no labelled patient scored (no Dice)"
    figure = f"Dice mean {dice['mean']:.4f}, median {dice['median']:.4f} over {head['count']} patients"
    if head["biased"]:
        return f"headline ({'+'.join(head['roles'])} only): {figure}; WARNING: {head['note']}"
    return f"headline (test + unseen): {figure} (hd95 undefined for {summary['hd95_undefined_patients']} of all)"


# -------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model-path",
        nargs="+",
        default=["./checkpoints/best_model.pt"],
        help="one checkpoint, several folds of one cross-validation (pooled), or an ensemble",
    )
    p.add_argument(
        "--data-dir",
        default="./kaggle_3m",
        help="kaggle_3m-style folder, and/or NIfTI files <patient>.nii.gz or <patient>_{pre,flair,post}.nii.gz",
    )
    p.add_argument("--output-dir", default="./predictions", help="masks, overlays, metrics.csv, summary.json")
    p.add_argument(
        "--figure-path", default=None, help="per-patient Dice bar chart; default: <output-dir>/dice_distribution.png"
    )
    p.add_argument("--device", default=None, help="default: cuda:0 when available, else cpu")
    p.add_argument(
        "--patients",
        nargs="+",
        default=None,
        help="'test', 'val' or 'train' (the patients with that role in the checkpoints' splits), 'all', or "
        "patient ids; default 'test' when the checkpoints have test patients, else 'val'",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="inference engine; default: onnxruntime on the CPU, torch on CUDA",
    )
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument("--no-lcc", action="store_true", help="keep every component, not only the largest")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--num-workers", type=int, default=4, help="threads for preprocessing")
    p.add_argument("--cache-dir", default="./cache", help="preprocessing cache")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <output-dir>/probabilities/<patient>.npy (float16, native size)",
    )
    return p


def check_output_dirs(args: argparse.Namespace) -> Path:
    """Create --output-dir, the folder of --figure-path (and --cache-dir unless --no-cache),
    or say why not, before any work."""
    if not args.no_cache:
        ensure_writable_dir(args.cache_dir, "--cache-dir")
    out_dir = ensure_writable_dir(args.output_dir, "--output-dir")
    args.figure_path = args.figure_path or str(out_dir / "dice_distribution.png")
    figure = Path(args.figure_path)
    if figure.is_dir():
        raise UsageError(f"--figure-path {figure}: is a folder; give a .png file name")
    ensure_writable_dir(figure.parent, "--figure-path")
    return out_dir


def validate_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if not 0 < args.threshold < 1:
        raise UsageError(f"--threshold {args.threshold}: must be in (0, 1)")


def predict_patient(
    patient: Patient,
    models: Sequence[LoadedModel],
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray]:
    """Average the models' probabilities, map them back to native space, binarize there.
    Returns native masks (S, H, W) bool and native probabilities (S, H, W)."""
    cache_dir = None if args.no_cache or patient.nifti else args.cache_dir  # the cache key knows TIFF files only
    check_image_sizes(models)
    volume = load_volume(patient, models[0].image_size, cache_dir, models[0].norm_region)
    amp = autocast_dtype(device)
    probs = np.mean(
        [
            predict_volume(m.model, volume.images, device, args.batch_size, args.tta, amp, m.context_slices)
            for m in models
        ],
        axis=0,
    )
    native_mask, native_probs = to_native(probs, volume.geometry, args.threshold, not args.no_lcc)
    return native_mask.astype(bool), native_probs


def process_patient(
    patient: Patient,
    models: Sequence[LoadedModel],
    folds: bool,
    device: torch.device,
    args: argparse.Namespace,
    out_dir: Path,
) -> dict:
    """Predict one patient, write its masks (and probabilities, overlays); its metrics row."""
    indices, role = assign(patient.patient_id, models, folds)
    row = {
        "patient": patient.patient_id,
        "slices": len(patient.kept),
        "role": role,
        "models": ";".join(str(models[i].path) for i in indices),
    }
    try:
        native_mask, native_probs = predict_patient(patient, [models[i] for i in indices], device, args)
        write_masks(patient, native_mask, out_dir)
        if args.save_probabilities:
            (out_dir / "probabilities").mkdir(exist_ok=True)
            probabilities = all_slices(patient, native_probs.astype(np.float16))
            np.save(out_dir / "probabilities" / f"{patient.patient_id}.npy", probabilities)
        images, truth = read_volume(patient)  # native images and masks, kept slices
        if truth is not None:
            row.update(patient_metrics(native_mask, truth))
        if not args.no_overlays:
            write_overlays(patient, images, native_mask, truth, out_dir, row.get("dice"))
    except (DataError, OSError, ValueError, RuntimeError) as error:  # recorded; the run goes on
        row = {key: row[key] for key in ("patient", "slices", "role", "models")}
        row["error"] = f"{type(error).__name__}: {error}" if not isinstance(error, DataError) else str(error)
    return row


def check_image_sizes(models: Sequence[LoadedModel]) -> None:
    """An ensemble averages probabilities, so its members must share the model grid and the
    normalisation region (checked before any patient; fold models each predict their own
    patients and may differ). Their context slices may differ: each stacks its own input."""
    sizes = {m.image_size for m in models}
    if len(sizes) != 1:
        raise CheckpointError(f"the checkpoints use different image sizes {sorted(sizes)}")
    regions = {m.norm_region for m in models}
    if len(regions) != 1:
        raise CheckpointError(
            f"the checkpoints were normalised over different regions ({', '.join(sorted(regions))}); "
            "ensemble checkpoints trained with the same --norm-region"
        )


def make_protocol(args: argparse.Namespace, models: Sequence[LoadedModel], mode: str, seconds: float) -> dict:
    """What was scored how: checkpoints, their splits, post-processing and metric conventions."""
    return {
        "checkpoints": [str(m.path) for m in models],
        "mode": mode,
        "patients": args.patients,
        "roles": "train/val/test from each checkpoint's split; unseen = in none of its lists",
        "headline": "pooled over test and unseen patients only",
        "splits": [m.split for m in models],
        "threshold": args.threshold,
        "lcc": not args.no_lcc,
        "tta": args.tta,
        "backend": args.backend,
        "post_processing": "probabilities resampled to the native grid (bilinear), then threshold, then 3-D LCC",
        "space": "native (input TIFF or NIfTI grid), first/last slice of each patient excluded",
        "hd95": "MONAI: 6-neighbour surface, max of the two directed 95th percentiles, NaN if a mask is empty",
        "hd95_units": "pixels (slice spacing counted as 1 pixel)",
        "seconds": round(seconds, 2),
    }


def run(args: argparse.Namespace) -> dict:
    """Predict, write every output (metrics.csv row by row, summary.json even when patients
    fail), return the summary."""
    out_dir = check_output_dirs(args)
    device = resolve_device(args.device)
    args.backend = resolve_backend(args.backend, device)
    models = [load_model(path, device) for path in args.model_path]
    folds = are_folds(models)
    if not folds:
        check_image_sizes(models)
    args.patients = args.patients or default_selection(models)
    patients = discover_inputs(args.data_dir)
    wanted = requested_patients(args.patients, models, folds)
    patients = patients if wanted is None else select_patients(patients, wanted)
    if args.backend == "onnxruntime":
        models = [with_onnxruntime(m) for m in models]
    mode = "folds" if folds else ("ensemble" if len(models) > 1 else "single")
    print(
        f"{len(patients)} patient(s) ({' '.join(args.patients)}), {len(models)} checkpoint(s) ({mode}), "
        f"device {device}, backend {args.backend}"
    )

    table = out_dir / "metrics.csv"
    start_table(table)
    rows = []
    start = time.perf_counter()
    for patient in tqdm(patients, desc="predict", unit="patient", leave=False, disable=None):
        rows.append(process_patient(patient, models, folds, device, args, out_dir))
        append_row(table, rows[-1])
    elapsed = time.perf_counter() - start

    summary = summarize(rows, make_protocol(args, models, mode, elapsed))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    dice = [r for r in rows if r.get("dice") is not None]
    if dice:
        plot_dice_distribution(dice, args.figure_path)
    print(
        f"wrote {out_dir}/metrics.csv, summary.json, masks/"
        + ("" if args.no_overlays else ", overlays/")
        + (f" and {args.figure_path}" if dice else "")
        + f" in {elapsed:.1f} s"
    )
    print_table(rows, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    one_line_warnings()
    try:
        validate_args(args)
        summary = run(args)
    except (DataError, CheckpointError, UsageError) as error:
        sys.exit(f"error: {error}")
    failed = summary["failed_patients"]
    if failed:
        listing = "\n".join(f"  {patient}: {error}" for patient, error in failed.items())
        sys.exit(f"error: {len(failed)} patient(s) failed (recorded in metrics.csv and summary.json):\n{listing}")
    return summary


if __name__ == "__main__":
    main()
