"""The .gitignore keeps every run's outputs out of `git status` and never hides committed docs."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [
    "cv/fold0/best_model.pt",  # train.py --fold all, the README's cross-validation recipe
    "cv/predictions/metrics.csv",
    "demo_3m/TCGA_PH_0000_20000125/TCGA_PH_0000_20000125_1.tif",  # train.py --demo
    "demo_checkpoints/best_model.pt",
    "demo_predictions/summary.json",
    "demo_cv_3m/TCGA_PH_0000_20000125/TCGA_PH_0000_20000125_1.tif",
    "checkpoints/last.pt",
    "predictions/masks/x/x_1_mask.tif",
    "cache/0123abcd/images.npy",
    "tb_logs/20260101-000000-checkpoints/events.out.tfevents.1",
    "model.onnx",
    "dice_distribution.png",
    "kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1.tif",
    "lgg-mri-segmentation.zip",
    "nifti_demo/TCGA_PH_0000_20000125.nii.gz",  # docs/deployment.md: TIFF slices to a NIfTI volume
    "nifti_predictions/masks/TCGA_PH_0000_20000125_mask.nii.gz",
]
COMMITTED = ["docs/results.md", "docs/figures/demo_overlay.png", "docs/figures/demo_dice_distribution.png"]


def ignored(path: str, repo: Path) -> bool:
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=repo, check=False)
    assert result.returncode in (0, 1), f"git check-ignore failed for {path}"
    return result.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_outputs_are_ignored_and_docs_are_not(tmp_path):
    # the rules alone, in an empty repository: a data folder linked into this checkout
    # (kaggle_3m -> elsewhere) makes git refuse paths "beyond a symbolic link"
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    assert [path for path in OUTPUTS if not ignored(path, tmp_path)] == []
    kept = [*COMMITTED, "README.md", "train.py", "tests/test_cv.py"]
    assert [path for path in kept if ignored(path, tmp_path)] == []
