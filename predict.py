r"""Predict FLAIR-abnormality masks and score them per patient (Dice, precision, recall, hd95,
volumes, lesion-wise detection).

    python predict.py --model-path checkpoints/best_model.pt --data-dir kaggle_3m
    python predict.py --model-path demo_checkpoints/best_model.pt --data-dir demo_3m  # after train.py --demo
    python predict.py --model-path cv/fold0/best_model.pt cv/fold1/best_model.pt cv/fold2/best_model.pt \
        --data-dir kaggle_3m --output-dir cv/predictions    # the folds of train.py --fold all, pooled

Writes to --output-dir: masks/<patient>/<patient>_<k>_mask.tif (input size, 0/255), overlays/,
metrics.csv (one row per patient, written as each one finishes), summary.json and report.html
(open it in a browser: headline, protocol, Dice chart, sortable table, thumbnails). Each
patient's role (train, val, test, or unseen) comes from the checkpoints' saved splits; the
headline pools the test and unseen patients only. Checkpoints with disjoint test sets are the
folds of one cross-validation: each patient is scored by the model it was a test patient of.
Other checkpoints are averaged (an ensemble).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the printed run time counts from here: imports, loading, prediction, outputs

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import torch
from tqdm import tqdm

from checkpoint import CheckpointError
from dataset import discover_inputs, load_volume, read_volume, select_patients
from export import with_onnxruntime
from inference import (
    AMP_CHOICES,
    AMP_DTYPES,
    BACKENDS,
    LoadedModel,
    amp_name,
    autocast_for,
    load_model,
    missing_checkpoint,
    precision_text,
    predict_volume,
    resolve_inference,
    to_native,
)
from metrics import metric_names, metric_units, patient_metrics
from nifti import write_nifti_array, write_nifti_mask
from openvino_backend import with_openvino
from patients import DataError, Patient
from phantom import warn_if_phantom_trained
from pictures import overlay, plot_dice_distribution, view_box
from postprocessing import LCC, NO_FILTER, postprocessing_name
from report import write_report
from summary import summarize
from thumbnails import THUMBNAIL_DIR, write_thumbnails
from utils import (
    CLIParser,
    HelpFormatter,
    UsageError,
    add_shared_flag,
    atomic_write_bytes,
    check_writable_dir,
    ensure_writable_dir,
    one_line_warnings,
    resolve_device,
    shared_flags,
)


def csv_columns() -> list[str]:
    """metrics.csv's columns in order: the patient, its role, every registered metric
    (`metrics.REGISTRY`), then how it was scored and why it failed."""
    return ["patient", "slices", "role", *metric_names(), "spacing", "models", "error"]


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


def split_patients(models: Sequence[LoadedModel], roles: Sequence[str] = ("train", "val", "test")) -> set[str]:
    """The patient ids that have one of `roles` in any checkpoint's saved split."""
    return set().union(*(set(m.split.get(r, [])) for m in models if m.split for r in roles))


def default_selection(models: Sequence[LoadedModel], found: Collection[str]) -> list[str]:
    """--patients by default, given the patient ids `found` in --data-dir: `all` when none of
    them is in a checkpoint's split (a published model on a user's scans); else `test` when
    every checkpoint has test patients and some of them are there, `all` when none of them
    are (the summary then says which figures are biased), and `val` for checkpoints without
    test patients (the demo's)."""
    found = set(found)
    if not split_patients(models) & found:
        return ["all"]
    if all(m.split and m.split.get("test") for m in models):
        return ["test"] if split_patients(models, ("test",)) & found else ["all"]
    return ["val"]


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
    ids = sorted(p for p in split_patients(models) if assign(p, models, folds)[1] == role)
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


OVERLAY_THREADS = min(4, os.cpu_count() or 1)


def overlay_path(patient: Patient, number: int) -> str:
    """`overlays/<patient>_<k>.png`, k zero-padded to 3 digits (more if needed) so `ls`
    lists the slices in order; relative to --output-dir."""
    digits = max(3, len(str(max(item.number for item in patient.slices))))
    return f"overlays/{patient.patient_id}_{number:0{digits}d}.png"


def write_overlays(
    patient: Patient,
    images: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None,
    out_dir: Path,
    dice: float | None = None,
) -> int:
    """One PNG per kept slice with truth or prediction (`pictures.overlay`, cropped to the
    patient's head and masks, `pictures.view_box`), titled with the patient, the slice number
    and the patient's Dice, at `overlay_path`. Returns the number written. Drawn and written
    by OVERLAY_THREADS threads (numpy and Pillow's PNG encoder release the GIL); PNG
    compression level 1: files a quarter larger than at the default level 6, written 4x faster."""
    from PIL import Image

    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    has_truth = truth.any(axis=(1, 2)) if truth is not None else np.zeros(len(pred), bool)
    shown = np.flatnonzero(pred.any(axis=(1, 2)) | has_truth)
    score = "no ground truth" if dice is None else f"patient Dice {dice:.3f}"
    box = view_box(images, pred, truth) if len(shown) else None

    def draw(s: int) -> None:
        number = patient.kept[s].number
        title = f"{patient.patient_id}   slice {number}   {score}"
        rgb = overlay(images[s, ..., 1], pred[s], None if truth is None else truth[s], title=title, crop=box)
        png = io.BytesIO()
        Image.fromarray(rgb).save(png, format="png", compress_level=1)
        atomic_write_bytes(png.getvalue(), out_dir / overlay_path(patient, number), durable=False)

    pool = ThreadPoolExecutor(max_workers=OVERLAY_THREADS, thread_name_prefix="overlay")
    try:
        for _ in pool.map(draw, shown):  # raises the first failure
            pass
    finally:  # on an error or Ctrl-C: drop the slices not started, finish the running ones
        pool.shutdown(cancel_futures=True)
    return len(shown)


def start_table(path: Path) -> None:
    """Write metrics.csv's header, replacing an older table, and remove the summary.json and
    report.html beside it: they described the older table's run."""
    for stale in ("summary.json", "report.html"):
        (path.parent / stale).unlink(missing_ok=True)
    with path.open("w", newline="") as handle:
        csv.DictWriter(handle, fieldnames=csv_columns()).writeheader()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the patients: `finished` of `total` rows are in `table`."""

    def __init__(self, finished: int, total: int, table: Path):
        super().__init__(finished, total, table)
        self.finished, self.total, self.table = finished, total, table


def append_row(path: Path, row: dict) -> None:
    """Append one patient's row and flush it to disk, so a later failure loses nothing."""
    with path.open("a", newline="") as handle:
        columns = csv_columns()
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        handle.flush()
        os.fsync(handle.fileno())


def print_table(rows: list[dict], summary: dict) -> None:
    """One line per patient with its role, the Dice per role, and last the headline line."""
    header = f"{'patient':<32} {'slices':>6} {'role':>7} {'dice':>7} {'prec':>7} {'recall':>7} {'hd95':>7}"
    print(f"{header} {'les_f1':>7}")
    for r in rows:
        start = f"{r['patient']:<32} {r['slices']:>6} {r['role']:>7}"
        if r.get("error"):
            print(f"{start} FAILED: {r['error']}")
        elif r.get("dice") is None:
            print(f"{start} (unlabelled: masks written, no metrics)")
        else:
            scores = f"{r['dice']:7.4f} {r['precision']:7.4f} {r['recall']:7.4f} {r['hd95']:7.2f}"
            print(f"{start} {scores} {r.get('lesion_f1', math.nan):7.4f}")
    for role, stats in summary["by_role"].items():
        dice, lesion_f1 = stats["metrics"]["dice"], stats["metrics"]["lesion_f1"]["mean"]
        if dice["mean"] is not None:
            lesions = "" if lesion_f1 is None else f", lesion F1 mean {lesion_f1:.4f}"
            figure = f"Dice mean {dice['mean']:.4f}, median {dice['median']:.4f}{lesions}"
            print(f"{role:>7}: {figure} over {stats['labelled']}")
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
    shared = shared_flags(
        "--data-dir",
        "--cache-dir",
        "--no-cache",
        "--device",
        data_dir="kaggle_3m-style folder, and/or NIfTI files <patient>.nii.gz or <patient>_{pre,flair,post}.nii.gz",
    )
    p = CLIParser(description=__doc__, formatter_class=HelpFormatter, parents=[shared])
    p.add_argument(
        "--model-path",
        nargs="+",
        default=["./checkpoints/best_model.pt"],
        help="one checkpoint, several folds of one cross-validation (pooled), or an ensemble",
    )
    p.add_argument("--output-dir", default="./predictions", help="masks, overlays, metrics.csv, summary.json")
    p.add_argument(
        "--figure-path", default=None, help="per-patient Dice bar chart; default: <output-dir>/dice_distribution.png"
    )
    p.add_argument(
        "--patients",
        nargs="+",
        default=None,
        help="'test', 'val' or 'train' (the patients with that role in the checkpoints' splits), 'all', or "
        "patient ids; default: 'test' when the checkpoints' test patients are in --data-dir, 'val' for "
        "checkpoints without test patients, else 'all'",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="inference engine; default: the fastest path measured (bench.py cpu-inference): torch on CUDA; on "
        "the CPU openvino for bf16, onnxruntime for fp32, torch for --amp fp16",
    )
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="precision of the forward pass; auto = bf16 on GPUs that support it (fp16 on other GPUs) and on CPUs "
        "with native bf16 instructions (AVX512-BF16 or AMX; checked against fp32: docs/precision.md), else fp32; "
        "off = full fp32",
    )
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument(
        "--postprocess",
        choices=POSTPROCESS_CHOICES,
        default=None,
        help="component filtering after the threshold: checkpoint = the choice saved in each checkpoint (made on "
        "its validation patients; lcc for a checkpoint without one), lcc = keep the largest component only, "
        "none = keep every component; default: checkpoint",
    )
    add_shared_flag(
        p, "--no-lcc", note="for the masks written and scored: --postprocess none (refused with another --postprocess)"
    )
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.add_argument("--no-report", action="store_true", help="skip report.html and its thumbnails/")
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <output-dir>/probabilities/<patient>.npy (float16, native size); for a NIfTI patient "
        "<patient>.nii.gz (float32, on the input's grid and affine)",
    )
    p.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        metavar=("ROW", "COL", "SLICE"),
        default=None,
        help="voxel size (mm) of the TIFF patients, which carry none: hd95 in mm and volumes in mm3 "
        "(NIfTI patients use their header's); default: voxels",
    )
    p.add_argument(
        "--min-lesion-volume",
        type=float,
        default=0.0,
        help="lesion-wise metrics ignore ground-truth lesions of this volume or less (mm3 with a spacing, voxels "
        "without; BraTS 2023 uses 50 mm3)",
    )
    return p


def check_output_dirs(args: argparse.Namespace) -> None:
    """Check --output-dir, the folder of --figure-path (and --cache-dir unless --no-cache)
    before any work, creating none of them (`create_output_dirs` does, once the work starts)."""
    if not args.no_cache:
        check_writable_dir(args.cache_dir, "--cache-dir")
    check_writable_dir(args.output_dir, "--output-dir")
    out = Path(args.output_dir)
    folders = {"masks": True, "overlays": not args.no_overlays, THUMBNAIL_DIR: not args.no_report}
    folders["probabilities"] = args.save_probabilities
    for folder, written in folders.items():
        if written:  # a file of that name would fail every patient
            check_writable_dir(out / folder, "--output-dir")
    for name in ("metrics.csv", "summary.json", "report.html"):
        if (out / name).is_dir():
            raise UsageError(f"--output-dir {out}: {name} is a folder; remove it or choose another --output-dir")
    args.figure_path = args.figure_path or str(Path(args.output_dir) / "dice_distribution.png")
    figure = Path(args.figure_path)
    if figure.is_dir():
        raise UsageError(f"--figure-path {figure}: is a folder; give a .png file name")
    check_writable_dir(figure.parent, "--figure-path")


def create_output_dirs(args: argparse.Namespace) -> Path:
    """Create the folders `check_output_dirs` checked; returns --output-dir."""
    if not args.no_cache:
        ensure_writable_dir(args.cache_dir, "--cache-dir")
    ensure_writable_dir(Path(args.figure_path).parent, "--figure-path")
    return ensure_writable_dir(args.output_dir, "--output-dir")


def select_requested(patients: list[Patient], selection: list[str], wanted: list[str] | None, data_dir: str):
    """The patients of --patients among those found in --data-dir. Raises DataError naming
    the missing ones; when --patients was a role (test, val, train), says that they are the
    checkpoints' patients of that role and how to predict the patients that are there."""
    if wanted is None:
        return patients
    found = {p.patient_id for p in patients}
    missing = [i for i in wanted if i not in found]
    if missing and len(selection) == 1 and selection[0] in ("train", "val", "test"):
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} of the checkpoints' {selection[0]} patients are not in --data-dir {data_dir} ({listed}): "
            "it holds other patients than the run was trained on; pass --patients all to predict every patient there"
        )
    return select_patients(patients, wanted)


def validate_args(args: argparse.Namespace) -> None:
    if args.no_lcc and args.postprocess not in (None, "none"):
        raise UsageError(f"--no-lcc is --postprocess none; it contradicts --postprocess {args.postprocess}: pass one")
    args.postprocess = "none" if args.no_lcc else (args.postprocess or "checkpoint")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if not 0 < args.threshold < 1:
        raise UsageError(f"--threshold {args.threshold}: must be in (0, 1)")
    if args.spacing is not None and not all(math.isfinite(v) and v > 0 for v in args.spacing):
        raise UsageError(f"--spacing {' '.join(map(str, args.spacing))}: expected three positive sizes in mm")
    if not (math.isfinite(args.min_lesion_volume) and args.min_lesion_volume >= 0):
        raise UsageError(f"--min-lesion-volume {args.min_lesion_volume}: must be >= 0")


def with_spacing(patients: list[Patient], spacing: list[float] | None) -> list[Patient]:
    """The patients with `--spacing ROW COL SLICE` (mm) set on the TIFF patients, as the
    (slice, row, col) spacing of their arrays; NIfTI patients keep their header's."""
    if spacing is None:
        return patients
    row, col, slice_step = spacing
    return [p if p.nifti is not None else dataclasses.replace(p, spacing=(slice_step, row, col)) for p in patients]


def predict_patient(
    patient: Patient, models: Sequence[LoadedModel], device: torch.device, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """Average the models' probabilities, map them back to native space, binarize there.
    Returns native masks (S, H, W) bool and native probabilities (S, H, W)."""
    cache_dir = None if args.no_cache else args.cache_dir
    check_image_sizes(models)
    volume = load_volume(patient, models[0].image_size, cache_dir, models[0].norm_region)
    amp = autocast_for(args.backend, AMP_DTYPES[args.precision])
    probs = np.mean(
        [
            predict_volume(m.model, volume.images, device, args.batch_size, args.tta, amp, m.context_slices)
            for m in models
        ],
        axis=0,
    )
    record, _ = postprocessing_for(models, args.postprocess)
    native_mask, native_probs = to_native(probs, volume.geometry, args.threshold, postprocessing=record)
    return native_mask.astype(bool), native_probs


POSTPROCESS_CHOICES = ("checkpoint", "lcc", "none")


def postprocessing_for(models: Sequence[LoadedModel], requested: str) -> tuple[dict, str | None]:
    """The post-processing record for a prediction by `models` (one model, or an ensemble
    averaging them) under --postprocess `requested`, and a warning when it had to give up
    the checkpoints' choice. `lcc` / `none` override every checkpoint; `checkpoint` is the
    models' saved choice (LoadedModel.postprocessing: lcc without a record) when they all
    agree, else lcc, the default without a record (an averaged map has no choice of its own)."""
    if requested != "checkpoint":
        return dict(LCC if requested == "lcc" else NO_FILTER), None
    records = {postprocessing_name(m.postprocessing): m.postprocessing for m in models}
    if len(records) == 1:
        return dict(next(iter(records.values()))), None
    named = ", ".join(f"{m.path}: {postprocessing_name(m.postprocessing)}" for m in models)
    return dict(LCC), f"the averaged checkpoints chose different post-processing ({named}); their average gets lcc"


def postprocessing_protocol(models: Sequence[LoadedModel], requested: str, folds: bool) -> dict:
    """summary.json's record of the post-processing: what was requested, what each checkpoint
    saved (`saved`, None without a record) and used when it predicts alone, and what an
    average of the checkpoints (an ensemble, or the non-test patients of folds) used."""
    used = {str(m.path): postprocessing_name(postprocessing_for([m], requested)[0]) for m in models}
    protocol = {
        "requested": requested,
        "saved": {
            str(m.path): postprocessing_name(m.postprocessing) if m.postprocessing_chosen else None for m in models
        },
        "used_alone": used,
        "chosen_on": "each checkpoint's validation patients (train.py), native grid, threshold 0.5, no TTA",
    }
    if len(models) > 1:
        record, warning = postprocessing_for(models, requested)
        protocol["used_averaged"] = postprocessing_name(record)
        protocol["averaged_note"] = warning
        protocol["applies_to"] = (
            "folds: a test patient gets its own fold's post-processing (used_alone); any other patient is "
            "predicted by the average of all folds (used_averaged)"
            if folds
            else "ensemble: every patient is predicted by the average of the checkpoints (used_averaged)"
        )
    return protocol


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
        "spacing": spacing_text(patient.spacing),
    }
    try:
        native_mask, native_probs = predict_patient(patient, [models[i] for i in indices], device, args)
        write_masks(patient, native_mask, out_dir)
        if args.save_probabilities:
            write_probabilities(patient, native_probs, out_dir)
        images, truth = read_volume(patient)  # native images and masks, kept slices
        if truth is not None:
            row.update(patient_metrics(native_mask, truth, patient.spacing, args.min_lesion_volume))
            row["units"] = metric_units(patient.spacing)
        if not args.no_overlays:
            write_overlays(patient, images, native_mask, truth, out_dir, row.get("dice"))
        if not args.no_report:  # thumbnails from the arrays in memory, for report.html
            links = None if args.no_overlays else (lambda k: overlay_path(patient, k))
            numbers = [item.number for item in patient.kept]
            row["pictures"] = write_thumbnails(patient.patient_id, images, native_mask, truth, numbers, out_dir, links)
    except (DataError, OSError, ValueError, RuntimeError) as error:  # recorded; the run goes on
        row = {key: row[key] for key in ("patient", "slices", "role", "spacing", "models")}
        row["error"] = f"{type(error).__name__}: {error}" if not isinstance(error, DataError) else str(error)
    return row


def spacing_text(spacing: tuple[float, float, float] | None) -> str | None:
    """metrics.csv's `spacing`: "ROWxCOLxSLICE" in mm, the order of --spacing; None without."""
    if spacing is None:
        return None
    slice_step, row, col = spacing
    return f"{row:g}x{col:g}x{slice_step:g}"


def write_probabilities(patient: Patient, native_probs: np.ndarray, out_dir: Path) -> None:
    """`probabilities/<patient>.npy` (float16, all slices, native size) for a TIFF patient;
    `probabilities/<patient>.nii.gz` (float32, on the input's grid and affine, so a viewer
    shows it over the scan) for a NIfTI patient. The dropped first/last slices are 0."""
    folder = out_dir / "probabilities"
    folder.mkdir(exist_ok=True)
    if patient.nifti is not None:
        probabilities = all_slices(patient, native_probs.astype(np.float32))
        write_nifti_array(patient, probabilities, folder / f"{patient.patient_id}.nii.gz")
    else:
        np.save(folder / f"{patient.patient_id}.npy", all_slices(patient, native_probs.astype(np.float16)))


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


def postprocessing_line(models: Sequence[LoadedModel], requested: str, mode: str, averaged: bool) -> str:
    """The printed line that says which post-processing the masks get, and a warning when
    some patient is predicted by an average of checkpoints (`averaged`) that chose
    differently, so that the average falls back to lcc."""
    if requested != "checkpoint":
        return f"post-processing: {requested} (--postprocess {requested}, for every checkpoint)"
    alone = sorted({postprocessing_name(m.postprocessing) for m in models})
    if not any(m.postprocessing_chosen for m in models):
        line = (
            "post-processing: lcc (no choice saved in the checkpoint: an unfinished run, or an older one; "
            "`train.py --choose-postprocessing CKPT` makes one)"
        )
    else:
        line = f"post-processing: {', '.join(alone)} (the checkpoint's choice; lcc where a checkpoint has none)"
    if mode == "folds" and len(alone) > 1:
        line = f"post-processing: each fold's own choice for its test patients ({', '.join(alone)})"
    _, warning = postprocessing_for(models, requested)
    if averaged and warning:
        line += f"\nWARNING: {warning}" + (" (the patients that are no fold's test patient)" if mode == "folds" else "")
    return line


def make_protocol(args: argparse.Namespace, models: Sequence[LoadedModel], mode: str, seconds: float) -> dict:
    """What was scored how: checkpoints, their splits, post-processing and metric conventions."""
    return {
        "checkpoints": [str(m.path) for m in models],
        "mode": mode,
        "patients": args.patients,
        "roles": "train/val/test from each checkpoint's split; unseen = in none of its lists",
        "headline": "pooled over test and unseen patients; when none was scored, over the others, marked biased "
        "(summary.json headline.biased and headline.note)",
        "splits": [m.split for m in models],
        "threshold": args.threshold,
        "lcc": args.postprocess == "lcc" or (args.postprocess == "checkpoint" and all_lcc(models)),
        "tta": args.tta,
        "backend": args.backend,
        "precision": precision_text(AMP_DTYPES[args.precision], args.backend),
        "post_processing": "probabilities resampled to the native grid (bilinear), then threshold, then the 3-D "
        "component filter of `postprocessing` (lcc: largest only; min_share s: components of at least s of the "
        "largest; none: all)",
        "postprocessing": postprocessing_protocol(models, args.postprocess, mode == "folds"),
        "space": "native (input TIFF or NIfTI grid), first/last slice of each patient excluded",
        "hd95": "MONAI: 6-neighbour surface, max of the two directed 95th percentiles, NaN if a mask is empty",
        "hd95_units": "mm where the voxel spacing is known (NIfTI header, or --spacing for TIFF), else voxels "
        "(slice spacing counted as 1 pixel); see units",
        "spacing": args.spacing and {"row_mm": args.spacing[0], "col_mm": args.spacing[1], "slice_mm": args.spacing[2]},
        "volumes": "gt_volume, pred_volume over the kept slices (mm3 with a spacing, else voxels); "
        "volume_error = (pred - gt) / gt, empty for an empty truth",
        "lesion_wise": "BraTS 2023 (rachitsaluja/BraTS-2023-Metrics): lesions = 26-connected components of the "
        "truth dilated 3 times with the 18-neighbour structure; detected when a predicted voxel lies in the "
        "dilated lesion; predicted 26-connected components touching none are false positives",
        "min_lesion_volume": args.min_lesion_volume,
        "seconds": round(seconds, 2),
    }


def all_lcc(models: Sequence[LoadedModel]) -> bool:
    """Whether every checkpoint's post-processing is the largest component (`lcc`)."""
    return all(m.postprocessing == LCC for m in models)


def run(args: argparse.Namespace) -> dict:
    """Predict, write every output (metrics.csv row by row, summary.json even when patients
    fail), return the summary."""
    check_output_dirs(args)
    device = resolve_device(args.device)
    args.backend, amp_dtype = resolve_inference(args.backend, args.amp, device)
    args.precision = amp_name(amp_dtype)
    for path in args.model_path:
        if not Path(path).exists():
            raise CheckpointError(missing_checkpoint(path, args.data_dir))
    models = [load_model(path, device) for path in args.model_path]
    folds = are_folds(models)
    if not folds:
        check_image_sizes(models)
    patients = with_spacing(discover_inputs(args.data_dir), args.spacing)
    args.patients = args.patients or default_selection(models, [p.patient_id for p in patients])
    wanted = requested_patients(args.patients, models, folds)
    patients = select_requested(patients, args.patients, wanted, args.data_dir)
    ids = [p.patient_id for p in patients]  # one warning per checkpoint trained on phantoms only, if others are given
    model_warnings = [w for m in models if (w := warn_if_phantom_trained(m.path, m.split, ids, stacklevel=1))]
    if args.backend == "onnxruntime":
        models = [with_onnxruntime(m) for m in models]
    elif args.backend == "openvino":
        models = [with_openvino(m, amp_dtype) for m in models]
    out_dir = create_output_dirs(args)
    mode = "folds" if folds else ("ensemble" if len(models) > 1 else "single")
    print(
        f"{len(patients)} patient(s) ({' '.join(args.patients)}), {len(models)} checkpoint(s) ({mode}), "
        f"device {device}, backend {args.backend}, precision {precision_text(amp_dtype, args.backend)}"
    )
    averaged = any(len(assign(p.patient_id, models, folds)[0]) > 1 for p in patients)
    print(postprocessing_line(models, args.postprocess, mode, averaged))

    table = out_dir / "metrics.csv"
    start_table(table)
    rows = []
    start = time.perf_counter()
    try:
        for patient in tqdm(patients, desc="predict", unit="patient", leave=False, disable=None):
            rows.append(process_patient(patient, models, folds, device, args, out_dir))
            append_row(table, rows[-1])
    except KeyboardInterrupt:
        raise Interrupted(len(rows), len(patients), table) from None
    seconds = time.perf_counter() - start  # the patients' prediction, as the protocol records it

    summary = summarize(rows, make_protocol(args, models, mode, seconds))
    summary["warnings"] = model_warnings  # what the run warned of about its models (report.html shows them)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    dice = [r for r in rows if r.get("dice") is not None]
    if dice:
        plot_dice_distribution(dice, args.figure_path)
    if not args.no_report:
        write_report(rows, summary, out_dir, csv_columns(), args.figure_path if dice else None)
    print(
        f"wrote {out_dir}/metrics.csv, summary.json, masks/"
        + ("" if args.no_overlays else ", overlays/")
        + (f" and {args.figure_path}" if dice else "")
        + f" in {time.perf_counter() - STARTED:.1f} s (the whole run; predicting the patients took {seconds:.1f} s)"
    )
    print_table(rows, summary)
    if not args.no_report:
        print(f"report: open {out_dir / 'report.html'} in a browser (works offline)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    one_line_warnings()
    try:
        validate_args(args)
        summary = run(args)
    except (DataError, CheckpointError, UsageError) as error:
        sys.exit(f"error: {error}")
    except Interrupted as stop:
        print(
            f"interrupted after {stop.finished} of {stop.total} patient(s): their rows are in {stop.table} and "
            "their masks in masks/; summary.json and the report were not written; the same command predicts them all",
            file=sys.stderr,
        )
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted before any patient was predicted: no output was written", file=sys.stderr)
        sys.exit(130)
    failed = summary["failed_patients"]
    if failed:
        listing = "\n".join(f"  {patient}: {error}" for patient, error in failed.items())
        sys.exit(f"error: {len(failed)} patient(s) failed (recorded in metrics.csv and summary.json):\n{listing}")
    return summary


if __name__ == "__main__":
    main()
