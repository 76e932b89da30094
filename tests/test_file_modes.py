"""atomic_write_bytes / save_checkpoint: files get the umask's permissions, not mkstemp's 0600."""

import os

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from utils import atomic_write_bytes


@pytest.fixture
def umask():
    """Set an explicit umask for the test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_created_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_bytes(b"{}", tmp_path / "args.json")
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, tmp_path / "last.pt")
    for name in ["args.json", "last.pt"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json", "last.pt"]  # no temp file left


def test_replacing_a_file_keeps_no_temp_file_and_new_content(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "args.json"
    target.write_bytes(b"old")
    atomic_write_bytes(b"new", target)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["args.json"]
