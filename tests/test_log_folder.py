"""A TensorBoard run folder exists only once a run has logged something: a refused or an
interrupted train.py (real processes, real signals) leaves nothing under --log-dir, a run
that finished an epoch keeps its folder with the events."""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import ROOT, sigint_reaches_it, tiny_train_args

import train
from tb_logger import TBLogger
from training_log import EPOCH_HEADER


def start_train(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_reaches_it,
    )  # fmt: skip


def test_the_logger_makes_its_folder_at_the_first_event(tmp_path):
    folder = tmp_path / "tb" / "run"
    unused = TBLogger(folder)
    unused.close()
    assert not (tmp_path / "tb").exists()
    logger = TBLogger(folder)
    logger.scalar("train/loss", 0.5, 1)
    logger.close()
    assert list(folder.glob("events.out.tfevents.*"))
    TBLogger(tmp_path / "other", enabled=False).scalar("train/loss", 0.5, 1)  # ranks other than 0
    assert not (tmp_path / "other").exists()


def test_a_refused_run_leaves_no_log_folder(phantom_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_bytes(b"an earlier run")  # refused without --resume
    process = start_train(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1"))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "already holds last.pt of an earlier run" in err, err
    assert not (tmp_path / "tb").exists()


def test_a_run_interrupted_before_its_first_epoch_ended_leaves_no_log_folder(phantom_dir, tmp_path):
    """SIGINT once the start lines are printed (the logger is open), long before the first
    epoch's 100000 steps are done."""
    argv = tiny_train_args(phantom_dir, tmp_path, "--demo", "--epochs", "2", "--steps-per-epoch", "100000")
    process = start_train(argv)
    for line in process.stdout:
        if line.startswith(EPOCH_HEADER):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "interrupted: " in err and "Traceback" not in err, err
    assert not (tmp_path / "tb").exists()


def test_a_run_that_finished_an_epoch_keeps_its_folder_with_events(phantom_dir, tmp_path):
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1"))
    (run,) = (tmp_path / "tb").iterdir()
    assert list(run.glob("events.out.tfevents.*"))
