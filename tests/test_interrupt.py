"""Ctrl-C (SIGINT) and SIGTERM sent to a real train.py process: one line that says what was
saved and the exact command that continues, no traceback, and that command resumes."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, sigint_reaches_it, tiny_train_args


def interrupt_after_first_epoch(argv: list[str], sig: int) -> subprocess.CompletedProcess:
    """Start train.py, wait for its first epoch line (epoch 1's last.pt is then being written
    by the worker or written), send `sig`, and return the finished process."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_reaches_it,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("1/"):
            break
    time.sleep(0.5)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(lines) + out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_says_what_it_kept_and_how_to_continue(sig, phantom_dir, tmp_path):
    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "40", "--steps-per-epoch", "3")
    result = interrupt_after_first_epoch(argv, sig)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = tmp_path / "ckpt" / "last.pt"
    epoch = torch.load(last, weights_only=True)["epoch"]
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("interrupted: ")]
    assert f"{last} holds epoch {epoch} of 40; continue with: python train.py " in message
    command = shlex.split(message.split("continue with: ")[1])
    assert command[-2:] == ["--resume", "auto"] and command[2:-2] == argv
    resumed = subprocess.run(
        [sys.executable, *command[1:], "--stop-after-epoch", str(epoch + 1)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0 and f"resumed from {last} after epoch {epoch}" in resumed.stdout, resumed.stderr
