"""Choosing a checkpoint's post-processing on its validation patients: one forward pass per
patient, every candidate scored on the native grid, the choice saved in the checkpoint and
in args.json beside it (`train.py` at the end of a run, `train.py --choose-postprocessing`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_checkpoint, require_training_checkpoint, save_checkpoint
from dataset import discover_inputs, load_volume, read_volume
from inference import LoadedModel, inference_dtype, load_model, predict_volume
from patients import DataError, Patient
from postprocessing import candidate_dice, check_postprocessing, choose_postprocessing, postprocessing_name
from preprocessing import restore_geometry
from utils import atomic_write_bytes


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
    amp = inference_dtype(device)  # as predict.py runs by default
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


def ensure_postprocessing_choice(args: argparse.Namespace, device: torch.device) -> dict | None:
    """At the end of a finished run: choose best_model.pt's post-processing unless it holds a
    choice already (a best_model.pt written in this run never does). None when there is no
    best_model.pt."""
    path = Path(args.checkpoint_dir) / "best_model.pt"
    if not path.is_file():
        return None
    if "postprocessing" in load_checkpoint(path):
        return None
    cache_dir = None if args.no_cache else args.cache_dir
    return record_postprocessing_choice(path, args.data_dir, device, cache_dir, args.batch_size * 2)


def record_postprocessing_choice(
    path: str | Path, data_dir: str | Path, device: torch.device, cache_dir: str | Path | None, batch_size: int = 32
) -> dict:
    """Choose the post-processing of the checkpoint at `path` on its validation patients only
    (read from `data_dir`; no other patient is read): the Dice of every candidate of
    `postprocessing.POSTPROCESSING_CANDIDATES` on the native grid, one forward pass per patient
    (`postprocessing_choice.score_postprocessing`), the best mean wins, ties go to the largest component
    (`postprocessing.choose_postprocessing`). Prints the table, saves the record in the checkpoint
    (atomically) and in args.json beside it, and returns the selection record. Raises
    CheckpointError (no split, no validation patient) or DataError (patients missing)."""
    path = Path(path)
    loaded = load_model(path, device)
    val_ids = list((loaded.split or {}).get("val") or [])
    if not val_ids:
        raise CheckpointError(f"{path}: has no validation patients in its split; the post-processing choice needs them")
    found = {p.patient_id: p for p in discover_inputs(data_dir)}
    missing = [i for i in val_ids if i not in found]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{path}: {len(missing)} of its {len(val_ids)} validation patients are not in --data-dir {data_dir} "
            f"({listed}); pass the data folder the run was trained on"
        )
    scores = score_postprocessing(loaded, [found[i] for i in val_ids], device, cache_dir, batch_size)
    record, table = choose_postprocessing(scores)
    epoch = load_checkpoint(path).get("epoch")
    selection = {
        "chosen": postprocessing_name(record),
        "role": "val",
        "patients": val_ids,
        "epoch": epoch,
        "grid": "native (as predict.py scores)",
        "threshold": 0.5,
        "rule": "best mean Dice over the validation patients; ties go to lcc (nnU-Net's determine_postprocessing)",
        "table": table,
        "dice": scores,
    }
    save_postprocessing_choice(path, record, selection)
    saved_in = [path.name]
    args_json = path.parent / "args.json"
    if args_json.is_file():
        try:
            config = json.loads(args_json.read_text())
        except (OSError, ValueError) as error:
            print(f"note: {args_json} is not readable JSON ({error}); the choice is saved in {path.name} only")
        else:
            config |= {"postprocessing": record, "postprocessing_selection": selection}
            atomic_write_bytes(json.dumps(config, indent=2).encode(), args_json)
            saved_in.append(args_json.name)
    print_postprocessing_table(path, selection, " and ".join(saved_in))
    return selection


def print_postprocessing_table(path: Path, selection: dict, saved_in: str) -> None:
    """The validation table of the choice: candidate, mean and median Dice, the chosen one marked."""
    count = len(selection["patients"])
    print(
        f"\npost-processing of {path} (epoch {selection['epoch']}), chosen on its {count} validation patient(s), "
        "native grid, threshold 0.5:"
    )
    print(f"  {'candidate':<16}{'Dice mean':>10}{'median':>9}")
    for row in selection["table"]:
        mark = "  <- chosen" if row["candidate"] == selection["chosen"] else ""
        print(f"  {row['candidate']:<16}{row['mean']:>10.4f}{row['median']:>9.4f}{mark}")
    print(f"chosen: {selection['chosen']} (best mean; ties go to lcc), saved in {saved_in}", flush=True)
