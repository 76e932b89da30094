"""Slice sampling schemes: the drawn lesion-slice share equals the configured one, draws
follow the documented weights, and every scheme is seeded by its torch.Generator."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from dataset import MRISegmentationDataset, discover_patients, load_volumes
from sampling import AreaSampler, ForegroundSampler, PatientFirstSampler, forced_foreground, make_sampler


def toy_slices():
    """Three patients (50, 30 and 20 slices); lesion slices with areas 1..40; patient 2 lesion-free."""
    patients = np.repeat([0, 1, 2], [50, 30, 20])
    areas = np.zeros(100)
    areas[10:30] = np.arange(1, 21)  # patient 0: 20 lesion slices
    areas[55:60] = [40, 30, 20, 10, 5]  # patient 1: 5 lesion slices
    return areas, patients


def within_binomial(observed: float, expected: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(max(expected * (1 - expected), 1e-12) / n) + 1e-12


@pytest.mark.parametrize("lesion_fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_foreground_oversampling_share_is_the_configured_lesion_fraction(lesion_fraction):
    areas, patients = toy_slices()
    steps, batch = 2000, 8  # 8 x fraction is an integer: exactly that many forced per batch
    sampler = ForegroundSampler(areas, patients, lesion_fraction)
    drawn = sampler(steps, batch, torch.Generator().manual_seed(0)).view(steps, batch).numpy()
    is_lesion = areas[drawn] > 0  # (steps, batch)
    forced = round(batch * lesion_fraction)
    assert is_lesion[:, batch - forced :].all()  # the forced share is exact in every batch
    base = (areas > 0).mean()  # the uniform draws hit a lesion slice with this probability
    uniform_part = is_lesion[:, : batch - forced]
    if uniform_part.size:
        assert within_binomial(uniform_part.mean(), base, uniform_part.size)
    expected = lesion_fraction + (1 - lesion_fraction) * base
    tolerance = 4 * (1 - lesion_fraction) * math.sqrt(base * (1 - base) / max(1, uniform_part.size))
    assert abs(is_lesion.mean() - expected) <= tolerance + 1e-12
    assert sampler.lesion_share(batch) == pytest.approx(expected)


def test_foreground_draws_follow_lesion_area_and_uniform_rest():
    areas, patients = toy_slices()
    steps, batch = 4000, 4
    drawn = ForegroundSampler(areas, patients, 0.5)(steps, batch, torch.Generator().manual_seed(1)).view(steps, batch)
    forced = np.bincount(drawn[:, 2:].flatten().numpy(), minlength=100) / (steps * 2)
    np.testing.assert_allclose(forced, areas / areas.sum(), atol=0.012)  # by area among lesion slices
    uniform = np.bincount(drawn[:, :2].flatten().numpy(), minlength=100) / (steps * 2)
    np.testing.assert_allclose(uniform, 0.01, atol=0.006)  # every slice, lesion or not, equally


def test_nnunet_rounding_of_the_forced_share():
    assert [forced_foreground(b, 1 / 3) for b in (2, 3, 8, 16)] == [1, 1, 3, 5]
    with pytest.raises(ValueError, match="lesion fraction 1.5"):
        ForegroundSampler(*toy_slices(), 1.5)


@pytest.mark.parametrize("floor", [0.1, 1.0, 3.0])
def test_area_sampler_share_follows_area_plus_pooled_floor(floor):
    areas, patients = toy_slices()
    weights = areas + floor * areas.mean()
    expected = weights[areas > 0].sum() / weights.sum()
    sampler = AreaSampler(areas, patients, floor)
    n = 40000
    drawn = sampler(n // 8, 8, torch.Generator().manual_seed(2)).numpy()
    assert within_binomial((areas[drawn] > 0).mean(), expected, n)
    assert sampler.lesion_share(8) == pytest.approx(expected)


def test_patient_first_draws_patients_uniformly_then_slices_by_area():
    areas, patients = toy_slices()
    n = 60000
    drawn = PatientFirstSampler(areas, patients, 0.1)(n // 10, 10, torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(np.bincount(patients[drawn]) / n, 1 / 3, atol=0.01)  # not by slice count
    for p in (0, 1, 2):
        members = np.flatnonzero(patients == p)
        area = areas[members]
        weights = area + 0.1 * area.mean() if area.any() else np.ones_like(area)
        observed = np.bincount(drawn[patients[drawn] == p] - members[0], minlength=len(members))
        np.testing.assert_allclose(observed / observed.sum(), weights / weights.sum(), atol=0.015)


def test_same_generator_seed_same_indices_and_schemes_differ():
    areas, patients = toy_slices()
    for cls in (AreaSampler, ForegroundSampler, PatientFirstSampler):
        sampler = cls(areas, patients)
        first = sampler(5, 6, torch.Generator().manual_seed(9))
        assert first.dtype == torch.int64 and first.shape == (30,)
        assert torch.equal(first, sampler(5, 6, torch.Generator().manual_seed(9)))


def test_make_sampler_on_a_dataset(phantom_dir, tmp_path):
    volumes = load_volumes(discover_patients(phantom_dir)[:3], 32, None, num_workers=1)
    data = MRISegmentationDataset(volumes)
    v_of_slice = data.slice_patients()
    assert [v for v, _ in data.index] == v_of_slice.tolist()
    for scheme in ("area", "foreground", "patient"):
        drawn = make_sampler(data, scheme)(4, 6, torch.Generator().manual_seed(0))
        assert 0 <= int(drawn.min()) and int(drawn.max()) < len(data)
    with pytest.raises(ValueError, match="expected one of area, foreground, patient"):
        make_sampler(data, "balanced")


WORKERS_SCRIPT = """
import sys
import torch
from dataset import MRISegmentationDataset, discover_patients, load_volumes
from sampling import StreamedSlices

data = MRISegmentationDataset(load_volumes(discover_patients(sys.argv[1])[:3], 32, None, num_workers=1))


def batches(workers: int, first_step: int) -> list:
    stream = StreamedSlices(data, torch.device("cpu"), workers)
    return list(stream.batches(5, 4, torch.Generator().manual_seed(3), first_step))


def same(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second)
    )


whole, resumed = batches(0, 0), batches(0, 2)
assert len(whole) == 5 and same(resumed, whole[2:])
assert same(batches(2, 0), whole) and same(batches(2, 2), resumed)
print("same batches")
"""


def test_worker_processes_stream_the_same_batches(phantom_dir):
    """`--num-workers 2` with `--data-placement stream` (DataLoader worker processes) reads the
    same batches in the same order as the training process alone, from the first step and from
    a save within the epoch. In a fresh process: after a DataLoader forked its workers from
    a pytest-xdist worker, that worker died of a SIGSEGV in a later test that ran torchrun
    (seen under strace, every time in a clean clone)."""
    command = [sys.executable, "-c", WORKERS_SCRIPT, str(phantom_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "same batches"
