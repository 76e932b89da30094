"""Checkpoint writing and loading; hd95 against a brute-force computation."""

import os

import numpy as np
import pytest
import torch
from scipy import ndimage

import utils
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap_state_dict
from metrics import hd95


def test_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "fsync", crash)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(utils.os, "fsync", os.fsync)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(path)


def test_unwrap_state_dict_strips_nested_prefixes():
    state = {"module._orig_mod.a.weight": 1, "_orig_mod.b": 2, "c.module_x": 3}
    assert unwrap_state_dict(state) == {"a.weight": 1, "b": 2, "c.module_x": 3}


# ------------------------------------------------------------------------------- hd95


def brute_force_hd95(a, b):
    """MONAI's convention by hand: a surface voxel has a face neighbour (6 in 3-D) that is
    background or outside the array; all-pairs Euclidean distances; max of the two directed
    95th percentiles."""

    def surface(mask):
        padded = np.pad(mask, 1)
        points = []
        for idx in zip(*np.nonzero(mask)):
            centre = tuple(i + 1 for i in idx)
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    neighbour = list(centre)
                    neighbour[axis] += step
                    if not padded[tuple(neighbour)]:
                        points.append(idx)
                        break
                else:
                    continue
                break
        return np.array(points, float)

    sa, sb = surface(a), surface(b)
    distances = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_hd95_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(4, 9, 9), (6, 12, 10), (15, 15)]:
        for _ in range(4):
            a = ndimage.binary_opening(rng.random(shape) > 0.45)
            b = ndimage.binary_opening(rng.random(shape) > 0.55)
            if a.any() and b.any():
                assert hd95(a, b) == pytest.approx(brute_force_hd95(a, b), abs=1e-9)


def test_hd95_crop_does_not_change_the_value_and_empty_is_nan():
    rng = np.random.default_rng(1)
    a = ndimage.binary_opening(rng.random((5, 10, 10)) > 0.4)
    b = ndimage.binary_opening(rng.random((5, 10, 10)) > 0.5)
    big_a, big_b = np.zeros((12, 40, 40), bool), np.zeros((12, 40, 40), bool)
    big_a[3:8, 20:30, 5:15], big_b[3:8, 20:30, 5:15] = a, b
    assert hd95(big_a, big_b) == pytest.approx(hd95(a, b))
    touching = np.zeros_like(a)  # masks on the array border: outside counts as background
    touching[:, :, :3] = True
    assert hd95(touching, a) == pytest.approx(brute_force_hd95(touching, a))
    assert hd95(a, a) == 0.0
    assert np.isnan(hd95(a, np.zeros_like(a))) and np.isnan(hd95(np.zeros_like(a), a))
