"""edgefl.durable: replace and create files so that a crash leaves the old or the new content."""
import os
import stat

import pytest

from edgefl import durable


def test_replace_writes_the_whole_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    assert durable.replace_file(path, b"new content") == path
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_replace_sets_the_mode_asked_for(tmp_path):
    path = durable.replace_file(tmp_path / "acl", b"rules", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "budget.json"
    path.write_bytes(b"old")

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", crash)
    with pytest.raises(OSError, match="No space left"):
        durable.replace_file(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"]


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced_directory = []
    real_fsync = os.fsync

    def record(fd):
        synced_directory.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", record)
    durable.replace_file(tmp_path / "model.bin", b"x")
    assert synced_directory == [False, True]


def test_on_windows_the_directory_is_not_opened(tmp_path, monkeypatch):
    """Windows has no directory handles: os.open on a directory fails there, so it is not tried."""
    monkeypatch.setattr(durable.os, "name", "nt")

    def no_directory_handles(path, flags, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(durable.os, "open", no_directory_handles)
    durable.fsync_directory(tmp_path)  # no error


def test_create_never_overwrites(tmp_path):
    path = tmp_path / "signing.key"
    assert durable.create_file(path, b"first") is True
    assert durable.create_file(path, b"second") is False
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
