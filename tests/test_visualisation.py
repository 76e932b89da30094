"""Overlays, thumbnails, the Dice chart and the learning curves: what a person sees, checked on
hand-made masks and numbers."""

import numpy as np
import pytest
from matplotlib.colors import to_rgb, to_rgba

from dataset import discover_patients, read_volume
from pictures import (
    DASH_PX,
    LEGEND_PX,
    MIN_WIDTH_PX,
    OVERLAY_ALPHA,
    OVERLAY_REGIONS,
    ROLE_STYLES,
    best_epoch,
    overlay,
    plot_dice_distribution,
    plot_learning_curves,
    png_bytes,
    thumbnail,
    view_box,
    zoom_box,
)
from predict import write_overlays

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
    assert pixel(rgb, 20, 32).max() > 0  # the upper edge: fill and thin outline


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


def is_colour(rgb: np.ndarray, colour: str, tolerance: int = 10) -> np.ndarray:
    """(h, w) bool: pixels within `tolerance` per channel of the pure `colour`."""
    return np.abs(rgb.astype(int) - np.round(255 * np.array(to_rgb(colour)))).max(axis=-1) <= tolerance


def test_outlines_lie_just_outside_each_mask_truth_solid_prediction_dashed():
    """A 64-px frame drawn 640 px wide: each native pixel is a 10 x 10 block. Truth rows
    20-43 x columns 10-39 (display rows 250-489 under the 50-px title band, columns
    100-399), prediction rows 20-43 x columns 25-54 (columns 250-549)."""
    prediction, truth = blocks()
    rgb = overlay(np.zeros((SIZE, SIZE)), prediction, truth, width_px=WIDTH_PX)
    above = rgb[50 + 199]  # the display row just above both masks
    truth_line = is_colour(above[100:250], OVERLAY_REGIONS["truth_only"][0])  # above truth only
    assert truth_line.all()  # solid
    prediction_line = is_colour(above[400:550], OVERLAY_REGIONS["prediction_only"][0])  # above prediction only
    runs = np.flatnonzero(np.diff(prediction_line.astype(int))) + 1  # where the dashes start and stop
    assert 0.4 < prediction_line.mean() < 0.6 and set(np.diff(runs)) == {DASH_PX}  # dashed, DASH_PX on and off
    assert not is_colour(rgb[50 + 200, 100:550], OVERLAY_REGIONS["truth_only"][0]).any()  # inside: fill only
    assert not is_colour(rgb[50 + 198], OVERLAY_REGIONS["truth_only"][0]).any()  # one pixel wide


def test_title_and_legend_are_drawn_in_their_bands():
    prediction, truth = blocks()
    untitled = overlay(np.zeros((SIZE, SIZE)), prediction, truth, width_px=WIDTH_PX)
    titled = overlay(np.zeros((SIZE, SIZE)), prediction, truth, title="P slice 7 Dice 0.5", width_px=WIDTH_PX)
    assert (untitled[:50] == 255).all() and (titled[:50] < 128).any()  # black text on white, only when given
    legend = titled[-LEGEND_PX:]
    for colour, _ in OVERLAY_REGIONS.values():  # the swatches: the colour at 80 % over white
        swatch = np.round(255 * (0.8 * np.array(to_rgb(colour)) + 0.2))
        assert (np.abs(legend.astype(int) - swatch).max(axis=-1) <= 2).sum() > 50, colour
    assert (legend < 128).all(axis=-1).sum() > 200  # the labels


def test_a_small_lesion_inset_is_framed_and_its_square_marked():
    flair, prediction, truth = head_and_small_lesion()
    black = np.zeros_like(flair)  # on a black slice the only white pixels are the frame and the square
    white = (overlay(black, prediction, truth, width_px=WIDTH_PX)[50:-LEGEND_PX] == 255).all(axis=-1)
    side = round(0.4 * WIDTH_PX)
    assert white.sum() > 4 * side  # the inset's frame, at least
    rows, cols = np.nonzero(white)
    square = (rows < WIDTH_PX / 2) & (cols < WIDTH_PX / 2)  # the lesion is in the upper left quadrant
    lesion_rows = np.flatnonzero((prediction | truth).any(axis=1)) * WIDTH_PX / flair.shape[0]
    assert square.any() and rows[square].min() < lesion_rows.min() and rows[square].max() > lesion_rows.max()
    big = disc(128, 30)  # no inset: nothing white
    assert not (overlay(black, big, big, width_px=WIDTH_PX)[50:-LEGEND_PX] == 255).all(axis=-1).any()


def test_a_long_title_shrinks_to_fit_and_a_tiny_frame_gets_no_inset():
    title = "TCGA_CS_4941_19960909_a_long_folder_name_given_by_a_user   slice 12   patient Dice 0.873"
    rgb = overlay(np.zeros((SIZE, SIZE)), None, None, title=title, width_px=MIN_WIDTH_PX)
    band = rgb[:50]
    assert (band < 128).any() and (band[:, :5] == 255).all() and (band[:, -5:] == 255).all()
    tiny = np.zeros((16, 16), bool)
    tiny[3, 3] = True  # small, but a 16-px frame cannot show it magnified 2x in an inset
    picture = overlay(np.zeros((16, 16)), tiny, tiny, width_px=WIDTH_PX)[50:-LEGEND_PX]
    assert not (picture == 255).all(axis=-1).any()  # no white frame


def test_overlay_refuses_bad_input_with_a_clear_error():
    prediction, truth = blocks()
    with pytest.raises(ValueError, match=f"width_px 399: must be at least {MIN_WIDTH_PX}"):
        overlay(np.zeros((SIZE, SIZE)), prediction, truth, width_px=MIN_WIDTH_PX - 1)
    with pytest.raises(ValueError, match=r"truth \(10, 10\) and flair \(64, 64\): the shapes differ"):
        overlay(np.zeros((SIZE, SIZE)), prediction, truth[:10, :10])
    with pytest.raises(ValueError, match="not a non-empty box inside the frame"):
        overlay(np.zeros((SIZE, SIZE)), prediction, truth, crop=(10, 10, 0, 64))


def test_the_slice_is_enlarged_smoothly():
    """Bilinear, as a radiologist's viewer shows it: a black-to-white edge 64 -> 640 px
    passes through intermediate greys (nearest neighbour would jump from 0 to 255)."""
    flair = np.zeros((SIZE, SIZE))
    flair[:, SIZE // 2 :] = 1.0
    row = overlay(flair, None, None, width_px=WIDTH_PX)[50 + 320, :, 0].astype(int)
    assert ((row > 30) & (row < 225)).sum() >= 5


def test_a_nan_pixel_does_not_blacken_the_slice():
    flair = np.full((SIZE, SIZE), 100.0)
    flair[:, : SIZE // 2] = 0.0
    flair[3, 40] = np.nan
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


def test_write_overlays_names_sort_by_slice(small_phantom, tmp_path):
    patient = next(p for p in discover_patients(small_phantom) if read_volume(p)[1].any())
    images, truth = read_volume(patient)
    written = write_overlays(patient, images, truth.astype(bool), truth, tmp_path, dice=1.0)
    names = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    numbers = [patient.kept[s].number for s in np.flatnonzero(truth.any(axis=(1, 2)))]
    assert written == len(numbers) and names == [f"{patient.patient_id}_{k:03d}.png" for k in numbers]


def test_write_overlays_raises_the_failure_of_a_slice(small_phantom, tmp_path, monkeypatch):
    import predict

    patient = next(p for p in discover_patients(small_phantom) if read_volume(p)[1].any())
    images, truth = read_volume(patient)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(predict, "overlay", disk_full)  # the drawing threads must not swallow it
    with pytest.raises(OSError, match="No space left"):
        write_overlays(patient, images, truth.astype(bool), truth, tmp_path, dice=1.0)


# ------------------------------------------------------------------------ errors, crop, zoom


def disc(size: int, radius: float, centre=None) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = centre or (size / 2, size / 2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def shown_in_colour(rgb: np.ndarray, mask: np.ndarray, size: int, expected: np.ndarray) -> np.ndarray:
    """Per True pixel of `mask` ((size, size), no crop: the image fills the width under the
    50 px title band): whether any display pixel it covers shows `expected` within 30 per
    channel. A display pixel covers the native pixel under its centre."""
    image = rgb[50 : 50 + rgb.shape[1]].astype(int)
    native = ((np.arange(rgb.shape[1]) + 0.5) * size / rgb.shape[1]).astype(int)
    close = np.abs(image - expected).max(axis=-1) < 30
    shown = np.zeros((size, size), bool)
    np.logical_or.at(shown, (native[:, None], native[None, :]), close)
    return shown[mask]


@pytest.mark.parametrize("error", ["prediction_only", "truth_only"])
def test_a_one_pixel_error_rim_is_visible_above_the_outlines(error):
    """A 256-px slice drawn 640 px wide (2.5 px per pixel), a rim of ~190 false-positive (or
    missed) pixels around the lesion: every rim pixel must show its fill colour somewhere;
    outlines drawn over the fill, or over the rim, would hide it."""
    size = 256
    flair = np.where(disc(size, 100), 0.5, 0.0)  # the head: white after the grey scaling
    inner, outer = disc(size, 30), disc(size, 31)
    prediction, truth = (outer, inner) if error == "prediction_only" else (inner, outer)
    rgb = overlay(flair, prediction, truth, width_px=640)
    rim = outer & ~inner
    colour = np.array(to_rgb(OVERLAY_REGIONS[error][0])) * 255
    expected = np.round(OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * 255)  # the fill over white tissue
    assert rim.sum() > 150 and shown_in_colour(rgb, rim, size, expected).all()
    other = "truth_only" if error == "prediction_only" else "prediction_only"
    outline = np.array(to_rgb(OVERLAY_REGIONS[other][0])) * 255  # the inner mask's outline lies in the rim
    assert not (np.abs(rgb[50 : 50 + 640].astype(int) - outline).max(axis=-1) <= 10).any()  # under the fill


def head_and_small_lesion(size: int = 128):
    flair = np.where(disc(size, 40), 1.0, 0.0)  # a head of diameter 80 in a 128-px frame
    truth = np.zeros((size, size), bool)
    truth[50:53, 50:53] = True  # 3 x 3, in the upper left quadrant of the head
    prediction = np.zeros_like(truth)
    prediction[51:55, 51:55] = True
    return flair, prediction, truth


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the image area (below the title, above the legend) that are not grey."""
    image = rgb[50 : 50 + rgb.shape[1]].astype(int)  # a square crop is drawn square
    return image.max(axis=-1) - image.min(axis=-1) > 60


def test_overlay_crops_to_the_head_and_magnifies_a_small_lesion():
    flair, prediction, truth = head_and_small_lesion()
    box = view_box(flair[None, ..., None], prediction, truth)
    assert box[0] <= 24 and box[1] >= 104 and box[1] - box[0] <= 80 + 8  # the head, a small margin
    rgb = overlay(flair, prediction, truth, width_px=400, crop=box)
    assert rgb.shape[1] == 400
    middle = 50 + (64 - box[0]) * 400 // (box[1] - box[0])  # the head's widest row
    first_bright = int(np.argmax(rgb[middle, :, 0] > 200))  # the head's left edge, drawn
    assert 0 < first_bright < 0.06 * 400  # near the image's left edge (uncropped: at 19 %)
    lesion_pixels = (prediction | truth).sum() * (400 / (box[3] - box[2])) ** 2  # drawn at full-frame scale
    spots = coloured(rgb)
    assert spots.sum() > 4 * lesion_pixels  # the inset magnifies it (without: about 1x)
    half = spots.shape[0] // 2
    assert spots[half:, half:].sum() > 0.8 * spots.sum()  # inset in the corner opposite the lesion


def test_zoom_box_only_for_small_lesions_and_inside_the_frame():
    lesion = np.zeros((100, 100), bool)
    assert zoom_box(lesion) is None
    lesion[0:2, 97:100] = True  # 2 x 3 at the top right corner
    y0, y1, x0, x1 = zoom_box(lesion)
    assert (y1 - y0, x1 - x0) == (12, 12) and (y0, x1) == (0, 100)  # at least 12 px, shifted inside
    middle = np.zeros((100, 100), bool)
    middle[40:48, 40:42] = True  # 8 px: small; the square is twice that, centred on it
    assert zoom_box(middle) == (36, 52, 33, 49)
    big = np.zeros((100, 100), bool)
    big[10:20, 10:14] = True  # 10 px tall: 10 % of the frame, not small
    assert zoom_box(big) is None


def test_thumbnail_keeps_the_region_colours_at_a_small_size():
    prediction, truth = blocks()
    small = thumbnail(np.zeros((SIZE, SIZE)), prediction, truth, crop=(0, 64, 0, 64), size=32)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    for region, (row, col) in {"truth_only": (32, 15), "agreement": (32, 32), "prediction_only": (32, 48)}.items():
        assert np.abs(small[row // 2, col // 2].astype(int) - blended_on_black(OVERLAY_REGIONS[region][0])).max() <= 3
    tall = thumbnail(np.zeros((SIZE, SIZE)), None, None, crop=(0, 64, 16, 48), size=40)
    assert tall.shape == (40, 20, 3) and tall.max() == 0


def test_dice_chart_bars_start_at_zero_and_a_zero_score_stays_visible(tmp_path):
    rows = [{"patient": p, "dice": d, "role": "test"} for p, d in [("zero", 0.0), ("a", 0.92), ("b", 0.94), ("c", 1.0)]]
    fig = plot_dice_distribution(rows, tmp_path / "chart.png")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0.0 and ax.get_xlim()[1] >= 1.0
    assert [(bar.get_x(), round(bar.get_width(), 9)) for bar in ax.patches] == [
        (0, 0.0),
        (0, 0.92),
        (0, 0.94),
        (0, 1.0),
    ]
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    x, y = ax.transData.transform((0.0, 0.0))  # the zero patient's dot: on the axis, not clipped away
    row, col = int(round(rgb.shape[0] - y)), int(round(x))
    blue = np.round(255 * np.array(to_rgb(ROLE_STYLES["test"][0]))).astype(int)
    patch = rgb[row - 2 : row + 3, col - 1 : col + 3].reshape(-1, 3)
    assert (np.abs(patch - blue).max(axis=1) <= 40).any()


def test_learning_curves_draw_the_history_and_mark_the_best_epoch():
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "dice_mean": d, "dice_median": d - 0.1, "lr": 0.01 / e}
        for e, d in [(1, 0.2), (2, 0.6), (3, 0.5), (4, 0.6)]
    ]
    assert best_epoch(history)["epoch"] == 2  # the first of equal means: best_model.pt is not replaced on a tie
    fig = plot_learning_curves(history)
    loss_ax, dice_ax, lr_ax = fig.axes
    drawn = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
    assert drawn["training"] == [1, 0.5, 1 / 3, 0.25] and drawn["validation"] == pytest.approx([1.2, 0.6, 0.4, 0.3])
    assert drawn["mean"] == [0.2, 0.6, 0.5, 0.6] and drawn["median"] == pytest.approx([0.1, 0.5, 0.4, 0.5])
    assert drawn["lr"] == pytest.approx([0.01, 0.005, 0.01 / 3, 0.0025])
    for ax in fig.axes:  # the best epoch's dotted line in every panel
        assert [
            list(line.get_xdata())
            for line in ax.get_lines()
            if line.get_linestyle() == ":" and line.get_label().startswith("_")
        ] == [[2, 2]]
    star = next(line for line in dice_ax.get_lines() if line.get_marker() == "*")
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([2], [0.6]) and "best epoch 2" in star.get_label()
    assert png_bytes(fig)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="lack lr"):
        plot_learning_curves([{k: v for k, v in history[0].items() if k != "lr"}])
    with pytest.raises(ValueError, match="no validated epoch"):
        plot_learning_curves([])
