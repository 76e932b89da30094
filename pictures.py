"""Pictures: slice overlays (truth against prediction, colour-blind-safe) and thumbnails, drawn
with numpy and Pillow; the per-patient Dice chart and the learning curves, drawn with
matplotlib. Colours from Okabe & Ito (2008).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from preprocessing import brain_bounding_box
from summary import HEADLINE_ROLES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Okabe & Ito, "Color Universal Design" (2008): distinguishable with every common colour-vision deficiency.
OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}


# overlay regions: name -> (colour, legend label)
OVERLAY_REGIONS = {
    "agreement": (OKABE_ITO["yellow"], "agreement (truth and prediction)"),
    "prediction_only": (OKABE_ITO["vermillion"], "prediction only (false positive)"),
    "truth_only": (OKABE_ITO["sky_blue"], "truth only (missed)"),
}


OVERLAY_ALPHA = 0.55
TITLE_PX, LEGEND_PX = 50, 110  # bands above and below the image, in pixels
TITLE_FONT_PX, LEGEND_FONT_PX = 18, 14  # from a 640-px width up; scaled down below it
MIN_WIDTH_PX = 400  # narrower, the legend's text would be under 9 px, too small to read
OUTLINE_PX = 1  # outline width, drawn just outside each mask, under the fills
DASH_PX = 4  # the prediction outline: 4 pixels drawn, 4 left out; the truth outline is solid
SMALL_LESION_FRACTION = 0.1  # a lesion box under 10 % of the frame's side gets a zoomed inset
ZOOM_CONTEXT, ZOOM_MIN_SIDE = 2.0, 12  # the inset shows 2x the lesion's extent, at least 12 pixels
INSET_FRACTION = 0.4  # inset side, as a fraction of the image's shorter side: magnified at least 2x


def _figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _rgb(colour: str) -> np.ndarray:
    """'#RRGGBB' -> float RGB in [0, 1], shape (3,)."""
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.float32) / 255


def _grey(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the minimum and the 99.5th percentile (a few hot pixels
    must not darken the whole slice). Constant images become zeros; NaN and infinite
    pixels are left out of the scale and shown black (-inf, NaN) or white (+inf)."""
    image = image.astype(np.float32)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros_like(image)
    low, high = float(image[finite].min()), float(np.percentile(image[finite], 99.5))
    if high <= low:
        return np.zeros_like(image)
    return np.clip(np.nan_to_num((image - low) / (high - low), nan=0.0), 0.0, 1.0)


REGION_ORDER = ("agreement", "prediction_only", "truth_only")  # region codes 1, 2, 3; 0: none
TRUTH_OUTLINE, PREDICTION_OUTLINE = 256, 257  # base codes after the 256 grey levels


def _regions(prediction: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """uint8 (H, W) region codes: 0 none, then REGION_ORDER's agreement, prediction only, truth only."""
    truth = np.zeros_like(prediction) if truth is None else truth
    pixels = {
        "agreement": prediction & truth,
        "prediction_only": prediction & ~truth,
        "truth_only": truth & ~prediction,
    }
    codes = np.zeros(prediction.shape, np.uint8)
    for code, name in enumerate(REGION_ORDER, start=1):
        codes[pixels[name]] = code
    return codes


@functools.lru_cache(maxsize=1)
def _blend_table() -> np.ndarray:
    """uint8 (4, 258, 3): the shown colour for [region code, base code], base code 0-255 a
    grey level, TRUTH_OUTLINE or PREDICTION_OUTLINE an outline's colour; a region's fill is
    its colour over the base at OVERLAY_ALPHA (region 0: the base itself)."""
    base = np.concatenate([np.repeat(np.arange(256, dtype=np.float64)[:, None] / 255, 3, axis=1), [
        _rgb(OVERLAY_REGIONS["truth_only"][0]), _rgb(OVERLAY_REGIONS["prediction_only"][0])
    ]])  # fmt: skip
    table = [base] + [
        (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * _rgb(OVERLAY_REGIONS[name][0]) for name in REGION_ORDER
    ]
    table = np.round(np.stack(table) * 255).astype(np.uint8)
    table.flags.writeable = False  # shared by every overlay (and thread)
    return table


def _nearest(shape: tuple[int, int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices that enlarge an array of `shape` to (height, width) by nearest
    neighbour (each output pixel takes the input pixel under its centre)."""
    rows = ((np.arange(height) + 0.5) * shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * shape[1] / width).astype(int)
    return rows, cols


def _near(mask: np.ndarray, axis: int) -> np.ndarray:
    """Pixels outside `mask` within OUTLINE_PX of it along `axis` (0: above or below, 1: left or
    right), by shifted ORs (scipy's binary_dilation doubled an overlay's time)."""
    near = np.zeros_like(mask)
    size = mask.shape[axis]
    for step in range(1, OUTLINE_PX + 1):
        for src, dst in ((slice(0, size - step), slice(step, size)), (slice(step, size), slice(0, size - step))):
            index_src = (src, slice(None)) if axis == 0 else (slice(None), src)
            index_dst = (dst, slice(None)) if axis == 0 else (slice(None), dst)
            near[index_dst] |= mask[index_src]
    return near & ~mask


def _outline(mask: np.ndarray, dashed: bool) -> np.ndarray:
    """The OUTLINE_PX-wide ring just outside `mask` ((h, w) bool, display pixels). Dashed: the
    ring beside a left or right edge keeps alternate DASH_PX runs of rows, the ring above or
    below an edge alternate runs of columns, so the dashes follow the edge in every direction."""
    beside, above = _near(mask, 1), _near(mask, 0)
    if not dashed:
        return beside | above
    rows, cols = np.arange(mask.shape[0])[:, None], np.arange(mask.shape[1])[None, :]
    return (beside & (rows // DASH_PX % 2 == 0)) | (above & (cols // DASH_PX % 2 == 0))


def _render(grey: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The image part of an overlay at (height, width) display pixels, uint8 RGB. Bottom to top:
    the slice in grey (bilinear), the truth (solid) and prediction (dashed) outlines, then the
    translucent region fills (nearest neighbour: one block per mask pixel). The outlines lie
    outside their masks and under the fills, so they never hide a pixel of any region."""
    from PIL import Image

    grey8 = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    base = np.asarray(grey8.resize((width, height), Image.Resampling.BILINEAR)).astype(np.int16)
    rows, cols = _nearest(grey.shape, height, width)
    if truth is not None:
        base[_outline(truth[rows][:, cols], dashed=False)] = TRUTH_OUTLINE
    base[_outline(prediction[rows][:, cols], dashed=True)] = PREDICTION_OUTLINE
    return _blend_table()[_regions(prediction, truth)[rows][:, cols], base]


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), half-open, of the True pixels of the last two axes; None if none."""
    plane = mask.reshape(-1, *mask.shape[-2:]).any(axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def view_box(volume: np.ndarray, *masks: np.ndarray | None, margin: float = 0.04) -> tuple[int, int, int, int]:
    """The part of the frame a picture shows: (y0, y1, x0, x1), half-open, in pixels.

    volume: (S, H, W, C) images (e.g. `dataset.read_volume`'s native slices); masks:
    (S, H, W) or (H, W) bool/0-1 arrays or None. The box is the head (`brain_bounding_box`)
    joined with every mask pixel (a false positive outside the head stays in view), grown by
    `margin` times its longer side on each side and clipped to the frame.
    """
    height, width = volume.shape[1:3]
    boxes = [brain_bounding_box(volume)] + [_mask_box(np.asarray(m, bool)) for m in masks if m is not None]
    boxes = [b for b in boxes if b is not None]
    y0, y1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    x0, x1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
    grow = int(round(margin * max(y1 - y0, x1 - x0)))
    return max(0, y0 - grow), min(height, y1 + grow), max(0, x0 - grow), min(width, x1 + grow)


def zoom_box(lesion: np.ndarray) -> tuple[int, int, int, int] | None:
    """The square (y0, y1, x0, x1) an overlay magnifies in its inset, or None when the
    lesion (truth or prediction, (H, W) bool) is absent or not small: its box's longer side
    is at least `SMALL_LESION_FRACTION` of the frame's shorter side. The square is centred on
    the lesion, `ZOOM_CONTEXT` times its longer side (at least `ZOOM_MIN_SIDE` pixels) and
    shifted to lie inside the frame."""
    box = _mask_box(lesion)
    frame = min(lesion.shape)
    if box is None:
        return None
    extent = max(box[1] - box[0], box[3] - box[2])
    if extent >= SMALL_LESION_FRACTION * frame:
        return None
    side = min(frame, max(ZOOM_MIN_SIDE, int(np.ceil(ZOOM_CONTEXT * extent))))
    starts = []
    for low, high, size in ((box[0], box[1], lesion.shape[0]), (box[2], box[3], lesion.shape[1])):
        start = (low + high) // 2 - side // 2
        starts.append(min(max(start, 0), size - side))
    return starts[0], starts[0] + side, starts[1], starts[1] + side


def _inset(
    image: np.ndarray, grey: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None
) -> tuple[tuple[int, int, int], tuple[int, int, int, int]] | None:
    """Paste a magnified copy of a small lesion (`zoom_box`) into `image` ((h, w, 3) uint8,
    the rendered slice, changed in place) in the corner farthest from the lesion. Returns
    (top, left, side) of the inset and (y0, y1, x0, x1) of the magnified square, both in
    display pixels of `image` (the square half-open); None when there is no small lesion or
    the inset would magnify it less than 2x (a frame of a few dozen pixels)."""
    lesion = prediction if truth is None else prediction | truth
    box = zoom_box(lesion)
    if box is None:
        return None
    height, width = grey.shape
    image_h, image_w = image.shape[:2]
    side = round(INSET_FRACTION * min(image_h, image_w))
    y0, y1, x0, x1 = box
    sy, sx = image_h / height, image_w / width
    if side < 2 * (y1 - y0) * sy:
        return None
    crop_truth = None if truth is None else truth[y0:y1, x0:x1]
    zoomed = _render(grey[y0:y1, x0:x1], prediction[y0:y1, x0:x1], crop_truth, side, side)
    margin_y, margin_x = round(0.01 * image_h), round(0.01 * image_w)
    lesion_left, lesion_top = (x0 + x1) / 2 < width / 2, (y0 + y1) / 2 < height / 2
    left = image_w - side - margin_x if lesion_left else margin_x
    top = image_h - side - margin_y if lesion_top else margin_y
    image[top : top + side, left : left + side] = zoomed
    return (top, left, side), (round(y0 * sy), round(y1 * sy), round(x0 * sx), round(x1 * sx))


@functools.lru_cache(maxsize=32)
def _font(size: int):
    """DejaVu Sans (matplotlib's bundled font, as in the charts; Latin with accents, Greek and
    Cyrillic, no CJK) at `size` pixels, for Pillow. The overlay threads share one font: Pillow
    renders text holding the GIL, so they never use it at the same time."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def _legend_entries(has_truth: bool) -> list[tuple[str, str, str]]:
    """(kind, colour, label) of the legend: kind "fill", "solid" or "dashed"."""
    colour = {name: c for name, (c, _) in OVERLAY_REGIONS.items()}
    prediction_line = ("dashed", colour["prediction_only"], "prediction outline")
    if not has_truth:
        return [("fill", colour["prediction_only"], "prediction (no truth)"), prediction_line]
    regions = [("fill", c, label) for c, label in OVERLAY_REGIONS.values()]
    return [*regions, ("solid", colour["truth_only"], "truth outline"), prediction_line]


def _draw_legend(draw, entries: list[tuple[str, str, str]], top: int, width: int, font_px: int) -> None:
    """The legend in two columns (filled column by column), centred in the band from `top`."""
    font = _font(font_px)
    swatch_w, swatch_h, gap, row_h = 2 * font_px, font_px * 3 // 4, font_px // 2, round(1.6 * font_px)
    per_column = (len(entries) + 1) // 2
    columns = [entries[:per_column], entries[per_column:]]
    widths = [swatch_w + gap + max(font.getlength(label) for _, _, label in column) for column in columns]
    x = (width - sum(widths) - 2 * font_px) / 2
    y_first = top + (LEGEND_PX - per_column * row_h) / 2
    white = np.ones(3)
    for column, column_w in zip(columns, widths):
        for row, (kind, colour, label) in enumerate(column):
            y = y_first + row * row_h + row_h / 2  # the row's middle
            rgb = _rgb(colour)
            if kind == "fill":
                shown = tuple(int(round(255 * v)) for v in 0.8 * rgb + 0.2 * white)
                draw.rectangle((x, y - swatch_h / 2, x + swatch_w, y + swatch_h / 2), fill=shown)
            else:
                line = tuple(int(round(255 * v)) for v in rgb)
                step = DASH_PX * 2 if kind == "dashed" else swatch_w
                for x_start in np.arange(x, x + swatch_w, step):
                    x_end = min(x + swatch_w, x_start + (DASH_PX * 1.5 if kind == "dashed" else swatch_w))
                    draw.line((x_start, y, x_end, y), fill=line, width=3)
            draw.text((x + swatch_w + gap, y), label, fill="black", font=font, anchor="lm")
        x += column_w + 2 * font_px


def overlay(
    flair: np.ndarray,
    prediction: np.ndarray | None,
    truth: np.ndarray | None,
    title: str = "",
    width_px: int = 640,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Picture of one slice for a person: RGB uint8 (TITLE_PX + h + LEGEND_PX, `width_px`, 3),
    the image h pixels high at its own aspect ratio.

    flair: (H, W) any real dtype, shown in grey; prediction, truth: (H, W) bool/0-1 or None
    (no truth: an unlabelled patient). crop: (y0, y1, x0, x1) half-open part of the frame to
    show (e.g. `view_box` of the patient: the head), None for the whole frame. Translucent
    fills in Okabe-Ito colours separate agreement (yellow), prediction only (vermillion,
    false positive) and truth only (sky blue, missed); thin outlines just outside each mask
    (truth solid, prediction dashed, so overlap stays readable without colour) lie under the
    fills, so a one-pixel error rim is never hidden by a line. A lesion smaller than
    `SMALL_LESION_FRACTION` of the shown frame gets a magnified inset (`zoom_box`) in the
    corner farthest from it, its square marked in white. `title` (e.g. patient, slice and
    Dice) goes above the image, a legend below. Drawn with numpy and Pillow, not matplotlib
    (10-15 ms a slice on one core), so predict.py can draw every slice of every patient.
    Raises ValueError for `width_px` under MIN_WIDTH_PX, a mask whose shape differs from
    `flair`'s, or a crop that is empty or leaves the frame.
    """
    from PIL import Image, ImageDraw

    if width_px < MIN_WIDTH_PX:
        raise ValueError(f"width_px {width_px}: must be at least {MIN_WIDTH_PX}")
    for name, mask in (("prediction", prediction), ("truth", truth)):
        if mask is not None and mask.shape != flair.shape:
            raise ValueError(f"{name} {mask.shape} and flair {flair.shape}: the shapes differ")
    if crop is not None:
        y0, y1, x0, x1 = crop
        if not (0 <= y0 < y1 <= flair.shape[0] and 0 <= x0 < x1 <= flair.shape[1]):
            raise ValueError(f"crop {crop}: not a non-empty box inside the frame {flair.shape}")
        flair = flair[y0:y1, x0:x1]
        prediction = None if prediction is None else prediction[y0:y1, x0:x1]
        truth = None if truth is None else truth[y0:y1, x0:x1]
    height, width = flair.shape
    prediction = np.zeros((height, width), bool) if prediction is None else prediction.astype(bool)
    truth = None if truth is None else truth.astype(bool)
    image_h = max(1, round(width_px * height / width))
    grey = _grey(flair)
    image = _render(grey, prediction, truth, image_h, width_px)
    inset = _inset(image, grey, prediction, truth)
    canvas = Image.new("RGB", (width_px, TITLE_PX + image_h + LEGEND_PX), "white")
    canvas.paste(Image.fromarray(image), (0, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    if inset is not None:  # the magnified square on the slice, the inset framed white on black
        (top, left, side), (sy0, sy1, sx0, sx1) = inset
        draw.rectangle((sx0, TITLE_PX + sy0, sx1 - 1, TITLE_PX + sy1 - 1), outline="white", width=1)
        frame = (left - 1, TITLE_PX + top - 1, left + side, TITLE_PX + top + side)
        draw.rectangle(frame, outline="black", width=3)
        draw.rectangle(frame, outline="white", width=1)
    scale = min(1.0, width_px / 640)  # the bands keep their height: the text only shrinks
    title_px = round(TITLE_FONT_PX * scale)
    while title_px > 8 and _font(title_px).getlength(title) > width_px - 20:  # a long title: smaller text
        title_px -= 1
    draw.text((width_px / 2, 10), title, fill="black", font=_font(title_px), anchor="ma")
    legend_px = round(LEGEND_FONT_PX * scale)
    _draw_legend(draw, _legend_entries(truth is not None), TITLE_PX + image_h, width_px, legend_px)
    return np.asarray(canvas)


def thumbnail(
    flair: np.ndarray,
    prediction: np.ndarray | None,
    truth: np.ndarray | None,
    crop: tuple[int, int, int, int] | None = None,
    size: int = 96,
) -> np.ndarray:
    """A small overlay for every patient of a report: RGB uint8 (h, w, 3) whose longer side
    is `size` pixels.

    The same grey scale and translucent region fills as `overlay` (agreement yellow,
    prediction only vermillion, truth only sky blue; no outlines at this size), blended in
    the native grid, cropped to `crop` ((y0, y1, x0, x1) half-open, None: the whole frame),
    then resized (Pillow's bilinear filter, which widens with the shrink factor: anti-aliased). flair: (H, W)
    any real dtype; prediction, truth: (H, W) bool/0-1 or None.
    """
    y0, y1, x0, x1 = crop or (0, flair.shape[0], 0, flair.shape[1])
    grey = _grey(flair[y0:y1, x0:x1])
    prediction = np.zeros(grey.shape, bool) if prediction is None else prediction[y0:y1, x0:x1].astype(bool)
    truth = None if truth is None else truth[y0:y1, x0:x1].astype(bool)
    scale = size / max(grey.shape)
    shape = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
    from PIL import Image

    grey8 = np.round(grey * 255).astype(np.uint8)
    full = Image.fromarray(_blend_table()[_regions(prediction, truth), grey8])
    return np.asarray(full.resize(shape[::-1], Image.Resampling.BILINEAR))  # PIL takes (width, height)


ROLE_STYLES = {  # role -> (bar colour, legend label); train and val scores are optimistic
    "test": (OKABE_ITO["blue"], "test (never used in training)"),
    "unseen": (OKABE_ITO["bluish_green"], "unseen (not in the model's split)"),
    "val": (OKABE_ITO["orange"], "val (chose the checkpoint)"),
    "train": (OKABE_ITO["grey"], "train (fitted the weights)"),
    "unknown": (OKABE_ITO["reddish_purple"], "unknown (checkpoint without a split)"),
    None: (OKABE_ITO["blue"], "patients"),
}


def _dice_rows(rows: list[dict] | dict[str, float]) -> list[dict]:
    """Normalise to [{patient, dice, role, gt_pixels}] with labelled patients only; accepts
    the old {patient: dice} mapping (no role, lesion status unknown) and metrics.csv strings."""
    if isinstance(rows, dict):
        rows = [{"patient": patient, "dice": dice} for patient, dice in rows.items()]
    out = []
    for row in rows:
        if row.get("dice") in (None, ""):
            continue  # unlabelled patient: no Dice
        role = row.get("role") or None
        if role not in ROLE_STYLES:
            raise ValueError(
                f"patient {row['patient']}: unknown role {role!r} (expected one of test, val, train, unseen, unknown)"
            )
        gt = row.get("gt_pixels")
        out.append(
            {
                "patient": str(row["patient"]),
                "dice": float(row["dice"]),
                "role": role,
                "lesion_free": None if gt in (None, "") else int(float(gt)) == 0,
            }
        )
    return out


DICE_AXIS = (0.0, 1.02)  # bars from 0: a bar's length is its value, and 1.0 stays in view


def _dice_reference_lines(ax, items: list[dict]) -> None:
    """Mean and median lines over the headline roles (test + unseen) when present, else all."""
    headline = [r["dice"] for r in items if r["role"] in HEADLINE_ROLES]
    values, scope = (headline, "test + unseen") if headline else ([r["dice"] for r in items], "all shown")
    mean, median = float(np.mean(values)), float(np.median(values))
    ax.axvline(mean, color="black", linestyle="--", linewidth=1.2, label=f"mean {mean:.3f} ({scope}, n={len(values)})")
    ax.axvline(median, color="black", linestyle=":", linewidth=1.5, label=f"median {median:.3f} ({scope})")


def plot_dice_distribution(
    rows: list[dict] | dict[str, float], path: str | Path, title: str = "Dice per patient"
) -> Figure:
    """Horizontal bar chart of per-patient Dice, sorted, written as a PNG to `path`.

    rows: dicts with `patient`, `dice` (None or "" for unlabelled patients, which are left
    out), optional `role` (test / val / train / unseen: bar colour, legend) and `gt_pixels`
    (0 marks the patient lesion-free: hatched bar, "(lesion-free)" label, since an empty
    truth scores 1.0 by convention when nothing is predicted). The old `{patient: dice}`
    mapping is still accepted. Mean and median lines are over test + unseen patients when
    there are any (the honest headline), else over every patient shown. The axis starts
    at 0 (`DICE_AXIS`), so a bar's length is its value, and a dot marks each bar's end, so a
    patient scored 0 stays visible; the legend sits to the right of the bars.
    Returns the matplotlib Figure (for inspection); raises ValueError for an unknown role
    or when no patient has a Dice.
    """
    items = sorted(_dice_rows(rows), key=lambda r: (r["dice"], r["patient"]))
    if not items:
        raise ValueError("plot_dice_distribution: no patient with a Dice value (all unlabelled?)")
    fig = _figure(9.0, max(3.0, 0.25 * len(items) + 1.4))
    ax = fig.add_subplot()
    for y, r in enumerate(items):
        colour = ROLE_STYLES[r["role"]][0]
        ax.barh(y, r["dice"], color=colour, hatch="///" if r["lesion_free"] else "", edgecolor="white")
    colours = [ROLE_STYLES[r["role"]][0] for r in items]  # a dot at each bar's end: a Dice of 0 stays visible
    dice = [r["dice"] for r in items]
    ax.scatter(dice, range(len(items)), s=18, c=colours, edgecolors="black", linewidths=0.5, zorder=3, clip_on=False)
    ticks = range(len(items))
    ax.set_yticks(ticks, [r["patient"] + ("  (lesion-free)" if r["lesion_free"] else "") for r in items], fontsize=8)
    values_axis = ax.secondary_yaxis("right")  # the Dice values as a column right of the bars
    values_axis.set_yticks(ticks, [f"{r['dice']:.3f}" for r in items], fontsize=8)
    ax.set_ylim(-0.6, len(items) - 0.4)
    ax.set_xlim(DICE_AXIS)
    ax.axvline(1.0, color="0.6", linewidth=0.8)
    _dice_reference_lines(ax, items)
    ax.set_xlabel("Dice (3-D, per patient)")
    ax.set_ylabel("patient, sorted by Dice")
    ax.set_title(title, fontsize=12)
    ax.legend(handles=_dice_legend_handles(ax, items), loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _dice_legend_handles(ax, items: list[dict]) -> list:
    """Legend entries: each role present (with its count), the lesion-free hatch, the lines."""
    from matplotlib.patches import Patch

    handles = []
    for role, (colour, label) in ROLE_STYLES.items():
        count = sum(r["role"] == role for r in items)
        if count:
            handles.append(Patch(color=colour, label=f"{label}: {count}"))
    if any(r["lesion_free"] for r in items):
        handles.append(
            Patch(facecolor="0.45", edgecolor="white", hatch="///", label="lesion-free (1.0 if nothing predicted)")
        )
    return handles + ax.get_legend_handles_labels()[0]


LEARNING_CURVE_KEYS = ("epoch", "train_loss", "val_loss", "dice_mean", "dice_median", "lr")


def best_epoch(history: list[dict]) -> dict:
    """The history entry of the epoch that `best_model.pt` holds: the first with the highest
    validation Dice mean (train.py replaces best_model.pt only on a strictly higher mean)."""
    return max(history, key=lambda h: (h["dice_mean"], -h["epoch"]))


def plot_learning_curves(history: list[dict], title: str = "learning curves") -> Figure:
    """Three panels over the epochs: training and validation loss; validation Dice mean and
    median (per patient, 3-D, as train.py validates); the learning rate of each epoch. A
    dotted vertical line and a star mark the best epoch (`best_epoch`).

    history: one dict per validated epoch with the keys `LEARNING_CURVE_KEYS` (`epoch` an
    int, the others floats; loss of the configured --loss, lr the optimiser's at the start
    of the epoch), in epoch order. Returns the matplotlib Figure (write it with
    `png_bytes`); raises ValueError for an empty history or a missing key.
    """
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_learning_curves: no validated epoch yet")
    missing = [key for key in LEARNING_CURVE_KEYS if any(key not in h for h in history)]
    if missing:
        raise ValueError(f"plot_learning_curves: history entries lack {', '.join(missing)}")
    epochs = [h["epoch"] for h in history]
    best = best_epoch(history)
    fig = _figure(13.0, 3.8)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.82, wspace=0.28)
    loss_ax, dice_ax, lr_ax = fig.subplots(1, 3)
    panels = [
        (loss_ax, "loss", [("train_loss", "training", "-"), ("val_loss", "validation", "--")]),
        (dice_ax, "validation Dice", [("dice_mean", "mean", "-"), ("dice_median", "median", ":")]),
        (lr_ax, "learning rate", [("lr", "lr", "-")]),
    ]
    for ax, label, curves in panels:
        for key, name, style in curves:
            ax.plot(epochs, [h[key] for h in history], linestyle=style, marker="o", markersize=3, label=name)
        ax.axvline(best["epoch"], color="0.4", linestyle=":", linewidth=1.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    dice_ax.plot(
        best["epoch"], best["dice_mean"], marker="*", markersize=14, color="black", linestyle="none",
        label=f"best epoch {best['epoch']}: mean {best['dice_mean']:.3f} (best_model.pt)",
    )  # fmt: skip
    dice_ax.set_ylim(-0.03, 1.03)  # Dice 0 and 1 stay inside the panel
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, dice_ax):
        ax.legend(fontsize=8, loc="best")
    last = history[-1]
    fig.suptitle(
        f"{title}: {len(history)} validated epoch(s), last {last['epoch']}; best epoch {best['epoch']} "
        f"(validation Dice mean {best['dice_mean']:.4f}, median {best['dice_median']:.4f})",
        fontsize=11,
    )
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for `atomic_write_bytes`: a crash never leaves half a picture)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
