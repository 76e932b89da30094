"""Edge cases found by trying the CLIs as a new user: each gives one clear line, before any
work, instead of a traceback, a silently wrong mask or a patient counted twice."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_hub import hub_load

import inference
import predict
from checkpoint import CheckpointError, require_training_checkpoint
from dataset import discover_patients, select_patients
from patients import DataError
from utils import one_line_warnings

ROOT = Path(__file__).resolve().parent.parent


def test_hub_pipeline_refuses_non_finite_pixels(trained_checkpoint, phantom_dir):
    # A NaN that passed preprocessing would mark every pixel of the volume as lesion.
    segment = hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint), device="cpu")
    patient = discover_patients(phantom_dir)[0]
    volume = np.stack([tifffile.imread(item.image) for item in patient.slices]).astype(np.float32)
    volume[:, :2, :2, :] = np.nan
    with pytest.raises(ValueError, match=rf"{2 * 2 * 3 * len(volume)} non-finite value"):
        segment(volume)


def test_figure_path_below_a_file_is_refused_before_any_work(trained_checkpoint, phantom_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    argv = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-cache"]
    argv += ["--output-dir", str(tmp_path / "out"), "--figure-path", str(blocker / "dice.png")]
    with pytest.raises(SystemExit, match=r"^error: --figure-path .*afile: is a file, not a folder"):
        predict.main(argv)
    assert not (tmp_path / "out" / "metrics.csv").exists(), "refused before any patient was predicted"


@pytest.mark.parametrize("folder", ["masks", "overlays", "thumbnails", "probabilities"])
def test_an_output_subfolder_that_is_a_file_is_refused_before_any_work(
    trained_checkpoint, phantom_dir, tmp_path, folder
):
    out = tmp_path / "out"
    out.mkdir()
    (out / folder).write_text("x")  # would fail every patient's masks or pictures
    argv = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-cache"]
    with pytest.raises(SystemExit, match=rf"^error: --output-dir .*out/{folder}: is a file, not a folder"):
        predict.main([*argv, "--save-probabilities", "--output-dir", str(out)])
    assert not (out / "metrics.csv").exists(), "refused before any patient was predicted"


@pytest.mark.parametrize("name", ["metrics.csv", "summary.json", "report.html"])
def test_an_output_file_that_is_a_folder_is_refused_before_any_work(trained_checkpoint, phantom_dir, tmp_path, name):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    argv = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-cache"]
    with pytest.raises(SystemExit, match=rf"^error: --output-dir .*out: {name} is a folder; remove it"):
        predict.main([*argv, "--output-dir", str(out)])
    assert not (out / "masks").exists(), "refused before any patient was predicted"


def test_ctrl_c_before_any_patient_says_nothing_was_written(
    trained_checkpoint, phantom_dir, tmp_path, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "load_model", interrupted)
    argv = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-cache"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted before any patient was predicted: no output was written\n"


def test_patient_listed_twice_is_refused(phantom_dir):
    patients = discover_patients(phantom_dir)
    first = patients[0].patient_id
    with pytest.raises(DataError, match=f"listed more than once: {first}"):
        select_patients(patients, [first, patients[1].patient_id, first])


@pytest.mark.parametrize("target", ["file", "patients"])
def test_synthesize_refuses_a_file_or_a_folder_with_patients(target, small_phantom, tmp_path):
    if target == "file":
        out = tmp_path / "afile"
        out.write_text("x")
    else:
        out = small_phantom
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    result = subprocess.run(
        [sys.executable, "dataset.py", "synthesize", str(out), "--patients", "1", "--image-size", "32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: synthesize OUT") and len(result.stderr.strip().splitlines()) == 1
    if before is not None:
        assert sorted(p.name for p in out.iterdir()) == before, "no patient added to an existing data set"


def test_cli_warnings_are_one_line(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    one_line_warnings()
    text = warnings.formatwarning(UserWarning("patient P1: rebuilt"), UserWarning, "dataset.py", 10, "code()")
    assert text == "warning: patient P1: rebuilt\n"


def test_folder_given_as_checkpoint_says_so(tmp_path):
    from checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "best_model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file \(it holds best_model\.pt\)"):
        load_checkpoint(tmp_path)


def test_one_patient_is_too_few_to_split():
    from splits import make_split

    with pytest.raises(DataError, match=r"^1 patient\(s\) .*too few to split"):
        make_split(["P1"], val_patients=10)


def test_checkpoint_of_another_format_version_is_refused(trained_checkpoint, tmp_path):
    import torch

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"future\.pt: checkpoint format version 99, this code reads"):
        inference.load_model(path, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"format version 99.*; predict with the code version"):
        inference.load_model(path, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"format version 99.*; resume it with the code version"):
        require_training_checkpoint(checkpoint, path, resume=True)
