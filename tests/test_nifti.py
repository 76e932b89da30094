"""NIfTI input: TIFF phantom patients written as NIfTI twins must read, predict and score
exactly like the TIFF originals, and predicted masks must land on the input's voxels."""

import csv
import re
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile

import predict
from dataset import discover_inputs, discover_patients, read_volume
from metrics import metric_names
from nifti import write_nifti_mask
from patients import DataError

# Two voxel layouts, written out by hand (not with the code under test). An array in the
# reading convention is indexed (s: inferior -> superior, h: anterior -> posterior,
# w: patient's right -> left); world space is RAS+ (x to the right, y anterior, z superior).
#   "ras":      voxel (x, y, z) = (W-1-w, H-1-h, s), 0.9 x 0.9 x 3 mm, the common canonical layout
#   "permuted": voxel (a, b, c) = (S-1-s, h, W-1-w), slices first and running downwards, 3 x 0.9 x 0.9 mm


def to_voxels(array: np.ndarray, layout: str) -> np.ndarray:
    """(S, H, W, ...) in the reading convention -> the layout's voxel array."""
    if layout == "ras":
        return np.flip(np.swapaxes(array, 0, 2), axis=(0, 1))
    return array[::-1, :, ::-1]


AFFINES = {
    "ras": np.array([[0.9, 0, 0, -30.0], [0, 0.9, 0, -20.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, 0.9, 5.0], [0, -0.9, 0, 40.0], [-3.0, 0, 0, 60.0], [0, 0, 0, 1]]),
}


def tiff_patient_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All slices of a phantom patient folder, sorted by k: images (S, H, W, 3), masks (S, H, W) bool."""
    images = [p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")]
    images.sort(key=lambda p: int(p.stem.split("_")[-1]))
    masks = [p.with_name(p.stem + "_mask.tif") for p in images]
    return np.stack([tifffile.imread(p) for p in images]), np.stack([tifffile.imread(p) > 0 for p in masks])


def write_nifti_twin(
    tiff_folder: Path, out: Path, layout: str, separate: bool, with_mask: bool = True, skip: tuple = ()
) -> str:
    """Write a TIFF phantom patient as NIfTI (one 4-D file or one file per sequence)."""
    patient_id = tiff_folder.name
    images, masks = tiff_patient_arrays(tiff_folder)
    affine, voxels = AFFINES[layout], to_voxels(images, layout)
    out.mkdir(parents=True, exist_ok=True)
    if separate:
        for c, suffix in enumerate(("_pre", "_flair", "_post")):
            if suffix not in skip:
                nibabel.save(
                    nibabel.Nifti1Image(np.ascontiguousarray(voxels[..., c]), affine),
                    out / f"{patient_id}{suffix}.nii.gz",
                )
    else:
        nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(voxels), affine), out / f"{patient_id}.nii.gz")
    if with_mask:
        mask = to_voxels(masks.astype(np.uint8), layout)
        nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(mask), affine), out / f"{patient_id}_mask.nii.gz")
    return patient_id


@pytest.mark.parametrize(("layout", "separate"), [("ras", False), ("permuted", True)])
def test_nifti_twin_reads_the_tiff_arrays(phantom_dir, tmp_path, layout, separate):
    tiff = discover_patients(phantom_dir)[1]
    write_nifti_twin(tiff.directory, tmp_path, layout, separate)
    [patient] = discover_inputs(tmp_path)
    assert patient.patient_id == tiff.patient_id and len(patient.slices) == len(tiff.slices)
    images, masks = read_volume(patient)
    tiff_images, tiff_masks = read_volume(tiff)
    assert images.dtype == tiff_images.dtype
    np.testing.assert_array_equal(images, tiff_images)
    np.testing.assert_array_equal(masks, tiff_masks)


@pytest.mark.parametrize("layout", ["ras", "permuted"])
def test_written_mask_lies_on_the_input_voxels(phantom_dir, tmp_path, layout):
    tiff = discover_patients(phantom_dir)[1]
    write_nifti_twin(tiff.directory, tmp_path, layout, separate=False, with_mask=False)
    [patient] = discover_inputs(tmp_path)
    _, masks = tiff_patient_arrays(tiff.directory)  # asymmetric in every axis: a real lesion
    write_nifti_mask(patient, masks, tmp_path / "out.nii.gz")
    written = nibabel.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(written.affine, nibabel.load(patient.nifti.channels[0]).affine)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), to_voxels(masks.astype(np.uint8), layout))


def run_predict(checkpoint, data_dir, out, *extra):
    predict.main(
        ["--model-path", str(checkpoint), "--data-dir", str(data_dir), "--output-dir", str(out), "--no-cache"]
        + ["--no-overlays", "--threshold", "0.3", "--figure-path", str(out / "dice.png"), "--backend", "torch", *extra]
    )
    with (out / "metrics.csv").open() as handle:
        return {row["patient"]: row for row in csv.DictReader(handle)}


def test_predict_on_nifti_twins_gives_the_tiff_masks(trained_checkpoint, phantom_dir, tmp_path):
    tiffs = discover_patients(phantom_dir)[1:3]
    nifti_dir = tmp_path / "nifti"
    layouts = {write_nifti_twin(tiffs[0].directory, nifti_dir, "ras", False): "ras"}
    layouts[write_nifti_twin(tiffs[1].directory, nifti_dir, "permuted", True)] = "permuted"
    ids = list(layouts)
    # both twins have 0.9 x 0.9 mm pixels and 3 mm slices in their headers; the TIFFs get them from --spacing
    spacing = ("--spacing", "0.9", "0.9", "3")
    tiff_rows = run_predict(trained_checkpoint, phantom_dir, tmp_path / "tiff", "--patients", *ids, *spacing)
    nifti_rows = run_predict(trained_checkpoint, nifti_dir, tmp_path / "out", "--patients", *ids)
    for tiff in tiffs:
        pid = tiff.patient_id
        tiff_mask = np.stack(
            [tifffile.imread(tmp_path / "tiff" / "masks" / pid / s.mask.name) > 0 for s in tiff.slices]
        )
        assert tiff_mask[1:-1].any() and not tiff_mask.all()  # a real test: neither empty nor full
        written = nibabel.load(tmp_path / "out" / "masks" / f"{pid}_mask.nii.gz")
        np.testing.assert_allclose(written.affine, AFFINES[layouts[pid]], atol=1e-6)  # stored as float32
        np.testing.assert_array_equal(np.asarray(written.dataobj), to_voxels(tiff_mask.astype(np.uint8), layouts[pid]))
        for column in ("slices", "dice", "precision", "recall", "hd95", "gt_pixels", "pred_pixels"):
            assert nifti_rows[pid][column] == tiff_rows[pid][column], column
        for column in (*metric_names(), "spacing"):
            assert nifti_rows[pid][column] == tiff_rows[pid][column], column
        assert nifti_rows[pid]["spacing"] == "0.9x0.9x3"


def test_missing_sequence_is_replaced_by_flair_with_a_warning(phantom_dir, tmp_path):
    tiff = discover_patients(phantom_dir)[1]
    write_nifti_twin(tiff.directory, tmp_path, "ras", separate=True, skip=("_post",))
    with pytest.warns(UserWarning, match=rf"{tiff.patient_id}_post.nii.gz; FLAIR is used in its place"):
        [patient] = discover_inputs(tmp_path)
    images, _ = read_volume(patient)
    tiff_images, _ = read_volume(tiff)
    np.testing.assert_array_equal(images[..., :2], tiff_images[..., :2])
    np.testing.assert_array_equal(images[..., 2], tiff_images[..., 1])


def test_folder_with_tiff_patients_and_nifti_files_reads_both(small_phantom):
    tiffs = discover_patients(small_phantom)
    twin = write_nifti_twin(tiffs[0].directory, small_phantom, "ras", False)
    with pytest.raises(DataError, match=f"patient {twin} is in .* both as a TIFF folder and as NIfTI files"):
        discover_inputs(small_phantom)
    (small_phantom / f"{twin}.nii.gz").rename(small_phantom / "NIFTI_0001.nii.gz")
    (small_phantom / f"{twin}_mask.nii.gz").rename(small_phantom / "NIFTI_0001_mask.nii.gz")
    patients = discover_inputs(small_phantom)
    assert [p.patient_id for p in patients] == sorted([p.patient_id for p in tiffs] + ["NIFTI_0001"])
    assert [p.nifti is not None for p in patients].count(True) == 1


def nifti(path: Path, shape: tuple, affine=None) -> None:
    nibabel.save(nibabel.Nifti1Image(np.ones(shape, np.uint8), np.eye(4) if affine is None else affine), path)


BAD_FOLDERS = {
    "3-D file without a suffix": ({"P.nii.gz": (8, 8, 5)}, r"P.nii.gz: expected a 4-D volume X x Y x Z x 3"),
    "mask on another grid": (
        {"P.nii.gz": (8, 8, 5, 3), "P_mask.nii.gz": (8, 8, 6)},
        r"P_mask.nii.gz: voxel grid \(8, 8, 6\) differs from P.nii.gz's \(8, 8, 5\)",
    ),
    "mask without image": ({"P_mask.nii.gz": (8, 8, 5)}, "patient P: no image volume P.nii.gz or FLAIR file"),
    "pre without FLAIR": ({"P_pre.nii.gz": (8, 8, 5)}, "patient P: no image volume P.nii.gz or FLAIR file"),
    "both forms": ({"P.nii.gz": (8, 8, 5, 3), "P_flair.nii.gz": (8, 8, 5)}, "both a 4-D volume P.nii.gz and sequence"),
    "too few slices": ({"P.nii.gz": (8, 8, 2, 3)}, "2 axial slice"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_nifti_folders_give_one_clear_line(case, tmp_path, trained_checkpoint, capsys):
    files, message = BAD_FOLDERS[case]
    for name, shape in files.items():
        nifti(tmp_path / name, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--model-path", str(trained_checkpoint), "--data-dir", str(tmp_path), "--patients", "all"])
    assert exit_info.value.code.startswith("error: ")
    assert len(exit_info.value.code.splitlines()) == 1
    assert re.search(message, exit_info.value.code), exit_info.value.code


def test_mask_affine_mismatch_is_refused(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    nifti(tmp_path / "P.nii.gz", (8, 8, 5, 3))
    nifti(tmp_path / "P_mask.nii.gz", (8, 8, 5), shifted)
    with pytest.raises(DataError, match="P_mask.nii.gz: affine differs from P.nii.gz's by up to 2 mm"):
        discover_inputs(tmp_path)
