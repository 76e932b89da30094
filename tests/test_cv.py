"""train.py's split flags: --test-patients, --fold i (the test set) and --fold all (every fold
of a cross-validation in one command), and predict.py pooling the fold checkpoints."""

import csv
import shlex

import pytest
import torch
from conftest import tiny_train_args

import predict
import run_setup
import train
from dataset import discover_patients
from patients import DataError

FOLDS = ["--folds", "3", "--val-patients", "2", "--steps-per-epoch", "1"]


def split_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["split"]


def cv_args(data_dir, work, *extra):
    return tiny_train_args(data_dir, work, "--fold", "all", *FOLDS, *extra)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--test-patients", "-1"], "--test-patients -1: must be >= 0"),
        (["--folds", "3", "--fold", "0", "--test-patients", "2"], "--test-patients 2: not used with --folds"),
        (["--folds", "1", "--fold", "0"], "--folds 1: cross-validation needs at least 2 folds"),
        (["--folds", "3", "--fold", "3"], "--fold 3: must be in 0..2 or 'all'"),
        (["--folds", "3", "--fold", "all", "--resume", "x.pt"], "use --resume auto"),
        (["--test-patients", "5"], "--val-patients 3: must be between 1 and 2"),
    ],
)
def test_invalid_split_flags_rejected_before_training(flags, message, phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", *flags))
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    assert not list(tmp_path.glob("ckpt/**/*.pt"))


def test_fold_must_be_a_number_or_all(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--folds", "3", "--fold", "one"])
    assert "expected a fold number (0..K-1) or 'all', not 'one'" in capsys.readouterr().err


def test_test_patients_are_held_out_and_counted(phantom_dir, tmp_path, capsys):
    flags = ["--epochs", "1", "--steps-per-epoch", "1", "--val-patients", "2", "--test-patients", "2"]
    result = train.main(tiny_train_args(phantom_dir, tmp_path, *flags))
    split = split_of(tmp_path / "ckpt" / "best_model.pt")
    assert split == result["split"]
    train_ids, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert len(val) == 2 and len(test) == 2 and not (train_ids & val or train_ids & test or val & test)
    assert train_ids | val | test == {p.patient_id for p in discover_patients(phantom_dir)}
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("patients:")]
    assert line.startswith("patients: 4 train (") and "), 2 val, 2 test; " in line


def test_fold_all_trains_every_fold_and_predict_pools_them(phantom_dir, tmp_path, capsys):
    result = train.main(cv_args(phantom_dir, tmp_path, "--epochs", "1"))
    out = capsys.readouterr().out
    cv = tmp_path / "ckpt"
    paths = [cv / f"fold{i}" / "best_model.pt" for i in range(3)]
    splits = [split_of(path) for path in paths]
    everyone = {p.patient_id for p in discover_patients(phantom_dir)}
    tests = [set(s["test"]) for s in splits]
    assert sum(len(t) for t in tests) == len(everyone) and set().union(*tests) == everyone  # disjoint, cover all
    for i, split in enumerate(splits):
        assert split["fold"] == i and split["folds"] == 3
        assert torch.load(paths[i], weights_only=True)["args"]["fold"] == i
        assert not set(split["val"]) & tests[i] and not set(split["train"]) & tests[i]
        assert not set(split["val"]) & set(split["train"]) and len(split["val"]) == 2
        assert (cv / f"fold{i}" / "last.pt").is_file() and (cv / f"fold{i}" / "args.json").is_file()
        choice = torch.load(paths[i], weights_only=True)["postprocessing_selection"]  # each fold on its own val
        assert choice["patients"] == split["val"] and set(choice["dice"]) == set(split["val"])
    assert [r["split"] for r in result["folds"]] == splits
    assert out.count("post-processing of ") == 3
    assert len({p.name for p in (tmp_path / "tb").iterdir()}) == 3  # a TensorBoard sub-folder per fold
    assert out.count("=== fold ") == 3 and "patients: 3 train (" in out

    # the closing hint is the pooled predict.py command: run it
    command = shlex.split(out.split("next: ")[1].splitlines()[0])
    assert command[:4] == ["python", "predict.py", "--model-path", *map(str, paths[:1])]
    summary = predict.main([*command[2:], "--no-cache", "--no-overlays", "--backend", "torch"])
    with (cv / "predictions" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["patient"] for r in rows} == everyone and {r["role"] for r in rows} == {"test"}
    for row in rows:  # each patient scored by the one model it was a test patient of
        (fold,) = [i for i in range(3) if row["patient"] in tests[i]]
        assert row["models"] == str(paths[fold])
    assert summary["protocol"]["mode"] == "folds"
    assert summary["headline"]["count"] == len(everyone) and not summary["headline"]["biased"]


def test_fold_all_resume_auto_skips_finished_folds_and_continues_the_others(phantom_dir, tmp_path, capsys):
    args = cv_args(phantom_dir, tmp_path, "--epochs", "2")
    cv = tmp_path / "ckpt"
    stopped = train.main([*args, "--stop-after-epoch", "1"])
    assert [r["history"][-1]["epoch"] for r in stopped["folds"]] == [1, 1, 1]
    assert not any(  # a stopped run has not chosen yet: its best_model.pt may still change
        "postprocessing" in torch.load(cv / f"fold{i}" / "best_model.pt", weights_only=True) for i in range(3)
    )
    command = shlex.split(capsys.readouterr().out.split("continue with:")[1].strip())
    assert (
        "--fold" in command and command[command.index("--fold") + 1] == "all" and command[-2:] == ["--resume", "auto"]
    )
    # finish fold 0 on its own, as a single run in its folder
    single = tiny_train_args(phantom_dir, tmp_path, "--fold", "0", *FOLDS, "--epochs", "2")
    train.main([*single, "--checkpoint-dir", str(cv / "fold0"), "--resume", "auto"])
    fold0 = (cv / "fold0" / "last.pt").read_bytes()
    fold1 = (cv / "fold1" / "last.pt").read_bytes()

    for change, message in [
        ([], f"--checkpoint-dir {cv / 'fold0'} already holds last.pt and best_model.pt"),
        (["--lr", "0.001", "--resume", "auto"], f"{cv / 'fold0' / 'last.pt'} was trained with --lr 0.0001"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, *change])
        assert str(exit_info.value.code).startswith(f"error: {message}")
        assert (cv / "fold1" / "last.pt").read_bytes() == fold1  # refused before any fold trained

    resumed = train.main(command[2:])
    out = capsys.readouterr().out
    assert resumed["folds"][0] is None and "fold 0: finished earlier (epoch 2 of 2" in out
    assert all("postprocessing" in torch.load(cv / f"fold{i}" / "best_model.pt", weights_only=True) for i in range(3))
    assert [[h["epoch"] for h in r["history"]] for r in resumed["folds"][1:]] == [[2], [2]]
    assert (cv / "fold0" / "last.pt").read_bytes() == fold0
    again = train.main(command[2:])
    assert again["folds"] == [None, None, None]


def test_a_failing_fold_stops_the_command_with_one_line(phantom_dir, tmp_path, monkeypatch):
    cv = tmp_path / "ckpt"
    load = run_setup.load_split_volumes

    def fail_on_fold_1(args, *rest):
        if args.fold == 1:
            raise DataError("/data/TCGA_X/TCGA_X_3.tif: cannot read TIFF")
        return load(args, *rest)

    monkeypatch.setattr(run_setup, "load_split_volumes", fail_on_fold_1)
    with pytest.raises(SystemExit) as exit_info:
        train.main(cv_args(phantom_dir, tmp_path, "--epochs", "1"))
    message = str(exit_info.value.code)
    assert message == (
        f"error: fold 1 of 3 ({cv / 'fold1'}): /data/TCGA_X/TCGA_X_3.tif: cannot read TIFF (folds 2..2 not "
        "trained; once fixed, --resume auto skips the finished folds and continues this one)"
    )
    assert (cv / "fold0" / "best_model.pt").is_file() and not list(cv.glob("fold[12]/*.pt"))


def test_stale_fold_of_an_earlier_run_is_refused_or_overwritten(phantom_dir, tmp_path, capsys):
    cv = tmp_path / "ckpt"
    (cv / "fold3").mkdir(parents=True)
    (cv / "fold3" / "best_model.pt").write_bytes(b"an earlier 4-fold run")
    with pytest.raises(SystemExit) as exit_info:
        train.main(cv_args(phantom_dir, tmp_path, "--epochs", "1"))
    assert str(exit_info.value.code) == (
        f"error: --checkpoint-dir {cv} holds fold3/ of an earlier run with more than 3 folds: use another "
        "--checkpoint-dir, or pass --overwrite (deletes its checkpoints)"
    )
    assert not (cv / "fold0").exists()
    train.main(cv_args(phantom_dir, tmp_path, "--epochs", "1", "--overwrite"))
    assert not (cv / "fold3" / "best_model.pt").exists() and (cv / "fold2" / "best_model.pt").is_file()
    assert f"--overwrite: deleted {cv / 'fold3' / 'best_model.pt'}" in capsys.readouterr().out
