"""The GPU path's contracts that a CPU can check: bench.py times the loss train.py
trains with, and a resumed run refuses a change of the precision --amp resolved to."""

import pytest
import torch
from conftest import tiny_train_args

import bench
import train
from losses import build_loss


def test_bench_times_the_loss_train_py_trains_with(monkeypatch):
    """train_one_epoch hands the model's logits to the loss: bench must time the loss train.py
    builds for its default --loss (every registered loss takes logits; one on probabilities
    would optimise sigmoid(sigmoid(x)))."""
    seen = []
    monkeypatch.setattr(bench, "train_one_epoch", lambda model, data, opt, scaler, criterion, *a, **k: seen.append(
        criterion) or {"slices_per_s": 1.0})  # fmt: skip
    bench.configured_training_rate(None, 4, 2, 1, torch.device("cpu"), None, False)
    expected = build_loss(train.get_args_parser().get_default("loss"))
    assert seen and all(type(c) is type(expected) for c in seen)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert torch.equal(seen[0](logits, target), expected(logits, target))


def test_resume_refuses_another_resolved_precision(phantom_dir, tmp_path):
    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*argv, "--stop-after-epoch", "1"])
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["args"]["precision"] == "off"  # --amp auto on the CPU
    checkpoint["args"]["precision"] = "bf16"  # as if trained where --amp auto gave bf16
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--resume", "auto"])
    message = str(exit_info.value.code)
    assert "was trained in bf16 precision (--amp auto), this run resolves --amp auto to off" in message
    del checkpoint["args"]["precision"]  # a checkpoint from before the record: the flag alone decides
    torch.save(checkpoint, path)
    assert [h["epoch"] for h in train.main([*argv, "--resume", "auto"])["history"]] == [2]
