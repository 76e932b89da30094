"""`dataset.py check`: what a data folder holds, read from hand-made patients."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import dataset
from dataset import check_patient, check_summary, copied_channels, discover_inputs


def write_patient(root, name, images, masks):
    folder = root / name
    folder.mkdir(parents=True)
    for k, (image, mask) in enumerate(zip(images, masks), start=1):
        tifffile.imwrite(folder / f"{name}_{k}.tif", image)
        tifffile.imwrite(folder / f"{name}_{k}_mask.tif", (mask * 255).astype(np.uint8))


def volume(slices, rng, copy=None):
    images = rng.integers(1, 200, size=(slices, 16, 16, 3), dtype=np.uint8)
    for target, source in copy or []:
        images[..., target] = images[..., source]
    return images


def test_copied_channels_name_the_copy_and_its_original():
    rng = np.random.default_rng(0)
    assert copied_channels(volume(3, rng)) == []
    assert copied_channels(volume(3, rng, [(0, 1)])) == [(0, 1)]
    assert copied_channels(volume(3, rng, [(2, 1)])) == [(2, 1)]
    assert copied_channels(volume(3, rng, [(0, 1), (2, 1)])) == [(0, 1), (2, 1)]  # not also "post = pre"
    assert copied_channels(volume(3, rng, [(2, 0)])) == [(2, 0)]
    almost = volume(3, rng, [(0, 1)])
    almost[1, 5, 5, 0] += 1  # one pixel differs on one slice: not a copy
    assert copied_channels(almost) == []


def test_check_counts_every_slice_and_notes_what_is_unusual(tmp_path):
    rng = np.random.default_rng(1)
    masks = np.zeros((5, 16, 16), bool)
    masks[0, 2:4, 2:4] = True  # the first slice: dropped in training, counted here
    masks[2, 5:9, 5:9] = True
    write_patient(tmp_path, "P_A", volume(5, rng, [(0, 1)]), masks)
    write_patient(tmp_path, "P_B", volume(4, rng), np.zeros((4, 16, 16), bool))
    rows = [check_patient(p) for p in discover_inputs(tmp_path)]
    a, b = rows
    assert (a["patient"], a["slices"], a["lesion_slices"], a["size"]) == ("P_A", 5, 2, (16, 16))
    assert a["unusual"] == ["pre-contrast = FLAIR"] and a["copies"] == [(0, 1)]
    assert b["slices"] == 4 and b["lesion_slices"] == 0 and b["unusual"] == ["no lesion"]
    images = tifffile.imread(tmp_path / "P_B" / "P_B_1.tif")
    assert b["range"][2][1] >= images[..., 2].max()
    summary = check_summary(rows)
    assert summary.startswith("2 patients, 9 slices (4-5 per patient, 16 x 16), 2 with lesion;")
    assert "pre-contrast = FLAIR in 1 patient(s)" in summary and "2 patient(s) with a note" in summary


def test_check_command_prints_a_row_per_patient_and_refuses_nothing_valid(tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_patient(tmp_path, "P_C", volume(3, rng, [(2, 1)]), np.ones((3, 16, 16), bool))
    dataset.main(["check", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("P_C") and "post-contrast = FLAIR" in out[1]
    assert out[-1].startswith("1 patients, 3 slices")


def test_check_of_a_folder_without_patients_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit, match="error: .*no patients"):
        dataset.main(["check", "--data-dir", str(tmp_path)])
