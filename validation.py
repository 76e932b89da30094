"""Per-patient validation of the model being trained, in two parts: on the device
(`validation_masks`: the run's loss on the logits, the thresholded mask) and on the host
(`score_patients`: the 3-D component step and Dice in preprocessed space), then
`summarize_validation` (loss, Dice mean and median)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import dataset
import distributed
from inference import context_slices_of, predict_logits
from metrics import dice_score
from postprocessing import largest_connected_component


@dataclass
class ValidationVolume:
    """A validation patient for `validation_masks`: its preprocessed images (S, 3, H, W) and
    masks (S, H, W), as tensors kept on the training device between epochs when the
    training set is there too (`validation_inputs`), else as the host arrays."""

    patient_id: str
    images: torch.Tensor | np.ndarray
    masks: torch.Tensor


def validation_inputs(volumes: list[dataset.Volume], device: torch.device, placement: str) -> list[ValidationVolume]:
    """The validation volumes, copied to `device` once for the whole run when `placement` is
    "device" (CUDA: no copy from the disk cache each epoch), else read from the host."""
    on_device = placement == "device"
    inputs = []
    for volume in volumes:
        images = torch.from_numpy(np.array(volume.images)).to(device) if on_device else volume.images
        masks = torch.from_numpy(np.array(volume.masks)).to(device if on_device else "cpu")
        inputs.append(ValidationVolume(volume.patient_id, images, masks))
    return inputs


@torch.no_grad()
def validation_masks(
    model: nn.Module,
    volumes: list[ValidationVolume],
    runtime: distributed.Runtime,
    batch_size: int,
    criterion: nn.Module,
) -> list[dict]:
    """The device part of validation for this rank's share of the patients (every
    world_size-th): per patient the loss (`criterion`, the training loss, on the logits,
    averaged over slices) and the thresholded mask (sigmoid(logits) >= 0.5, as predict.py
    thresholds probabilities), computed on the device; only the mask (bool (S, H, W)) and
    the loss come to the host, one transfer each per patient. `score_patients` does the
    rest (the 3-D component step and Dice) on the host."""
    context = context_slices_of(model.config["in_channels"], "model")
    parts = []
    for volume in volumes[runtime.rank :: runtime.world_size]:
        amp = runtime.amp_dtype
        logits = predict_logits(model, volume.images, runtime.device, batch_size, amp_dtype=amp, context_slices=context)
        truth = volume.masks.to(logits.device)
        loss = criterion(logits[:, None], truth[:, None].float())
        mask = torch.sigmoid(logits) >= 0.5
        parts.append({"patient": volume.patient_id, "loss": loss, "slices": len(logits), "mask": mask})
    return [{**part, "loss": part["loss"].item(), "mask": part["mask"].cpu().numpy()} for part in parts]


def score_patients(parts: list[dict], truths: dict[str, np.ndarray], lcc: bool, keep_predictions: bool) -> list[dict]:
    """The host part of validation: each patient's thresholded mask after the 3-D largest
    connected component step (`lcc`; all components otherwise) and its Dice with the truth
    (`truths`: patient -> (S, H, W) mask), in preprocessed space. The mask is kept only with
    `keep_predictions` (for overlays)."""
    scored = []
    for part in parts:
        prediction = largest_connected_component(part["mask"]) if lcc else part["mask"]
        dice = dice_score(prediction, truths[part["patient"]])
        kept = prediction if keep_predictions else None
        scored.append(
            {
                "patient": part["patient"],
                "loss": part["loss"],
                "slices": part["slices"],
                "dice": dice,
                "prediction": kept,
            }
        )
    return scored


def summarize_validation(results: list[dict]) -> dict:
    """Loss (slice-weighted mean), Dice mean and median over patients, per-patient Dice and
    the kept predictions, from `score_patients`' records of all ranks."""
    results = sorted(results, key=lambda r: r["patient"])
    dice = np.array([r["dice"] for r in results])
    slices = sum(r["slices"] for r in results)
    return {
        "loss": sum(r["loss"] * r["slices"] for r in results) / slices,
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "dice": {r["patient"]: r["dice"] for r in results},
        "predictions": {r["patient"]: r["prediction"] for r in results if r["prediction"] is not None},
    }
