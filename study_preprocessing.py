"""`python bench.py preprocessing`: cold preprocessing of real patients, ours against the
original implementation's (mateuszbuda/brain-segmentation-pytorch), timed per patient in one
process on the same patients at the same image size.

    python bench.py preprocessing --data-dir kaggle_3m --original-repo PATH [--patients 20] \\
        [--image-size 256] [--output docs/preprocessing-vs-original.md]

PATH is the original repository: a git directory (a bare clone or mirror, or a clone's work
tree, whose committed `--revision` is used) or a plain folder holding its files. Its top-level
`.py` files are exported at run time into a temporary folder and imported from there under
their own names, with this repository's `dataset` and `utils` put back afterwards: the
original's code is never copied into this repository. The patients listed in
`lgg/locked_test.txt` (`--exclude`) are never read.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import skimage
import torch

from dataset import discover_patients, load_volume, source_files
from patients import DataError, Patient
from results_page import git_commit, machine_facts, print_page
from splits import read_patient_list
from utils import UsageError, add_shared_flag

ROOT = Path(__file__).resolve().parent
LOCKED_TEST = ROOT / "lgg" / "locked_test.txt"
ORIGINAL_NAME = "mateuszbuda/brain-segmentation-pytorch"
ORIGINAL_FILES = ("dataset.py", "utils.py")  # what the original's preprocessing is read from
# Modules the original imports at the top for code its preprocessing never runs: when one is
# not installed, a stand-in whose functions raise takes its place while the original loads.
STAND_INS = {"medpy.filter.binary": ("largest_connected_component",)}
PREPROCESSING_ABOUT = (
    f"cold preprocessing per patient, ours against the original implementation's ({ORIGINAL_NAME}, "
    "exported from --original-repo at run time), in one process on the same real patients"
)

OURS_STEPS = (
    "`dataset.load_volume(patient, image_size, cache_dir=None)`: what train.py's cache fill computes "
    "before it writes the entry (and all that `--no-cache` runs):",
    "read the kept slices only (the first and last are never read) with tifffile; each file checked "
    "(one full-size image, 3 channels, integer or float pixels, no NaN); each mask read, any non-zero "
    "pixel is lesion, its size checked against its image; both stacked",
    "crop box: the maximum projection over the slices, pixels above 10 % of each channel's maximum, "
    "8-connected regions (scipy) holding at least 1 % of the bright pixels; in-plane only, every kept "
    "slice stays",
    "crop, convert to float32 (torch), zero-pad to a centred square",
    "resize images bicubic, anti-aliased when shrinking, and masks nearest-exact "
    "(`F.interpolate`, on torch's intra-op threads)",
    "per channel over the whole volume: clip to that channel's 10th and 99th percentile, z-score "
    "(float32); then cast the images to float16 (the cache's type) and record the `Geometry`",
)
ORIGINAL_STEPS = (
    '`dataset.BrainSegmentationDataset(<patient folder>, image_size=S, subset="all", '
    "random_sampling=False)`: their whole per-patient `__init__` (its progress lines swallowed):",
    "`os.walk` of the folder, the `.tif` names sorted by slice number",
    "`skimage.io.imread` of every slice, first and last included, and of every mask (`as_gray=True`); "
    "the first and last dropped; `np.array` stacks",
    "`crop_sample`: pixels below 10 % of the volume's maximum (all channels pooled) set to 0, then "
    "the bounding box of the non-zero voxels in slices, rows and columns (slices outside it are dropped)",
    "`pad_sample`: `np.pad` with zeros to a square (images and masks)",
    "`resize_sample`: `skimage.transform.resize` to S x S, masks order 0, images order 2 "
    "(biquadratic), no anti-aliasing; the images come out float64",
    "`normalize_volume`: the 10th and 99th percentile of the whole volume (channels pooled), "
    "`rescale_intensity` to [0, 1], per-channel z-score (float64)",
    "slice sampling weights from the mask areas, a channel axis on the masks, the (patient, slice) index",
)
NEITHER_STEPS = (
    "our listing of the data folder and parsing of the file names (`dataset.discover_patients`, once for "
    "all patients before the timing; the original lists its patient's folder inside its time: milliseconds)",
    "writing anything: no preprocessing cache is read or written on either side",
    "reading from the disk: each patient's files are read once, untimed, before its two timings, so "
    "both sides find them in the operating system's page cache",
    "the first call of each library: one untimed run of each side on the first patient before any timing",
)


# ------------------------------------------------------------------------------ flags


def add_preprocessing_study_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `bench.py preprocessing` (`--data-dir` comes from the shared flags)."""
    parser.add_argument(
        "--original-repo",
        required=True,
        help=f"the original repository ({ORIGINAL_NAME}): a git directory (bare, a mirror, or a clone) "
        "or a plain folder with its dataset.py and utils.py",
    )
    parser.add_argument("--revision", default="HEAD", help="the commit exported from a git --original-repo")
    parser.add_argument("--patients", type=int, default=20, help="the first N labelled patients by id")
    parser.add_argument("--exclude", default=str(LOCKED_TEST), help="patient ids never read, one per line")
    add_shared_flag(parser, "--image-size", note="both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the result as Markdown here")


# --------------------------------------------------------------------- the original


def git_options(source: Path) -> list[str] | None:
    """The git options that address `source` as a repository: `-C` for a clone's work tree,
    `--git-dir` for a git directory (bare, a mirror, a `.git` folder); None for a plain folder."""
    if (source / ".git").exists():
        return ["-C", str(source)]
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        return ["--git-dir", str(source)]
    return None


def _git(options: list[str], *args: str) -> bytes:
    """Run git; its stdout. Raises UsageError with git's message when it fails."""
    result = subprocess.run(["git", *options, *args], capture_output=True)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise UsageError(f"--original-repo: `git {shlex.join([*options, *args])}` failed: {message}")
    return result.stdout


def export_original(source: Path, revision: str, into: Path) -> str:
    """Write the top-level `.py` files of the original repository `source` into `into`: from
    git at `revision` when `source` is a git repository, else copied from the folder.
    Returns where they came from, for the page. Raises UsageError when `source` is missing,
    git fails, or `dataset.py` or `utils.py` is not among the files."""
    if not source.is_dir():
        raise UsageError(f"--original-repo {source}: not a folder (expected a git directory or the original's files)")
    options = git_options(source)
    if options is None:
        for path in sorted(source.glob("*.py")):
            shutil.copy2(path, into / path.name)
        origin = f"the folder `{source}` (not a git repository: no commit)"
    else:
        commit = _git(options, "rev-parse", "--verify", f"{revision}^{{commit}}").decode().strip()
        for name in _git(options, "ls-tree", "--name-only", commit).decode().splitlines():
            if name.endswith(".py"):
                (into / name).write_bytes(_git(options, "show", f"{commit}:{name}"))
        origin = f"commit {commit[:12]} of `{source}`"
    missing = [name for name in ORIGINAL_FILES if not (into / name).is_file()]
    if missing:
        raise UsageError(
            f"--original-repo {source}: has no {' or '.join(missing)}; expected {ORIGINAL_NAME} (its dataset.py "
            "and utils.py at the top level)"
        )
    return origin


def write_stand_ins(into: Path) -> list[str]:
    """For each module of `STAND_INS` that is not installed, a stand-in package under `into`
    whose functions raise RuntimeError when called. Returns the stand-in functions' full names."""
    written = []
    for module, functions in STAND_INS.items():
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            continue
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            package = into.joinpath(*parts[:depth])
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").touch()
        body = "".join(
            f"def {name}(*args, **kwargs):\n    raise RuntimeError('{module} is a stand-in: not installed')\n\n"
            for name in functions
        )
        into.joinpath(*parts, "__init__.py").write_text(body)
        written += [f"{module}.{name}" for name in functions]
    return written


@contextlib.contextmanager
def isolated_imports(*folders: Path) -> Iterator[None]:
    """While open, imports look in `folders` first and find none of the modules that share a
    name with a `.py` file (or a package) in them; on exit every module loaded from them leaves
    `sys.modules` and the entries that were there before come back (this repository's
    `dataset` and `utils`, for one)."""
    names = {path.stem for folder in folders for path in folder.iterdir() if path.suffix == ".py" or path.is_dir()}
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] in names}
    for name in saved:
        del sys.modules[name]
    sys.path[:0] = [str(folder) for folder in folders]
    try:
        yield
    finally:
        del sys.path[: len(folders)]
        for name in [n for n in sys.modules if n.split(".")[0] in names]:
            del sys.modules[name]
        sys.modules.update(saved)
        importlib.invalidate_caches()


def import_original(folder: Path, stand_ins: Path) -> ModuleType:
    """The original's `dataset` module, imported from `folder` (its `from utils import ...`
    resolves to the `utils.py` beside it), with the stand-ins of `stand_ins` on the path.
    Raises UsageError naming the module it could not import."""
    with isolated_imports(folder, stand_ins):
        try:
            return importlib.import_module("dataset")
        except ImportError as error:
            raise UsageError(
                f"the original's dataset.py (exported to {folder}) cannot be imported: {error}; install the "
                "package it names (a bench-time dependency only, not in requirements.txt)"
            ) from error


# ------------------------------------------------------------------------------ timing


def select_patients(data_dir: str | Path, count: int, exclude: str | Path) -> list[Patient]:
    """The first `count` labelled patients by id of `data_dir` (TIFF folders: the original
    reads nothing else) that `exclude` does not list. Raises DataError when none is left."""
    if count < 1:
        raise UsageError(f"--patients {count}: must be >= 1")
    excluded = set(read_patient_list(exclude))
    patients = [p for p in discover_patients(data_dir) if p.labelled and p.patient_id not in excluded]
    if not patients:
        raise DataError(f"{data_dir}: no labelled patient outside {exclude}")
    return patients[:count]


def read_files(patient: Patient) -> int:
    """Read every source file of a patient once (into the OS page cache); the bytes read."""
    return sum(len(path.read_bytes()) for path in source_files(patient))


def describe(array: np.ndarray) -> str:
    """`float16 (S, 3, 256, 256)`: an array's type and shape with the slice count as S."""
    return f"{array.dtype} ({', '.join(['S', *map(str, array.shape[1:])])})"


def run_ours(patient: Patient, image_size: int) -> dict:
    """Our cold preprocessing of one patient (no cache): wall seconds, slices out, outputs."""
    start = time.perf_counter()
    volume = load_volume(patient, image_size, cache_dir=None)
    seconds = time.perf_counter() - start
    images, masks = volume.images, volume.masks
    return {"seconds": seconds, "slices": len(images), "images": describe(images), "masks": describe(masks)}


def run_original(original: ModuleType, patient: Patient, image_size: int) -> dict:
    """The original's Dataset `__init__` on one patient's folder: wall seconds, slices out, outputs."""
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        data = original.BrainSegmentationDataset(
            str(patient.directory), image_size=image_size, subset="all", random_sampling=False
        )
        seconds = time.perf_counter() - start
    if len(data.volumes) != 1:
        raise DataError(f"{patient.directory}: the original read {len(data.volumes)} patients from it, expected 1")
    images, masks = data.volumes[0]
    return {"seconds": seconds, "slices": len(images), "images": describe(images), "masks": describe(masks)}


def time_patients(original: ModuleType, patients: list[Patient], image_size: int) -> list[dict]:
    """Per patient, both sides timed one after the other (the order alternates), the files
    read once before; one untimed run of each on the first patient first."""
    run_ours(patients[0], image_size)
    run_original(original, patients[0], image_size)
    rows = []
    for index, patient in enumerate(patients):
        read_files(patient)
        if index % 2 == 0:
            ours, theirs = run_ours(patient, image_size), run_original(original, patient, image_size)
        else:
            theirs, ours = run_original(original, patient, image_size), run_ours(patient, image_size)
        rows.append({"patient": patient.patient_id, "slices": len(patient.slices), "ours": ours, "original": theirs})
    return rows


def compare(args: argparse.Namespace) -> dict:
    """Export and import the original, time both sides per patient. Returns the page's numbers.
    Raises UsageError or DataError (the CLI prints them as one line)."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    patients = select_patients(args.data_dir, args.patients, args.exclude)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="original-preprocessing-") as tmp:
        folder, stand_in_dir = Path(tmp) / "original", Path(tmp) / "stand_ins"
        folder.mkdir()
        stand_in_dir.mkdir()
        origin = export_original(Path(args.original_repo), args.revision, folder)
        stand_ins = write_stand_ins(stand_in_dir)
        original = import_original(folder, stand_in_dir)
        imported = {"dataset": original.__file__, "utils": original.crop_sample.__code__.co_filename}
        rows = time_patients(original, patients, args.image_size)
    return {
        "patients": [row["patient"] for row in rows],
        "rows": rows,
        "image_size": args.image_size,
        "origin": origin,
        "imported_from": imported,
        "stand_ins": stand_ins,
        "threads": torch.get_num_threads(),
        "load_start": load_start,
        "data_dir": str(args.data_dir),
        "exclude": str(args.exclude),
        "versions": {"numpy": np.__version__, "scikit-image": skimage.__version__, "torch": torch.__version__},
    }


# -------------------------------------------------------------------------------- page


def summary(rows: list[dict], side: str) -> dict:
    """Mean and median seconds per patient, the total, and the mean slices out, of one side."""
    seconds = np.array([row[side]["seconds"] for row in rows])
    return {
        "mean": float(seconds.mean()),
        "median": float(np.median(seconds)),
        "total": float(seconds.sum()),
        "slices": float(np.mean([row[side]["slices"] for row in rows])),
    }


def _steps(title: str, steps: tuple[str, ...]) -> list[str]:
    """A Markdown paragraph `title` + the first step, then the others as a numbered list."""
    return [f"{title} {steps[0]}", "", *(f"{n}. {step}" for n, step in enumerate(steps[1:], 1)), ""]


def comparison_page(result: dict, command: str) -> str:
    """The Markdown of one comparison (`compare`'s result)."""
    facts, rows = machine_facts(), result["rows"]
    ours, theirs = summary(rows, "ours"), summary(rows, "original")
    ratios = [row["original"]["seconds"] / row["ours"]["seconds"] for row in rows]
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    stand_ins = (
        f" `{'`, `'.join(result['stand_ins'])}` is not installed: their utils.py imports it at the top for "
        "`dsc` (evaluation), which the preprocessing never calls, so a stand-in that raises if called took its place."
        if result["stand_ins"]
        else ""
    )
    size, count = result["image_size"], len(rows)
    lines = [
        f"<!-- generated by `{command}` -->",
        "# Cold preprocessing: ours against the original implementation",
        "",
        f"`{command}` on {facts['date']}, {facts['cpu']} ({facts['usable_cores']} usable cores; 1-minute load "
        f"average {result['load_start']:.2f} at the start, {facts['load_average_1min']:.2f} at the end), commit "
        f"{git_commit()}; {versions}; torch intra-op threads: {result['threads']}.",
        "",
        f"The original: [{ORIGINAL_NAME}](https://github.com/{ORIGINAL_NAME}), {result['origin']}, exported into a "
        "temporary folder at run time and imported from there (its dataset.py and utils.py); none of its code is "
        f"in this repository.{stand_ins}",
        "",
        f"{count} patients: the first {count} labelled patients by id of `{result['data_dir']}` outside "
        f"`{Path(result['exclude']).name}` (never read). Image size {size}, one process, both sides cold: no "
        "preprocessing cache.",
        "",
        "| per patient | ours | original |",
        "|---|---|---|",
        f"| seconds, mean | {ours['mean']:.3f} | {theirs['mean']:.3f} |",
        f"| seconds, median | {ours['median']:.3f} | {theirs['median']:.3f} |",
        f"| seconds, all {count} patients | {ours['total']:.2f} | {theirs['total']:.2f} |",
        f"| slices out, mean | {ours['slices']:.1f} | {theirs['slices']:.1f} |",
        f"| images out | {rows[0]['ours']['images']} | {rows[0]['original']['images']} |",
        f"| masks out | {rows[0]['ours']['masks']} | {rows[0]['original']['masks']} |",
        "",
        f"The original takes **{theirs['total'] / ours['total']:.2f}x** our time over the {count} patients "
        f"(per patient: {min(ratios):.2f}x to {max(ratios):.2f}x, median {np.median(ratios):.2f}x).",
        "",
        "## What each time includes",
        "",
        *_steps("**Ours**:", OURS_STEPS),
        *_steps("**Original**:", ORIGINAL_STEPS),
        "**Neither** time includes:",
        "",
        *(f"- {step}" for step in NEITHER_STEPS),
        "",
        "## Per patient",
        "",
        "| patient | slices in the folder | ours (s) | original (s) | original / ours |",
        "|---|---|---|---|---|",
        *(
            f"| {row['patient']} | {row['slices']} | {row['ours']['seconds']:.3f} | {row['original']['seconds']:.3f} "
            f"| {ratio:.2f}x |"
            for row, ratio in zip(rows, ratios)
        ),
        "",
    ]
    return "\n".join(lines)


def preprocessing_study(args: argparse.Namespace, argv: list[str]) -> dict:
    """`bench.py preprocessing`: compare, print the page, write it to --output if given."""
    try:
        result = compare(args)
    except (DataError, UsageError) as error:
        sys.exit(f"error: {error}")
    page = comparison_page(result, "python bench.py preprocessing " + shlex.join(argv))
    print_page(page, args.output)
    return result
