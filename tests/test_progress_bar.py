"""The training progress bar in a terminal 80 columns wide (a real pseudo-terminal, as tqdm
sees one): the label with the run's time left, the bar, the step, the loss and the slice
rate all fit, with nothing cut off."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from conftest import ROOT
from tqdm.utils import disp_len

import training_log

LONGEST_LABEL = "epoch 100/100, run 10 h 02 min left"  # training_log.progress_label at its widest

# Twelve steps of a 9999-step epoch (the widest step count), 30 ms each so that tqdm redraws
# with the loss shown; "tqdm": training_log's settings alone, "train": train_one_epoch itself.
CHILD = r"""
import sys, time
import torch
from tqdm import tqdm
import distributed, train, training_log

label, mode = sys.argv[1], sys.argv[2]
if mode == "tqdm":
    bar = tqdm(total=9999, desc=label, **training_log.PROGRESS_BAR)
    for step in range(12):
        time.sleep(0.03)
        bar.set_postfix_str(training_log.progress_postfix(0.43351234, 1234.5))
        bar.update(1)
    bar.close()
else:
    class TwelveBatches:
        def batches(self, *args):
            return ((torch.zeros(1), torch.zeros(1)) for _ in range(12))

    def step(*args):
        time.sleep(0.03)
        return torch.tensor(0.43351234)

    train.train_step = step
    runtime = distributed.Runtime(torch.device("cpu"))
    train.train_one_epoch(torch.nn.Identity(), TwelveBatches(), None, None, None, lambda i, m: (i, m), runtime,
                          9999, 16, torch.Generator(), 100, 2, desc=label)
"""


def frames_in_terminal(argv: list[str], columns: int, timeout: float = 120.0) -> list[str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal `columns` wide; return
    each line it drew (split at carriage returns, escape sequences removed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # the terminal's width only
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        process.wait()
    if process.returncode != 0:  # a crash, not a width failure
        raise RuntimeError(output.decode(errors="replace")[-3000:])
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.decode())
    return [frame for frame in re.split(r"\r\n?|\n", text) if frame.strip()]


def check_fits(frames: list[str], columns: int) -> None:
    assert frames and all(disp_len(frame) < columns for frame in frames), frames
    shown = [frame for frame in frames if "loss=" in frame]
    assert shown and all(frame.endswith(" sl/s") and frame.startswith(LONGEST_LABEL) for frame in shown), frames


def test_progress_postfix_says_loss_and_slice_rate_briefly():
    assert training_log.progress_postfix(0.43351234, 5.123) == "loss=0.434, 5.1 sl/s"
    assert training_log.progress_postfix(0.43351234, 1234.5) == "loss=0.434, 1234 sl/s"


def test_the_bar_settings_fit_80_columns():
    check_fits(frames_in_terminal([sys.executable, "-c", CHILD, LONGEST_LABEL, "tqdm"], 80), 80)


def test_train_one_epoch_bar_fits_80_columns():
    check_fits(frames_in_terminal([sys.executable, "-c", CHILD, LONGEST_LABEL, "train"], 80), 80)
