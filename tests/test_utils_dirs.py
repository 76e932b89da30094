"""ensure_writable_dir: an unusable output folder is one clear UsageError naming the flag."""

import pytest

from utils import UsageError, ensure_writable_dir


def test_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, "--output-dir") == target
    assert target.is_dir()


@pytest.mark.parametrize("below", [False, True])
def test_file_in_the_way_is_named(tmp_path, below):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    target = blocker / "sub" if below else blocker
    with pytest.raises(UsageError, match=r"^--cache-dir .*blocker"):
        ensure_writable_dir(target, "--cache-dir")


def test_read_only_folder(tmp_path, monkeypatch):
    # Root (CI) can write into chmod-0500 folders, so simulate the read-only mount's error.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("utils.tempfile.TemporaryFile", refuse)
    with pytest.raises(UsageError, match=r"^--log-dir .*not writable \(Read-only file system\)"):
        ensure_writable_dir(tmp_path, "--log-dir")
