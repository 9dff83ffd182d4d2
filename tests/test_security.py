"""A DBA can deploy imgsim safely: each attack an analyst could try on a deployed imgsim,
performed as a login role in imgsim_analyst on a real server, is refused with nothing
written; undeploy removes only what imgsim made."""

import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from psycopg import errors

from conftest import SERVER_VENV, as_role, fresh_database, one, psql
from imgsim import deploy as deploy_module
from imgsim import backbones, serverenv, settings
from imgsim.cli import main
from imgsim.deploy import deploy, drop_jobs, schedule_job, undeploy

QUIET = {"server_venv": SERVER_VENV, "log": lambda *a: None}
MEMORY_MB = 512


def counts(dsn):
    """Rows of every imgsim table: what an attack must leave as it was."""
    tables = ["runs", "images", "features", "models", "scores", "settings", "query_images",
              "ranking_results", "training_images"]
    with psycopg.connect(dsn) as conn:
        return {t: conn.execute(psycopg.sql.SQL("SELECT count(*) FROM imgsim.{}").format(
            psycopg.sql.Identifier(t))).fetchone()[0] for t in tables}


def readable_copy(source: Path, prefix: str) -> Path:
    """A copy of ``source`` that the server's OS user can read, in a new folder."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    shutil.copytree(source, base / "images")
    subprocess.run(["chmod", "-R", "o+rX", str(base)], check=True)
    return base


@pytest.fixture(scope="module")
def target(pg_dsn, server_folder):
    """imgsim deployed with one allowed folder and a memory setting, the pipeline run once
    by the DBA, and an analyst login, mallory."""
    allowed = readable_copy(server_folder, "imgsim-allowed-")
    dsn = fresh_database(pg_dsn, "imgsim_security")
    deploy(dsn, allow_folders=[allowed], max_backend_memory_mb=MEMORY_MB, **QUIET)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS mallory")
        conn.execute("CREATE ROLE mallory LOGIN IN ROLE imgsim_analyst")
    psql(dsn, """
        CALL imgsim.sync_image_folder(:'folder');
        CALL imgsim.featurize_images();
        CALL imgsim.prepare_data(max_query_imgs_per_subdir => 3, max_neg_imgs_per_query_img => 10);
        CALL imgsim.train_classifier();
    """, folder=allowed / "images")
    yield {"dsn": dsn, "analyst": as_role(dsn, "mallory"), "allowed": allowed}
    shutil.rmtree(allowed, ignore_errors=True)


def test_internal_routines_refuse_the_analyst_and_steps_take_only_their_parameters(
        target, tmp_path):
    before = counts(target["dsn"])
    chart = tmp_path / "chart.png"
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="_step is internal"):
            conn.execute("SELECT imgsim._step('0123456789abcdef', 'next')")
        for internal in ("_run('evaluate_model', '{}'::jsonb)",
                         "_record_failure('x', '{}'::jsonb, 'forged')"):
            with pytest.raises(errors.UndefinedFunction):
                conn.execute(f"SELECT imgsim.{internal}")
        with pytest.raises(errors.UndefinedFunction):
            conn.execute("SELECT * FROM imgsim.evaluate_model(chart_path => %s)", (str(chart),))
        with pytest.raises(errors.UndefinedFunction):
            conn.execute("CALL imgsim.featurize_images(model => 'x', progress => true)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO imgsim.runs (step, parameters, started, status) "
                         "VALUES ('train_classifier', '{}', now(), 'failed')")
    assert not chart.exists()
    assert counts(target["dsn"]) == before


def test_the_analyst_cannot_make_the_server_read_files_outside_the_allowed_folders(target):
    secret = Path(tempfile.mkdtemp(prefix="imgsim-secret-"))
    (secret / "cat").mkdir()
    (secret / "cat" / "secret.jpg").write_bytes(b"the postgres user's secret")
    subprocess.run(["chown", "-R", "postgres", str(secret)], check=True)
    os.chmod(secret / "cat" / "secret.jpg", 0o600)
    before = counts(target["dsn"])
    outside = [str(secret), "/usr/share", str(target["allowed"] / ".." / secret.name), "/"]
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            for folder in outside:
                with pytest.raises(errors.InsufficientPrivilege, match="not inside a folder"):
                    conn.execute("CALL imgsim.sync_image_folder(%s)", (folder,))
                with pytest.raises(errors.InsufficientPrivilege, match="not inside a folder"):
                    conn.execute("CALL imgsim.run_image_similarity(image_folder => %s)",
                                 (folder,))
            messages = []
            for weights in ("/etc/passwd", "/no/such/file"):  # existence is not told either
                with pytest.raises(errors.InsufficientPrivilege) as refused:
                    conn.execute("CALL imgsim.featurize_images(backbone => 'resnet18', "
                                 "weights => %s)", (weights,))
                messages.append(str(refused.value).replace(weights, "PATH"))
            assert messages[0] == messages[1]
        assert counts(target["dsn"]) == before
    finally:
        shutil.rmtree(secret, ignore_errors=True)


def test_links_in_an_allowed_folder_are_recorded_and_never_followed(target):
    images = target["allowed"] / "images"
    os.symlink("/etc/passwd", images / "zebra" / "passwd.jpg")
    os.symlink("/usr/share", images / "shared")
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            conn.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))
            stored = {r[0] for r in conn.execute("SELECT path FROM imgsim.images")}
            reasons = dict(conn.execute(
                "SELECT path, reason FROM imgsim.image_errors WHERE step = 'sync_image_folder'"))
            leaked = conn.execute("SELECT count(*) FROM imgsim.images WHERE "
                                  "position(%s::bytea in data) > 0", (b"root:x:0:0",))
        assert "zebra/passwd.jpg" not in stored and not any(p.startswith("shared") for p in stored)
        assert leaked.fetchone()[0] == 0
        assert reasons["zebra/passwd.jpg"] == reasons["shared"] == "a symbolic link (not followed)"
    finally:
        os.unlink(images / "zebra" / "passwd.jpg")
        os.unlink(images / "shared")


def test_a_path_through_a_link_is_refused_alike_wherever_it_leads(target):
    """Nothing below an allowed folder is resolved: a path with a link or '..' on the way
    is refused with the message a path outside gets, whether the link exists and wherever
    it leads, so an analyst cannot probe folders she may not list."""
    allowed = target["allowed"]
    os.symlink(allowed / "images", allowed / "back")  # leads inside
    os.symlink("/usr/share", allowed / "out")
    folders = [allowed / "back", allowed / "out", f"{allowed}/back/../images",
               f"{allowed}/missing/../images", f"{allowed}/out/../../{allowed.name}/images",
               "/no/such/folder"]
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            messages = set()
            for folder in folders:
                with pytest.raises(errors.InsufficientPrivilege, match="not inside") as refused:
                    conn.execute("CALL imgsim.sync_image_folder(%s)", (str(folder),))
                messages.add(str(refused.value).splitlines()[0].replace(repr(str(folder)), "P"))
            assert len(messages) == 1, messages
    finally:
        os.unlink(allowed / "back")
        os.unlink(allowed / "out")


def test_null_for_a_parameter_without_a_default_is_refused(target):
    before = counts(target["dsn"])
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        for statement in ("CALL imgsim.sync_image_folder(NULL)",
                          "CALL imgsim.set_query_images(NULL)",
                          "SELECT * FROM imgsim.similar_to(NULL)",
                          "SELECT * FROM imgsim.similar_images(NULL)"):
            with pytest.raises(errors.InvalidParameterValue, match="must not be NULL"):
                conn.execute(statement)
        with pytest.raises(errors.InvalidParameterValue, match="weights goes with backbone"):
            conn.execute("CALL imgsim.train_classifier(weights => '/etc/passwd')")
    assert counts(target["dsn"]) == before


def test_a_transaction_left_open_stops_a_redeploy_instead_of_stalling_every_reader(
        target, monkeypatch):
    """Reading holds a table until the transaction ends; a redeploy waiting for it would
    queue every new reader behind it. It gives up after LOCK_WAIT, naming the session."""
    monkeypatch.setattr(deploy_module, "LOCK_WAIT", "1s")
    with psycopg.connect(target["analyst"]) as reader:
        reader.execute("SELECT count(*) FROM imgsim.images")  # and the transaction stays open
        pid = reader.info.backend_pid
        with pytest.raises(RuntimeError, match="open transactions of other sessions") as stopped:
            deploy(target["dsn"], prepare_venv=False, **QUIET)
        assert f"pid {pid} (mallory" in str(stopped.value)
        with psycopg.connect(target["analyst"], autocommit=True) as other:
            other.execute("SET statement_timeout = '5s'")
            assert other.execute("SELECT count(*) FROM imgsim.images").fetchone()[0] > 0
        reader.rollback()
    deploy(target["dsn"], prepare_venv=False, **QUIET)  # nothing open: it goes through


def test_the_analyst_holds_no_table_and_writes_none(target):
    with psycopg.connect(target["analyst"]) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("LOCK imgsim.query_images IN ACCESS EXCLUSIVE MODE")
        conn.rollback()
        for statement in ("DELETE FROM imgsim.query_images", "UPDATE imgsim.settings SET "
                          "value = '[\"/\"]' WHERE name = 'allowed_folders'",
                          "INSERT INTO imgsim.settings VALUES ('allowed_folders', '[\"/\"]')"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        first = conn.execute("SELECT min(id) FROM imgsim.images").fetchone()[0]
        conn.execute("CALL imgsim.set_query_images(ARRAY[%s])", (first,))
        with pytest.raises(errors.InvalidParameterValue, match="not images"):
            conn.execute("CALL imgsim.set_query_images(ARRAY[999999])")
        assert conn.execute("SELECT image_id FROM imgsim.query_images").fetchall() == [(first,)]
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")


def test_a_step_sends_no_debug_messages_whatever_the_session_asks(target):
    """A session asking for every debug message (megabytes a step) and not reading them
    would stall the step while it holds the lease, locking everyone out."""
    notices = []
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        conn.add_notice_handler(lambda n: notices.append(
            len(n.message_primary or "") + len(n.message_detail or "")))
        for name in ("debug_print_parse", "debug_print_rewritten", "debug_print_plan"):
            conn.execute(psycopg.sql.SQL("SET {} = on").format(psycopg.sql.Identifier(name)))
        conn.execute("SET client_min_messages = debug5")
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # takes the lease
    assert sum(notices) < 50_000  # the caller's own statements' messages only


def test_an_analyst_running_a_step_from_the_client_is_told_how(target, capsys):
    before = counts(target["dsn"])
    assert main(["--db", target["analyst"], "--quiet", "prepare"]) == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and "imgsim run --compute in-db" in err
    assert len(err.strip().splitlines()) == 1 and counts(target["dsn"]) == before


SHADOWS = """
CREATE TABLE public.hijack_log (who text, what text);
GRANT INSERT ON public.hijack_log TO PUBLIC;
CREATE FUNCTION public.escalate(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.hijack_log VALUES (current_user, what);
  BEGIN
    EXECUTE 'ALTER ROLE mallory SUPERUSER';
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
  RETURN true;
END $$;
CREATE FUNCTION public.jsonb_build_object(VARIADIC text[]) RETURNS jsonb LANGUAGE sql
  AS $$ SELECT CASE WHEN public.escalate('jsonb_build_object') THEN '{}'::jsonb END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
  AS $$ SELECT CASE WHEN public.escalate('now') THEN pg_catalog.now() END $$;
CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE sql
  AS $$ SELECT CASE WHEN public.escalate('current_setting') THEN '' END $$;
CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text LANGUAGE sql
  AS $$ SELECT CASE WHEN public.escalate('set_config') THEN '' END $$;
CREATE FUNCTION public.pg_try_advisory_lock(integer, integer) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.escalate('pg_try_advisory_lock') $$;
CREATE FUNCTION public.pg_advisory_unlock(integer, integer) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.escalate('pg_advisory_unlock') $$;
CREATE FUNCTION public.pg_has_role(name, text, text) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.escalate('pg_has_role') $$;
CREATE FUNCTION public.int_eq(integer, integer) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.escalate('=') AND $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.int_eq);
CREATE FUNCTION public.text_eq(text, text) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.escalate('= text') AND $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.text_eq);
"""


@pytest.fixture
def writable_public(target):
    """A cluster upgraded from before PostgreSQL 15: everyone may create in public; the
    analyst has planted functions and operators named like the ones imgsim calls."""
    dsn = target["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        conn.execute(SHADOWS)
    yield dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP OWNED BY mallory")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute("ALTER ROLE mallory NOSUPERUSER")


def test_nothing_imgsim_runs_resolves_a_name_the_analyst_created(target, writable_public):
    image = next((target["allowed"] / "images" / "zebra").glob("*.jpg")).read_bytes()
    with psycopg.connect(writable_public, autocommit=True) as conn:  # the DBA, or a job
        conn.execute("SET search_path = public, pg_catalog")  # the planted names first
        conn.execute("CALL imgsim.refresh(top_k_candidates => 2)")
        conn.execute("SELECT * FROM imgsim.evaluate_model(ks => ARRAY[1])")
        conn.execute("SELECT * FROM imgsim.similar_images(%s, 2)", (image,))
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
        log = conn.execute("SELECT who, what FROM public.hijack_log").fetchall()
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'"
                                 ).fetchone()[0]
    assert log == [] and superuser is False


def test_memory_is_bounded_by_the_setting(target):
    budget = settings.Budget(MEMORY_MB)
    with psycopg.connect(target["dsn"], autocommit=True) as conn:
        conn.execute("DELETE FROM imgsim.features")
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("CALL imgsim.featurize_images(batch_size => 1024)")
        peak_kb = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                           if line.startswith("VmHWM")))
        run = conn.execute("SELECT counts FROM imgsim.runs WHERE step = 'featurize_images' "
                           "ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert run["batch_size"] == budget.images_at_once < 1024
    assert run["featurized"] > budget.images_at_once  # several batches
    assert peak_kb / 1024 < 2 * MEMORY_MB  # 1024 images at once would take ~30 GB


def _encoded(image, fmt):
    out = io.BytesIO()
    if fmt == "JPEG progressive":
        image.save(out, "JPEG", quality=85, progressive=True)
    else:
        image.save(out, fmt, **({"quality": 85} if fmt == "JPEG" else {"compress_level": 1}))
    return out.getvalue()


def test_a_huge_image_is_decoded_reduced_or_refused_within_the_setting(target):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (57, 70, 3), np.uint8)).resize((7000, 5700))
    jpeg, png = _encoded(big, "JPEG"), _encoded(big, "PNG")
    del big
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        rows = conn.execute("SELECT * FROM imgsim.similar_images(%s, 3)", (jpeg,)).fetchall()
        assert len(rows) == 3  # 39.9 MP JPEG: decoded at 1/8 scale
        with pytest.raises(errors.InvalidParameterValue, match="the memory setting allows"):
            conn.execute("SELECT * FROM imgsim.similar_images(%s, 3)", (png,))


def test_similar_images_writes_nothing_and_keeps_its_graphs(target):
    image = next((target["allowed"] / "images" / "tartan").glob("*.jpg")).read_bytes()
    before = counts(target["dsn"])
    with psycopg.connect(target["analyst"]) as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        toast = conn.execute("SELECT reltoastrelid FROM pg_class WHERE oid = "
                             "'imgsim.models'::regclass").fetchone()[0]

        def toast_reads():
            return conn.execute("SELECT coalesce(idx_scan, 0) FROM pg_stat_xact_all_tables "
                                "WHERE relid = %s", (toast,)).fetchone()[0]

        first = conn.execute("SELECT path FROM imgsim.similar_images(%s, 1)", (image,)).fetchone()
        after_first = toast_reads()
        second = conn.execute("SELECT path FROM imgsim.similar_images(%s, 1)", (image,)).fetchone()
        assert first == second and after_first > 0
        assert toast_reads() == after_first  # the graphs came from this backend's cache
        conn.commit()
    assert counts(target["dsn"]) == before


def test_the_server_imports_the_deployed_environment_first_and_sends_no_telemetry(target):
    home = Path(pwd.getpwnam("postgres").pw_dir)
    shutil.rmtree(home / ".cache" / "Microsoft", ignore_errors=True)
    site = str(serverenv.site_packages(SERVER_VENV, "3.11"))
    image = next((target["allowed"] / "images" / "dotted").glob("*.jpg")).read_bytes()
    with psycopg.connect(target["dsn"], autocommit=True) as conn:
        conn.execute("SELECT * FROM imgsim.similar_images(%s, 2)", (image,))
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("DO $$ import sys; plpy.notice(sys.path[0]); "
                     "plpy.notice(sys.modules['numpy'].__file__); "
                     "plpy.notice(sys.modules['onnxruntime'].__file__) $$ LANGUAGE plpython3u")
    assert notices[0] == site
    assert all(n.startswith(site) for n in notices[1:])
    assert not (home / ".cache" / "Microsoft").exists()


def test_a_session_open_during_a_redeploy_runs_the_new_build(pg_dsn, monkeypatch):
    dsn = fresh_database(pg_dsn, "imgsim_redeploy_build")
    env = Path(tempfile.mkdtemp(prefix="imgsim-env-"))
    os.chmod(env, 0o755)
    subprocess.run(["cp", "-al", str(SERVER_VENV), str(env / "venv")], check=True)
    package = serverenv.site_packages(env / "venv", "3.11") / "imgsim"
    shutil.rmtree(package)  # a copy of its own, not links to the shared environment's files
    shutil.copytree(serverenv.site_packages(SERVER_VENV, "3.11") / "imgsim", package)
    try:
        deploy(dsn, server_venv=env / "venv", prepare_venv=False, log=lambda *a: None)
        with psycopg.connect(dsn, autocommit=True) as session:  # open during the redeploy
            session.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
            with open(package / "settings.py", "a") as fh:  # the files of a later version
                fh.write("\n# a later version\n")
            new_build = serverenv.package_build(package)
            (package / "BUILD").write_text(new_build + "\n")
            monkeypatch.setattr(serverenv, "package_build", lambda *a: new_build)
            deploy(dsn, server_venv=env / "venv", prepare_venv=False, log=lambda *a: None)
            session.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
            notices = []
            session.add_notice_handler(lambda d: notices.append(d.message_primary))
            session.execute("DO $$ import sys; plpy.notice(sys.modules['imgsim'].__build__) $$ "
                            "LANGUAGE plpython3u")
        assert notices == [new_build]
        undeploy(dsn)
    finally:
        shutil.rmtree(env, ignore_errors=True)


def test_deploy_checks_the_server_before_building_anything(pg_dsn, tmp_path):
    venv = tmp_path / "never-built"
    dead = pg_dsn.rsplit(":", 1)[0] + ":1/imgsim_test"
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        deploy(dead, server_venv=venv, log=lambda *a: None)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS plain_user")
        conn.execute("CREATE ROLE plain_user LOGIN")
    with pytest.raises(PermissionError, match="superuser"):
        deploy(as_role(pg_dsn, "plain_user"), server_venv=venv, log=lambda *a: None)
    assert not venv.exists() and time.monotonic() - started < 30
    assert (Path(serverenv.__file__).parent / "sql" / "roles.sql").is_file()  # package data


def test_undeploy_keeps_a_role_and_tables_imgsim_did_not_create(pg_dsn):
    dsn = fresh_database(pg_dsn, "imgsim_shop")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS shop_owner")
        conn.execute("CREATE ROLE shop_owner")
        conn.execute("CREATE SCHEMA app AUTHORIZATION shop_owner")
        conn.execute("CREATE TABLE app.orders (id int)")
        conn.execute("INSERT INTO app.orders VALUES (1), (2)")
        conn.execute("ALTER TABLE app.orders OWNER TO shop_owner")
    deploy(dsn, admin_role="shop_owner", analyst_role="shop_readers", **QUIET)
    report = undeploy(dsn)
    assert one(dsn, "SELECT count(*) FROM app.orders") == (2,)
    assert one(dsn, "SELECT count(*) FROM pg_roles WHERE rolname = 'shop_owner'") == (1,)
    assert one(dsn, "SELECT count(*) FROM pg_roles WHERE rolname = 'shop_readers'") == (0,)
    assert one(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'imgsim'") == (0,)
    assert any("shop_owner: imgsim did not create it" in k for k in report["kept"])


def test_undeploy_in_one_of_two_databases_completes_and_keeps_the_shared_roles(pg_dsn):
    first, second = (fresh_database(pg_dsn, name) for name in ("imgsim_one", "imgsim_two"))
    for dsn in (first, second):
        deploy(dsn, admin_role="two_admin", analyst_role="two_analyst", **QUIET)
    job = schedule_job(second, "0 4 * * *")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS tess")
        conn.execute("CREATE ROLE tess LOGIN IN ROLE two_analyst")
    report = undeploy(first)
    assert one(first, "SELECT count(*) FROM pg_namespace WHERE nspname = 'imgsim'") == (0,)
    assert any(k.startswith("role two_admin: still") for k in report["kept"])
    with psycopg.connect(as_role(second, "tess"), autocommit=True) as conn:  # still serves
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
    assert one(pg_dsn, "SELECT count(*) FROM cron.job WHERE jobid = %s", (job["job"],)) == (1,)
    report = undeploy(second)
    assert one(pg_dsn, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'two_%%'") == (0,)
    assert one(pg_dsn, "SELECT count(*) FROM cron.job WHERE jobid = %s", (job["job"],)) == (0,)
    assert "role two_admin" in report["removed"] and "role two_analyst" in report["removed"]


def test_the_scheduled_refresh_runs_and_cannot_be_hijacked(pg_dsn, server_folder):
    """pg_cron runs the job as the superuser who scheduled it, with the default
    search_path, in a cluster where public is writable and the analyst planted names."""
    dsn = fresh_database(pg_dsn, "imgsim_cron")
    deploy(dsn, **QUIET)
    psql(dsn, """
        CALL imgsim.sync_image_folder(:'folder');
        CALL imgsim.featurize_images();
        CALL imgsim.prepare_data(max_query_imgs_per_subdir => 3, max_neg_imgs_per_query_img => 10);
        CALL imgsim.train_classifier(kind => 'logistic');
    """, folder=server_folder)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        conn.execute("CREATE ROLE mallory_cron LOGIN IN ROLE imgsim_analyst")
    with psycopg.connect(as_role(dsn, "mallory_cron"), autocommit=True) as conn:
        conn.execute(SHADOWS.replace("mallory", "mallory_cron"))
    job = schedule_job(dsn, "* * * * *")
    deadline, status = time.time() + 150, None
    while time.time() < deadline and status is None:  # pg_cron starts jobs on the minute
        status = one(pg_dsn, "SELECT status FROM cron.job_run_details WHERE jobid = %s "
                          "AND status IN ('succeeded', 'failed') ORDER BY runid DESC LIMIT 1",
                     (job["job"],))
        time.sleep(2)
    assert drop_jobs(dsn) == 1
    assert status == ("succeeded",)
    assert one(dsn, "SELECT count(*) FROM imgsim.runs WHERE step = 'score_images' "
                    "AND status = 'succeeded'") == (1,)
    assert one(dsn, "SELECT count(*) FROM public.hijack_log") == (0,)
    assert one(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory_cron'") == (False,)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP OWNED BY mallory_cron")
        conn.execute("DROP ROLE mallory_cron")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    undeploy(dsn)


def test_a_client_sends_no_telemetry(tmp_path, small_folder):
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "imgsim.cli", "--db", f"sqlite:///{tmp_path / 'c.db'}",
                    "--quiet", "sync", str(small_folder)], check=True, capture_output=True,
                   env={**os.environ, "HOME": str(home)})
    done = subprocess.run(
        [sys.executable, "-m", "imgsim.cli", "--db", f"sqlite:///{tmp_path / 'c.db'}", "--quiet",
         "featurize"], env={**os.environ, "HOME": str(home)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (home / ".cache" / "Microsoft").exists()


def test_procedures_refuse_a_transaction_block_and_an_open_one_holds_nothing(target):
    """A CALL inside a transaction block would keep its writes (and imgsim) until the
    block ends; an evaluation left in an open transaction holds nothing others need."""
    with psycopg.connect(target["analyst"]) as conn:
        for call in ("CALL imgsim.refresh()", "CALL imgsim.set_query_images(ARRAY[1])"):
            with pytest.raises(errors.ActiveSqlTransaction, match="transaction block"):
                conn.execute(call)
            conn.rollback()
        conn.execute("SELECT * FROM imgsim.evaluate_model(ks => ARRAY[1])")  # left open
        with psycopg.connect(target["dsn"], autocommit=True) as other:
            other.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
            other.execute("SELECT * FROM imgsim.evaluate_model(ks => ARRAY[1])")
        conn.rollback()


def test_taking_over_a_lease_after_killing_its_holder_holds_nothing(target):
    """An analyst may read the lease's advisory key in pg_locks, queue for it, and end
    the backend holding it (their own): the lease still dies with its backend."""
    with psycopg.connect(target["dsn"], autocommit=True) as dba:
        dba.execute("DELETE FROM imgsim.features")
    holder = psycopg.connect(target["analyst"], autocommit=True)
    pid = holder.info.backend_pid
    done = threading.Event()

    def featurize():
        try:
            holder.execute("CALL imgsim.featurize_images(batch_size => 1)")
        except psycopg.Error:
            pass
        done.set()

    threading.Thread(target=featurize).start()
    with psycopg.connect(target["analyst"], autocommit=True) as spy:
        token = None
        while token is None and not done.is_set():
            row = spy.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND "
                              "classid = 1768777587 AND objsubid = 2 AND pid = %s",
                              (pid,)).fetchone()
            token = row and row[0]
        assert token is not None
        squatter = psycopg.connect(target["analyst"], autocommit=True)
        queued = threading.Thread(target=squatter.execute,
                                  args=("SELECT pg_advisory_lock(1768777587, %s)", (token,)))
        queued.start()
        spy.execute("SELECT pg_terminate_backend(%s)", (pid,))
        queued.join()  # the squatter now holds the dead holder's key
        done.wait()
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            dba.execute("CALL imgsim.featurize_images()")  # not busy: the lease died
        squatter.close()


def test_no_one_can_hold_imgsim_with_an_advisory_lock(target):
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(1768777587, 1), "
                     "pg_advisory_lock_shared(1768777587, 2)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM imgsim_private.step_locks")
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            dba.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # not blocked


def test_a_lease_left_in_a_session_is_released_when_its_next_call_ends(target):
    """A cancel landing in a step's last statements could leave its lease's key held by
    the session, idle, and imgsim held for everyone; every call ends by releasing the
    keys its backend holds for no running step."""
    with psycopg.connect(target["dsn"], autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(1768777587, 4242)")
        holder.execute("INSERT INTO imgsim_private.step_locks (token, pid, holder, since) "
                       "VALUES (4242, pg_backend_pid(), 'left behind', now())")
        image_id = holder.execute("SELECT min(id) FROM imgsim.images").fetchone()[0]
        with psycopg.connect(target["analyst"], autocommit=True) as other:
            with pytest.raises(errors.LockNotAvailable, match="left behind"):
                other.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
            holder.execute("SELECT count(*) FROM imgsim.similar_to(%s, 1)", (image_id,))
            other.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # held no longer


def test_a_pipe_in_an_allowed_folder_is_never_opened(target):
    images = target["allowed"] / "images"
    pipe = images / "striped" / "pipe.jpg"
    os.mkfifo(pipe)
    os.chmod(pipe, 0o644)
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            conn.execute("SET statement_timeout = '60s'")
            conn.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))
            reason = conn.execute("SELECT reason FROM imgsim.image_errors WHERE path = "
                                  "'striped/pipe.jpg'").fetchone()
        assert reason == ("not a regular file (a pipe, device or socket)",)
    finally:
        pipe.unlink()


def test_large_parameters_are_refused_before_a_routine_reads_them(target):
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        pid = conn.info.backend_pid
        with pytest.raises(errors.CheckViolation, match="at_most_50_values"):
            conn.execute("SELECT count(*) FROM imgsim.evaluate_model("
                         "ks => array(SELECT generate_series(1, 8000000)))")
        with pytest.raises(errors.CheckViolation, match="at_most_100000_ids"):
            conn.execute("CALL imgsim.set_query_images(%s)", (list(range(1, 100002)),))
        with pytest.raises(errors.CheckViolation, match="at_most_4096_characters"):
            conn.execute("CALL imgsim.sync_image_folder(%s)", ("/" + "x" * 5000,))
        with pytest.raises(errors.CheckViolation, match="at_most_100_mb"):
            conn.execute("SELECT * FROM imgsim.similar_images(%s, 1)", (b"\0" * (101 << 20),))
        peak_kb = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                           if line.startswith("VmHWM")))
    assert peak_kb < 600 << 10  # 8 million ks as Python objects would take over 800 MB


def test_a_jpeg_repeating_its_scans_is_refused_at_once(target):
    from test_images import _repeat_last_scan

    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), np.uint8))
    bomb = _repeat_last_scan(_encoded(image.resize((3000, 3000)), "JPEG progressive"), 100)
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        started = time.monotonic()
        with pytest.raises(errors.InvalidParameterValue, match="scans is over the limit"):
            conn.execute("SELECT * FROM imgsim.similar_images(%s, 3)", (bomb,))
        assert time.monotonic() - started < 5


def test_the_refresh_reads_no_file_a_caller_named(target, tmp_path):
    """The job runs as a superuser: it must not read again a weights path an analyst
    gave (which may since lead elsewhere); it uses the graphs stored in models."""
    from imgsim import backbones

    weights = target["allowed"] / "lite0.pth"
    shutil.copy(backbones.weights_path("efficientnet_lite0"), weights)
    os.chmod(weights, 0o644)
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            conn.execute("CALL imgsim.train_classifier(backbone => 'efficientnet_lite0', "
                         "weights => %s)", (str(weights),))
    finally:
        weights.unlink()
    os.symlink("/etc/shadow", weights)  # the path now leads somewhere secret
    try:
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            dba.execute("CALL imgsim.refresh(top_k_candidates => 2)")
            status = dba.execute("SELECT status FROM imgsim.runs WHERE step = 'score_images' "
                                 "ORDER BY id DESC LIMIT 1").fetchone()
        assert status == ("succeeded",)
    finally:
        weights.unlink()


def test_a_run_records_who_logged_in_and_as_whom(target):
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        conn.execute("SET ROLE imgsim_analyst")
        conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
        by = conn.execute("SELECT started_by FROM imgsim.runs ORDER BY id DESC LIMIT 1"
                          ).fetchone()[0]
    assert by.startswith("mallory as imgsim_analyst (backend ")


def test_the_wheel_carries_the_sql_and_the_server_requirements(tmp_path):
    """deploy reads its SQL and pinned server packages from the installed package, so a
    wheel install deploys as a checkout does."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(root)], check=True,
                   capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("imgsim-*.whl"))).namelist()
    for data in ("imgsim/sql/roles.sql", "imgsim/sql/vector.sql", "imgsim/sql/routines.sql",
                 "imgsim/sql/drop_routines.sql", "imgsim/server-requirements.txt"):
        assert data in names


def test_a_prepared_statement_cannot_hold_the_lease_table(target):
    """PostgreSQL locks the tables a statement names while parsing it, before checking any
    right: the lease table sits in a schema analysts may not use at all."""
    with psycopg.connect(target["analyst"]) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="schema imgsim_private"):
            conn.execute("PREPARE hold AS INSERT INTO imgsim_private.step_locks DEFAULT VALUES")
        conn.rollback()
        conn.execute("PREPARE hold AS INSERT INTO imgsim.runs DEFAULT VALUES")  # parsed: held
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            started = time.monotonic()
            dba.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
            assert time.monotonic() - started < 1.5
        conn.rollback()


def test_files_private_to_the_server_are_not_read_even_in_an_allowed_folder(target):
    images = target["allowed"] / "images"
    private = images / "zebra" / "private.jpg"
    shutil.copy(next((images / "zebra").glob("*.jpg")), private)
    weights = target["allowed"] / "private.pth"
    weights.write_bytes(b"hunter2\n")
    for path in (private, weights):
        subprocess.run(["chown", "postgres", str(path)], check=True)
        os.chmod(path, 0o600)
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            conn.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))
            reason = conn.execute("SELECT reason FROM imgsim.image_errors WHERE path = "
                                  "'zebra/private.jpg'").fetchone()
            stored = conn.execute("SELECT count(*) FROM imgsim.images WHERE path = "
                                  "'zebra/private.jpg'").fetchone()
            with pytest.raises(errors.InsufficientPrivilege, match="not readable by every"):
                conn.execute("CALL imgsim.featurize_images(weights => %s)", (str(weights),))
        assert "not readable by every user of the server" in reason[0] and stored == (0,)
    finally:
        private.unlink()
        weights.unlink()
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            dba.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))


def test_names_in_a_folder_private_to_the_server_are_not_told(target):
    images = target["allowed"] / "images"
    listed, weights = images / "zebra" / "private", target["allowed"] / "private"
    for folder in (listed, weights):
        folder.mkdir()
        shutil.copy(next((images / "dotted").glob("*.jpg")), folder / "SECRET-NAME.jpg")
    shutil.copy(backbones.weights_path("efficientnet_lite0"), weights / "w.pth")
    for folder in (listed, weights):
        subprocess.run(["chown", "-R", "postgres", str(folder)], check=True)
        os.chmod(folder, 0o700)
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            conn.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))
            told = [r[0] for r in conn.execute("SELECT path FROM imgsim.image_errors "
                                               "UNION ALL SELECT path FROM imgsim.images")]
            messages = []
            for name in ("w.pth", "missing.pth"):
                with pytest.raises(errors.InsufficientPrivilege) as refused:
                    conn.execute("CALL imgsim.featurize_images(weights => %s)",
                                 (str(weights / name),))
                messages.append(str(refused.value).splitlines()[0].replace(name, "NAME"))
        assert "zebra/private" in told and not [p for p in told if "SECRET" in p]
        assert messages[0] == messages[1] and "not readable by every user" in messages[0]
    finally:
        shutil.rmtree(listed)
        shutil.rmtree(weights)
        with psycopg.connect(target["dsn"], autocommit=True) as dba:
            dba.execute("CALL imgsim.sync_image_folder(%s)", (str(images),))


def test_a_lease_dies_even_when_its_row_cannot_be_removed(target):
    """A caller's own lock_timeout could make the removal of a lease's row fail while
    another session takes a lease: the lease's key goes first, so what is left is dead
    (and the step that ends so keeps its results: the failure is not raised)."""
    from sqlalchemy import text

    from imgsim.store import SQLAlchemyStore

    holder, blocker = SQLAlchemyStore(target["dsn"]), psycopg.connect(target["dsn"])
    with holder.lock():
        holder._lock[0].execute(text("SET lock_timeout = '1ms'"))
        blocker.execute("LOCK TABLE imgsim_private.step_locks IN SHARE MODE")
    assert blocker.execute("SELECT count(*) FROM imgsim_private.step_locks").fetchone()[0] == 1
    blocker.rollback()
    blocker.close()
    with psycopg.connect(target["dsn"], autocommit=True) as dba:
        dba.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")  # not busy
    holder.close()


def test_procedures_refuse_a_snapshot_older_than_their_lease(target):
    with psycopg.connect(target["analyst"], autocommit=True) as conn:
        conn.execute("SET default_transaction_isolation = 'repeatable read'")
        with pytest.raises(errors.InvalidTransactionState, match="READ COMMITTED"):
            conn.execute("CALL imgsim.set_query_images(ARRAY[]::int[])")
        conn.execute("SELECT * FROM imgsim.evaluate_model(ks => ARRAY[1])")  # readers may


def test_weights_must_look_like_a_networks(target):
    pin = target["allowed"] / "pin.pth"
    pin.write_text("4711\\n")
    os.chmod(pin, 0o644)
    try:
        with psycopg.connect(target["analyst"], autocommit=True) as conn:
            before = conn.execute("SELECT count(*) FROM imgsim.runs").fetchone()
            with pytest.raises(errors.InsufficientPrivilege, match="of 1 to 512 MB"):
                conn.execute("CALL imgsim.rank_candidates(space => 'features', backbone => "
                             "'resnet18', weights => %s)", (str(pin),))
            assert conn.execute("SELECT count(*) FROM imgsim.runs").fetchone() == before
    finally:
        pin.unlink()
