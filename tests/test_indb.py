"""imgsim inside a real PostgreSQL 15: deploy, procedures via psql and ODBC, compute
contexts, roles, injection attempts, bad images, the pg_cron job, undeploy."""

import time

import numpy as np
import psycopg
import pyodbc
import pytest
from psycopg.conninfo import conninfo_to_dict

from conftest import BAD_FILES, PER_CATEGORY, as_role, one, psql
from imgsim import evaluate_model, prepare_data, rank_candidates, train_classifier
from imgsim.deploy import deploy, undeploy
from imgsim.featurize import feature_key
from imgsim.pipeline import run_in_database
from imgsim.store import SQLAlchemyStore

SMALL = {"max_query_imgs_per_subdir": 5, "max_neg_imgs_per_query_img": 20}
N_IMAGES = 11 * PER_CATEGORY + 4 + len(BAD_FILES)


def odbc(dsn):
    info = conninfo_to_dict(dsn)
    return pyodbc.connect(
        f"DRIVER={{PostgreSQL Unicode}};SERVER={info['host']};PORT={info['port']};"
        f"DATABASE={info['dbname']};UID={info['user']};", autocommit=True)


@pytest.fixture(scope="module")
def indb(deployed, server_folder):
    """The whole pipeline run in the database, step by step, from psql."""
    dsn = deployed[0]
    psql(dsn, """
        CALL imgsim.sync_image_folder(:'folder');
        CALL imgsim.featurize_images();
        CALL imgsim.prepare_data(max_query_imgs_per_subdir => 5,
                                 max_neg_imgs_per_query_img => 20, seed => 3);
        CALL imgsim.train_classifier(seed => 3);
        CALL imgsim.rank_candidates(top_k_candidates => 4);
    """, folder=server_folder)
    return dsn


def test_deploy_creates_schema_routines_roles_and_the_backbone(deployed):
    dsn, report = deployed
    routines = {r for r in psql(dsn, "SELECT proname FROM pg_proc WHERE pronamespace = "
                                     "'imgsim'::regnamespace").split()}
    assert routines == {"sync_image_folder", "featurize_images", "prepare_data",
                        "train_classifier", "evaluate_model", "rank_candidates",
                        "set_query_images", "run_image_similarity", "similar_images", "similar_to",
                        "current_results", "refresh", "_step"}
    owners = psql(dsn, "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc "
                       "WHERE pronamespace = 'imgsim'::regnamespace").split()
    assert owners == ["imgsim_admin"]
    definers = psql(dsn, "SELECT proname || '|' || array_to_string(proconfig, ',') FROM pg_proc "
                         "WHERE pronamespace = 'imgsim'::regnamespace AND prosecdef").splitlines()
    assert definers == ["_step|search_path=pg_catalog, imgsim, pg_temp,client_min_messages=notice,"
                        "debug_print_parse=off,debug_print_rewritten=off,debug_print_plan=off,"
                        "trace_sort=off"]
    bodies = psql(dsn, "SELECT count(*) FROM pg_proc WHERE pronamespace = "
                       "'imgsim'::regnamespace AND prosrc LIKE :'site'",
                  site=f"%SITE, BUILD = '{report['server_site']}', '{report['build']}'%")
    assert int(bodies) == len(routines)
    assert one(dsn, "SELECT count(*) FROM imgsim.models WHERE kind = 'backbone'")[0] == 1
    assert report["pgvector"] is True


def test_every_step_runs_in_the_database(indb):
    counts = psql(indb, "SELECT step || '=' || status FROM imgsim.runs ORDER BY id").split()
    assert counts == ["sync_image_folder=succeeded", "featurize_images=succeeded",
                      "prepare_data=succeeded", "train_classifier=succeeded",
                      "rank_candidates=succeeded"]
    assert one(indb, "SELECT count(*) FROM imgsim.images")[0] == N_IMAGES
    assert one(indb, "SELECT count(*) FROM imgsim.scores")[0] == N_IMAGES - len(BAD_FILES)
    accuracy = one(indb, "SELECT (counts->>'test_accuracy')::float FROM imgsim.runs "
                         "WHERE step = 'train_classifier' ORDER BY id DESC LIMIT 1")[0]
    assert accuracy > 0.6


def test_bad_images_inside_the_server_land_in_image_errors(indb):
    errors = dict(psycopg.connect(indb).execute(
        "SELECT path, reason FROM imgsim.image_errors WHERE step = 'featurize_images'").fetchall())
    assert set(errors) == set(BAD_FILES)
    assert all(reason in errors[path] for path, reason in BAD_FILES.items())


def test_evaluate_model_returns_its_metrics_as_a_result_set(indb):
    rows = psql(indb, "SELECT distance, k, round(accuracy::numeric, 4) "
                      "FROM imgsim.evaluate_model(ks => ARRAY[1, 5], space => 'scores') "
                      "ORDER BY 1, 2").split()
    assert [r.split("|")[:2] for r in rows] == [["cosine", "1"], ["cosine", "5"],
                                                ["l2", "1"], ["l2", "5"]]
    assert all(float(r.split("|")[2]) > 0.5 for r in rows)
    stored = one(indb, "SELECT count(*) FROM imgsim.ranking_metrics WHERE run_id = "
                       "(SELECT max(id) FROM imgsim.runs WHERE step = 'evaluate_model')")[0]
    assert stored == 4
    copies = psql(indb, "SELECT measure, distance, k, accuracy FROM imgsim.evaluate_model("
                        "ks => ARRAY[1], copies => true) ORDER BY 1, 2").split()
    assert [r.split("|")[:3] for r in copies] == [["copy", "cosine", "1"],  # combined: no L2
                                                  ["template", "cosine", "1"]]
    assert 0 < float(copies[0].split("|")[3]) <= 1


def test_current_results_name_the_runs_to_join_on(indb):
    psql(indb, "CALL imgsim.rank_candidates(top_k_candidates => 2)")
    current = dict((r.split("|")[0], r.split("|")[1]) for r in psql(
        indb, "SELECT part, run_id FROM imgsim.current_results()").split())
    assert list(current) == ["split", "classifier", "evaluation", "ranking"]
    assert int(current["ranking"]) == one(indb, "SELECT max(run_id) FROM imgsim.ranking_results")[0]
    psql(indb, "CALL imgsim.train_classifier(seed => 5)")  # a new classifier: no ranking yet
    rows = one(indb, "SELECT run_id, note FROM imgsim.current_results() WHERE part = 'ranking'")
    assert rows == (None, "no current ranking: run rank")
    assert one(indb, "SELECT max(run_id) FROM imgsim.ranking_results")[0] is not None  # old


def test_similar_images_finds_the_image_itself_first(indb, server_folder):
    path = server_folder / "zebra" / "zebra_003.jpg"
    out = psql(indb, "SELECT path, category, distance FROM "
                     "imgsim.similar_images(pg_read_binary_file(:'img'), 5)", img=path)
    rows = [r.split("|") for r in out.split()]
    assert len(rows) == 5
    assert rows[0][1] == "zebra" and float(rows[0][2]) < 1e-4
    assert sum(r[1] == "zebra" for r in rows) >= 3


@pytest.fixture(scope="module")
def standby(indb, pg_cluster):
    """A streaming replica of the test server (pg_basebackup, another loopback port)."""
    if pg_cluster is None:
        pytest.skip("IMGSIM_TEST_DSN names a server of which the tests cannot make a standby")
    replica = pg_cluster.standby()
    yield indb.replace(f":{pg_cluster.port}/", f":{replica.port}/")
    replica.stop()


def replayed(primary, replica) -> None:
    """Wait until the replica has replayed everything the primary wrote until now."""
    lsn = one(primary, "SELECT pg_catalog.pg_current_wal_lsn()")[0]
    for _ in range(600):
        if one(replica, "SELECT pg_catalog.pg_last_wal_replay_lsn() >= %s", (lsn,))[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the standby did not replay up to {lsn}")


def test_an_analyst_queries_and_reads_rankings_on_a_streaming_replica(indb, standby,
                                                                      server_folder):
    psql(indb, "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rita') "
               "THEN CREATE ROLE rita LOGIN IN ROLE imgsim_analyst; END IF; END $$;")
    psql(as_role(indb, "rita"), "CALL imgsim.rank_candidates(top_k_candidates => 3)")
    replayed(indb, standby)  # what was written after the standby was made: streamed
    image = (server_folder / "zebra" / "zebra_003.jpg").read_bytes()
    stored = one(indb, "SELECT id FROM imgsim.images WHERE path = 'dotted/dotted_002.jpg'")[0]
    queries = [
        ("SELECT path, category, distance FROM imgsim.similar_images(%s, 5)", (image,)),
        ("SELECT path, category, distance FROM imgsim.similar_to(%s, 5)", (stored,)),
        ("SELECT r.query_id, r.rank, r.candidate_id, r.distance FROM imgsim.ranking_results r "
         "JOIN imgsim.current_results() c ON c.part = 'ranking' AND c.run_id = r.run_id "
         "ORDER BY 1, 2", ()),
    ]
    for query, params in queries:
        with psycopg.connect(as_role(standby, "rita")) as conn:
            assert conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()[0]
            got = conn.execute(query, params).fetchall()
        with psycopg.connect(as_role(indb, "rita")) as conn:
            expected = conn.execute(query, params).fetchall()
        assert got and [r[:-1] for r in got] == [r[:-1] for r in expected]
        np.testing.assert_allclose([r[-1] for r in got], [r[-1] for r in expected],
                                   atol=1e-6)
    assert {rank for _, rank, _, _ in got} == {1, 2, 3}  # the ranking made after the copy
    with pytest.raises(psycopg.Error, match="read-only"):  # a step writes: the primary's job
        one(as_role(standby, "rita"), "CALL imgsim.rank_candidates()")


def test_similar_images_refuses_a_non_image_with_a_clear_error(indb):
    with pytest.raises(psycopg.Error, match="not an image"):
        one(indb, "SELECT * FROM imgsim.similar_images(%s, 3)", (b"no pixels here",))


def test_local_and_in_db_compute_give_the_same_results(indb):
    store = SQLAlchemyStore(indb)
    prepare_data(store, seed=11, **SMALL)
    split_local = store.split()
    train_local = train_classifier(store, seed=11)
    metrics_local = evaluate_model(store, ks=[1, 2, 5])
    ranked = rank_candidates(store, top_k_candidates=5)
    ranking_local = store.ranking_rows(ranked["run_id"])

    psql(indb, """
        CALL imgsim.prepare_data(max_query_imgs_per_subdir => 5,
                                 max_neg_imgs_per_query_img => 20, seed => 11);
        CALL imgsim.train_classifier(seed => 11);
        SELECT count(*) FROM imgsim.evaluate_model(ks => ARRAY[1, 2, 5]);
        CALL imgsim.rank_candidates(top_k_candidates => 5);
    """)
    assert store.split() == split_local
    train_db = store.last_run("train_classifier")[2]
    assert train_db["test_accuracy"] == pytest.approx(train_local["test_accuracy"], abs=0.02)
    metrics_db = store.metric_rows(store.last_run("evaluate_model")[0])
    local = {(m["distance"], m["k"]): m["accuracy"] for m in metrics_local}
    for distance, k, accuracy, _, _ in metrics_db:
        assert accuracy == pytest.approx(local[distance, k], abs=0.02)
    ranking_db = store.ranking_rows(store.last_run("rank_candidates")[0])
    same = np.mean([a[2] == b[2] for a, b in zip(ranking_local, ranking_db)])
    assert len(ranking_db) == len(ranking_local) and same >= 0.95
    store.close()


def test_in_db_features_match_client_features(indb, tmp_path, server_folder):
    from imgsim import featurize_images, open_store, sync_image_folder

    local = open_store(f"sqlite:///{tmp_path / 'local.db'}")
    sync_image_folder(local, server_folder, progress=False)
    featurize_images(local, progress=False)
    key = feature_key("efficientnet_lite0")
    ids_l, cats_l, x_l = local.feature_matrix(key)
    server = SQLAlchemyStore(indb)
    ids_s, cats_s, x_s = server.feature_matrix(key)
    by_path_local = dict(zip([p for _, p, _, _ in local.image_info(ids_l)], x_l))
    by_path_server = dict(zip([p for _, p, _, _ in server.image_info(ids_s)], x_s))
    assert by_path_local.keys() == by_path_server.keys()
    diff = max(np.abs(by_path_local[p] - by_path_server[p]).max() for p in by_path_local)
    assert diff < 1e-3
    local.close()
    server.close()


def test_the_compute_context_switch_runs_the_pipeline_in_the_database(indb):
    before = one(indb, "SELECT max(id) FROM imgsim.runs")[0]
    run_in_database(indb, seed=5, ks=[1, 10], **SMALL)
    steps = psql(indb, "SELECT step FROM imgsim.runs WHERE id > :before ORDER BY id",
                 before=before).split()
    assert steps == ["featurize_images", "prepare_data", "train_classifier", "evaluate_model",
                     "rank_candidates"]


def test_run_image_similarity_and_refresh_from_psql(indb, server_folder):
    before = one(indb, "SELECT max(id) FROM imgsim.runs")[0]
    psql(indb, """
        CALL imgsim.run_image_similarity(image_folder => :'folder', seed => 9,
                                         max_query_imgs_per_subdir => 5,
                                         max_neg_imgs_per_query_img => 20);
        CALL imgsim.refresh(top_k_candidates => 2);
    """, folder=server_folder)
    steps = psql(indb, "SELECT step || '=' || status FROM imgsim.runs WHERE id > :before "
                       "ORDER BY id", before=before).split()
    assert [s.split("=")[0] for s in steps] == [
        "sync_image_folder", "featurize_images", "prepare_data", "train_classifier",
        "evaluate_model", "rank_candidates", "featurize_images", "score_images",
        "rank_candidates"]
    assert all(s.endswith("=succeeded") for s in steps)


def test_every_procedure_runs_through_odbc(indb, server_folder):
    with odbc(indb) as conn:
        cursor = conn.cursor()
        cursor.execute("CALL imgsim.sync_image_folder(?)", str(server_folder))
        cursor.execute("CALL imgsim.featurize_images(batch_size => ?)", 16)
        cursor.execute("CALL imgsim.prepare_data(max_query_imgs_per_subdir => ?, "
                       "max_neg_imgs_per_query_img => ?, seed => ?)", 5, 20, 4)
        cursor.execute("CALL imgsim.train_classifier(kind => ?, seed => ?)", "logistic", 4)
        rows = cursor.execute("SELECT distance, k, accuracy FROM imgsim.evaluate_model("
                              "ks => ARRAY[1, 32], space => ?)", "scores").fetchall()
        assert sorted((r.distance, r.k) for r in rows) == [("cosine", 1), ("cosine", 32),
                                                          ("l2", 1), ("l2", 32)]
        cursor.execute("CALL imgsim.rank_candidates(top_k_candidates => ?)", 2)
        image = (server_folder / "tartan" / "tartan_002.jpg").read_bytes()
        similar = cursor.execute("SELECT category FROM imgsim.similar_images(?, 1)",
                                 pyodbc.Binary(image)).fetchall()
        assert similar[0].category == "tartan"
        cursor.execute("CALL imgsim.run_image_similarity(max_query_imgs_per_subdir => ?, "
                       "max_neg_imgs_per_query_img => ?, seed => ?)", 5, 20, 6)
        cursor.execute("CALL imgsim.refresh()")
        last = cursor.execute("SELECT step, status FROM imgsim.runs ORDER BY id DESC "
                              "LIMIT 1").fetchone()
        assert tuple(last) == ("rank_candidates", "succeeded")


def test_bad_parameters_and_injection_are_refused_before_anything_changes(indb):
    before = one(indb, "SELECT count(*) FROM imgsim.testing_images")[0]
    for call in ["CALL imgsim.prepare_data(ratio_train_test => 1.5)",
                 "CALL imgsim.featurize_images(backbone => 'vgg16')",
                 "CALL imgsim.rank_candidates(top_k_candidates => -1)"]:
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            one(indb, call)
    attack = "query_images; DROP TABLE imgsim.images; --"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="plain identifier"):
        one(indb, "CALL imgsim.rank_candidates(query_table => %s)", (attack,))
    with pytest.raises(psycopg.Error, match="cannot be read"):
        one(indb, "CALL imgsim.rank_candidates(query_table => %s)", ("no_such_table",))
    assert one(indb, "SELECT count(*) FROM imgsim.images")[0] == N_IMAGES
    assert one(indb, "SELECT count(*) FROM imgsim.testing_images")[0] == before


def test_a_failed_step_is_recorded_and_keeps_earlier_results(indb):
    before = psql(indb, "SELECT image_id FROM imgsim.testing_images ORDER BY 1")
    with pytest.raises(psycopg.errors.DataException, match="no image has features"):
        one(indb, "CALL imgsim.prepare_data(backbone => 'mobilenet_v2')")
    assert psql(indb, "SELECT image_id FROM imgsim.testing_images ORDER BY 1") == before
    status, error = one(indb, "SELECT status, error FROM imgsim.runs ORDER BY id DESC LIMIT 1")
    assert status == "failed" and "no image has features" in error


def test_analyst_runs_procedures_and_reads_but_cannot_change_code_models_or_settings(indb):
    with psycopg.connect(indb, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS ann")
        conn.execute("CREATE ROLE ann LOGIN IN ROLE imgsim_analyst")
    analyst = indb.replace("postgresql://postgres@", "postgresql://ann@")
    with psycopg.connect(analyst, autocommit=True) as conn:
        conn.execute("SET imgsim.site = '/tmp/elsewhere'")  # a session setting changes nothing
        conn.execute("CALL imgsim.rank_candidates(top_k_candidates => 3)")
        assert conn.execute("SELECT count(*) FROM imgsim.scores").fetchone()[0] > 0
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # choosing queries is
        refused = [  # allowed, through the routine
            "DELETE FROM imgsim.query_images",
            "INSERT INTO imgsim.query_images VALUES (1)",
            "INSERT INTO imgsim.models VALUES ('x', 'classifier', 'onnx', '\\x00', '{}', now())",
            "UPDATE imgsim.models SET data = '\\x00'",
            "DELETE FROM imgsim.scores",
            "ALTER PROCEDURE imgsim.featurize_images SET imgsim.site = '/tmp/elsewhere'",
            "CREATE OR REPLACE PROCEDURE imgsim.refresh() LANGUAGE sql AS 'SELECT 1'",
            "CREATE TABLE imgsim.mine (x int)",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_redeploy_upgrades_in_place_keeping_data_and_undeploy_removes_it_all(pg_dsn):
    from conftest import SERVER_VENV

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS imgsim_redeploy")
        conn.execute("CREATE DATABASE imgsim_redeploy")
    dsn = pg_dsn.rsplit("/", 1)[0] + "/imgsim_redeploy"
    quiet = {"server_venv": SERVER_VENV, "log": lambda *a: None}
    deploy(dsn, admin_role="shop_admin", analyst_role="shop_analyst", **quiet)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO imgsim.images (path, category, sha256, size_bytes, data, "
                     "added) VALUES ('a/x.jpg', 'a', 'ff', 1, '\\x00', now())")
    deploy(dsn, admin_role="shop_admin", analyst_role="shop_analyst", **quiet)
    assert one(dsn, "SELECT path FROM imgsim.images") == ("a/x.jpg",)
    undeploy(dsn)
    assert one(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'imgsim'") == (0,)
    assert one(dsn, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'shop_%%'") == (0,)


def test_stored_feature_rankings_are_exact_and_the_index_serves_queries(indb):
    from imgsim.rank import top_k_cosine

    psql(indb, "CALL imgsim.rank_candidates(top_k_candidates => 5, space => 'features')")
    store = SQLAlchemyStore(indb)
    run_id, params, counts, _ = store.last_run("rank_candidates")
    assert counts["search"] == "exact"  # the same on a client and in the server
    ids, _, matrix = store.feature_matrix(params["feature_key"])
    queries = store.query_ids()
    row_of = {i: n for n, i in enumerate(ids.tolist())}
    index, distance = top_k_cosine(matrix[[row_of[q] for q in queries]], matrix, 5,
                                   np.array(queries), ids)
    rows = store.ranking_rows(run_id)
    assert [r[2] for r in rows] == [int(ids[i]) for row in index for i in row]
    assert np.allclose([r[3] for r in rows], distance.ravel(), atol=1e-4)
    with psycopg.connect(indb) as conn:  # the query shape can use the index (a tiny table
        conn.execute("SET enable_seqscan = off")  # may still be scanned when that is cheaper)
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT image_id FROM imgsim.features WHERE vector_dims(embedding) = 1280 "
            "ORDER BY embedding::vector(1280) <=> (SELECT embedding FROM imgsim.features "
            "LIMIT 1)::vector(1280) LIMIT 5").fetchall())
    assert "features_embedding_1280" in plan
    store.close()


def test_combined_search_takes_near_copies_from_the_index(indb, monkeypatch):
    from conftest import check_combined_search

    store = SQLAlchemyStore(indb)
    assert store.has_vectors()
    check_combined_search(store, monkeypatch)
    store.close()


def test_similar_images_in_feature_space_through_the_index(indb, server_folder):
    image = (server_folder / "leopard" / "leopard_004.jpg").read_bytes()
    rows = psycopg.connect(indb).execute(
        "SELECT path, category, distance FROM imgsim.similar_images(%s, 3, 'features')",
        (image,)).fetchall()
    assert rows[0][0] == "leopard/leopard_004.jpg" and rows[0][2] < 1e-4
    with psycopg.connect(indb) as conn:  # more than pgvector's largest ef_search of 1000 / 2
        images = conn.execute("SELECT count(*) FROM imgsim.scores").fetchone()[0]
        for space in ("features", "combined"):
            rows = conn.execute("SELECT image_id FROM imgsim.similar_images(%s, 600, %s)",
                                (image, space)).fetchall()
            assert len(rows) == len(set(rows)) == images


def test_cli_runs_in_the_database_and_manages_the_job(indb, tmp_path, capsys):
    from imgsim.cli import main

    report = tmp_path / "indb.html"
    assert main(["--db", indb, "run", "--compute", "in-db", "--seed", "2",
                 "--max-query-imgs-per-subdir", "5", "--max-neg-imgs-per-query-img", "20",
                 "--report", str(report)]) == 0
    assert "cosine top-1" in capsys.readouterr().out and report.is_file()
    assert main(["schedule", "set", "0 3 * * *", "--dsn", indb]) == 0
    capsys.readouterr()
    assert main(["schedule", "list", "--dsn", indb]) == 0
    assert '"CALL imgsim.refresh()"' in capsys.readouterr().out
    assert main(["schedule", "drop", "--dsn", indb]) == 0
    assert main(["schedule", "set", "every day", "--dsn", indb]) == 2


def test_a_step_in_the_server_ends_without_warnings(indb):
    """Its lease is released once: no 'you don't own a lock' warning after every step."""
    notices = []
    with psycopg.connect(indb, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: notices.append(
            (notice.severity_nonlocalized, notice.message_primary)))
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # takes the lease
    assert [n for n in notices if n[0] == "WARNING"] == []


def test_every_routine_pins_its_search_path_and_leaves_the_callers(indb):
    configs = dict(r.split("|", 1) for r in psql(
        indb, "SELECT proname || '|' || coalesce(array_to_string(proconfig, ','), '') "
              "FROM pg_proc WHERE pronamespace = 'imgsim'::regnamespace AND prokind = 'f'")
        .splitlines())
    assert all(c.startswith("search_path=pg_catalog, imgsim, pg_temp") for c in configs.values())
    with psycopg.connect(indb, autocommit=True) as conn:  # procedures: each transaction
        conn.execute("SET search_path = public")
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
        assert conn.execute("SHOW search_path").fetchone()[0] == "public"
