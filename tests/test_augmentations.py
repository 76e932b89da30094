"""Images and masks go through the same resampling: a mask resampled with another
`align_corners` (or another grid) than its image ends up out of line with it."""

import numpy as np
import torch

from augmentations import affine_matrices, apply_affine


def blob_pair(size: int = 32):
    """A random binary mask (1, 1, H, W) and an image whose every channel equals it."""
    mask = torch.from_numpy(np.random.default_rng(0).random((size, size)) < 0.3).float()[None, None]
    return mask.repeat(1, 3, 1, 1), mask


def test_quarter_turn_with_flip_moves_image_and_mask_identically():
    """A 90-degree rotation with a flip maps pixel centres onto pixel centres, so the
    bilinear image and the nearest mask must both equal the exactly permuted original."""
    images, masks = blob_pair()
    params = {"scale": torch.ones(1), "angle": torch.full((1,), 90.0), "flip": torch.ones(1)}
    warped, warped_masks = apply_affine(images, masks, affine_matrices(params))
    assert warped_masks.sum() == masks.sum()
    np.testing.assert_allclose(warped[0, 0].numpy(), warped_masks[0, 0].numpy(), atol=1e-4)
    reference = masks[0, 0].numpy()
    assert any(np.array_equal(warped_masks[0, 0].numpy(), np.rot90(np.fliplr(reference), k)) for k in (1, 3))


def test_mask_is_sampled_where_the_image_is_sampled():
    """Channels 0 and 1 are the x and y pixel coordinates: bilinear resampling of a linear
    ramp is exact, so the warped image says where each output pixel was sampled from. The
    warped mask must be the nearest input mask pixel there. A mask resampled with a
    different align_corners (or another grid) lands up to half a pixel off and fails this."""
    size = 48
    mask = torch.from_numpy(np.random.default_rng(1).random((size, size)) < 0.4)
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    frame = torch.ones(size, size)
    frame[0, 0] = 0  # the channel minimum, so zero padding reads as 0: frame < 1 where outside pixels mix in
    images = torch.stack([x, y, frame])[None]  # (1, 3, H, W)
    params = {"scale": torch.full((1,), 1.15), "angle": torch.full((1,), 17.0), "flip": torch.ones(1)}
    warped, warped_masks = apply_affine(images, mask.float()[None, None], affine_matrices(params))
    x_src, y_src = warped[0, 0].numpy(), warped[0, 1].numpy()
    inside = warped[0, 2].numpy() > 1 - 1e-5
    no_tie = (np.abs(x_src % 1 - 0.5) > 0.02) & (np.abs(y_src % 1 - 0.5) > 0.02)
    valid = inside & no_tie
    assert valid.mean() > 0.5
    expected = mask.numpy()[np.rint(y_src).astype(int).clip(0, size - 1), np.rint(x_src).astype(int).clip(0, size - 1)]
    np.testing.assert_array_equal(warped_masks[0, 0].numpy()[valid], expected[valid])
