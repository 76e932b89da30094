"""`python bench.py report`: the README's results come from commands it runs, not memory."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import browser_missing

import bench
import results_page
import utils
from results_page import ReportError, printed_predict_command, run_timed

TINY_DEMO = "--epochs 2 --steps-per-epoch 2 --image-size 32 --base-filters 4 --batch-size 8 --num-workers 0"


def test_report_runs_the_demo_and_writes_what_it_measured(phantom_dir, tmp_path):
    work, output = tmp_path / "work", tmp_path / "docs" / "results.md"
    shutil.copytree(phantom_dir, work / "demo_3m")  # the demo reuses an existing ./demo_3m
    output.parent.mkdir()
    output.write_text("stale numbers\n")
    missing = browser_missing()  # the screenshot of report.html needs Chromium: required under CI
    assert not (missing and os.environ.get("CI") == "true"), missing
    screenshot = [] if missing is None else ["--no-screenshot"]
    bench.main(
        [
            "report",
            f"--workdir={work}",
            f"--output={output}",
            f"--demo-args={TINY_DEMO}",
            "--predict-args=--no-overlays --backend torch",
            *screenshot,
        ]
    )

    text = output.read_text()
    assert "stale" not in text and text.count(results_page.REPORT_HEADER) == 1  # overwritten, not appended
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=results_page.ROOT, capture_output=True, text=True
    )
    assert f"`{commit.stdout.strip()}" in text
    assert f"torch {torch.__version__}" in text and results_page.machine_facts()["cpu"] in text
    assert f"`python train.py --demo {TINY_DEMO}`" in text
    assert "`python predict.py --model-path" in text and "--no-overlays --backend torch`" in text
    best = torch.load(work / "demo_checkpoints" / "best_model.pt", weights_only=True)
    assert f"| best epoch (selects `best_model.pt`) | {best['epoch']} of 2 |" in text
    assert f"| patients: train / val / test | {len(best['split']['train'])} / 4 /" in text
    summary = json.loads(next(work.rglob("summary.json")).read_text())
    dice = summary["metrics"]["dice"]
    assert f"{dice['mean']:.3f} / {dice['median']:.3f} |" in text
    assert "](figures/demo_dice_distribution.png)" in text and "demo_overlay" not in text  # --no-overlays
    assert (output.parent / "figures" / "demo_dice_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "learning curves: demo_checkpoints/learning_curves.png" in (work / "train.log").read_text()
    )  # --demo names it
    shown = ["demo_learning_curves.png"] + ([] if screenshot else ["demo_report.png"])
    for name in shown:
        assert f"](figures/{name})" in text and (output.parent / "figures" / name).read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(SystemExit, match="holds an earlier demo_checkpoints/; give a fresh folder"):
        bench.main(["report", "--workdir", str(work), "--output", str(output)])


def test_wall_times_on_the_page_are_utils_format_duration():
    facts = {"date": "d", "commit": "c", "cpu": "cpu", "logical_cores": 2, "usable_cores": 2, "gpu": None}
    facts |= {"load_average_1min": None, "python": "3", "torch": "2", "os": "linux"}
    demo = {"split": {"train": 1, "val": 1, "test": 0}, "base_filters": 4, "image_size": 32, "best_epoch": 1}
    demo |= {"epochs": 1, "best": (0.5, 0.5), "last": (0.5, 0.5), "slices_per_s": 10.0, "summary": {}}
    timings = [("python train.py --demo", 185.4), ("python predict.py", 27.0), ("b", 119.7), ("c", 3660.0)]
    text = results_page.render_report(facts, timings, demo, [], None)
    for command, seconds in timings:
        assert f"| `{command}` | {utils.format_duration(seconds)} |" in text
    # the same strings as train.py's progress line: rounded once, zero-padded, no "1 min 60 s"
    assert "| 3 min 05 s |" in text and "| 27 s |" in text and "| 2 min 00 s |" in text and "| 1 h 01 min |" in text


def test_run_timed_names_the_failing_command_and_its_output(tmp_path):
    command = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(ReportError, match=r"(?s)exited with 3 \(full log: .*run.log\):\nboom"):
        run_timed(command, tmp_path, tmp_path / "run.log")
    assert "boom" in (tmp_path / "run.log").read_text()


def test_printed_predict_command_is_found_or_reported():
    stdout = "epoch 1/2 ...\n\nnext: python predict.py --model-path a/best_model.pt --data-dir d\n"
    assert printed_predict_command(stdout) == [
        "python",
        "predict.py",
        "--model-path",
        "a/best_model.pt",
        "--data-dir",
        "d",
    ]
    with pytest.raises(ReportError, match="did not print the predict.py command"):
        printed_predict_command("epoch 1/2 ...\n")


def test_copy_figures_takes_the_middle_overlay_of_the_worst_lesion_patient(tmp_path):
    out = tmp_path / "pred"
    (out / "overlays").mkdir(parents=True)
    (tmp_path / "chart.png").write_bytes(b"chart")
    (out / "metrics.csv").write_text("patient,dice,gt_pixels\nfree,0.0,0\nworst,0.5,10\ngood,0.9,10\nunlabelled,,\n")
    for name in ("worst_002", "worst_010", "worst_011", "good_005", "free_003"):
        (out / "overlays" / f"{name}.png").write_bytes(name.encode())
    args = argparse.Namespace(output_dir="pred", figure_path="chart.png")
    figures = results_page.copy_figures(tmp_path, args, tmp_path / "figures")
    assert [path.read_bytes() for _, path in figures] == [b"chart", b"worst_010"]
    assert "worst" in figures[1][0]
