"""sync_image_folder: a folder with one sub-folder per category, mirrored into images.

The FileTable of the template: the images table mirrors one folder. New files are
added; a file whose content changed (another SHA-256) or that moved to another category
is replaced by a new row, and a file or folder that was removed from disk is removed
from the table; in both cases everything derived from the old row (features, split,
evaluation pairs, scores, rankings) goes with it. Files present but unreadable keep
their row and are recorded in image_errors, as are files that cannot be stored: a name
that is not valid UTF-8 (shown with replacement characters), a symbolic link leading
out of the folder, anything but a regular file (a pipe is never opened), a file over
``MAX_FILE_BYTES``. Paths are stored relative to the
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

from . import checks
from .runs import recorded, stepwise

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                  ".webp"}
# (.tif files are synced, and then recorded as not decoded by featurize: see images.py)
MAX_FILE_BYTES = 100 << 20
STRETCH_FILES = 200
STEP = "sync_image_folder"


def shown(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become replacement characters."""
    return os.fsencode(name).decode("utf-8", "replace")


@dataclass
class Listing:
    """What a folder holds: image files to store, files and folders that cannot be stored
    (with the reason), folders that could not be listed, and how many other files were
    left alone (their names do not end in an image suffix)."""

    found: list = field(default_factory=list)  # (relative path, category, path)
    refused: list = field(default_factory=list)  # (relative path, reason)
    unlisted: list = field(default_factory=list)  # relative paths of folders
    ignored: int = 0


def list_image_files(folder: Path) -> Listing:
    """Image files under ``folder``'s category sub-folders, without following links out,
    sorted."""
    root = os.path.realpath(folder)
    listing = Listing()

    def unlistable(error):  # a folder the process may not read: its images are kept
        listing.unlisted.append(os.path.relpath(error.filename, root).replace(os.sep, "/"))
        listing.refused.append((shown(listing.unlisted[-1]),
                                f"cannot list the folder: {error.strerror}"))

    for top in sorted(os.scandir(root), key=lambda e: e.name):
        if not top.is_dir():
            if Path(top.name).suffix.lower() in IMAGE_SUFFIXES:
                listing.refused.append((shown(top.name), "not in a category folder"))
            continue
        if top.is_symlink():  # followed, it would file the same images twice
            listing.refused.append((shown(top.name),
                                    "a link to a folder outside the synced folder"
                                    if not _inside(top.path, root) else
                                    "a link to a folder (not followed)"))
            continue
        for directory, subdirs, files in os.walk(top.path, onerror=unlistable):
            subdirs.sort()
            for name in subdirs:
                full = os.path.join(directory, name)
                if os.path.islink(full):
                    listing.refused.append((shown(os.path.relpath(full, root)),
                                            "a link to a folder outside the synced folder"
                                            if not _inside(full, root) else
                                            "a link to a folder (not followed)"))
            for name in sorted(files):
                full = os.path.join(directory, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    listing.ignored += 1
                    continue
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    listing.refused.append((shown(rel),
                                            "the file name is not valid UTF-8: rename it"))
                    continue
                if os.path.islink(full) and not _inside(full, root):
                    listing.refused.append((rel, "a link to a file outside the synced folder"))
                    continue
                try:
                    regular = stat.S_ISREG(os.stat(full).st_mode)
                except OSError:
                    regular = True  # unreadable: recorded when it is read
                if not regular:
                    listing.refused.append((rel, "not a regular file (a pipe, device or "
                                                 "socket)"))
                    continue
                listing.found.append((rel, rel.split("/", 1)[0], Path(full)))
    return listing


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _read(path: Path, root: str, shared_only: bool = False) -> bytes:
    """The bytes of the regular file ``path``, inside ``root`` (and, if ``shared_only``,
    one every user of the machine may read).

    Checked before opening (a pipe or device is never opened; opening does not block),
    and again on what was opened, so that a link or folder swapped in after the
    listing cannot lead the read outside ``root``."""
    real = os.path.realpath(path)
    if not _inside(real, root):
        raise OSError("a link to a file outside the synced folder")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise OSError("not a regular file (a pipe, device or socket)")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file (a pipe, device or socket)")
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.exists() and not _inside(os.readlink(opened), root):
            raise OSError("it was moved out of the synced folder while it was read")
        if info.st_size > MAX_FILE_BYTES:
            raise OSError(f"larger than the limit of {MAX_FILE_BYTES >> 20} MB")
        if shared_only and not (info.st_mode & stat.S_IROTH and all(
                os.stat(folder).st_mode & stat.S_IXOTH for folder in Path(real).parents)):
            raise OSError("not readable by every user of the server: imgsim does not read "
                          "files private to it")
        return fh.read(MAX_FILE_BYTES + 1)


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
    folder = store.readable_path(folder, "folder")
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise checks.ParameterError(f"{folder} is not a folder: sync a folder of category "
                                    "sub-folders")
    root = os.path.realpath(folder)
    listing = list_image_files(Path(root))
    if not listing.found and not listing.unlisted:
        raise ValueError(f"{folder} holds no images in category sub-folders "
                         f"(expected {folder}/<category>/<image>)")
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
        return (yield from _mirror(store, root, replace, listing, known, progress))


def _mirror(store, root, replace, listing, known, progress):
    """The recorded part of a sync (see :func:`sync_image_folder`)."""
    files = listing.found
    with recorded(store, STEP, {"folder": root, "replace": replace}) as run:
        yield
        counts = dict.fromkeys(("added", "changed", "unchanged", "removed", "unreadable",
                                "refused"), 0)
        counts.update(refused=len(listing.refused), ignored=listing.ignored)
        errors = [{"run_id": run.id, "path": path, "step": STEP, "reason": reason}
                  for path, reason in listing.refused]
        bar = tqdm(total=len(files), desc="sync", unit="file", disable=not progress)
        shared_only = store.shared_only()
        for start in range(0, len(files), STRETCH_FILES):
            with store.transaction():
                for rel, category, path in files[start:start + STRETCH_FILES]:
                    store.check_interrupts()
                    try:
                        data = _read(path, root, shared_only)
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
            bar.update(len(files[start:start + STRETCH_FILES]))
            run.progress(force=True, **counts)
            yield
        bar.close()
        present = {rel for rel, _, _ in files}
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
