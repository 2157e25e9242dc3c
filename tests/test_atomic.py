"""kdkit.atomic: a destination holds the old bytes or the new ones, never a partial write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdkit import atomic
from kdkit.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


def test_atomic_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"

    def write_half_then_fail(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_half_then_fail)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temp file

    assert atomic_write(target, lambda f: f.write(b"old")) == target
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_half_then_fail)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_write_bytes_and_text_replace_and_create_parents(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "f.txt"
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temp file left


def test_atomic_path_temp_is_hidden_sibling_and_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"v1")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".model.pt.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"v2")
        assert target.read_bytes() == b"v1"  # unchanged until the body finishes
    assert target.read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_path_body_error_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"v1")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_path_nothing_written_raises_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"v1")
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(target):
        pass
    assert target.read_bytes() == b"v1"


def test_atomic_dir_replaces_a_whole_directory_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "hf"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".hf.") and tmp.is_dir()
        (tmp / "config.json").write_text("v1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a1")
        assert not target.exists()  # nothing there until the body finishes
    assert (target / "config.json").read_text() == "v1"
    assert (target / "sub" / "a.txt").read_text() == "a1"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # old files gone
    assert (target / "config.json").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or old directory left


def _directory(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_replace_dir_swaps_a_directory_in_and_leaves_nothing_beside_it(
    tmp_path, monkeypatch, exchange
):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = _directory(tmp_path / "cache", {"old.txt": "old"})
    new = _directory(tmp_path / ".cache.new", {"meta.json": "new"})
    atomic.replace_dir(new, target)
    assert _tree(target) == {"meta.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_replace_dir_puts_the_old_directory_back_when_the_new_one_cannot_go_in(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = _directory(tmp_path / "hf", {"config.json": "v1"})
    new = _directory(tmp_path / ".hf.new", {"config.json": "v2"})
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt  # e.g. Ctrl-C between moving the old one aside and the rename
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(new, target)
    assert _tree(target) == {"config.json": "v1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.new", "hf"]  # no .old left
