"""Where and how a training process runs: device, rank and world size under torchrun
(DistributedDataParallel), mixed precision, determinism, and the collectives that keep the
ranks in step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from checkpoint import CheckpointError
from inference import AMP_CHOICES, amp_name, autocast_dtype
from patients import DataError
from utils import UsageError, resolve_device


class FollowRankZero(Exception):
    """Rank 0 reported an error (and printed it); this rank only stops."""


@dataclass
class Runtime:
    """Where this process runs: device, rank, world size, mixed precision."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_name(self) -> str:
        return amp_name(self.amp_dtype)


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device and process group (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn: SyncBatchNorm works only on CUDA devices")
    if world_size > 1:
        if device.type == "cuda":
            device = resolve_device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size, autocast_dtype(device, args.amp))


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """--deterministic: deterministic algorithms (an op without one raises), cuDNN's
    deterministic kernels and no cudnn.benchmark autotuning. Without it, cudnn.benchmark is
    on for CUDA. The previous process-wide settings come back on exit (tests run in-process)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    before += (torch.backends.cudnn.deterministic,)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = device.type == "cuda" and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def on_rank_zero(runtime: Runtime, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only and hand its result to every rank, so that all ranks follow
    one decision. An error it raises is re-raised on rank 0 and stops the others quietly."""
    outcome: list[Any] = [None, None]
    if runtime.is_main:
        try:
            outcome[0] = work()
        except (UsageError, CheckpointError, DataError) as error:
            if not runtime.distributed:
                raise
            outcome[1] = error
    if runtime.distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        if runtime.is_main:
            raise outcome[1]
        raise FollowRankZero()
    return outcome[0]


def mean_over_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of a tensor over all processes (a copy); NaN or inf on any rank reaches all."""
    value = value.detach().clone()
    if runtime.distributed:
        dist.all_reduce(value)
        value /= runtime.world_size
    return value


def sync_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them
    only at the start of a training forward pass, after which each rank's batches move its
    own copy; validating without this would score a different model on each rank."""
    if runtime.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_over_ranks(results: list[dict], runtime: Runtime) -> list[dict]:
    """Every rank's per-patient results on every rank (a collective: the training thread
    calls it, never the background worker)."""
    if not runtime.distributed:
        return results
    gathered: list = [None] * runtime.world_size
    dist.all_gather_object(gathered, results)
    return [r for part in gathered for r in part]


def exit_now(message: str) -> None:
    """Print before leaving the process group: once one rank exits, torchrun stops the others."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


def add_runtime_flags(add: Callable[..., Any]) -> None:
    """Declare where and how the processes run through `add` (`utils.RunFlags.add`)."""
    add(
        "--amp",
        defines_run=True,
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision; auto = bf16 on GPUs that support it, else fp16; off on CPU",
    )
    add("--sync-bn", defines_run=True, action="store_true", help="synchronise BatchNorm across processes (CUDA)")
    add("--compile", action="store_true", help="torch.compile the model")
    add(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms, cudnn.benchmark off: two GPU runs with the same seed match",
    )
