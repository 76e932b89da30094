"""`python bench.py cpu-inference`: every CPU inference path side by side, and whole patients
through today's predict.py against an earlier commit's (docs/cpu-inference.md).

    python bench.py cpu-inference --model-path CKPT --data-dir kaggle_3m --patients ID ... \\
        --baseline 9654395 --output docs/cpu-inference.md

1. The network alone: the same weights and the same preprocessed slices through torch eager
   fp32 and bf16 autocast (channels_last, as predict.py runs torch), torch.compile in bf16,
   onnxruntime fp32 (the ONNX graph export.py writes), onnxruntime int8 (static QDQ, per-channel
   weights, calibrated on the first batch of these slices) and OpenVINO in fp32 and bf16.
   Speed-ups are against onnxruntime fp32, the CPU default before OpenVINO (and still
   predict.py's fp32 path).
2. Whole patients: `python predict.py` of this checkout and of `--baseline` (a commit, exported
   with `git archive` into a temporary folder) on the same patients and checkpoint, each a
   process of its own, with a warm preprocessing cache: once with every output (masks,
   overlays, report) and once without pictures (`--no-overlays --no-report`).
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError
from dataset import discover_patients, read_volume, stack_context
from export import OnnxRuntimeModel, export_onnx
from inference import cpu_flags, cpu_has_native_bf16, load_model, predict_volume, resolve_inference
from network import build_model
from openvino_backend import OpenVinoModel
from patients import DataError
from preprocessing import preprocess_volume
from results_page import ROOT, ReportError, machine_facts, print_page, run_timed

CPU_INFERENCE_ABOUT = "every CPU inference path on the same slices, and whole patients against an earlier commit"
PATHS = (
    "torch fp32",
    "torch bf16 autocast",
    "torch.compile bf16 autocast",
    "onnxruntime fp32",
    "onnxruntime int8 (static QDQ)",
    "OpenVINO fp32",
    "OpenVINO bf16",
)
SPEED_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")  # reported on the page
REFERENCE, BASELINE = "torch fp32", "onnxruntime fp32"  # differences against the first, speed-ups against the second


def add_cpu_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="training checkpoint (its size and width are timed)")
    parser.add_argument(
        "--patients", nargs="+", required=True, help="patient ids in --data-dir (predict.py --patients)"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=list(PATHS),
        metavar="PATH",
        help=f"network paths to time ({REFERENCE!r} and {BASELINE!r} always run; default: all of {', '.join(PATHS)})",
    )
    parser.add_argument("--baseline", default=None, help="commit whose predict.py is timed beside this one's")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (predict.py's default)")
    parser.add_argument("--work-dir", default=None, help="keep the runs' outputs here (default: a temp dir)")
    parser.add_argument("--output", default=None, help="also write the page here (Markdown)")


# ------------------------------------------------------------------------- the network alone


def int8_network(model: torch.nn.Module, image_size: int, calibration: np.ndarray, folder: Path) -> OnnxRuntimeModel:
    """onnxruntime's static int8 quantization (QDQ, per-channel int8 weights, uint8
    activations) of the exported graph, calibrated on `calibration` (N, C, S, S) float32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared, quantized = folder / "fp32.onnx", folder / "prepared.onnx", folder / "int8.onnx"
    source.write_bytes(export_onnx(model, image_size))
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)

    class Slices(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i : i + 4]} for i in range(0, len(calibration), 4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(prepared),
        str(quantized),
        Slices(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return OnnxRuntimeModel(quantized)


def network_paths(
    model: torch.nn.Module, image_size: int, calibration: np.ndarray, folder: Path, names: Iterable[str] = PATHS
) -> dict:
    """name -> (network called like a UNetModel, torch autocast dtype or None, seconds to build it)
    for REFERENCE, BASELINE and `names` (in PATHS' order) that this CPU runs natively."""
    model = model.cpu().float().eval().to(memory_format=torch.channels_last)
    builders = {
        "torch fp32": lambda: (model, None),
        "torch bf16 autocast": lambda: (model, torch.bfloat16),
        "torch.compile bf16 autocast": lambda: (torch.compile(model), torch.bfloat16),
        "onnxruntime fp32": lambda: (OnnxRuntimeModel(export_onnx(model, image_size)), None),
        "onnxruntime int8 (static QDQ)": lambda: (int8_network(model, image_size, calibration, folder), None),
        "OpenVINO fp32": lambda: (OpenVinoModel(model, image_size, "f32"), None),
        "OpenVINO bf16": lambda: (OpenVinoModel(model, image_size, "bf16"), None),
    }
    wanted = {REFERENCE, BASELINE, *names}
    builders = {name: build for name, build in builders.items() if name in wanted}
    if not cpu_has_native_bf16():  # emulated bf16 is far slower than fp32: not a candidate here
        builders = {name: build for name, build in builders.items() if "bf16" not in name}
    paths = {}
    for name, build in builders.items():
        start = time.perf_counter()
        network, dtype = build()
        paths[name] = (network, dtype, time.perf_counter() - start)
    return paths


def time_networks(
    model: torch.nn.Module,
    image_size: int,
    slices: np.ndarray,
    batch_size: int,
    context: int = 0,
    names: Iterable[str] = PATHS,
) -> list[dict]:
    """Per path of network_paths: slices/s over `slices` (N, C, S, S) float32 after one warm-up
    batch (which also compiles torch.compile's graph), the seconds to build it, and `diff`, the
    largest |probability - REFERENCE's|."""
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        calibration = stack_context(slices, context)[:batch_size]
        paths = network_paths(model, image_size, np.asarray(calibration, np.float32), Path(tmp), names)
        for name, (network, dtype, build_s) in paths.items():
            predict_volume(network, slices[:batch_size], "cpu", batch_size, amp_dtype=dtype, context_slices=context)
            start = time.perf_counter()  # after the warm-up batch above
            probabilities = predict_volume(network, slices, "cpu", batch_size, amp_dtype=dtype, context_slices=context)
            seconds = time.perf_counter() - start
            reference = probabilities if reference is None else reference  # REFERENCE comes first
            difference = float(np.abs(probabilities - reference).max())
            rows.append({"path": name, "slices_per_s": len(slices) / seconds, "build_s": build_s, "diff": difference})
    return rows


# ---------------------------------------------------------------------------- whole patients


def export_commit(commit: str, into: Path) -> None:
    """This repository's files at `commit`, written into `into` (`git archive`).
    Raises ReportError when git cannot export it."""
    result = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True)
    if result.returncode != 0:
        raise ReportError(f"--baseline {commit}: git archive failed: {result.stderr.decode().strip()}")
    shutil.rmtree(into, ignore_errors=True)  # a reused --work-dir
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        archive.extractall(into, filter="data")


def time_predict(code: Path, args: argparse.Namespace, work: Path, name: str, pictures: bool) -> float:
    """Wall seconds of one `python predict.py` of the checkout in `code` (its own cache folder,
    filled by an untimed run before the first timed one)."""
    command = [sys.executable, str(code / "predict.py"), "--model-path", str(Path(args.model_path).resolve())]
    command += ["--data-dir", str(Path(args.data_dir).resolve()), "--patients", *args.patients]
    command += ["--cache-dir", str(work / f"cache_{name}")]
    if not pictures:
        command += ["--no-overlays", "--no-report"]
    if not (work / f"cache_{name}").exists():
        run_timed([*command, "--output-dir", str(work / f"warm_{name}")], code, work / f"warm_{name}.log")
    label = f"{name}_{'all' if pictures else 'masks'}"
    return run_timed([*command, "--output-dir", str(work / label)], code, work / f"{label}.log")[0]


def time_patients(args: argparse.Namespace, work: Path) -> dict:
    """Seconds of each predict.py run: {(checkout, pictures): seconds}."""
    checkouts = {"this commit": ROOT}
    if args.baseline:
        checkouts = {f"baseline {args.baseline}": work / "baseline", **checkouts}
        export_commit(args.baseline, work / "baseline")
    return {
        (name, pictures): time_predict(code, args, work, name.replace(" ", "_"), pictures)
        for name, code in checkouts.items()
        for pictures in (False, True)
    }


# ---------------------------------------------------------------------------------- the page


def default_path() -> str:
    """The PATHS name of what predict.py runs on this CPU without --backend and --amp."""
    backend, dtype = resolve_inference(None, "auto", torch.device("cpu"))
    return {"openvino": "OpenVINO", "onnxruntime": "onnxruntime", "torch": "torch"}[backend] + (
        " bf16" if dtype == torch.bfloat16 else " fp32"
    )


def page(args: argparse.Namespace, networks: list[dict], runs: dict, slices: int, shape: tuple, command: str) -> str:
    """The Markdown page: machine, the network table (speed-up against BASELINE), predict.py's times."""
    facts = machine_facts()
    default = next(r for r in networks if r["path"] == BASELINE)
    lines = [
        f"<!-- generated by `{command}` -->",
        "# CPU inference: every path, and whole patients",
        "",
        f"`{command}` on {facts['date']}, {facts['cpu']} ({facts['usable_cores']} cores, "
        f"{torch.get_num_threads()} threads), commit {facts['commit']}; native bf16 (AVX512-BF16 or AMX): "
        f"{'yes' if cpu_has_native_bf16() else 'no'}; torch {torch.__version__}. Of the CPU flags "
        + f"{', '.join(SPEED_FLAGS)} it has: "
        + (", ".join(f for f in SPEED_FLAGS if f in cpu_flags()) or "none")
        + ".",
        "",
        f"## The network alone: {slices} slices of {len(args.patients)} real patients, batches of {args.batch_size}",
        "",
        f"Checkpoint `{args.model_path}`: input {shape[1]} x {shape[2]} x {shape[3]}. Speed-up against onnxruntime "
        f"fp32 (the CPU default before OpenVINO bf16); difference: largest |probability - {REFERENCE}| over the "
        f"slices. predict.py's default on this CPU: {default_path()}.",
        "",
        "| path | slices/s | speed-up | build (s) | difference |",
        "|---|---|---|---|---|",
    ]
    for row in networks:
        speedup = row["slices_per_s"] / default["slices_per_s"]
        lines.append(
            f"| {row['path']} | {row['slices_per_s']:.1f} | {speedup:.2f}x | {row['build_s']:.1f} | {row['diff']:.1e} |"
        )
    lines += ["", f"## Whole patients: predict.py on the same {len(args.patients)} patients", ""]
    lines += ["| predict.py | masks, metrics (s) | + overlays, report (s) |", "|---|---|---|"]
    names = list(dict.fromkeys(name for name, _ in runs))
    for name in names:
        lines.append(f"| {name} | {runs[(name, False)]:.1f} | {runs[(name, True)]:.1f} |")
    if len(names) == 2:
        old, new = names
        ratios = [runs[(old, p)] / runs[(new, p)] for p in (False, True)]
        lines += ["", f"This commit is {ratios[0]:.2f}x as fast without pictures, {ratios[1]:.2f}x with them."]
    lines += [
        "",
        f"Each run is one process (start-up, model conversion or export, {len(args.patients)} patients); the "
        f"preprocessing cache was warm. Patients: {', '.join(args.patients)}.",
        "",
    ]
    return "\n".join(lines)


def cpu_inference(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench.py cpu-inference`: time the paths and the runs, print the page, write --output."""
    if args.baseline:  # before minutes of timing
        known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"], cwd=ROOT)
        if known.returncode != 0:
            sys.exit(f"error: --baseline {args.baseline}: not a commit of {ROOT}")
    try:
        loaded = load_model(args.model_path, torch.device("cpu"))
        patients = {p.patient_id: p for p in discover_patients(args.data_dir)}
    except (CheckpointError, DataError) as error:
        sys.exit(f"error: {error}")
    missing = [p for p in args.patients if p not in patients]
    if missing:
        sys.exit(f"error: --patients {' '.join(missing)}: not in {args.data_dir}")
    volumes = []
    for pid in args.patients:
        volume, _ = read_volume(patients[pid])
        kept = range(1, len(volume) - 1)  # predict.py's slices: the end slices are left out
        images, _, _ = preprocess_volume(volume, None, loaded.image_size, kept, loaded.norm_region)
        volumes.append(np.asarray(images, np.float32))
    slices = np.concatenate(volumes)
    model = build_model(loaded.model.config)
    model.load_state_dict(loaded.model.state_dict())
    try:
        networks = time_networks(model, loaded.image_size, slices, args.batch_size, loaded.context_slices, args.paths)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            runs = time_patients(args, work)
    except ReportError as error:
        sys.exit(f"error: {error}")
    command = "python bench.py cpu-inference " + shlex.join(argv)
    text = page(args, networks, runs, len(slices), slices.shape, command)
    print_page(text, args.output)
    return {"networks": networks, "runs": runs}
