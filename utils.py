"""Shared helpers: volume preprocessing and its exact inverse, metrics, largest connected
component, pictures (overlays, thumbnails, the Dice chart, learning curves), seeding, atomic
writes, CLI helpers and folder checks."""

from __future__ import annotations

import argparse
import difflib
import os
import random
import re
import secrets
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BRAIN_THRESHOLD = 0.10  # a pixel is "head" where any channel exceeds 10 % of its volume max
CLIP_PERCENTILES = (10.0, 99.0)
SPECK_FRACTION = 0.01  # bright regions with < 1 % of the bright pixels are ignored by the crop box


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where a preprocessed volume came from: enough to map a mask back exactly."""

    original_shape: tuple[int, int]  # native (H, W) of the input slices
    crop_box: tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in native pixels
    padding: tuple[int, int, int, int]  # (top, bottom, left, right) zero padding to square
    image_size: int  # side of the preprocessed square
    scale: float  # image_size / padded side
    slice_numbers: tuple[int, ...]  # the kept slice numbers k, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(
            original_shape=tuple(data["original_shape"]),
            crop_box=tuple(data["crop_box"]),
            padding=tuple(data["padding"]),
            image_size=int(data["image_size"]),
            scale=float(data["scale"]),
            slice_numbers=tuple(int(k) for k in data["slice_numbers"]),
        )

    @property
    def padded_side(self) -> int:
        top, bottom = self.padding[:2]
        y0, y1 = self.crop_box[:2]
        return y1 - y0 + top + bottom


def brain_bounding_box(volume: np.ndarray) -> tuple[int, int, int, int]:
    """In-plane box (y0, y1, x0, x1), half-open, of the head in a volume (S, H, W, C).

    A pixel is bright where any channel of the maximum projection over the slices exceeds
    10 % of that channel's maximum. The box spans the bright connected regions (8-connected)
    that hold at least `SPECK_FRACTION` of all bright pixels, so an isolated speck (a hot
    pixel, a burnt-in marker) does not stretch it, while a scalp ring separated from the
    brain by dark CSF still counts. The full frame for an all-dark volume.
    """
    projection = volume.max(axis=0)  # (S, H, W, C) -> (H, W, C): a pixel's brightest slice
    channel_max = projection.reshape(-1, projection.shape[-1]).max(axis=0)
    plane = ((projection > BRAIN_THRESHOLD * channel_max) & (channel_max > 0)).any(axis=-1)  # (H, W)
    labels, count = ndimage.label(plane, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]  # pixels per region 1..count
    head = np.isin(labels, 1 + np.flatnonzero(sizes >= SPECK_FRACTION * plane.sum()))
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    if rows.size == 0:
        return 0, volume.shape[1], 0, volume.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, side - height - top, left, side - width - left


def _resize(tensor: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize (N, C, h, w) to (N, C, size, size); half-pixel centres for every mode, and
    an anti-aliasing filter when an interpolating mode shrinks the image."""
    if tensor.shape[-2:] == (size, size):
        return tensor
    if mode == "nearest":
        return F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return F.interpolate(tensor, size=(size, size), mode=mode, align_corners=False, antialias=tensor.shape[-1] > size)


NORM_REGIONS = ("crop", "head")


def head_mask(images: np.ndarray) -> np.ndarray:
    """(S, C, H, W) -> (S, H, W) bool: pixels where any channel exceeds `BRAIN_THRESHOLD`
    of that channel's maximum over the volume (the rule `brain_bounding_box` crops with)."""
    channel_max = images.max(axis=(0, 2, 3))[None, :, None, None]  # (1, C, 1, 1)
    return ((images > BRAIN_THRESHOLD * channel_max) & (channel_max > 0)).any(axis=1)


def normalize_channels(images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per channel over the whole volume (never per slice): clip to the [10th, 99th]
    percentile, then z-score. The statistics come from the pixels of `region`
    ((S, H, W) bool, e.g. `head_mask`), or from every pixel when it is None or empty;
    they are applied to every pixel. A constant channel becomes zeros.
    (S, C, H, W) float32 in, same shape out."""
    out = np.empty_like(images, dtype=np.float32)
    use_region = region is not None and bool(region.any())
    for c in range(images.shape[1]):
        channel = images[:, c]
        sample = channel[region] if use_region else channel
        low, high = np.percentile(sample, CLIP_PERCENTILES)
        clipped_sample = np.clip(sample, low, high)
        mean, std = float(clipped_sample.mean()), float(clipped_sample.std())
        out[:, c] = (np.clip(channel, low, high) - mean) / std if std > 1e-6 else 0.0
    return out


def preprocess_volume(
    images: np.ndarray,
    masks: np.ndarray | None,
    image_size: int,
    slice_numbers: list[int] | tuple[int, ...],
    norm_region: str = "crop",
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Crop to the brain, pad to a centred square, resize, normalise per channel.

    images: (S, H, W, 3) any real dtype; masks: (S, H, W) bool/0-1 or None.
    norm_region: where the normalisation statistics come from: "crop" (every pixel of the
    padded, resized crop) or "head" (its `head_mask` pixels only, so the share of background
    in the crop, which changes with the slice coverage, does not shift tissue values).
    Raises ValueError for another norm_region, and for NaN or infinite pixels (they would turn
    the percentiles, and so the whole normalised volume, into NaN or zeros; the readers name
    the file before this, callers with arrays get this message).
    Returns images float32 (S, 3, size, size), masks uint8 0/1 (S, size, size) or None,
    and the Geometry that `restore_geometry` inverts.
    """
    if norm_region not in NORM_REGIONS:
        raise ValueError(f"normalisation region {norm_region!r}: expected one of {', '.join(NORM_REGIONS)}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        count = int(images.size - np.count_nonzero(np.isfinite(images)))
        raise ValueError(
            f"the volume holds {count} non-finite value(s) (NaN or infinity); "
            "replace them with a finite value (e.g. 0 for background) first"
        )
    height, width = images.shape[1:3]
    y0, y1, x0, x1 = brain_bounding_box(images)
    padding = _square_padding(y1 - y0, x1 - x0)
    top, bottom, left, right = padding
    side = y1 - y0 + top + bottom
    geometry = Geometry(
        original_shape=(height, width),
        crop_box=(y0, y1, x0, x1),
        padding=padding,
        image_size=image_size,
        scale=image_size / side,
        slice_numbers=tuple(int(k) for k in slice_numbers),
    )
    with torch.no_grad():
        crop = torch.from_numpy(np.ascontiguousarray(images[:, y0:y1, x0:x1])).float()
        crop = crop.permute(0, 3, 1, 2)  # (S, H, W, 3) -> (S, 3, h, w)
        square = F.pad(crop, (left, right, top, bottom))
        resized = _resize(square, image_size, "bicubic").numpy()
        out_masks = None
        if masks is not None:
            mask_crop = torch.from_numpy(np.ascontiguousarray(masks[:, y0:y1, x0:x1] > 0))
            mask_square = F.pad(mask_crop[:, None].to(torch.uint8), (left, right, top, bottom))
            out_masks = _resize(mask_square, image_size, "nearest")[:, 0].numpy()
    region = head_mask(resized) if norm_region == "head" else None
    return normalize_channels(resized, region), out_masks, geometry


def preprocessing_config(image_size: int, norm_region: str = "crop") -> dict:
    """Every parameter that changes `preprocess_volume`'s output: saved in checkpoints (a
    checkpoint predicts only with the preprocessing it was trained with) and part of the
    preprocessing cache's keys."""
    return {
        "image_size": int(image_size),
        "norm_region": norm_region,
        "brain_threshold": BRAIN_THRESHOLD,
        "crop_box": f"bright components holding >= {SPECK_FRACTION:g} of the bright pixels (specks ignored)",
        "clip_percentiles": list(CLIP_PERCENTILES),
        "image_resize": "bicubic, anti-aliased when shrinking",
        "mask_resize": "nearest-exact",
        "drop_first_last": True,
    }


def restore_geometry(array: np.ndarray, geometry: Geometry, mode: str = "nearest") -> np.ndarray:
    """Map (S, size, size) from preprocessed space back onto the native (S, H, W) grid.

    `mode="nearest"` for masks (exact inverse whenever preprocessing upsampled),
    `"bilinear"` for probability maps. Pixels outside the brain box become 0.
    """
    top, bottom, left, right = geometry.padding
    y0, y1, x0, x1 = geometry.crop_box
    side = geometry.padded_side
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(array))[:, None]
        if mode == "nearest":
            square = _resize(tensor.to(torch.uint8), side, "nearest")
        else:
            square = _resize(tensor.float(), side, mode)
        crop = square[:, 0, top : side - bottom, left : side - right].numpy()
    out = np.zeros((array.shape[0], *geometry.original_shape), dtype=crop.dtype)
    out[:, y0:y1, x0:x1] = crop
    return out


# ------------------------------------------------------------------------------ metrics


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary arrays; 1.0 when both are empty, 0.0 for a prediction on empty truth."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def precision_recall(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall, with Dice's convention for empty masks: both empty -> (1, 1),
    exactly one empty -> (0, 0), so neither a missed lesion nor a false alarm scores well."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    n_pred, n_true = int(prediction.sum()), int(truth.sum())
    if n_pred == 0 or n_true == 0:
        return (1.0, 1.0) if n_pred == n_true else (0.0, 0.0)
    overlap = int(np.logical_and(prediction, truth).sum())
    return overlap / n_pred, overlap / n_true


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels that a 6-neighbour (face-connected) erosion removes: MONAI's `get_mask_edges`."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _joint_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of `a | b` grown by `margin` voxels on every side (clipped to the array)."""
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, a.shape, strict=True))


Spacing = tuple[float, ...]  # voxel size in mm per array axis, e.g. (slice, row, col) for (S, H, W)


def _check_spacing(spacing: Spacing | None, ndim: int) -> tuple[float, ...] | None:
    """`spacing` as floats, one positive finite value per axis; ValueError otherwise."""
    if spacing is None:
        return None
    values = tuple(float(v) for v in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {spacing}: expected {ndim} positive voxel sizes (mm), one per array axis")
    return values


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None) -> float:
    """95th-percentile Hausdorff distance between the mask surfaces: in mm when `spacing`
    (the voxel size per array axis, mm) is given, else in voxels (unit spacing).

    MONAI's convention (`compute_hausdorff_distance(..., percentile=95, spacing=...)`): the
    surface is the set of voxels removed by a 6-neighbour erosion (outside the array counts as
    background); for each surface voxel of one mask take the Euclidean distance, with each
    axis scaled by its spacing, to the nearest surface voxel of the other (scipy's
    `distance_transform_edt(..., sampling=spacing)`); hd95 = max of the two directed 95th
    percentiles (numpy's linear percentile). Computed on both masks cropped to their joint
    bounding box plus a 1-voxel margin, which leaves every distance unchanged. Any shape
    (2-D, 3-D). NaN when either mask is empty. Raises ValueError for a spacing that is not
    one positive value per axis.
    """
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    sampling = _check_spacing(spacing, truth.ndim)
    if not prediction.any() or not truth.any():
        return float("nan")
    box = _joint_box(prediction, truth, margin=1)
    surface_p, surface_t = _surface(prediction[box]), _surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~surface_t, sampling=sampling)[surface_p]
    to_pred = ndimage.distance_transform_edt(~surface_p, sampling=sampling)[surface_t]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def voxel_volume(spacing: Spacing | None) -> float:
    """The volume of one voxel: the product of the spacing (mm3), or 1.0 (a voxel) without one."""
    return float(np.prod(spacing)) if spacing is not None else 1.0


def volume_stats(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None) -> dict[str, float | None]:
    """`gt_volume` and `pred_volume`: the foreground of each mask in mm3 with a `spacing`
    (voxel count x voxel volume), in voxels without; `volume_error` = (pred - gt) / gt, a
    signed fraction (+0.1: 10 % too large), None when the truth is empty. Any shape."""
    unit = voxel_volume(_check_spacing(spacing, truth.ndim))
    gt, pred = int(np.count_nonzero(truth)) * unit, int(np.count_nonzero(prediction)) * unit
    return {"gt_volume": gt, "pred_volume": pred, "volume_error": (pred - gt) / gt if gt > 0 else None}


LESION_DILATION_ITERATIONS = 3  # BraTS 2023 (BraTS-GLI, -SSA, -PED): dilation_factor = 3
LESION_COLUMNS = ("gt_lesions", "lesion_tp", "lesion_fn", "lesion_fp", "lesion_f1", "lesionwise_dice")


def lesion_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None, min_lesion_volume: float = 0.0
) -> dict[str, float | int]:
    """Lesion-wise detection and Dice, BraTS 2023 convention (rachitsaluja/BraTS-2023-Metrics).

    prediction, truth: (S, H, W) binary. A ground-truth lesion is a 26-connected component of
    the truth dilated `LESION_DILATION_ITERATIONS` times with the 18-neighbour structure
    (`ndimage.generate_binary_structure(3, 2)`, in voxels, as BraTS on its 1 mm grid), so
    pieces closer than the dilation merge into one lesion; the lesion is its truth voxels, its
    region the dilated component. A lesion is detected (TP) when a predicted voxel lies in its
    region, else missed (FN). Lesions of `min_lesion_volume` or less (mm3 with a `spacing`,
    voxels without; BraTS uses 50 mm3) are left out of every count, and the predicted
    components that touch them are not false positives. A predicted 26-connected component
    that touches no lesion region is a false positive (FP).

    Returns `gt_lesions` (kept lesions), `lesion_tp`, `lesion_fn`, `lesion_fp`, `lesion_f1` =
    2 TP / (2 TP + FP + FN) (1.0 when there is no lesion and no prediction), and
    `lesionwise_dice` = the sum over kept lesions of the Dice between the lesion and the union
    of the predicted components touching its region, divided by (lesions + FP) (1.0 when both
    are 0). Raises ValueError for masks that are not 3-D or of different shapes.
    """
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if truth.ndim != 3 or prediction.shape != truth.shape:
        raise ValueError(f"lesion metrics need two 3-D masks of one shape, got {prediction.shape} and {truth.shape}")
    unit = voxel_volume(_check_spacing(spacing, 3))
    if prediction.any() or truth.any():  # every component lies in this box, every region too
        box = _joint_box(prediction, truth, margin=LESION_DILATION_ITERATIONS + 1)
        prediction, truth = prediction[box], truth[box]
    connectivity = ndimage.generate_binary_structure(3, 3)  # 26 neighbours
    components, n_components = ndimage.label(prediction, structure=connectivity)
    dilated = ndimage.binary_dilation(
        truth, structure=ndimage.generate_binary_structure(3, 2), iterations=LESION_DILATION_ITERATIONS
    )
    regions, _ = ndimage.label(dilated, structure=connectivity)
    touched: set[int] = set()
    tp = fn = 0
    dice_sum = 0.0
    for label_id in range(1, int(regions.max()) + 1):
        region = regions == label_id
        lesion = truth & region
        hits = np.unique(components[region])
        hits = hits[hits > 0]
        touched.update(int(h) for h in hits)
        if np.count_nonzero(lesion) * unit <= min_lesion_volume:
            continue
        if hits.size:
            tp += 1
            dice_sum += dice_score(np.isin(components, hits), lesion)  # whole components, also outside the region
        else:
            fn += 1
    fp = n_components - len(touched)
    lesions = tp + fn
    denominator = 2 * tp + fp + fn
    return {
        "gt_lesions": lesions,
        "lesion_tp": tp,
        "lesion_fn": fn,
        "lesion_fp": fp,
        "lesion_f1": 2 * tp / denominator if denominator else 1.0,
        "lesionwise_dice": dice_sum / (lesions + fp) if lesions + fp else 1.0,
    }


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component (full connectivity: 26 neighbours in 3-D).
    An empty mask is returned unchanged (as bool)."""
    mask = mask.astype(bool)
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if count == 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


# ------------------------------------------------------------------------ visualisation

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
PREDICTION_DASHES = (0, (3, 1.5))  # prediction outline dashed, truth outline solid
OUTLINE_WIDTH = 1.0  # points: thin, and drawn under the fills, so a 1-pixel error rim stays visible
OUTLINE_ZORDER, FILL_ZORDER = 2, 3
SMALL_LESION_FRACTION = 0.1  # a lesion box under 10 % of the frame's side gets a zoomed inset
ZOOM_CONTEXT, ZOOM_MIN_SIDE = 2.0, 12  # the inset shows 2x the lesion's extent, at least 12 pixels
INSET_FRACTION = 0.4  # inset width, as a fraction of the image width: magnified at least 2x


def _figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _grey(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the minimum and the 99.5th percentile (a few hot pixels
    must not darken the whole slice). Constant images become zeros."""
    image = image.astype(np.float32)
    low, high = float(image.min()), float(np.percentile(image, 99.5))
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def _region_layer(prediction: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """RGBA float (H, W, 4): agreement, prediction-only and truth-only pixels in their colours."""
    from matplotlib.colors import to_rgba

    layer = np.zeros((*prediction.shape, 4), np.float32)
    truth = np.zeros_like(prediction) if truth is None else truth
    regions = {
        "agreement": prediction & truth,
        "prediction_only": prediction & ~truth,
        "truth_only": truth & ~prediction,
    }
    for name, pixels in regions.items():
        layer[pixels] = to_rgba(OVERLAY_REGIONS[name][0], OVERLAY_ALPHA)
    return layer


def _draw_contours(ax, mask: np.ndarray, colour: str, linestyle: str | tuple) -> None:
    """Thin sub-pixel outline of a binary mask (marching squares, `skimage.measure.find_contours`),
    drawn under the filled regions (`OUTLINE_ZORDER` < `FILL_ZORDER`) so it never hides them."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)  # closes outlines that touch the frame
    for contour in find_contours(padded, 0.5):
        ax.plot(
            contour[:, 1] - 1,
            contour[:, 0] - 1,
            color=colour,
            linewidth=OUTLINE_WIDTH,
            linestyle=linestyle,
            zorder=OUTLINE_ZORDER,
        )


def _overlay_legend_handles(has_truth: bool) -> list:
    """Legend entries of `overlay`: the filled regions, then the two outline styles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colour = {name: c for name, (c, _) in OVERLAY_REGIONS.items()}
    prediction_line = Line2D(
        [], [], color=colour["prediction_only"], linewidth=2, linestyle=PREDICTION_DASHES, label="prediction outline"
    )
    if not has_truth:
        return [Patch(color=colour["prediction_only"], alpha=0.8, label="prediction (no truth)"), prediction_line]
    regions = [Patch(color=c, alpha=0.8, label=label) for c, label in OVERLAY_REGIONS.values()]
    truth_line = Line2D([], [], color=colour["truth_only"], linewidth=2, label="truth outline")
    return [*regions, truth_line, prediction_line]


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


def _draw_slice(ax, grey: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None) -> None:
    """The layers of one overlay picture, bottom to top: the slice in grey, the thin truth
    (solid) and prediction (dashed) outlines, then the translucent region fills."""
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear", zorder=0)
    if truth is not None:
        _draw_contours(ax, truth, OVERLAY_REGIONS["truth_only"][0], "-")
    _draw_contours(ax, prediction, OVERLAY_REGIONS["prediction_only"][0], PREDICTION_DASHES)
    ax.imshow(_region_layer(prediction, truth), interpolation="nearest", zorder=FILL_ZORDER)
    ax.set_xlim(-0.5, grey.shape[1] - 0.5)
    ax.set_ylim(grey.shape[0] - 0.5, -0.5)
    ax.set_axis_off()


def _add_zoom_inset(ax, grey: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None) -> None:
    """A magnified copy of a small lesion (`zoom_box`) in the image corner farthest from it,
    with a white frame on the main image marking the magnified square."""
    lesion = prediction if truth is None else prediction | truth
    box = zoom_box(lesion)
    if box is None:
        return
    height, width = grey.shape
    y0, y1, x0, x1 = box
    inset_w = min(INSET_FRACTION, INSET_FRACTION * height / width)  # axes fractions: a square inset
    inset_h = inset_w * width / height
    centre_y, centre_x = (y0 + y1) / 2 / height, (x0 + x1) / 2 / width  # 0 = top, 0 = left
    left = 1 - inset_w - 0.01 if centre_x < 0.5 else 0.01
    bottom = 0.01 if centre_y < 0.5 else 1 - inset_h - 0.01  # axes fractions count from the bottom
    inset = ax.inset_axes((left, bottom, inset_w, inset_h), zorder=10)
    _draw_slice(inset, grey, prediction, truth)
    inset.set_xlim(x0 - 0.5, x1 - 0.5)
    inset.set_ylim(y1 - 0.5, y0 - 0.5)
    inset.set_axis_on()
    inset.set_xticks([])
    inset.set_yticks([])
    from matplotlib import patheffects

    for spine in inset.spines.values():  # white with a black rim: visible on tissue and background
        spine.set_edgecolor("white")
        spine.set_linewidth(1.5)
        spine.set_path_effects([patheffects.withStroke(linewidth=3.0, foreground="black")])
    ax.indicate_inset_zoom(inset, edgecolor="white", alpha=0.9, linewidth=1.0)


def overlay(
    flair: np.ndarray,
    prediction: np.ndarray | None,
    truth: np.ndarray | None,
    title: str = "",
    width_px: int = 640,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Picture of one slice for a person: RGB uint8 (H', W', 3), `width_px` wide.

    flair: (H, W) any real dtype, shown in grey; prediction, truth: (H, W) bool/0-1 or None
    (no truth: an unlabelled patient). crop: (y0, y1, x0, x1) half-open part of the frame to
    show (e.g. `view_box` of the patient: the head), None for the whole frame. Translucent
    fills in Okabe-Ito colours separate agreement (yellow), prediction only (vermillion,
    false positive) and truth only (sky blue, missed); they lie above thin outlines (truth
    solid, prediction dashed, so overlap stays readable without colour), so a one-pixel
    error rim is never hidden by a line. A lesion smaller than `SMALL_LESION_FRACTION` of
    the shown frame gets a magnified inset (`zoom_box`) in the corner farthest from it.
    `title` (e.g. patient, slice and Dice) goes above the image, a legend below.
    """
    if crop is not None:
        y0, y1, x0, x1 = crop
        flair = flair[y0:y1, x0:x1]
        prediction = None if prediction is None else prediction[y0:y1, x0:x1]
        truth = None if truth is None else truth[y0:y1, x0:x1]
    height, width = flair.shape
    prediction = np.zeros((height, width), bool) if prediction is None else prediction.astype(bool)
    truth = None if truth is None else truth.astype(bool)
    image_w, image_h = width_px / 100, width_px / 100 * height / width  # inches at 100 dpi
    legend_h, title_h = 1.1, 0.5
    fig = _figure(image_w, image_h + legend_h + title_h)
    ax = fig.add_axes((0.0, legend_h / fig.get_figheight(), 1.0, image_h / fig.get_figheight()))
    grey = _grey(flair)
    _draw_slice(ax, grey, prediction, truth)
    _add_zoom_inset(ax, grey, prediction, truth)
    fig.suptitle(title, fontsize=13, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.legend(handles=_overlay_legend_handles(truth is not None), loc="lower center", ncol=2, frameon=False)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def thumbnail(
    flair: np.ndarray,
    prediction: np.ndarray | None,
    truth: np.ndarray | None,
    crop: tuple[int, int, int, int] | None = None,
    size: int = 96,
) -> np.ndarray:
    """A small overlay without matplotlib (fast enough for every patient of a report):
    RGB uint8 (h, w, 3) whose longer side is `size` pixels.

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
    layer = _region_layer(prediction, truth)  # (h, w, 4)
    alpha = layer[..., 3:]
    rgb = grey[..., None] * (1 - alpha) + layer[..., :3] * alpha
    scale = size / max(grey.shape)
    shape = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
    from PIL import Image  # matplotlib's own image library: a fast single-threaded resize

    full = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return np.asarray(full.resize(shape[::-1], Image.Resampling.BILINEAR))  # PIL takes (width, height)


ROLE_STYLES = {  # role -> (bar colour, legend label); train and val scores are optimistic
    "test": (OKABE_ITO["blue"], "test (never used in training)"),
    "unseen": (OKABE_ITO["bluish_green"], "unseen (not in the model's split)"),
    "val": (OKABE_ITO["orange"], "val (chose the checkpoint)"),
    "train": (OKABE_ITO["grey"], "train (fitted the weights)"),
    "unknown": (OKABE_ITO["reddish_purple"], "unknown (checkpoint without a split)"),
    None: (OKABE_ITO["blue"], "patients"),
}
HEADLINE_ROLES = ("test", "unseen")


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


# ------------------------------------------------------------------ seeding/checkpoints


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (for entry points, not library code)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from keys."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    The temp file is created with mode 0o666, so the kernel applies the process umask and
    the result gets the same permissions as any other file the user creates (not
    `tempfile.mkstemp`'s 0o600, which colleagues on a shared server could not read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class UsageError(ValueError):
    """An invalid command-line value; the message says which flag and why."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` for the CLIs: keeps the description's (module docstring's) line breaks and
    appends "(default: X)" only for a real value X; a None, False or empty default (a flag that is
    off, or a default that depends on the machine) is described in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (
            action.default is None
            or action.default is False
            or action.default == ""
            or action.default == argparse.SUPPRESS
        ):
            return action.help
        if isinstance(action.default, list):
            shown = " ".join(map(str, action.default)).replace("%", "%%")  # argparse expands % in help
            return f"{action.help} (default: {shown})"
        return super()._get_help_string(action)


class CLIParser(argparse.ArgumentParser):
    """The CLIs' argument parser: a usage error is one line, `<prog>: error: <message>`, with
    "did you mean" for a mistyped flag (the closest flag of the parser, or of the sub-command
    given, by `difflib.get_close_matches`), instead of argparse's full usage text first. Exit 2."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the sub-command that was given, which knows its own flags
            self._chosen_subcommand(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            hints = [self._suggestion(word) for word in unknown[1].split() if word.startswith("-")]
            hints = [hint for hint in hints if hint]
            if hints:
                message += f" (did you mean {', '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def _chosen_subcommand(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]
        return self

    def _suggestion(self, word: str) -> str | None:
        typed = word.split("=", 1)[0]
        known = sorted({o for action in self._actions for o in action.option_strings if o.startswith("--")})
        close = [c for c in difflib.get_close_matches(typed.replace("_", "-"), known, n=2, cutoff=0.6) if c != typed]
        return close[0] if close else None


def non_negative_int(text: str) -> int:
    """argparse `type` for a count that may be 0: ArgumentTypeError for anything else."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


# Flags that several CLIs share (train.py, predict.py, dataset.py preprocess, bench.py):
# one definition each, handed out through a parent parser (`parents=[shared_flags(...)]`).
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--data-dir": {
        "default": "./kaggle_3m",
        "help": "patient data: kaggle_3m-style sub-folders of TIFF slices and/or NIfTI files (see docs/inputs.md)",
    },
    "--cache-dir": {"default": "./cache", "help": "preprocessing cache"},
    "--num-workers": {
        "type": non_negative_int,
        "default": 4,
        "help": "preprocessing threads (and training's loader workers)",
    },
    "--device": {"default": None, "help": "default: cuda:0 when CUDA is available, else cpu"},
}


def shared_flags(*flags: str, **help_overrides: str) -> argparse.ArgumentParser:
    """A parent parser (`argparse.ArgumentParser(parents=[...])`, as torchvision's references
    do) holding the named SHARED_FLAGS, e.g. `shared_flags("--data-dir", "--device")`.
    `help_overrides` replace a flag's help text (keyword: the flag's dest, e.g. data_dir=...)
    where one CLI reads it differently. Raises KeyError for a flag that is not shared."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data, cache and device")
    for flag in flags:
        options = dict(SHARED_FLAGS[flag])
        options["help"] = help_overrides.get(flag[2:].replace("-", "_"), options["help"])
        group.add_argument(flag, **options)
    return parent


def one_line_warnings() -> None:
    """For the CLIs' main(): print each warning as one `warning: <message>` line, without
    the source file and code line Python adds by default (library code never calls this)."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


DEVICE_NAMES = "cpu, cuda or cuda:N (N: the GPU's index), or mps on Apple silicon"


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """`None` -> cuda:0 when available, else cpu. Raises UsageError (naming `flag`, the CLI
    flag or API argument that gave `name`) for a name torch does not know or a device type
    this project does not run on (saying which names are accepted), and for a CUDA or MPS
    device this machine does not have."""
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"{flag} {name}: not a device name; expected {DEVICE_NAMES}") from error
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: {device.type} devices are not supported; expected {DEVICE_NAMES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine (use {flag} cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS (Apple silicon) is not available on this machine (use {flag} cpu)")
    return device


def _check_files_can_be_written(folder: Path, flag: str, path: Path) -> None:
    """Create and delete a temp file in the existing `folder`; UsageError naming `flag` and
    `path` (the folder asked for, `folder` or below it) when that fails."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: folder is not writable ({error.strerror or error})") from error


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Check, without creating anything, that `ensure_writable_dir(path, flag)` would succeed:
    `path` is a writable folder, or the nearest existing folder above it is writable. Lets a
    command refuse bad input before it has made any folder (a refused command leaves none
    behind). Raises UsageError naming `flag` and the path otherwise."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{flag} {path}: is a file, not a folder"
            if existing == path
            else f"{flag} {path}: cannot create the folder ({existing} is a file)"
        )
    _check_files_can_be_written(existing, flag, path)
    return path


def ensure_writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` (and its parents) if needed and check that files can be written in it.

    Called before any preprocessing or training, so an unusable folder is reported at once.
    Raises UsageError naming `flag` and the path when `path` (or a parent) is a file, when
    the folder cannot be created, or when it is not writable (read-only mount, permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot create the folder ({error.strerror or error})") from error
    _check_files_can_be_written(path, flag, path)
    return path
