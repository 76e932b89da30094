"""`python bench.py postprocessing`: evidence for the post-processing choice on phantoms,
chosen on validation patients and scored on unseen test patients (docs/postprocessing.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train
from dataset import discover_patients, make_synthetic_dataset, read_volume
from inference import load_model
from metrics import label_components
from postprocessing import POSTPROCESSING_CANDIDATES, candidate_dice, postprocessing_name
from postprocessing_choice import score_postprocessing
from results_page import ROOT, git_commit
from utils import atomic_write_bytes, resolve_device

POSTPROCESSING_BUDGET = (
    "--image-size 48 --base-filters 8 --lr 2e-3 --batch-size 16 --epochs 16 --steps-per-epoch 24 "
    "--val-patients 6 --loss dice+bce"
)


POSTPROCESSING_QUICK_BUDGET = (
    "--image-size 32 --base-filters 4 --lr 2e-3 --batch-size 8 --epochs 1 --steps-per-epoch 2 --val-patients 2"
)


PHANTOM_LESIONS = {"hard": "0-3 lesions per patient", "easy": "one lesion per patient"}
REUSED = " (read back from --work-dir, where an earlier run of this command left it)"


def lesion_count(mask: np.ndarray) -> int:
    """3-D connected components of a mask, 26-connected as the post-processing counts them
    (`metrics.label_components`)."""
    return len(label_components(mask)[1]) - 1


def postprocessing_run(difficulty: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Train on the `difficulty` phantom (train.py chooses the post-processing on its
    validation patients at the end), then score every candidate on the test phantom's
    patients, and the candidates applied to each test patient's own truth (a perfect
    segmentation: what the step alone costs). Returns the numbers of one table."""
    size, slices = (48, (12, 16)) if args.quick else (args.phantom_size, None)
    data_dir = work / f"{difficulty}_train_{args.patients}x{size}"
    test_dir = work / f"{difficulty}_test_{args.test_patients}x{size}"
    if not data_dir.exists():
        make_synthetic_dataset(data_dir, args.patients, 0, size, slices, difficulty=difficulty)
    if not test_dir.exists():
        make_synthetic_dataset(test_dir, args.test_patients, 1000, size, slices, difficulty=difficulty)
    out = work / f"{difficulty}_{args.patients}x{size}_seed{seed}"
    device_flags = ["--device", args.device] if args.device else []
    start = time.perf_counter()
    key = {"budget": args.budget, "patients": args.patients, "size": size, "device": args.device}
    record = out / "trained.json"  # a finished run in --work-dir is read back, not trained again
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        train_seconds, reused = json.loads(record.read_text())["seconds"], True
    else:
        train.main(
            ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "ckpt"), "--log-dir", str(out / "tb")]
            + ["--cache-dir", str(work / "cache"), "--seed", str(seed), "--vis-frequency", "0", "--num-workers", "2"]
            + ["--overwrite", *shlex.split(args.budget), *device_flags]
        )
        train_seconds, reused = time.perf_counter() - start, False
        record.write_text(json.dumps({"key": key, "seconds": train_seconds}))
    path = out / "ckpt" / "best_model.pt"
    selection = torch.load(path, map_location="cpu", weights_only=True)["postprocessing_selection"]
    device = resolve_device(args.device)
    patients = discover_patients(test_dir)
    test_start = time.perf_counter()
    test = score_postprocessing(load_model(path, device), patients, device, work / "cache")
    truths = {p.patient_id: read_volume(p)[1] for p in patients}
    perfect = {pid: candidate_dice(truth.astype(np.float32), truth) for pid, truth in truths.items()}
    return {
        "difficulty": difficulty,
        "seed": seed,
        "selection": selection,
        "test": test,
        "perfect": perfect,
        "lesions": {pid: lesion_count(truth) for pid, truth in truths.items()},
        "train_seconds": train_seconds,
        "reused": reused,
        "test_seconds": time.perf_counter() - test_start,
    }


def _stats(scores: dict[str, dict[str, float]], name: str) -> tuple[float, float]:
    values = [patient[name] for patient in scores.values()]
    return float(np.mean(values)), float(np.median(values))


def postprocessing_table(result: dict) -> str:
    """Markdown for one run: per candidate, the validation Dice that chose (mean / median),
    the test Dice (mean / median), and the test Dice of a perfect segmentation after it."""
    chosen = result["selection"]["chosen"]
    val = {row["candidate"]: (row["mean"], row["median"]) for row in result["selection"]["table"]}
    lines = [
        "| candidate | validation Dice, mean / median (chose) | test Dice, mean / median "
        "| test Dice of a perfect segmentation after it, mean |",
        "|---|---|---|---|",
    ]
    for candidate in POSTPROCESSING_CANDIDATES:
        name = postprocessing_name(candidate)
        test, perfect = _stats(result["test"], name), _stats(result["perfect"], name)
        label = f"**{name}** (chosen)" if name == chosen else name
        lines.append(
            f"| {label} | {val[name][0]:.3f} / {val[name][1]:.3f} | {test[0]:.3f} / {test[1]:.3f} | {perfect[0]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def postprocessing_page(results: list[dict], args: argparse.Namespace, command: str, seconds: float) -> str:
    """The generated docs page: the command, what was measured on which patients, one table per run."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"<!-- generated by `{command}`: do not edit by hand, rerun the command -->",
        "# Post-processing: chosen on validation patients, scored on test patients",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
        f"`{git_commit()}`: {seconds / 60:.1f} min wall time, torch {torch.__version__}, device "
        f"{args.device or 'default'}, {torch.get_num_threads()} threads, load average {load:.1f} at the end.",
        "",
        f"For each phantom, {args.patients} training + validation patients (phantom seed 0) train a model "
        f"with `train.py {args.budget}`. At the end of the run train.py scores `best_model.pt` on its "
        "**validation** patients with every candidate (one forward pass per patient, native grid, threshold 0.5) "
        "and keeps the best mean Dice, ties going to the largest component (`lcc`), after nnU-Net's "
        "`determine_postprocessing` (Isensee et al. 2021, Nature Methods 18:203-211), which keeps the largest "
        "component only where it improves the validation Dice. The "
        f"{args.test_patients} **test** patients are a phantom of their own (seed 1000): they took no part in "
        "training, in choosing `best_model.pt` or in choosing the post-processing, and are scored here with every "
        "candidate. The last column applies each candidate to the test patients' own truth: the Dice it leaves "
        "to a perfect segmentation.",
        "",
        "Candidates: `none` keeps every component, `lcc` the largest only (the reference implementation's), "
        "`min_share s` removes the components smaller than s of the largest (26-connected, 3-D, on the native grid).",
        "",
    ]
    for result in results:
        lesions = list(result["lesions"].values())
        several = sum(1 for n in lesions if n >= 2)
        val_count = len(result["selection"]["patients"])
        lines += [
            f"## {result['difficulty']} phantom ({PHANTOM_LESIONS[result['difficulty']]}), training seed "
            f"{result['seed']}",
            "",
            f"Chosen on {val_count} validation patients: **{result['selection']['chosen']}**. Test patients: "
            f"{len(lesions)} (with two or more separate lesions in their truth: {several}; lesion-free: "
            f"{sum(1 for n in lesions if n == 0)}); {result['train_seconds'] / 60:.1f} min for training and the "
            f"choice{REUSED if result['reused'] else ''}, {result['test_seconds'] / 60:.1f} min for the test scores.",
            "",
            postprocessing_table(result),
        ]
    return "\n".join(lines)


POSTPROCESSING_ABOUT = (
    "Evidence for the post-processing choice: train on the hard (several lesions) and the easy (one lesion)\n"
    "phantom, let train.py choose on validation patients, score every candidate on unseen test patients;\n"
    "writes a Markdown page (docs/postprocessing.md)."
)


def add_postprocessing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--phantoms", nargs="+", choices=tuple(PHANTOM_LESIONS), default=["hard", "easy"], help="phantoms to train on"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    parser.add_argument("--patients", type=int, default=30, help="training + validation patients per phantom")
    parser.add_argument("--test-patients", type=int, default=16, help="unseen test patients per phantom")
    parser.add_argument("--phantom-size", type=int, default=96, help="native slice size of the phantoms (px)")
    parser.add_argument("--budget", default=POSTPROCESSING_BUDGET, help="train.py flags of every run")
    parser.add_argument("--work-dir", default=None, help="keep data and checkpoints here (default: a temp dir)")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown page; default docs/postprocessing.md (./postprocessing.md with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny phantoms and budget: a smoke test, not evidence")


def postprocessing(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """`bench.py postprocessing`: every phantom x seed; writes the page, returns the runs."""
    if args.quick:
        args.budget, args.patients, args.test_patients = (
            POSTPROCESSING_QUICK_BUDGET,
            min(args.patients, 5),
            min(args.test_patients, 2),
        )
    args.output = args.output or ("postprocessing.md" if args.quick else str(ROOT / "docs" / "postprocessing.md"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        results = [postprocessing_run(d, seed, args, work) for d in args.phantoms for seed in args.seeds]
    command = "python bench.py postprocessing " + " ".join(shlex.quote(a) for a in argv)
    text = postprocessing_page(results, args, command.strip(), time.perf_counter() - start)
    atomic_write_bytes(text.encode(), Path(args.output))
    print(text)
    return results
