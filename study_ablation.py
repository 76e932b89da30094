"""`python bench.py ablation`: train and score each candidate recipe on phantom data over
several seeds and write the comparison table (docs/ablation.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import train
from dataset import discover_patients, make_synthetic_dataset, read_mask
from results_page import _local, run_timed


@dataclass(frozen=True)
class Candidate:
    """One training recipe: flags added to the shared budget for train.py and predict.py."""

    name: str
    train_flags: tuple[str, ...] = ()
    predict_flags: tuple[str, ...] = ()
    note: str = ""
    reuse: str | None = None  # predict with this candidate's checkpoints instead of training

    @property
    def folder(self) -> str:
        return (self.reuse or self.name).replace(" ", "_").replace("/", "-")


# Combinations, chosen from the single changes' first two seeds: dice+bce won clearly, flip
# TTA and foreground oversampling (the best sampling scheme of seed 0) looked promising, so
# both are measured on top of dice+bce.
DICE_BCE_FOREGROUND = ("--loss", "dice+bce", "--sampling", "foreground", "--lesion-fraction", "0.333")


# Each candidate changes one thing against train.py's default recipe (the candidate "today");
# the last combine the winners. Flags that train.py does not know are reported as "not wired"
# instead of failing the whole ablation. "flip TTA" predicts with the checkpoints of "today"
# (no training of its own).
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("today", note="pooled area weights + 10 % floor, soft Dice, crop normalisation"),
    Candidate("area floor x10", ("--sampling", "area", "--sampling-floor", "1.0")),
    Candidate("foreground 1/3", ("--sampling", "foreground", "--lesion-fraction", "0.333")),
    Candidate("patient-first", ("--sampling", "patient")),
    Candidate("dice+bce", ("--loss", "dice+bce")),
    Candidate("head normalisation", ("--norm-region", "head")),
    Candidate("context 1", ("--context-slices", "1")),
    Candidate("flip TTA", predict_flags=("--tta",), reuse="today"),
    Candidate("dice+bce + flip TTA", ("--loss", "dice+bce"), ("--tta",), reuse="dice+bce"),
    Candidate("dice+bce + foreground 1/3", DICE_BCE_FOREGROUND),
    Candidate(
        "dice+bce + foreground 1/3 + flip TTA", DICE_BCE_FOREGROUND, ("--tta",), reuse="dice+bce + foreground 1/3"
    ),
)


# The default budget of `bench.py ablation`: 10 epochs of 60 steps of 16 slices at 128 px.
ABLATION_BUDGET = (
    "--image-size 128 --base-filters 16 --lr 1e-3 --batch-size 16 --epochs 10 --steps-per-epoch 60 --val-patients 6"
)


QUICK_BUDGET = (
    "--image-size 32 --base-filters 4 --lr 1e-3 --batch-size 8 --epochs 2 --steps-per-epoch 2 --val-patients 2"
)


@dataclass
class AblationRun:
    candidate: Candidate
    seed: int
    dice_last: float = float("nan")
    dice_best: float = float("nan")
    fp_last: float = float("nan")  # predicted voxels in lesion-free slices, mean per test patient
    fp_best: float = float("nan")
    lesion_voxels: float = float("nan")  # true lesion voxels, mean per test patient
    seconds: float = float("nan")
    missing: list[str] = field(default_factory=list)
    reused: bool = False  # read back from an earlier ablation's results in --work-dir
    finished: float = float("nan")  # time.time() when the run ended (the result file's mtime)


def unknown_flags(flags: tuple[str, ...], known: set[str]) -> list[str]:
    """The option strings in `flags` that are not in `known`."""
    return [flag for flag in flags if flag.startswith("--") and flag not in known]


@functools.cache
def predict_flags() -> set[str]:
    """The flags predict.py defines, read from its --help (bench runs predict.py as a
    command, never imports it: a CLI does not import another CLI)."""
    result = subprocess.run(_local(["python", "predict.py", "--help"]), capture_output=True, text=True, check=True)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def run_predict(arguments: list[str], log: Path) -> dict:
    """Run `python predict.py ARGUMENTS` (its output in `log`) and return the summary.json
    it wrote. Raises ReportError naming the command when it fails."""
    run_timed(_local(["python", "predict.py", *arguments]), Path.cwd(), log)
    output_dir = Path(arguments[arguments.index("--output-dir") + 1])
    return json.loads((output_dir / "summary.json").read_text())


def false_positives_in_lesion_free_slices(test_dir: Path, masks_dir: Path) -> tuple[float, float]:
    """Mean per patient of (predicted voxels in slices whose truth is empty, true lesion
    voxels), over the kept slices of every patient in `test_dir`; predicted masks are
    predict.py's `<masks_dir>/<patient>/<patient>_<k>_mask.tif`."""
    fp, lesion = [], []
    for patient in discover_patients(test_dir):
        fp_patient, lesion_patient = 0, 0
        for item in patient.kept:
            truth = read_mask(item.mask)
            predicted = read_mask(masks_dir / patient.patient_id / item.mask.name)
            lesion_patient += int(truth.sum())
            fp_patient += 0 if truth.any() else int(predicted.sum())
        fp.append(fp_patient)
        lesion.append(lesion_patient)
    return float(np.mean(fp)), float(np.mean(lesion))


def train_candidate(
    flags: tuple[str, ...], seed: int, data_dir: Path, out: Path, work: Path, budget: str, device_flags: list[str]
) -> float:
    """Train into `out/ckpt` with `budget` + `flags`; seconds it took (0 if already trained)."""
    if (out / "ckpt" / "last.pt").is_file() and (out / "ckpt" / "best_model.pt").is_file():
        return 0.0
    start = time.perf_counter()
    train.main(
        ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "ckpt"), "--log-dir", str(out / "tb")]
        + ["--cache-dir", str(work / "cache"), "--seed", str(seed), "--vis-frequency", "0", "--num-workers", "2"]
        + ["--overwrite"]
        + shlex.split(budget)
        + list(flags)
        + device_flags
    )
    return time.perf_counter() - start


def run_candidate(
    candidate: Candidate,
    seed: int,
    data_dir: Path,
    test_dir: Path,
    work: Path,
    budget: str,
    device: str | None,
    reused_from: Candidate | None = None,
    backend: str | None = None,
) -> AblationRun:
    """Train with `budget` + the candidate's flags (or reuse the checkpoints of `reused_from`,
    training them if absent), then predict the unseen test patients with last.pt and
    best_model.pt. Returns the run's test Dice and false positives; a finished run's result
    is kept in `<work>/results/` and read back when the same candidate, seed and budget
    run again with the same --work-dir."""
    run = AblationRun(candidate, seed)
    train_known = set(train.get_args_parser()._option_string_actions)
    run.missing = unknown_flags(candidate.train_flags, train_known) + unknown_flags(
        candidate.predict_flags, predict_flags()
    )
    if run.missing:
        return run
    record = work / "results" / f"{candidate.name.replace(' ', '_').replace('/', '-')}_seed{seed}.json"
    key = {"budget": budget, "train": list(candidate.train_flags), "predict": list(candidate.predict_flags)}
    if backend:
        key["backend"] = backend
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        saved = json.loads(record.read_text())["result"]
        return AblationRun(candidate, seed, **saved, reused=True, finished=record.stat().st_mtime)
    out, tag = work / f"{candidate.folder}_seed{seed}", candidate.name.replace(" ", "_").replace("/", "-")
    device_flags = ["--device", device] if device else []
    trained_by = reused_from or candidate
    train_seconds = train_candidate(trained_by.train_flags, seed, data_dir, out, work, budget, device_flags)
    start = time.perf_counter()
    for which in ("last", "best"):
        checkpoint = out / "ckpt" / ("last.pt" if which == "last" else "best_model.pt")
        pred_dir = out / (f"test_{which}" if reused_from is None else f"test_{which}_{tag}")
        summary = run_predict(
            ["--model-path", str(checkpoint), "--data-dir", str(test_dir), "--patients", "all"]
            + ["--output-dir", str(pred_dir), "--figure-path", str(pred_dir / "dice.png"), "--no-overlays"]
            + ["--cache-dir", str(work / "cache")]
            + list(candidate.predict_flags)
            + device_flags
            + (["--backend", backend] if backend else []),
            pred_dir.with_name(pred_dir.name + ".log"),
        )
        fp, lesion = false_positives_in_lesion_free_slices(test_dir, pred_dir / "masks")
        metrics = summary.get("headline", {}).get("metrics") or summary["metrics"]  # test + unseen when present
        setattr(run, f"dice_{which}", float(metrics["dice"]["mean"]))
        setattr(run, f"fp_{which}", fp)
        run.lesion_voxels = lesion
    # a reusing candidate (flip TTA) costs its predictions only: it trains nothing
    run.seconds = (train_seconds if reused_from is None else 0.0) + time.perf_counter() - start
    result = {k: getattr(run, k) for k in ("dice_last", "dice_best", "fp_last", "fp_best", "lesion_voxels", "seconds")}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "result": result}))
    run.finished = record.stat().st_mtime
    return run


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def ablation_table(runs: list[AblationRun]) -> str:
    """Markdown: one row per candidate, mean ± SD over seeds of the test Dice (last and best
    epoch), false-positive voxels per test patient in lesion-free slices (and as a share of
    the true lesion voxels) and minutes per run (train + both predictions)."""
    header = (
        "| candidate | flags | seeds | test Dice, last epoch | test Dice, best epoch "
        "| FP voxels in lesion-free slices per patient, last (best) | FP / lesion voxels, last | min per run |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for candidate in dict.fromkeys(r.candidate for r in runs):
        mine = [r for r in runs if r.candidate == candidate]
        flags = " ".join(candidate.train_flags + tuple(f"predict {f}" for f in candidate.predict_flags)) or "(none)"
        if mine[0].missing:
            rows.append(f"| {candidate.name} | `{flags}` | - | not wired: {', '.join(mine[0].missing)} | | | | |")
            continue
        seeds = ", ".join(str(r.seed) for r in mine)
        share = [r.fp_last / r.lesion_voxels for r in mine if r.lesion_voxels > 0]
        rows.append(
            f"| {candidate.name} | `{flags}` | {seeds} | {_mean_sd([r.dice_last for r in mine], 3)} "
            f"| {_mean_sd([r.dice_best for r in mine], 3)} | {_mean_sd([r.fp_last for r in mine], 0)} "
            f"({_mean_sd([r.fp_best for r in mine], 0)}) | {_mean_sd(share, 3) if share else '-'} "
            f"| {np.mean([r.seconds for r in mine]) / 60:.1f} |"
        )
    return header + "\n".join(rows) + "\n"


ABLATION_ABOUT = (
    "Train + predict each candidate recipe on the hard phantom over several seeds;\n"
    "write a Markdown table of test Dice (last and best epoch) and false positives."
)


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    names = [c.name for c in CANDIDATES]
    every = ", ".join(repr(name) for name in names)
    parser.add_argument("--candidates", nargs="+", default=None, metavar="NAME", help=f"default: all of {every}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--patients", type=int, default=30, help="hard-phantom training + validation patients")
    parser.add_argument("--test-patients", type=int, default=10, help="unseen hard-phantom test patients")
    parser.add_argument("--phantom-size", type=int, default=256, help="native slice size of the phantom (px)")
    parser.add_argument("--budget", default=ABLATION_BUDGET, help="train.py flags shared by every candidate")
    parser.add_argument(
        "--work-dir", default=None, help="keep data, checkpoints, predictions here (default: a temp dir)"
    )
    parser.add_argument("--output", default="ablation.md", help="Markdown table")
    parser.add_argument(
        "--backend", choices=("torch", "onnxruntime"), default=None, help="predict.py --backend (default: its own)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny phantom and budget: a smoke test, not evidence")


def ablation(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench.py ablation`: every candidate x seed, trained and scored on unseen test patients;
    `argv` is the sub-command's own arguments, quoted in the generated page."""
    names = [c.name for c in CANDIDATES]
    args.candidates = args.candidates or names
    unknown = sorted(set(args.candidates) - set(names))
    if unknown:
        sys.exit(f"error: --candidates {' '.join(unknown)}: unknown; choose from {', '.join(names)}")
    if args.quick:
        args.budget, args.patients, args.test_patients = QUICK_BUDGET, min(args.patients, 6), min(args.test_patients, 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        size, slices = (48, (12, 16)) if args.quick else (args.phantom_size, None)
        data_dir, test_dir = work / "hard_train", work / "hard_test"
        if not data_dir.exists():
            make_synthetic_dataset(data_dir, args.patients, 0, size, slices, difficulty="hard")
        if not test_dir.exists():
            make_synthetic_dataset(test_dir, args.test_patients, 1000, size, slices, difficulty="hard")
        by_name = {c.name: c for c in CANDIDATES}
        runs = [
            run_candidate(
                candidate,
                seed,
                data_dir,
                test_dir,
                work,
                args.budget,
                args.device,
                by_name.get(candidate.reuse),
                backend=args.backend,
            )
            for seed in args.seeds  # seed after seed: an interrupted ablation still covers every candidate
            for candidate in CANDIDATES
            if candidate.name in args.candidates
        ]
    table = ablation_table(runs)
    command = "python bench.py ablation " + " ".join(shlex.quote(a) for a in argv)
    reused = sum(r.reused for r in runs)
    done = [r for r in runs if np.isfinite(r.finished)]
    span = (max(r.finished for r in done) - min(r.finished - r.seconds for r in done)) / 60 if done else 0.0
    total = sum(r.seconds for r in runs if not r.missing and np.isfinite(r.seconds))
    wall = (
        f"runs spanning {span:.1f} min of wall time from the first start to the last finish ({reused} of them "
        "read back from --work-dir, where an earlier invocation of this command left them)"
        if reused
        else f"{(time.perf_counter() - start) / 60:.1f} min wall"
    )
    text = (
        f"Generated by `{command}`: {wall}; {total / 60:.1f} min of training + prediction over all runs"
        + f"; torch {torch.__version__}, device {args.device or 'default'}, {torch.get_num_threads()} threads. "
        f"Hard phantom at {size} px: {args.patients} training + validation patients (seed 0), "
        f"{args.test_patients} unseen test patients (seed 1000), scored with predict.py on the test patients "
        f"only; shared budget `{args.budget}`.\n\n" + table
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return {"runs": runs, "table": table}
