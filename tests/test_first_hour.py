"""What a new user meets in the first hour: one-line usage errors with
"did you mean", accepted device names, a zip file given as --data-dir, a fold checkpoint on
other data, no folders left by a refused command, the hub's image size and its warning on a
phantom-trained model, time left."""

import html
import json
import shlex
import shutil
import warnings
import zipfile

import pytest
import torch
from conftest import ROOT, tiny_train_args

import bench
import dataset
import export
import predict
import train
import training_log
import utils
from dataset import discover_inputs, discover_patients
from patients import DataError
from utils import UsageError, check_writable_dir, resolve_device


@pytest.mark.parametrize(
    "module, argv, hint",
    [
        (train, ["--image_size", "64"], "--image-size"),
        (train, ["--epoch", "3"], "--epochs"),
        (predict, ["--thresold", "0.4"], "--threshold"),
        (export, ["--model_path", "x.pt"], "--model-path"),
        (dataset, ["preprocess", "--data_dir", "x"], "--data-dir"),
    ],
)
def test_a_mistyped_flag_is_one_line_with_did_you_mean(module, argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no usage block before the error
    assert f"did you mean {hint}?" in err and "error: unrecognized arguments" in err


def test_a_flag_far_from_any_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        train.main(["--zzzz"])
    err = capsys.readouterr().err
    assert "did you mean" not in err and len(err.strip().splitlines()) == 1


def test_an_unknown_device_name_says_what_is_accepted():
    with pytest.raises(UsageError) as error:
        resolve_device("gpu")
    message = str(error.value)
    assert message.startswith("--device gpu: not a device name; expected cpu, cuda or cuda:N")
    assert "xla" not in message and "meta" not in message  # not torch's list of every device type


def test_a_zip_file_as_data_dir_says_to_unzip_it(tmp_path):
    archive = tmp_path / "lgg-mri-segmentation.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("kaggle_3m/README.md", "x")
    for discover in (discover_patients, discover_inputs):
        with pytest.raises(DataError, match=r"lgg-mri-segmentation\.zip: is a zip file; unzip it first"):
            discover(archive)


def test_fold_checkpoint_on_other_data_names_its_test_patients(trained_checkpoint, tmp_path):
    other = tmp_path / "other"
    dataset.make_synthetic_dataset(other, patients=2, seed=11, image_size=64, slices=(5, 6))
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["split"]["test"] = ["TCGA_ZZ_0001_20000101"]  # a test patient that `other` lacks
    path = tmp_path / "fold0.pt"
    torch.save(checkpoint, path)
    out = tmp_path / "out"
    argv = ["--model-path", str(path), "--data-dir", str(other), "--output-dir", str(out), "--no-cache"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*argv, "--patients", "test"])
    message = str(exit_info.value.code)
    assert "1 of the checkpoints' test patients are not in --data-dir" in message
    assert "TCGA_ZZ_0001_20000101" in message and "pass --patients all" in message
    assert not out.exists()  # refused before any folder was made
    # without --patients, data that holds none of the run's patients is predicted whole (all unseen)
    summary = predict.main([*argv, "--no-report"])
    assert summary["protocol"]["patients"] == ["all"] and summary["patients"] == 2


def test_refused_commands_leave_no_folders_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_data"
    for argv in (
        ["--data-dir", str(missing), "--epochs", "1"],  # train.py with its default folders
    ):
        with pytest.raises(SystemExit):
            train.main(argv)
    with pytest.raises(SystemExit):
        predict.main(["--model-path", "nope.pt", "--data-dir", str(missing)])
    with pytest.raises(SystemExit):
        dataset.main(["preprocess", "--data-dir", str(missing)])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache/, checkpoints/, tb_logs/, predictions/


def test_check_writable_dir_creates_nothing_and_names_a_file_in_the_way(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable_dir(target, "--output-dir") == target
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"^--cache-dir .*blocker/sub: cannot create the folder \(.*is a file\)"):
        check_writable_dir(blocker / "sub", "--cache-dir")
    with pytest.raises(UsageError, match=r"^--cache-dir .*blocker: is a file, not a folder"):
        check_writable_dir(blocker, "--cache-dir")


def test_check_writable_dir_reports_a_read_only_parent(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("utils.tempfile.TemporaryFile", refuse)
    with pytest.raises(UsageError, match=r"not writable \(Read-only file system\)"):
        check_writable_dir(tmp_path / "new", "--log-dir")


def test_hub_pipeline_warns_when_image_size_differs_from_the_checkpoint(trained_checkpoint):
    def load(**kwargs):
        return torch.hub.load(
            str(ROOT), "segmentation_pipeline", source="local", trust_repo=True, weights_path=str(trained_checkpoint),
            **kwargs,
        )  # fmt: skip

    with pytest.warns(UserWarning, match=r"image_size=64, but .* was trained at 32 x 32"):
        assert load(image_size=64).image_size == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", ".*trained on phantom data only")  # test_hub_pipeline_warns_on_a_phantom_...
        assert load().image_size == 32 and load(image_size=32).image_size == 32


def test_progress_label_estimates_the_time_left():
    assert training_log.progress_label(1, 10, []) == "epoch 1/10"
    seconds = [100.0, 10.0, 20.0, 30.0]  # the mean of the last three: 20 s an epoch
    assert training_log.progress_label(5, 10, seconds) == "epoch 5/10, run 2 min 00 s left"  # epochs 5..10
    assert training_log.progress_label(5, 10, seconds, stop_after=6) == "epoch 5/10, run 40 s left"  # epochs 5..6
    assert utils.format_duration(42) == "42 s" and utils.format_duration(3725) == "1 h 02 min"


@pytest.mark.parametrize("val_patients, lesion_free", [(4, 1), (3, 0)])
def test_start_lines_say_why_the_validation_mean_jumps(phantom_dir, tmp_path, capsys, val_patients, lesion_free):
    """The shared phantom has one lesion-free patient (TCGA_PH_0000): with seed 42 it is in the
    validation set of 4 and not in that of 3 (checked against the saved split below)."""
    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1")
    train.main([*argv, "--val-patients", str(val_patients)])
    out = capsys.readouterr().out
    val = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["split"]["val"]
    assert ("TCGA_PH_0000_20000302" in val) == bool(lesion_free)
    if lesion_free:
        assert f"validation: 1 of {val_patients} patients are lesion-free; each scores Dice 1" in out
    else:
        assert "lesion-free" not in out


@pytest.mark.parametrize(
    "module, argv, prog",
    [
        (dataset, ["preprocess", "--patients", "3"], "preprocess"),  # a flag of the other sub-command
        (dataset, ["synthesize", "out", "--data-dir", "x"], "synthesize"),
        (bench, ["speed", "--output", "x"], "speed"),
        (bench, ["speed", "--seed", "1"], "speed"),  # not --seeds, which is ablation's
    ],
)
def test_a_sub_command_suggests_only_its_own_flags(module, argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    flag = argv[2] if argv[0] == "synthesize" else argv[1]
    assert f"did you mean {flag}?" not in err and "--seeds" not in err
    assert err.endswith(f"{prog} --help") and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["meta", "xla", "mps"])
def test_device_types_the_project_cannot_use_are_one_line(name):
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UsageError, match=rf"^--device {name}: "):
        resolve_device(name)


def test_old_bench_spelling_gets_the_new_one():
    with pytest.raises(SystemExit, match=r"takes a sub-command first: python bench.py speed --device cpu --quick"):
        bench.main(["--device", "cpu", "--quick"])


def test_more_refusals_leave_no_folders_and_say_what_is_wrong(tmp_path, small_phantom, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="not a PyTorch checkpoint"):
        export.main(["--model-path", str(ROOT / "README.md"), "--output", "newdir/x.onnx"])
    with pytest.raises(SystemExit, match=r"README\.md: is a file, not a folder"):
        train.main(["--data-dir", str(ROOT / "README.md"), "--epochs", "1"])
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["preprocess", "--data-dir", str(small_phantom), "--num-workers", "-1"])
    assert exit_info.value.code == 2 and "must be >= 0, not -1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--image-size 30: must be divisible by 16"):
        dataset.main(["preprocess", "--data-dir", str(small_phantom), "--image-size", "30"])
    sorted(small_phantom.glob("*/*_2.tif"))[0].write_bytes(
        b"not a tiff"
    )  # found while preprocessing, after every check
    with pytest.raises(SystemExit, match="cannot read TIFF"):
        train.main(["--data-dir", str(small_phantom), "--epochs", "1", "--val-patients", "1", "--no-cache"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kaggle_3m"]  # no checkpoints/, tb_logs/, newdir/


def test_hub_pipeline_refuses_an_image_size_the_unet_cannot_take(trained_checkpoint):
    with pytest.raises(ValueError, match="image_size=50 must be a multiple of 16"):
        torch.hub.load(
            str(ROOT), "segmentation_pipeline", source="local", trust_repo=True,
            weights_path=str(trained_checkpoint), image_size=50,
        )  # fmt: skip


def test_a_finished_run_prints_the_predict_command_for_its_model(phantom_dir, tmp_path, capsys):
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1"))
    out = capsys.readouterr().out
    command = shlex.split(out.split("next: ")[1].splitlines()[0])
    assert command[:4] == ["python", "predict.py", "--model-path", str(tmp_path / "ckpt" / "best_model.pt")]
    assert command[command.index("--output-dir") + 1] == str(tmp_path / "ckpt" / "predictions")
    assert "learning curves:" not in out  # the tiny run draws none (--no-learning-curves)


def test_a_patient_folder_as_data_dir_gets_its_own_hint(phantom_dir):
    patient = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["check", "--data-dir", str(patient)])
    message = str(exit_info.value.code)
    assert f"looks like one patient's folder: pass its parent (--data-dir {phantom_dir})" in message
    assert f"--patients {patient.name}" in message and "\n" not in message


def test_the_projection_counts_every_epoch_and_validation():
    # 10 steps of 2 s and 64 validation slices at batch 16: 4 forward batches of 2/3 s each
    assert training_log.projected_seconds(2.0, 10, 3, 64, 16) == pytest.approx(3 * (20 + 4 * 2 / 3))
    short = training_log.projection_lines(3600, 10, 1.0, "cpu")
    assert len(short) == 1 and short[0].startswith("projected: 1 h 00 min for the 10 epoch(s) to go on cpu")
    long = training_log.projection_lines(3 * 3600, 100, 1.0, "cpu")
    assert len(long) == 2 and "docs/training.md#on-a-cpu" in long[1]
    assert len(training_log.projection_lines(3 * 3600, 100, 1.0, "cuda")) == 1  # a long GPU run is no surprise


def test_progress_reporter_projects_once_and_writes_lines_for_a_log_file(capsys):
    early = training_log.ProgressReporter(10, 4, 32, 16, "cpu", every=0.0, quiet=True)
    early(0, 1, 30.0)
    early(0, 2, 20.0)  # two steps timed: warm-up still weighs in, nothing said yet
    assert capsys.readouterr().out == ""
    early(0, 3, 2.0)
    assert capsys.readouterr().out.startswith("projected: 1 min 25 s ")  # 4 x (10 x 2 s + 4/3 s)
    resumed = training_log.ProgressReporter(10, 4, 32, 16, "cpu", every=0.0, quiet=False)
    resumed(0, 9, 2.0, timed=2)  # resumed at step 7: two steps timed
    assert capsys.readouterr().out == ""
    resumed(0, 10, 2.0, timed=2)  # the epoch's last step projects however few were timed
    assert capsys.readouterr().out.startswith("projected: ")
    reporter = training_log.ProgressReporter(10, 4, 32, 16, "cpu", every=0.0, quiet=True)
    reporter(0, 5, 2.0)  # 2 s per step
    reporter(1, 10, 2.0)
    out = capsys.readouterr().out.splitlines()
    assert [line.startswith("projected: ") for line in out] == [True, False, False]
    assert out[1] == "epoch 1 of the 4 to go: step 5/10, run about 1 min 15 s left"  # 4 x (20 + 4/3) - 10 s
    assert out[2].startswith("epoch 2 of the 4 to go: step 10/10")
    terminal = training_log.ProgressReporter(10, 4, 32, 16, "cpu", every=0.0, quiet=False)
    terminal(0, 5, 2.0)
    terminal(0, 10, 2.0)
    assert len(capsys.readouterr().out.splitlines()) == 1  # on a terminal the bar shows the rest


def test_a_run_prints_its_projection_after_the_first_steps(phantom_dir, tmp_path, capsys):
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "3", "--steps-per-epoch", "2"))
    out = capsys.readouterr().out
    assert out.count("projected: ") == 1 and "for the 3 epoch(s) to go on cpu" in out
    assert out.index("projected: ") < out.index("\n1/3 ")  # before the first epoch's line


def test_a_phantom_trained_model_on_other_data_warns_in_one_line(trained_checkpoint, phantom_dir, tmp_path, capsys):
    data = tmp_path / "data"
    source = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    shutil.copytree(source, data / "CASE_01")  # the same pictures under a non-phantom id
    common = ["--model-path", str(trained_checkpoint), "--no-overlays", "--backend", "torch"]
    common += ["--cache-dir", str(tmp_path / "cache")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = predict.main(
            [*common, "--data-dir", str(data), "--patients", "all", "--output-dir", str(tmp_path / "a")]
        )
    messages = [str(w.message) for w in caught if "phantom data only" in str(w.message)]
    assert messages == [f"{trained_checkpoint} was trained on phantom data only; its masks for 1 other patient(s) "
                        "(CASE_01) say nothing about real FLAIR: train on your data"]  # fmt: skip
    assert summary["warnings"] == messages  # in summary.json and on the report's first screen too
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["warnings"] == messages
    assert html.escape(messages[0]) in (tmp_path / "a" / "report.html").read_text()
    common.append("--no-report")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict.main(
            [*common, "--data-dir", str(phantom_dir), "--patients", "val", "--output-dir", str(tmp_path / "b")]
        )
    assert not [w for w in caught if "phantom data only" in str(w.message)]  # its own kind of data: no warning


def test_hub_pipeline_warns_on_a_phantom_trained_model_as_predict_does(trained_checkpoint, tmp_path):
    def phantom_warnings(path) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.hub.load(str(ROOT), "segmentation_pipeline", source="local", trust_repo=True, weights_path=str(path))
        return [str(w.message) for w in caught if "phantom data only" in str(w.message)]

    assert phantom_warnings(trained_checkpoint) == [
        f"{trained_checkpoint} was trained on phantom data only; its masks for any volume other than a phantom "
        "say nothing about real FLAIR: train on your data"
    ]  # its volumes carry no patient ids: any of them may be real
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["split"]["train"] = [f"CASE_{n:02d}" for n in range(len(checkpoint["split"]["train"]))]
    torch.save(checkpoint, tmp_path / "real.pt")
    torch.save(checkpoint["model"], tmp_path / "bare.pt")
    assert phantom_warnings(tmp_path / "real.pt") == phantom_warnings(tmp_path / "bare.pt") == []
