"""summary.json's statistics: the per-patient metrics of `metrics.REGISTRY` pooled over
patients (mean and median), per role, and for the headline (test + unseen patients only).

`HEADLINE_ROLES`, `ROLES` and `BIAS` are the evaluation protocol's one statement of which
patients an honest figure may pool; predict.py and pictures.py (the Dice chart's lines)
read them here.
"""

from __future__ import annotations

import json
import math

import numpy as np

from metrics import metric_names, metric_units

ROLES = ("train", "val", "test", "unseen", "unknown")  # unknown: a checkpoint without a saved split
HEADLINE_ROLES = ("test", "unseen")
BIAS = {
    "val": "biased by model selection: these patients chose the checkpoint (best validation Dice)",
    "train": "biased by training: the model was fitted on these patients",
    "unknown": "of unknown bias: a checkpoint has no saved split",
}


def metric_stats(labelled: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean and median of each registered metric over rows with metrics; NaN (undefined
    hd95) and missing values skipped; None where no row has a value."""
    stats = {}
    for name in metric_names():
        values = np.array([r.get(name) for r in labelled], dtype=float)  # None (a missing value) -> NaN
        finite = values[np.isfinite(values)]
        stats[name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
        }
    return stats


def units_summary(rows: list[dict]) -> dict:
    """summary.json's `units`: hd95 and volume units shared by every scored patient, or, where
    patients differ (NIfTI with spacing beside TIFF without), "mixed" and `by_patient`."""
    scored = {r["patient"]: r["units"] for r in rows if r.get("dice") is not None and "units" in r}
    kinds = {json.dumps(u, sort_keys=True) for u in scored.values()}
    if len(kinds) <= 1:
        return dict(next(iter(scored.values()), metric_units(None)))
    return {
        "hd95": "mixed",
        "volume": "mixed",
        "note": "patients differ (mm / mm3 with a voxel spacing, voxels without); means pool different units",
        "by_patient": scored,
    }


def headline(labelled: list[dict]) -> dict:
    """The publishable figure: metrics pooled over `test` and `unseen` patients only. When no
    such patient was scored, the statistics of the others with a note on their bias."""
    honest = [r for r in labelled if r.get("role") in HEADLINE_ROLES]
    if honest or not labelled:
        roles, rows, note = list(HEADLINE_ROLES), honest, None
    else:
        roles = sorted({r.get("role", "unknown") for r in labelled})
        rows = labelled
        note = "no test or unseen patient scored; this figure is " + " and ".join(BIAS[r] for r in roles if r in BIAS)
    return {"roles": roles, "count": len(rows), "biased": note is not None, "note": note, "metrics": metric_stats(rows)}


def summarize(rows: list[dict], protocol: dict) -> dict:
    """Mean and median of each metric over all labelled patients (`metrics`), per role
    (`by_role`: count, labelled count, metrics) and pooled over test + unseen (`headline`);
    counts, failed patients and the protocol."""
    labelled = [r for r in rows if r.get("dice") is not None]
    summary: dict = {"patients": len(rows), "labelled_patients": len(labelled), "metrics": metric_stats(labelled)}
    summary["by_role"] = {}
    for role in ROLES:
        members = [r for r in rows if r.get("role") == role]
        if members:
            scored = [r for r in members if r.get("dice") is not None]
            summary["by_role"][role] = {"count": len(members), "labelled": len(scored), "metrics": metric_stats(scored)}
    summary["headline"] = headline(labelled)
    summary["hd95_undefined_patients"] = int(sum(1 for r in labelled if not math.isfinite(r["hd95"])))
    summary["empty_truth_patients"] = int(sum(1 for r in labelled if r["gt_pixels"] == 0))
    summary["empty_prediction_patients"] = int(sum(1 for r in labelled if r["pred_pixels"] == 0))
    summary["failed_patients"] = {r["patient"]: r["error"] for r in rows if r.get("error")}
    summary["units"] = units_summary(rows)
    summary["protocol"] = protocol
    return summary
