"""TODO docstring for splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from patients import DataError


def make_split(
    patient_ids: Sequence[str],
    val_patients: int = 10,
    seed: int = 42,
    folds: int | None = None,
    fold: int | None = None,
    strata: dict[str, bool] | None = None,
    test_patients: int = 0,
) -> dict:
    """Deterministic patient-level split into three disjoint lists: `train` fits the
    weights, `val` chooses the checkpoint, `test` is never used in training.

    - `folds`=K, `fold`=i: the patients are cut into K folds (a stratified random order,
      split into K near-equal chunks); fold i is `test`, `val_patients` are drawn
      (stratified) from the other folds, the rest train. Over i = 0..K-1 every patient is
      test exactly once. `test_patients` must be 0.
    - otherwise: `val_patients` from the front of the stratified order and `test_patients`
      from its back (with `test_patients`=0 the validation list of a seed is the one tests/test_split.py
      pins).

    With `strata` (patient -> has a lesion) each group is spread evenly over val, test and
    the folds. Returns a plain dict {train, val, test (sorted id lists), seed, folds, fold,
    val_patients, test_patients, stratified}. Raises DataError naming the flag when the
    request cannot be met (too few patients, fold out of range, duplicate ids).
    """
    ids = sorted(patient_ids)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate patient ids in the data directory")
    strata = strata or {}
    rng = np.random.default_rng(seed)
    order = _stratified_order(ids, strata, rng)
    if folds is not None:
        test = _fold_of(order, folds, fold, test_patients)
        rest = _stratified_order(sorted(set(ids) - set(test)), strata, rng)  # the other K-1 folds
        _check_counts(len(ids), val_patients, len(test), f"{len(test)} of them in test fold {fold} of {folds}")
        val = rest[:val_patients]
    else:
        if test_patients < 0:
            raise DataError(f"--test-patients {test_patients}: must be >= 0")
        _check_counts(len(ids), val_patients, test_patients, f"{test_patients} of them held out by --test-patients")
        val = order[:val_patients]
        test = order[len(order) - test_patients :]
    held = set(val) | set(test)
    return {
        "train": [i for i in ids if i not in held],
        "val": sorted(val),
        "test": sorted(test),
        "seed": seed,
        "folds": folds,
        "fold": fold,
        "val_patients": len(val),
        "test_patients": len(test),
        "stratified": bool(strata),
    }


def _fold_of(order: list[str], folds: int, fold: int | None, test_patients: int) -> list[str]:
    """Fold `fold` of `folds` near-equal chunks of `order` (the test set of that fold)."""
    if test_patients:
        raise DataError(f"--test-patients {test_patients}: not used with --folds (there fold i is the test set)")
    if not 2 <= folds <= len(order):
        raise DataError(f"--folds {folds}: need 2 <= folds <= number of patients ({len(order)})")
    if fold is None or not 0 <= fold < folds:
        raise DataError(f"--fold {fold}: must be in 0..{folds - 1}")
    return [str(i) for i in np.array_split(np.array(order, dtype=object), folds)[fold]]


def _check_counts(total: int, val_patients: int, test_patients: int, context: str) -> None:
    """At least one validation and one training patient must remain."""
    if total - test_patients < 2:
        raise DataError(
            f"{total} patient(s) ({context}): too few to split; training needs at least one training "
            "and one validation patient"
        )
    if not 0 < val_patients < total - test_patients:
        raise DataError(
            f"--val-patients {val_patients}: must be between 1 and {total - test_patients - 1} "
            f"({total} patients, {context}; at least one must be left to train)"
        )


def _stratified_order(ids: list[str], strata: dict[str, bool], rng: np.random.Generator) -> list[str]:
    """A random order in which every stratum is spread evenly: shuffle each group, give
    its members positions (rank + 0.5) / group size, and sort by position (ties at random)."""
    groups: dict[bool, list[str]] = {}
    for i in ids:
        groups.setdefault(strata.get(i, False), []).append(i)
    keyed = []
    for key in sorted(groups):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        keyed += [((rank + 0.5) / len(members), rng.random(), pid) for rank, pid in enumerate(members)]
    return [pid for _, _, pid in sorted(keyed)]
