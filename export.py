"""ONNX export of a checkpoint, checked against PyTorch in the same command.

    python export.py --model-path checkpoints/best_model.pt --output model.onnx

The graph takes `images`, preprocessed slices (B, 3, H, W) float32 as preprocessing.preprocess_volume
makes them, (B, 3 (2C + 1), H, W) for a 2.5-D model with C context slices per side stacked as
channels (batch, H and W dynamic; H and W multiples of 16), and returns `probabilities`
(B, 1, H, W) in [0, 1], like `UNetModel.forward`. The checkpoint's image size and model
configuration are stored in the ONNX metadata (`image_size`, `model_config`). The file is
written only when onnxruntime reproduces PyTorch's probabilities within --tolerance.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError
from inference import LoadedModel, load_model, missing_checkpoint
from utils import CLIParser, HelpFormatter, UsageError, atomic_write_bytes, check_writable_dir, ensure_writable_dir

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
TOLERANCE = 1e-4  # largest accepted |onnxruntime - torch| probability difference


def input_channels(model: torch.nn.Module) -> int:
    """The model's input channels: 3, or 3 (2C + 1) for a 2.5-D model with C context slices."""
    return int(getattr(model, "config", {}).get("in_channels", 3))


def export_onnx(model: torch.nn.Module, image_size: int, metadata: dict[str, str] | None = None) -> bytes:
    """Serialized ONNX model of `model` (a CPU fp32 copy), exported with torch.onnx's
    dynamo exporter with dynamic batch, height and width; `metadata` goes to the model's
    metadata_props. Raises whatever torch.onnx raises for an unexportable model."""
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, input_channels(model), image_size, image_size)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=(dims,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
    )
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


class OnnxRuntimeModel:
    """An ONNX model run by onnxruntime on the CPU, called like a UNetModel:
    (B, in_channels, H, W) float tensor -> probabilities (B, 1, H, W) float32 tensor."""

    def __init__(self, onnx_model: bytes | str | Path, threads: int | None = None):
        import onnxruntime  # only this backend needs it: predict.py --backend torch runs without it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same cores torch would use
        source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def eval(self) -> OnnxRuntimeModel:
        return self  # inference only, like a torch model in eval mode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return torch.from_numpy(probabilities)


def max_abs_difference(
    model: torch.nn.Module, runtime: Callable[[torch.Tensor], torch.Tensor], image_size: int, seed: int = 0
) -> float:
    """Largest |runtime - torch| probability (`runtime`: onnxruntime, OpenVINO) over two random
    inputs of different batch size and shape, (2, C, S, S) and (3, C, S + 16, S + 32) with C the
    model's input channels: it also proves the dynamic axes."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).cpu().float().eval()
    worst = 0.0
    channels = input_channels(model)
    for shape in ((2, channels, image_size, image_size), (3, channels, image_size + 16, image_size + 32)):
        images = torch.randn(shape, generator=generator)  # z-scored like preprocessed slices
        with torch.inference_mode():
            expected = model(images)
        worst = max(worst, float((runtime(images) - expected).abs().max()))
    return worst


# ----------------------------------------------------------- the onnxruntime backend

_EXPORTED: dict[tuple, bytes] = {}  # checkpoint (path, size, mtime, ctime) -> checked ONNX bytes


def with_onnxruntime(loaded: LoadedModel) -> LoadedModel:
    """The same checkpoint with its network exported to ONNX (in memory, checked against
    PyTorch like the CLI does) and run by onnxruntime: predict.py's `--backend onnxruntime`.
    The export takes seconds, so it is done once per checkpoint file and process (the last
    4 are kept). Raises CheckpointError when onnxruntime differs by more than TOLERANCE."""
    stat = loaded.path.stat()
    key = (str(loaded.path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _EXPORTED:
        _EXPORTED[key] = checked_onnx(loaded)
        while len(_EXPORTED) > 4:
            del _EXPORTED[next(iter(_EXPORTED))]
    return dataclasses.replace(loaded, model=OnnxRuntimeModel(_EXPORTED[key]))


def checked_onnx(loaded: LoadedModel) -> bytes:
    """ONNX bytes of a checkpoint's network. Raises CheckpointError when onnxruntime does
    not reproduce PyTorch's probabilities within TOLERANCE."""
    data = export_onnx(loaded.model, loaded.image_size)
    difference = max_abs_difference(loaded.model, OnnxRuntimeModel(data), loaded.image_size)
    if not difference <= TOLERANCE:
        raise CheckpointError(
            f"{loaded.path}: onnxruntime differs from PyTorch by {difference:.3g}; use --backend torch"
        )
    return data


# -------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = CLIParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", default="./checkpoints/best_model.pt", help="training checkpoint to export")
    p.add_argument("--output", default="./model.onnx", help="ONNX file to write")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest accepted probability difference")
    return p


def run(args: argparse.Namespace) -> float:
    """Export, check against PyTorch, write the file; returns the max abs difference."""
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance {args.tolerance}: must be > 0")
    output = Path(args.output)
    check_writable_dir(output.parent, "--output")
    if not Path(args.model_path).exists():
        raise CheckpointError(missing_checkpoint(args.model_path))
    loaded = load_model(args.model_path, torch.device("cpu"))
    ensure_writable_dir(output.parent, "--output")  # the checkpoint is usable: the work starts
    metadata = {
        "image_size": str(loaded.image_size),
        "model_config": json.dumps(loaded.model.config),
        "source_checkpoint": Path(args.model_path).name,
        "input": f"{INPUT_NAME}: (batch, {input_channels(loaded.model)}, H, W) float32 slices preprocessed by "
        "preprocessing.preprocess_volume"
        + (", neighbouring slices stacked as channels" if loaded.context_slices else ""),
        "output": f"{OUTPUT_NAME}: (batch, 1, H, W) float32 in [0, 1]",
    }
    data = export_onnx(loaded.model, loaded.image_size, metadata)
    difference = max_abs_difference(loaded.model, OnnxRuntimeModel(data), loaded.image_size)
    print(f"max |onnxruntime - torch| probability difference: {difference:.3g} (bound {args.tolerance:g})")
    if not difference <= args.tolerance:
        raise CheckpointError(
            f"{args.model_path}: onnxruntime differs from PyTorch by {difference:.3g} > --tolerance "
            f"{args.tolerance:g}; {output} was not written"
        )
    atomic_write_bytes(data, output)
    print(f"wrote {output} ({len(data) / 2**20:.1f} MiB, image size {loaded.image_size}, dynamic batch/H/W)")
    return difference


def main(argv: list[str] | None = None) -> float:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
