"""sync_image_folder: a folder with one sub-folder per category into the images table.

The FileTable of the template: new files are added, changed files (another
SHA-256) replace their row, unchanged files are left alone. Paths are stored
relative to the folder, with forward slashes, whatever the operating system.
Files that cannot be read are recorded in image_errors; decoding is featurize's job.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from .runs import recorded

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_image_files(folder: Path) -> list[tuple[str, str, Path]]:
    """``(relative path, category, absolute path)`` of every image file, sorted."""
    found = []
    for category_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(category_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                found.append((file.relative_to(folder).as_posix(), category_dir.name, file))
    return found


def sync_image_folder(store, folder, progress: bool = True) -> dict:
    """Load ``folder`` (one sub-folder per category) into the images table.

    Returns counts: ``added``, ``changed``, ``unchanged``, ``unreadable``.

    Example
    -------
    >>> sync_image_folder(store, "Data/textures")  # doctest: +SKIP
    {'added': 352, 'changed': 0, 'unchanged': 0, 'unreadable': 0}
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = list_image_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images in category sub-folders "
                         f"(expected {folder}/<category>/<image>)")
    with recorded(store, "sync_image_folder", {"folder": str(folder)}) as run:
        counts = dict.fromkeys(("added", "changed", "unchanged", "unreadable"), 0)
        known = store.image_index()
        errors = []
        with store.transaction():
            for rel, category, path in tqdm(files, desc="sync", unit="file",
                                            disable=not progress):
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    errors.append({"run_id": run.id, "path": rel, "step": "sync_image_folder",
                                   "reason": f"cannot read: {exc.strerror or exc}"})
                    counts["unreadable"] += 1
                    continue
                sha = hashlib.sha256(data).hexdigest()
                if rel not in known:
                    store.add_image(rel, category, sha, data)
                    counts["added"] += 1
                elif known[rel][1] != sha:
                    store.replace_image(known[rel][0], category, sha, data)
                    counts["changed"] += 1
                else:
                    counts["unchanged"] += 1
            store.add_image_errors(errors)
        run.counts.update(counts)
    return counts
