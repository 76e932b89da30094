"""Patient splits: train / validation / test, or K folds, stratified by lesion presence and
reproducible from a seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patients import DataError
from utils import UsageError


def make_split(
    patient_ids: Sequence[str],
    val_patients: int = 10,
    seed: int = 42,
    folds: int | None = None,
    fold: int | None = None,
    strata: dict[str, bool] | None = None,
    test_patients: int = 0,
    test_ids: Sequence[str] | None = None,
) -> dict:
    """Deterministic patient-level split into three disjoint lists: `train` fits the
    weights, `val` chooses the checkpoint, `test` is never used in training.

    - `folds`=K, `fold`=i: the patients are cut into K folds (a stratified random order,
      split into K near-equal chunks); fold i is `test`, `val_patients` are drawn
      (stratified) from the other folds, the rest train. Over i = 0..K-1 every patient is
      test exactly once. `test_patients` must be 0.
    - `test_ids` (a fixed test set, e.g. `read_patient_list` of a file): exactly these
      patients are `test`; `val_patients` come from the front of the stratified order of
      the others. `folds` and `test_patients` must be unset.
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
    if test_ids is not None:
        test = _fixed_test_set(ids, test_ids, folds, test_patients)
        _check_counts(len(ids), val_patients, len(test), f"{len(test)} of them in the fixed test set")
        val = [i for i in order if i not in set(test)][:val_patients]
    elif folds is not None:
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


def _fixed_test_set(ids: list[str], test_ids: Sequence[str], folds: int | None, test_patients: int) -> list[str]:
    """The fixed test set, checked: every id among the patients, none twice, no other split flag."""
    if folds is not None or test_patients:
        raise DataError("--test-patients-file fixes the test set: drop --folds and --test-patients")
    missing = sorted(set(test_ids) - set(ids))
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} patient(s) of the fixed test set are not in the data folder: {listed}")
    return sorted(set(test_ids))


def read_patient_list(path: str | Path) -> list[str]:
    """The patient ids of a text file, one per line; blank lines and `#` comments are skipped.
    Raises DataError naming the file when it cannot be read, is empty or repeats an id."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the patient list ({error})") from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise DataError(f"{path}: holds no patient id (one per line; # starts a comment)")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"{path}: lists {', '.join(repeated)} more than once")
    return ids


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


def fold_choice(text: str) -> int | str:
    """--fold: a fold number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number (0..K-1) or 'all', not {text!r}") from None


def add_split_flags(add: Callable[..., Any]) -> None:
    """Declare the split's flags through `add` (`utils.RunFlags.add`; they define the run)."""
    add(
        "--val-patients",
        defines_run=True,
        type=int,
        default=10,
        help="patients whose Dice chooses best_model.pt (validation)",
    )
    add(
        "--test-patients",
        defines_run=True,
        type=int,
        default=0,
        help="patients held out as a test set, never used in training (not with --folds)",
    )
    add(
        "--test-patients-file",
        defines_run=True,
        default=None,
        metavar="FILE",
        help="a fixed test set: the patient ids in FILE, one per line (e.g. lgg/locked_test.txt); "
        "not with --test-patients or --folds",
    )
    add("--folds", defines_run=True, type=int, default=None, help="K-fold cross-validation: number of folds")
    add(
        "--fold",
        defines_run=True,
        type=fold_choice,
        default=None,
        help="fold i (0..K-1) is the TEST set; --val-patients come from the other folds, the rest train. "
        "'all': train folds 0..K-1 one after the other into <checkpoint-dir>/fold<i>/",
    )


def split_of_args(args: argparse.Namespace, patient_ids: Sequence[str], strata: dict[str, bool] | None = None) -> dict:
    """`make_split` of train.py's split flags (reading --test-patients-file when given)."""
    test_ids = read_patient_list(args.test_patients_file) if args.test_patients_file else None
    return make_split(
        patient_ids, args.val_patients, args.seed, args.folds, args.fold, strata, args.test_patients, test_ids
    )


def validate_split_args(args: argparse.Namespace) -> None:
    """Raise UsageError (one line) for split flags that cannot go together or be met."""
    if args.val_patients <= 0:
        raise UsageError(f"--val-patients {args.val_patients}: must be positive")
    if args.test_patients < 0:
        raise UsageError(f"--test-patients {args.test_patients}: must be >= 0")
    if (args.folds is None) != (args.fold is None):
        raise UsageError("--folds and --fold go together")
    if args.test_patients_file is not None and (args.test_patients or args.folds is not None):
        raise UsageError("--test-patients-file fixes the test set: drop --test-patients and --folds")
    if args.folds is None:
        return
    if args.folds < 2:
        raise UsageError(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if args.fold != "all" and not 0 <= args.fold < args.folds:
        raise UsageError(f"--fold {args.fold}: must be in 0..{args.folds - 1} or 'all'")
    if args.test_patients:
        raise UsageError(f"--test-patients {args.test_patients}: not used with --folds (there fold i is the test set)")
    if args.fold == "all" and args.resume not in (None, "auto"):
        raise UsageError(
            f"--fold all --resume {args.resume}: each fold continues from its own folder; use --resume auto"
        )
