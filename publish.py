"""The weights to publish: a finished run's checkpoint without the state that only continues
training (optimiser, schedule, scaler, RNG), as `checkpoint.published_checkpoint` makes it.

    python publish.py --model-path runs/lgg/best_model.pt --output weights/lgg_unet.pt

Prints the file's size and sha256 (for the model card and tests/test_published_weights.py).
The masks it predicts are those of the checkpoint it came from: the weights are copied as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_checkpoint, published_checkpoint, require_training_checkpoint
from utils import CLIParser, HelpFormatter, atomic_write_bytes


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def publish(model_path: str, output: str) -> str:
    """Write the published copy of `model_path` to `output` (atomic); its sha256. Raises
    CheckpointError for a file that is not a finished run's training checkpoint (no chosen
    post-processing: the run's last epoch did not end)."""
    saved = require_training_checkpoint(load_checkpoint(model_path), model_path)
    if "postprocessing" not in saved:
        raise CheckpointError(
            f"{model_path}: holds no chosen post-processing; publish best_model.pt of a finished run "
            "(or run train.py --choose-postprocessing on it first)"
        )
    buffer = io.BytesIO()
    torch.save(published_checkpoint(saved), buffer)
    atomic_write_bytes(buffer.getvalue(), Path(output))
    return sha256_of(output)


def main(argv: list[str] | None = None) -> str:
    parser = CLIParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-path", required=True, help="best_model.pt of a finished run")
    parser.add_argument("--output", required=True, help="the file to write, e.g. weights/lgg_unet.pt")
    args: argparse.Namespace = parser.parse_args(argv)
    try:
        digest = publish(args.model_path, args.output)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.output}: {Path(args.output).stat().st_size / 1e6:.1f} MB, sha256 {digest}")
    return digest


if __name__ == "__main__":
    main()
