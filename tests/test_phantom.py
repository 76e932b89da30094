"""The phantom writers: the easy phantom byte-identical to commit dfb29f7's, the hard
phantom's properties, and the synthesize CLI."""

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

import dataset
from dataset import discover_patients, make_synthetic_dataset, read_volume

# sha256 over (relative path, bytes) of every file written by make_synthetic_dataset(root,
# patients=4, seed=5, image_size=48, slices=(4, 9)) in dataset.py at commit dfb29f7, before
# the phantom writers moved to phantom.py: the easy phantom must stay byte-identical.
EASY_DIGEST_AT_DFB29F7 = "47c1b32b7df78f7dfb8efc92f5b7930c406fbade979b8b96d455f2433f624396"


def folder_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_easy_phantom_is_byte_identical_to_before_the_move(tmp_path):
    make_synthetic_dataset(tmp_path, patients=4, seed=5, image_size=48, slices=(4, 9))
    assert folder_digest(tmp_path) == EASY_DIGEST_AT_DFB29F7


@pytest.fixture(scope="module")
def hard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hard") / "kaggle_3m"
    make_synthetic_dataset(root, patients=10, seed=11, image_size=48, difficulty="hard")
    return root


def read_table(root: Path) -> dict[str, dict]:
    with open(root / "data.csv") as handle:
        return {row["patient"]: row for row in csv.DictReader(handle)}


def test_hard_phantom_counts_and_lesions(hard_dir):
    table = read_table(hard_dir)
    patients = discover_patients(hard_dir)
    assert len(patients) == len(table) == 10
    free = 0
    for patient in patients:
        row = table[patient.patient_id]
        images, masks = read_volume(patient)
        assert 12 <= int(row["slices"]) <= 60 and len(patient.slices) == int(row["slices"])
        assert int(row["lesions"]) in (0, 1, 2, 3)
        assert (int(row["lesions"]) == 0) == (not masks.any())  # a lesion patient always has lesion voxels
        free += int(row["lesions"]) == 0
        channels_equal_flair = [np.array_equal(images[..., c], images[..., 1]) for c in (0, 2)]
        assert any(channels_equal_flair) == bool(int(row["missing_sequence"]))
    assert free == round(0.15 * 10)  # 10-15 % lesion-free patients
    shares = [float(r["lesion_share_of_brain"]) for r in table.values() if int(r["lesions"])]
    assert min(shares) < 0.01 < max(shares)  # some lesions under 1 % of the brain, sizes vary
    assert any(int(r["missing_sequence"]) for r in table.values())


def brightest_lesion_like(difficulty: str, root: Path) -> tuple[float, float]:
    """Per data set: the median FLAIR of lesion voxels, and the 99.9th percentile of FLAIR
    in the slices of the same patients that hold no lesion (scalp, cortex, spots)."""
    make_synthetic_dataset(root, patients=4, seed=2, image_size=48, slices=(16, 20), difficulty=difficulty)
    lesion, elsewhere = [], []
    for patient in discover_patients(root):
        images, masks = read_volume(patient)
        flair = images[..., 1].astype(float)
        lesion.append(flair[masks])
        elsewhere.append(flair[~masks.any(axis=(1, 2))].ravel())
    return float(np.median(np.concatenate(lesion))), float(np.percentile(np.concatenate(elsewhere), 99.9))


def test_hard_phantom_has_lesion_like_intensities_in_lesion_free_slices(tmp_path):
    """The easy phantom's lesion-free slices hold nothing as bright as a lesion; the hard
    phantom's do (bright cortex, scalp and spots), as in real FLAIR."""
    lesion, elsewhere = brightest_lesion_like("hard", tmp_path / "hard")
    assert elsewhere > lesion
    lesion, elsewhere = brightest_lesion_like("easy", tmp_path / "easy")
    assert elsewhere < lesion


def test_hard_phantom_coverage_can_start_or_end_inside_the_brain(hard_dir):
    starts_inside = 0
    for patient in discover_patients(hard_dir):
        images, _ = read_volume(patient)  # kept slices: the first and last are dropped
        area = (images.max(axis=-1) > 20).sum(axis=(1, 2))
        starts_inside += max(area[0], area[-1]) > 0.5 * area.max()
    assert starts_inside >= 1


def test_synthesize_cli_difficulty_and_slice_errors(tmp_path, capsys):
    dataset.main(["synthesize", str(tmp_path / "h"), "--patients", "2", "--image-size", "32", "--difficulty", "hard"])
    table = read_table(tmp_path / "h")
    assert all(pid.startswith("TCGA_HD_") and 12 <= int(r["slices"]) <= 60 for pid, r in table.items())
    assert "2 hard phantom patients" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        dataset.main(["synthesize", str(tmp_path / "x"), "--difficulty", "hard", "--max-slices", "2"])
    assert "need 3 <= --min-slices <= --max-slices" in str(error.value)
    with pytest.raises(SystemExit):
        dataset.main(["synthesize", str(tmp_path / "y"), "--difficulty", "medium"])
    with pytest.raises(ValueError, match="difficulty 'medium'"):
        make_synthetic_dataset(tmp_path / "z", patients=1, difficulty="medium")
