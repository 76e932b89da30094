"""Metrics in physical units and lesion by lesion: hd95 in mm against a brute
force over surface voxel coordinates scaled by the spacing, volumes, and the BraTS 2023
lesion-wise counts and Dice against a reference written with explicit neighbour loops."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from metrics import hd95, lesion_metrics, volume_stats

# ------------------------------------------------------------------------- references


def surface_points(mask: np.ndarray) -> np.ndarray:
    """Coordinates (N, ndim) of the voxels with a face neighbour (6 in 3-D) that is background
    or outside the array: MONAI's edges, found with explicit neighbour loops."""
    padded = np.pad(mask, 1)
    points = []
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            neighbour = [i + 1 for i in idx]
            neighbour[axis] += step
            if not padded[tuple(neighbour)]:
                points.append(idx)
                break
    return np.array(points, float)


def brute_force_hd95_mm(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """All-pairs Euclidean distances between the surface voxels, each coordinate in mm."""
    sa, sb = surface_points(a) * spacing, surface_points(b) * spacing
    distances = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """Neighbour steps whose squared length is at most `connectivity` (scipy's meaning):
    3 -> the 26 neighbours, 2 -> the 18 face and edge neighbours."""
    return [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(abs(x) for x in d) <= connectivity]


def inside(voxel, shape) -> bool:
    return all(0 <= v < n for v, n in zip(voxel, shape))


def components(voxels: set, steps: list) -> list[set]:
    """Connected components of a voxel set by breadth-first search."""
    left, found = set(voxels), []
    while left:
        start = left.pop()
        component, queue = {start}, [start]
        while queue:
            v = queue.pop()
            for d in steps:
                n = (v[0] + d[0], v[1] + d[1], v[2] + d[2])
                if n in left:
                    left.remove(n)
                    component.add(n)
                    queue.append(n)
        found.append(component)
    return found


def dilate(voxels: set, shape, steps: list, iterations: int) -> set:
    """Repeated dilation: each pass adds every in-array neighbour of the current set."""
    grown = set(voxels)
    for _ in range(iterations):
        grown |= {(v[0] + d[0], v[1] + d[1], v[2] + d[2]) for v in grown for d in steps}
        grown = {v for v in grown if inside(v, shape)}
    return grown


def reference_lesion_metrics(prediction, truth, voxel_volume=1.0, min_volume=0.0) -> dict:
    """BraTS 2023's lesion-wise rules, spelled out on voxel sets."""
    shape = truth.shape
    truth_set = set(zip(*np.nonzero(truth)))
    predicted = components(set(zip(*np.nonzero(prediction))), offsets(3))
    regions = components(dilate(truth_set, shape, offsets(2), 3), offsets(3))
    touched, tp, fn, dice_sum = set(), 0, 0, 0.0
    for region in regions:
        lesion = region & truth_set
        hits = [i for i, c in enumerate(predicted) if c & region]
        touched |= set(hits)
        if len(lesion) * voxel_volume <= min_volume:
            continue
        if hits:
            tp += 1
            union = set().union(*(predicted[i] for i in hits))
            dice_sum += 2 * len(union & lesion) / (len(union) + len(lesion))
        else:
            fn += 1
    fp = len(predicted) - len(touched)
    lesions = tp + fn
    return {
        "gt_lesions": lesions,
        "lesion_tp": tp,
        "lesion_fn": fn,
        "lesion_fp": fp,
        "lesion_f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 1.0,
        "lesionwise_dice": dice_sum / (lesions + fp) if lesions + fp else 1.0,
    }


def assert_same(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-12), key


# ------------------------------------------------------------------------------- hd95


SPACING = (5.0, 0.9, 0.7)  # (slice, row, col) mm: three different sizes catch a swapped axis


def test_hd95_in_mm_matches_brute_force_and_differs_from_voxels():
    rng = np.random.default_rng(19)
    checked = 0
    for shape in [(4, 9, 9), (6, 12, 10)]:
        for _ in range(4):
            a = ndimage.binary_opening(rng.random(shape) > 0.45)
            b = ndimage.binary_opening(rng.random(shape) > 0.55)
            if a.any() and b.any():
                expected = brute_force_hd95_mm(a, b, np.array(SPACING))
                assert hd95(a, b, SPACING) == pytest.approx(expected, abs=1e-9)
                assert hd95(a, b, SPACING[::-1]) != pytest.approx(expected)  # the order of the axes matters
                checked += 1
    assert checked >= 6
    assert hd95(a, b, (1.0, 1.0, 1.0)) == hd95(a, b)  # unit spacing is the voxel figure
    assert np.isnan(hd95(a, np.zeros_like(a), SPACING))


def test_hd95_of_a_shift_across_slices_is_the_slice_step():
    truth = np.zeros((8, 10, 10), bool)
    truth[2:5, 3:7, 3:7] = True
    moved = np.roll(truth, 1, axis=0)  # one slice further up
    assert hd95(moved, truth, SPACING) == pytest.approx(5.0)
    assert hd95(np.roll(truth, 1, axis=2), truth, SPACING) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="expected 3 positive voxel sizes"):
        hd95(moved, truth, (1.0, 1.0))


def test_volumes_in_mm3_and_voxels():
    truth, prediction = np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool)
    truth[1, :2, :2] = True  # 4 voxels
    prediction[1, :2, :3] = True  # 6 voxels
    assert volume_stats(prediction, truth) == {"gt_volume": 4, "pred_volume": 6, "volume_error": 0.5}
    mm3 = volume_stats(prediction, truth, SPACING)
    assert mm3["gt_volume"] == pytest.approx(4 * 5.0 * 0.9 * 0.7)
    assert mm3["pred_volume"] == pytest.approx(6 * 5.0 * 0.9 * 0.7)
    assert mm3["volume_error"] == pytest.approx(0.5)
    assert volume_stats(prediction, np.zeros_like(truth))["volume_error"] is None


# ------------------------------------------------------------------------ lesion-wise


def blob_volume(rng, shape, blobs) -> np.ndarray:
    volume = np.zeros(shape, bool)
    for _ in range(blobs):
        centre = [rng.integers(0, n) for n in shape]
        size = [rng.integers(1, 3) for _ in shape]
        volume[tuple(slice(c, c + s) for c, s in zip(centre, size))] = True
    return volume


def test_lesion_metrics_match_the_neighbour_loop_reference():
    rng = np.random.default_rng(23)
    seen = {"merged": 0, "fp": 0, "fn": 0, "split": 0}
    for trial in range(30):
        shape = (5, 9, 16)
        truth, prediction = blob_volume(rng, shape, 3), blob_volume(rng, shape, 3)
        spacing = SPACING if trial % 2 else None
        min_volume = (0.0, 4.0, 20.0)[trial % 3]
        unit = np.prod(spacing) if spacing else 1.0
        expected = reference_lesion_metrics(prediction, truth, unit, min_volume)
        assert_same(lesion_metrics(prediction, truth, spacing, min_volume), expected)
        pieces = ndimage.label(truth, np.ones((3, 3, 3)))[1]
        seen["merged"] += pieces > expected["gt_lesions"] and min_volume == 0
        seen["fp"] += expected["lesion_fp"] > 0
        seen["fn"] += expected["lesion_fn"] > 0
        seen["split"] += expected["gt_lesions"] > 1
    assert all(count > 0 for count in seen.values()), seen  # every rule was exercised


def box(volume: np.ndarray, *ranges: tuple[int, int]) -> None:
    volume[tuple(slice(a, b) for a, b in ranges)] = True


def test_two_lesions_one_missed():
    truth, prediction = np.zeros((6, 30, 30), bool), np.zeros((6, 30, 30), bool)
    box(truth, (1, 4), (2, 6), (2, 6))  # 3 x 4 x 4 = 48 voxels
    box(truth, (1, 4), (20, 24), (20, 24))
    box(prediction, (1, 4), (2, 6), (3, 6))  # 36 voxels inside the first lesion
    found = lesion_metrics(prediction, truth)
    assert found == {
        "gt_lesions": 2,
        "lesion_tp": 1,
        "lesion_fn": 1,
        "lesion_fp": 0,
        "lesion_f1": pytest.approx(2 / 3),
        "lesionwise_dice": pytest.approx((2 * 36 / (36 + 48)) / 2),
    }


def test_nearby_pieces_merge_into_one_lesion_and_far_ones_do_not():
    truth = np.zeros((5, 12, 40), bool)
    box(truth, (1, 3), (2, 5), (2, 5))
    box(truth, (1, 3), (2, 5), (10, 13))  # 5 empty columns apart: within 2 x 3 dilation steps
    assert lesion_metrics(np.zeros_like(truth), truth)["gt_lesions"] == 1
    box(truth, (1, 3), (2, 5), (20, 23))  # 7 columns from the second piece: a lesion of its own
    missed = lesion_metrics(np.zeros_like(truth), truth)
    assert missed["gt_lesions"] == 2 and missed["lesion_fn"] == 2 and missed["lesion_f1"] == 0.0
    prediction = np.zeros_like(truth)
    box(prediction, (1, 3), (6, 8), (11, 12))  # 2 rows below the second piece: inside its dilated region
    hit = lesion_metrics(prediction, truth)
    assert (hit["lesion_tp"], hit["lesion_fn"], hit["lesion_fp"]) == (1, 1, 0)
    assert hit["lesionwise_dice"] == 0.0  # detected, but no voxel overlaps


def test_false_positive_far_away_and_the_volume_threshold():
    truth, prediction = np.zeros((6, 30, 30), bool), np.zeros((6, 30, 30), bool)
    box(truth, (1, 4), (2, 6), (2, 6))
    prediction |= truth
    box(prediction, (2, 3), (25, 27), (25, 27))  # 4 voxels, far from any lesion
    found = lesion_metrics(prediction, truth)
    assert (found["gt_lesions"], found["lesion_tp"], found["lesion_fp"]) == (1, 1, 1)
    assert found["lesion_f1"] == pytest.approx(2 / 3) and found["lesionwise_dice"] == pytest.approx(0.5)
    box(truth, (1, 2), (15, 16), (15, 16))  # a 1-voxel lesion, 5 x 0.9 x 0.9 = 4.05 mm3
    small = lesion_metrics(prediction, truth, (5.0, 0.9, 0.9), min_lesion_volume=5.0)
    assert (small["gt_lesions"], small["lesion_fn"]) == (1, 0)  # ignored, as BraTS ignores <= 50 mm3
    assert lesion_metrics(prediction, truth, (5.0, 0.9, 0.9), min_lesion_volume=4.0)["lesion_fn"] == 1


def test_empty_truth():
    empty = np.zeros((4, 8, 8), bool)
    assert lesion_metrics(empty, empty) == {
        "gt_lesions": 0,
        "lesion_tp": 0,
        "lesion_fn": 0,
        "lesion_fp": 0,
        "lesion_f1": 1.0,
        "lesionwise_dice": 1.0,
    }
    prediction = empty.copy()
    prediction[1, 1, 1] = prediction[2, 6, 6] = True
    found = lesion_metrics(prediction, empty)
    assert (found["lesion_fp"], found["lesion_f1"], found["lesionwise_dice"]) == (2, 0.0, 0.0)
