"""Inference and per-patient evaluation.

    python predict.py --model-path checkpoints/best_model.pt --data-dir kaggle_3m

Also the one implementation of "predict a volume" (`predict_volume`, `binarize`, `to_native`) that
training validation, this CLI and the torch.hub pipeline share.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from tqdm import tqdm

from dataset import DataError, Patient, discover_patients, load_volume, read_volume, select_patients
from network import UNetModel
from utils import (
    CheckpointError,
    Geometry,
    UsageError,
    dice_score,
    hd95,
    is_training_checkpoint,
    largest_connected_component,
    load_checkpoint,
    model_state_from,
    overlay,
    plot_dice_distribution,
    precision_recall,
    resolve_device,
    restore_geometry,
)

METRIC_COLUMNS = ["dice", "precision", "recall", "hd95", "gt_pixels", "pred_pixels"]


# ------------------------------------------------------------------- shared inference


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
) -> np.ndarray:
    """Probabilities (S, H, W) float32 for a preprocessed volume (S, 3, H, W), in batches.
    With `tta` the prediction is averaged with that of the horizontally flipped input."""
    device = torch.device(device)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        batch = batch.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            probs = model(batch)  # (B, 3, H, W) -> (B, 1, H, W)
            if tta:
                probs = (probs + model(batch.flip(-1)).flip(-1)) / 2
        out.append(probs[:, 0].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, *images.shape[-2:]), np.float32)


def binarize(probabilities: np.ndarray, threshold: float = 0.5, lcc: bool = True) -> np.ndarray:
    """Threshold, then keep the 3-D largest connected component (unless `lcc` is False)."""
    mask = probabilities >= threshold
    return largest_connected_component(mask) if lcc else mask


def to_native(
    probabilities: np.ndarray, geometry: Geometry, threshold: float = 0.5, lcc: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Binarize in model space, then map the mask (nearest) and the probabilities
    (bilinear) back onto the native grid: uint8 0/1 masks and float32 probabilities (S, H, W)."""
    mask = binarize(probabilities, threshold, lcc).astype(np.uint8)
    return restore_geometry(mask, geometry), restore_geometry(probabilities, geometry, mode="bilinear")


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
    model: UNetModel
    image_size: int
    split: dict | None


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Load a training checkpoint (weights_only) and rebuild its model on `device`."""
    checkpoint = load_checkpoint(path)
    if not is_training_checkpoint(checkpoint) or "preprocessing" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (needs 'model', 'model_config' and "
            "'preprocessing'); bare state_dicts can be loaded with hubconf.unet_segmentation"
        )
    model = build_model(checkpoint, path).to(device).to(memory_format=torch.channels_last)
    return LoadedModel(Path(path), model, int(checkpoint["preprocessing"]["image_size"]), checkpoint.get("split"))


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


def summarize(rows: list[dict], protocol: dict) -> dict:
    """Mean and median of each metric over labelled patients, counts, and the protocol."""
    labelled = [r for r in rows if r.get("dice") is not None]
    summary: dict = {"patients": len(rows), "labelled_patients": len(labelled), "metrics": {}}
    for name in METRIC_COLUMNS:
        values = np.array([r[name] for r in labelled], dtype=float)
        finite = values[np.isfinite(values)]
        summary["metrics"][name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
        }
    summary["hd95_undefined_patients"] = int(sum(1 for r in labelled if not math.isfinite(r["hd95"])))
    summary["empty_truth_patients"] = int(sum(1 for r in labelled if r["gt_pixels"] == 0))
    summary["empty_prediction_patients"] = int(sum(1 for r in labelled if r["pred_pixels"] == 0))
    summary["protocol"] = protocol
    return summary


# ------------------------------------------------------------------- model assignment


def are_folds(models: Sequence[LoadedModel]) -> bool:
    """Several checkpoints whose validation sets are pairwise disjoint: a cross-validation."""
    if len(models) < 2 or any(not m.split or not m.split.get("val") for m in models):
        return False
    seen: set[str] = set()
    for m in models:
        if seen & set(m.split["val"]):
            return False
        seen |= set(m.split["val"])
    return True


def requested_patients(selection: list[str], models: Sequence[LoadedModel], folds: bool) -> list[str] | None:
    """Patient ids from --patients (`val`, `all` or ids); None means every patient."""
    if selection == ["all"]:
        return None
    if selection != ["val"]:
        return selection
    if any(not m.split for m in models):
        raise CheckpointError("--patients val: a checkpoint has no saved split; pass --patients all or ids")
    val_sets = [set(m.split["val"]) for m in models]
    ids = set.union(*val_sets) if folds else set.intersection(*val_sets)
    if not ids:
        raise CheckpointError("--patients val: the checkpoints share no validation patient; pass --patients all or ids")
    return sorted(ids)


def models_for(patient_id: str, models: Sequence[LoadedModel], folds: bool) -> tuple[list[int], bool]:
    """Indices of the models that predict this patient, and whether they all held it out."""
    if folds:
        for i, m in enumerate(models):
            if patient_id in m.split["val"]:
                return [i], True
    indices = list(range(len(models)))
    held_out = all(m.split and patient_id in m.split.get("val", []) for m in models)
    return indices, held_out


# ------------------------------------------------------------------------------ output


def all_slices(patient: Patient, kept: np.ndarray) -> np.ndarray:
    """(kept S, H, W) -> (all slices, H, W) with zeros for the dropped first and last slice."""
    full = np.zeros((len(patient.slices), *kept.shape[1:]), kept.dtype)
    full[1:-1] = kept
    return full


def write_masks(patient: Patient, native: np.ndarray, out_dir: Path) -> None:
    """One uint8 0/255 TIFF per input slice; the dropped first/last slices are empty."""
    folder = out_dir / "masks" / patient.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    for item, mask in zip(patient.slices, all_slices(patient, native), strict=True):
        tifffile.imwrite(folder / f"{patient.patient_id}_{item.number}_mask.tif", mask.astype(np.uint8) * 255)


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


def write_table(rows: list[dict], path: Path) -> None:
    columns = ["patient", "slices", *METRIC_COLUMNS, "models", "held_out"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def print_table(rows: list[dict], summary: dict) -> None:
    print(f"{'patient':<32} {'slices':>6} {'dice':>7} {'prec':>7} {'recall':>7} {'hd95':>7}")
    for r in rows:
        if r.get("dice") is None:
            print(f"{r['patient']:<32} {r['slices']:>6} {'(unlabelled: masks written, no metrics)':>40}")
            continue
        scores = f"{r['dice']:7.4f} {r['precision']:7.4f} {r['recall']:7.4f} {r['hd95']:7.2f}"
        print(f"{r['patient']:<32} {r['slices']:>6} {scores}")
    dice = summary["metrics"]["dice"]
    if dice["mean"] is not None:
        print(
            f"Dice over {summary['labelled_patients']} patients: mean {dice['mean']:.4f}, median {dice['median']:.4f}"
            f" (hd95 undefined for {summary['hd95_undefined_patients']})"
        )


# -------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--model-path",
        nargs="+",
        default=["./checkpoints/best_model.pt"],
        help="one checkpoint, several folds of one cross-validation (pooled), or an ensemble",
    )
    p.add_argument("--data-dir", default="./kaggle_3m", help="kaggle_3m-style folder")
    p.add_argument("--output-dir", default="./predictions", help="masks, overlays, metrics.csv, summary.json")
    p.add_argument("--figure-path", default="./dice_distribution.png", help="per-patient Dice bar chart")
    p.add_argument("--device", default=None, help="cuda:0 when available, else cpu")
    p.add_argument(
        "--patients",
        nargs="+",
        default=["val"],
        help="'val' (the checkpoints' validation split), 'all', or patient ids",
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
    """Average the models' probabilities, binarize in model space, map back to native
    space. Returns native masks (S, H, W) bool and native probabilities (S, H, W)."""
    cache_dir = None if args.no_cache else args.cache_dir
    sizes = {m.image_size for m in models}
    if len(sizes) != 1:
        raise CheckpointError(f"ensembled checkpoints use different image sizes {sorted(sizes)}")
    volume = load_volume(patient, sizes.pop(), cache_dir)
    probs = np.mean(
        [
            predict_volume(m.model, volume.images, device, args.batch_size, args.tta, autocast_dtype(device))
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
    indices, held_out = models_for(patient.patient_id, models, folds)
    native_mask, native_probs = predict_patient(patient, [models[i] for i in indices], device, args)
    write_masks(patient, native_mask, out_dir)
    if args.save_probabilities:
        (out_dir / "probabilities").mkdir(exist_ok=True)
        probabilities = all_slices(patient, native_probs.astype(np.float16))
        np.save(out_dir / "probabilities" / f"{patient.patient_id}.npy", probabilities)
    images, truth = read_volume(patient)  # native images and masks, kept slices
    row = {
        "patient": patient.patient_id,
        "slices": len(patient.kept),
        "models": " ".join(str(i) for i in indices),
        "held_out": held_out,
    }
    if truth is not None:
        row.update(patient_metrics(native_mask, truth))
    if not args.no_overlays:
        write_overlays(patient, images, native_mask, truth, out_dir, row.get("dice"))
    return row


def run(args: argparse.Namespace) -> dict:
    """Predict, write every output, return the summary."""
    device = resolve_device(args.device)
    models = [load_model(path, device) for path in args.model_path]
    folds = are_folds(models)
    patients = discover_patients(args.data_dir)
    wanted = requested_patients(args.patients, models, folds)
    patients = patients if wanted is None else select_patients(patients, wanted)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = "folds" if folds else ("ensemble" if len(models) > 1 else "single")
    print(f"{len(patients)} patient(s), {len(models)} checkpoint(s) ({mode}), device {device}")

    rows = []
    start = time.perf_counter()
    for patient in tqdm(patients, desc="predict", unit="patient", leave=False):
        rows.append(process_patient(patient, models, folds, device, args, out_dir))
    elapsed = time.perf_counter() - start

    protocol = {
        "checkpoints": [str(m.path) for m in models],
        "mode": mode,
        "patients": args.patients,
        "splits": [m.split for m in models],
        "threshold": args.threshold,
        "lcc": not args.no_lcc,
        "tta": args.tta,
        "space": "native (input TIFF grid), first/last slice of each patient excluded",
        "hd95_units": "pixels (slice spacing counted as 1 pixel)",
        "seconds": round(elapsed, 2),
    }
    summary = summarize(rows, protocol)
    write_table(rows, out_dir / "metrics.csv")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    dice = {r["patient"]: r["dice"] for r in rows if r.get("dice") is not None}
    if dice:
        plot_dice_distribution(dice, args.figure_path)
    print_table(rows, summary)
    print(
        f"wrote {out_dir}/metrics.csv, summary.json, masks/"
        + ("" if args.no_overlays else ", overlays/")
        + (f" and {args.figure_path}" if dice else "")
        + f" in {elapsed:.1f} s"
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    try:
        validate_args(args)
        return run(args)
    except (DataError, CheckpointError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
