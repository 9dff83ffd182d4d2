"""Results you can trust: lineage, concurrent runs, interrupted and killed steps, the
command line's errors, copies and label conflicts in the report."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest
from psycopg import errors
from sqlalchemy import func, select

from conftest import SERVER_VENV, fresh_database, one
from imgsim import (ParameterError, evaluate_model, featurize_images, open_store, prepare_data,
                    rank_candidates, run_image_similarity, sync_image_folder, train_classifier,
                    write_report)
from imgsim.cli import main
from imgsim.lineage import StaleInputs
from imgsim.rank import top_k_cosine
from imgsim.store import tables as t
from imgsim.store.base import Busy
from imgsim.store.sqlalchemy_store import SQLAlchemyStore
from imgsim.train import fit, make_classifier

SMALL = {"max_query_imgs_per_subdir": 3, "max_neg_imgs_per_query_img": 10}


def cli(*args, **kw):
    """The command in a child process that answers Ctrl-C (SIGINT) even when the tests
    run in the background, where a shell starts them with it ignored."""
    return subprocess.Popen([sys.executable, "-m", "imgsim.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kw)


def until(condition, timeout=60.0):
    """Poll ``condition`` (another process's progress) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def rows(store, table, where=None):
    query = select(func.count()).select_from(table)
    return store._fetch(query if where is None else query.where(where))[0][0]


# -- lineage ---------------------------------------------------------------------------
def test_a_classifier_from_an_earlier_split_is_refused_not_evaluated(pipeline_store, tmp_path):
    runs = rows(pipeline_store, t.runs)
    prepare_data(pipeline_store, seed=7, **SMALL)
    for step in (evaluate_model, rank_candidates):
        with pytest.raises(StaleInputs, match="run train again"):
            step(pipeline_store)
    # the prepare, and each refusal kept as a failed run saying why (the scheduled job's trace)
    assert rows(pipeline_store, t.runs) == runs + 3
    failed = rows(pipeline_store, t.runs, (t.runs.c.status == "failed")
                  & t.runs.c.error.like("%run train again%"))
    assert failed >= 2
    html = write_report(pipeline_store, tmp_path / "stale.html").read_text()
    assert "was trained on the split of prepare run" in html and "Ranking accuracy" not in html
    evaluate_model(pipeline_store, space="features")  # raw features do not depend on it
    trained = train_classifier(pipeline_store, seed=7)
    metrics = evaluate_model(pipeline_store)
    counts = pipeline_store.last_run("evaluate_model")[2]
    split = pipeline_store.last_run("prepare_data")
    assert trained["prepare_run"] == split[0] == counts["prepare_run"]
    assert counts["model"] == trained["model"] and metrics
    html = write_report(pipeline_store, tmp_path / "fresh.html").read_text()
    assert f"prepare run {split[0]} (seed 7" in html
    assert "Ranking accuracy (classifier scores" in html


def test_the_command_line_says_which_step_to_run_again(pipeline_db, tmp_path, capsys):
    db = tmp_path / "cli.db"
    shutil.copy(pipeline_db[0], db)
    url = f"sqlite:///{db}"
    assert main(["--db", url, "prepare", "--seed", "7", "--max-query-imgs-per-subdir", "3"]) == 0
    capsys.readouterr()
    assert main(["--db", url, "evaluate"]) == 2
    assert "run train again" in capsys.readouterr().err


def test_evaluation_pairs_that_lost_an_image_are_refused(small_folder, empty_store):
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    prepare_data(empty_store, **SMALL)
    train_classifier(empty_store)
    query = empty_store.evaluation_pairs()[0][0]
    path = {i: p for i, p, _, _ in empty_store.image_info()}[query]
    (small_folder / path).unlink()
    sync_image_folder(empty_store, small_folder, progress=False)
    with pytest.raises(StaleInputs, match="run prepare again"):
        evaluate_model(empty_store)


def test_copies_and_label_conflicts_are_counted_and_reported(small_folder, empty_store,
                                                             tmp_path):
    zebra = (small_folder / "zebra" / "zebra_000.jpg").read_bytes()
    (small_folder / "zebra" / "again.jpg").write_bytes(zebra)  # a copy
    (small_folder / "dotted" / "stray.jpg").write_bytes(zebra)  # and a conflict
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    counts = prepare_data(empty_store, **SMALL)
    assert (counts["copies"], counts["conflicts"], counts["conflict_images"]) == (2, 1, 3)
    train, test = empty_store.split()
    ids = {p: i for i, p, _, _ in empty_store.image_info()}
    conflicting = {ids["zebra/zebra_000.jpg"], ids["zebra/again.jpg"], ids["dotted/stray.jpg"]}
    assert not conflicting & (set(train) | set(test))
    train_classifier(empty_store)
    html = write_report(empty_store, tmp_path / "r.html").read_text()
    assert "label conflicts (one content under two categories): 1, 3 images, left out" in html


# -- concurrent runs ---------------------------------------------------------------------
def test_a_step_while_another_holds_the_database_fails_at_once_and_writes_nothing(
        pipeline_db, tmp_path):
    db = tmp_path / "busy.db"
    shutil.copy(pipeline_db[0], db)
    holder = open_store(f"sqlite:///{db}")
    before = rows(holder, t.runs)
    with holder.lock():
        for args in (["prepare", "--seed", "3"], ["train"], ["featurize"]):
            done = cli("--db", f"sqlite:///{db}", "--quiet", *args)
            out, err = done.communicate(timeout=120)
            assert done.returncode == 2 and err.startswith("imgsim: error: imgsim is busy")
            assert "Traceback" not in err
        assert rows(holder, t.runs) == before
        reader = open_store(f"sqlite:///{db}")
        evaluate_model(reader, ks=[1])  # evaluate and rank need no lock: they only add rows
        with pytest.raises(Busy):
            prepare_data(reader, seed=4)
        reader.close()
    holder.close()


def test_an_evaluation_whose_inputs_change_while_it_reads_them_keeps_nothing(
        pipeline_store, monkeypatch):
    import imgsim.evaluate

    real = imgsim.evaluate.space_vectors

    def prepare_meanwhile(store, space, key):  # another process's prepare commits
        prepare_data(store, seed=11, **SMALL)
        return real(store, space, key)

    monkeypatch.setattr(imgsim.evaluate, "space_vectors", prepare_meanwhile)
    metrics = rows(pipeline_store, t.ranking_metrics)
    with pytest.raises(StaleInputs, match="changed while the evaluation read them"):
        evaluate_model(pipeline_store)
    assert rows(pipeline_store, t.ranking_metrics) == metrics
    assert pipeline_store.run_rows("evaluate_model", limit=1)[0][2] == "failed"


def test_ranking_in_many_small_blocks_gives_the_same_rows(pipeline_store, monkeypatch):
    from imgsim import settings

    whole = pipeline_store.ranking_rows(rank_candidates(pipeline_store, 5)["run_id"])
    monkeypatch.setattr(settings.Budget, "ranking_block", lambda self, n, size=8: 3)
    blocks = pipeline_store.ranking_rows(rank_candidates(pipeline_store, 5)["run_id"])
    assert [row[:3] for row in blocks] == [row[:3] for row in whole]
    # the matrix products of other shapes round the last bits of float32 otherwise
    assert [row[3] for row in blocks] == pytest.approx([row[3] for row in whole], abs=1e-6)


def test_two_runs_at_once_never_mix(pipeline_db, tmp_path):
    db = tmp_path / "race.db"
    shutil.copy(pipeline_db[0], db)
    url = f"sqlite:///{db}"
    common = ["--max-query-imgs-per-subdir", "3", "--max-neg-imgs-per-query-img", "10"]
    runs = [cli("--db", url, "--quiet", "run", "--seed", str(seed), "--report",
                str(tmp_path / f"r{seed}.html"), *common) for seed in (7, 8)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert any(code == 0 for code, _ in outcomes)
    assert all(code == 0 or "imgsim is busy" in err for code, err in outcomes)
    store = open_store(url)
    c = t.runs.c
    recorded = store._fetch(select(c.step, c.started_by, c.counts).where(c.id > 6)
                            .order_by(c.id))  # after the fixture's own six steps
    by = [r[1] for r in recorded]
    assert sum(a != b for a, b in zip(by, by[1:])) <= 1, by  # each run's steps in one piece
    models = [r[2]["model"] for r in recorded if r[0] == "train_classifier"]
    assert len(models) == len(set(models)) >= 1
    evaluation = store.last_run("evaluate_model")[2]
    assert evaluation["train_run"] == store.last_run("train_classifier")[0]
    store.close()


@pytest.fixture(scope="module")
def trust_db(pg_dsn, server_folder):
    from imgsim.deploy import deploy

    dsn = fresh_database(pg_dsn, "imgsim_trust")
    deploy(dsn, server_venv=SERVER_VENV, log=lambda *a: None)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CALL imgsim.sync_image_folder(%s)", (str(server_folder),))
    return dsn


def test_in_the_database_the_loser_of_a_race_fails_at_once_naming_the_winner(trust_db):
    holder = SQLAlchemyStore(trust_db)
    with holder.lock():
        before = one(trust_db, "SELECT count(*) FROM imgsim.runs")
        with pytest.raises(errors.LockNotAvailable, match=r"imgsim is busy: \S+@\S+ \(pid \d+\)"):
            with psycopg.connect(trust_db, autocommit=True) as conn:
                conn.execute("CALL imgsim.featurize_images()")
        assert one(trust_db, "SELECT count(*) FROM imgsim.runs") == before
    holder.close()
    failures = []

    def featurize():
        try:
            with psycopg.connect(trust_db, autocommit=True) as conn:
                conn.execute("CALL imgsim.featurize_images(batch_size => 8)")
        except psycopg.Error as exc:
            failures.append(exc)

    threads = [threading.Thread(target=featurize) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) <= 1
    assert all(isinstance(f, errors.LockNotAvailable) and "imgsim is busy" in str(f)
               for f in failures)  # never a unique violation after doing all the work
    done = one(trust_db, "SELECT sum((counts->>'featurized')::int + (counts->>'reused')::int) "
                         "FROM imgsim.runs WHERE step = 'featurize_images'")[0]
    assert 2 * done == one(trust_db, "SELECT count(*) FROM imgsim.features")[0]  # colour layouts


# -- interrupted and killed steps --------------------------------------------------------
def test_a_cancelled_featurize_in_the_database_keeps_its_batches_and_answers_at_once(trust_db):
    with psycopg.connect(trust_db, autocommit=True) as conn:
        conn.execute("DELETE FROM imgsim.features")
    outcome = {}

    def featurize():
        with psycopg.connect(trust_db, autocommit=True) as conn:
            outcome["pid"] = conn.info.backend_pid
            try:
                conn.execute("CALL imgsim.featurize_images(batch_size => 2)")
            except psycopg.Error as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

    thread = threading.Thread(target=featurize)
    thread.start()
    until(lambda: one(trust_db, "SELECT count(*) FROM imgsim.features")[0] >= 4)
    with psycopg.connect(trust_db, autocommit=True) as conn:  # meanwhile: busy, naming it
        with pytest.raises(errors.LockNotAvailable,
                           match=r"busy: run \d+ \(featurize_images, started .* by postgres"):
            conn.execute("CALL imgsim.prepare_data()")
    cancelled = time.monotonic()
    one(trust_db, "SELECT pg_cancel_backend(%s)", (outcome["pid"],))
    thread.join()
    assert isinstance(outcome["error"], errors.QueryCanceled)
    assert outcome["at"] - cancelled < 2.0
    rows_kept = one(trust_db, "SELECT count(*) FROM imgsim.features")[0]
    kept = rows_kept // 2  # images: their features and colour layout, in one batch
    status, error, counts = one(trust_db, "SELECT status, error, counts FROM imgsim.runs "
                                          "WHERE step = 'featurize_images' ORDER BY id DESC "
                                          "LIMIT 1")
    assert rows_kept >= 4 and status == "interrupted" and "canceling" in error
    assert 2 * (counts["featurized"] + counts["reused"]) == rows_kept  # the record matches
    known_bad = one(trust_db, "SELECT count(*) FROM imgsim.image_errors WHERE step = "
                              "'featurize_images'")[0]  # recorded, not retried
    with psycopg.connect(trust_db, autocommit=True) as conn:
        conn.execute("CALL imgsim.featurize_images()")
        counts = conn.execute("SELECT counts FROM imgsim.runs WHERE step = 'featurize_images' "
                              "ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert counts["pending"] + kept + known_bad == one(
        trust_db, "SELECT count(*) FROM imgsim.images")[0]


def test_a_killed_step_is_marked_abandoned_and_its_batches_kept(small_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    store = open_store(url)
    sync_image_folder(store, small_folder, progress=False)
    step = cli("--db", url, "--quiet", "featurize", "--batch-size", "1")
    until(lambda: rows(store, t.features) >= 2)
    step.send_signal(signal.SIGKILL)
    step.wait()
    killed = store.last_run("featurize_images", status="running")
    assert killed is not None
    kept = rows(store, t.features) // 2  # images: features and colour layout, in one batch
    again = featurize_images(store, progress=False)
    assert again["pending"] == 12 - kept
    assert store._fetch(select(t.runs.c.status).where(t.runs.c.id == killed[0]))[0][0] == \
        "abandoned"
    store.close()


def test_ctrl_c_stops_with_one_line_and_exit_130(texture_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'int.db'}"
    store = open_store(url)
    sync_image_folder(store, texture_folder, progress=False)  # enough not to finish first
    step = cli("--db", url, "--quiet", "featurize", "--batch-size", "1")
    until(lambda: rows(store, t.features) >= 2)
    step.send_signal(signal.SIGINT)
    out, err = step.communicate(timeout=60)
    assert step.returncode == 130
    assert err.strip() == "imgsim: interrupted (finished batches were kept)"
    assert store.last_run("featurize_images", status="interrupted") is not None
    store.close()


@pytest.mark.parametrize("url, says", [
    ("notaurl", "is not a database URL"),
    ("sqlite:///no/such/dir/x.db", "the folder no/such/dir does not exist"),
])
def test_a_bad_database_url_is_one_line(url, says):
    done = subprocess.run([sys.executable, "-m", "imgsim.cli", "--db", url, "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_mlp_answers_between_epochs_and_ctrl_c_is_not_a_finished_model():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)).astype(np.float32), np.array(["a", "b"] * 30)
    epochs = []
    fit(make_classifier("mlp", 0), x, y, lambda: epochs.append(1))
    assert len(epochs) > 1
    assert len(epochs) == make_classifier("mlp", 0).fit(x, y).steps[-1][1].n_iter_

    def stop_at_three():
        epochs.append(1)
        if len(epochs) >= 3:
            raise KeyboardInterrupt  # what Ctrl-C raises; scikit-learn would swallow it

    epochs.clear()
    with pytest.raises(KeyboardInterrupt):
        fit(make_classifier("mlp", 0), x, y, stop_at_three)
    assert len(epochs) == 3


def test_ranking_answers_between_blocks_of_queries():
    calls = []
    queries = np.eye(5, dtype=np.float32)
    top_k_cosine(queries, queries, 2, block=2, between_blocks=lambda: calls.append(1))
    assert len(calls) == 3


# -- found by a data scientist trying to get wrong numbers out of it --------------------
DIE_AT_SUCCESS = """
import os, sys
import imgsim.runs
from imgsim import open_store, prepare_data

def die(self, **counts):  # the process is killed after the split is written
    os._exit(9)

imgsim.runs.Run.succeed = die
prepare_data(open_store(sys.argv[1]), seed=7, max_query_imgs_per_subdir=3,
             max_neg_imgs_per_query_img=10)
"""


def test_a_prepare_killed_before_it_succeeded_leaves_the_split_it_found(pipeline_db, tmp_path):
    db = tmp_path / "killed.db"
    shutil.copy(pipeline_db[0], db)
    store = open_store(f"sqlite:///{db}")
    before, metrics = store.split(), store.metric_rows(store.last_run("evaluate_model")[0])
    done = subprocess.run([sys.executable, "-c", DIE_AT_SUCCESS, f"sqlite:///{db}"])
    assert done.returncode == 9
    assert store.split() == before  # the split and its success commit together
    evaluate_model(store, ks=[1, 2, 4, 5, 8, 10, 15, 20, 28, 32])
    assert store.metric_rows(store.last_run("evaluate_model")[0]) == metrics
    store.replace_split(*before[::-1])  # a split the runs do not account for
    with pytest.raises(StaleInputs, match="no longer hold the split of prepare run"):
        evaluate_model(store)
    store.close()


def test_train_refuses_features_that_do_not_cover_the_split(pipeline_store):
    key = pipeline_store.last_run("prepare_data")[1]["feature_key"]
    test_id = pipeline_store.split()[1][0]
    pipeline_store._write(t.features.delete().where(t.features.c.image_id == test_id,
                                                    t.features.c.backbone == key))
    with pytest.raises(StaleInputs, match="1 images of the split have no features"):
        train_classifier(pipeline_store)


def test_prepare_refuses_images_not_featurized_and_names_categories_that_failed(
        small_folder, empty_store):
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    (small_folder / "zebra" / "late.jpg").write_bytes(
        (small_folder / "argyle" / "argyle_000.jpg").read_bytes()[::-1])  # new, not an image
    (small_folder / "broken").mkdir()
    for n in range(3):
        (small_folder / "broken" / f"b{n}.jpg").write_bytes(b"not an image %d" % n)
    sync_image_folder(empty_store, small_folder, progress=False)
    with pytest.raises(StaleInputs, match="4 images have no features .* run featurize first"):
        prepare_data(empty_store, **SMALL)
    featurize_images(empty_store, progress=False)
    left_out = prepare_data(empty_store, **SMALL)["left_out"]
    assert left_out == [{"category": "broken", "images": 3,
                         "reason": "none of its images could be decoded (see image_errors)"}]


def test_the_report_shows_nothing_of_a_split_sync_has_since_changed(synced_run, tmp_path):
    folder, store = synced_run
    for file in (folder / "dotted").iterdir():
        file.unlink()
    (folder / "dotted").rmdir()
    sync_image_folder(store, folder, progress=False)
    html = write_report(store, tmp_path / "r.html").read_text()
    assert "no longer hold the split of prepare run" in html
    assert "Ranking accuracy" not in html and "Classifier</h2>" not in html


def test_the_report_shows_the_classifiers_own_evaluation_not_another_backbones(synced_run,
                                                                               tmp_path):
    folder, store = synced_run
    featurize_images(store, backbone="mobilenet_v2", progress=False)
    evaluate_model(store, space="features", backbone="mobilenet_v2")
    html = write_report(store, tmp_path / "r.html").read_text()
    assert "Ranking accuracy (classifier scores" in html and "mobilenet_v2" not in html


@pytest.fixture
def synced_run(small_folder, empty_store):
    run_image_similarity(empty_store, small_folder, top_k_candidates=3, progress=False, **SMALL)
    return small_folder, empty_store


def test_a_database_named_through_a_link_has_the_same_lock(pipeline_db, tmp_path):
    db = tmp_path / "real.db"
    shutil.copy(pipeline_db[0], db)
    (tmp_path / "link.db").symlink_to(db)
    holder, other = open_store(f"sqlite:///{db}"), open_store(f"sqlite:///{tmp_path / 'link.db'}")
    with holder.lock():
        with pytest.raises(Busy):
            prepare_data(other, seed=3)
    holder.close()
    other.close()


def test_numbers_of_any_integer_type_are_recorded_as_integers(pipeline_store):
    prepare_data(pipeline_store, seed=np.int64(7), max_query_imgs_per_subdir=np.int32(3))
    run = pipeline_store.last_run("prepare_data")
    assert run[3] == 7 and type(run[3]) is int
    assert train_classifier(pipeline_store, seed=np.int64(7))["test_accuracy"] > 0.5
    with pytest.raises(ParameterError, match="seed must be <= 2147483647"):
        prepare_data(pipeline_store, seed=2**31)


def test_a_chart_that_cannot_be_written_is_refused_before_any_step(empty_store, small_folder):
    with pytest.raises(ParameterError, match="chart_path"):
        run_image_similarity(empty_store, small_folder, chart_path="/no/such/dir/c.png")
    assert rows(empty_store, t.runs) == 0


def test_an_interrupted_first_sync_still_guards_its_folder(small_folder, texture_folder,
                                                           empty_store, monkeypatch):
    import imgsim.sync

    reads = []
    real = imgsim.sync._read

    def interrupted_read(path, *args):
        reads.append(path)
        if len(reads) == 5:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(imgsim.sync, "STRETCH_FILES", 2)
    monkeypatch.setattr(imgsim.sync, "_read", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        sync_image_folder(empty_store, small_folder, progress=False)
    monkeypatch.setattr(imgsim.sync, "_read", real)
    with pytest.raises(ValueError, match="pass replace"):
        sync_image_folder(empty_store, texture_folder, progress=False)


def test_a_copy_of_an_image_that_failed_is_listed_as_not_used(pipeline_store, texture_folder,
                                                              tmp_path):
    bad = pipeline_store._fetch(select(t.images.c.id, t.images.c.path, t.images.c.sha256)
                                .where(t.images.c.path == "striped/truncated.jpg"))[0]
    pipeline_store.add_image("zebra/copy_of_truncated.jpg", "zebra", bad[2], b"same bytes")
    featurize_images(pipeline_store, progress=False)
    paths = [p for p, _, _, _ in pipeline_store.image_error_rows()]
    assert "zebra/copy_of_truncated.jpg" in paths


# -- found by a second data scientist ----------------------------------------------------
def test_a_folder_that_cannot_be_listed_keeps_its_images(synced_run, tmp_path):
    folder, store = synced_run
    os.chmod(folder / "zebra", 0)
    try:  # as root, but without the power to read anything: setpriv drops it
        done = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
             sys.executable, "-m", "imgsim.cli", "--db", store.url.replace("+pysqlite", ""),
             "--quiet", "sync", str(folder)], capture_output=True, text=True)
    finally:
        os.chmod(folder / "zebra", 0o755)
    assert done.returncode == 0, done.stderr
    counts = store.last_run("sync_image_folder")[2]
    assert counts["removed"] == 0 and len([p for _, p, _, _ in store.image_info()
                                           if p.startswith("zebra/")]) == 4
    reasons = {p: r for p, _, r, _ in store.image_error_rows()}
    assert reasons["zebra"].startswith("cannot list the folder")


def test_an_evaluation_in_progress_is_never_seen_running_nor_marked_abandoned(
        synced_run, monkeypatch):
    import imgsim.evaluate

    folder, store = synced_run
    seen = {}
    real = imgsim.evaluate.space_vectors

    def meanwhile(s, space, key):  # another process's step takes the database now
        other = open_store(store.url)
        featurize_images(other, progress=False)
        seen["running"] = other.running_runs()
        other.close()
        return real(s, space, key)

    monkeypatch.setattr(imgsim.evaluate, "space_vectors", meanwhile)
    evaluate_model(store)
    assert seen["running"] == []
    assert store.run_rows("evaluate_model", limit=1)[0][2] == "succeeded"


def test_a_sync_that_did_not_finish_stops_prepare(synced_run, monkeypatch):
    import imgsim.sync

    folder, store = synced_run
    (folder / "zebra" / "new.jpg").write_bytes((folder / "zebra" / "zebra_000.jpg").read_bytes())

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgsim.sync, "_read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sync_image_folder(store, folder, progress=False)
    with pytest.raises(StaleInputs, match="did not finish .*run sync again"):
        prepare_data(store, **SMALL)


def test_query_images_removed_since_they_were_chosen_stop_rank(synced_run):
    from imgsim.rank import set_query_images

    from imgsim.train import score_images

    folder, store = synced_run
    new = folder / "zebra" / "new.jpg"  # an image outside the split, scored, chosen
    new.write_bytes((folder / "argyle" / "argyle_002.jpg").read_bytes()[:-2] + b"\xff\xd9")
    sync_image_folder(store, folder, progress=False)
    featurize_images(store, progress=False)
    score_images(store)
    set_query_images(store, [{p: i for i, p, _, _ in store.image_info()}["zebra/new.jpg"]])
    assert rank_candidates(store, 3)["queries"] == 1
    new.unlink()
    sync_image_folder(store, folder, progress=False)
    with pytest.raises(StaleInputs, match="1 of the 1 query images chosen by run"):
        rank_candidates(store)


def test_a_ranking_that_lost_images_is_not_shown_as_current(synced_run, tmp_path):
    from imgsim.train import score_images

    folder, store = synced_run
    copy = folder / "zebra" / "copy.jpg"  # outside the split, the nearest of a query's
    query = store.split()[1][0]
    path = {i: p for i, p, _, _ in store.image_info()}[query]
    copy.write_bytes((folder / path).read_bytes())
    sync_image_folder(store, folder, progress=False)
    featurize_images(store, progress=False)
    score_images(store)
    rank_candidates(store, 3)
    copy.unlink()
    sync_image_folder(store, folder, progress=False)
    html = write_report(store, tmp_path / "r.html").read_text()
    assert "were removed since (images removed by sync" in html


def test_the_report_is_written_again_when_a_step_changes_what_it_shows(synced_run, tmp_path,
                                                                      monkeypatch):
    import imgsim.report

    folder, store = synced_run
    real, calls = imgsim.report._confusion_html, []

    def prepare_meanwhile(s):
        calls.append(1)
        if len(calls) == 1:  # a prepare lands while the first copy is written
            prepare_data(open_store(store.url), seed=9, **SMALL)
        return real(s)

    monkeypatch.setattr(imgsim.report, "_confusion_html", prepare_meanwhile)
    html = write_report(store, tmp_path / "r.html").read_text()
    assert len(calls) == 1 and "Confusion matrix" not in html  # the second copy: stale
    assert "was trained on the split of prepare run" in html


def test_files_the_listing_used_to_skip_are_recorded(small_folder, empty_store):
    jpeg = (small_folder / "zebra" / "zebra_000.jpg").read_bytes()
    (small_folder / "loose.jpg").write_bytes(jpeg)
    (small_folder / "zebra" / "phone.jfif").write_bytes(jpeg)
    (small_folder / "zebra" / "notes.txt").write_text("not an image")
    (small_folder / "zebra" / "inner").symlink_to(small_folder / "argyle")
    counts = sync_image_folder(empty_store, small_folder, progress=False)
    assert counts["added"] == 13 and counts["ignored"] == 1 and counts["refused"] == 2
    reasons = {p: r for p, _, r, _ in empty_store.image_error_rows()}
    assert reasons == {"loose.jpg": "not in a category folder",
                       "zebra/inner": "a symbolic link (not followed)"}


def test_copies_in_one_batch_are_inferred_once(small_folder, empty_store):
    jpeg = (small_folder / "argyle" / "argyle_000.jpg").read_bytes()
    for n in range(3):  # in the first batch, beside their original
        (small_folder / "argyle" / f"argyle_000_copy{n}.jpg").write_bytes(jpeg)
    sync_image_folder(empty_store, small_folder, progress=False)
    counts = featurize_images(empty_store, progress=False)
    assert (counts["featurized"], counts["reused"]) == (12, 3)


def test_messages_name_the_step_that_is_missing(empty_store, pipeline_store, tmp_path):
    with pytest.raises(StaleInputs, match="no images: run sync first"):
        prepare_data(empty_store)
    with pytest.raises(ParameterError, match="sample_queries"):
        write_report(pipeline_store, tmp_path / "r.html", sample_queries=-1)
    runs = rows(pipeline_store, t.runs)
    with pytest.raises(ValueError, match="cannot be read"):
        rank_candidates(pipeline_store, query_table="no_such_table")
    assert rows(pipeline_store, t.runs) == runs


def test_members_of_the_admin_role_work_from_a_client_and_analysts_read(trust_db, tmp_path):
    from conftest import as_role

    with psycopg.connect(trust_db, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS dana")
        conn.execute("CREATE ROLE dana LOGIN IN ROLE imgsim_admin")
        conn.execute("DROP ROLE IF EXISTS reed")
        conn.execute("CREATE ROLE reed LOGIN IN ROLE imgsim_analyst")
        conn.execute("CALL imgsim.featurize_images()")
    assert main(["--db", as_role(trust_db, "dana"), "--quiet", "prepare",
                 "--max-query-imgs-per-subdir", "3", "--max-neg-imgs-per-query-img", "10"]) == 0
    assert main(["--db", as_role(trust_db, "dana"), "--quiet", "train"]) == 0
    assert main(["--db", as_role(trust_db, "reed"), "report", "--out",
                 str(tmp_path / "r.html")]) == 0
    assert main(["--db", as_role(trust_db, "reed"), "run", "--compute", "in-db",
                 "--max-query-imgs-per-subdir", "3", "--max-neg-imgs-per-query-img", "10",
                 "--report", str(tmp_path / "in.html"), "--chart", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_the_lock_of_a_client_outlives_the_servers_idle_timeout(trust_db):
    with psycopg.connect(trust_db, autocommit=True) as conn:
        conn.execute("ALTER ROLE postgres SET idle_session_timeout = '300ms'")
    try:
        holder = SQLAlchemyStore(trust_db)
        with holder.lock():
            deadline = time.monotonic() + 1.0  # the server would end idle sessions by now
            while time.monotonic() < deadline:
                pass
            other = SQLAlchemyStore(trust_db)
            with pytest.raises(Busy):
                prepare_data(other)
            other.close()
        holder.close()
    finally:
        with psycopg.connect(trust_db, autocommit=True) as conn:
            conn.execute("ALTER ROLE postgres RESET idle_session_timeout")


def test_a_refused_rank_in_the_refresh_leaves_the_scores_it_kept(trust_db):
    with psycopg.connect(trust_db, autocommit=True) as conn:
        conn.execute("CALL imgsim.featurize_images()")
        conn.execute("CALL imgsim.prepare_data(max_query_imgs_per_subdir => 3, "
                     "max_neg_imgs_per_query_img => 10)")
        conn.execute("CALL imgsim.train_classifier(kind => 'logistic')")
        conn.execute("CALL imgsim.prepare_data(seed => 8, max_query_imgs_per_subdir => 3, "
                     "max_neg_imgs_per_query_img => 10)")
        before = conn.execute("SELECT max(id) FROM imgsim.runs").fetchone()[0]
        with pytest.raises(errors.ObjectNotInPrerequisiteState, match="run train again"):
            conn.execute("CALL imgsim.refresh()")
        steps = conn.execute("SELECT step, status FROM imgsim.runs WHERE id > %s ORDER BY id",
                             (before,)).fetchall()
    assert steps == [("featurize_images", "succeeded"), ("score_images", "succeeded"),
                     ("rank_candidates", "failed")]


# -- a data scientist's third round -------------------------------------------------------
def test_an_image_refused_for_memory_is_tried_again_once_the_setting_allows_it(small_folder,
                                                                              empty_store):
    from PIL import Image

    Image.new("RGB", (4000, 3000), (90, 120, 30)).save(small_folder / "zebra" / "big.png")
    sync_image_folder(empty_store, small_folder, progress=False)
    empty_store.put_setting("max_backend_memory_mb", 256)  # 9 MB for decoding: too little
    first = featurize_images(empty_store, progress=False)
    reasons = {p: r for p, _, r, _ in empty_store.image_error_rows() if p.endswith("big.png")}
    assert first["failed"] >= 1 and "memory setting allows" in reasons["zebra/big.png"]
    prepare_data(empty_store, **SMALL)  # not waiting for it: listed as not used for now
    empty_store.put_setting("max_backend_memory_mb", 1024)
    second = featurize_images(empty_store, progress=False)
    assert second["featurized"] == 1
    assert not [p for p, *_ in empty_store.image_error_rows() if p.endswith("big.png")]
    third = featurize_images(empty_store, progress=False)  # a bad file is not tried again
    assert third["featurized"] == 0


def test_backbone_and_weights_are_refused_where_they_choose_nothing(pipeline_store):
    runs = rows(pipeline_store, t.runs)
    for step in (evaluate_model, rank_candidates):
        with pytest.raises(ParameterError, match="compared in space 'features'"):
            step(pipeline_store, backbone="resnet18")
    assert rows(pipeline_store, t.runs) == runs


def test_weights_that_do_not_exist_stop_the_pipeline_before_any_step(empty_store, small_folder,
                                                                      tmp_path):
    with pytest.raises(FileNotFoundError):
        run_image_similarity(empty_store, small_folder, backbone="resnet18",
                             weights=tmp_path / "missing.pth", progress=False)
    assert rows(empty_store, t.runs) == 0 and rows(empty_store, t.images) == 0


def test_a_folder_recorded_relative_by_an_earlier_version_does_not_block_sync(synced_run):
    folder, store = synced_run
    with store.transaction():
        store._write(t.runs.update().where(t.runs.c.step == "sync_image_folder")
                     .values(parameters={"folder": "images", "replace": False}))
    assert sync_image_folder(store, folder, progress=False)["removed"] == 0


def test_similar_to_an_image_that_could_not_be_decoded_says_why(pipeline_store):
    from imgsim.images import ImageError
    from imgsim.rank import similar_to

    e = t.image_errors.c
    bad = [i for i, in pipeline_store._fetch(select(e.image_id).where(
        e.step == "featurize_images", e.image_id.is_not(None)))]
    assert bad
    with pytest.raises(ImageError, match=f"image {bad[0]} could not be used"):
        similar_to(pipeline_store, bad[0])


def test_a_step_that_lost_its_lease_keeps_nothing_of_its_last_part(trust_db):
    store = SQLAlchemyStore(trust_db)
    try:
        with store.lock():
            pid = store._lock[0].execute(select(func.pg_backend_pid())).scalar()
            with psycopg.connect(trust_db, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(Busy, match="lost its hold"):
                with store.transaction():
                    store.put_setting("max_backend_memory_mb", 999)
            assert store.setting_values().get("max_backend_memory_mb") != 999
    finally:
        store.close()


def test_prepare_when_no_image_could_be_decoded_points_at_the_errors(tmp_path, empty_store):
    for category in ("a", "b"):
        (tmp_path / "bad" / category).mkdir(parents=True)
        (tmp_path / "bad" / category / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    sync_image_folder(empty_store, tmp_path / "bad", progress=False)
    assert featurize_images(empty_store, progress=False)["failed"] == 2
    with pytest.raises(ValueError, match="no image could be decoded: see image_errors"):
        prepare_data(empty_store)
    with pytest.raises(ValueError, match="no image could be decoded"):  # with any backbone
        prepare_data(empty_store, backbone="mobilenet_v2")


def test_prepare_names_the_backbone_to_featurize(pipeline_store):
    with pytest.raises(ValueError, match="run featurize --backbone mobilenet_v2 first"):
        prepare_data(pipeline_store, backbone="mobilenet_v2")


def test_images_added_since_scoring_are_counted_until_refresh(pipeline_store, texture_folder,
                                                              tmp_path, capsys):
    """New images have no scores, so no ranking or search can find them: rank counts them,
    the results page says so, similar_to names the command, and refresh scores them."""
    import hashlib

    from imgsim import report
    from imgsim.rank import rank_candidates as rank, similar_to

    data = (texture_folder / "zebra" / "zebra_001.jpg").read_bytes()[:-2] + b"\xff\xd9"
    pipeline_store.add_image("zebra/added.jpg", "zebra", hashlib.sha256(data).hexdigest(), data)
    featurize_images(pipeline_store, progress=False)
    added = next(i for i, p, _, _ in pipeline_store.image_info() if p == "zebra/added.jpg")
    assert pipeline_store.unscored_count() == 1
    assert rank(pipeline_store, 3)["images_without_scores"] == 1
    with pytest.raises(StaleInputs, match=r"run imgsim refresh \(CALL imgsim.refresh\(\)\)"):
        similar_to(pipeline_store, added)
    html = report.write_report(pipeline_store, tmp_path / "r.html").read_text()
    assert "1 image without scores" in html
    assert main(["--db", pipeline_store.url, "--quiet", "refresh"]) == 0
    assert '"rank_candidates"' in capsys.readouterr().out
    assert pipeline_store.unscored_count() == 0 and similar_to(pipeline_store, added, k=1)
    assert "without scores" not in report.write_report(pipeline_store,
                                                       tmp_path / "r.html").read_text()


def test_a_padded_copy_filed_under_another_category_is_a_label_conflict(small_folder,
                                                                        empty_store):
    """One byte appended changes the file's sha256, not its pixels: the copy is still the
    same content, left out as a label conflict rather than trained on as another label."""
    from imgsim.sync import sync_image_folder

    zebra = sorted((small_folder / "zebra").glob("*.jpg"))[0]
    (small_folder / "argyle" / "twin.jpg").write_bytes(zebra.read_bytes() + b"x")
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    counts = prepare_data(empty_store, max_query_imgs_per_subdir=1,
                          max_neg_imgs_per_query_img=2)
    assert (counts["conflicts"], counts["conflict_images"]) == (1, 2)
    twin = next(i for i, p, _, _ in empty_store.image_info() if p == "argyle/twin.jpg")
    train, test = empty_store.split()
    assert twin not in train + test
