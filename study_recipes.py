"""`python bench.py recipes`: training recipes compared on the 88 development patients of the
real LGG set (docs/recipes-lgg.md), never on the locked 22.

    python bench.py recipes --runs RUN_DIR ... --data-dir kaggle_3m --output docs/recipes-lgg.md

Each RUN_DIR is a finished `train.py --checkpoint-dir`, all trained with the same seed and
split flags, so they share their test patients: patients of the 88 held out by
`--test-patients N`, used by no run for training, the checkpoint or the post-processing. Each
best_model.pt goes through `python predict.py --patients test` once (the native grid, its own
post-processing); the page gives per recipe the mean and median per-patient Dice on those
patients, apart for the patients whose pre- or post-contrast channel copies FLAIR, the
validation Dice that chose the checkpoint, the training wall time (TensorBoard), and each
recipe's per-patient Dice difference to the first RUN_DIR with a paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from checkpoint import CheckpointError, load_checkpoint
from patients import DataError
from results_page import ReportError, _local, machine_facts, print_page, run_timed
from splits import read_patient_list
from study_lgg import LOCKED_TEST, copied_channel_patients, epoch_seconds, read_rows
from utils import format_duration

RECIPES_ABOUT = "training recipes compared on the 88 development patients' held-out test patients"
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 10_000, 0


def add_recipes_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", nargs="+", required=True, help="train.py --checkpoint-dir of each recipe; the first is the reference"
    )
    parser.add_argument("--work-dir", required=True, help="predict.py's outputs go here (run0, run1, ... in order)")
    parser.add_argument("--output", default=None, help="also write the page here (Markdown)")


def recipe_text(config: dict) -> str:
    """The flags that tell recipes apart, from a checkpoint's saved arguments."""
    steps = config.get("steps_per_epoch") or "one pass"
    context = f", {config['context_slices']} context slice(s)" if config.get("context_slices") else ""
    return (
        f"{config['loss']}, lr {config['lr']:g}, {config['base_filters']} filters, {config['image_size']} px"
        f"{context}, {config['epochs']} x {steps} steps of {config['batch_size']}"
    )


def paired_difference(dice: dict[str, float], reference: dict[str, float]) -> tuple[float, float, float, int]:
    """Mean per-patient Dice difference (dice - reference) over the patients both scored, its
    95 % paired bootstrap interval (resampling patients), and how many patients improved."""
    patients = sorted(set(dice) & set(reference))
    differences = np.array([dice[p] - reference[p] for p in patients])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = differences[rng.integers(0, len(differences), (BOOTSTRAP_SAMPLES, len(differences)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high), int((differences > 0).sum())


def check_no_locked_patient(saved: dict, path: str) -> None:
    """Refuse a run that trained on, validated on or tested on any locked patient (ReportError
    naming them): recipes are compared on the 88 alone."""
    split = saved.get("split", {})
    seen = set(read_patient_list(LOCKED_TEST)) & {p for role in ("train", "val", "test") for p in split.get(role, [])}
    if seen:
        raise ReportError(f"{path}: its split holds locked test patients: {', '.join(sorted(seen))}")


def load_run(run: Path) -> dict:
    """The run's best_model.pt, checked: it exists and its split holds no locked patient
    (ReportError otherwise)."""
    model = run / "best_model.pt"
    if not model.is_file():
        raise ReportError(f"{run}: no best_model.pt (not a finished train.py --checkpoint-dir)")
    saved = load_checkpoint(model)
    check_no_locked_patient(saved, str(model))
    return saved


def check_shared_test_patients(runs: list[Path], saved: list[dict]) -> None:
    """Refuse (ReportError) runs whose test patients differ from the first run's, or a first
    run without test patients: the comparison is paired on the same held-out patients."""
    tests = [sorted(s["split"]["test"]) for s in saved]
    different = [str(run) for run, test in zip(runs, tests) if test != tests[0]]
    if different:
        raise ReportError(f"{', '.join(different)}: other test patients than {runs[0]} (same --seed?)")
    if not tests[0]:
        raise ReportError(f"{runs[0]}: no test patients (train with --test-patients N)")


def score_run(run: Path, saved: dict, data_dir: str, work: Path) -> dict:
    """predict.py on the run's test patients (outputs in `work`); what the page needs of it."""
    model = run / "best_model.pt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    command = ["python", "predict.py", "--model-path", str(model), "--data-dir", data_dir, "--patients", "test"]
    command += ["--output-dir", str(work), "--no-overlays", "--no-report"]
    run_timed(_local(command), Path.cwd(), work / "predict.log")
    config = saved["args"]
    log_dir = Path(config["log_dir"]) if config.get("log_dir") else None
    return {
        "name": str(run),
        "recipe": recipe_text(config),
        "dice": {r["patient"]: r["dice"] for r in read_rows(work) if not np.isnan(r["dice"])},
        "val_dice": float(saved["best_dice"]),
        "epoch": saved["epoch"],
        "epochs": config["epochs"],
        "postprocessing": saved.get("postprocessing", {}).get("method", "lcc"),
        "seconds": sum((epoch_seconds(log_dir, saved.get("log_run", "")) or {}).values()),
        "test": sorted(saved["split"]["test"]),
        "val": sorted(saved["split"]["val"]),
        "train": sorted(saved["split"]["train"]),
        "command": shlex.join(command),
    }


def recipes_page(results: list[dict], copies: dict[str, str], command: str) -> str:
    """The Markdown of the page."""
    facts, reference = machine_facts(), results[0]
    test = reference["test"]
    copied = [p for p in test if p in copies]
    lines = [
        f"<!-- generated by `{command}` -->",
        "# Training recipes compared on the 88 development patients",
        "",
        f"`{command}` on {facts['date']}, {facts['cpu']} ({facts['usable_cores']} cores), commit {facts['commit']}.",
        "",
        f"Every run trained on the same split of the 88 patients outside the locked list: {len(test)} test "
        f"patients held out from all of them (below), {len(reference['val'])} validation patients that chose "
        "each run's checkpoint and post-processing, the rest for training. Each run's `best_model.pt` was "
        "scored once by `python predict.py --patients test` (native grid, its own post-processing). Training "
        "wall time: the epochs as TensorBoard recorded them, with whatever else ran on the machine at the time "
        "(not recorded here), so it is a rough guide, not a measurement. The locked 22 were not used.",
        "",
        f"| recipe | test Dice mean | median | {len(copied)} with a copied channel | "
        f"{len(test) - len(copied)} others | validation Dice | best epoch | post-processing | training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        scores = list(r["dice"].values())
        copied_mean = f"{np.mean([r['dice'][p] for p in copied if p in r['dice']]):.3f}" if copied else "-"
        others = np.mean([d for p, d in r["dice"].items() if p not in copies])
        lines.append(
            f"| {r['recipe']} | {np.mean(scores):.3f} | {np.median(scores):.3f} | {copied_mean} | {others:.3f} | "
            f"{r['val_dice']:.3f} | {r['epoch']} of {r['epochs']} | {r['postprocessing']} | "
            f"{format_duration(r['seconds']) if r['seconds'] else 'not recorded'} |"
        )
    lines += [
        "",
        f"## Against the first recipe ({reference['recipe']})",
        "",
        "Per-patient Dice difference on the same test patients, mean and 95 % paired bootstrap interval "
        f"({BOOTSTRAP_SAMPLES:,} resamples of the patients), and the patients that improved:",
        "",
        "| recipe | mean difference | 95 % interval | patients better |",
        "|---|---|---|---|",
    ]
    for r in results[1:]:
        mean, low, high, better = paired_difference(r["dice"], reference["dice"])
        lines.append(f"| {r['recipe']} | {mean:+.3f} | {low:+.3f} to {high:+.3f} | {better} of {len(r['dice'])} |")
    lines += ["", "## The test patients", ""]
    lines += [", ".join(f"{p}{' (' + copies[p] + ')' if p in copies else ''}" for p in test), ""]
    elsewhere = {role: [p for p in reference[role] if p in copies] for role in ("val", "train")}
    lines += [
        f"Patients whose pre- or post-contrast channel copies FLAIR: {len(copied)} among these test patients, "
        f"{len(elsewhere['val'])} among the validation and {len(elsewhere['train'])} among the training patients.",
        "",
    ]
    lines += ["## Commands", "", *[f"- `{r['command']}`" for r in results], ""]
    return "\n".join(lines)


def recipes(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """`bench.py recipes`: check the runs (finished, no locked patient, the same test patients),
    score each, write the page."""
    try:
        runs = [Path(run) for run in args.runs]
        saved = [load_run(run) for run in runs]
        check_shared_test_patients(runs, saved)  # before minutes of predict.py
        copies = copied_channel_patients(args.data_dir)
        work = Path(args.work_dir)
        results = [score_run(run, s, args.data_dir, work / f"run{i}") for i, (run, s) in enumerate(zip(runs, saved))]
    except (ReportError, DataError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    print_page(recipes_page(results, copies, "python bench.py recipes " + shlex.join(argv)), args.output)
    return results
