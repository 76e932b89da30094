"""Evaluation protocol: patient roles, the pooled cross-validated table, the headline and
its bias warnings, post-processing in native space, failures that lose nothing, and
checkpoints whose preprocessing differs."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from test_predict import run_predict as predict_run

import inference
import predict
from dataset import discover_patients
from metrics import dice_score
from network import UNetModel
from preprocessing import Geometry, preprocessing_config, restore_geometry
from splits import make_split
from summary import summarize

# ------------------------------------------------------------------------------ helpers


def make_checkpoint(path, split, seed, image_size=32, **preprocessing):
    """A training-format checkpoint of a random tiny UNet (no training needed)."""
    torch.manual_seed(seed)  # test code: a distinct, reproducible model per seed
    model = UNetModel(in_channels=3, out_channels=1, base_filters=4)
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": {"in_channels": 3, "out_channels": 1, "base_filters": 4},
            "preprocessing": {**preprocessing_config(image_size), **preprocessing},
            "split": split,
            "format_version": 1,
        },
        path,
    )
    return path


def run_predict(checkpoints, data_dir, out, *extra):
    return predict_run(checkpoints, data_dir, out, "--no-cache", "--no-overlays", "--no-report", *extra)


def read_metrics(out):
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def split_of(train=(), val=(), test=()):
    return {"train": list(train), "val": list(val), "test": list(test), "seed": 0, "folds": None, "fold": None}


class Fake:
    """Stands in for predict.LoadedModel where only the split matters."""

    def __init__(self, split):
        self.split = split


# -------------------------------------------------------------------------------- roles


def test_role_of_a_patient_for_one_model():
    split = split_of(train=["a"], val=["b"], test=["c"])
    assert [predict.role_for(p, split) for p in "abcd"] == ["train", "val", "test", "unseen"]
    assert predict.role_for("a", None) == "unknown"


def test_assignment_in_folds_and_ensembles():
    folds = [Fake(split_of(train=["b"], val=["c"], test=["a"])), Fake(split_of(train=["a"], val=["c"], test=["b"]))]
    assert predict.are_folds(folds)
    assert predict.assign("a", folds, True) == ([0], "test")
    assert predict.assign("b", folds, True) == ([1], "test")
    assert predict.assign("c", folds, True) == ([0, 1], "val")
    assert predict.assign("external", folds, True) == ([0, 1], "unseen")
    ensemble = [Fake(split_of(train=["b"], test=["a"])), Fake(split_of(train=["a"], test=["c"]))]
    assert not predict.are_folds(ensemble + [ensemble[0]])  # overlapping test sets
    other_cohort = Fake(split_of(train=["x"], val=["y"], test=["b"]))  # a run on other patients
    assert not predict.are_folds([folds[0], other_cohort]), "disjoint test sets of unrelated runs are not folds"
    assert predict.assign("a", ensemble, False) == ([0, 1], "train")  # one member trained on it
    assert predict.assign("c", [ensemble[1], Fake(split_of(train=["x"]))], False)[1] == "test"
    assert predict.requested_patients(["test"], folds, True) == ["a", "b"]
    assert predict.requested_patients(["val"], folds, True) == ["c"]
    assert predict.default_selection(folds, ["a", "b", "c", "external"]) == ["test"]
    assert predict.default_selection([Fake(split_of(train=["a"], val=["b"]))], ["a", "b"]) == ["val"]
    assert predict.default_selection([Fake(split_of(train=["a"], val=["b"]))], ["x"]) == ["all"]  # other data
    assert predict.default_selection(folds, ["external", "other"]) == ["all"]  # none of the run's patients
    tested = [Fake(split_of(train=["a"], val=["b"], test=["c"]))]
    assert predict.default_selection(tested, ["a", "b"]) == ["all"]  # its train and val patients, no test one


def rows_with_roles():
    roles = ["train", "val", "test", "test", "unseen"]
    dice = [0.95, 0.9, 0.5, 0.7, 0.3]
    return [
        {"patient": f"p{i}", "slices": 3, "role": r, "dice": d, "precision": d, "recall": d, "hd95": 2.0 * i}
        | {"gt_pixels": 10, "pred_pixels": 10}
        for i, (r, d) in enumerate(zip(roles, dice, strict=True))
    ]


def test_headline_pools_only_test_and_unseen_patients(capsys):
    rows = rows_with_roles()
    summary = summarize(rows, {})
    head = summary["headline"]
    assert head["count"] == 3 and not head["biased"] and head["roles"] == ["test", "unseen"]
    assert head["metrics"]["dice"]["mean"] == pytest.approx(np.mean([0.5, 0.7, 0.3]))
    assert head["metrics"]["dice"]["median"] == pytest.approx(0.5)
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean([0.95, 0.9, 0.5, 0.7, 0.3]))
    by_role = summary["by_role"]
    assert {r: s["count"] for r, s in by_role.items()} == {"train": 1, "val": 1, "test": 2, "unseen": 1}
    assert by_role["test"]["metrics"]["dice"]["mean"] == pytest.approx(0.6)
    assert by_role["test"]["metrics"]["hd95"]["median"] == pytest.approx(5.0)
    predict.print_table(rows, summary)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("headline (test + unseen)") and "0.5000" in last


@pytest.mark.parametrize(("role", "words"), [("val", "model selection"), ("train", "training")])
def test_only_biased_patients_scored_says_so(role, words, capsys):
    rows = [r | {"role": role} for r in rows_with_roles()]
    summary = summarize(rows, {})
    head = summary["headline"]
    assert head["biased"] and words in head["note"] and head["count"] == len(rows)
    predict.print_table(rows, summary)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("headline") and "WARNING" in last and words in last


# ------------------------------------------------------------------ pooled CV table


@pytest.fixture(scope="module")
def fold_checkpoints(phantom_dir, tmp_path_factory):
    """Three random models with the splits of a stratified 3-fold CV on the phantom."""
    folder = tmp_path_factory.mktemp("folds")
    patients = discover_patients(phantom_dir)
    strata = {p.patient_id: any(tifffile.imread(s.mask).any() for s in p.slices) for p in patients}
    ids = sorted(strata)
    return [
        make_checkpoint(folder / f"fold{k}.pt", make_split(ids, 2, seed=5, folds=3, fold=k, strata=strata), seed=k)
        for k in range(3)
    ]


def test_cross_validation_scores_each_patient_with_its_fold_model(fold_checkpoints, phantom_dir, tmp_path):
    summary = run_predict(fold_checkpoints, phantom_dir, tmp_path / "cv")
    rows = read_metrics(tmp_path / "cv")
    splits = [torch.load(p, weights_only=True)["split"] for p in fold_checkpoints]
    assert summary["protocol"]["mode"] == "folds"
    assert sorted(r["patient"] for r in rows) == sorted(p.patient_id for p in discover_patients(phantom_dir))
    differ = 0
    for k, (path, split) in enumerate(zip(fold_checkpoints, splits, strict=True)):
        # the same patients scored by this fold's model alone, as an independent reference
        single = tmp_path / f"single{k}"
        run_predict([path], phantom_dir, single, "--patients", *split["test"])
        other = tmp_path / f"other{k}"
        run_predict([fold_checkpoints[(k + 1) % 3]], phantom_dir, other, "--patients", *split["test"])
        reference = {r["patient"]: r for r in read_metrics(single)}
        wrong_model = {r["patient"]: r for r in read_metrics(other)}
        for row in (r for r in rows if r["patient"] in split["test"]):
            assert row["role"] == "test" and row["models"] == str(path)
            assert row["dice"] == reference[row["patient"]]["dice"]
            differ += row["dice"] != wrong_model[row["patient"]]["dice"]
    assert differ > 0, "the fold models must differ for this test to detect a wrong assignment"
    head = summary["headline"]
    assert head["count"] == len(rows) and not head["biased"]
    assert head["metrics"]["dice"]["mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert json.loads((tmp_path / "cv" / "summary.json").read_text())["headline"] == head


def test_same_model_twice_is_an_ensemble_equal_to_the_single_model(fold_checkpoints, phantom_dir, tmp_path):
    single = run_predict(fold_checkpoints[:1], phantom_dir, tmp_path / "single", "--patients", "all")
    twice = run_predict(fold_checkpoints[:1] * 2, phantom_dir, tmp_path / "twice", "--patients", "all")
    assert twice["protocol"]["mode"] == "ensemble" and single["protocol"]["mode"] == "single"
    assert [r["dice"] for r in read_metrics(tmp_path / "twice")] == [
        r["dice"] for r in read_metrics(tmp_path / "single")
    ]
    assert single["by_role"] == twice["by_role"]


def test_default_is_test_and_roles_follow_the_split(phantom_dir, tmp_path):
    ids = [p.patient_id for p in discover_patients(phantom_dir)]
    split = split_of(train=ids[:3], val=ids[3:5], test=ids[5:7])  # ids[7] is in no list
    checkpoint = make_checkpoint(tmp_path / "model.pt", split, seed=0)
    summary = run_predict([checkpoint], phantom_dir, tmp_path / "default")
    assert [r["patient"] for r in read_metrics(tmp_path / "default")] == ids[5:7]
    assert summary["protocol"]["patients"] == ["test"]
    run_predict([checkpoint], phantom_dir, tmp_path / "all", "--patients", "all")
    roles = {r["patient"]: r["role"] for r in read_metrics(tmp_path / "all")}
    expected = dict(zip(ids, ["train"] * 3 + ["val"] * 2 + ["test"] * 2 + ["unseen"], strict=True))
    assert roles == expected
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["headline"]["count"] == 3 and summary["by_role"]["train"]["count"] == 3


# ----------------------------------------------------------- native-space post-processing


def test_resample_then_threshold_matches_an_independent_resampling():
    """A smooth blob sampled on a coarse 11 px model grid of a 40 x 48 native slice."""
    size, (y0, y1, x0, x1), (top, bottom, left, right) = 11, (4, 36, 2, 46), (6, 6, 0, 0)
    geometry = Geometry((40, 48), (y0, y1, x0, x1), (top, bottom, left, right), size, size / 44, (1, 2, 3))
    centres = [(18, 20), (20, 25), (15, 30)]

    def blob(y, x, cy, cx):  # a soft disc of radius 9 px in native coordinates
        return 1 / (1 + np.exp(-(9 - np.hypot(y - cy, x - cx)) / 1.5))

    model_in_native = (np.arange(size) + 0.5) / geometry.scale - 0.5  # model pixel centres, padded frame
    probs = np.stack(
        [blob(model_in_native[:, None] - top + y0, model_in_native[None] - left + x0, *c) for c in centres]
    ).astype(np.float32)  # (3, 11, 11)
    yy, xx = np.mgrid[0:40, 0:48].astype(float)
    inside = np.zeros((40, 48), bool)
    inside[y0:y1, x0:x1] = True
    # independent bilinear resampling: model-grid coordinates of each native pixel centre
    u, v = (yy - y0 + top + 0.5) * geometry.scale - 0.5, (xx - x0 + left + 0.5) * geometry.scale - 0.5
    reference = np.stack([ndimage.map_coordinates(p, [u, v], order=1, mode="nearest") for p in probs]) * inside

    mask, native_probs = inference.to_native(probs, geometry, 0.5, lcc=False)
    old = restore_geometry((probs >= 0.5).astype(np.uint8), geometry)  # threshold, then nearest
    np.testing.assert_allclose(native_probs, reference, atol=1e-5)
    np.testing.assert_array_equal(mask, reference >= 0.5)  # the mask is the thresholded map
    ideal = np.stack([blob(yy, xx, *c) >= 0.5 for c in centres]) & inside
    assert dice_score(mask, ideal) > dice_score(old, ideal) + 0.05
    assert dice_score(mask, ideal) > 0.95


# ------------------------------------------------------------------------ failures


def test_a_failing_patient_keeps_the_others_and_the_summary(small_phantom, tmp_path):
    patients = discover_patients(small_phantom)
    checkpoint = make_checkpoint(tmp_path / "m.pt", split_of(test=[p.patient_id for p in patients]), seed=1)
    broken = patients[-1].kept[1].image
    broken.write_bytes(b"not a tiff")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        predict_run([checkpoint], small_phantom, out, "--no-cache", "--no-overlays")  # with report.html
    message = str(exit_info.value.code)
    assert "1 patient(s) failed" in message and patients[-1].patient_id in message and broken.name in message
    rows = read_metrics(out)
    assert [r["patient"] for r in rows] == [p.patient_id for p in patients]
    assert all(r["dice"] != "" and r["error"] == "" for r in rows[:-1])
    assert rows[-1]["dice"] == "" and broken.name in rows[-1]["error"]
    page = (out / "report.html").read_text()  # written although the run exits non-zero
    assert f'<tr class="failed" data-patient="{patients[-1].patient_id}">' in page and broken.name in page
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failed_patients"]) == [patients[-1].patient_id]
    assert summary["labelled_patients"] == len(patients) - 1
    for patient in patients[:-1]:
        assert len(list((out / "masks" / patient.patient_id).glob("*_mask.tif"))) == len(patient.slices)


def test_rows_are_on_disk_before_the_run_ends(small_phantom, tmp_path, monkeypatch, capsys):
    patients = discover_patients(small_phantom)
    checkpoint = make_checkpoint(tmp_path / "m.pt", split_of(test=[p.patient_id for p in patients]), seed=1)
    original = predict.process_patient

    def interrupted(patient, *args):
        if patient.patient_id == patients[-1].patient_id:
            raise KeyboardInterrupt  # the user stops the run during the last patient
        return original(patient, *args)

    monkeypatch.setattr(predict, "process_patient", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    for earlier in ("summary.json", "report.html"):  # an earlier run's, which the new table replaces
        (out / earlier).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        run_predict([checkpoint], small_phantom, out)
    assert exit_info.value.code == 130  # one line, no traceback
    n = len(patients)
    assert capsys.readouterr().err.startswith(f"interrupted after {n - 1} of {n} patient(s): their rows are in {out}")
    assert [r["patient"] for r in read_metrics(out)] == [p.patient_id for p in patients[:-1]]
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()


def test_checkpoint_with_other_preprocessing_is_refused(small_phantom, tmp_path):
    ids = [p.patient_id for p in discover_patients(small_phantom)]
    path = make_checkpoint(tmp_path / "m.pt", split_of(test=ids), seed=1, clip_percentiles=[5.0, 99.5])
    with pytest.raises(SystemExit) as exit_info:
        run_predict([path], small_phantom, tmp_path / "out")
    message = str(exit_info.value.code)
    assert str(path) in message and "clip_percentiles" in message and "image_size" not in message


def test_output_dir_that_is_a_file_is_refused_first(small_phantom, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_predict([tmp_path / "missing.pt"], small_phantom, blocker)
    assert "--output-dir" in str(exit_info.value.code)


def test_the_post_processing_line_says_when_no_checkpoint_made_a_choice():
    chosen = SimpleNamespace(postprocessing={"method": "lcc"}, postprocessing_chosen=True)
    unfinished = SimpleNamespace(postprocessing={"method": "lcc"}, postprocessing_chosen=False)
    assert "the checkpoint's choice" in predict.postprocessing_line([chosen], "checkpoint", "single", False)
    line = predict.postprocessing_line([unfinished], "checkpoint", "single", False)
    assert "no choice saved in the checkpoint" in line and "--choose-postprocessing" in line
