"""Shared fixtures: small phantom data sets written once per test session."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# pytest.ini runs the suite on every core with pytest-xdist (`-n auto`): each worker gets
# its share of the cores for torch, so two workers on two cores do not fight over both.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

from dataset import make_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Eight 64x64 phantom patients (12-18 slices), one of them lesion-free. Read-only."""
    root = tmp_path_factory.mktemp("phantom") / "kaggle_3m"
    make_synthetic_dataset(root, patients=8, seed=7, image_size=64, slices=(12, 18))
    return root


@pytest.fixture
def small_phantom(tmp_path) -> Path:
    """A fresh three-patient phantom that a test may modify."""
    root = tmp_path / "kaggle_3m"
    make_synthetic_dataset(root, patients=3, seed=3, image_size=64, slices=(5, 12))
    return root


TINY_TRAIN = [
    "--image-size",
    "32",
    "--base-filters",
    "4",
    "--batch-size",
    "8",
    "--val-patients",
    "3",
    "--num-workers",
    "0",
    "--vis-frequency",
    "0",
    "--no-learning-curves",  # a matplotlib figure per epoch: drawn by the tests that check it
    "--log-interval",
    "2",
]


def tiny_train_args(data_dir: Path, work: Path, *extra: str) -> list[str]:
    """Arguments for a seconds-long CPU training run writing under `work`."""
    return [
        "--data-dir",
        str(data_dir),
        "--checkpoint-dir",
        str(work / "ckpt"),
        "--log-dir",
        str(work / "tb"),
        "--cache-dir",
        str(work / "cache"),
        *TINY_TRAIN,
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_checkpoint(phantom_dir, tmp_path_factory) -> Path:
    """best_model.pt of a tiny 2-epoch run on the shared phantom (not a good model)."""
    import train

    work = tmp_path_factory.mktemp("trained")
    arguments = tiny_train_args(phantom_dir, work, "--epochs", "2", "--steps-per-epoch", "3")
    train.main([a for a in arguments if a != "--no-learning-curves"])  # test_checkpoint_contract checks them
    return work / "ckpt" / "best_model.pt"


def browser_missing() -> str | None:
    """Why the headless-browser checks cannot run here (no playwright package, no Debian
    chromium), or None. Under CI (CI=true) a test must fail on it rather than skip."""
    import report

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    if not Path(report.CHROMIUM).is_file():
        return f"{report.CHROMIUM} is missing (apt-get install chromium)"
    return None


def sigint_reaches_it() -> None:
    """`preexec_fn` for a train.py subprocess that a test interrupts with SIGINT: a test run
    started in the background by a non-interactive shell (`pytest &` in a script) ignores
    SIGINT, and its children inherit that; a user's Ctrl-C reaches a foreground process,
    which this restores (Python then turns SIGINT into KeyboardInterrupt)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
