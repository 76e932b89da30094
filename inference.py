"""A checkpoint in, probabilities and masks out: the one predictor that training validation,
predict.py, the torch.hub pipeline, export.py and bench.py share.

- The model from a checkpoint: `model_from_checkpoint` rebuilds the network from the
  `model_config` record saved beside the weights (`network.build_model`) and loads them,
  `load_model` does all of it for a file.
- Inference: `predict_probabilities` / `predict_volume` (batched forward pass, on the device
  / as a host array), `predict_logits` (the same pass before the sigmoid: training's
  validation loss), `binarize` and `to_native` (threshold and post-processing on the native
  grid), `autocast_dtype` (mixed precision), `resolve_backend` (torch, onnxruntime or OpenVINO).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from checkpoint import (
    CheckpointError,
    check_preprocessing,
    load_checkpoint,
    require_training_checkpoint,
    unwrap_state_dict,
)
from dataset import stack_context
from network import ModelConfig, build_model
from postprocessing import LCC, NO_FILTER, postprocess, postprocessing_of
from preprocessing import Geometry, restore_geometry
from utils import UsageError

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


def model_from_checkpoint(checkpoint: dict, source: str | Path = "checkpoint") -> nn.Module:
    """The network of a checkpoint in eval mode, on the CPU: built by `network.build_model`
    from its `model_config` record (a record without an architecture is a U-Net), with its
    weights; a bare state_dict (no record) is a U-Net sized by `ModelConfig.of_state_dict`.
    DDP and torch.compile prefixes are stripped. Raises CheckpointError naming `source` for
    a record this code cannot build and for weights that do not fit."""
    state = _state_dict_of(checkpoint, source)
    try:
        if _has_model_record(checkpoint):
            record = checkpoint["model_config"]
        else:
            record = ModelConfig.of_state_dict(state, source).record()
        model = build_model(record, source)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        arguments = {k: v for k, v in model.config.items() if k != "architecture"}
        raise CheckpointError(f"{source}: weights do not fit {type(model).__name__}{arguments}: {error}") from error
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
    model: nn.Module  # or export.OnnxRuntimeModel / openvino_backend.OpenVinoModel (--backend)
    image_size: int
    split: dict | None
    norm_region: str = "crop"  # where the normalisation statistics came from in training
    context_slices: int = 0  # neighbouring slices on each side fed as channels (2.5-D)
    # the checkpoint's `postprocessing` record, or the largest component (LCC) when it has none
    postprocessing: dict = field(default_factory=lambda: dict(LCC))
    postprocessing_chosen: bool = False  # True when the record came from the checkpoint


DEMO_CHECKPOINT = Path("demo_checkpoints") / "best_model.pt"  # where `train.py --demo` saves its model


DEMO_DATA = Path("demo_3m")  # where `train.py --demo` writes its phantom


def missing_checkpoint(path: str | Path, data_dir: str | Path | None = None) -> str:
    """The message for a --model-path that does not exist, with the hint that fits: an
    unfinished run in the same folder (its last.pt) and how to continue it; the demo's
    checkpoint when `train.py --demo` has written one here and the data is the demo's phantom
    (`data_dir` is demo_3m, or the calling CLI takes no data); otherwise how to train one on
    `data_dir`."""
    folder = Path(path).parent
    if Path(path).name != "last.pt" and (folder / "last.pt").is_file():
        hint = (
            f"{folder} holds last.pt of a run that has not finished: continue it with python train.py "
            f"--checkpoint-dir {folder} --resume auto and the flags in {folder / 'args.json'}, or pass "
            f"--model-path {folder / 'last.pt'} to use it as it is"
        )
    elif DEMO_CHECKPOINT.is_file() and (data_dir is None or Path(data_dir).resolve() == DEMO_DATA.resolve()):
        data = "" if data_dir is None else f" --data-dir {data_dir}"
        hint = f"the demo's model is {DEMO_CHECKPOINT}: pass --model-path {DEMO_CHECKPOINT}{data}"
    else:
        data = data_dir or "kaggle_3m"
        hint = f"train one first: python train.py --data-dir {data} (or python train.py --demo on phantom data)"
    return f"checkpoint not found: {path}; {hint}"


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Load a training checkpoint (weights_only) and rebuild its model on `device`.
    Raises CheckpointError naming the file; a missing file gets `missing_checkpoint`'s hint."""
    if not Path(path).exists():
        raise CheckpointError(missing_checkpoint(path))
    checkpoint = require_training_checkpoint(load_checkpoint(path), path)
    preprocessing = checkpoint["preprocessing"]
    check_preprocessing(preprocessing, path)
    model = model_from_checkpoint(checkpoint, path).to(device).to(memory_format=torch.channels_last)
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


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo: AMX tiles, or AVX-512 with bf16 dot products


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the Linux kernel lists them (`flags` lines of /proc/cpuinfo);
    empty where that file cannot be read (another OS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()
    )


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16: Intel Cooper Lake, Sapphire
    Rapids and later, AMD Zen 4 and later), read from the kernel's CPU flags. A capability
    check, not a timing probe: it costs nothing, gives the same answer every run, and
    without the flags (another OS, an older CPU) the answer is False, so such a CPU never
    gets bf16, which oneDNN then emulates far slower than fp32."""
    return not cpu_flags(cpuinfo).isdisjoint(CPU_BF16_FLAGS)


def precision_text(dtype: torch.dtype | None, backend: str = "torch") -> str:
    """How a forward pass ran, for protocols and records: "fp32", "bf16 autocast (float32
    weights and probabilities)" for torch, "bf16 inference precision (float32 inputs and
    probabilities)" for OpenVINO."""
    if dtype is None:
        return "fp32"
    if backend == "openvino":
        return f"{amp_name(dtype)} inference precision (float32 inputs and probabilities)"
    return f"{amp_name(dtype)} autocast (float32 weights and probabilities)"


def inference_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The precision of prediction (predict.py --amp, the hub pipeline): "auto" is bf16 or fp16
    on CUDA (`autocast_dtype`), and on the CPU bf16 where it multiplies bf16 natively
    (`cpu_has_native_bf16`), else fp32 (None); "off" is fp32, "bf16" and "fp16" ask for that
    precision on any device. On such a CPU bf16 ran the network several times as fast as fp32
    (docs/cpu-inference.md) and its masks agreed with fp32's on real patients
    (docs/precision.md, `bench.py precision`). The weights and the returned probabilities stay
    float32 either way. Raises UsageError for an `amp` outside AMP_CHOICES."""
    if amp not in AMP_CHOICES:
        raise UsageError(f"amp={amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return autocast_dtype(device, amp)


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
    slices, with no host sync.
    With `tta` the prediction is averaged with that of the horizontally flipped input.
    `context_slices` C > 0 (a 2.5-D model, `context_slices_of`): each slice is fed with its
    C neighbours on each side as channels, (S, 3, H, W) -> (S, 3 (2C+1), H, W), as in training."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        probs = model(batch)  # (B, 3 (2C+1), H, W) -> (B, 1, H, W)
        return (probs + model(batch.flip(-1)).flip(-1)) / 2 if tta else probs

    return batched_forward(forward, model, images, device, batch_size, amp_dtype, context_slices)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    context_slices: int = 0,
) -> torch.Tensor:
    """The logits (S, H, W), cast to float32, of a `UNetModel` (`return_logits=True`) for a
    preprocessed volume, batched as `predict_probabilities` (no TTA): what training's
    validation gives its loss; sigmoid(logits) are `predict_probabilities`' values."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return model(batch, return_logits=True)  # (B, 3 (2C+1), H, W) -> (B, 1, H, W)

    return batched_forward(forward, model, images, device, batch_size, amp_dtype, context_slices)


def batched_forward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    context_slices: int,
) -> torch.Tensor:
    """`forward(batch)` -> (B, 1, H, W) over a volume in eval mode, under autocast, each batch
    copied to `device` (channels_last) after stacking the context slices; (S, H, W) float32."""
    device = torch.device(device)
    model.eval()
    images = stack_context(images, context_slices)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        batch = batch.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            prediction = forward(batch)
        out.append(prediction[:, 0].float())
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
    `postprocess`); without it, the largest component (`lcc` True, the reference implementation's
    post-processing) or all of them."""
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
    onto the native grid (bilinear, `preprocessing.restore_geometry`), then threshold and filter the
    3-D components there (`binarize`: `postprocessing`, else the largest component unless
    `lcc` is False). Returns uint8 0/1 masks and float32 probabilities (S, H, W), so the
    written mask is exactly the post-processed thresholded probability map."""
    native_probs = restore_geometry(probabilities, geometry, mode="bilinear")  # (S, size, size) -> (S, H, W)
    return binarize(native_probs, threshold, lcc, postprocessing).astype(np.uint8), native_probs


BACKENDS = ("torch", "onnxruntime", "openvino")


def resolve_backend(name: str | None, device: torch.device, amp_dtype: torch.dtype | None = None) -> str:
    """--backend: None picks the fastest measured path (`bench.py cpu-inference`): torch on
    CUDA; on the CPU OpenVINO for bf16, onnxruntime for fp32 (its path before OpenVINO, as fast
    as OpenVINO's fp32 in docs/cpu-inference.md) and torch for fp16, which neither CPU runtime
    runs here. Raises UsageError for onnxruntime or OpenVINO off the CPU (CPU runtimes here), for
    onnxruntime with a reduced precision (it runs the exported fp32 graph) and for OpenVINO
    in fp16."""
    if name is None:
        if device.type != "cpu" or amp_dtype == torch.float16:
            return "torch"
        return "openvino" if amp_dtype == torch.bfloat16 else "onnxruntime"
    if name in ("onnxruntime", "openvino") and device.type != "cpu":
        raise UsageError(f"--backend {name} runs on the CPU only; pass --device cpu or --backend torch (not {device})")
    if name == "onnxruntime" and amp_dtype is not None:
        raise UsageError(
            f"--backend onnxruntime runs the fp32 ONNX graph; pass --amp off with it (not {amp_name(amp_dtype)})"
        )
    if name == "openvino" and amp_dtype == torch.float16:
        raise UsageError("--backend openvino runs fp32 or bf16 on the CPU; pass --amp bf16 or --amp off (not fp16)")
    return name


def resolve_inference(backend: str | None, amp: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """predict.py's --backend and --amp resolved together: (backend, precision: a reduced
    dtype or None for fp32). `--backend onnxruntime` with `--amp auto` runs in fp32; otherwise
    the precision is `inference_dtype`'s and the backend `resolve_backend`'s for it."""
    if backend == "onnxruntime" and amp == "auto":
        amp = "off"
    dtype = inference_dtype(device, amp)
    return resolve_backend(backend, device, dtype), dtype


def autocast_for(backend: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype `predict_volume` gets: the precision for torch; None for the CPU
    runtimes, which hold their precision inside the compiled network."""
    return dtype if backend == "torch" else None
