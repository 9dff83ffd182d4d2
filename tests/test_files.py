"""Paths below an allowed folder are taken as written, never through a link; files and
folders are opened only where their checked paths lead."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from imgsim import backbones, files
from imgsim.backbones import file_sha256, weights_path


def test_nothing_is_resolved_and_no_link_is_on_the_way(tmp_path):
    root = tmp_path / "allowed"
    (root / "x").mkdir(parents=True)
    os.symlink(root / "x", root / "link")
    os.symlink(root, tmp_path / "named-through-a-link")
    assert files.beneath(root, [root]) == str(root)
    assert files.beneath(root / "x", [root]) == str(root / "x")
    assert files.beneath(f"{root}//x/./", [root]) == str(root / "x")
    assert files.beneath(root / "missing" / "y", [root]) == str(root / "missing" / "y")
    for refused in (root / "link", root / "link" / "y", f"{root}/x/../x", f"{root}/../allowed",
                    tmp_path, f"{root}2", "allowed/x"):
        assert files.beneath(refused, [root]) is None, refused
    # an allowed folder itself reached through a link (one put in its place, or one the
    # DBA named so): refused, not resolved
    for path in (tmp_path / "named-through-a-link", tmp_path / "named-through-a-link" / "x"):
        assert files.beneath(path, [tmp_path / "named-through-a-link"]) is None


def test_a_path_with_a_link_on_the_way_is_not_opened(tmp_path):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "w.pth").write_bytes(b"weights")
    os.symlink(real, tmp_path / "link")
    os.symlink(real / "sub" / "w.pth", real / "sub" / "l.pth")
    os.close(files.open_exact(real / "sub", folder=True))
    assert len(file_sha256(real / "sub" / "w.pth")) == 64
    with pytest.raises(OSError):
        files.open_exact(tmp_path / "link" / "sub", folder=True)
    for path in (tmp_path / "link" / "sub" / "w.pth", real / "sub" / "l.pth"):
        with pytest.raises(ValueError, match="reached through no link"):
            file_sha256(path)


def test_below_an_open_folder_no_link_is_followed(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"inside")
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "l")
    fd = files.open_exact(tmp_path / "a", folder=True)
    try:
        with os.fdopen(files.open_below(fd, "b/f"), "rb") as fh:
            assert fh.read() == b"inside"
        for through_a_link_or_up in ("l/f", "b/../l/f", "../a/b/f", "b//f"):
            with pytest.raises(OSError):
                files.open_below(fd, through_a_link_or_up)
        os.chmod(tmp_path / "a" / "b", 0o750)
        with pytest.raises(PermissionError, match="private"):
            files.open_below(fd, "b/f", searchable_by_all=True)
    finally:
        os.close(fd)


def test_a_file_looked_at_through_a_link_gets_the_answer_a_missing_one_gets(tmp_path):
    (tmp_path / "real").mkdir()
    weights = tmp_path / "real" / "w.pth"
    weights.write_bytes(b"weights")
    os.mkfifo(tmp_path / "real" / "pipe.pth")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert files.regular_file(weights).st_size == 7
    assert weights_path("resnet18", weights) == weights
    for nothing_there in (tmp_path / "real" / "missing.pth", tmp_path / "link" / "w.pth",
                          tmp_path / "real", tmp_path / "real" / "pipe.pth"):
        assert files.regular_file(nothing_there) is None
        with pytest.raises(FileNotFoundError) as refused:
            weights_path("resnet18", nothing_there)
        assert str(refused.value) == (f"weights file {nothing_there} is not a regular file "
                                      "reached through no link (or does not exist)")


def test_folders_everyone_may_enter():
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path lies in a folder only root enters
    try:
        (base / "open" / "inner").mkdir(parents=True)
        (base / "closed" / "inner").mkdir(parents=True)
        for folder in (base, base / "open"):
            os.chmod(folder, 0o755)
        os.chmod(base / "closed", 0o750)
        os.symlink(base / "open", base / "link")
        assert files.searchable_by_all(base / "open" / "inner")
        assert not files.searchable_by_all(base / "closed" / "inner")
        assert not files.searchable_by_all(base / "link" / "inner")  # a link on the way
    finally:
        shutil.rmtree(base)


def test_weights_grown_past_the_limit_since_they_were_checked_are_not_read_to_the_end(
        tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w" * 20)
    assert len(file_sha256(weights)) == 64
    monkeypatch.setattr(backbones, "MAX_WEIGHTS_BYTES", 10)
    with pytest.raises(ValueError, match="larger than the limit"):
        file_sha256(weights)
