"""Performance benchmark on a phantom data set written to a temp dir, the ablation of
training-recipe candidates on the hard phantom, and the evidence for the post-processing choice.

    python bench.py speed [--device cpu|cuda] [--image-size 256] [--quick] [--json PATH]
    python bench.py ablation [--seeds 0 1 2] [--candidates NAME ...] [--output ablation.md]
    python bench.py report [--bench] [--output docs/results.md]   (regenerates docs/results.md, figures/)
    python bench.py postprocessing [--output docs/postprocessing.md]  (regenerates docs/postprocessing.md)

Measures, side by side: preprocessing per patient (cold and warm cache), augmentation per
slice (ours, batched on the device, against per-sample skimage rescale + rotate), training
throughput (a plain eager fp32 loop against the path train.py runs), inference per patient,
and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import train
from augmentations import BatchAugmentation
from dataset import (
    MRISegmentationDataset,
    ResidentSlices,
    discover_patients,
    load_volume,
    load_volumes,
    make_synthetic_dataset,
    read_mask,
    read_volume,
)
from inference import (
    POSTPROCESSING_CANDIDATES,
    autocast_dtype,
    binarize,
    candidate_dice,
    load_model,
    postprocessing_name,
    predict_volume,
    score_postprocessing,
)
from losses import SoftDiceLoss, build_loss
from network import UNetModel
from report import screenshot as take_screenshot
from train import Runtime, train_one_epoch
from utils import CLIParser, HelpFormatter, atomic_write_bytes, resolve_device, restore_geometry, shared_flags

ROOT = Path(__file__).resolve().parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preprocessing(patients, image_size: int, cache_dir: Path) -> dict:
    """Seconds per patient: cold (read TIFFs, preprocess, write cache) and warm (mmap read)."""
    cold, warm = [], []
    for patient in patients:
        start = time.perf_counter()
        load_volume(patient, image_size, cache_dir)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        volume = load_volume(patient, image_size, cache_dir)
        float(np.asarray(volume.images, dtype=np.float32).sum())  # touch every byte
        warm.append(time.perf_counter() - start)
    slices = np.mean([len(p.kept) for p in patients])
    return {
        "cold_s_per_patient": float(np.mean(cold)),
        "warm_s_per_patient": float(np.mean(warm)),
        "mean_slices_per_patient": float(slices),
    }


def skimage_augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The per-sample baseline: skimage rescale + rotate (+ flip), crop/pad back to size."""
    from skimage.transform import rescale, rotate

    size = image.shape[-1]
    scale, angle = rng.uniform(0.95, 1.05), rng.uniform(-15, 15)
    image = rescale(image, scale, order=1, channel_axis=0, anti_aliasing=False)
    mask = rescale(mask, scale, order=0, anti_aliasing=False)
    image = np.stack([rotate(c, angle, order=1, mode="edge") for c in image])
    mask = rotate(mask, angle, order=0)
    pad = max(0, size - image.shape[-1])
    image = np.pad(image, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)), mode="edge")
    mask = np.pad(mask, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    start = (image.shape[-1] - size) // 2
    image, mask = image[:, start : start + size, start : start + size], mask[start : start + size, start : start + size]
    if rng.random() < 0.5:
        image, mask = image[..., ::-1], mask[..., ::-1]
    return image, mask


def bench_augmentation(images: torch.Tensor, masks: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Milliseconds per slice for a batch: ours on `device` against the skimage baseline."""
    augment = BatchAugmentation(0.05, 15.0, 0.5, seed=0)
    x, m = images.to(device).float(), masks.to(device).float()
    augment(x, m)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        augment(x, m)
    synchronize(device)
    ours = (time.perf_counter() - start) / (repeats * len(x))
    rng = np.random.default_rng(0)
    np_images, np_masks = images.float().numpy(), masks[:, 0].numpy()
    start = time.perf_counter()
    for image, mask in zip(np_images, np_masks):
        skimage_augment(image, mask, rng)
    baseline = (time.perf_counter() - start) / len(np_images)
    return {"ours_ms_per_slice": 1e3 * ours, "skimage_ms_per_slice": 1e3 * baseline, "speedup": baseline / ours}


def plain_training_rate(
    data: ResidentSlices, base_filters: int, batch_size: int, steps: int, device: torch.device
) -> float:
    """Slices/s of the simplest loop: eager fp32, contiguous memory, no augmentation."""
    torch.manual_seed(0)
    model = UNetModel(base_filters=base_filters).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = SoftDiceLoss()
    generator = torch.Generator().manual_seed(0)
    batches = data.batches(steps + 1, batch_size, generator)

    def step(images, masks):
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    step(*next(batches))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for images, masks in batches:
        loss = step(images, masks)
    float(loss.detach())
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def training_loss() -> torch.nn.Module:
    """The loss train.py trains with by default (`--loss dice`, from logits: train_one_epoch
    hands the model's logits to the loss)."""
    return build_loss(train.get_args_parser().get_default("loss"), from_logits=True)


def configured_training_rate(
    data: ResidentSlices,
    base_filters: int,
    batch_size: int,
    steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    compile_model: bool,
) -> float:
    """Slices/s of train.py's own `train_one_epoch` (channels_last, AMP, on-device augmentation)."""
    torch.manual_seed(0)
    raw = UNetModel(base_filters=base_filters).to(device).to(memory_format=torch.channels_last)
    model = torch.compile(raw) if compile_model else raw
    optimizer = torch.optim.Adam(raw.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    runtime = Runtime(device, amp_dtype=amp_dtype)
    args = (optimizer, scaler, training_loss(), BatchAugmentation(seed=0), runtime)
    warmup = 3 if compile_model else 1
    train_one_epoch(model, data, *args, warmup, batch_size, torch.Generator().manual_seed(0), 0, 10**9, progress=False)
    synchronize(device)
    stats = train_one_epoch(
        model, data, *args, steps, batch_size, torch.Generator().manual_seed(1), 1, 10**9, progress=False
    )
    return stats["slices_per_s"]


def bench_inference(volumes, base_filters: int, device: torch.device) -> dict:
    """Seconds per patient: forward pass + threshold + LCC + inverse geometry."""
    model = UNetModel(base_filters=base_filters).to(device).to(memory_format=torch.channels_last).eval()
    predict_volume(model, volumes[0].images[:2], device)
    times = []
    for volume in volumes:
        synchronize(device)
        start = time.perf_counter()
        probs = predict_volume(model, volume.images, device, 32, amp_dtype=autocast_dtype(device))
        restore_geometry(binarize(probs).astype(np.uint8), volume.geometry)
        times.append(time.perf_counter() - start)
    return {"s_per_patient": float(np.mean(times)), "slices_per_s": sum(len(v.images) for v in volumes) / sum(times)}


def bench_cpu_backends(volumes, base_filters: int, image_size: int, max_slices: int, batch_size: int = 32) -> dict:
    """CPU inference slices/s of the network alone, side by side: torch (eager fp32,
    channels_last, as predict.py runs it) and onnxruntime (the graph export.py writes),
    the same weights and the same preprocessed slices (at most `max_slices`)."""
    from export import OnnxRuntimeModel, export_onnx

    cpu = torch.device("cpu")
    model = UNetModel(base_filters=base_filters).eval()
    networks = {
        "torch": model.to(memory_format=torch.channels_last),
        "onnxruntime": OnnxRuntimeModel(export_onnx(model, image_size)),
    }
    images = np.concatenate([np.asarray(v.images) for v in volumes])[:max_slices]  # (N, 3, S, S)
    result, probabilities = {"slices": len(images), "batch_size": batch_size}, {}
    for name, network in networks.items():
        predict_volume(network, images[:batch_size], cpu, batch_size)  # warm-up
        start = time.perf_counter()
        probabilities[name] = predict_volume(network, images, cpu, batch_size)
        result[f"{name}_slices_per_s"] = len(images) / (time.perf_counter() - start)
    result["onnxruntime_speedup"] = result["onnxruntime_slices_per_s"] / result["torch_slices_per_s"]
    result["max_abs_difference"] = float(np.abs(probabilities["torch"] - probabilities["onnxruntime"]).max())
    return result


# The Kaggle LGG set (kaggle_3m): 110 patients, 3,929 slices; a default run validates 10 of them.
LGG_PATIENTS, LGG_SLICES, DEFAULT_VAL_PATIENTS, DEFAULT_EPOCHS = 110, 3929, 10, 100


def timed_training(flags: list[str]) -> dict:
    """train.py's own `main` in this process (its printed lines swallowed): wall seconds, and
    the parts of each epoch that `train.finish_epoch` measured ("step", "val", "val_device",
    "ckpt", "pics", "outside", "waited")."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.main(flags)
    return {"wall_s": time.perf_counter() - start, "epochs": result["epoch_parts"], "split": result["split"]}


def median_part(epochs: list[dict], key: str) -> float:
    """The median of one part over the epochs after the first (which warms up kernels and caches)."""
    return float(np.median([e[key] for e in (epochs[1:] or epochs)]))


def project_default_run(step_rate: float, parts: dict, val_slices: int, batch_size: int) -> dict:
    """The wall time of a default run (100 epochs, 16 slices per step, 10 validation patients)
    on an LGG-sized set, from the measured training-step rate (slices/s) and the measured
    medians of one epoch's other parts (`parts`, measured with `val_slices` validation
    slices): the steps of one pass over the training slices, validation scaled by the
    number of validation slices, the rest as measured; the training thread waits when the
    worker's share of an epoch (the host part of validation, writing, pictures) outlasts
    the steps. The pictures part counts 200 overlays every 10th epoch (`--vis-frequency`)."""
    train_slices = LGG_SLICES * (LGG_PATIENTS - DEFAULT_VAL_PATIENTS) / LGG_PATIENTS
    step_s = math.ceil(train_slices / batch_size) * batch_size / step_rate
    scale = LGG_SLICES * DEFAULT_VAL_PATIENTS / LGG_PATIENTS / val_slices
    outside_s = parts["outside"] - parts["val_device"] + parts["val_device"] * scale
    worker_s = (parts["val"] - parts["val_device"]) * scale + parts["ckpt_worker"] + parts["pics"]
    epoch_s = step_s + outside_s + max(0.0, worker_s - step_s)
    return {
        "step_s": step_s,
        "outside_s": outside_s,
        "worker_s": worker_s,
        "epoch_s": epoch_s,
        "outside_share": (epoch_s - step_s) / epoch_s,
        "run_s": DEFAULT_EPOCHS * epoch_s,
    }


def bench_epochs(device: torch.device, args: argparse.Namespace, step_rate: float, quick: bool, tmp: Path) -> dict:
    """Whole epochs of train.py, with what surrounds the steps: (1) a run at the benchmark's
    image size and width, whose epoch parts project a default LGG-sized run
    (`project_default_run`); (2) the cost of overlays: the same small run (64 px, 16
    filters, 12 validation patients) drawing no overlays and 200 every epoch, wall time
    against wall time (the goal on a 2-core CPU: at most 1.3x)."""
    common = ["--device", str(device), "--no-cache", "--num-workers", "0", "--log-dir", str(tmp / "tb")]
    data = tmp / "epochs_3m"
    patients = 4 if quick else 12
    make_synthetic_dataset(data, patients, seed=2, image_size=args.image_size, slices=(20, 30))
    val_patients = patients - 2
    size_flags = ["--image-size", str(args.image_size), "--base-filters", str(args.base_filters)]
    steps = 2 if quick else 20
    flags = [
        *common,
        "--data-dir",
        str(data),
        *size_flags,
        "--batch-size",
        str(args.batch_size),
        "--vis-frequency",
        "0",
    ]
    flags += ["--epochs", "3", "--steps-per-epoch", str(steps), "--val-patients", str(val_patients)]
    measured = timed_training([*flags, "--checkpoint-dir", str(tmp / "epochs_ckpt")])
    epochs = measured["epochs"]
    val_ids = set(measured["split"]["val"])
    val_slices = sum(len(p.kept) for p in discover_patients(data) if p.patient_id in val_ids)
    parts = {
        key: median_part(epochs, key) for key in ("step", "val", "val_device", "ckpt", "ckpt_copy", "pics", "outside")
    }
    parts["ckpt_worker"] = parts["ckpt"] - parts["ckpt_copy"]
    result = {"epoch_parts": parts, "val_slices": val_slices, "steps": steps}
    result["projection"] = project_default_run(step_rate, parts, val_slices, 16)

    small = tmp / "overlays_3m"
    make_synthetic_dataset(small, 16, seed=3, image_size=64, slices=(30, 40))
    small_flags = [
        *common,
        "--data-dir",
        str(small),
        "--image-size",
        "64",
        "--base-filters",
        "16",
        "--val-patients",
        "12",
    ]
    small_flags += ["--batch-size", "16", "--epochs", "3", "--steps-per-epoch", "10" if quick else "40"]
    without = timed_training([*small_flags, "--vis-frequency", "0", "--checkpoint-dir", str(tmp / "plain")])
    drawn = timed_training(
        [*small_flags, "--vis-frequency", "1", "--n-vis-images", "200", "--checkpoint-dir", str(tmp / "vis")]
    )
    result["overlays"] = {
        "wall_without_s": without["wall_s"],
        "wall_with_s": drawn["wall_s"],
        "ratio": drawn["wall_s"] / without["wall_s"],
        "pics_s_per_epoch": median_part(drawn["epochs"], "pics"),
        "outside_share_with": median_part(drawn["epochs"], "outside") / median_part(drawn["epochs"], "step"),
    }
    return result


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=256, help="preprocessed slice size")
    parser.add_argument("--base-filters", type=int, default=32, help="U-Net width")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="training batch (default: 16; 8 with --quick on CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps (default: 3 quick, 20 full; x10 on CUDA)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the configured path with torch.compile")
    parser.add_argument(
        "--quick", action="store_true", help="small phantom and few steps (under 2 minutes on 2 CPU cores)"
    )
    parser.add_argument("--json", default=None, help="write the results here")


def speed(args: argparse.Namespace) -> dict:
    """`bench.py speed`: time each stage on a phantom written to a temp folder; print the table."""
    device = resolve_device(args.device)
    on_cpu = device.type == "cpu"
    steps = args.steps or (3 if args.quick else 20) * (1 if on_cpu else 10)
    args.batch_size = args.batch_size or (8 if args.quick and on_cpu else 16)
    n_patients, slices = (3, (16, 20)) if args.quick else (12, (20, 44))
    results: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "image_size": args.image_size,
        "base_filters": args.base_filters,
        "batch_size": args.batch_size,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kaggle_3m"
        make_synthetic_dataset(root, n_patients, seed=0, image_size=256, slices=slices)
        patients = discover_patients(root)
        results["preprocessing"] = bench_preprocessing(patients, args.image_size, Path(tmp) / "cache")
        volumes = load_volumes(patients, args.image_size, Path(tmp) / "cache")
        dataset = MRISegmentationDataset(volumes)
        data = ResidentSlices(dataset, device)
        results["training_slices"] = len(dataset)

        batch = data.sampler(1, 16, torch.Generator().manual_seed(0))
        results["augmentation"] = bench_augmentation(
            data.images[batch].cpu(), data.masks[batch].cpu(), device, repeats=3 if args.quick else 10
        )
        amp = autocast_dtype(device)
        with train.determinism(False, device):  # train.py's cuDNN settings (cudnn.benchmark on CUDA)
            plain = plain_training_rate(data, args.base_filters, args.batch_size, steps, device)
            configured = configured_training_rate(data, args.base_filters, args.batch_size, steps, device, amp, False)
            results["training"] = {
                "plain_fp32_slices_per_s": plain,
                "configured_slices_per_s": configured,
                "configured_amp": str(amp).replace("torch.", "") if amp else "off",
                "speedup": configured / plain,
            }
            if args.compile:
                compiled = configured_training_rate(data, args.base_filters, args.batch_size, steps, device, amp, True)
                results["training"].update({"compiled_slices_per_s": compiled, "compiled_speedup": compiled / plain})
        results["inference"] = bench_inference(volumes, args.base_filters, device)
        results["epochs"] = bench_epochs(device, args, configured, args.quick, Path(tmp))
        results["cpu_backends"] = bench_cpu_backends(
            volumes, args.base_filters, args.image_size, 32 if args.quick else 128
        )
    results["peak_ram_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def print_table(r: dict) -> None:
    p, a, t, i = r["preprocessing"], r["augmentation"], r["training"], r["inference"]
    rows = [
        (
            "preprocessing, cold (s/patient)",
            f"{p['cold_s_per_patient']:.3f}",
            f"{p['mean_slices_per_patient']:.0f} slices",
        ),
        ("preprocessing, warm cache (s/patient)", f"{p['warm_s_per_patient']:.4f}", ""),
        ("augmentation, ours (ms/slice)", f"{a['ours_ms_per_slice']:.2f}", f"{a['speedup']:.1f}x faster"),
        ("augmentation, skimage (ms/slice)", f"{a['skimage_ms_per_slice']:.2f}", "baseline"),
        ("training, plain eager fp32 (slices/s)", f"{t['plain_fp32_slices_per_s']:.1f}", "baseline"),
        (
            f"training, train.py path, amp {t['configured_amp']} (slices/s)",
            f"{t['configured_slices_per_s']:.1f}",
            f"{t['speedup']:.2f}x",
        ),
    ]
    if "compiled_slices_per_s" in t:
        rows.append(
            (
                "training, + torch.compile (slices/s)",
                f"{t['compiled_slices_per_s']:.1f}",
                f"{t['compiled_speedup']:.2f}x",
            )
        )
    rows += [
        ("inference incl. LCC + inverse (s/patient)", f"{i['s_per_patient']:.3f}", f"{i['slices_per_s']:.1f} slices/s"),
        ("peak RAM (MiB)", f"{r['peak_ram_mib']:.0f}", ""),
    ]
    if "cpu_backends" in r:
        b = r["cpu_backends"]
        rows[-1:-1] = [
            ("CPU inference, torch (slices/s)", f"{b['torch_slices_per_s']:.1f}", f"{b['slices']} slices"),
            (
                "CPU inference, onnxruntime (slices/s)",
                f"{b['onnxruntime_slices_per_s']:.1f}",
                f"{b['onnxruntime_speedup']:.2f}x, max |diff| {b['max_abs_difference']:.1e}",
            ),
        ]
    if "peak_gpu_mib" in r:
        rows.append(("peak GPU memory (MiB)", f"{r['peak_gpu_mib']:.0f}", ""))
    if "epochs" in r:
        rows += epoch_rows(r["epochs"])
    print(
        f"\n{r['device']} {r.get('gpu', '')}, torch {r['torch']}, {r['image_size']}x{r['image_size']}, "
        f"{r['base_filters']} filters, batch {r['batch_size']}, {r['threads']} threads"
    )
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


def epoch_rows(e: dict) -> list[tuple[str, str, str]]:
    """Rows of the whole-epoch measurements (`bench_epochs`)."""
    parts, projection, overlays = e["epoch_parts"], e["projection"], e["overlays"]
    share = parts["outside"] / (parts["step"] + parts["outside"])
    return [
        (
            f"epoch of {e['steps']} steps: step/val/ckpt/pics (s)",
            "/".join(f"{parts[k]:.2f}" for k in ("step", "val", "ckpt", "pics")),
            f"{share:.0%} of the wall time outside the step, {e['val_slices']} validation slices",
        ),
        (
            "default 100-epoch run, LGG-sized (min)",
            f"{projection['run_s'] / 60:.1f}",
            f"projected: {projection['step_s']:.1f} s steps + {projection['epoch_s'] - projection['step_s']:.1f} s "
            f"other per epoch ({projection['outside_share']:.0%} outside the step)",
        ),
        (
            "200 overlays every epoch (wall time ratio)",
            f"{overlays['ratio']:.2f}x",
            f"{overlays['wall_with_s']:.1f} s against {overlays['wall_without_s']:.1f} s (64 px, 3 epochs)",
        ),
    ]


# ---------------------------------------------------------------------------- ablation


@dataclass(frozen=True)
class Candidate:
    """One training recipe: flags added to the shared budget for train.py and predict.py."""

    name: str
    train_flags: tuple[str, ...] = ()
    predict_flags: tuple[str, ...] = ()
    note: str = ""
    reuse: str | None = None  # predict with this candidate's checkpoints instead of training

    @property
    def folder(self) -> str:
        return (self.reuse or self.name).replace(" ", "_").replace("/", "-")


# Combinations, chosen from the single changes' first two seeds: dice+bce won clearly, flip
# TTA and foreground oversampling (the best sampling scheme of seed 0) looked promising, so
# both are measured on top of dice+bce.
DICE_BCE_FOREGROUND = ("--loss", "dice+bce", "--sampling", "foreground", "--lesion-fraction", "0.333")

# Each candidate changes one thing against today's recipe (issue 13); the last combines the
# winners. Flags that train.py does not know are reported as "not wired" instead of failing
# the whole ablation. "flip TTA" predicts with today's checkpoints (no training of its own).
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("today", note="pooled area weights + 10 % floor, soft Dice, crop normalisation"),
    Candidate("area floor x10", ("--sampling", "area", "--sampling-floor", "1.0")),
    Candidate("foreground 1/3", ("--sampling", "foreground", "--lesion-fraction", "0.333")),
    Candidate("patient-first", ("--sampling", "patient")),
    Candidate("dice+bce", ("--loss", "dice+bce")),
    Candidate("head normalisation", ("--norm-region", "head")),
    Candidate("context 1", ("--context-slices", "1")),
    Candidate("flip TTA", predict_flags=("--tta",), reuse="today"),
    Candidate("dice+bce + flip TTA", ("--loss", "dice+bce"), ("--tta",), reuse="dice+bce"),
    Candidate("dice+bce + foreground 1/3", DICE_BCE_FOREGROUND),
    Candidate(
        "dice+bce + foreground 1/3 + flip TTA", DICE_BCE_FOREGROUND, ("--tta",), reuse="dice+bce + foreground 1/3"
    ),
)

# The budget of the measurement: 10 epochs of 60 steps of 16 slices at 128 px.
ABLATION_BUDGET = (
    "--image-size 128 --base-filters 16 --lr 1e-3 --batch-size 16 --epochs 10 --steps-per-epoch 60 --val-patients 6"
)
QUICK_BUDGET = (
    "--image-size 32 --base-filters 4 --lr 1e-3 --batch-size 8 --epochs 2 --steps-per-epoch 2 --val-patients 2"
)


@dataclass
class AblationRun:
    candidate: Candidate
    seed: int
    dice_last: float = float("nan")
    dice_best: float = float("nan")
    fp_last: float = float("nan")  # predicted voxels in lesion-free slices, mean per test patient
    fp_best: float = float("nan")
    lesion_voxels: float = float("nan")  # true lesion voxels, mean per test patient
    seconds: float = float("nan")
    missing: list[str] = field(default_factory=list)
    reused: bool = False  # read back from an earlier ablation's results in --work-dir
    finished: float = float("nan")  # time.time() when the run ended (the result file's mtime)


def unknown_flags(flags: tuple[str, ...], known: set[str]) -> list[str]:
    """The option strings in `flags` that are not in `known`."""
    return [flag for flag in flags if flag.startswith("--") and flag not in known]


@functools.cache
def predict_flags() -> set[str]:
    """The flags predict.py defines, read from its --help (bench runs predict.py as a
    command, never imports it: a CLI does not import another CLI)."""
    result = subprocess.run(_local(["python", "predict.py", "--help"]), capture_output=True, text=True, check=True)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def run_predict(arguments: list[str], log: Path) -> dict:
    """Run `python predict.py ARGUMENTS` (its output in `log`) and return the summary.json
    it wrote. Raises ReportError naming the command when it fails."""
    run_timed(_local(["python", "predict.py", *arguments]), Path.cwd(), log)
    output_dir = Path(arguments[arguments.index("--output-dir") + 1])
    return json.loads((output_dir / "summary.json").read_text())


def false_positives_in_lesion_free_slices(test_dir: Path, masks_dir: Path) -> tuple[float, float]:
    """Mean per patient of (predicted voxels in slices whose truth is empty, true lesion
    voxels), over the kept slices of every patient in `test_dir`; predicted masks are
    predict.py's `<masks_dir>/<patient>/<patient>_<k>_mask.tif`."""
    fp, lesion = [], []
    for patient in discover_patients(test_dir):
        fp_patient, lesion_patient = 0, 0
        for item in patient.kept:
            truth = read_mask(item.mask)
            predicted = read_mask(masks_dir / patient.patient_id / item.mask.name)
            lesion_patient += int(truth.sum())
            fp_patient += 0 if truth.any() else int(predicted.sum())
        fp.append(fp_patient)
        lesion.append(lesion_patient)
    return float(np.mean(fp)), float(np.mean(lesion))


def train_candidate(
    flags: tuple[str, ...], seed: int, data_dir: Path, out: Path, work: Path, budget: str, device_flags: list[str]
) -> float:
    """Train into `out/ckpt` with `budget` + `flags`; seconds it took (0 if already trained)."""
    if (out / "ckpt" / "last.pt").is_file() and (out / "ckpt" / "best_model.pt").is_file():
        return 0.0
    start = time.perf_counter()
    train.main(
        ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "ckpt"), "--log-dir", str(out / "tb")]
        + ["--cache-dir", str(work / "cache"), "--seed", str(seed), "--vis-frequency", "0", "--num-workers", "2"]
        + ["--overwrite"]
        + shlex.split(budget)
        + list(flags)
        + device_flags
    )
    return time.perf_counter() - start


def run_candidate(
    candidate: Candidate,
    seed: int,
    data_dir: Path,
    test_dir: Path,
    work: Path,
    budget: str,
    device: str | None,
    reused_from: Candidate | None = None,
    backend: str | None = None,
) -> AblationRun:
    """Train with `budget` + the candidate's flags (or reuse the checkpoints of `reused_from`,
    training them if absent), then predict the unseen test patients with last.pt and
    best_model.pt. Returns the run's test Dice and false positives; a finished run's result
    is kept in `<work>/results/` and read back when the same candidate, seed and budget
    run again with the same --work-dir."""
    run = AblationRun(candidate, seed)
    train_known = set(train.get_args_parser()._option_string_actions)
    run.missing = unknown_flags(candidate.train_flags, train_known) + unknown_flags(
        candidate.predict_flags, predict_flags()
    )
    if run.missing:
        return run
    record = work / "results" / f"{candidate.name.replace(' ', '_').replace('/', '-')}_seed{seed}.json"
    key = {"budget": budget, "train": list(candidate.train_flags), "predict": list(candidate.predict_flags)}
    if backend:
        key["backend"] = backend
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        saved = json.loads(record.read_text())["result"]
        return AblationRun(candidate, seed, **saved, reused=True, finished=record.stat().st_mtime)
    out, tag = work / f"{candidate.folder}_seed{seed}", candidate.name.replace(" ", "_").replace("/", "-")
    device_flags = ["--device", device] if device else []
    trained_by = reused_from or candidate
    train_seconds = train_candidate(trained_by.train_flags, seed, data_dir, out, work, budget, device_flags)
    start = time.perf_counter()
    for which in ("last", "best"):
        checkpoint = out / "ckpt" / ("last.pt" if which == "last" else "best_model.pt")
        pred_dir = out / (f"test_{which}" if reused_from is None else f"test_{which}_{tag}")
        summary = run_predict(
            ["--model-path", str(checkpoint), "--data-dir", str(test_dir), "--patients", "all"]
            + ["--output-dir", str(pred_dir), "--figure-path", str(pred_dir / "dice.png"), "--no-overlays"]
            + ["--cache-dir", str(work / "cache"), "--num-workers", "2"]
            + list(candidate.predict_flags)
            + device_flags
            + (["--backend", backend] if backend else []),
            pred_dir.with_name(pred_dir.name + ".log"),
        )
        fp, lesion = false_positives_in_lesion_free_slices(test_dir, pred_dir / "masks")
        metrics = summary.get("headline", {}).get("metrics") or summary["metrics"]  # test + unseen when present
        setattr(run, f"dice_{which}", float(metrics["dice"]["mean"]))
        setattr(run, f"fp_{which}", fp)
        run.lesion_voxels = lesion
    # a reusing candidate (flip TTA) costs its predictions only: it trains nothing
    run.seconds = (train_seconds if reused_from is None else 0.0) + time.perf_counter() - start
    result = {k: getattr(run, k) for k in ("dice_last", "dice_best", "fp_last", "fp_best", "lesion_voxels", "seconds")}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "result": result}))
    run.finished = record.stat().st_mtime
    return run


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def ablation_table(runs: list[AblationRun]) -> str:
    """Markdown: one row per candidate, mean ± SD over seeds of the test Dice (last and best
    epoch), false-positive voxels per test patient in lesion-free slices (and as a share of
    the true lesion voxels) and minutes per run (train + both predictions)."""
    header = (
        "| candidate | flags | seeds | test Dice, last epoch | test Dice, best epoch "
        "| FP voxels in lesion-free slices per patient, last (best) | FP / lesion voxels, last | min per run |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for candidate in dict.fromkeys(r.candidate for r in runs):
        mine = [r for r in runs if r.candidate == candidate]
        flags = " ".join(candidate.train_flags + tuple(f"predict {f}" for f in candidate.predict_flags)) or "(none)"
        if mine[0].missing:
            rows.append(f"| {candidate.name} | `{flags}` | - | not wired: {', '.join(mine[0].missing)} | | | | |")
            continue
        seeds = ", ".join(str(r.seed) for r in mine)
        share = [r.fp_last / r.lesion_voxels for r in mine if r.lesion_voxels > 0]
        rows.append(
            f"| {candidate.name} | `{flags}` | {seeds} | {_mean_sd([r.dice_last for r in mine], 3)} "
            f"| {_mean_sd([r.dice_best for r in mine], 3)} | {_mean_sd([r.fp_last for r in mine], 0)} "
            f"({_mean_sd([r.fp_best for r in mine], 0)}) | {_mean_sd(share, 3) if share else '-'} "
            f"| {np.mean([r.seconds for r in mine]) / 60:.1f} |"
        )
    return header + "\n".join(rows) + "\n"


ABLATION_ABOUT = (
    "Train + predict each candidate recipe on the hard phantom over several seeds;\n"
    "write a Markdown table of test Dice (last and best epoch) and false positives."
)


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    names = [c.name for c in CANDIDATES]
    every = ", ".join(repr(name) for name in names)
    parser.add_argument("--candidates", nargs="+", default=None, metavar="NAME", help=f"default: all of {every}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--patients", type=int, default=30, help="hard-phantom training + validation patients")
    parser.add_argument("--test-patients", type=int, default=10, help="unseen hard-phantom test patients")
    parser.add_argument("--phantom-size", type=int, default=256, help="native slice size of the phantom (px)")
    parser.add_argument("--budget", default=ABLATION_BUDGET, help="train.py flags shared by every candidate")
    parser.add_argument(
        "--work-dir", default=None, help="keep data, checkpoints, predictions here (default: a temp dir)"
    )
    parser.add_argument("--output", default="ablation.md", help="Markdown table")
    parser.add_argument(
        "--backend", choices=("torch", "onnxruntime"), default=None, help="predict.py --backend (default: its own)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny phantom and budget: a smoke test, not evidence")


def ablation(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench.py ablation`: every candidate x seed, trained and scored on unseen test patients;
    `argv` is the sub-command's own arguments, quoted in the generated page."""
    names = [c.name for c in CANDIDATES]
    args.candidates = args.candidates or names
    unknown = sorted(set(args.candidates) - set(names))
    if unknown:
        sys.exit(f"error: --candidates {' '.join(unknown)}: unknown; choose from {', '.join(names)}")
    if args.quick:
        args.budget, args.patients, args.test_patients = QUICK_BUDGET, min(args.patients, 6), min(args.test_patients, 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        size, slices = (48, (12, 16)) if args.quick else (args.phantom_size, None)
        data_dir, test_dir = work / "hard_train", work / "hard_test"
        if not data_dir.exists():
            make_synthetic_dataset(data_dir, args.patients, 0, size, slices, difficulty="hard")
        if not test_dir.exists():
            make_synthetic_dataset(test_dir, args.test_patients, 1000, size, slices, difficulty="hard")
        by_name = {c.name: c for c in CANDIDATES}
        runs = [
            run_candidate(
                candidate,
                seed,
                data_dir,
                test_dir,
                work,
                args.budget,
                args.device,
                by_name.get(candidate.reuse),
                backend=args.backend,
            )
            for seed in args.seeds  # seed after seed: an interrupted ablation still covers every candidate
            for candidate in CANDIDATES
            if candidate.name in args.candidates
        ]
    table = ablation_table(runs)
    command = "python bench.py ablation " + " ".join(shlex.quote(a) for a in argv)
    reused = sum(r.reused for r in runs)
    done = [r for r in runs if np.isfinite(r.finished)]
    span = (max(r.finished for r in done) - min(r.finished - r.seconds for r in done)) / 60 if done else 0.0
    total = sum(r.seconds for r in runs if not r.missing and np.isfinite(r.seconds))
    wall = (
        f"runs spanning {span:.1f} min of wall time from the first start to the last finish ({reused} of them "
        "read back from --work-dir, where an earlier invocation of this command left them)"
        if reused
        else f"{(time.perf_counter() - start) / 60:.1f} min wall"
    )
    text = (
        f"Generated by `{command}`: {wall}; {total / 60:.1f} min of training + prediction over all runs"
        + f"; torch {torch.__version__}, device {args.device or 'default'}, {torch.get_num_threads()} threads. "
        f"Hard phantom at {size} px: {args.patients} training + validation patients (seed 0), "
        f"{args.test_patients} unseen test patients (seed 1000), scored with predict.py on the test patients "
        f"only; shared budget `{args.budget}`.\n\n" + table
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return {"runs": runs, "table": table}


# ------------------------------------------------------------------------------ report
# `python bench.py report`: regenerate the README's results from commands, not memory.

REPORT_HEADER = "<!-- generated by `python bench.py report`: do not edit by hand, rerun the command -->"


class ReportError(Exception):
    """A command of the report failed or did not produce what the report reads."""


def git_commit() -> str:
    """Short commit of the repository, with '+ uncommitted changes' when the tree is dirty."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_facts() -> dict:
    """CPU model, cores, load, OS, Python, torch and GPU of this machine, and the commit."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_timed(command: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    """Run `command` in `cwd`, stdout and stderr to `log`; (wall seconds, stdout).
    Raises ReportError with the command and the end of its output when it fails."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise ReportError(f"`{shlex.join(command)}` exited with {result.returncode} (full log: {log}):\n{tail}")
    return seconds, result.stdout


def printed_predict_command(train_stdout: str) -> list[str]:
    """The `python predict.py ...` command that `train.py --demo` prints as its next step."""
    for line in reversed(train_stdout.splitlines()):
        if "python predict.py" in line:
            return shlex.split(line[line.index("python predict.py") :])
    raise ReportError("train.py --demo did not print the predict.py command to run next ('python predict.py ...')")


def predict_paths(arguments: list[str]) -> argparse.Namespace:
    """`model_path`, `output_dir` and `figure_path` of predict.py arguments, with predict.py's
    defaults (read here, not by importing predict.py: a CLI does not import another CLI)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-path", nargs="+", default=["./checkpoints/best_model.pt"])
    parser.add_argument("--output-dir", default="./predictions")
    parser.add_argument("--figure-path", default=None)
    paths, _ = parser.parse_known_args(arguments)
    paths.figure_path = paths.figure_path or str(Path(paths.output_dir) / "dice_distribution.png")
    return paths


def validation_history(workdir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of every event file under `workdir`: {tag: {epoch: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history: dict[str, dict[int, float]] = {}
    for folder in sorted({path.parent for path in workdir.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            history.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    if "val/dice_mean" not in history:
        raise ReportError(f"no TensorBoard scalar val/dice_mean under {workdir}")
    return history


def demo_results(workdir: Path, predict_args: argparse.Namespace) -> dict:
    """What the demo run and its predict.py call produced: epochs, Dice, split sizes."""
    checkpoint = torch.load(workdir / predict_args.model_path[0], map_location="cpu", weights_only=True)
    history = validation_history(workdir)
    epochs = sorted(history["val/dice_mean"])
    summary = json.loads((workdir / predict_args.output_dir / "summary.json").read_text())
    return {
        "best_epoch": int(checkpoint["epoch"]),
        "epochs": len(epochs),
        "best": (history["val/dice_mean"][checkpoint["epoch"]], history["val/dice_median"][checkpoint["epoch"]]),
        "last": (history["val/dice_mean"][epochs[-1]], history["val/dice_median"][epochs[-1]]),
        "slices_per_s": float(np.median(list(history.get("time/slices_per_s", {0: float("nan")}).values()))),
        "split": {role: len(checkpoint["split"].get(role) or []) for role in ("train", "val", "test")},
        "image_size": checkpoint["preprocessing"]["image_size"],
        "base_filters": checkpoint["model_config"]["base_filters"],
        "summary": summary,
    }


def _dice_pair(block: dict | None) -> tuple[float, float] | None:
    """(mean, median) Dice of a summary.json block ({"metrics": {"dice": ...}} or {"dice": ...})."""
    dice = (block or {}).get("metrics", block or {}).get("dice")
    if not isinstance(dice, dict) or dice.get("mean") is None:
        return None
    return dice["mean"], dice["median"]


def copy_figures(workdir: Path, predict_args: argparse.Namespace, figures: Path) -> list[tuple[str, Path]]:
    """Copy the Dice chart and one overlay (middle slice of the lesion patient with the
    lowest Dice) into `figures`; [(caption, path)]."""
    figures.mkdir(parents=True, exist_ok=True)
    out = [("Dice per patient (`predict.py` chart)", figures / "demo_dice_distribution.png")]
    shutil.copyfile(workdir / predict_args.figure_path, out[0][1])
    output_dir = workdir / predict_args.output_dir
    with (output_dir / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("dice") and int(float(r["gt_pixels"])) > 0]
    if rows:
        worst = min(rows, key=lambda r: float(r["dice"]))["patient"]
        overlays = sorted((output_dir / "overlays").glob(f"{worst}_*.png"))
        if overlays:
            out.append((f"an overlay of {worst}, the lowest Dice", figures / "demo_overlay.png"))
            shutil.copyfile(overlays[len(overlays) // 2], out[-1][1])
    return out


def page_figures(
    workdir: Path, predict_args: argparse.Namespace, figures: Path, screenshot: bool
) -> list[tuple[str, Path]]:
    """Copy the demo's learning_curves.png (beside its first checkpoint) into `figures` and,
    with `screenshot`, render the top of predict.py's report.html in headless Chromium to
    `figures/demo_report.png` (`report.screenshot`); [(caption, path)]. Raises ReportError
    when a picture is missing, naming it (and --no-screenshot when Chromium is missing)."""
    out = []
    curves = (workdir / predict_args.model_path[0]).parent / "learning_curves.png"
    if not curves.is_file():
        raise ReportError(f"train.py --demo wrote no {curves}")
    out.append(("learning curves of the demo (`train.py`, learning_curves.png)", figures / "demo_learning_curves.png"))
    shutil.copyfile(curves, out[-1][1])
    if screenshot:
        page = workdir / predict_args.output_dir / "report.html"
        if not page.is_file():
            raise ReportError(f"predict.py wrote no {page} (was --no-report among --predict-args?)")
        try:
            out.append(("the top of `report.html` (`predict.py`), in Chromium", figures / "demo_report.png"))
            take_screenshot(page, out[-1][1])
        except RuntimeError as error:
            raise ReportError(f"screenshot of {page}: {error}; or pass --no-screenshot") from error
    return out


def format_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def render_report(
    facts: dict,
    timings: list[tuple[str, float]],
    demo: dict,
    figures: list[tuple[str, Path]],
    bench_text: str | None,
) -> str:
    """The Markdown of the report; figures are linked as `figures/<name>`, next to the file."""
    load = facts["load_average_1min"]
    lines = [
        REPORT_HEADER,
        "# Results",
        "",
        f"Generated by `python bench.py report` on {facts['date']}.",
        "",
        "| | |",
        "|---|---|",
        f"| commit | `{facts['commit']}` |",
        f"| CPU | {facts['cpu']}, {facts['logical_cores']} logical cores ({facts['usable_cores']} usable) |",
        f"| GPU | {facts['gpu'] or 'none used'} |",
        f"| load average at the start (1 min) | {'n/a' if load is None else f'{load:.1f}'} |",
        f"| software | Python {facts['python']}, torch {facts['torch']}, {facts['os']} |",
        "",
        "## Commands and wall time",
        "",
        "Run one after the other in a fresh folder; wall times grow when other work shares the CPU",
        "(see the load average above).",
        "",
        "| command | wall time |",
        "|---|---|",
        *[f"| `{command}` | {format_seconds(seconds)} |" for command, seconds in timings],
        "",
        "## Demo (phantom data)",
        "",
        "| | value |",
        "|---|---|",
    ]
    split = demo["split"]
    lines += [
        f"| patients: train / val / test | {split['train']} / {split['val']} / {split['test']} |",
        f"| model | {demo['base_filters']} filters, {demo['image_size']} x {demo['image_size']} input |",
        f"| best epoch (selects `best_model.pt`) | {demo['best_epoch']} of {demo['epochs']} |",
        "| validation Dice at the best epoch, preprocessed grid (mean / median) | "
        f"{demo['best'][0]:.3f} / {demo['best'][1]:.3f} |",
        f"| validation Dice at the last epoch (mean / median) | {demo['last'][0]:.3f} / {demo['last'][1]:.3f} |",
        f"| training throughput (median over epochs) | {demo['slices_per_s']:.0f} slices/s |",
    ]
    summary = demo["summary"]
    overall = _dice_pair(summary)
    if overall:
        lines.append(
            f"| `predict.py` Dice, native grid, {summary.get('labelled_patients', '?')} patients (mean / median) | "
            f"{overall[0]:.3f} / {overall[1]:.3f} |"
        )
    for role, block in sorted((summary.get("by_role") or {}).items()):
        pair = _dice_pair(block)
        if pair:
            lines.append(f"| `predict.py` Dice, role {role} (mean / median) | {pair[0]:.3f} / {pair[1]:.3f} |")
    lines.append("")
    for caption, path in figures:
        lines += [f"![{caption}](figures/{path.name})", ""]
    if bench_text:
        lines += ["## Speed (`python bench.py speed --device cpu --quick`)", "", "```", bench_text.strip(), "```", ""]
    return "\n".join(lines)


REPORT_ABOUT = (
    "Regenerate docs/results.md: runs `python train.py --demo` and the predict.py command it prints in a fresh "
    "scratch folder (minutes on a CPU, longer on a busy machine), optionally the quick benchmark, and writes the "
    "figures (Dice chart, an overlay, the learning curves, a Chromium screenshot of report.html), the machine, "
    "the commit and each command's wall time."
)


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"), help="Markdown file to (over)write")
    parser.add_argument("--bench", action="store_true", help="also run `bench.py speed --device cpu --quick`")
    parser.add_argument("--workdir", default=None, help="scratch folder to keep (default: a temp folder, deleted)")
    parser.add_argument("--demo-args", default="", help="extra train.py flags, e.g. '--epochs 2' for a quick check")
    parser.add_argument(
        "--predict-args",
        default="",
        help="extra flags for the printed predict.py command, e.g. --predict-args=--no-overlays",
    )
    parser.add_argument(
        "--no-screenshot",
        action="store_true",
        help="skip the screenshot of report.html (needs Debian's chromium and the playwright package)",
    )


def report(args: argparse.Namespace) -> Path:
    """`bench.py report`: run the demo, predict.py on it (and the quick benchmark), write Markdown."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if (workdir / "demo_checkpoints").exists():
            raise ReportError(f"--workdir {workdir}: holds an earlier demo_checkpoints/; give a fresh folder")
        workdir.mkdir(parents=True, exist_ok=True)
        facts = machine_facts()
        train_cmd = ["python", "train.py", "--demo", *shlex.split(args.demo_args)]
        seconds, stdout = run_timed(_local(train_cmd), workdir, workdir / "train.log")
        timings = [(shlex.join(train_cmd), seconds)]
        predict_cmd = printed_predict_command(stdout) + shlex.split(args.predict_args)
        seconds, _ = run_timed(_local(predict_cmd), workdir, workdir / "predict.log")
        timings.append((shlex.join(predict_cmd), seconds))
        bench_text = None
        if args.bench:
            bench_cmd = ["python", "bench.py", "speed", "--device", "cpu", "--quick"]
            seconds, bench_text = run_timed(_local(bench_cmd), workdir, workdir / "bench.log")
            timings.append((shlex.join(bench_cmd), seconds))
        predict_args = predict_paths(predict_cmd[2:])
        output = Path(args.output)
        figures = copy_figures(workdir, predict_args, output.parent / "figures")
        figures += page_figures(workdir, predict_args, output.parent / "figures", not args.no_screenshot)
        text = render_report(facts, timings, demo_results(workdir, predict_args), figures, bench_text)
    atomic_write_bytes(text.encode(), output)
    print(f"wrote {output} and {len(figures)} figure(s) in {output.parent / 'figures'}")
    return output


def _local(command: list[str]) -> list[str]:
    """`python X.py ...` -> this interpreter and this repository's X.py."""
    return [sys.executable, str(ROOT / command[1]), *command[2:]]


# ---------------------------------------------------------------------- post-processing
# `python bench.py postprocessing`: the evidence of issue 21. On a phantom with several lesions
# per patient and on one with a single lesion, train.py chooses the post-processing on its
# validation patients; every candidate is then scored on test patients that took no part.

POSTPROCESSING_BUDGET = (
    "--image-size 48 --base-filters 8 --lr 2e-3 --batch-size 16 --epochs 16 --steps-per-epoch 24 "
    "--val-patients 6 --loss dice+bce"
)
POSTPROCESSING_QUICK_BUDGET = (
    "--image-size 32 --base-filters 4 --lr 2e-3 --batch-size 8 --epochs 1 --steps-per-epoch 2 --val-patients 2"
)
PHANTOM_LESIONS = {"hard": "0-3 lesions per patient", "easy": "one lesion per patient"}
REUSED = " (read back from --work-dir, where an earlier run of this command left it)"


def lesion_count(mask: np.ndarray) -> int:
    """3-D connected components (26-connected, as the post-processing counts them) of a mask."""
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3, 3, 3)))[1])


def postprocessing_run(difficulty: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Train on the `difficulty` phantom (train.py chooses the post-processing on its
    validation patients at the end), then score every candidate on the test phantom's
    patients, and the candidates applied to each test patient's own truth (a perfect
    segmentation: what the step alone costs). Returns the numbers of one table."""
    size, slices = (48, (12, 16)) if args.quick else (args.phantom_size, None)
    data_dir = work / f"{difficulty}_train_{args.patients}x{size}"
    test_dir = work / f"{difficulty}_test_{args.test_patients}x{size}"
    if not data_dir.exists():
        make_synthetic_dataset(data_dir, args.patients, 0, size, slices, difficulty=difficulty)
    if not test_dir.exists():
        make_synthetic_dataset(test_dir, args.test_patients, 1000, size, slices, difficulty=difficulty)
    out = work / f"{difficulty}_{args.patients}x{size}_seed{seed}"
    device_flags = ["--device", args.device] if args.device else []
    start = time.perf_counter()
    key = {"budget": args.budget, "patients": args.patients, "size": size, "device": args.device}
    record = out / "trained.json"  # a finished run in --work-dir is read back, not trained again
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        train_seconds, reused = json.loads(record.read_text())["seconds"], True
    else:
        train.main(
            ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "ckpt"), "--log-dir", str(out / "tb")]
            + ["--cache-dir", str(work / "cache"), "--seed", str(seed), "--vis-frequency", "0", "--num-workers", "2"]
            + ["--overwrite", *shlex.split(args.budget), *device_flags]
        )
        train_seconds, reused = time.perf_counter() - start, False
        record.write_text(json.dumps({"key": key, "seconds": train_seconds}))
    path = out / "ckpt" / "best_model.pt"
    selection = torch.load(path, map_location="cpu", weights_only=True)["postprocessing_selection"]
    device = resolve_device(args.device)
    patients = discover_patients(test_dir)
    test_start = time.perf_counter()
    test = score_postprocessing(load_model(path, device), patients, device, work / "cache")
    truths = {p.patient_id: read_volume(p)[1] for p in patients}
    perfect = {pid: candidate_dice(truth.astype(np.float32), truth) for pid, truth in truths.items()}
    return {
        "difficulty": difficulty,
        "seed": seed,
        "selection": selection,
        "test": test,
        "perfect": perfect,
        "lesions": {pid: lesion_count(truth) for pid, truth in truths.items()},
        "train_seconds": train_seconds,
        "reused": reused,
        "test_seconds": time.perf_counter() - test_start,
    }


def _stats(scores: dict[str, dict[str, float]], name: str) -> tuple[float, float]:
    values = [patient[name] for patient in scores.values()]
    return float(np.mean(values)), float(np.median(values))


def postprocessing_table(result: dict) -> str:
    """Markdown for one run: per candidate, the validation Dice that chose (mean / median),
    the test Dice (mean / median), and the test Dice of a perfect segmentation after it."""
    chosen = result["selection"]["chosen"]
    val = {row["candidate"]: (row["mean"], row["median"]) for row in result["selection"]["table"]}
    lines = [
        "| candidate | validation Dice, mean / median (chose) | test Dice, mean / median "
        "| test Dice of a perfect segmentation after it, mean |",
        "|---|---|---|---|",
    ]
    for candidate in POSTPROCESSING_CANDIDATES:
        name = postprocessing_name(candidate)
        test, perfect = _stats(result["test"], name), _stats(result["perfect"], name)
        label = f"**{name}** (chosen)" if name == chosen else name
        lines.append(
            f"| {label} | {val[name][0]:.3f} / {val[name][1]:.3f} | {test[0]:.3f} / {test[1]:.3f} | {perfect[0]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def postprocessing_page(results: list[dict], args: argparse.Namespace, command: str, seconds: float) -> str:
    """The generated docs page: the command, what was measured on which patients, one table per run."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"<!-- generated by `{command}`: do not edit by hand, rerun the command -->",
        "# Post-processing: chosen on validation patients, scored on test patients",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
        f"`{git_commit()}`: {seconds / 60:.1f} min wall time, torch {torch.__version__}, device "
        f"{args.device or 'default'}, {torch.get_num_threads()} threads, load average {load:.1f} at the end.",
        "",
        f"For each phantom, {args.patients} training + validation patients (phantom seed 0) train a model "
        f"with `train.py {args.budget}`. At the end of the run train.py scores `best_model.pt` on its "
        "**validation** patients with every candidate (one forward pass per patient, native grid, threshold 0.5) "
        "and keeps the best mean Dice, ties going to the largest component (`lcc`), after nnU-Net's "
        "`determine_postprocessing` (Isensee et al. 2021, Nature Methods 18:203-211), which keeps the largest "
        "component only where it improves the validation Dice. The "
        f"{args.test_patients} **test** patients are a phantom of their own (seed 1000): they took no part in "
        "training, in choosing `best_model.pt` or in choosing the post-processing, and are scored here with every "
        "candidate. The last column applies each candidate to the test patients' own truth: the Dice it leaves "
        "to a perfect segmentation.",
        "",
        "Candidates: `none` keeps every component, `lcc` the largest only (the seed's), `min_share s` removes "
        "the components smaller than s of the largest (26-connected, 3-D, on the native grid).",
        "",
    ]
    for result in results:
        lesions = list(result["lesions"].values())
        several = sum(1 for n in lesions if n >= 2)
        val_count = len(result["selection"]["patients"])
        lines += [
            f"## {result['difficulty']} phantom ({PHANTOM_LESIONS[result['difficulty']]}), training seed "
            f"{result['seed']}",
            "",
            f"Chosen on {val_count} validation patients: **{result['selection']['chosen']}**. Test patients: "
            f"{len(lesions)} (with two or more separate lesions in their truth: {several}; lesion-free: "
            f"{sum(1 for n in lesions if n == 0)}); {result['train_seconds'] / 60:.1f} min for training and the "
            f"choice{REUSED if result['reused'] else ''}, {result['test_seconds'] / 60:.1f} min for the test scores.",
            "",
            postprocessing_table(result),
        ]
    return "\n".join(lines)


POSTPROCESSING_ABOUT = (
    "Evidence for the post-processing choice: train on the hard (several lesions) and the easy (one lesion)\n"
    "phantom, let train.py choose on validation patients, score every candidate on unseen test patients;\n"
    "writes a Markdown page (docs/postprocessing.md)."
)


def add_postprocessing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--phantoms", nargs="+", choices=tuple(PHANTOM_LESIONS), default=["hard", "easy"], help="phantoms to train on"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    parser.add_argument("--patients", type=int, default=30, help="training + validation patients per phantom")
    parser.add_argument("--test-patients", type=int, default=16, help="unseen test patients per phantom")
    parser.add_argument("--phantom-size", type=int, default=96, help="native slice size of the phantoms (px)")
    parser.add_argument("--budget", default=POSTPROCESSING_BUDGET, help="train.py flags of every run")
    parser.add_argument("--work-dir", default=None, help="keep data and checkpoints here (default: a temp dir)")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown page; default docs/postprocessing.md (./postprocessing.md with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny phantoms and budget: a smoke test, not evidence")


def postprocessing(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """`bench.py postprocessing`: every phantom x seed; writes the page, returns the runs."""
    if args.quick:
        args.budget, args.patients, args.test_patients = (
            POSTPROCESSING_QUICK_BUDGET,
            min(args.patients, 5),
            min(args.test_patients, 2),
        )
    args.output = args.output or ("postprocessing.md" if args.quick else str(ROOT / "docs" / "postprocessing.md"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        results = [postprocessing_run(d, seed, args, work) for d in args.phantoms for seed in args.seeds]
    command = "python bench.py postprocessing " + " ".join(shlex.quote(a) for a in argv)
    text = postprocessing_page(results, args, command.strip(), time.perf_counter() - start)
    atomic_write_bytes(text.encode(), Path(args.output))
    print(text)
    return results


# -------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = CLIParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    devices = {
        "speed": [shared_flags("--device", device="cpu or cuda; default: cuda when available")],
        "ablation": [
            shared_flags("--device", device="passed to train.py and predict.py; default: cuda when available")
        ],
        "report": [],
        "postprocessing": [
            shared_flags("--device", device="for training and the test scores; default: cuda when available")
        ],
    }
    for name, about, add_flags in (
        ("speed", "time preprocessing, augmentation, training and inference on a phantom", add_speed_flags),
        ("ablation", ABLATION_ABOUT, add_ablation_flags),
        ("report", REPORT_ABOUT, add_report_flags),
        ("postprocessing", POSTPROCESSING_ABOUT, add_postprocessing_flags),
    ):
        sub = commands.add_parser(
            name, help=about.split(";")[0], description=about, formatter_class=HelpFormatter, parents=devices[name]
        )
        add_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> dict | Path:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):  # the spelling before sub-commands
        sys.exit(f"error: bench.py takes a sub-command first: python bench.py speed {shlex.join(argv)}")
    args = get_args_parser().parse_args(argv)
    if args.command == "speed":
        return speed(args)
    if args.command == "ablation":
        return ablation(args, argv[1:])
    if args.command == "postprocessing":
        return postprocessing(args, argv[1:])
    try:
        return report(args)
    except ReportError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
