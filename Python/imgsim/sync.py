"""sync_image_folder: a folder with one sub-folder per category, mirrored into images.

The FileTable of the template: the images table mirrors one folder. New files are
added; a file whose content changed (another SHA-256) or that moved to another category
is replaced by a new row, and a file or folder that was removed from disk is removed
from the table; in both cases everything derived from the old row (features, split,
evaluation pairs, scores, rankings) goes with it. Files present but unreadable keep
their row and are recorded in image_errors, as are files that cannot be stored: a name
that is not valid UTF-8 (shown with replacement characters), a symbolic link (never
followed: see :mod:`imgsim.files`), anything but a regular file (a pipe is never read), a
file over ``MAX_FILE_BYTES``. Paths are stored relative to the
folder, with forward slashes, whatever the operating system.

Syncing another folder than the one the table mirrors would remove every image of the
first: it is refused unless ``replace`` is given. Inside the server the folder must be
one the DBA allowed (see :mod:`imgsim.settings`). Files are stored in stretches of
``STRETCH_FILES``, each kept when a later one fails; removals happen at the end.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import checks, files
from .runs import recorded, stepwise

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                  ".webp"}
# (.tif files are synced, and then recorded as not decoded by featurize: see images.py)
MAX_FILE_BYTES = 100 << 20
STRETCH_FILES = 200
MAX_DEPTH = 32  # folders below the synced one; deeper ones are recorded, not listed
STEP = "sync_image_folder"
LINK = "a symbolic link (not followed)"


def shown(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become replacement characters."""
    return os.fsencode(name).decode("utf-8", "replace")


@dataclass
class Listing:
    """What a folder holds: image files to store, files and folders that cannot be stored
    (with the reason), folders that could not be listed, and how many other files were
    left alone (their names do not end in an image suffix)."""

    found: list = field(default_factory=list)  # (relative path, category)
    refused: list = field(default_factory=list)  # (relative path, reason)
    unlisted: list = field(default_factory=list)  # relative paths of folders
    ignored: int = 0


def list_image_files(folder_fd: int, shared_only: bool = False) -> Listing:
    """Image files in the category sub-folders of the open folder ``folder_fd``, sorted;
    with ``shared_only``, in folders every user of the machine may list.

    Walked one open folder at a time (:func:`imgsim.files.open_below`): a link is
    recorded, never followed, so a link swapped in for a folder while listing leads
    nowhere."""
    listing = Listing()
    for entry in sorted(os.scandir(folder_fd), key=lambda e: e.name):
        if entry.is_symlink():
            listing.refused.append((shown(entry.name), LINK))
        elif entry.is_dir(follow_symlinks=False):
            _list_folder(folder_fd, entry.name, listing, 1, shared_only)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            listing.refused.append((shown(entry.name), "not in a category folder"))
    return listing


def _list_folder(parent_fd: int, relative: str, listing: Listing, depth: int,
                 shared_only: bool) -> None:
    """Add what the folder ``relative`` (below ``parent_fd``'s folder, ``depth`` folders
    below the synced one) holds; its images are kept when it cannot be listed."""
    if depth > MAX_DEPTH:
        return _unlisted(listing, relative, f"more than {MAX_DEPTH} folders deep: not listed")
    try:
        fd = os.open(relative.rsplit("/", 1)[-1], files.FOLDER_FLAGS, dir_fd=parent_fd)
    except OSError as error:  # a folder the process may not read
        return _unlisted(listing, relative, f"cannot list the folder: {error.strerror}")
    try:
        if shared_only and not _listable_by_all(fd):
            return _unlisted(listing, relative, "cannot list the folder: not every user of "
                                                "the server may list it")
        try:
            entries = sorted(os.scandir(fd), key=lambda e: e.name)
        except OSError as error:
            return _unlisted(listing, relative, f"cannot list the folder: {error.strerror}")
        for entry in entries:
            rel = f"{relative}/{entry.name}"
            if entry.is_symlink():
                listing.refused.append((shown(rel), LINK))
            elif entry.is_dir(follow_symlinks=False):
                _list_folder(fd, rel, listing, depth + 1, shared_only)
            elif Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                listing.ignored += 1
            elif not _utf8(rel):
                listing.refused.append((shown(rel), "the file name is not valid UTF-8: "
                                                    "rename it"))
            elif not entry.is_file(follow_symlinks=False):
                listing.refused.append((rel, "not a regular file (a pipe, device or socket)"))
            else:
                listing.found.append((rel, rel.split("/", 1)[0]))
    finally:
        os.close(fd)


def _unlisted(listing: Listing, relative: str, reason: str) -> None:
    listing.unlisted.append(relative)
    listing.refused.append((shown(relative), reason))


def _listable_by_all(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return bool(mode & stat.S_IROTH and mode & stat.S_IXOTH)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read(folder_fd: int, root: str, relative: str, shared_only: bool = False) -> bytes:
    """The bytes of the regular file ``relative`` below the open folder ``folder_fd``
    (``root``), reached through no link whatever was swapped in since the listing, and
    still there when opened (a folder moved away since is not read); if ``shared_only``,
    one every user of the machine may read; a pipe or device is never read."""
    fd = files.open_below(folder_fd, relative, searchable_by_all=shared_only)
    with os.fdopen(fd, "rb") as fh:
        where = files.opened_path(fd)
        if where is not None and where != os.path.join(root, relative):
            raise OSError("it was moved while it was read")  # or its folder was: not read
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file (a pipe, device or socket)")
        if info.st_size > MAX_FILE_BYTES:
            raise OSError(f"larger than the limit of {MAX_FILE_BYTES >> 20} MB")
        if shared_only and not info.st_mode & stat.S_IROTH:
            raise OSError("not readable by every user of the server: imgsim does not read "
                          "files private to it")
        data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:  # it grew since it was looked at
            raise OSError(f"larger than the limit of {MAX_FILE_BYTES >> 20} MB")
        return data


@stepwise
def sync_image_folder(store, folder, replace: bool = False, progress: bool = True) -> dict:
    """Mirror ``folder`` (one sub-folder per category) into the images table.

    Parameters
    ----------
    folder : path
        The folder; inside the server, one the DBA allowed.
    replace : bool
        Mirror ``folder`` even though the table mirrors another folder (whose images,
        and everything derived from them, are then removed).

    Returns counts: ``added``, ``changed``, ``unchanged``, ``removed``, ``unreadable``,
    ``refused`` (recorded in image_errors), ``ignored`` (files whose names do not end in an
    image suffix).

    Example
    -------
    >>> sync_image_folder(store, "Data/textures")  # doctest: +SKIP
    {'added': 352, 'changed': 0, 'unchanged': 0, 'removed': 0, 'unreadable': 0, 'refused': 0}
    """
    if not isinstance(replace, bool):
        raise checks.ParameterError(f"replace must be true or false; got {replace!r}")
    root = str(store.readable_path(folder, "folder"))  # resolved; never resolved again
    folder_fd = _open_folder(root, store.shared_only())
    try:
        listing = list_image_files(folder_fd, store.shared_only())
        if not listing.found and not listing.unlisted:
            raise ValueError(f"{root} holds no images in category sub-folders "
                             f"(expected {root}/<category>/<image>)")
        with store.lock():
            earlier = store.run_rows(STEP, limit=1)  # the last sync, even an interrupted one
            mirrored = earlier[0][6]["folder"] if earlier else None
            if mirrored is not None and not os.path.isabs(mirrored):
                mirrored = None  # recorded as typed by an earlier version: cannot be compared
            known = store.image_index()
            if known and mirrored not in (None, root) and not replace:
                raise ValueError(
                    f"the images table mirrors {mirrored} ({len(known)} images); "
                    f"syncing {root} would remove them and everything derived from them: "
                    "pass replace (--replace) to mirror the new folder instead")
            return (yield from _mirror(store, root, folder_fd, replace, listing, known,
                                       progress))
    finally:
        os.close(folder_fd)


def _open_folder(root: str, shared_only: bool) -> int:
    """The synced folder, opened where its checked path leads, with no link on the way;
    with ``shared_only``, one every user of the server may list, in folders all may enter.
    Refused with one message whether it is missing, not a folder, or a link was put on the
    way (whatever it leads to)."""
    try:
        fd = files.open_exact(root, folder=True)
    except OSError:
        raise FileNotFoundError(f"image folder {root} cannot be opened: it does not exist, is "
                                "not a folder, or is reached through a link") from None
    if shared_only and not (_listable_by_all(fd) and files.searchable_by_all(root)):
        os.close(fd)
        raise PermissionError(f"{root} is a folder not every user of the server may list: "
                              "imgsim does not read files private to it")
    return fd


def _mirror(store, root, folder_fd, replace, listing, known, progress):
    """The recorded part of a sync (see :func:`sync_image_folder`)."""
    found = listing.found
    with recorded(store, STEP, {"folder": root, "replace": replace}) as run:
        yield
        counts = dict.fromkeys(("added", "changed", "unchanged", "removed", "unreadable",
                                "refused"), 0)
        counts.update(refused=len(listing.refused), ignored=listing.ignored)
        errors = [{"run_id": run.id, "path": path, "step": STEP, "reason": reason}
                  for path, reason in listing.refused]
        bar = tqdm(total=len(found), desc="sync", unit="file", disable=not progress)
        shared_only = store.shared_only()
        for start in range(0, len(found), STRETCH_FILES):
            with store.transaction():
                for rel, category in found[start:start + STRETCH_FILES]:
                    store.check_interrupts()
                    try:
                        data = _read(folder_fd, root, rel, shared_only)
                    except OSError as exc:
                        errors.append({"run_id": run.id, "path": rel, "step": STEP,
                                       "reason": f"cannot read: {exc.strerror or exc}"})
                        counts["unreadable"] += 1
                        continue
                    sha = hashlib.sha256(data).hexdigest()
                    old = known.get(rel)
                    if old is not None and old[1] == sha and old[2] == category:
                        counts["unchanged"] += 1
                        continue
                    if old is not None:
                        store.delete_images([old[0]])
                    store.add_image(rel, category, sha, data)
                    counts["changed" if old is not None else "added"] += 1
            bar.update(len(found[start:start + STRETCH_FILES]))
            run.progress(force=True, **counts)
            yield
        bar.close()
        present = {rel for rel, _ in found}
        kept = tuple(folder + "/" for folder in listing.unlisted)  # not seen: not removed
        gone = [image_id for rel, (image_id, _, _) in known.items()
                if rel not in present and not rel.startswith(kept)]
        counts["removed"] = len(gone)
        with store.transaction():
            store.delete_images(gone)
            store.delete_image_errors(STEP)
            store.add_image_errors(errors)
            run.succeed(**counts)
    return counts
