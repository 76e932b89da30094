"""The speed benchmark on a phantom data set written to a temp dir, and the entry point of
the studies that live in modules of their own (study_ablation.py, results_page.py,
study_postprocessing.py, study_precision.py, study_lgg.py, study_preprocessing.py,
study_cpu_inference.py, study_recipes.py).

    python bench.py speed [--device cpu|cuda] [--image-size 256] [--quick] [--json PATH]
    python bench.py ablation [--seeds 0 1 2] [--candidates NAME ...] [--output ablation.md]
    python bench.py report [--bench] [--output docs/results.md]   (regenerates docs/results.md, figures/)
    python bench.py postprocessing [--output docs/postprocessing.md]  (regenerates docs/postprocessing.md)
    python bench.py precision --model-path M --data-dir kaggle_3m     (bf16 against fp32 on real patients)
    python bench.py lgg --model-path M --data-dir kaggle_3m           (regenerates docs/results-lgg.md)
    python bench.py preprocessing --data-dir kaggle_3m --original-repo R  (ours against the original's, cold)
    python bench.py cpu-inference --model-path M --data-dir kaggle_3m --patients ID ... --baseline COMMIT
    python bench.py recipes --runs RUN_DIR ... --data-dir kaggle_3m --work-dir W  (recipes on the 88)

Measures, side by side: preprocessing per patient (cold and warm cache), augmentation per
slice (ours, batched on the device, against per-sample skimage rescale + rotate), training
throughput (a plain eager fp32 loop against the path train.py runs), inference per patient,
and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import distributed
import train
from augmentations import Augment, BatchAugmentation, build_augmentation
from dataset import MRISegmentationDataset, discover_patients, load_volume, load_volumes, make_synthetic_dataset
from distributed import Runtime
from inference import amp_name, autocast_dtype, autocast_for, binarize, predict_volume, resolve_inference
from losses import SoftDiceLoss, build_loss
from network import DEFAULT_ARCHITECTURE, build_model
from openvino_backend import OpenVinoModel, precision_of
from preprocessing import restore_geometry
from results_page import REPORT_ABOUT, ReportError, add_report_flags, report
from sampling import ResidentSlices
from study_ablation import ABLATION_ABOUT, ablation, add_ablation_flags
from study_cpu_inference import CPU_INFERENCE_ABOUT, add_cpu_inference_flags, cpu_inference, default_path, time_networks
from study_lgg import LGG_ABOUT, add_lgg_flags, lgg
from study_postprocessing import POSTPROCESSING_ABOUT, add_postprocessing_flags, postprocessing
from study_precision import PRECISION_ABOUT, add_precision_flags, precision
from study_preprocessing import PREPROCESSING_ABOUT, add_preprocessing_study_flags, preprocessing_study
from study_recipes import RECIPES_ABOUT, add_recipes_flags, recipes
from train import train_one_epoch
from utils import CLIParser, HelpFormatter, add_shared_flag, resolve_device, shared_flags


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


def default_network(base_filters: int) -> torch.nn.Module:
    """A freshly initialised network of the architecture train.py trains by default, 3 input
    channels, `base_filters` wide (what every timing here measures)."""
    return build_model({"architecture": DEFAULT_ARCHITECTURE, "base_filters": base_filters}, "bench")


def plain_training_rate(
    data: ResidentSlices, base_filters: int, batch_size: int, steps: int, device: torch.device
) -> float:
    """Slices/s of the simplest loop: eager fp32, contiguous memory, no augmentation."""
    torch.manual_seed(0)
    model = default_network(base_filters).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = SoftDiceLoss()
    generator = torch.Generator().manual_seed(0)
    batches = data.batches(steps + 1, batch_size, generator)

    def step(images, masks):
        loss = criterion(model(images, return_logits=True), masks)
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
    """The loss train.py trains with by default (`--loss`'s default; it takes the logits that
    train_one_epoch hands it)."""
    return build_loss(train.get_args_parser().get_default("loss"))


def training_augmentation(steps: int, batch_size: int, device: torch.device, seed: int = 0) -> Augment:
    """The augmentation train.py builds for an epoch of `steps` batches, with its default flags."""
    return build_augmentation(train.parse_args([]), seed, steps, batch_size, device)


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
    raw = default_network(base_filters).to(device).to(memory_format=torch.channels_last)
    model = torch.compile(raw) if compile_model else raw
    optimizer = torch.optim.Adam(raw.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    runtime = Runtime(device, amp_dtype=amp_dtype)
    criterion = training_loss()

    def epoch(count: int, seed: int) -> dict:  # `count` steps, train.py's augmentation and loss
        augment = training_augmentation(count, batch_size, device, seed)
        generator = torch.Generator().manual_seed(seed)
        return train_one_epoch(
            model, data, optimizer, scaler, criterion, augment, runtime, count, batch_size, generator, seed, 10**9,
            progress=False,
        )  # fmt: skip

    epoch(3 if compile_model else 1, 0)  # warm-up
    synchronize(device)
    return epoch(steps, 1)["slices_per_s"]


def bench_inference(volumes, base_filters: int, image_size: int, device: torch.device) -> dict:
    """Seconds per patient: forward pass on predict.py's default backend and precision
    (`resolve_inference`; OpenVINO's conversion and compilation untimed) + threshold + LCC +
    inverse geometry."""
    model = default_network(base_filters).to(device).to(memory_format=torch.channels_last).eval()
    backend, dtype = resolve_inference(None, "auto", device)
    network = OpenVinoModel(model, image_size, precision_of(dtype)) if backend == "openvino" else model
    predict_volume(network, volumes[0].images[:2], device, amp_dtype=autocast_for(backend, dtype))
    times = []
    for volume in volumes:
        synchronize(device)
        start = time.perf_counter()
        probs = predict_volume(network, volume.images, device, 32, amp_dtype=autocast_for(backend, dtype))
        restore_geometry(binarize(probs).astype(np.uint8), volume.geometry)
        times.append(time.perf_counter() - start)
    return {
        "s_per_patient": float(np.mean(times)),
        "slices_per_s": sum(len(v.images) for v in volumes) / sum(times),
        "path": f"{backend} {amp_name(dtype) if dtype else 'fp32'}",
    }


def bench_cpu_backends(volumes, base_filters: int, image_size: int, max_slices: int, batch_size: int = 32) -> dict:
    """CPU inference slices/s of the network alone on the same weights and preprocessed slices
    (at most `max_slices`): torch fp32, onnxruntime fp32 (predict.py's fp32 default) and
    predict.py's default on this CPU (`study_cpu_inference.default_path`), each with its
    largest |probability - torch fp32|. `bench.py cpu-inference` times every path."""
    images = np.concatenate([np.asarray(v.images) for v in volumes])[:max_slices]  # (N, 3, S, S)
    default = default_path()
    rows = time_networks(default_network(base_filters).eval(), image_size, images, batch_size, names=(default,))
    return {"slices": len(images), "batch_size": batch_size, "default": default, "paths": rows}


# The Kaggle LGG set (kaggle_3m): 110 patients, 3,929 slices; a default run validates 10 of them.
LGG_PATIENTS, LGG_SLICES, DEFAULT_VAL_PATIENTS, DEFAULT_EPOCHS = 110, 3929, 10, 100


def timed_training(flags: list[str]) -> dict:
    """train.py's own `main` in this process (its printed lines swallowed): wall seconds, and
    the parts of each epoch that `epoch_end.finish_epoch` measured ("step", "val", "val_device",
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
    add_shared_flag(parser, "--image-size", note="also the phantom's slice size")
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
        with distributed.determinism(False, device):  # train.py's cuDNN settings (cudnn.benchmark on CUDA)
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
        results["inference"] = bench_inference(volumes, args.base_filters, args.image_size, device)
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
        (
            "inference incl. LCC + inverse (s/patient)",
            f"{i['s_per_patient']:.3f}",
            f"{i['slices_per_s']:.1f} slices/s, {i['path']}",
        ),
        ("peak RAM (MiB)", f"{r['peak_ram_mib']:.0f}", ""),
    ]
    if "cpu_backends" in r:
        b = r["cpu_backends"]
        baseline = next(row for row in b["paths"] if row["path"] == "onnxruntime fp32")["slices_per_s"]
        rows[-1:-1] = [
            (
                f"CPU inference, {row['path']}{' (default)' if row['path'] == b['default'] else ''} (slices/s)",
                f"{row['slices_per_s']:.1f}",
                f"{row['slices_per_s'] / baseline:.2f}x onnxruntime fp32, max |diff| {row['diff']:.1e}",
            )
            for row in b["paths"]
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


# ------------------------------------------------------------------------------ report
# `python bench.py report`: regenerate the README's results from commands, not memory.


# ---------------------------------------------------------------------- post-processing
# `python bench.py postprocessing`: the evidence for the choice. On a phantom with several lesions
# per patient and on one with a single lesion, train.py chooses the post-processing on its
# validation patients; every candidate is then scored on test patients that took no part.


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
        "precision": [shared_flags("--data-dir")],
        "lgg": [shared_flags("--data-dir")],
        "preprocessing": [shared_flags("--data-dir")],
        "cpu-inference": [shared_flags("--data-dir")],
        "recipes": [shared_flags("--data-dir")],
    }
    for name, about, add_flags in (
        ("speed", "time preprocessing, augmentation, training and inference on a phantom", add_speed_flags),
        ("ablation", ABLATION_ABOUT, add_ablation_flags),
        ("report", REPORT_ABOUT, add_report_flags),
        ("postprocessing", POSTPROCESSING_ABOUT, add_postprocessing_flags),
        ("precision", PRECISION_ABOUT, add_precision_flags),
        ("lgg", LGG_ABOUT, add_lgg_flags),
        ("preprocessing", PREPROCESSING_ABOUT, add_preprocessing_study_flags),
        ("cpu-inference", CPU_INFERENCE_ABOUT, add_cpu_inference_flags),
        ("recipes", RECIPES_ABOUT, add_recipes_flags),
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
    studies = {
        "ablation": ablation,
        "postprocessing": postprocessing,
        "precision": precision,
        "lgg": lgg,
        "preprocessing": preprocessing_study,
        "cpu-inference": cpu_inference,
        "recipes": recipes,
    }  # each takes its arguments and its command line (which its page quotes)
    if args.command in studies:
        return studies[args.command](args, argv[1:])
    try:
        return report(args)
    except ReportError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
