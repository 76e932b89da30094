"""Post-processing of a thresholded mask (S, H, W): the 3-D connected components, the
candidates (none, the largest component, components of at least a share of the largest) and
the choice among them from per-patient Dice (nnU-Net's determine_postprocessing rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from checkpoint import CheckpointError
from metrics import dice_score, label_components


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component (full connectivity: 26 neighbours in 3-D), as
    bool of the mask's shape. Of several components of the same largest size it keeps only
    the first in `metrics.label_components`' numbering: the one whose first voxel comes
    first in C order (slice, then row, then column). An empty mask is returned unchanged."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, sizes = label_components(mask)
    if len(sizes) == 2:  # one component: the mask itself
        return mask
    first_largest = int(np.flatnonzero(sizes == sizes.max())[0])
    return labels == first_largest


# Keep the largest 3-D component: the reference implementation's (brain-segmentation-pytorch)
# post-processing, and what a checkpoint without a record gets.
LCC = {"method": "lcc"}


NO_FILTER = {"method": "none"}
MIN_SHARES = (0.5, 0.25, 0.1, 0.05)  # remove components smaller than this share of the largest


POSTPROCESSING_CANDIDATES: tuple[dict, ...] = (
    LCC,
    *({"method": "min_share", "share": share} for share in MIN_SHARES),
    NO_FILTER,
)


TIE_TOLERANCE = 1e-9  # mean Dice closer than this counts as a tie


def check_postprocessing(record: Any, source: str | Path = "checkpoint") -> dict:
    """A copy of a valid post-processing record: {"method": "none"}, {"method": "lcc"} or
    {"method": "min_share", "share": s} with s in (0, 1]. Raises CheckpointError naming
    `source` for anything else."""
    if not isinstance(record, Mapping) or record.get("method") not in ("none", "lcc", "min_share"):
        raise CheckpointError(
            f"{source}: 'postprocessing' must be {{'method': 'none' | 'lcc' | 'min_share', ...}}, got {record!r}"
        )
    expected = {"method", "share"} if record["method"] == "min_share" else {"method"}
    share = record.get("share", 1.0)
    if set(record) != expected or isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise CheckpointError(
            f"{source}: 'postprocessing' {dict(record)!r}: 'min_share' takes one 'share' in (0, 1], "
            "'none' and 'lcc' take nothing else"
        )
    return dict(record)


def postprocessing_of(checkpoint: Mapping, source: str | Path = "checkpoint") -> dict:
    """The checkpoint's `postprocessing` record (checked), or LCC when it has none (a
    checkpoint saved without a choice, e.g. by a run stopped before its last epoch)."""
    record = checkpoint.get("postprocessing")
    return dict(LCC) if record is None else check_postprocessing(record, source)


def postprocessing_name(record: Mapping) -> str:
    """A candidate's short name for tables and summary.json: `none`, `lcc`, `min_share 10%`."""
    if record["method"] == "min_share":
        return f"min_share {100 * record['share']:g}%"
    return str(record["method"])


def keep_components(mask: np.ndarray, min_share: float) -> np.ndarray:
    """The 3-D connected components of `mask` with at least `min_share` (0, 1] of the voxels
    of the largest one, as bool of the same shape. Full connectivity (26 neighbours in 3-D),
    as `largest_connected_component` (`metrics.label_components`); components of equal size
    are kept or removed together, so no tie rule is needed. An empty mask is returned empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, sizes = label_components(mask)
    keep = sizes >= min_share * sizes.max()
    keep[0] = False
    return keep[labels]


def postprocess(mask: np.ndarray, record: Mapping) -> np.ndarray:
    """Apply a post-processing record (`check_postprocessing`) to a binary mask (S, H, W):
    bool of the same shape. `lcc` is exactly `postprocessing.largest_connected_component`."""
    method = record["method"]
    if method == "lcc":
        return largest_connected_component(mask)
    if method == "min_share":
        return keep_components(mask, float(record["share"]))
    if method == "none":
        return np.asarray(mask, dtype=bool)
    raise ValueError(f"unknown post-processing method {method!r}")


def candidate_dice(
    probabilities: np.ndarray,
    truth: np.ndarray,
    threshold: float = 0.5,
    candidates: Sequence[Mapping] = POSTPROCESSING_CANDIDATES,
) -> dict[str, float]:
    """Dice (metrics.dice_score) of each candidate applied to the same probabilities
    (S, H, W) float against `truth` (S, H, W) bool, both on the same grid; keyed by
    `postprocessing_name`."""
    mask = np.asarray(probabilities) >= threshold
    return {postprocessing_name(c): dice_score(postprocess(mask, c), truth) for c in candidates}


def choose_postprocessing(
    scores: Mapping[str, Mapping[str, float]], candidates: Sequence[Mapping] = POSTPROCESSING_CANDIDATES
) -> tuple[dict, list[dict]]:
    """The candidate with the best mean Dice over the patients of `scores` (patient id ->
    candidate name -> Dice, e.g. from `score_postprocessing` on validation patients). Ties
    (within TIE_TOLERANCE) go to the earlier candidate of `candidates`: the largest component
    first. Returns (the chosen record, the table: one dict per candidate with `candidate`,
    `record`, `mean`, `median`, in `candidates` order). Raises ValueError without patients."""
    if not scores:
        raise ValueError("choosing the post-processing needs at least one scored patient")
    table = []
    for candidate in candidates:
        name = postprocessing_name(candidate)
        values = np.array([patient[name] for patient in scores.values()], dtype=float)
        table.append(
            {
                "candidate": name,
                "record": dict(candidate),
                "mean": float(values.mean()),
                "median": float(np.median(values)),
            }
        )
    best = max(row["mean"] for row in table)
    chosen = next(row for row in table if row["mean"] >= best - TIE_TOLERANCE)
    return dict(chosen["record"]), table
