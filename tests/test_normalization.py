"""Per-channel normalisation: per volume (never per slice), and statistics from the head
region so that the same tissue gets the same value whatever the slice coverage."""

import numpy as np
import pytest

from dataset import cache_key, discover_patients
from preprocessing import head_mask, normalize_channels, preprocess_volume, preprocessing_config


def ellipsoid_head(n_slices: int, size: int = 64) -> np.ndarray:
    """(S, size, size, 3) uint8: white matter 100, a cortex ring 130, a scalp ring 180 on an
    ellipsoid spanning z in [-1, 1] (narrower towards the ends), background 0."""
    z = np.linspace(-1, 1, n_slices)[:, None, None]
    y, x = np.mgrid[0:size, 0:size]
    ellipse = np.sqrt(((y - size / 2) / (0.4 * size)) ** 2 + ((x - size / 2) / (0.32 * size)) ** 2)
    rho = ellipse / np.sqrt(np.clip(1 - 0.9 * z**2, 0.05, None))
    flair = np.select([rho <= 0.7, rho <= 0.85, rho <= 1.0], [100.0, 130.0, 180.0], 0.0)
    flair = (flair + np.random.default_rng(0).normal(0, 2, flair.shape)) * (rho <= 1)
    return np.repeat(flair[..., None], 3, axis=-1).clip(0, 255).astype(np.uint8)


def test_zscore_is_per_volume_not_per_slice():
    """Slices at gains 1, 2, 3: one affine map per channel fits every unclipped pixel of the
    volume, and the brighter slices stay brighter (per-slice z-scoring makes each slice mean 0)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(50, 100, (1, 2, 16, 16)).astype(np.float32)
    images = base * np.array([1.0, 2.0, 3.0], np.float32)[:, None, None, None]  # (3, 2, 16, 16)
    for region in (None, images[:, 0] > 0):
        out = normalize_channels(images, region)
        means = out[:, 0].mean(axis=(1, 2))
        assert means[0] < means[1] - 0.5 and means[1] < means[2] - 0.5
        for c in range(2):
            low, high = np.percentile(images[:, c], (10, 99))
            inside = (images[:, c] > low) & (images[:, c] < high)
            slope, intercept = np.polyfit(images[:, c][inside], out[:, c][inside], 1)
            np.testing.assert_allclose(out[:, c][inside], slope * images[:, c][inside] + intercept, atol=1e-4)


@pytest.mark.parametrize("region", ["crop", "head"])
def test_preprocess_volume_normalises_per_volume(region):
    images = ellipsoid_head(20)
    out, _, _ = preprocess_volume(images, None, 32, range(20), region)
    middle, end = out[10, 1][16, 16], out[1, 1][16, 16]  # white matter in two slices
    assert abs(middle - end) < 0.2  # same tissue, same value across slices of a volume


def test_region_statistics_come_from_the_region_only():
    images = ellipsoid_head(12)[..., 0][:, None].astype(np.float32)  # (S, 1, H, W)
    region = head_mask(images)
    assert region.shape == (12, 64, 64) and 0.1 < region.mean() < 0.9
    out = normalize_channels(images, region)[:, 0]
    low, high = np.percentile(images[:, 0][region], (10, 99))
    clipped = np.clip(images[:, 0][region], low, high)
    np.testing.assert_allclose(out[region], (clipped - clipped.mean()) / clipped.std(), atol=1e-4)
    assert out[~region].max() < out[region].min() + 1e-6  # the background is darker than any head pixel
    np.testing.assert_array_equal(normalize_channels(images, np.zeros_like(region)), normalize_channels(images))


def test_same_tissue_same_value_with_40_or_12_slices_of_coverage_under_head():
    """White matter at the same voxels, normalised with the whole head (40 slices) or only its
    middle 12 slices: the crop box is the same (the middle slice is the widest)."""
    full, part = ellipsoid_head(40), ellipsoid_head(40)[14:26]
    values = {}
    for region in ("crop", "head"):
        a, _, geometry_40 = preprocess_volume(full, None, 64, range(40), region)
        b, _, geometry_12 = preprocess_volume(part, None, 64, range(12), region)
        assert geometry_40.crop_box == geometry_12.crop_box
        values[region] = (float(a[20, 1, 30:34, 30:34].mean()), float(b[6, 1, 30:34, 30:34].mean()))
    crop_shift = abs(values["crop"][0] - values["crop"][1])  # 0.64 vs 0.29 when written
    head_shift = abs(values["head"][0] - values["head"][1])  # -0.81 vs -0.82 when written
    assert crop_shift > 0.2 and head_shift < 0.05


def test_norm_region_is_validated_and_part_of_the_cache_key(phantom_dir):
    with pytest.raises(ValueError, match="normalisation region 'brain'"):
        preprocess_volume(ellipsoid_head(4), None, 32, range(4), "brain")
    assert preprocessing_config(64)["norm_region"] == "crop"
    patient = discover_patients(phantom_dir)[0]
    assert cache_key(patient, preprocessing_config(64, "head")) != cache_key(patient, preprocessing_config(64))
