"""`python bench.py lgg`: the real-data page. One `predict.py` run on every patient of a
`kaggle_3m` folder with one model, then docs/results-lgg.md: the figures per role (the
locked TEST patients first), the patients whose pre- or post-contrast channel copies FLAIR
apart from the others, the training budget and wall time, the learning curves, the
per-patient chart and the best and worst test patients' overlays (with the data set's
attribution).

    python bench.py lgg --model-path weights/lgg_unet.pt --data-dir kaggle_3m --log-dir tb_logs \\
        --output docs/results-lgg.md

The command refuses a model whose test split is not `lgg/locked_test.txt`, so its headline is
always on the locked test set. Run it once per published model: each run scores the 22.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

from checkpoint import CheckpointError, load_checkpoint
from dataset import CHANNELS, check_patient, discover_inputs
from patients import DataError
from pictures import plot_learning_curves, png_bytes
from results_page import ROOT, ReportError, _local, machine_facts, print_page, run_timed
from splits import read_patient_list
from utils import atomic_write_bytes, format_duration

LOCKED_TEST = ROOT / "lgg" / "locked_test.txt"
LGG_ABOUT = "the real-data page: predict.py on every patient of kaggle_3m, figures per role, docs/results-lgg.md"
RECIPES_NOTE = (
    "After this model was trained, its recipe was compared with others on the 88 development patients, never "
    "on these: loss, learning rate, width and context slices in [recipes-lgg.md](recipes-lgg.md) "
    "(`python bench.py recipes`). "
    "No cross-validation over the 88 has been run: five runs of the 20-epoch recipe, about 27 minutes each on "
    "the 2-core machine of [training.md](training.md#on-a-cpu), did not fit the CPU time beside the comparison."
)
ATTRIBUTION = (
    "Images: the LGG segmentation data set (Buda et al. 2019; Mazurowski et al. 2017), from the "
    "TCGA-LGG collection of The Cancer Imaging Archive; used under its terms, for research."
)
ROLE_NAMES = {"test": "TEST (locked, never used for a choice)", "val": "VALIDATION (chose the checkpoint)",
              "train": "TRAINING"}  # fmt: skip


def add_lgg_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="the model to score (its test split: the locked 22)")
    parser.add_argument("--log-dir", default=None, help="the run's --log-dir: its TensorBoard times give the wall time")
    parser.add_argument("--work-dir", default="lgg_runs", help="where predict.py writes")
    parser.add_argument("--output", default="docs/results-lgg.md", help="the page; figures go to figures/ beside it")


def check_locked_split(saved: dict, path: str) -> None:
    """Refuse a model whose test split is not the locked list, or that trained or validated
    on any locked patient (ReportError naming them)."""
    locked = set(read_patient_list(LOCKED_TEST))
    split = saved.get("split", {})
    if set(split.get("test", [])) != locked:
        raise ReportError(f"{path}: its test split is not the {len(locked)} patients of {LOCKED_TEST}")
    leaked = sorted(locked & set(split.get("train", []) + split.get("val", [])))
    if leaked:
        raise ReportError(f"{path}: trained or validated on locked test patients: {', '.join(leaked)}")


def epoch_seconds(log_dir: Path | None, log_run: str) -> dict[int, float] | None:
    """Epoch -> its wall seconds on the training thread, from the run's TensorBoard scalars
    `time/epoch_s` (the steps) and `time/outside_step_s` (the rest); None without the log.
    Start-up and preprocessing are not in it."""
    if log_dir is None or not (log_dir / log_run).is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / log_run), size_guidance={"scalars": 0})
    events.Reload()
    per_epoch: dict[int, float] = {}
    for tag in ("time/epoch_s", "time/outside_step_s"):
        for event in events.Scalars(tag):
            per_epoch[event.step] = per_epoch.get(event.step, 0.0) + event.value
    return per_epoch


def wall_time_text(per_epoch: dict[int, float] | None, epochs: int) -> str:
    """The run's time in its epochs, its median and fastest epoch, and what `epochs` take at
    the fastest one's pace (a machine doing nothing else; other work slows epochs down)."""
    if not per_epoch:
        return "wall time not recorded (no --log-dir)"
    times = list(per_epoch.values())
    return (
        f"wall time in its {len(times)} epochs {format_duration(sum(times))} (median epoch {np.median(times):.0f} s, "
        f"fastest {min(times):.0f} s: {format_duration(min(times) * epochs)} for {epochs} epochs at that pace)"
    )


def read_rows(out: Path) -> list[dict]:
    """metrics.csv of a predict.py run, numbers as floats (NaN where empty)."""
    with open(out / "metrics.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    for row in rows:
        for key in ("dice", "hd95", "lesion_f1", "volume_error"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else float("nan")
    return rows


def figures_of(rows: list[dict]) -> dict:
    """Per-patient Dice mean and median, hd95 median, lesion F1 mean, volume error median
    (only the count for no patient)."""
    if not rows:
        return {"patients": 0}
    column = {key: np.array([r[key] for r in rows]) for key in ("dice", "hd95", "lesion_f1", "volume_error")}
    return {
        "patients": len(rows),
        "dice_mean": float(np.nanmean(column["dice"])),
        "dice_median": float(np.nanmedian(column["dice"])),
        "hd95_median": float(np.nanmedian(column["hd95"])),
        "lesion_f1_mean": float(np.nanmean(column["lesion_f1"])),
        "volume_error_median": float(np.nanmedian(column["volume_error"])),
    }


def copied_channel_patients(data_dir: str) -> dict[str, str]:
    """Patient -> which channel copies which ("pre-contrast = FLAIR"), for the patients with a copy."""
    copies = {}
    for patient in discover_inputs(data_dir):
        pairs = check_patient(patient)["copies"]
        if pairs:
            copies[patient.patient_id] = ", ".join(f"{CHANNELS[c]} = {CHANNELS[o]}" for c, o in pairs)
    return copies


def largest_truth_overlay(out: Path, data_dir: str, patient: str) -> Path:
    """The patient's overlay of the slice with the most truth pixels."""
    areas = {}
    for mask in Path(data_dir, patient).glob("*_mask.tif"):
        areas[int(mask.stem.split("_")[-2])] = int((tifffile.imread(mask) > 0).sum())
    slice_number = max(areas, key=areas.get)
    overlays = {int(p.stem.rsplit("_", 1)[1]): p for p in (out / "overlays").glob(f"{patient}_*.png")}
    if slice_number not in overlays:
        raise ReportError(f"predict.py wrote no overlay of {patient}'s slice {slice_number}")
    return overlays[slice_number]


def score(args: argparse.Namespace) -> dict:
    """Run predict.py on every patient, then read what the page needs."""
    saved = load_checkpoint(args.model_path)
    check_locked_split(saved, args.model_path)
    out = Path(args.work_dir) / "predictions"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = ["python", "predict.py", "--model-path", args.model_path, "--data-dir", args.data_dir]
    command += ["--patients", "all", "--output-dir", str(out), "--figure-path", str(out / "dice_distribution.png")]
    seconds, _ = run_timed(_local(command), ROOT, out.parent / "predict.log")
    rows = read_rows(out)
    copies = copied_channel_patients(args.data_dir)
    test = sorted((r for r in rows if r["role"] == "test"), key=lambda r: r["dice"])
    return {
        "saved": saved,
        "out": out,
        "predict_command": shlex.join(command),
        "predict_seconds": seconds,
        "report_bytes": (out / "report.html").stat().st_size if (out / "report.html").is_file() else None,
        "summary": json.loads((out / "summary.json").read_text()),
        "roles": {role: figures_of([r for r in rows if r["role"] == role]) for role in ROLE_NAMES},
        "copies": copies,
        "test_copied": figures_of([r for r in test if r["patient"] in copies]) if copies else None,
        "test_others": figures_of([r for r in test if r["patient"] not in copies]),
        "test_rows": test,
        "worst": test[0]["patient"],
        "best": test[-1]["patient"],
        "epoch_seconds": epoch_seconds(Path(args.log_dir) if args.log_dir else None, saved.get("log_run", "")),
    }


def write_figures(result: dict, args: argparse.Namespace, folder: Path) -> dict[str, str]:
    """Copy the chart and the best and worst test overlays, draw the learning curves; their
    file names relative to the page."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"chart": "lgg_dice_per_patient.png", "best": "lgg_best_test.png", "worst": "lgg_worst_test.png"}
    shutil.copyfile(result["out"] / "dice_distribution.png", folder / names["chart"])
    for which in ("best", "worst"):
        shutil.copyfile(largest_truth_overlay(result["out"], args.data_dir, result[which]), folder / names[which])
    history = result["saved"].get("history", [])
    if history:
        names["curves"] = "lgg_learning_curves.png"
        curves = plot_learning_curves(history, f"{Path(args.model_path).name}: validation on 10 of the 88")
        atomic_write_bytes(png_bytes(curves), folder / names["curves"])
    return {key: f"figures/{name}" for key, name in names.items()}


def figures_row(label: str, f: dict) -> str:
    return (
        f"| {label} | {f['patients']} | {f['dice_mean']:.3f} | {f['dice_median']:.3f} | {f['hd95_median']:.2f} | "
        f"{f['lesion_f1_mean']:.3f} | {f['volume_error_median']:+.3f} |"
    )


def lgg_page(result: dict, figures: dict[str, str], command: str) -> str:
    """The Markdown of the page."""
    facts, saved = machine_facts(), result["saved"]
    config, split = saved["args"], saved["split"]
    post = saved.get("postprocessing", {"method": "lcc"})
    budget = (
        f"{config['epochs']} epochs x {config.get('steps_per_epoch') or 'one pass'} steps of {config['batch_size']} "
        f"slices, {config['image_size']} x {config['image_size']} px, {config['base_filters']} filters, "
        f"loss {config['loss']}, lr {config['lr']}, seed {config['seed']}"
    )
    header = "| patients | n | Dice mean | Dice median | hd95 median (px) | lesion F1 mean | volume error median |"
    lines = [
        f"<!-- generated by `{command}` -->",
        "# Results on the real LGG data",
        "",
        f"`{command}` on {facts['date']}, {facts['cpu']} ({facts['usable_cores']} cores), commit {facts['commit']}.",
        f"Model: `{Path(result['saved_path']).as_posix()}`, best epoch of {config['epochs']} by validation Dice "
        f"(epoch {saved['epoch']}); post-processing `{post.get('method')}`, chosen on its validation patients.",
        "",
        f"Training: {budget}; {len(split['train'])} training and {len(split['val'])} validation patients "
        f"(all among the 88 outside the locked list), {config.get('world_size', 1)} process on "
        f"{'a GPU' if str(config.get('device') or '').startswith('cuda') else 'the CPU'}; "
        f"{wall_time_text(result['epoch_seconds'], config['epochs'])}.",
        "",
        f"Scored by `{result['predict_command']}` on all {sum(r['patients'] for r in result['roles'].values())} "
        f"patients in {format_duration(result['predict_seconds'])} (report.html "
        f"{(result['report_bytes'] or 0) / 1e6:.1f} MB). Per-patient figures on the native grid; "
        "hd95 in pixels (the set carries no voxel spacing); volume error = (predicted - true) / true.",
        "",
        header,
        "|---|---|---|---|---|---|---|",
        *[figures_row(ROLE_NAMES[role], f) for role, f in result["roles"].items() if f["patients"]],
        "",
        "Validation and training figures are biased (those patients chose the checkpoint or trained it); "
        "the TEST row is the model's figure.",
        "",
        "## Patients with a copied channel",
        "",
        f"The set fills a missing sequence with FLAIR: {len(result['copies'])} patients have a copied channel. "
        "On the locked test patients:",
        "",
        header,
        "|---|---|---|---|---|---|---|",
    ]
    if result["test_copied"] and result["test_copied"]["patients"]:
        lines.append(figures_row("TEST, a channel copies another", result["test_copied"]))
    lines += [figures_row("TEST, all three sequences", result["test_others"]), ""]
    lines += ["## Every test patient", "", "| patient | Dice | hd95 (px) | copied channel |", "|---|---|---|---|"]
    for row in result["test_rows"]:
        lines.append(
            f"| {row['patient']} | {row['dice']:.3f} | {row['hd95']:.2f} | {result['copies'].get(row['patient'], '')} |"
        )
    lines += ["", "## Recipe choices and cross-validation", "", RECIPES_NOTE]
    lines += ["", "## Figures", "", f"![Dice per patient]({figures['chart']})", ""]
    if "curves" in figures:
        lines += [f"![Learning curves]({figures['curves']})", ""]
    for which in ("best", "worst"):
        lines += [
            f"![{which} test patient]({figures[which]})",
            "",
            f"*The {which} locked test patient, {result[which]}, its slice with the largest true lesion. Yellow = "
            f"agreement, vermillion = prediction only, sky blue = missed. {ATTRIBUTION}*",
            "",
        ]
    return "\n".join(lines)


def lgg(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench.py lgg`: score, draw, write the page."""
    try:
        result = score(args)
        result["saved_path"] = args.model_path
        output = Path(args.output)
        figures = write_figures(result, args, output.parent / "figures")
    except (ReportError, DataError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    page = lgg_page(result, figures, "python bench.py lgg " + shlex.join(argv))
    print_page(page, output)
    return result
