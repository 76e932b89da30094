"""2.5-D input: each slice with its C neighbours on each side stacked as channels."""

import numpy as np
import torch

from dataset import MRISegmentationDataset, Volume, neighbour_indices, stack_context
from network import UNetModel
from preprocessing import Geometry


def labelled_volume(n_slices: int, offset: int) -> np.ndarray:
    """(S, 3, 4, 4) float16 where every pixel of slice s, channel c holds 10 (offset + s) + c."""
    values = 10 * (offset + np.arange(n_slices))[:, None] + np.arange(3)  # (S, 3)
    return np.broadcast_to(values[:, :, None, None], (n_slices, 3, 4, 4)).astype(np.float16)


def test_neighbour_indices_clamp_at_the_edges():
    expected = [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    np.testing.assert_array_equal(neighbour_indices(4, 2), expected)
    np.testing.assert_array_equal(neighbour_indices(3, 0), [[0], [1], [2]])


def test_stack_context_channel_order_numpy_and_torch():
    images = labelled_volume(5, 0)
    stacked = stack_context(images, 1)
    assert stacked.shape == (5, 9, 4, 4)
    # slice 0: (0, 0, 1) repeated border; slice 2: (1, 2, 3); slice 4: (3, 4, 4)
    np.testing.assert_array_equal(stacked[0, :, 0, 0], [0, 1, 2, 0, 1, 2, 10, 11, 12])
    np.testing.assert_array_equal(stacked[2, :, 0, 0], [10, 11, 12, 20, 21, 22, 30, 31, 32])
    np.testing.assert_array_equal(stacked[4, :, 0, 0], [30, 31, 32, 40, 41, 42, 40, 41, 42])
    as_tensor = stack_context(torch.from_numpy(images), 1)
    np.testing.assert_array_equal(as_tensor.numpy(), stacked)
    assert stack_context(images, 0) is images


def test_dataset_items_and_context_table_stay_inside_each_volume():
    geometry = Geometry((4, 4), (0, 4, 0, 4), (0, 0, 0, 0), 4, 1.0, ())
    volumes = [
        Volume(f"p{i}", labelled_volume(n, offset), np.zeros((n, 4, 4), np.uint8), geometry)
        for i, (n, offset) in enumerate([(3, 0), (4, 100)])
    ]
    data = MRISegmentationDataset(volumes, context_slices=1)
    images, _ = data.stacked()  # (7, 3, 4, 4)
    table = data.context_table()  # (7, 3)
    np.testing.assert_array_equal(table, [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 6]])
    gathered = torch.from_numpy(images)[torch.from_numpy(table)].flatten(1, 2)  # (7, 9, 4, 4)
    for i in range(len(data)):
        image, mask = data[i]
        assert image.shape == (9, 4, 4) and mask.shape == (1, 4, 4)
        np.testing.assert_array_equal(image.numpy(), gathered[i].float().numpy())
    np.testing.assert_array_equal(data[3][0][:, 0, 0], [1000, 1001, 1002] * 2 + [1010, 1011, 1012])  # no leak from p0
    assert data[0][0].shape == (9, 4, 4)


def test_unet_takes_context_channels():
    model = UNetModel(in_channels=9, base_filters=4).eval()
    with torch.no_grad():
        out = model(stack_context(torch.randn(2, 3, 32, 32), 1))
    assert out.shape == (2, 1, 32, 32)
