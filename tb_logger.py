"""A thin TensorBoard `SummaryWriter` wrapper that does nothing on non-zero ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TBLogger:
    """Scalars and images to TensorBoard from rank 0 only; every call is a no-op elsewhere."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        """`purge_step`: when continuing a run's folder, TensorBoard hides the points it
        logged at steps >= purge_step (epochs that a resumed run trains again)."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """rgb: uint8 (H, W, 3)."""
        if self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
