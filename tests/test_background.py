"""The end of each epoch off the training thread (background.py, epoch_end.end_epoch /
finish_epoch): host copies, the worker's order and errors, a crash while a checkpoint is
being written, and the same selection and weights as validation in line."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_train_args

import checkpoint as checkpoint_module
import dataset
import distributed
import train
import validation
from augmentations import BatchAugmentation, affine_matrices, random_affine_parameters
from background import BackgroundWorker, host_copy
from checkpoint import load_checkpoint


def test_host_copy_shares_no_memory_and_keeps_the_structure():
    live = {
        "w": torch.ones(3),
        "state": {0: {"exp_avg": torch.zeros(2), "step": 4}},
        "lrs": [0.1],
        "t": (torch.ones(1),),
    }
    copy = host_copy(live)
    live["w"].add_(1)
    live["state"][0]["exp_avg"].add_(1)
    live["t"][0].add_(1)
    live["lrs"].append(0.2)
    assert torch.equal(copy["w"], torch.ones(3)) and torch.equal(copy["state"][0]["exp_avg"], torch.zeros(2))
    assert torch.equal(copy["t"][0], torch.ones(1)) and isinstance(copy["t"], tuple)
    assert copy["lrs"] == [0.1] and copy["state"][0]["step"] == 4


@pytest.mark.parametrize("enabled", [True, False])
def test_worker_runs_jobs_in_order_and_raises_the_first_error_after_the_rest(enabled):
    done, threads = [], set()

    def job(n):
        def run():
            time.sleep(0.01)
            threads.add(threading.current_thread().name)
            if n == 1:
                raise OSError("disk full")
            done.append(n)

        return run

    worker = BackgroundWorker(enabled=enabled, max_pending=4)
    if enabled:
        for n in range(4):
            worker.submit(job(n))  # no waiting for room: the error of job 1 surfaces at close
        with pytest.raises(OSError, match="disk full"):
            worker.close()
        assert done == [0, 2, 3] and threads == {t for t in threads if t.startswith("epoch-end")}
    else:
        worker.submit(job(0))
        with pytest.raises(OSError, match="disk full"):
            worker.submit(job(1))  # in line: at once, in the caller's thread
        assert threads == {threading.current_thread().name}


def test_epoch_matrices_are_the_per_sample_draws_of_one_generator():
    augment = BatchAugmentation(0.05, 15.0, 0.5, seed=4)
    matrices = augment.epoch_matrices(5, 3, torch.device("cpu"))
    expected = affine_matrices(random_affine_parameters(15, 0.05, 15.0, 0.5, torch.Generator().manual_seed(4)))
    assert matrices.shape == (5, 3, 2, 3) and torch.equal(matrices.reshape(15, 2, 3), expected)
    assert not torch.equal(matrices[0], matrices[1])  # each step gets its own transforms
    assert BatchAugmentation(0.0, 0.0, 0.0).epoch_matrices(5, 3, torch.device("cpu")) is None


def slow_writes_on_the_worker(monkeypatch, seconds: float) -> list[tuple]:
    """Every checkpoint write sleeps first, so the training thread runs ahead of the worker
    (a state shared with the live model would then be saved changed). Returns a record of
    each write: (thread name, file name, epoch, the weights as one float64 vector)."""
    writes, save = [], checkpoint_module.save_checkpoint

    def slow_save(checkpoint, path):
        time.sleep(seconds)
        weights = torch.cat([t.double().flatten() for t in checkpoint["model"].values()])
        writes.append((threading.current_thread().name, path.name, checkpoint["epoch"], weights))
        save(checkpoint, path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", slow_save)
    return writes


def test_background_run_selects_and_saves_what_an_in_line_run_does(phantom_dir, tmp_path, monkeypatch):
    writes = slow_writes_on_the_worker(monkeypatch, 0.3)
    args = ["--epochs", "4", "--steps-per-epoch", "3", "--vis-frequency", "2", "--n-vis-images", "5", "--lr", "3e-3"]
    background = train.main(tiny_train_args(phantom_dir, tmp_path / "bg", *args))
    in_background = list(writes)
    writes.clear()
    in_line = train.main(tiny_train_args(phantom_dir, tmp_path / "line", *args, "--no-background"))
    assert {w[0] for w in in_background} == {"epoch-end_0"} and {w[0] for w in writes} == {"MainThread"}
    # the same files of the same epochs with the same weights, written in the same order
    assert [w[1:3] for w in in_background] == [w[1:3] for w in writes] and len(writes) >= 5
    assert all(torch.equal(a[3], b[3]) for a, b in zip(in_background, writes))
    assert not torch.equal(in_background[0][3], in_background[-1][3])  # the weights did change between epochs
    assert background["history"] == in_line["history"] and background["best_dice"] == in_line["best_dice"]
    for name in ("best_model.pt", "last.pt"):
        a, b = (load_checkpoint(tmp_path / run / "ckpt" / name) for run in ("bg", "line"))
        assert a["epoch"] == b["epoch"] and a["history"] == b["history"]
        assert all(torch.equal(x, y) for x, y in zip(a["rng"]["torch"], b["rng"]["torch"]))
    best = load_checkpoint(tmp_path / "bg" / "ckpt" / "best_model.pt")
    assert best["best_dice"] == max(h["dice_mean"] for h in background["history"][: best["epoch"]])


def test_val_interval_validates_every_nth_and_the_last_epoch(phantom_dir, tmp_path, capsys):
    result = train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "5", "--steps-per-epoch", "1", "--val-interval", "2")
    )
    assert [h["epoch"] for h in result["history"]] == [2, 4, 5]
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:2] in {"1/", "3/"}]
    assert len(lines) == 2 and all(line.split()[2:5] == ["-", "-", "-"] for line in lines)
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 5


def test_crash_while_the_worker_writes_keeps_the_previous_last_pt(phantom_dir, tmp_path, monkeypatch):
    """An exception inside the real atomic write (after the bytes, before the rename) of the
    second epoch's last.pt, on the worker thread: the run fails with it, and last.pt is
    still the first epoch's, loadable, with no temp file left."""
    calls, fsync = [], os.fsync

    def failing_fsync(fd):
        if threading.current_thread().name.startswith("epoch-end"):
            calls.append(fd)
            if len(calls) == 3:  # epoch 1: last.pt, best_model.pt; epoch 2: last.pt
                raise OSError("injected: power cut during the write")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "3", "--steps-per-epoch", "2")
    with pytest.raises(SystemExit, match=r"last\.pt: the checkpoint could not be written \(injected"):
        train.main(args)
    assert len(calls) == 3
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert checkpoint["epoch"] == 1 and not list((tmp_path / "ckpt").glob(".*.tmp"))


def test_a_training_crash_waits_for_the_pending_checkpoint(phantom_dir, tmp_path, monkeypatch):
    """The training thread fails in epoch 3 while the worker still writes epoch 2: the run
    raises the training error only after epoch 2's last.pt is on disk."""
    slow_writes_on_the_worker(monkeypatch, 1.0)
    original = train.train_one_epoch

    def failing_third_epoch(*args, **kwargs):
        if args[10] == 3:  # epoch
            raise distributed.TrainingDiverged("injected at epoch 3")
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", failing_third_epoch)
    with pytest.raises(SystemExit, match="injected at epoch 3"):
        train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "4", "--steps-per-epoch", "2"))
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 2


def test_validation_volumes_stay_on_the_device_with_device_placement(phantom_dir):
    volumes = dataset.load_volumes(dataset.discover_inputs(phantom_dir)[:2], 32, None)
    on_device = validation.validation_inputs(volumes, torch.device("cpu"), "device")
    streamed = validation.validation_inputs(volumes, torch.device("cpu"), "stream")
    assert all(isinstance(v.images, torch.Tensor) for v in on_device)
    assert all(isinstance(v.images, np.memmap | np.ndarray) for v in streamed)
    for a, b in zip(on_device, streamed):
        assert torch.equal(a.images.float(), torch.from_numpy(np.array(b.images)).float()) and torch.equal(
            a.masks, b.masks
        )


def test_a_failed_learning_curves_write_is_one_line_and_keeps_the_checkpoints(phantom_dir, tmp_path):
    """The curves are written on the worker after the epoch's checkpoints: a folder in the
    way of learning_curves.png stops the run with one error line naming it, not a traceback,
    and the first epoch's last.pt is complete."""
    (tmp_path / "ckpt" / "learning_curves.png" / "in_the_way").mkdir(parents=True)
    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "3", "--steps-per-epoch", "2")
    with pytest.raises(SystemExit, match=r"learning_curves\.png: the learning curves could not be written"):
        train.main([a for a in args if a != "--no-learning-curves"])
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))
