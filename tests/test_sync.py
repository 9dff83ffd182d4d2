"""sync_image_folder mirrors a folder: additions, changes, removals with everything
derived from them, names that are not UTF-8, links (never followed), another folder."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imgsim import featurize_images, files, prepare_data, run_image_similarity, sync_image_folder
from imgsim import sync as sync_module
from imgsim.store import tables as t


def count(store, table, where=None):
    query = select(func.count()).select_from(table)
    return store._fetch(query if where is None else query.where(where))[0][0]


def paths(store):
    return sorted(p for _, p, _, _ in store.image_info())


@pytest.fixture
def synced(small_folder, empty_store):
    """The small folder synced and featurized, with a split."""
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    prepare_data(empty_store, max_query_imgs_per_subdir=2, max_neg_imgs_per_query_img=4)
    return small_folder, empty_store


def test_a_removed_file_is_removed_with_everything_derived_from_it(synced):
    folder, store = synced
    image_id = {p: i for i, p, _, _ in store.image_info()}["zebra/zebra_001.jpg"]
    (folder / "zebra" / "zebra_001.jpg").unlink()
    counts = sync_image_folder(store, folder, progress=False)
    assert counts["removed"] == 1 and counts["unchanged"] == 11
    assert "zebra/zebra_001.jpg" not in paths(store)
    for table in (t.features, t.training_images, t.testing_images):
        assert count(store, table, table.c.image_id == image_id) == 0
    assert count(store, t.evaluation_images, (t.evaluation_images.c.query_id == image_id)
                 | (t.evaluation_images.c.candidate_id == image_id)) == 0


def test_a_removed_folder_removes_its_category(synced):
    folder, store = synced
    for file in (folder / "dotted").iterdir():
        file.unlink()
    (folder / "dotted").rmdir()
    assert sync_image_folder(store, folder, progress=False)["removed"] == 4
    assert not [p for p in paths(store) if p.startswith("dotted/")]
    assert count(store, t.features) == 2 * 8  # features and colour layouts


def test_a_changed_or_moved_file_is_replaced_and_its_features_go(synced):
    folder, store = synced
    before = {p: i for i, p, _, _ in store.image_info()}
    (folder / "zebra" / "zebra_002.jpg").write_bytes(
        (folder / "argyle" / "argyle_000.jpg").read_bytes())
    (folder / "argyle" / "argyle_003.jpg").rename(folder / "dotted" / "argyle_003.jpg")
    counts = sync_image_folder(store, folder, progress=False)
    assert (counts["changed"], counts["added"], counts["removed"]) == (1, 1, 1)
    after = {p: (i, c) for i, p, c, _ in store.image_info()}
    assert after["dotted/argyle_003.jpg"][1] == "dotted"
    assert after["zebra/zebra_002.jpg"][0] != before["zebra/zebra_002.jpg"]
    assert count(store, t.features, t.features.c.image_id == before["zebra/zebra_002.jpg"]) == 0
    again = featurize_images(store, progress=False)  # argyle_000's content is still there;
    assert (again["reused"], again["featurized"]) == (1, 1)  # the moved file's went with it


def test_a_name_that_is_not_utf8_is_recorded_and_everything_else_loaded(small_folder,
                                                                         empty_store):
    bad = os.path.join(os.fsencode(small_folder / "zebra"), b"bad\xff.jpg")
    with open(bad, "wb") as fh:
        fh.write((small_folder / "zebra" / "zebra_000.jpg").read_bytes())
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["added"] == 12 and counts["refused"] == 1
    errors = {path: reason for path, _, reason, _ in empty_store.image_error_rows()}
    assert errors == {"zebra/bad\ufffd.jpg": "the file name is not valid UTF-8: rename it"}


def test_links_are_recorded_and_never_followed(small_folder, empty_store, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd.jpg").write_bytes(b"root:x:0:0")
    os.symlink("/etc/passwd", small_folder / "zebra" / "passwd.jpg")
    os.symlink(outside, small_folder / "elsewhere")
    os.symlink(small_folder / "zebra" / "zebra_000.jpg", small_folder / "argyle" / "inside.jpg")
    os.symlink(small_folder / "zebra", small_folder / "zebra2")  # its images twice over
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["refused"] == 4 and counts["added"] == 12
    stored = paths(empty_store)
    assert "zebra/passwd.jpg" not in stored and not [p for p in stored if "elsewhere" in p]
    assert b"root:x:0:0" not in b"".join(empty_store.image_data(
        [i for i, _, _, _ in empty_store.image_info()]).values())
    reasons = {p: r for p, _, r, _ in empty_store.image_error_rows()}
    assert {p: reasons[p] for p in ("zebra/passwd.jpg", "elsewhere", "argyle/inside.jpg",
                                    "zebra2")} == dict.fromkeys(
        ("zebra/passwd.jpg", "elsewhere", "argyle/inside.jpg", "zebra2"),
        "a symbolic link (not followed)")  # the same, wherever it leads


def test_a_link_swapped_in_after_the_listing_leads_nowhere(small_folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "zebra_000.jpg").write_bytes(b"a secret")
    fd = files.open_exact(small_folder, folder=True)
    try:
        listing = sync_module.list_image_files(fd)
        assert ("zebra/zebra_000.jpg", "zebra") in listing.found
        assert sync_module._read(fd, str(small_folder), "zebra/zebra_000.jpg")[:2] == b"\xff\xd8"
        (small_folder / "zebra").rename(tmp_path / "zebra-moved")
        (small_folder / "zebra").symlink_to(outside)
        with pytest.raises(OSError):
            sync_module._read(fd, str(small_folder), "zebra/zebra_000.jpg")
        again = sync_module.list_image_files(fd)
        assert not [rel for rel, _ in again.found if rel.startswith("zebra/")]
        assert ("zebra", sync_module.LINK) in again.refused
    finally:
        os.close(fd)


def test_files_of_a_folder_moved_away_while_syncing_are_not_read(small_folder, tmp_path):
    fd = files.open_exact(small_folder, folder=True)
    try:
        small_folder.rename(tmp_path / "elsewhere")  # by whoever may write there
        with pytest.raises(OSError, match="moved"):
            sync_module._read(fd, str(small_folder), "zebra/zebra_000.jpg")
    finally:
        os.close(fd)


def test_a_link_put_on_the_checked_path_of_the_folder_is_refused(small_folder, empty_store,
                                                                 tmp_path, monkeypatch):
    """Inside the server the path is checked as written and never resolved again: a link
    put on the way after the check must not lead the sync elsewhere."""
    (tmp_path / "parent").symlink_to(tmp_path)  # put there after the check
    checked = tmp_path / "parent" / "small"
    monkeypatch.setattr(empty_store, "readable_path", lambda path, what: Path(path))
    with pytest.raises(FileNotFoundError, match="reached through a link"):
        sync_image_folder(empty_store, checked, progress=False)
    assert paths(empty_store) == [] and empty_store.run_rows("sync_image_folder") == []


def test_folders_not_everyone_may_list_are_not_listed_for_analysts(small_folder,
                                                                   empty_store, monkeypatch):
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path lies in a folder only root enters
    try:
        folder = base / "shared"
        shutil.copytree(small_folder, folder)
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
        private = folder / "zebra" / "private"
        private.mkdir(mode=0o711)  # others may enter it, not list it
        (private / "SECRET-NAME.jpg").write_bytes(b"x")
        monkeypatch.setattr(empty_store, "shared_only", lambda: True)
        counts = sync_image_folder(empty_store, folder, progress=False)
        reasons = {p: r for p, _, r, _ in empty_store.image_error_rows()}
        assert counts["added"] == 12
        assert reasons == {"zebra/private": "cannot list the folder: not every user of the "
                                            "server may list it"}
        os.chmod(folder, 0o711)
        with pytest.raises(PermissionError, match="not every user of the server may list"):
            sync_image_folder(empty_store, folder, progress=False)
    finally:
        shutil.rmtree(base)


def test_a_file_grown_past_the_limit_since_it_was_looked_at_is_not_stored(small_folder,
                                                                          monkeypatch):
    monkeypatch.setattr(sync_module, "MAX_FILE_BYTES", 1000)
    fd = files.open_exact(small_folder, folder=True)
    real_fstat = os.fstat
    monkeypatch.setattr(sync_module.os, "fstat", lambda f: os.stat_result(
        (*real_fstat(f)[:6], 10, *real_fstat(f)[7:])))  # as it was when looked at: 10 bytes
    try:
        with pytest.raises(OSError, match="larger than the limit"):
            sync_module._read(fd, str(small_folder), "zebra/zebra_000.jpg")
    finally:
        monkeypatch.undo()
        os.close(fd)


def test_folders_nested_too_deep_are_recorded_and_keep_their_images(small_folder,
                                                                    empty_store, monkeypatch):
    deep = small_folder / "zebra" / "a" / "b"
    deep.mkdir(parents=True)
    (small_folder / "zebra" / "zebra_000.jpg").rename(deep / "deep.jpg")
    sync_image_folder(empty_store, small_folder, progress=False)
    assert "zebra/a/b/deep.jpg" in paths(empty_store)
    monkeypatch.setattr(sync_module, "MAX_DEPTH", 2)
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["removed"] == 0 and "zebra/a/b/deep.jpg" in paths(empty_store)
    reasons = {p: r for p, _, r, _ in empty_store.image_error_rows()}
    assert reasons == {"zebra/a/b": "more than 2 folders deep: not listed"}


def test_a_file_over_the_size_limit_is_recorded(small_folder, empty_store, monkeypatch):
    monkeypatch.setattr(sync_module, "MAX_FILE_BYTES", 1000)
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["unreadable"] == 12 and counts["added"] == 0
    assert all("larger than the limit" in r for _, _, r, _ in empty_store.image_error_rows())


def test_another_folder_needs_replace(synced, texture_folder):
    folder, store = synced
    with pytest.raises(ValueError, match="mirrors .*pass replace"):
        sync_image_folder(store, texture_folder, progress=False)
    assert len(paths(store)) == 12
    counts = sync_image_folder(store, texture_folder, replace=True, progress=False)
    assert counts["removed"] == 0 and counts["changed"] == 0  # same relative paths kept
    assert len(paths(store)) == len(list(texture_folder.glob("*/*.*")))


def test_a_one_image_category_is_left_out_and_the_run_goes_on(small_folder, empty_store):
    (small_folder / "tiny").mkdir()
    (small_folder / "tiny" / "only.jpg").write_bytes(
        (small_folder / "zebra" / "zebra_003.jpg").read_bytes()[:-1] + b"\xd9")
    results = run_image_similarity(empty_store, small_folder, max_query_imgs_per_subdir=2,
                                   max_neg_imgs_per_query_img=4, top_k_candidates=3,
                                   progress=False)
    left_out = results["prepare_data"]["left_out"]
    assert [x["category"] for x in left_out] == ["tiny"]
    assert results["train_classifier"]["classes"] == ["argyle", "dotted", "zebra"]


def test_a_pipe_or_other_special_file_is_recorded_not_opened(small_folder, empty_store):
    os.mkfifo(small_folder / "zebra" / "pipe.jpg")
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["refused"] == 1 and counts["added"] == 12
    reasons = {p: r for p, _, r, _ in empty_store.image_error_rows()}
    assert reasons["zebra/pipe.jpg"] == "not a regular file (a pipe, device or socket)"
