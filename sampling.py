"""Which slices each training batch holds (weighted samplers) and where the training set
lives (on the training device, or streamed from the host).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset import MRISegmentationDataset
from utils import UsageError


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} {value}: must be in [0, 1]")


class SliceSampler:
    """Draws training slice indices for an epoch: `sampler(steps, batch_size, generator)`
    returns int64 (steps * batch_size,), batch after batch, indexing the concatenated
    slices of `MRISegmentationDataset` (its `index` / `stacked()` order). Sampling is with
    replacement and on the host, as `WeightedRandomSampler` does."""

    def __init__(self, areas: np.ndarray, patients: np.ndarray):
        self.areas = np.asarray(areas, dtype=np.float64)  # (N,) lesion pixels per slice
        self.patients = np.asarray(patients)  # (N,) volume number of each slice
        self.lesion = self.areas > 0

    def __call__(self, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def lesion_share(self, batch_size: int) -> float:
        """The expected share of lesion slices among the drawn slices."""
        raise NotImplementedError


class AreaSampler(SliceSampler):
    """Pooled area weights (`--sampling area`, the default): weight = lesion area + `floor_fraction` x mean
    area over all slices, so lesion-free slices are still drawn; uniform without lesions."""

    def __init__(self, areas: np.ndarray, patients: np.ndarray, floor_fraction: float = 0.1):
        super().__init__(areas, patients)
        if floor_fraction < 0:
            raise ValueError(f"floor fraction {floor_fraction}: must be >= 0")
        floor = floor_fraction * self.areas.mean()
        self.weights = torch.as_tensor(self.areas + floor if floor > 0 else np.ones_like(self.areas))

    def __call__(self, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, steps * batch_size, True, generator=generator)

    def lesion_share(self, batch_size: int) -> float:
        return float(self.weights[torch.as_tensor(self.lesion)].sum() / self.weights.sum())


def forced_foreground(batch_size: int, lesion_fraction: float) -> int:
    """Slices of a batch that must be lesion slices: nnU-Net's rule (the last
    B - round(B x (1 - p)) samples of a batch are oversampled foreground)."""
    return batch_size - round(batch_size * (1 - lesion_fraction))


class ForegroundSampler(SliceSampler):
    """Foreground oversampling as in nnU-Net (Isensee et al. 2021, `oversample_foreground_percent`):
    in every batch a fixed share `lesion_fraction` of the slices is drawn from lesion slices
    with probability proportional to lesion area, the rest uniformly from all slices."""

    def __init__(self, areas: np.ndarray, patients: np.ndarray, lesion_fraction: float = 1 / 3):
        super().__init__(areas, patients)
        _check_fraction("lesion fraction", lesion_fraction)
        self.lesion_fraction = lesion_fraction

    def __call__(self, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        forced = forced_foreground(batch_size, self.lesion_fraction) if self.lesion.any() else 0
        uniform = torch.randint(len(self.areas), (steps, batch_size - forced), generator=generator)
        if forced == 0:
            return uniform.flatten()
        foreground = torch.as_tensor(np.flatnonzero(self.lesion))
        picks = torch.multinomial(torch.as_tensor(self.areas[self.lesion]), steps * forced, True, generator=generator)
        batches = torch.cat([uniform, foreground[picks].view(steps, forced)], dim=1)  # (steps, B)
        return batches.flatten()

    def lesion_share(self, batch_size: int) -> float:
        forced = forced_foreground(batch_size, self.lesion_fraction) / batch_size if self.lesion.any() else 0.0
        return forced + (1 - forced) * float(self.lesion.mean())


class PatientFirstSampler(SliceSampler):
    """The original implementation's scheme (mateuszbuda/brain-segmentation-pytorch,
    dataset.py): a patient uniformly, then one of its slices with weight = lesion area +
    `floor_fraction` x the patient's mean area; uniform within a lesion-free patient."""

    def __init__(self, areas: np.ndarray, patients: np.ndarray, floor_fraction: float = 0.1):
        super().__init__(areas, patients)
        if floor_fraction < 0:
            raise ValueError(f"floor fraction {floor_fraction}: must be >= 0")
        self.members = [np.flatnonzero(self.patients == p) for p in np.unique(self.patients)]
        width = max(len(m) for m in self.members)
        self.table = torch.zeros(len(self.members), width, dtype=torch.long)  # (P, S_max) slice indices
        self.weights = torch.zeros(len(self.members), width, dtype=torch.float64)  # (P, S_max), 0 = padding
        for p, members in enumerate(self.members):
            area = self.areas[members]
            floor = floor_fraction * area.mean()
            self.table[p, : len(members)] = torch.as_tensor(members)
            self.weights[p, : len(members)] = torch.as_tensor(area + floor if floor > 0 else np.ones_like(area))

    def __call__(self, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        patient = torch.randint(len(self.members), (steps * batch_size,), generator=generator)
        column = torch.multinomial(self.weights[patient], 1, generator=generator)  # (n, 1)
        return self.table[patient, column[:, 0]]

    def lesion_share(self, batch_size: int) -> float:
        lesion = torch.zeros_like(self.weights, dtype=torch.bool)
        for p, members in enumerate(self.members):
            lesion[p, : len(members)] = torch.as_tensor(self.lesion[members])
        per_patient = (self.weights * lesion).sum(dim=1) / self.weights.sum(dim=1)
        return float(per_patient.mean())


SAMPLING_SCHEMES = ("area", "foreground", "patient")


def make_sampler(
    dataset: MRISegmentationDataset, scheme: str = "area", floor_fraction: float = 0.1, lesion_fraction: float = 1 / 3
) -> SliceSampler:
    """The slice sampler for `--sampling` (area | foreground | patient); ValueError otherwise."""
    areas, patients = dataset.slice_areas(), dataset.slice_patients()
    if scheme == "area":
        return AreaSampler(areas, patients, floor_fraction)
    if scheme == "foreground":
        return ForegroundSampler(areas, patients, lesion_fraction)
    if scheme == "patient":
        return PatientFirstSampler(areas, patients, floor_fraction)
    raise ValueError(f"sampling scheme {scheme!r}: expected one of {', '.join(SAMPLING_SCHEMES)}")


class ResidentSlices:
    """The whole training set as tensors on the training device; the slice indices of all
    batches come from `sampler` (default: `make_sampler(dataset)`, area weights) on the host
    and are gathered on the device, so the host does no per-step work. With context slices
    each slice's neighbours (`dataset.context_table()`) are gathered as extra channels."""

    def __init__(self, dataset: MRISegmentationDataset, device: torch.device, sampler: SliceSampler | None = None):
        images, masks = dataset.stacked()
        self.images = torch.from_numpy(images).to(device)  # (N, 3, H, W) float16
        self.masks = torch.from_numpy(masks).to(device)[:, None]  # (N, 1, H, W) uint8
        self.context = torch.from_numpy(dataset.context_table()).to(device)  # (N, 2C+1) neighbour indices
        self.sampler = sampler or make_sampler(dataset)
        self.device = device

    def batches(
        self, steps: int, batch_size: int, generator: torch.Generator, first_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `first_step` .. `steps - 1` of the epoch whose indices `generator` draws
        (all `steps` are drawn, so a resumed epoch gets the batches an uninterrupted one would)."""
        indices = self.sampler(steps, batch_size, generator)
        indices = indices.to(self.device, non_blocking=True).view(steps, batch_size)
        for row in indices[first_step:]:
            images = self.images[self.context[row]].flatten(1, 2)  # (B, 2C+1, 3, H, W) -> (B, 3 (2C+1), H, W)
            yield images.float(), self.masks[row].float()


class StreamedSlices:
    """A DataLoader over the memory-mapped cache; the slice indices come from `sampler`
    (default: `make_sampler(dataset)`), drawn on the host for the whole epoch."""

    def __init__(
        self,
        dataset: MRISegmentationDataset,
        device: torch.device,
        num_workers: int,
        sampler: SliceSampler | None = None,
    ):
        self.dataset, self.device, self.num_workers = dataset, device, num_workers
        self.sampler = sampler or make_sampler(dataset)

    def batches(
        self, steps: int, batch_size: int, generator: torch.Generator, first_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As `ResidentSlices.batches`, read from the cache by `num_workers` processes."""
        loader = DataLoader(
            self.dataset,
            batch_size,
            sampler=self.sampler(steps, batch_size, generator)[first_step * batch_size :].tolist(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        for images, masks in loader:
            yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)


PLACEMENTS = ("auto", "device", "stream")


def training_data(
    dataset: MRISegmentationDataset, device: torch.device, placement: str, num_workers: int, sampler: SliceSampler
) -> tuple[ResidentSlices | StreamedSlices, str]:
    """The training slices placed as `placement` (one of PLACEMENTS) asks: "device" keeps the
    set on `device`, "stream" reads it from the cache each epoch, "auto" keeps it on the
    device when it takes under 40 % of the free GPU memory (always on the CPU). Returns the
    data and the placement used ("device" or "stream")."""
    if placement == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = sum(v.images.nbytes + v.masks.nbytes for v in dataset.volumes)
            placement = "device" if nbytes < 0.4 * free else "stream"
        else:
            placement = "device"
    if placement == "device":
        return ResidentSlices(dataset, device, sampler), placement
    return StreamedSlices(dataset, device, num_workers, sampler), placement


SAMPLING_FLOOR, LESION_FRACTION = 0.1, 0.333  # the defaults of --sampling-floor and --lesion-fraction


def add_sampling_flags(add: Callable[..., Any]) -> None:
    """Declare the sampling and placement flags through `add` (`utils.RunFlags.add`)."""
    add(
        "--sampling",
        defines_run=True,
        choices=SAMPLING_SCHEMES,
        default="area",
        help="training slices: area = weight lesion area + floor (pooled); foreground = nnU-Net's "
        "foreground oversampling (--lesion-fraction of each batch from lesion slices by area, the rest "
        "uniform); patient = a patient uniformly, then a slice by area + floor within it",
    )
    add(
        "--sampling-floor",
        defines_run=True,
        type=float,
        default=SAMPLING_FLOOR,
        help="area/patient: floor weight as a share of the mean area",
    )
    add(
        "--lesion-fraction",
        defines_run=True,
        type=float,
        default=LESION_FRACTION,
        help="foreground: share of each batch from lesion slices",
    )
    add(
        "--data-placement",
        choices=PLACEMENTS,
        default="auto",
        help="device: keep the training set on the training device; stream: DataLoader from "
        "the cache; auto: device if it fits in GPU memory (always on CPU)",
    )


def validate_sampling_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for a sampling floor or lesion fraction that cannot be used
    or that the chosen scheme would ignore."""
    if not (math.isfinite(args.sampling_floor) and args.sampling_floor >= 0):
        raise UsageError(f"--sampling-floor {args.sampling_floor}: must be >= 0 (a share of the mean lesion area)")
    if not 0 <= args.lesion_fraction <= 1:
        raise UsageError(f"--lesion-fraction {args.lesion_fraction}: must be in [0, 1]")
    if args.sampling != "foreground" and args.lesion_fraction != LESION_FRACTION:
        raise UsageError(f"--lesion-fraction {args.lesion_fraction}: only used with --sampling foreground")
    if args.sampling == "foreground" and args.sampling_floor != SAMPLING_FLOOR:
        raise UsageError(f"--sampling-floor {args.sampling_floor}: used with --sampling area or patient only")
