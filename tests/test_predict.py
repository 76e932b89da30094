"""Metrics against independent computations, and predict.py end to end."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import measure

import predict
from dataset import discover_patients
from metrics import dice_score, precision_recall
from postprocessing import largest_connected_component
from summary import summarize

# ------------------------------------------------------------------------------ metrics


def test_dice_precision_recall_hand_made():
    truth = np.zeros((2, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 pixels
    pred = np.zeros_like(truth)
    pred[0, :2, :3] = True  # 6 pixels, 4 overlap
    assert dice_score(pred, truth) == pytest.approx(2 * 4 / 10)
    assert precision_recall(pred, truth) == pytest.approx((4 / 6, 1.0))
    empty = np.zeros_like(truth)
    assert dice_score(empty, empty) == 1.0
    assert dice_score(pred, empty) == 0.0
    assert dice_score(empty, truth) == 0.0
    assert precision_recall(empty, empty) == (1.0, 1.0)
    assert precision_recall(pred, empty) == (0.0, 0.0)
    assert precision_recall(empty, truth) == (0.0, 0.0)


def test_largest_component_matches_skimage():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((6, 20, 20)) > 0.75
        labels = measure.label(mask, connectivity=3)
        sizes = np.bincount(labels.ravel())[1:]
        expected = labels == (np.argmax(sizes) + 1)
        np.testing.assert_array_equal(largest_connected_component(mask), expected)
    empty = np.zeros((3, 5, 5), bool)
    assert not largest_connected_component(empty).any()


def test_summary_counts_undefined_hd95_without_improving_mean():
    rows = [
        {
            "patient": "a",
            "slices": 3,
            "dice": 0.8,
            "precision": 1,
            "recall": 1,
            "hd95": 2.0,
            "gt_pixels": 5,
            "pred_pixels": 5,
        },
        {
            "patient": "b",
            "slices": 3,
            "dice": 0.0,
            "precision": 1,
            "recall": 0,
            "hd95": float("nan"),
            "gt_pixels": 9,
            "pred_pixels": 0,
        },
        {"patient": "c", "slices": 3},  # unlabelled
    ]
    summary = summarize(rows, {})
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(0.4)
    assert summary["metrics"]["hd95"]["mean"] == 2.0
    assert summary["hd95_undefined_patients"] == 1
    assert summary["empty_prediction_patients"] == 1
    assert summary["labelled_patients"] == 2 and summary["patients"] == 3


# --------------------------------------------------------------------------- end to end


def run_predict(checkpoints, data_dir, out, *extra):
    return predict.main(
        [
            "--model-path",
            *map(str, checkpoints),
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(out),
            "--figure-path",
            str(out / "dice.png"),
            "--cache-dir",
            str(out / "cache"),
            *([] if "--backend" in extra else ["--backend", "torch"]),  # no ONNX export per run (test_export has it)
            *extra,
        ]
    )


def read_metrics(out):
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_predict_outputs_and_independent_dice(trained_checkpoint, phantom_dir, tmp_path):
    summary = run_predict([trained_checkpoint], phantom_dir, tmp_path, "--threshold", "0.3")
    split = torch.load(trained_checkpoint, weights_only=True)["split"]
    rows = read_metrics(tmp_path)
    assert [r["patient"] for r in rows] == sorted(split["val"])
    patients = {p.patient_id: p for p in discover_patients(phantom_dir)}
    for row in rows:
        patient = patients[row["patient"]]
        written = sorted((tmp_path / "masks" / patient.patient_id).glob("*_mask.tif"))
        assert len(written) == len(patient.slices)
        preds, truths = [], []
        for item in patient.slices:
            mask = tifffile.imread(tmp_path / "masks" / patient.patient_id / item.mask.name)
            assert mask.shape == (64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            if item in (patient.slices[0], patient.slices[-1]):
                assert not mask.any()
            else:
                preds.append(mask > 0)
                truths.append(tifffile.imread(item.mask) > 0)
        assert float(row["dice"]) == pytest.approx(dice_score(np.stack(preds), np.stack(truths)), abs=1e-9)
        assert int(row["gt_pixels"]) == int(np.stack(truths).sum())
        assert int(row["slices"]) == len(patient.slices) - 2
    assert summary["protocol"]["threshold"] == 0.3 and summary["protocol"]["mode"] == "single"
    assert all(r["role"] == "val" and r["models"] == str(trained_checkpoint) for r in rows)
    assert summary["headline"]["biased"] and "model selection" in summary["headline"]["note"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["metrics"]["dice"]["mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    from skimage.io import imread

    assert imread(tmp_path / "dice.png").ndim == 3
    for png in (tmp_path / "overlays").glob("*.png"):
        assert imread(png).shape[1:] == (640, 3)  # pictures.overlay: 640 px wide, RGB
    # report.html: per patient the slices with the most truth or prediction (at most 5), each
    # thumbnail linking to its full-size overlay, which exists
    page = (tmp_path / "report.html").read_text()
    for row in rows:
        patient = patients[row["patient"]]
        (strip,) = re.findall(rf'data-patient="{row["patient"]}">(.*?)</tbody>', page)
        kept = patient.slices[1:-1]
        area = [
            int(
                (
                    (tifffile.imread(tmp_path / "masks" / patient.patient_id / i.mask.name) > 0)
                    | (tifffile.imread(i.mask) > 0)
                ).sum()
            )
            for i in kept
        ]
        top = sorted(sorted((s for s in range(len(kept)) if area[s]), key=lambda s: -area[s])[:5])
        links = re.findall(r'<a href="([^"]+)"><img src="([^"]+)"', strip)
        assert [Path(a).name for a, _ in links] == [f"{patient.patient_id}_{kept[s].number:03d}.png" for s in top]
        assert all((tmp_path / a).is_file() and (tmp_path / t).is_file() for a, t in links)


def test_unlabelled_patient_gets_masks_without_metrics(trained_checkpoint, phantom_dir, tmp_path):
    data = tmp_path / "data"
    source = discover_patients(phantom_dir)[0]
    shutil.copytree(source.directory, data / source.patient_id)
    for mask in (data / source.patient_id).glob("*_mask.tif"):
        mask.unlink()
    out = tmp_path / "out"
    summary = run_predict([trained_checkpoint], data, out, "--patients", "all", "--save-probabilities", "--no-report")
    assert summary["labelled_patients"] == 0
    assert not (out / "report.html").exists() and not (out / "thumbnails").exists()  # --no-report
    assert len(list((out / "masks" / source.patient_id).glob("*.tif"))) == len(source.slices)
    assert read_metrics(out)[0]["dice"] == ""
    probabilities = np.load(out / "probabilities" / f"{source.patient_id}.npy")
    assert probabilities.shape == (len(source.slices), 64, 64)
    assert probabilities.min() >= 0 and probabilities.max() <= 1


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_marker",))


@pytest.mark.parametrize("kind", ["missing", "foreign", "malicious"])
def test_bad_checkpoints_give_clear_errors(kind, phantom_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "malicious":
        torch.save({"model": RunsCode()}, path)
    with pytest.raises(SystemExit) as exit_info:
        run_predict([path], phantom_dir, tmp_path / "out")
    message = str(exit_info.value.code)
    assert str(path) in message
    assert {"missing": "not found", "foreign": "not a training checkpoint", "malicious": "refused"}[kind] in message
    assert not Path("pwned_marker").exists()


def test_missing_split_patients_are_listed(trained_checkpoint, phantom_dir, tmp_path):
    data = tmp_path / "data"
    kept = discover_patients(phantom_dir)[0]
    shutil.copytree(kept.directory, data / kept.patient_id)
    with pytest.raises(SystemExit) as exit_info:
        run_predict([trained_checkpoint], data, tmp_path / "out")
    split = torch.load(trained_checkpoint, weights_only=True)["split"]
    missing = [p for p in split["val"] if p != kept.patient_id]
    assert all(p in str(exit_info.value.code) for p in missing)
