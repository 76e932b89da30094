"""A fixed test set read from a file (the locked real-data test set is one): the split keeps
exactly those patients out of training and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_train_args

import train
from patients import DataError
from splits import make_split, read_patient_list

REPO_LIST = "lgg/locked_test.txt"


def test_the_fixed_ids_are_the_test_set_and_nothing_else_is():
    ids = [f"P{i:02d}" for i in range(20)]
    strata = {i: n % 3 == 0 for n, i in enumerate(ids)}
    split = make_split(ids, val_patients=4, seed=3, strata=strata, test_ids=["P05", "P01", "P17"])
    assert split["test"] == ["P01", "P05", "P17"] and split["test_patients"] == 3
    assert len(split["val"]) == 4 and not set(split["val"]) & set(split["test"])
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    again = make_split(ids, val_patients=4, seed=3, strata=strata, test_ids=["P17", "P05", "P01"])
    assert again == split  # the order of the file does not matter
    other_seed = make_split(ids, val_patients=4, seed=4, strata=strata, test_ids=["P05", "P01", "P17"])
    assert other_seed["test"] == split["test"]  # the seed moves validation, never the test set


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"test_ids": ["P01", "X9"]}, "1 patient.* not in the data folder: X9"),
        ({"test_ids": ["P01"], "test_patients": 2}, "drop --folds and --test-patients"),
        ({"test_ids": ["P01"], "folds": 5, "fold": 0}, "drop --folds and --test-patients"),
        ({"test_ids": [f"P{i:02d}" for i in range(19)]}, "too few to split"),
    ],
)
def test_a_fixed_test_set_that_cannot_be_met_is_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_split([f"P{i:02d}" for i in range(20)], val_patients=2, **kwargs)


def test_patient_list_file_skips_comments_and_refuses_repeats(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("# header\nP01\n\n  P02  # trailing comment\n")
    assert read_patient_list(path) == ["P01", "P02"]
    path.write_text("P01\nP02\nP01\n")
    with pytest.raises(DataError, match="test.txt: lists P01 more than once"):
        read_patient_list(path)
    path.write_text("# nothing\n")
    with pytest.raises(DataError, match="holds no patient id"):
        read_patient_list(path)
    with pytest.raises(DataError, match="missing.txt: cannot read"):
        read_patient_list(tmp_path / "missing.txt")


def test_the_locked_lgg_test_set_in_the_repo_has_22_kaggle_patients():
    ids = read_patient_list(REPO_LIST)
    assert len(ids) == 22 and all(i.startswith("TCGA_") for i in ids)


def test_train_keeps_the_patients_of_the_file_as_its_test_set(phantom_dir, tmp_path):
    ids = sorted(p.name for p in Path(phantom_dir).iterdir() if p.is_dir())
    listed = tmp_path / "test.txt"
    listed.write_text(f"# two fixed test patients\n{ids[-1]}\n{ids[0]}\n")
    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1")
    train.main([*argv, "--test-patients-file", str(listed)])
    split = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["split"]
    assert split["test"] == [ids[0], ids[-1]] and not set(split["test"]) & set(split["train"] + split["val"])
    with pytest.raises(SystemExit, match="--test-patients-file fixes the test set: drop --test-patients"):
        train.main([*argv, "--test-patients-file", str(listed), "--test-patients", "2"])
    listed.write_text("NOT_A_PATIENT\n")
    with pytest.raises(SystemExit, match="not in the data folder: NOT_A_PATIENT"):
        train.main([*argv, "--test-patients-file", str(listed), "--overwrite"])
