"""Overlays and the Dice chart: what a person sees, checked on hand-made masks."""

import numpy as np
import pytest
from matplotlib.colors import to_rgb, to_rgba

from dataset import discover_patients, read_volume
from predict import write_overlays
from utils import OVERLAY_ALPHA, OVERLAY_REGIONS, ROLE_STYLES, dice_axis_range, overlay, plot_dice_distribution

SIZE, WIDTH_PX = 64, 640


def blocks() -> tuple[np.ndarray, np.ndarray]:
    """Truth = columns 10-39, prediction = columns 25-54, rows 20-43: overlap 25-39."""
    truth = np.zeros((SIZE, SIZE), bool)
    prediction = np.zeros((SIZE, SIZE), bool)
    truth[20:44, 10:40] = True
    prediction[20:44, 25:55] = True
    return prediction, truth


def pixel(rgb: np.ndarray, row: int, col: int) -> np.ndarray:
    """The rendered colour at the centre of native pixel (row, col); the image fills the
    width and sits under a 0.5-inch (50 px) title band."""
    scale = rgb.shape[1] / SIZE
    return rgb[50 + int((row + 0.5) * scale), int((col + 0.5) * scale)].astype(int)


def blended_on_black(colour: str) -> np.ndarray:
    return np.round(255 * OVERLAY_ALPHA * np.array(to_rgb(colour))).astype(int)


def test_overlay_separates_agreement_prediction_only_and_truth_only():
    prediction, truth = blocks()
    rgb = overlay(np.zeros((SIZE, SIZE)), prediction, truth, title="P slice 7 Dice 0.5", width_px=WIDTH_PX)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[1:] == (WIDTH_PX, 3)
    assert rgb.shape[0] > WIDTH_PX  # the image keeps its aspect; title and legend are added
    for region, (row, col) in {"truth_only": (32, 15), "agreement": (32, 32), "prediction_only": (32, 48)}.items():
        expected = blended_on_black(OVERLAY_REGIONS[region][0])
        assert np.abs(pixel(rgb, row, col) - expected).max() <= 3, region
    assert pixel(rgb, 5, 5).max() == 0  # background: the black slice, nothing drawn
    assert pixel(rgb, 20, 32).max() > 0  # the outline (2.5 pt) is drawn on the upper edge


def test_overlay_without_truth_draws_no_truth_colours():
    prediction, truth = blocks()
    rgb = overlay(np.zeros((SIZE, SIZE)), prediction, None, width_px=WIDTH_PX)
    expected = blended_on_black(OVERLAY_REGIONS["prediction_only"][0])
    assert np.abs(pixel(rgb, 32, 32) - expected).max() <= 3  # all of the prediction is "prediction only"
    assert pixel(rgb, 32, 15).max() == 0  # truth-only area of the other test: nothing here
    sky_blue = np.round(255 * np.array(to_rgb(OVERLAY_REGIONS["truth_only"][0]))).astype(int)
    assert not (np.abs(rgb.astype(int) - sky_blue).max(axis=-1) <= 10).any()  # not even in the legend


def test_overlay_grey_scale_survives_hot_pixels():
    flair = np.full((SIZE, SIZE), 100.0)
    flair[:, : SIZE // 2] = 0.0
    flair[0, 0] = 1e6  # one hot pixel must not turn the brain black
    rgb = overlay(flair, None, None, width_px=WIDTH_PX)
    assert pixel(rgb, 32, 48).min() > 200 and pixel(rgb, 32, 8).max() < 30


def chart_rows() -> list[dict]:
    return [
        {"patient": "A", "dice": 0.91, "role": "test", "gt_pixels": 500},
        {"patient": "B", "dice": 0.97, "role": "test", "gt_pixels": 800},
        {"patient": "C", "dice": 1.0, "role": "unseen", "gt_pixels": 0},
        {"patient": "D", "dice": 0.99, "role": "train", "gt_pixels": 300},
        {"patient": "E", "dice": 0.95, "role": "val", "gt_pixels": 200},
        {"patient": "F", "dice": None, "role": "test", "gt_pixels": None},  # unlabelled: left out
    ]


def test_dice_chart_marks_roles_lesion_free_patients_and_headline_lines(tmp_path):
    from skimage.io import imread

    fig = plot_dice_distribution(chart_rows(), tmp_path / "chart.png", title="demo")
    assert imread(tmp_path / "chart.png").ndim == 3
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["A", "E", "B", "D", "C  (lesion-free)"]  # sorted by Dice, F (no Dice) left out
    colours = [bar.get_facecolor() for bar in ax.patches]
    expected_roles = ["test", "val", "test", "train", "unseen"]
    assert colours == [to_rgba(ROLE_STYLES[role][0]) for role in expected_roles]
    assert [bool(bar.get_hatch()) for bar in ax.patches] == [False, False, False, False, True]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(text.startswith("test") and text.endswith(": 2") for text in legend)
    assert any("lesion-free" in text for text in legend)
    headline = [0.91, 0.97, 1.0]  # test + unseen only: train and val scores are optimistic
    lines = {line.get_linestyle(): line.get_xdata()[0] for line in ax.get_lines() if line.get_color() == "black"}
    assert lines["--"] == pytest.approx(np.mean(headline)) and lines[":"] == pytest.approx(np.median(headline))
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1  # legend right of the bars
    assert ax.get_title() == "demo"


def test_dice_chart_accepts_the_old_mapping_and_rejects_bad_rows(tmp_path):
    fig = plot_dice_distribution({"a": 0.2, "b": 0.9}, tmp_path / "old.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="unknown role 'holdout'"):
        plot_dice_distribution([{"patient": "a", "dice": 0.5, "role": "holdout"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no patient with a Dice"):
        plot_dice_distribution([{"patient": "a", "dice": None}], tmp_path / "x.png")


@pytest.mark.parametrize("values", [[0.93, 0.99, 1.0], [0.2, 0.95], [0.0, 1.0], [1.0, 1.0]])
def test_dice_axis_range_shows_the_spread_and_keeps_one_visible(values):
    low, high = dice_axis_range(values)
    lowest = min(values)
    assert low <= lowest and 1.0 <= high < 1.05
    assert low >= lowest - 0.2 * (1.0 - lowest) - 0.06  # not always from 0: the spread fills the axis
    assert low == pytest.approx(round(low / 0.05) * 0.05)  # a round tick value


def test_write_overlays_names_sort_by_slice(small_phantom, tmp_path):
    patient = next(p for p in discover_patients(small_phantom) if read_volume(p)[1].any())
    images, truth = read_volume(patient)
    written = write_overlays(patient, images, truth.astype(bool), truth, tmp_path, dice=1.0)
    names = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    numbers = [patient.kept[s].number for s in np.flatnonzero(truth.any(axis=(1, 2)))]
    assert written == len(numbers) and names == [f"{patient.patient_id}_{k:03d}.png" for k in numbers]
