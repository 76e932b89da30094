"""Per-patient segmentation metrics, and `REGISTRY`: the one list of what metrics.csv scores.

The functions (dice_score, precision_recall, hd95, volume_stats, lesion_metrics) compare a
predicted mask with the truth. `REGISTRY` lists every per-patient metric in metrics.csv's
column order, each with its kind (which sets its unit and how it is printed) and a line of
meaning, grouped by the function that computes them together. Everything else is derived
from it: `patient_metrics` (one call, every metric), `metric_names` (metrics.csv's metric
columns), summary.py's means and medians, and report.py's table columns and number format.
Adding a metric is one `MetricGroup` entry here. This module imports no other repo module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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


def label_components(mask: np.ndarray, connectivity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of a binary mask of any dimension: `(labels, sizes)`.

    `labels` (int, the mask's shape) is 0 on the background and 1..n on the n components,
    numbered in the order of their first voxel in C (raster) order, scipy.ndimage.label's
    numbering: for (S, H, W) the component that starts in the earliest slice, then row, then
    column is 1. `sizes` (int64, n + 1 entries) holds the voxel count of each label with
    sizes[0] = 0 (the background is no component), so `sizes.argmax()` is the first of the
    largest components in that order and `len(sizes) - 1` is n.

    `connectivity` is the rank of `ndimage.generate_binary_structure(mask.ndim, rank)`: 1
    counts face neighbours only (6 in 3-D), `mask.ndim` every neighbour that touches by a
    face, an edge or a corner (26 in 3-D, 8 in 2-D). The default, None, is that full
    connectivity, the convention of every component in this project: the post-processing
    (`postprocessing.largest_connected_component`, `keep_components`), the lesion-wise
    metrics' lesions and predicted components, the lesion counts of the post-processing
    study and the head box of `preprocessing.brain_bounding_box` (2-D)."""
    mask = np.asarray(mask, dtype=bool)
    rank = mask.ndim if connectivity is None else connectivity
    if not 1 <= rank <= mask.ndim:
        raise ValueError(f"connectivity {connectivity}: expected 1..{mask.ndim} for a {mask.ndim}-D mask")
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, rank))
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.int64)
    sizes[0] = 0
    return labels, sizes


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

    Both labellings (lesion regions, predicted components) are `label_components` with
    `connectivity=3` (26 neighbours), passed explicitly because the BraTS convention fixes it
    whatever the project's default; the 18-neighbour structure is the dilation's only.
    """
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if truth.ndim != 3 or prediction.shape != truth.shape:
        raise ValueError(f"lesion metrics need two 3-D masks of one shape, got {prediction.shape} and {truth.shape}")
    unit = voxel_volume(_check_spacing(spacing, 3))
    if prediction.any() or truth.any():  # every component lies in this box, every region too
        box = _joint_box(prediction, truth, margin=LESION_DILATION_ITERATIONS + 1)
        prediction, truth = prediction[box], truth[box]
    components, component_sizes = label_components(prediction, connectivity=3)  # 26 neighbours
    n_components = len(component_sizes) - 1
    dilated = ndimage.binary_dilation(
        truth, structure=ndimage.generate_binary_structure(3, 2), iterations=LESION_DILATION_ITERATIONS
    )
    regions, _ = label_components(dilated, connectivity=3)
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


# --------------------------------------------------------------------------- registry

KINDS = {  # kind -> what its values are; the kind decides the unit and the printed format (Metric.text)
    "score": "a fraction from 0 to 1, higher is better",
    "distance": "mm with a voxel spacing, else voxels",
    "count": "a whole number (voxels or lesions), printed without decimals",
    "volume": "mm3 with a voxel spacing, else voxels",
    "fraction": "a signed fraction (+0.1: 10 % too large)",
}


@dataclass(frozen=True)
class Metric:
    """One per-patient metric: a metrics.csv column. `kind` is a key of `KINDS`.

    Two hints for report.html only: `overview` metrics are shown at first (the headline's
    table, the patient table's visible columns), the others behind a fold; `repeats` names
    the column this one equals in some runs (gt_volume is gt_pixels without a voxel
    spacing), and the report leaves it out when it does so for every patient."""

    name: str
    kind: str
    description: str
    overview: bool = False
    repeats: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def text(self, value: float, decimals: int = 3) -> str:
        """A finite value as the report prints it: a count as a whole number (a mean of
        counts that is not whole with one decimal); any other kind with `decimals` decimals
        below 100 and one decimal from 100 up."""
        value = float(value)
        if self.kind == "count":
            return str(int(value)) if value.is_integer() else f"{value:.1f}"
        return f"{value:.{decimals}f}" if abs(value) < 100 else f"{value:.1f}"


MetricValues = Mapping[str, float | int | None]


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed together by one call (one lesion labelling gives six columns):
    `compute(prediction, truth, spacing=..., min_lesion_volume=...)` returns a value for
    each of `metrics`, by name (None where undefined, e.g. volume_error of an empty truth).
    prediction, truth: (S, H, W) masks; spacing: mm per axis or None (voxels)."""

    compute: Callable[..., MetricValues]
    metrics: tuple[Metric, ...]


def _overlap(prediction: np.ndarray, truth: np.ndarray, **_) -> MetricValues:
    precision, recall = precision_recall(prediction, truth)
    return {"dice": dice_score(prediction, truth), "precision": precision, "recall": recall}


def _surface_distance(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None, **_) -> MetricValues:
    return {"hd95": hd95(prediction, truth, spacing)}


def _voxel_counts(prediction: np.ndarray, truth: np.ndarray, **_) -> MetricValues:
    return {"gt_pixels": int(truth.sum()), "pred_pixels": int(prediction.sum())}


def _volumes(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None, **_) -> MetricValues:
    return volume_stats(prediction, truth, spacing)


def _lesions(
    prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None, min_lesion_volume: float = 0.0, **_
) -> MetricValues:
    return lesion_metrics(prediction, truth, spacing, min_lesion_volume)


REGISTRY: tuple[MetricGroup, ...] = (
    MetricGroup(
        _overlap,
        (
            Metric("dice", "score", "Dice (F1) of prediction and truth over the kept slices", overview=True),
            Metric("precision", "score", "predicted voxels that are truth", overview=True),
            Metric("recall", "score", "truth voxels that are predicted", overview=True),
        ),
    ),
    MetricGroup(
        _surface_distance,
        (
            Metric(
                "hd95",
                "distance",
                "95th-percentile Hausdorff distance of the surfaces; undefined for an empty mask",
                overview=True,
            ),
        ),
    ),
    MetricGroup(
        _voxel_counts,
        (
            Metric("gt_pixels", "count", "foreground voxels of the truth", overview=True),
            Metric("pred_pixels", "count", "foreground voxels of the prediction"),
        ),
    ),
    MetricGroup(
        _volumes,
        (
            Metric("gt_volume", "volume", "volume of the truth", overview=True, repeats="gt_pixels"),
            Metric("pred_volume", "volume", "volume of the prediction", repeats="pred_pixels"),
            Metric(
                "volume_error",
                "fraction",
                "(pred_volume - gt_volume) / gt_volume; empty for an empty truth",
                overview=True,
            ),
        ),
    ),
    MetricGroup(
        _lesions,
        (
            Metric("gt_lesions", "count", "lesions of the truth (BraTS 2023 lesion-wise)"),
            Metric("lesion_tp", "count", "lesions detected"),
            Metric("lesion_fn", "count", "lesions missed"),
            Metric("lesion_fp", "count", "predicted components touching no lesion"),
            Metric("lesion_f1", "score", "2 TP / (2 TP + FP + FN)", overview=True),
            Metric(
                "lesionwise_dice",
                "score",
                "sum of per-lesion Dice / (lesions + FP); equals dice for one lesion found and no false positive",
                overview=True,
                repeats="dice",
            ),
        ),
    ),
)


def registered() -> list[Metric]:
    """Every registered metric, in metrics.csv's column order (read from `REGISTRY` at each call)."""
    return [metric for group in REGISTRY for metric in group.metrics]


def metric_names() -> list[str]:
    """metrics.csv's metric columns, in order."""
    return [metric.name for metric in registered()]


def find_metric(name: str) -> Metric | None:
    """The registered metric of this column name, or None (not a metric: `patient`, `slices`, ...)."""
    return next((metric for metric in registered() if metric.name == name), None)


def patient_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Spacing | None = None, min_lesion_volume: float = 0.0
) -> dict[str, float | int | None]:
    """Every registered metric of one patient, 3-D (S, H, W), in registry order. With
    `spacing` ((slice, row, col) mm) hd95 is in mm and volumes in mm3, else both in voxels
    (`metric_units`). Raises ValueError when a group's function returns other names than
    it declares."""
    values: dict[str, float | int | None] = {}
    for group in REGISTRY:
        computed = group.compute(prediction, truth, spacing=spacing, min_lesion_volume=min_lesion_volume)
        names = [metric.name for metric in group.metrics]
        if sorted(computed) != sorted(names):
            source = getattr(group.compute, "__name__", repr(group.compute))
            raise ValueError(f"{source} returned {sorted(computed)}, registered as {sorted(names)}")
        values.update((name, computed[name]) for name in names)
    return values


def metric_units(spacing: Spacing | None) -> dict[str, str]:
    """The units of hd95 (kind distance) and of the volumes (kind volume) for a patient with
    this spacing: summary.json's `units`."""
    return {"hd95": "mm", "volume": "mm3"} if spacing is not None else {"hd95": "voxels", "volume": "voxels"}
