"""A thin TensorBoard `SummaryWriter` wrapper that does nothing on non-zero ranks and makes
its run folder only when the first event is written."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class TBLogger:
    """Scalars and images to TensorBoard from rank 0 only; every call is a no-op elsewhere.

    The `SummaryWriter` (which creates the folder and its events file at once) is opened at
    the first scalar or image, so a run refused, failed or interrupted before it logged
    anything leaves no empty run folder under --log-dir, even when killed outright."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        """`purge_step`: when continuing a run's folder, TensorBoard hides the points it
        logged at steps >= purge_step (epochs that a resumed run trains again)."""
        self.log_dir, self.enabled, self.purge_step = Path(log_dir), enabled, purge_step
        self.writer: SummaryWriter | None = None
        self._lock = threading.Lock()  # the first event may come from the background worker
        if enabled:  # imported here, on the main thread: a missing tensorboard fails at set-up
            from torch.utils.tensorboard import SummaryWriter

            self._writer_class = SummaryWriter

    def _open(self) -> SummaryWriter | None:
        """The writer, opened on first use; None when disabled."""
        if self.enabled and self.writer is None:
            with self._lock:
                if self.writer is None:
                    self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self.writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._open() is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """rgb: uint8 (H, W, 3)."""
        if self._open() is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the writer if one was opened (nothing is created otherwise)."""
        if self.writer is not None:
            self.writer.close()
