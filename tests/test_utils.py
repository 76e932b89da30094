"""Checkpoint writing and loading."""

import os

import pytest
import torch

import utils
from utils import CheckpointError, load_checkpoint, save_checkpoint, unwrap_state_dict


def test_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "fsync", crash)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(utils.os, "fsync", os.fsync)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(path)


def test_unwrap_state_dict_strips_nested_prefixes():
    state = {"module._orig_mod.a.weight": 1, "_orig_mod.b": 2, "c.module_x": 3}
    assert unwrap_state_dict(state) == {"a.weight": 1, "b": 2, "c.module_x": 3}
