"""NIfTI end to end: train on a NIfTI phantom folder, predict it, and check the masks,
hd95 in mm, volumes and lesion counts against computations that do not use the code under
test; NIfTI refusals in training and preprocessing; the NIfTI cache key; spacing."""

import csv
import json
import os
import re

import nibabel
import numpy as np
import pytest
from conftest import tiny_train_args
from scipy.spatial import cKDTree
from skimage.measure import label
from test_lesion_metrics import reference_lesion_metrics, surface_points
from test_nifti import BAD_FOLDERS, nifti

import dataset
import phantom
import predict
import train
from dataset import cache_key, discover_inputs, preprocessing_config
from metrics import metric_units
from summary import units_summary

# The NIfTI phantom's promise (docs/inputs.md): 0.9 x 0.9 mm pixels, 5 mm slices, voxels
# stored as (i, j, k) = (W-1-w, s, h) of the reading convention's (s, h, w).
PIXEL_MM, SLICE_MM = 0.9, 5.0
SPACING = np.array([SLICE_MM, PIXEL_MM, PIXEL_MM])  # (slice, row, col)


def to_reading(voxels: np.ndarray) -> np.ndarray:
    """The phantom's voxel array (W, S, H) -> (S, H, W), by hand."""
    return np.moveaxis(voxels[::-1], 0, 2)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels = label(mask, connectivity=3)  # skimage, 26-connected
    if labels.max() == 0:
        return mask
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def hd95_by_kd_tree(a: np.ndarray, b: np.ndarray) -> float:
    """Nearest surface voxel in mm by a k-d tree over the scaled surface coordinates."""
    sa, sb = surface_points(a) * SPACING, surface_points(b) * SPACING
    return max(np.percentile(cKDTree(sb).query(sa)[0], 95), np.percentile(cKDTree(sa).query(sb)[0], 95))


def test_train_and_predict_on_a_nifti_phantom(tmp_path, monkeypatch, capsys):
    assert (phantom.NIFTI_PIXEL_MM, phantom.NIFTI_SLICE_MM) == (PIXEL_MM, SLICE_MM)
    data, out, cache = tmp_path / "nifti", tmp_path / "out", tmp_path / "cache"
    dataset.main(
        ["synthesize", str(data), "--patients", "5", "--seed", "3", "--image-size", "48", "--format", "nifti"]
        + ["--min-slices", "7", "--max-slices", "9"]
    )
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == []  # NIfTI files only, no TIFF folders
    recipe = [
        "--epochs",
        "8",
        "--steps-per-epoch",
        "8",
        "--lr",
        "1e-2",
        "--loss",
        "dice+bce",
        "--seed",
        "1",
    ]  # a model that finds lesions (validation Dice mean 0.54 at epoch 8 on this CPU)
    train.main(tiny_train_args(data, tmp_path, *recipe))
    entries = sorted(p.name for p in cache.iterdir())
    ids = sorted(p.name[: -len(".nii.gz")] for p in data.glob("*.nii.gz") if "_mask" not in p.name)
    assert [e.rsplit("-", 1)[0] for e in entries] == ids  # every NIfTI patient was cached
    threshold = "0.5"

    def not_from_the_cache(patient, config):
        raise AssertionError(f"{patient.patient_id} preprocessed again instead of read from the cache")

    monkeypatch.setattr(dataset, "_preprocess_patient", not_from_the_cache)
    predict.main(
        ["--model-path", str(tmp_path / "ckpt" / "best_model.pt"), "--data-dir", str(data), "--output-dir", str(out)]
        + ["--cache-dir", str(cache), "--patients", "all", "--backend", "torch", "--no-overlays"]
        + ["--save-probabilities", "--threshold", threshold]
    )
    assert sorted(p.name for p in cache.iterdir()) == entries
    printed = capsys.readouterr().out
    assert any(line.startswith("patient") and line.endswith("les_f1") for line in printed.splitlines())
    with (out / "metrics.csv").open() as handle:
        rows = {row["patient"]: row for row in csv.DictReader(handle)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units"] == {"hd95": "mm", "volume": "mm3"}
    voxel = PIXEL_MM * PIXEL_MM * SLICE_MM
    finite_hd95 = 0
    for pid in ids:
        source = nibabel.load(data / f"{pid}.nii.gz")
        written = nibabel.load(out / "masks" / f"{pid}_mask.nii.gz")
        probabilities = nibabel.load(out / "probabilities" / f"{pid}.nii.gz")
        for image, dtype in ((written, np.uint8), (probabilities, np.float32)):
            assert image.shape == source.shape[:3] and image.get_data_dtype() == dtype
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-6)
        mask = to_reading(np.asarray(written.dataobj)).astype(bool)
        probs = to_reading(np.asarray(probabilities.dataobj))
        assert not mask[0].any() and not mask[-1].any()  # the dropped slices are written empty
        np.testing.assert_array_equal(mask[1:-1], largest_component(probs[1:-1] >= float(threshold)))
        pred = mask[1:-1]
        truth = to_reading(np.asarray(nibabel.load(data / f"{pid}_mask.nii.gz").dataobj))[1:-1] > 0
        row = rows[pid]
        assert row["spacing"] == "0.9x0.9x5"
        total = pred.sum() + truth.sum()
        assert float(row["dice"]) == pytest.approx(2 * (pred & truth).sum() / total if total else 1.0)
        if pred.any() and truth.any():
            assert float(row["hd95"]) == pytest.approx(hd95_by_kd_tree(pred, truth), rel=1e-6)
            finite_hd95 += 1
        assert float(row["gt_volume"]) == pytest.approx(truth.sum() * voxel, rel=1e-6)
        assert float(row["pred_volume"]) == pytest.approx(pred.sum() * voxel, rel=1e-6)
        if truth.any():
            assert float(row["volume_error"]) == pytest.approx(pred.sum() / truth.sum() - 1, rel=1e-6)
        else:
            assert row["volume_error"] == ""
        expected = reference_lesion_metrics(pred, truth, voxel)
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value), (pid, column)
    assert finite_hd95 >= 2  # a real check: predictions that meet lesions


BAD_FOR_TRAINING = ["3-D file without a suffix", "mask on another grid", "too few slices"]


@pytest.mark.parametrize("case", BAD_FOR_TRAINING)
def test_nifti_refusals_hold_for_training(case, tmp_path):
    files, message = BAD_FOLDERS[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, shape in files.items():
        nifti(data / name, shape)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(data, tmp_path / "work", "--epochs", "1"))
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and len(text.splitlines()) == 1
    assert re.search(message, text), text
    assert not (tmp_path / "work").exists()  # refused before any folder was made


def test_nifti_refusal_holds_for_preprocess_and_unlabelled_nifti_is_named(tmp_path):
    files, message = BAD_FOLDERS["mask on another grid"]
    for name, shape in files.items():
        nifti(tmp_path / name, shape)
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["preprocess", "--data-dir", str(tmp_path), "--no-cache"])
    assert str(exit_info.value.code).startswith("error: ") and "P_mask.nii.gz: voxel grid" in exit_info.value.code
    (tmp_path / "P_mask.nii.gz").unlink()
    for k in range(3):  # three more unlabelled NIfTI patients, so that a split would be possible
        nifti(tmp_path / f"Q{k}.nii.gz", (8, 8, 5, 3))
    with pytest.raises(SystemExit, match=r"no _mask.nii.gz files: P, Q0, Q1, Q2"):
        train.main(tiny_train_args(tmp_path, tmp_path / "work", "--epochs", "1", "--val-patients", "1"))


def test_cache_key_covers_every_nifti_file(tmp_path):
    for name in ("P_pre.nii.gz", "P_flair.nii.gz", "P_post.nii.gz", "P_mask.nii.gz"):
        nifti(tmp_path / name, (8, 8, 5))
    config = preprocessing_config(32)
    keys = [cache_key(discover_inputs(tmp_path)[0], config)]
    for name in ("P_post.nii.gz", "P_pre.nii.gz", "P_mask.nii.gz"):  # not the file the slices name
        stat = (tmp_path / name).stat()
        os.utime(tmp_path / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        keys.append(cache_key(discover_inputs(tmp_path)[0], config))
    assert len(set(keys)) == len(keys)
    assert cache_key(discover_inputs(tmp_path)[0], config) == keys[-1]  # stable while nothing changes


def test_spacing_comes_from_the_header_after_reorientation(tmp_path):
    # voxel axes: a runs downwards in 3 mm steps, b posterior in 0.8 mm, c to the right in 1.1 mm
    affine = np.array([[0, 0, 1.1, 5.0], [0, -0.8, 0, 40.0], [-3.0, 0, 0, 60.0], [0, 0, 0, 1]])
    nifti(tmp_path / "P.nii.gz", (6, 8, 7, 3), affine)
    [patient] = discover_inputs(tmp_path)
    assert patient.spacing == pytest.approx((3.0, 0.8, 1.1))  # (slice, row, col)
    image = nibabel.Nifti1Image(np.ones((6, 8, 7, 3), np.uint8), affine * [[1000], [1000], [1000], [1]])
    image.header.set_xyzt_units("micron")
    nibabel.save(image, tmp_path / "P.nii.gz")
    assert discover_inputs(tmp_path)[0].spacing == pytest.approx((3.0, 0.8, 1.1))


def test_tiff_spacing_flag_and_mixed_units(phantom_dir):
    patients = predict.with_spacing(discover_inputs(phantom_dir)[:2], [0.9, 0.8, 5.0])
    assert [p.spacing for p in patients] == [(5.0, 0.9, 0.8)] * 2  # ROW COL SLICE -> (slice, row, col)
    assert predict.spacing_text(patients[0].spacing) == "0.9x0.8x5"
    rows = [
        {"patient": "A", "dice": 1.0, "units": metric_units((5.0, 0.9, 0.8))},
        {"patient": "B", "dice": 1.0, "units": metric_units(None)},
    ]
    units = units_summary(rows)
    assert units["hd95"] == "mixed" and units["by_patient"]["B"] == {"hd95": "voxels", "volume": "voxels"}
    assert units_summary(rows[:1]) == {"hd95": "mm", "volume": "mm3"}


def test_nifti_phantom_reads_back_as_the_tiff_phantom(tmp_path):
    make = dict(patients=2, seed=8, image_size=32, slices=(4, 6))
    dataset.make_synthetic_dataset(tmp_path / "tiff", **make)
    dataset.make_synthetic_dataset(tmp_path / "nifti", file_format="nifti", **make)
    tiffs, niftis = discover_inputs(tmp_path / "tiff"), discover_inputs(tmp_path / "nifti")
    assert [p.patient_id for p in niftis] == [p.patient_id for p in tiffs]
    for tiff, patient in zip(tiffs, niftis):
        stored = nibabel.load(patient.nifti.channels[0])
        assert nibabel.aff2axcodes(stored.affine) == ("R", "S", "P")  # not the reading order: permuted and flipped
        assert stored.header.get_xyzt_units()[0] == "mm"
        assert patient.spacing == (SLICE_MM, PIXEL_MM, PIXEL_MM) and tiff.spacing is None
        for ours, theirs in zip(dataset.read_volume(patient), dataset.read_volume(tiff)):
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="format 'png'"):
        dataset.make_synthetic_dataset(tmp_path / "png", file_format="png")
    with pytest.raises(SystemExit, match="already holds NIfTI files"):
        dataset.main(["synthesize", str(tmp_path / "nifti"), "--format", "nifti"])
