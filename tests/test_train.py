"""train.py: arguments, checkpoints, determinism, resume, AMP, learning, DDP."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_args

import train
from dataset import discover_patients, load_volumes, select_patients
from utils import dice_score

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


def test_demo_sets_defaults_but_flags_win():
    args = train.parse_args(["--demo", "--epochs", "2"])
    assert args.data_dir == "./demo_3m" and args.image_size == train.DEMO_DEFAULTS["image_size"]
    assert args.epochs == 2
    assert train.parse_args([]).image_size == 256


def test_checkpoint_contract(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert not [k for k in checkpoint["model"] if k.startswith(("module.", "_orig_mod."))]
    assert checkpoint["model_config"] == {"in_channels": 3, "out_channels": 1, "base_filters": 4}
    assert checkpoint["preprocessing"]["image_size"] == 32
    split = checkpoint["split"]
    assert len(split["val"]) == 3 and not set(split["val"]) & set(split["train"])
    assert split["seed"] == 42
    folder = trained_checkpoint.parent
    assert json.loads((folder / "args.json").read_text())["image_size"] == 32
    assert (folder / "last.pt").is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_losses_and_placements_agree(phantom_dir, tmp_path):
    common = ["--epochs", "2", "--steps-per-epoch", "3", "--no-cache"]
    a = train.main(tiny_train_args(phantom_dir, tmp_path / "a", *common))
    b = train.main(tiny_train_args(phantom_dir, tmp_path / "b", *common, "--data-placement", "stream"))
    c = train.main(tiny_train_args(phantom_dir, tmp_path / "c", *common, "--seed", "1"))
    assert losses(a) == pytest.approx(losses(b), rel=1e-6)
    assert losses(a) != losses(c)


def test_resume_matches_uninterrupted_run(phantom_dir, tmp_path):
    common = ["--epochs", "3", "--steps-per-epoch", "2"]
    full = train.main(tiny_train_args(phantom_dir, tmp_path / "full", *common))
    train.main(tiny_train_args(phantom_dir, tmp_path / "split", *common, "--stop-after-epoch", "1"))
    assert torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train.main(tiny_train_args(phantom_dir, tmp_path / "split", *common, "--resume", "auto"))
    assert losses(resumed) == losses(full)[1:]
    final_full = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)["model"]
    final_resumed = torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)["model"]
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(phantom_dir, tmp_path, monkeypatch):
    args = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "2")
    train.main([*args, "--stop-after-epoch", "1"])
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()

    class NaNLoss(torch.nn.Module):
        def forward(self, probabilities, target):
            return probabilities.float().mean() * float("nan")

    monkeypatch.setattr(train, "SoftDiceLoss", NaNLoss)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--resume", "auto"])
    assert "nan" in str(exit_info.value.code).lower()
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def test_bf16_autocast_on_cpu(phantom_dir, tmp_path):
    result = train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2", "--amp", "bf16")
    )
    assert np.isfinite(losses(result)).all()
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
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
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
    """A few hundred steps on 64x64 slices beat the trivial predictions by a wide margin."""
    result = train.main(
        tiny_train_args(
            phantom_dir,
            tmp_path,
            "--image-size",
            "64",
            "--base-filters",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "8",
            "--steps-per-epoch",
            "30",
            "--lr",
            "3e-3",
            "--no-cache",
        )
    )
    history = result["history"]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    patients = select_patients(discover_patients(phantom_dir), result["split"]["val"])
    truths = [np.asarray(v.masks) for v in load_volumes(patients, 64, None)]
    empty = np.mean([dice_score(np.zeros_like(t), t) for t in truths])
    ones = np.mean([dice_score(np.ones_like(t), t) for t in truths])
    assert result["best_dice"] > max(empty, ones) + 0.25, (result["best_dice"], empty, ones)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(phantom_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "train.py",
        *tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "2", "--vis-frequency", "1"),
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert not [k for k in checkpoint["model"] if k.startswith("module.")]
    assert result.stdout.count("epoch   2/2") == 1, "only rank 0 prints the epoch summary"


def test_resume_with_other_width_is_refused(phantom_dir, tmp_path):
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--stop-after-epoch", "1")
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--base-filters", "8", "--resume", "auto"))
    assert "--base-filters 4" in str(exit_info.value.code)


def test_compiled_training_saves_plain_weights(phantom_dir, tmp_path):
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2", "--compile"))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert not [k for k in checkpoint["model"] if "_orig_mod" in k or k.startswith("module.")]
    from network import UNetModel

    UNetModel(**checkpoint["model_config"]).load_state_dict(checkpoint["model"])  # strict
