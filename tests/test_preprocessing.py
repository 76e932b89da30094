"""Volume preprocessing invariants and the exact inverse geometry."""

import numpy as np
import pytest

from preprocessing import brain_bounding_box, preprocess_volume, restore_geometry


def head_volume(rng, slices=6, height=60, width=48):
    images = np.zeros((slices, height, width, 3), np.uint8)
    images[:, 10:50, 8:40] = rng.integers(60, 200, (slices, 40, 32, 3))
    return images


def test_shapes_and_normalisation():
    rng = np.random.default_rng(0)
    images = head_volume(rng)
    out, masks, geometry = preprocess_volume(images, None, 32, range(2, 8))
    assert out.shape == (6, 3, 32, 32) and out.dtype == np.float32
    assert masks is None
    assert geometry.crop_box == (10, 50, 8, 40)
    assert geometry.slice_numbers == (2, 3, 4, 5, 6, 7)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-3)


def test_constant_channel_and_dark_volume_give_zeros_not_nan():
    rng = np.random.default_rng(1)
    images = head_volume(rng)
    images[..., 2] = 0
    out, _, _ = preprocess_volume(images, None, 32, range(6))
    assert np.isfinite(out).all() and (out[:, 2] == 0).all()
    dark = np.zeros((4, 20, 30, 3), np.uint8)
    out, _, geometry = preprocess_volume(dark, np.zeros((4, 20, 30), bool), 16, range(4))
    assert geometry.crop_box == (0, 20, 0, 30)
    assert np.isfinite(out).all() and (out == 0).all()


def test_bounding_box_uses_per_channel_threshold():
    volume = np.zeros((3, 20, 20, 3), np.uint16)
    volume[1, 5:7, 3:9, 0] = 1000  # bright channel 0
    volume[2, 12, 15, 2] = 5  # dim channel 2, but it is that channel's maximum
    volume[0, 0, 0, 0] = 90  # below 10 % of channel 0's max: ignored
    assert brain_bounding_box(volume) == (5, 13, 3, 16)


def random_blob_masks(rng, slices, height, width, box):
    y0, y1, x0, x1 = box
    masks = np.zeros((slices, height, width), bool)
    masks[:, y0:y1, x0:x1] = rng.random((slices, y1 - y0, x1 - x0)) > 0.6
    return masks


@pytest.mark.parametrize("image_size", [40, 48, 64])  # the 40 x 40 padded box: 1:1 and two upsamplings
def test_round_trip_is_exact_when_upsampling(image_size):
    rng = np.random.default_rng(2)
    images = head_volume(rng, height=60, width=48)
    masks = random_blob_masks(rng, 6, 60, 48, (10, 50, 8, 40))
    _, pre_masks, geometry = preprocess_volume(images, masks, image_size, range(6))
    assert set(np.unique(pre_masks)) <= {0, 1}
    back = restore_geometry(pre_masks, geometry)
    assert back.shape == masks.shape
    np.testing.assert_array_equal(back.astype(bool), masks)


def test_round_trip_when_downsampling_differs_only_at_boundaries():
    images = np.zeros((4, 120, 100, 3), np.uint8)
    images[:, 5:115, 5:95] = 150
    masks = np.zeros((4, 120, 100), bool)
    yy, xx = np.mgrid[:120, :100]
    masks[:] = (yy - 60) ** 2 / 900 + (xx - 50) ** 2 / 400 < 1
    _, pre_masks, geometry = preprocess_volume(images, masks, 64, range(4))
    back = restore_geometry(pre_masks, geometry).astype(bool)
    from scipy.ndimage import binary_dilation, binary_erosion

    boundary = binary_dilation(masks, iterations=2) & ~binary_erosion(masks, iterations=2)
    assert (back != masks)[~boundary].sum() == 0
    assert (back != masks).sum() < 0.1 * masks.sum()


def test_probability_maps_restore_bilinear():
    rng = np.random.default_rng(4)
    images = head_volume(rng)
    _, _, geometry = preprocess_volume(images, None, 32, range(6))
    probs = np.full((6, 32, 32), 0.75, np.float32)
    back = restore_geometry(probs, geometry, mode="bilinear")
    y0, y1, x0, x1 = geometry.crop_box
    assert back.dtype == np.float32 and back.shape == (6, 60, 48)
    np.testing.assert_allclose(back[:, y0:y1, x0:x1], 0.75, atol=1e-6)
    assert back[:, :y0].sum() == 0


# --------------------------------------------------------------------- stray bright pixels


def all_bright_box(volume):
    """The old rule, computed independently: the box of every pixel above 10 % of its
    channel's maximum in any slice."""
    bright = (volume > 0.1 * volume.max(axis=(0, 1, 2))).any(axis=(0, 3))
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


@pytest.mark.parametrize("corner", [(0, 0), (57, 45)])
def test_speck_in_one_slice_moves_neither_box_nor_normalisation(corner):
    rng = np.random.default_rng(5)
    images = head_volume(rng)
    clean, _, clean_geometry = preprocess_volume(images, None, 32, range(6))
    y, x = corner
    images[2, y : y + 3, x : x + 3] = 200  # a 3 x 3 speck as bright as the head, in one slice
    speckled, _, geometry = preprocess_volume(images, None, 32, range(6))
    assert geometry == clean_geometry and geometry.crop_box == (10, 50, 8, 40)
    np.testing.assert_allclose(speckled, clean, atol=0.02)


def head_with_csf_gap(open_ring: bool):
    """Scalp ring, a dark CSF gap, then the brain: two bright regions, the brain larger."""
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 30, xx - 33)
    scalp = (radius >= 26) & (radius < 28)
    if open_ring:
        scalp &= xx < 50  # a C-shaped scalp, open on the right
    brain = radius < 20
    volume = np.zeros((5, 64, 64, 3), np.uint8)
    volume[:, scalp] = 180
    volume[:, brain] = 90
    return volume, scalp, brain


@pytest.mark.parametrize("open_ring", [False, True])
def test_box_holds_scalp_separated_from_brain_by_csf(open_ring):
    volume, scalp, brain = head_with_csf_gap(open_ring)
    assert brain.sum() > scalp.sum()  # the largest region alone would cut the scalp off
    head = scalp | brain
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    assert brain_bounding_box(volume) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)


def test_normal_volumes_keep_the_whole_head(phantom_dir):
    from dataset import discover_patients, read_volume

    for patient in discover_patients(phantom_dir):
        images, _ = read_volume(patient)
        assert brain_bounding_box(images) == all_bright_box(images), patient.patient_id
