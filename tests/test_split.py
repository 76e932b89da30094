"""Patient-level splits: three disjoint roles, folds in which every patient is test once."""

import pytest

from patients import DataError
from splits import make_split

IDS = [f"TCGA_{i:02d}" for i in range(30)]
STRATA = {p: i % 5 != 0 for i, p in enumerate(IDS)}  # 6 lesion-free, 24 with a lesion


def roles(split):
    return set(split["train"]), set(split["val"]), set(split["test"])


def assert_partition(split, ids):
    train, val, test = roles(split)
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(ids)
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == len(ids)


def test_default_protocol_keeps_the_validation_list_of_commit_dfb29f7():
    # Produced by make_split at commit dfb29f7 (before test sets existed); a checkpoint's
    # split must stay reproducible from the seed, so these lists must never change.
    assert make_split(IDS)["val"] == [f"TCGA_{i:02d}" for i in (5, 7, 10, 16, 21, 22, 24, 25, 26, 29)]
    assert make_split(IDS, strata=STRATA)["val"] == [f"TCGA_{i:02d}" for i in (2, 6, 7, 9, 10, 11, 15, 16, 21, 22)]
    old = make_split(IDS, strata=STRATA)
    assert old["test"] == [] and old["seed"] == 42 and old["folds"] is None


def test_holdout_split_deterministic_and_disjoint():
    a = make_split(IDS, 5, seed=1, test_patients=6)
    assert a == make_split(list(reversed(IDS)), val_patients=5, seed=1, test_patients=6)
    assert len(a["val"]) == 5 and len(a["test"]) == 6
    assert_partition(a, IDS)
    assert make_split(IDS, 5, seed=2, test_patients=6)["test"] != a["test"]
    # the validation list does not depend on how many test patients are held out
    assert a["val"] == make_split(IDS, 5, seed=1)["val"]


def test_folds_every_patient_test_exactly_once_and_val_never_test():
    for strata in (None, STRATA):
        splits = [make_split(IDS, val_patients=4, seed=3, folds=4, fold=i, strata=strata) for i in range(4)]
        tests = [p for s in splits for p in s["test"]]
        assert sorted(tests) == IDS  # every patient exactly once
        for i, split in enumerate(splits):
            assert_partition(split, IDS)
            assert len(split["val"]) == 4 and 7 <= len(split["test"]) <= 8
            assert split["folds"] == 4 and split["fold"] == i


def test_folds_of_commit_dfb29f7_are_the_test_sets():
    # at dfb29f7 fold i was the validation set; the same patients are its test set here
    assert make_split(IDS, 4, folds=3, fold=1, strata=STRATA)["test"] == [
        f"TCGA_{i:02d}" for i in (1, 3, 4, 13, 20, 24, 25, 26, 27, 29)
    ]


def test_stratified_split_spreads_lesion_free_patients():
    ids = [f"P{i:02d}" for i in range(20)]
    strata = {pid: i >= 4 for i, pid in enumerate(ids)}  # 4 lesion-free, 16 with lesion
    for seed in range(10):
        split = make_split(ids, 5, seed=seed, strata=strata, test_patients=5)
        assert sum(not strata[p] for p in split["val"]) == 1
        assert sum(not strata[p] for p in split["test"]) == 1
        folds = [make_split(ids, 4, seed=seed, folds=4, fold=f, strata=strata) for f in range(4)]
        assert [sum(not strata[p] for p in s["test"]) for s in folds] == [1, 1, 1, 1]
        # 3 lesion-free patients remain outside each test fold: 4 of 15 val draws is ~0.8 expected
        assert all(sum(not strata[p] for p in s["val"]) <= 2 for s in folds)
    assert make_split(ids, 5, seed=3, strata=strata) == make_split(ids, 5, seed=3, strata=strata)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"val_patients": 0}, "--val-patients 0"),
        ({"val_patients": 4}, "--val-patients 4"),
        ({"val_patients": 2, "test_patients": 2}, "--val-patients 2"),
        ({"val_patients": 1, "test_patients": -1}, "--test-patients -1"),
        ({"val_patients": 1, "folds": 5, "fold": 0}, "--folds 5"),
        ({"val_patients": 1, "folds": 2, "fold": 2}, "--fold 2"),
        ({"val_patients": 2, "folds": 2, "fold": 0}, "--val-patients 2"),
        ({"val_patients": 1, "folds": 2, "fold": 0, "test_patients": 1}, "--test-patients 1"),
    ],
)
def test_impossible_splits_name_the_flag(kwargs, flag):
    with pytest.raises(DataError, match=flag):
        make_split(["a", "b", "c", "d"], **kwargs)
