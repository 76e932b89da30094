"""bench.py ablation: false-positive counting, the generated table, and a smoke run."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import tifffile

import bench
import predict
import study_ablation
from dataset import discover_patients, read_mask
from study_ablation import AblationRun, Candidate, ablation_table, false_positives_in_lesion_free_slices


def test_false_positives_count_only_slices_without_lesion(small_phantom, tmp_path):
    masks_dir = tmp_path / "masks"
    expected_fp, expected_lesion = [], []
    for patient in discover_patients(small_phantom):
        (masks_dir / patient.patient_id).mkdir(parents=True)
        fp = 0
        for item in patient.kept:
            truth = read_mask(item.mask)
            predicted = truth.copy()
            predicted[:2, :3] = True  # 6 extra pixels in every slice (the corner is background)
            fp += 0 if truth.any() else int(predicted.sum())
            tifffile.imwrite(masks_dir / patient.patient_id / item.mask.name, predicted.astype(np.uint8) * 255)
        expected_fp.append(fp)
        expected_lesion.append(sum(int(read_mask(i.mask).sum()) for i in patient.kept))
    assert min(expected_fp) < max(expected_fp) or expected_fp[0] > 0
    fp, lesion = false_positives_in_lesion_free_slices(small_phantom, masks_dir)
    assert fp == np.mean(expected_fp) and lesion == np.mean(expected_lesion)


def test_table_averages_seeds_and_marks_unwired_candidates():
    today, wired, unwired = Candidate("today"), Candidate("tta", predict_flags=("--tta",)), Candidate("x", ("--new",))
    runs = [
        AblationRun(today, 0, 0.5, 0.7, 100, 50, 1000, 60),
        AblationRun(today, 1, 0.7, 0.9, 300, 150, 1000, 120),
        AblationRun(wired, 0, 0.6, 0.6, 10, 10, 1000, 30),
        AblationRun(unwired, 0, missing=["--new"]),
    ]
    lines = ablation_table(runs).splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| today | `(none)` | 0, 1 | 0.600 ± 0.141 | 0.800 ± 0.141 | 200 ± 141 (100 ± 71)")
    assert "| 0.200 ± 0.141 | 1.5 |" in lines[2]
    assert lines[3].startswith("| tta | `predict --tta` | 0 | 0.600 | 0.600 | 10 (10) | 0.010 | 0.5 |")
    assert "not wired: --new" in lines[4]


def predict_in_this_process(command: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    """results_page.run_timed for the ablation's `python predict.py ...` without the subprocess
    (3 s of imports each): the same arguments, run by predict.main in this process."""
    assert Path(command[1]).name == "predict.py", command
    start = time.perf_counter()
    predict.main(command[2:])
    return time.perf_counter() - start, ""


def test_ablation_smoke_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study_ablation, "run_timed", predict_in_this_process)
    unwired = Candidate("x", ("--not-a-flag",))
    monkeypatch.setattr(study_ablation, "CANDIDATES", (*study_ablation.CANDIDATES, unwired))
    output = tmp_path / "ablation.md"
    args = ["ablation", "--quick", "--seeds", "0", "--patients", "4", "--test-patients", "1", "--backend", "torch"]
    args += ["--candidates", "today", "flip TTA", "x", "--work-dir", str(tmp_path / "w"), "--output", str(output)]
    bench.main(args)
    text = output.read_text()
    assert "python bench.py ablation --quick" in text and "| today | `(none)` | 0 |" in text
    assert "| flip TTA | `predict --tta` | 0 |" in text
    assert "| x | `--not-a-flag` | - | not wired: --not-a-flag" in text
    assert (tmp_path / "w" / "today_seed0" / "test_last" / "metrics.csv").exists()
    summary = json.loads((tmp_path / "w" / "today_seed0" / "test_last" / "summary.json").read_text())
    assert summary["protocol"]["backend"] == "torch"  # --backend reached predict.py
    # flip TTA predicts with the checkpoints of the candidate "today": no training of its own
    assert (tmp_path / "w" / "today_seed0" / "test_last_flip_TTA" / "metrics.csv").exists()
    assert not (tmp_path / "w" / "flip_TTA_seed0").exists()
    first = text.split("\n\n", 1)[1]
    bench.main(args)  # the same --work-dir: finished runs are read back, the table is the same
    again = output.read_text()
    assert "2 of them read back" in again and again.split("\n\n", 1)[1] == first
    shutil.rmtree(tmp_path / "w")
