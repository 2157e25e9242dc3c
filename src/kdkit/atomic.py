"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Each write goes to a temporary file in the destination's directory, is flushed and fsynced, and
then ``os.replace``-d over the destination; on failure the temporary file is removed and the
destination is left as it was. Directories (a ``save_pretrained`` folder, a teacher cache) are
built beside the destination and swapped in by :func:`replace_dir`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_dir",
    "atomic_files",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "replace_dir",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Whatever the body writes to the yielded path becomes ``path`` only when the body finishes
    without raising; otherwise the temporary file is removed and ``path`` is left untouched (a
    reader never sees a half-written file). The file is fsynced before the rename, so a crash
    cannot leave an empty ``path`` either. The parent directory is created if missing.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a rename on one filesystem (atomic on POSIX and Windows).
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic write of {final}: nothing was written to the temporary file {tmp}."
            )
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a new binary file that atomically becomes ``path``; returns ``path``.

    ``f`` is flushed and fsynced before the rename, e.g.
    ``atomic_write(path, lambda f: torch.save(obj, f))``.
    """
    with atomic_path(path) as tmp:  # which fsyncs before the rename
        with open(tmp, "xb") as f:
            write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + os.replace)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty directory beside ``path``; on success it replaces ``path`` whole
    (:func:`replace_dir`).

    For what writes several files at once (``save_pretrained``). On failure the temporary
    directory is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty directory beside ``directory``; on success every file written into it
    is fsynced and moved into ``directory`` by one rename each (same relative path).

    For a ``save_pretrained`` into a folder that also holds other files (a trainer's output
    directory with its checkpoints), which :func:`atomic_dir` would replace whole: no file is
    ever half-written, though a crash midway may leave some files new and some old. On failure
    nothing in ``directory`` changes.
    """
    final = Path(directory)
    final.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for file in _fsync_files(tmp):
            target = final / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make the finished directory ``src`` (a sibling of ``dst``) the directory ``dst``.

    Its files are fsynced first. A reader of ``dst`` sees the old directory or the new one: on
    Linux the two are swapped in one rename (``renameat2(RENAME_EXCHANGE)``) and the old one is
    removed after. Elsewhere (or on a filesystem without the exchange) the old directory is moved
    aside, ``src`` renamed in and the old one removed, and if that rename fails the old one is put
    back; only a crash between those two renames leaves ``dst`` missing (the old directory then
    lies beside it as ``.<name>.<tag>.old``).
    """
    src, dst = Path(src), Path(dst)
    _fsync_files(src)
    if not dst.exists():
        os.replace(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src)  # src now holds the old directory
    else:
        old = _sibling(dst, "old")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old)


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` no other writer picks: ``.<name>.<random>.<kind>``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{kind}")


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_files(directory: Path) -> list[Path]:
    """Flush every file under ``directory`` to disk; returns them."""
    files = [file for file in directory.rglob("*") if file.is_file()]
    for file in files:
        _fsync(file)
    return files


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic rename (Linux ``renameat2``); False where the C
    library or the filesystem does not offer it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    paths = os.fsencode(a), os.fsencode(b)
    return renameat2(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_EXCHANGE) == 0
