"""Work off the training thread: one worker that runs the end of each epoch (the host part of
validation, checkpoint writing, pictures) while the next epoch trains.

The training thread hands over only host copies (`host_copy`), so the worker never reads a
tensor that the optimiser is changing. Jobs run one at a time in the order they were
submitted; at most `max_pending` wait, so memory stays bounded (one epoch's checkpoint and
masks) and a slow disk slows training down instead of piling up copies. A job's exception
is raised again in the training thread at the next `submit` or at `close`, so a failed
checkpoint write stops the run instead of going unnoticed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def host_copy(tree: Any) -> Any:
    """A copy of `tree` (nested dicts, lists and tuples) in which every tensor is a detached
    CPU copy that shares no memory with the original; other values are kept as they are
    (checkpoint state holds numbers, strings and None there). On CUDA this is one
    device-to-host copy per tensor, the only sync it costs."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(value) for value in tree)
    return tree


class BackgroundWorker:
    """Runs submitted jobs in order on one daemon thread (`enabled`), or at once in the
    caller's thread (`enabled=False`: the in-line mode of `train.py --no-background`).

    `submit(job)` first waits until fewer than `max_pending` jobs are queued or running.
    Errors: the first exception of a job is raised by the next `submit`, `wait` or `close`
    (later jobs still run, so an epoch whose checkpoint was written stays written)."""

    def __init__(self, enabled: bool = True, max_pending: int = 1):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.enabled, self.max_pending = enabled, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-end") if enabled else None
        self._pending: list[Future] = []

    @property
    def idle(self) -> bool:
        """Whether every submitted job has finished (always true in-line)."""
        return all(future.done() for future in self._pending)

    def make_room(self) -> float:
        """Wait until fewer than `max_pending` jobs are queued or running; the seconds
        waited (0 in-line). Raises a finished job's exception."""
        start = time.perf_counter()
        while len(self._pending) >= self.max_pending:
            self._finish(self._pending.pop(0))
        return time.perf_counter() - start

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job` (after `make_room`), or run it now when in-line."""
        if self._pool is None:
            job()
            return
        self.make_room()
        self._pending.append(self._pool.submit(job))

    def wait(self) -> None:
        """Block until every submitted job has finished; raise the first failure."""
        error = None
        while self._pending:
            try:
                self._finish(self._pending.pop(0))
            except BaseException as exc:  # keep waiting for the rest, then raise the first
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """`wait`, then stop the thread (also when a job failed)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    @staticmethod
    def _finish(future: Future) -> None:
        future.result()
