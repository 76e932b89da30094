"""The OpenVINO backend: predict.py's CPU default where the CPU has native bf16, and the hub
pipeline's CPU default.

The network is converted straight from PyTorch (`openvino.convert_model`, about 2 s at 256 px,
against about 4 s for the ONNX export that onnxruntime needs) and compiled for the CPU in one of
two inference precisions, "bf16" (on a CPU with native bf16 instructions,
`inference.cpu_has_native_bf16`) or "f32". The precision is set explicitly either way: OpenVINO's
own default on a CPU with AMX is bf16. Inputs and outputs stay float32. Why this path:
`python bench.py cpu-inference` (docs/cpu-inference.md) times it against torch, torch.compile and
onnxruntime on the same weights and slices; in fp32 onnxruntime is as fast or faster, so
predict.py keeps it there."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import torch

from checkpoint import CheckpointError
from export import input_channels, max_abs_difference
from inference import LoadedModel

PRECISIONS = ("f32", "bf16")  # OpenVINO's INFERENCE_PRECISION_HINT values we use
# Largest accepted |OpenVINO - torch fp32| probability on random inputs when the network is
# converted. f32 is the same arithmetic as torch (measured: 6e-8). bf16 keeps 8 significant
# bits: on these random inputs probabilities moved by at most 2e-4 (on real slices of the
# published model up to 0.03, at the edges of lesions), so 0.1 flags a wrong graph, never
# rounding; the effect on masks is bench.py precision's job (docs/precision.md).
TOLERANCE = {"f32": 1e-4, "bf16": 0.1}


class OpenVinoModel:
    """A U-Net compiled by OpenVINO for the CPU, called like a UNetModel:
    (B, in_channels, H, W) float tensor -> probabilities (B, 1, H, W) float32 tensor, with H
    and W multiples of 16 and any batch size. `precision` is "f32" or "bf16" (the arithmetic
    inside; weights are converted from the float32 model, inputs and outputs stay float32).
    Raises ImportError when openvino is not installed (requirements.txt pins it)."""

    def __init__(self, model: torch.nn.Module, image_size: int, precision: str, threads: int | None = None):
        import openvino  # only this backend needs it

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
        example = torch.zeros(2, input_channels(model), image_size, image_size)
        with warnings.catch_warnings():  # tracing warns about the shape check in UNetModel.forward
            warnings.simplefilter("ignore")
            converted = openvino.convert_model(model, example_input=example)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",  # one stream on all threads: fastest for batches of slices
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),  # the cores torch would use
        }
        self.compiled = openvino.Core().compile_model(converted, "CPU", config)
        self.precision = precision

    def eval(self) -> OpenVinoModel:
        return self  # inference only, like a torch model in eval mode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(np.asarray(self.compiled(batch)[0], dtype=np.float32))


def checked_openvino(model: torch.nn.Module, image_size: int, precision: str, source: str) -> OpenVinoModel:
    """`model` compiled by OpenVINO in `precision`, checked against PyTorch fp32 on two random
    inputs (`export.max_abs_difference`). Raises CheckpointError naming `source` when a
    probability differs by more than TOLERANCE[precision]."""
    compiled = OpenVinoModel(model, image_size, precision)
    difference = max_abs_difference(model, compiled, image_size)
    if not difference <= TOLERANCE[precision]:
        raise CheckpointError(
            f"{source}: OpenVINO ({precision}) differs from PyTorch by {difference:.3g}; use --backend torch"
        )
    return compiled


_COMPILED: dict[tuple, OpenVinoModel] = {}  # (checkpoint path, size, mtime, ctime, precision) -> network


def precision_of(dtype: torch.dtype | None) -> str:
    """OpenVINO's precision for a resolved --amp dtype: None (fp32) -> "f32", bfloat16 -> "bf16".
    Raises ValueError for any other dtype (`inference.resolve_backend` refuses fp16 first)."""
    if dtype is None:
        return "f32"
    if dtype == torch.bfloat16:
        return "bf16"
    raise ValueError(f"OpenVINO runs fp32 or bf16 on the CPU, not {dtype}")


def with_openvino(loaded: LoadedModel, dtype: torch.dtype | None) -> LoadedModel:
    """The same checkpoint with its network run by OpenVINO in the precision of `dtype` (None:
    fp32, or torch.bfloat16): predict.py's `--backend openvino`. Converted and checked once per
    checkpoint file, precision and process (the last 4 are kept). Raises CheckpointError as
    `checked_openvino`."""
    precision = precision_of(dtype)
    stat = loaded.path.stat()
    key = (str(loaded.path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, precision)
    if key not in _COMPILED:
        _COMPILED[key] = checked_openvino(loaded.model, loaded.image_size, precision, str(loaded.path))
        while len(_COMPILED) > 4:
            del _COMPILED[next(iter(_COMPILED))]
    return dataclasses.replace(loaded, model=_COMPILED[key])
