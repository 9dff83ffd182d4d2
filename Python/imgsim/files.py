"""Opening files and folders without being led elsewhere by links.

Inside the server, a caller who may not read the server's files names paths inside the
folders the DBA allowed. A link there could lead the server out, and so could a link
swapped in between a check and an open. So below an allowed folder no link is followed;
a folder is opened once and what lies beneath it is opened relative to it, one component
at a time, never through a link; and a file named by a checked path is opened only where
that path leads, with no link on the way. Nothing is opened in a way that could block (a
pipe put in a file's place is refused, not waited on).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

FILE_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
          | getattr(os, "O_CLOEXEC", 0))
FOLDER_FLAGS = FILE_FLAGS | getattr(os, "O_DIRECTORY", 0)


def beneath(path, roots) -> str | None:
    """``path``, normalised, if it is one of ``roots`` or lies below one, with no link and
    no ``..`` anywhere on the way (the roots included: name them by their real paths);
    else None. Nothing is resolved, so the answer says nothing of where a link leads,
    nor of paths outside."""
    path = os.fspath(path)
    if not os.path.isabs(path) or ".." in path.split(os.sep):
        return None
    path = os.path.normpath(path)
    if not any(path == base or path.startswith(base.rstrip(os.sep) + os.sep)
               for base in map(os.path.normpath, roots)):
        return None
    parts = [part for part in path.split(os.sep) if part]
    for depth in range(1, len(parts) + 1):
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(os.sep, *parts[:depth])).st_mode):
                return None
        except OSError:
            break  # it does not exist (or cannot be looked at) from here on: no link
    return path


def opened_path(fd: int) -> str | None:
    """Where the open file ``fd`` is (None where the system cannot say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def open_exact(path, folder: bool = False) -> int:
    """A read-only descriptor of ``path`` (absolute, with no link in it), or OSError when
    what would be opened is anything else: a link, or a path that leads elsewhere since
    it was checked."""
    path = os.path.abspath(path)
    fd = os.open(path, FOLDER_FLAGS if folder else FILE_FLAGS)
    where = opened_path(fd)
    if where is not None and where != path:
        os.close(fd)
        raise OSError(f"{path} leads elsewhere (a link was put on the way)")
    return fd


def searchable_by_all(path) -> bool:
    """Whether every folder from ``/`` down to the real, link-free ``path`` (itself
    excepted) may be entered by every user; each is opened where its path leads, so a
    link swapped in makes the answer no, whatever it leads to."""
    for folder in reversed(Path(os.path.abspath(path)).parents):
        try:
            fd = open_exact(folder, folder=True)
        except OSError:
            return False
        try:
            if not os.fstat(fd).st_mode & stat.S_IXOTH:
                return False
        finally:
            os.close(fd)
    return True


def regular_file(path) -> os.stat_result | None:
    """The status of the regular file at the real, link-free ``path``, or None when there
    is none there reached through no link (missing, a folder, a pipe, a link on the way:
    one answer, whatever a link leads to)."""
    try:
        fd = open_exact(path)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return info if stat.S_ISREG(info.st_mode) else None


def open_below(folder_fd: int, relative: str, searchable_by_all: bool = False) -> int:
    """A read-only descriptor of ``relative`` (components separated by ``/``) below the
    open folder ``folder_fd``, opened component by component without following a link.
    With ``searchable_by_all`` each folder on the way must be one every user may enter."""
    *folders, name = parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise OSError(f"{relative!r} is not a plain path below the folder")
    current = folder_fd
    try:
        for part in folders:
            opened = os.open(part, FOLDER_FLAGS, dir_fd=current)
            if current != folder_fd:
                os.close(current)
            current = opened
            if searchable_by_all and not os.fstat(current).st_mode & stat.S_IXOTH:
                raise PermissionError(f"{relative}: a folder on the way is private")
        return os.open(name, FILE_FLAGS, dir_fd=current)
    finally:
        if current != folder_fd:
            os.close(current)
