"""Performance benchmark on a phantom data set written to a temp dir.

    python bench.py [--device cpu|cuda] [--image-size 256] [--quick] [--json PATH]

Measures, side by side: preprocessing per patient (cold and warm cache), augmentation per
slice (ours, batched on the device, against per-sample skimage rescale + rotate), training
throughput (a plain eager fp32 loop against the path train.py runs), inference per patient,
and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from augmentations import BatchAugmentation
from dataset import MRISegmentationDataset, discover_patients, load_volume, load_volumes, make_synthetic_dataset
from losses import SoftDiceLoss
from network import UNetModel
from predict import autocast_dtype, binarize, predict_volume
from train import ResidentSlices, Runtime, train_one_epoch
from utils import resolve_device, restore_geometry


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
    args = (optimizer, scaler, SoftDiceLoss(), BatchAugmentation(seed=0), runtime)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--image-size", type=int, default=256, help="preprocessed slice size")
    parser.add_argument("--base-filters", type=int, default=32, help="U-Net width")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="training batch (default 16; 8 with --quick on CPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps (default 3 quick, 20 full; x10 on CUDA)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the configured path with torch.compile")
    parser.add_argument(
        "--quick", action="store_true", help="small phantom and few steps (under 2 minutes on 2 CPU cores)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
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

        batch = torch.multinomial(data.weights, 16, True, generator=torch.Generator().manual_seed(0))
        results["augmentation"] = bench_augmentation(
            data.images[batch].cpu(), data.masks[batch].cpu(), device, repeats=3 if args.quick else 10
        )
        plain = plain_training_rate(data, args.base_filters, args.batch_size, steps, device)
        amp = (
            torch.bfloat16
            if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else (torch.float16 if device.type == "cuda" else None)
        )
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
    print(
        f"\n{r['device']} {r.get('gpu', '')}, torch {r['torch']}, {r['image_size']}x{r['image_size']}, "
        f"{r['base_filters']} filters, batch {r['batch_size']}, {r['threads']} threads"
    )
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
