"""publish.py: the published copy of a checkpoint predicts exactly what the checkpoint does,
carries no training-only state, cannot be resumed from, and refuses an unfinished run."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import tiny_train_args

import publish
import train
from checkpoint import TRAINING_ONLY_KEYS, load_checkpoint
from inference import load_model


def test_published_copy_predicts_what_the_checkpoint_does(trained_checkpoint, tmp_path):
    output = tmp_path / "weights" / "model.pt"
    digest = publish.main(["--model-path", str(trained_checkpoint), "--output", str(output)])
    assert digest == hashlib.sha256(output.read_bytes()).hexdigest()
    original, published = load_checkpoint(trained_checkpoint), load_checkpoint(output)
    assert set(original) - set(published) == set(TRAINING_ONLY_KEYS) & set(original)
    assert published["postprocessing"] == original["postprocessing"]
    assert published["split"] == original["split"] and published["args"] == original["args"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = load_model(trained_checkpoint, torch.device("cpu")).model(images)
        got = load_model(output, torch.device("cpu")).model(images)
    assert torch.equal(expected, got) and got.dtype == torch.float32
    assert output.stat().st_size < trained_checkpoint.stat().st_size / 2  # Adam's two moments are gone


def test_a_published_copy_cannot_be_resumed_from(trained_checkpoint, phantom_dir, tmp_path):
    output = tmp_path / "model.pt"
    publish.main(["--model-path", str(trained_checkpoint), "--output", str(output)])
    argv = tiny_train_args(phantom_dir, tmp_path / "again", "--epochs", "3", "--resume", str(output))
    with pytest.raises(SystemExit, match="cannot resume from it"):
        train.main(argv)


def test_an_unfinished_run_is_not_published(phantom_dir, tmp_path):
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--stop-after-epoch", "1")
    )
    with pytest.raises(SystemExit, match="holds no chosen post-processing"):
        publish.main(["--model-path", str(tmp_path / "ckpt" / "best_model.pt"), "--output", str(tmp_path / "m.pt")])
    assert not (tmp_path / "m.pt").exists()
