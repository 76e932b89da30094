"""train.py: arguments, checkpoints, determinism, resume, AMP, learning, DDP."""

import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_args

import dataset
import distributed
import run_setup
import train
import training_log
import validation
from dataset import discover_patients, load_volumes, select_patients
from losses import build_loss
from metrics import dice_score
from pictures import LEARNING_CURVE_KEYS

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_KEYS = {
    "model",
    "model_config",
    "preprocessing",
    "split",
    "epoch",
    "best_dice",
    "optimizer",
    "scheduler",
    "scaler",
    "args",
    "format_version",
}


VAL = {"loss": 0.75, "dice_mean": 0.5, "dice_median": 0.625}


def losses(result):
    return [h["train_loss"] for h in result["history"]]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--image-size", "40"], "divisible by 16"),
        (["--folds", "5", "--fold", "5"], "--fold 5"),
        (["--folds", "5"], "go together"),
        (["--device", "cuda:0"], "CUDA"),
        (["--val-patients", "50"], "--val-patients 50"),
        (["--lr", "-1"], "--lr"),
        (["--sync-bn"], "--sync-bn"),
        (["--image-size", "16", "--batch-size", "1"], "--image-size 16 --batch-size 1: the U-Net's bottleneck"),
        (["--overwrite", "--resume", "auto"], "--overwrite starts a new run"),
    ],
)
def test_invalid_arguments_rejected(flags, message, phantom_dir, tmp_path, capsys):
    if ("cuda" in flags[-1] or "--sync-bn" in flags) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, *flags))
    assert exit_info.value.code != 0
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in [
        "--data-dir",
        "--checkpoint-dir",
        "--log-dir",
        "--epochs",
        "--batch-size",
        "--lr",
        "--image-size",
        "--aug-scale",
        "--aug-angle",
        "--aug-flip",
        "--loss",
        "--device",
        "--num-workers",
        "--vis-frequency",
        "--n-vis-images",
        "--val-patients",
        "--seed",
        "--folds",
        "--fold",
        "--base-filters",
        "--cache-dir",
        "--no-cache",
        "--steps-per-epoch",
        "--amp",
        "--compile",
        "--resume",
        "--no-lcc",
        "--demo",
        "--sync-bn",
    ]:
        assert flag in text
    assert "(default: 100)" in text and "(default: 0.0001)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_keeps_docstring_lines_and_epoch_line_fits(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert "python train.py --demo" in [line.split("  #")[0].strip() for line in lines]
    wide_seconds = {"step": 86399.9, "val": 9999.9, "ckpt": 999.9, "pics": 999.9, "outside": 9999.9}
    wide = training_log.epoch_line(1000, 1000, {"loss": 0.1, "slices_per_s": 123456.7}, VAL, 1.234e-4, wide_seconds)
    assert len(wide + "  *best*") <= 100 and len(training_log.EPOCH_HEADER) <= 100
    seconds = {"step": 9.0, "val": 0.5, "ckpt": 0.25, "pics": 0.75, "outside": 1.0}
    header = training_log.EPOCH_HEADER
    row = training_log.epoch_line(3, 30, {"loss": 0.25, "slices_per_s": 9}, VAL, 1e-3, seconds)
    skipped = training_log.epoch_line(4, 30, {"loss": 0.25, "slices_per_s": 9}, None, 1e-3, seconds)
    assert header.index("Dice mean") + len("Dice mean") == row.index("0.5000") + len("0.5000")  # columns line up
    end = header.index("Dice mean") + len("Dice mean")
    assert skipped[:end].split()[-3:] == ["0.2500", "-", "-"] and skipped[end:].split()[0] == "-"  # not validated
    assert row.endswith("9.0/0.5/0.2/0.8  10%") and len(row) == len(header) == len(skipped)  # 1 s of 10 outside


def test_demo_sets_defaults_but_flags_win():
    args = train.parse_args(["--demo", "--epochs", "2"])
    assert args.data_dir == "./demo_3m" and args.image_size == train.DEMO_DEFAULTS["image_size"]
    assert args.epochs == 2
    assert train.parse_args([]).image_size == 256


def test_checkpoint_contract(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert not [k for k in checkpoint["model"] if k.startswith(("module.", "_orig_mod."))]
    assert checkpoint["model_config"] == {
        "architecture": "unet",
        "in_channels": 3,
        "out_channels": 1,
        "base_filters": 4,
    }
    assert checkpoint["preprocessing"]["image_size"] == 32
    split = checkpoint["split"]
    assert len(split["val"]) == 3 and not set(split["val"]) & set(split["train"])
    assert split["seed"] == 42
    folder = trained_checkpoint.parent
    assert json.loads((folder / "args.json").read_text())["image_size"] == 32
    assert (folder / "last.pt").is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    # learning_curves.png is drawn from the history each checkpoint carries (both epochs, with lr)
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [1, 2] and set(LEARNING_CURVE_KEYS) <= set(last["history"][0])
    assert last["history"][0]["lr"] == pytest.approx(json.loads((folder / "args.json").read_text())["lr"])
    assert (folder / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_losses_and_placements_agree(phantom_dir, tmp_path):
    common = ["--epochs", "2", "--steps-per-epoch", "3", "--no-cache"]
    a = train.main(tiny_train_args(phantom_dir, tmp_path / "a", *common))
    b = train.main(tiny_train_args(phantom_dir, tmp_path / "b", *common, "--data-placement", "stream"))
    c = train.main(tiny_train_args(phantom_dir, tmp_path / "c", *common, "--seed", "1"))
    assert losses(a) == pytest.approx(losses(b), rel=1e-6)
    assert losses(a) != losses(c)


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_resume_matches_uninterrupted_run(phantom_dir, tmp_path, capsys):
    common = ["--epochs", "3", "--steps-per-epoch", "2"]
    full = train.main(tiny_train_args(phantom_dir, tmp_path / "full", *common))
    train.main(tiny_train_args(phantom_dir, tmp_path / "split", *common, "--stop-after-epoch", "1"))
    assert torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    # the closing message gives the exact command that continues the run: run it
    out = capsys.readouterr().out
    command = shlex.split(out.split("continue with:")[1].strip())
    assert command[:2] == ["python", "train.py"] and "--stop-after-epoch" not in command
    # TensorBoard reads a folder's event files in name order, whose first key is the second a
    # file was opened; two opened by one process within a second may sort the wrong way round
    time.sleep(1.1)
    resumed = train.main(command[2:])
    assert command[-2:] == ["--resume", "auto"]
    assert losses(resumed) == losses(full)[1:]
    final_full = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)["model"]
    final_resumed = torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)["model"]
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key
    # the resumed run continues its own TensorBoard sub-folder: one point per epoch
    (run_dir,) = (tmp_path / "split" / "tb").iterdir()
    assert scalar_steps(run_dir, "val/dice_mean") == [1, 2, 3]
    # and its learning curves keep the epoch before the interruption
    history = {
        name: torch.load(tmp_path / name / "ckpt" / "last.pt", weights_only=True)["history"]
        for name in ("full", "split")
    }
    assert [h["epoch"] for h in history["split"]] == [1, 2, 3]
    assert not (tmp_path / "split" / "ckpt" / "learning_curves.png").exists()  # --no-learning-curves (TINY_TRAIN)
    assert all(a == pytest.approx(b) for a, b in zip(history["split"], history["full"], strict=True))
    # resuming the finished run trains nothing and says so
    capsys.readouterr()
    again = train.main(command[2:])
    assert again["history"] == [] and "already finished epoch 3 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_a_run_resumed_within_an_epoch_matches_an_uninterrupted_one(placement, phantom_dir, tmp_path, monkeypatch):
    common = ["--epochs", "2", "--steps-per-epoch", "4", "--data-placement", placement]
    full = train.main(tiny_train_args(phantom_dir, tmp_path / "full", *common, "--save-minutes", "1e-9"))
    # (saves within its epochs are queued before each epoch's end, so the last last.pt is the epoch's)
    # save after every step (in line, so no save is skipped), then Ctrl-C in step 3 of epoch 2
    argv = tiny_train_args(phantom_dir, tmp_path / "split", *common, "--save-minutes", "1e-9", "--no-background")
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 3:
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    original_step = train.train_step
    monkeypatch.setattr(train, "train_step", interrupted_step)
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    last = tmp_path / "split" / "ckpt" / "last.pt"
    assert f"{last} holds epoch 1 of 2 and 2 steps of epoch 2; continue with:" in str(stopped.value)
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["partial_epoch"]["step"]) == (1, 2)
    monkeypatch.setattr(train, "train_step", original_step)
    resumed = train.main([*argv, "--resume", "auto"])
    assert losses(resumed) == losses(full)[1:]  # epoch 2's mean loss counts the steps before the save
    final_full = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)
    final_resumed = torch.load(last, weights_only=True)
    assert "partial_epoch" not in final_resumed and final_resumed["epoch"] == 2
    for key in final_full["model"]:
        assert torch.equal(final_full["model"][key], final_resumed["model"][key]), key


def test_a_save_within_an_epoch_that_does_not_fit_the_run_is_refused(phantom_dir, tmp_path):
    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "3")
    train.main([*argv, "--stop-after-epoch", "1"])
    last = tmp_path / "ckpt" / "last.pt"
    saved = torch.load(last, weights_only=True)
    saved["partial_epoch"] = {"epoch": 2, "step": 3, "loss_sum": torch.tensor(1.0)}  # step 3 of 3: not within
    torch.save(saved, last)
    with pytest.raises(SystemExit, match="does not fit this run's 3 steps per epoch"):
        train.main([*argv, "--resume", "auto"])


def test_resume_refuses_a_changed_run_defining_flag(phantom_dir, tmp_path):
    first = tiny_train_args(
        phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--folds", "2", "--fold", "0",
        "--num-workers", "1",
    )  # fmt: skip
    train.main([*first, "--stop-after-epoch", "1"])
    saved = (tmp_path / "ckpt" / "last.pt").read_bytes()
    changes = [
        (["--fold", "1"], "--fold 0", "--fold 1"),
        (["--epochs", "5"], "--epochs 2", "--epochs 5"),
        (["--lr", "0.001"], "--lr 0.0001", "--lr 0.001"),
        (["--loss", "dice+bce"], "--loss dice", "--loss dice+bce"),
        (["--batch-size", "4"], "--batch-size 8", "--batch-size 4"),
        (["--seed", "1"], "--seed 42", "--seed 1"),
        (["--amp", "bf16"], "--amp auto", "--amp bf16"),
        (["--aug-angle", "5"], "--aug-angle 15.0", "--aug-angle 5.0"),
        (["--steps-per-epoch", "3"], "--steps-per-epoch 1", "--steps-per-epoch 3"),
        (["--image-size", "64"], "--image-size 32", "--image-size 64"),
    ]
    for change, was, asked in changes:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*first, *change, "--resume", "auto"])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and f"trained with {was}, this run asks for {asked};" in message
    without_folds = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    with pytest.raises(SystemExit, match="trained with --folds 2, this run asks for no --folds"):
        train.main([*without_folds, "--resume", "auto"])
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == saved
    # flags that only say how to run may change (no DataLoader worker processes inside a
    # pytest worker: see test_sampling.test_worker_processes_stream_the_same_batches)
    how = ["--num-workers", "0", "--log-interval", "1", "--data-placement", "stream", "--no-cache", "--deterministic"]
    result = train.main([*first, *how, "--resume", "auto"])
    assert [h["epoch"] for h in result["history"]] == [2]


def test_run_defining_flags_are_flags():
    dests = {action.dest for action in train.get_args_parser()._actions}
    defining = train.run_defining_flags()
    assert set(defining) <= dests
    required = {"epochs", "lr", "batch_size", "seed", "folds", "fold", "val_patients", "image_size"}
    required |= {"architecture", "base_filters", "aug_scale", "aug_angle", "aug_flip", "amp", "loss", "steps_per_epoch"}
    assert required <= set(defining)
    how_to_run = {"device", "num_workers", "log_interval", "stop_after_epoch", "data_placement", "cache_dir"}
    assert not (how_to_run | {"compile", "deterministic"}) & set(defining)
    assert defining["epochs"] == 100 and defining["loss"] == "dice"  # with their defaults


def test_new_run_never_clobbers_an_earlier_one(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "umask", os.umask)  # restored below
    previous = os.umask(0o027)
    try:
        args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1")
        train.main(args)
        folder = tmp_path / "ckpt"
        for name in ["last.pt", "best_model.pt", "args.json"]:
            assert (folder / name).stat().st_mode & 0o777 == 0o640, name  # the umask's, not mkstemp's 0600
        before = (folder / "last.pt").read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            train.main(args)
        assert str(exit_info.value.code) == (
            f"error: --checkpoint-dir {folder} already holds last.pt and best_model.pt of an earlier run: "
            "continue it with --resume auto, or pass --overwrite to start a new run there (deletes them)"
        )
        assert (folder / "last.pt").read_bytes() == before
        train.main([*args, "--seed", "3", "--overwrite"])
        after = torch.load(folder / "last.pt", weights_only=True)
        assert after["args"]["seed"] == 3 and after["epoch"] == 1
    finally:
        os.umask(previous)
    runs = sorted((tmp_path / "tb").iterdir())
    assert len(runs) == 2 and [scalar_steps(run, "train/loss") for run in runs] == [[1], [1]]


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--log-dir", "--cache-dir"])
@pytest.mark.parametrize("below", [False, True])
def test_unusable_output_folder_refused_before_preprocessing(phantom_dir, tmp_path, monkeypatch, flag, below):
    def no_preprocessing(*args, **kwargs):
        raise AssertionError("preprocessing started")

    monkeypatch.setattr(dataset, "load_volumes", no_preprocessing)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = blocker / "sub" if below else blocker
    with pytest.raises(SystemExit) as exit_info:
        train.main([*tiny_train_args(phantom_dir, tmp_path, "--epochs", "1"), flag, str(target)])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {flag} {target}: ") and "\n" not in message


def test_deterministic_flag_is_set_during_the_run_and_restored(phantom_dir, tmp_path, monkeypatch):
    seen = []
    original = train.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", spy)
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--deterministic"))
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(phantom_dir, tmp_path, monkeypatch):
    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "2")
    train.main([*args, "--stop-after-epoch", "1"])
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()

    class NaNLoss(torch.nn.Module):
        def forward(self, logits, target):
            return logits.float().mean() * float("nan")

    monkeypatch.setattr(run_setup, "build_loss", lambda name: NaNLoss())
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--resume", "auto"])
    assert "nan" in str(exit_info.value.code).lower()
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def test_bf16_autocast_on_cpu_with_dice_bce(phantom_dir, tmp_path):
    args = ["--epochs", "1", "--steps-per-epoch", "2", "--amp", "bf16", "--loss", "dice+bce"]
    result = train.main(tiny_train_args(phantom_dir, tmp_path, *args))
    assert np.isfinite(losses(result)).all()
    assert losses(result)[0] > 1.0  # the BCE term is there: a soft Dice loss alone is <= 1
    weights = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())


def test_tensorboard_scalars_and_overlays(phantom_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(
        tiny_train_args(
            phantom_dir,
            tmp_path,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--vis-frequency",
            "1",
            "--n-vis-images",
            "3",
        )
    )
    (run_dir,) = (tmp_path / "tb").iterdir()  # one sub-folder per run
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in [
        "train/loss",
        "val/loss",
        "val/dice_mean",
        "val/dice_median",
        "lr",
        "time/epoch_s",
        "time/val_s",
        "time/slices_per_s",
    ]:
        assert tag in tags["scalars"], tag
    assert 1 <= len(tags["images"]) <= 3


def test_learns_the_phantom(phantom_dir, tmp_path):
    """200 steps on 32x32 slices beat the trivial predictions by a wide margin (on this CPU:
    train loss down to 0.35 of the first epoch's, validation Dice 0.77 against 0.02)."""
    result = train.main(
        tiny_train_args(
            phantom_dir,
            tmp_path,
            "--image-size",
            "32",
            "--base-filters",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "8",
            "--steps-per-epoch",
            "25",
            "--lr",
            "5e-3",
            "--no-cache",
        )
    )
    history = result["history"]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    patients = select_patients(discover_patients(phantom_dir), result["split"]["val"])
    truths = [np.asarray(v.masks) for v in load_volumes(patients, 32, None)]
    empty = np.mean([dice_score(np.zeros_like(t), t) for t in truths])
    ones = np.mean([dice_score(np.ones_like(t), t) for t in truths])
    assert result["best_dice"] > max(empty, ones) + 0.25, (result["best_dice"], empty, ones)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(args: list[str], probe_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """tests/ddp_probe.py (train.py plus probes) in two gloo processes on the CPU."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe_dir), **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += ["tests/ddp_probe.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_ddp_validates_the_saved_model_once_per_patient(phantom_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from inference import model_from_checkpoint

    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "3", "--vis-frequency", "1")
    result = run_ddp(args, tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["world_size"] == 2
    assert not [k for k in checkpoint["model"] if k.startswith("module.")]
    assert sum(line.startswith("2/2 ") for line in result.stdout.splitlines()) == 1, "rank 0 alone prints"
    # rank 0 alone chooses the post-processing after the last epoch; the other rank waits for it
    assert result.stdout.count("post-processing of ") == 1
    assert "postprocessing" in torch.load(tmp_path / "ckpt" / "best_model.pt", weights_only=True)

    # each validation patient is validated by exactly one rank, and both ranks share the work
    volumes = load_volumes(select_patients(discover_patients(phantom_dir), checkpoint["split"]["val"]), 32, None)
    per_rank = [[int(n) for n in (tmp_path / "probe" / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == sorted(2 * [len(v.images) for v in volumes])

    # every rank validated with the BatchNorm statistics that rank 0 saved
    for rank in (0, 1):
        buffers = torch.load(tmp_path / "probe" / f"buffers{rank}.pt", weights_only=True)
        assert buffers and all(torch.equal(value, checkpoint["model"][name]) for name, value in buffers.items())
    # the logged validation is that of the saved model, evaluated here in one process
    model = model_from_checkpoint(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks (OMP_NUM_THREADS=1): the same convolution kernels and sums
    try:
        # train.py's validation path in one process (its batch size and loss): the device part,
        # the largest-component step and Dice, the summary
        one_process, saved = distributed.Runtime(torch.device("cpu")), checkpoint["args"]
        inputs = validation.validation_inputs(volumes, one_process.device, "host")
        criterion = build_loss(saved["loss"])
        parts = validation.validation_masks(model, inputs, one_process, 2 * saved["batch_size"], criterion)
        truths = {v.patient_id: np.asarray(v.masks) for v in volumes}
        expected = validation.summarize_validation(validation.score_patients(parts, truths, not saved["no_lcc"], False))
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = (tmp_path / "tb").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1] for tag in ["val/loss", "val/dice_mean"]}
    assert logged["val/loss"].step == 2
    assert logged["val/loss"].value == pytest.approx(expected["loss"], rel=1e-6)
    assert logged["val/dice_mean"].value == pytest.approx(expected["dice_mean"], rel=1e-6)


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(phantom_dir, tmp_path):
    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "3", "--log-interval", "1")
    result = run_ddp(args, tmp_path / "probe", PROBE_NAN_RANK="1")
    assert result.returncode != 0
    # rank 0's own loss is finite: it stops at the step where rank 1's became NaN. (Rank 1
    # prints the same line with "rank 1: " unless torchrun has already stopped it; the two
    # processes share stderr, so their lines may run into each other.)
    pattern = r"error: (rank \d+: )?the training loss became (\w+) at epoch (\d+), step (\d+)"
    stops = re.findall(pattern, result.stdout + result.stderr)
    assert ("", "nan", "1", "2") in stops
    assert all(stop[1:] == ("nan", "1", "2") for stop in stops), stops
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_resume_with_other_width_is_refused(phantom_dir, tmp_path):
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--stop-after-epoch", "1")
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--base-filters", "8", "--resume", "auto"))
    assert "--base-filters 4" in str(exit_info.value.code)


def test_compiled_training_saves_plain_weights(phantom_dir, tmp_path, monkeypatch):
    # the eager backend still wraps the model in an OptimizedModule (the `_orig_mod.` keys
    # this test is about) without inductor's C++ build, which takes a minute on a cold cache
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(train.torch, "compile", compile_eagerly)
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2", "--compile"))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert not [k for k in checkpoint["model"] if "_orig_mod" in k or k.startswith("module.")]
    from network import UNetModel, build_model

    model = build_model(checkpoint["model_config"])
    assert type(model) is UNetModel
    model.load_state_dict(checkpoint["model"])  # strict
