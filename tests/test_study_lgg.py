"""bench.py lgg on a phantom standing in for kaggle_3m: the page's test figures against the
masks predict.py wrote, the figures and their attribution, and the locked-split guard."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_train_args

import bench
import study_lgg
import train
from metrics import dice_score


@pytest.fixture(scope="module")
def run_with_test_patients(phantom_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("lgg_run")
    train.main(tiny_train_args(phantom_dir, work, "--epochs", "2", "--steps-per-epoch", "2", "--test-patients", "2"))
    return work


def volume(folder, pattern: str) -> np.ndarray:
    files = sorted(folder.glob(pattern), key=lambda f: int(f.stem.split("_")[-2]))
    return np.stack([tifffile.imread(f) > 0 for f in files])


def test_the_page_scores_the_locked_test_patients(run_with_test_patients, phantom_dir, tmp_path, monkeypatch):
    model = run_with_test_patients / "ckpt" / "best_model.pt"
    test_ids = torch.load(model, weights_only=True)["split"]["test"]
    locked = tmp_path / "locked.txt"
    locked.write_text("# stand-in\n" + "\n".join(test_ids) + "\n")
    monkeypatch.setattr(study_lgg, "LOCKED_TEST", locked)
    page_path = tmp_path / "docs" / "results-lgg.md"
    argv = ["lgg", "--model-path", str(model), "--data-dir", str(phantom_dir), "--work-dir", str(tmp_path / "w")]
    result = bench.main([*argv, "--log-dir", str(run_with_test_patients / "tb"), "--output", str(page_path)])
    masks = tmp_path / "w" / "predictions" / "masks"
    dice = [dice_score(volume(masks / i, "*_mask.tif"), volume(phantom_dir / i, "*_mask.tif")) for i in test_ids]
    assert {role: f["patients"] for role, f in result["roles"].items()} == {"test": 2, "val": 3, "train": 3}
    assert result["roles"]["test"]["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    page = page_path.read_text()
    row = [line for line in page.splitlines() if line.startswith("| TEST (locked")][0]
    assert f"| 2 | {np.mean(dice):.3f} | {np.median(dice):.3f} |" in row
    assert sorted(result["epoch_seconds"]) == [1, 2] and "median epoch" in page
    for name in ("lgg_dice_per_patient.png", "lgg_best_test.png", "lgg_worst_test.png", "lgg_learning_curves.png"):
        assert (page_path.parent / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(figures/{name})" in page
    assert page.count(study_lgg.ATTRIBUTION) == 2  # under the best and the worst overlay
    assert {result["best"], result["worst"]} <= set(test_ids)


def test_a_model_not_tested_on_the_locked_list_is_refused(run_with_test_patients, phantom_dir, tmp_path, monkeypatch):
    model = run_with_test_patients / "ckpt" / "best_model.pt"
    split = torch.load(model, weights_only=True)["split"]
    locked = tmp_path / "locked.txt"
    locked.write_text("\n".join([split["val"][0], *split["test"][1:]]) + "\n")
    monkeypatch.setattr(study_lgg, "LOCKED_TEST", locked)
    argv = ["lgg", "--model-path", str(model), "--data-dir", str(phantom_dir), "--work-dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="its test split is not the 2 patients of"):
        bench.main([*argv, "--output", str(tmp_path / "page.md")])
    assert not (tmp_path / "page.md").exists()
