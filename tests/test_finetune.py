"""Fine-tuning: the tuned backbone is trained on training images only, stored as a
backbone graph, used by every later step, on SQLite and inside PostgreSQL."""

import numpy as np
import psycopg
import pytest
from sqlalchemy import select

from conftest import SERVER_VENV
from imgsim import evaluate_model, featurize_images, open_store, train_classifier
from imgsim.checks import ParameterError
from imgsim.cli import main
from imgsim.featurize import Featurizer, feature_key
from imgsim.finetune import fine_tune_backbone, validation_split
from imgsim.rank import similar_images
from imgsim.store import tables
from imgsim.store.base import from_blobs

BASE = feature_key("efficientnet_lite0")


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory, pipeline_db):
    """A copy of the pipeline database with a classifier on a fine-tuned backbone."""
    import shutil

    path = tmp_path_factory.mktemp("tuned") / "tuned.db"
    shutil.copy(pipeline_db[0], path)
    store = open_store(f"sqlite:///{path}")
    result = train_classifier(store, seed=1, fine_tune=True, epochs=2, validation=0)
    store.close()
    return path, result


@pytest.fixture
def tuned_store(tuned_db):
    store = open_store(f"sqlite:///{tuned_db[0]}")
    yield store
    store.close()


def test_the_tuned_backbone_is_stored_and_the_classifier_trained_on_its_features(
        tuned_db, tuned_store):
    result = tuned_db[1]
    key = result["feature_key"]
    assert key.startswith("efficientnet_lite0-288-tuned@") and result["model"].endswith(f"@{key}")
    graph, meta = tuned_store.load_model(key)
    train_ids, test_ids = tuned_store.split()
    assert meta["tuned_from"] == BASE and meta["train_images"] == len(train_ids)
    assert meta["epochs"] == 2 and meta["backbone"] == "efficientnet_lite0"
    assert result["fine_tune"]["kept"] == "tuned" and meta["validation_images"] == 0
    base_ids, _, base = tuned_store.feature_matrix(BASE)
    ids, _, tuned = tuned_store.feature_matrix(key)
    assert ids.tolist() == base_ids.tolist()  # every good image, test images too
    assert tuned.shape == base.shape and not np.allclose(tuned, base, atol=1e-3)
    # the stored features are what the stored graph computes
    first = tuned_store.image_data([int(ids[0])])[int(ids[0])]
    assert np.allclose(Featurizer(graph).embed(first), tuned[0], atol=1e-4)
    scores = tuned_store.score_matrix()
    assert len(scores[0]) == len(ids) and result["test_accuracy"] is not None


def test_fine_tuning_reads_training_images_only(pipeline_store):
    train_ids, test_ids = pipeline_store.split()
    read = []
    real = pipeline_store.image_data

    def spy(ids):
        read.extend(ids)
        return real(ids)

    pipeline_store.image_data = spy
    info = {i: c for i, _, c, _ in pipeline_store.image_info(train_ids)}
    models = _backbones(pipeline_store)
    tuning = fine_tune_backbone(pipeline_store, train_ids, [info[i] for i in train_ids],
                                epochs=1, seed=2, progress=False)
    assert sorted(read) == sorted(train_ids) and not set(read) & set(test_ids)
    held_out = set(tuning.validation_ids)
    assert held_out and not held_out & set(tuning.fit_ids)
    assert sorted(held_out | set(tuning.fit_ids)) == sorted(train_ids)
    assert tuning.metadata["train_images"] == len(tuning.fit_ids)
    assert tuning.fit_features.shape == (len(tuning.fit_ids), 1280)
    assert tuning.validation_features.shape == (len(held_out), 1280)
    assert _backbones(pipeline_store) == models  # nothing stored: train decides


def test_the_validation_split_holds_out_part_of_every_category():
    labels = np.array([0] * 20 + [1] * 3 + [2])
    fit, held_out = validation_split(labels, 0.1, np.random.default_rng(0))
    assert sorted(fit + held_out) == list(range(len(labels)))
    assert sorted(labels[held_out].tolist()) == [0, 0, 1]  # a tenth, at least one, never all
    assert validation_split(labels, 0.0, np.random.default_rng(0))[1] == []
    assert validation_split(labels, 0.5, np.random.default_rng(0))[1] != held_out


def test_the_tuned_backbone_is_kept_only_when_it_beats_the_frozen_one(pipeline_store):
    models = _backbones(pipeline_store)
    result = train_classifier(pipeline_store, seed=3, fine_tune=True, epochs=3)
    tuned = result["fine_tune"]
    assert tuned["validation_images"] > 0 and 1 <= tuned["best_epoch"] <= tuned["epochs_run"]
    assert tuned["epochs_run"] <= 3 and len(tuned["validation_history"]) == tuned["epochs_run"]
    accuracy = tuned["validation_accuracy"]
    if accuracy["tuned"] > accuracy["frozen"]:
        assert tuned["kept"] == "tuned" and result["feature_key"] != BASE
        assert _backbones(pipeline_store) == models | {result["feature_key"]}
    else:
        assert tuned["kept"] == "frozen" and result["feature_key"] == BASE
        assert _backbones(pipeline_store) == models
    run = pipeline_store.last_run("train_classifier")
    assert run[2]["fine_tune"] == tuned and run[1]["validation"] == 0.1


def test_a_time_budget_too_short_for_an_epoch_keeps_the_frozen_backbone(pipeline_store):
    models = _backbones(pipeline_store)
    result = train_classifier(pipeline_store, seed=3, fine_tune=True, tune_minutes=0.005)
    assert result["fine_tune"]["kept"] == "frozen"
    assert "time budget" in result["fine_tune"]["reason"]
    assert result["feature_key"] == BASE and _backbones(pipeline_store) == models
    assert result["test_accuracy"] is not None and result["scored"] > 0


def _backbones(store) -> set:
    c = tables.models.c
    return {r[0] for r in store._fetch(select(c.name).where(c.kind == "backbone"))}


def test_later_steps_use_the_tuned_features(tuned_db, tuned_store):
    key = tuned_db[1]["feature_key"]
    evaluate_model(tuned_store, ks=[1, 5], space="features")
    assert tuned_store.last_run("evaluate_model")[1]["feature_key"] == key
    image_id = tuned_store.feature_matrix(key)[0][3]
    image = tuned_store.image_data([int(image_id)])[int(image_id)]
    for space in ("scores", "features"):
        rows = similar_images(tuned_store, image, k=3, space=space)
        assert int(image_id) in [r[0] for r in rows] and rows[0][3] < 1e-4


def test_bad_fine_tune_parameters_are_refused_before_anything_changes(pipeline_store):
    runs = len(pipeline_store.run_rows())
    for epochs in (0, 1000, "3"):
        with pytest.raises(ParameterError, match="epochs"):
            train_classifier(pipeline_store, fine_tune=True, epochs=epochs)
    for validation in (-0.1, 0.6, "0.1", float("nan"), True):
        with pytest.raises(ParameterError, match="validation"):
            train_classifier(pipeline_store, fine_tune=True, validation=validation)
    for minutes in (0, -1, float("inf"), "5"):
        with pytest.raises(ParameterError, match="tune_minutes"):
            train_classifier(pipeline_store, fine_tune=True, tune_minutes=minutes)
    with pytest.raises(ParameterError, match="not a backbone graph"):
        featurize_images(pipeline_store, model="mlp@nothing")
    assert len(pipeline_store.run_rows()) == runs


def test_fine_tune_from_the_command_line(pipeline_db, tmp_path, capsys):
    import shutil

    db = tmp_path / "cli.db"
    shutil.copy(pipeline_db[0], db)
    assert main(["--db", f"sqlite:///{db}", "--quiet", "train", "--fine-tune",
                 "--epochs", "1", "--validation", "0", "--kind", "logistic"]) == 0
    assert '"feature_key": "efficientnet_lite0-288-tuned@' in capsys.readouterr().out
    assert main(["--db", f"sqlite:///{db}", "run", "--compute", "in-db", "--fine-tune"]) == 2
    assert "--compute local" in capsys.readouterr().err
    assert main(["--db", f"sqlite:///{db}", "train", "--fine-tune", "--tune-minutes", "0"]) == 2
    assert "tune_minutes must be above 0" in capsys.readouterr().err


def test_a_client_fine_tuned_backbone_serves_the_database(pg_dsn, server_folder):
    """Tuned from a client; the server's featurize (refresh) and similar_images use it."""
    from imgsim.deploy import deploy

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS imgsim_tuned")
        conn.execute("CREATE DATABASE imgsim_tuned")
    dsn = pg_dsn.rsplit("/", 1)[0] + "/imgsim_tuned"
    deploy(dsn, server_venv=SERVER_VENV, log=lambda *a: None)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CALL imgsim.sync_image_folder(%s)", (str(server_folder),))
        conn.execute("CALL imgsim.featurize_images()")
        conn.execute("CALL imgsim.prepare_data(max_query_imgs_per_subdir => 4, "
                     "max_neg_imgs_per_query_img => 10, seed => 4)")
    store = open_store(dsn)
    key = train_classifier(store, seed=4, fine_tune=True, epochs=1, validation=0)["feature_key"]
    ids, _, client = store.feature_matrix(key)
    store.close()
    dropped = [int(i) for i in ids[:5]]
    image = (server_folder / "zebra" / "zebra_002.jpg").read_bytes()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM imgsim.features WHERE backbone = %s AND image_id = ANY(%s)",
                     (key, dropped))
        conn.execute("CALL imgsim.refresh()")
        rows = conn.execute("SELECT image_id, vector FROM imgsim.features WHERE backbone = %s"
                            " AND image_id = ANY(%s) ORDER BY image_id", (key, dropped)).fetchall()
        assert [r[0] for r in rows] == dropped
        assert np.allclose(from_blobs([r[1] for r in rows]), client[:5], atol=1e-4)
        for space in ("scores", "features"):
            found = conn.execute("SELECT path, distance FROM imgsim.similar_images(%s, 3, %s)",
                                 (image, space)).fetchall()
            assert found[0][0] == "zebra/zebra_002.jpg" and found[0][1] < 1e-4
        evaluated = conn.execute("SELECT count(*) FROM imgsim.evaluate_model(ARRAY[1], "
                                 "'features')").fetchone()
        assert evaluated == (2,)
        assert conn.execute("SELECT parameters->>'feature_key' FROM imgsim.runs WHERE step = "
                            "'evaluate_model' ORDER BY id DESC LIMIT 1").fetchone() == (key,)
