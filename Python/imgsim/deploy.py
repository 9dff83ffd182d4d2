"""deploy and undeploy: install imgsim inside a PostgreSQL database, and remove it.

``deploy`` first connects and checks (a superuser; PL/Python on the server; the
server's Python version and host), then prepares the server-side environment
(:mod:`imgsim.serverenv`) when it runs on the database host, checks that the server
imports this very build from it, and only then installs, in one transaction: schema
``imgsim``, its tables and indexes, pgvector columns where pgvector is installed, the
routines (:mod:`imgsim.routines`, replacing those of an earlier deploy), the settings
(:mod:`imgsim.settings`) and the roles and rights (``sql/roles.sql``). Then it stores
the default backbone's ONNX graph and optionally schedules the pg_cron refresh job.
Deploying again upgrades in place and keeps all data.

``undeploy`` removes what deploy made: the schema with its data, the refresh job of
this database, and the roles deploy created (marked by a comment on the role) unless
another database still uses them. Everything is checked first; the database changes in
one transaction, so undeploy either completes or changes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from . import backbones, checks, routines, serverenv, settings
from .featurize import backbone_graph
from .store.sqlalchemy_store import SQLAlchemyStore, libpq_dsn

SQL_DIR = Path(__file__).resolve().parent / "sql"
DEFAULT_SERVER_VENV = Path("/var/lib/imgsim/venv")
JOB_NAME = "imgsim-refresh"
ROLE_MARK = "created by imgsim deploy; dropped by imgsim undeploy when no database uses it"


# How long deploy and undeploy wait for a table that another session's open transaction
# holds (even a plain SELECT left open holds its tables): while a change to a table waits,
# every new reader of it waits behind, so deploy gives up rather than stall the analysts.
LOCK_WAIT = "2s"
_HOLDERS = """SELECT DISTINCT a.pid, a.usename, a.state,
pg_catalog.to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS TZ')
FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
JOIN pg_catalog.pg_class c ON c.oid = l.relation
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE l.granted AND n.nspname IN ('imgsim', 'imgsim_private')
AND a.pid <> pg_catalog.pg_backend_pid() ORDER BY a.pid"""


def _connect(dsn: str, autocommit: bool = False):
    import psycopg

    conn = psycopg.connect(libpq_dsn(dsn), autocommit=autocommit)
    conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
    if not autocommit:
        conn.commit()
    return conn


@contextmanager
def _not_stalling(dsn: str, what: str):
    """Turn a wait for a table that ran out into an error naming the sessions holding it."""
    import psycopg

    try:
        yield
    except psycopg.errors.LockNotAvailable:
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            holders = conn.execute(_HOLDERS).fetchall()
        sessions = "; ".join(f"pid {pid} ({user}, {state}, in a transaction since {since})"
                             for pid, user, state, since in holders) or "sessions now gone"
        raise RuntimeError(
            f"{what} waited {LOCK_WAIT} for imgsim's tables, which open transactions of other "
            f"sessions hold: {sessions}. Its change was rolled back; end those transactions "
            "(or pg_terminate_backend) and run it again") from None


def _check_superuser(conn, what: str) -> None:
    if not conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles "
                        "WHERE rolname = current_user").fetchone()[0]:
        raise PermissionError(f"{what} needs a superuser's DSN (PL/Python is an untrusted "
                              "language)")


def probe(conn, site: str | None = None) -> dict:
    """What the server says about itself and the environment at ``site``."""
    from psycopg import sql

    conn.execute(sql.SQL("CREATE FUNCTION pg_temp.imgsim_probe(site pg_catalog.text) RETURNS "
                         "pg_catalog.text LANGUAGE plpython3u AS {}").format(
        sql.Literal(serverenv.PROBE)))
    try:
        text = conn.execute("SELECT pg_temp.imgsim_probe(%s)", (site,)).fetchone()[0]
    finally:
        conn.execute("DROP FUNCTION pg_temp.imgsim_probe(pg_catalog.text)")
    return serverenv.parse_probe(text)


def deploy(dsn: str, server_venv=None, prepare_venv: bool = True, schedule: str | None = None,
           admin_role: str = "imgsim_admin", analyst_role: str = "imgsim_analyst",
           allow_folders=None, max_backend_memory_mb: int | None = None,
           export_backbones=(backbones.DEFAULT_BACKBONE,), log=print) -> dict:
    """Install or upgrade imgsim in the database at ``dsn``; returns what it found and did.

    Parameters
    ----------
    dsn : str
        ``postgresql://user@host:port/dbname`` of a superuser (PL/Python is untrusted).
    server_venv : path, optional
        The server-side environment (default ``/var/lib/imgsim/venv``).
    prepare_venv : bool
        Make or update it here (True; deploy must then run on the database host), or take
        it as the DBA prepared it there with ``imgsim server-env`` (False).
    schedule : str, optional
        A cron expression: install the pg_cron refresh job with it.
    allow_folders : list of paths, optional
        The server folders analysts may sync (replaces the setting; default: keep it,
        empty on a first deploy: only superusers may sync).
    max_backend_memory_mb : int, optional
        The memory one step may use in one server process (default: keep it; 1024).
    """
    checks.identifier("admin_role", admin_role)
    checks.identifier("analyst_role", analyst_role)
    if admin_role == analyst_role:
        raise checks.ParameterError("admin_role and analyst_role must be two roles")
    for name in export_backbones:
        backbones.get_spec(name)
    if schedule is not None:
        _check_schedule(schedule)
    if allow_folders is not None:
        allow_folders = settings.check_folders(list(map(str, allow_folders)))
    if max_backend_memory_mb is not None:
        settings.check_memory_mb(max_backend_memory_mb)
    venv = Path(server_venv or DEFAULT_SERVER_VENV)

    from psycopg import sql

    with _connect(dsn) as conn:  # connect and check before anything is built or changed
        _check_superuser(conn, "deploy")
        available = {r[0] for r in conn.execute(
            "SELECT name FROM pg_catalog.pg_available_extensions WHERE name = ANY(%s)",
            (["plpython3u", "vector", "pg_cron"],))}
        if "plpython3u" not in available:
            raise RuntimeError("PL/Python (plpython3u) is not installed on the server: "
                               "install Debian's postgresql-plpython3-15")
        if schedule is not None and _cron_database(conn) is None:
            raise RuntimeError("--schedule needs pg_cron loaded by the server (add pg_cron "
                               "to shared_preload_libraries; Debian package postgresql-15-cron)")
        conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        server = probe(conn)
        conn.commit()
    site = serverenv.site_packages(venv, server["python"])
    if prepare_venv:
        if not serverenv.same_host(server):
            raise RuntimeError(
                f"the database server runs on another host ({server['host']}): prepare the "
                f"server-side environment there (imgsim server-env {venv} --python "
                f"{server['python']}) and deploy with --no-prepare-venv")
        serverenv.prepare(venv, server["python"], log)
    build = serverenv.package_build()
    report = {"server_site": str(site), "server_python": server["python"], "build": build}
    with _connect(dsn) as conn:
        found = probe(conn, str(site))
        if "error" in found:
            raise RuntimeError(f"{found['error']}: prepare the server-side environment "
                               "(deploy without --no-prepare-venv, or imgsim server-env)")
        if found["build"] != build:
            raise RuntimeError(f"the server-side environment {site} holds imgsim build "
                               f"{found['build']}; this imgsim is build {build}: prepare it "
                               "again with this version")
        report["pgvector"] = "vector" in available
        if report["pgvector"]:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        created = []
        for role in (admin_role, analyst_role):
            if not conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s",
                                (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
                conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(
                    sql.Identifier(role), sql.Literal(ROLE_MARK)))
                created.append(role)
        report["created_roles"] = created
        conn.commit()
    report["pg_cron"] = _cron_available(dsn)
    if not report["pg_cron"]:
        log("pg_cron is not loaded by the server: no scheduled refresh (add pg_cron to "
            "shared_preload_libraries; Debian package postgresql-15-cron)")
    if not report["pgvector"]:
        log("pgvector is not installed: ranking and similar_images use exact search "
            "(fine up to some hundred thousand images; install pgvector for HNSW)")
    store = SQLAlchemyStore(dsn)
    store.create_tables()
    with _not_stalling(dsn, "deploy"), _connect(dsn) as conn:
        conn.execute("SET LOCAL search_path = pg_catalog, imgsim")
        if report["pgvector"]:
            vector_schema = conn.execute(
                "SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n"
                " ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()[0]
            conn.execute(sql.SQL((SQL_DIR / "vector.sql").read_text()).format(
                vector=sql.Identifier(vector_schema)))
        conn.execute((SQL_DIR / "drop_routines.sql").read_text())
        for statement in routines.statements(str(site), build):
            conn.execute(statement)
        _put_settings(conn, {"roles": {"admin": admin_role, "analyst": analyst_role},
                             **({} if allow_folders is None
                                else {"allowed_folders": allow_folders}),
                             **({} if max_backend_memory_mb is None
                                else {"max_backend_memory_mb": max_backend_memory_mb})})
        conn.execute("SELECT pg_catalog.set_config('imgsim.admin_role', %s, true)",
                     (admin_role,))
        conn.execute(sql.SQL((SQL_DIR / "roles.sql").read_text()).format(
            admin=sql.Identifier(admin_role), analyst=sql.Identifier(analyst_role)))
        conn.commit()
    if report["pgvector"]:
        report["embeddings_backfilled"] = store.backfill_embeddings()
    for name in export_backbones:
        key, _ = backbone_graph(store, name)
        log(f"backbone {name} stored in imgsim.models as {key}")
    report["settings"] = {k: v for k, v in settings.read(store).items()}
    store.close()
    report["backbones"] = list(export_backbones)
    if schedule is not None:
        report["schedule"] = schedule_job(dsn, schedule)
    return report


def _put_settings(conn, values: dict) -> None:
    from psycopg.types.json import Jsonb

    for name, value in values.items():
        conn.execute("DELETE FROM imgsim.settings WHERE name = %s", (name,))
        conn.execute("INSERT INTO imgsim.settings (name, value) VALUES (%s, %s::json)",
                     (name, Jsonb(value)))


def _cron_database(conn) -> str | None:
    row = conn.execute("SELECT setting FROM pg_catalog.pg_settings "
                       "WHERE name = 'cron.database_name'").fetchone()
    return row[0] if row else None


def _cron_available(dsn: str) -> bool:
    with _connect(dsn) as conn:
        return _cron_database(conn) is not None


def _check_schedule(schedule: str) -> None:
    if not isinstance(schedule, str) or len(schedule.split()) != 5:
        raise checks.ParameterError(f"schedule must be a 5-field cron expression; got {schedule!r}")


@contextmanager
def _cron(dsn: str):
    """A connection to the database pg_cron lives in (it may not be imgsim's), with
    imgsim's database name and whether the pg_cron extension is created there."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with _connect(dsn) as conn:
        cron_db, database = _cron_database(conn), conn.info.dbname
    if cron_db is None:
        raise RuntimeError("pg_cron is not loaded by the server: add pg_cron to "
                           "shared_preload_libraries (Debian package postgresql-15-cron)")
    params = {**conninfo_to_dict(libpq_dsn(dsn)), "dbname": cron_db}
    with _connect(make_conninfo(**params), autocommit=True) as cron:
        created = cron.execute("SELECT 1 FROM pg_catalog.pg_extension "
                               "WHERE extname = 'pg_cron'").fetchone()
        yield cron, database, bool(created)


def schedule_job(dsn: str, schedule: str) -> dict:
    """Install (or replace) the pg_cron job that runs ``CALL imgsim.refresh()``."""
    _check_schedule(schedule)
    with _cron(dsn) as (cron, database, _):
        cron.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        job = cron.execute("SELECT cron.schedule_in_database(%s, %s, %s, %s)",
                           (JOB_NAME, schedule, "CALL imgsim.refresh()", database)).fetchone()[0]
    return {"job": int(job), "name": JOB_NAME, "schedule": schedule, "database": database}


def list_jobs(dsn: str) -> list[tuple]:
    with _cron(dsn) as (cron, database, created):
        if not created:
            return []
        return cron.execute("SELECT jobid, jobname, schedule, command, database, active "
                            "FROM cron.job WHERE jobname = %s AND database = %s ORDER BY jobid",
                            (JOB_NAME, database)).fetchall()


def drop_jobs(dsn: str) -> int:
    with _cron(dsn) as (cron, database, created):
        if not created:
            return 0
        jobs = cron.execute("SELECT jobid FROM cron.job WHERE jobname = %s AND database = %s",
                            (JOB_NAME, database)).fetchall()
        for (job,) in jobs:
            cron.execute("SELECT cron.unschedule(%s)", (job,))
        return len(jobs)


def undeploy(dsn: str) -> dict:
    """Remove schema imgsim with all its data, this database's refresh job, and the roles
    deploy created that no other database uses. Returns what was removed and kept."""
    from psycopg import sql

    with _not_stalling(dsn, "undeploy"), _connect(dsn) as conn:
        _check_superuser(conn, "undeploy")
        database = conn.info.dbname
        if not conn.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'imgsim'"
                            ).fetchone():
            return {"database": database, "removed": [], "kept": [],
                    "note": "imgsim is not deployed in this database"}
        row = conn.execute("SELECT value FROM imgsim.settings WHERE name = 'roles'").fetchone()
        roles = list(dict.fromkeys((row[0] if row else {}).values()))
        cron_db = _cron_database(conn)
        jobs = []
        if cron_db == database and conn.execute(
                "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron'").fetchone():
            jobs = [r[0] for r in conn.execute(
                "SELECT jobid FROM cron.job WHERE jobname = %s AND database = %s",
                (JOB_NAME, database)).fetchall()]
        conn.execute("DROP SCHEMA imgsim CASCADE")
        conn.execute("DROP SCHEMA IF EXISTS imgsim_private CASCADE")
        removed, kept = ["schema imgsim", "schema imgsim_private"], []
        for job in jobs:
            conn.execute("SELECT cron.unschedule(%s)", (job,))
            removed.append(f"pg_cron job {job}")
        for role in roles:
            found = conn.execute(
                "SELECT r.oid, pg_catalog.shobj_description(r.oid, 'pg_authid') "
                "FROM pg_catalog.pg_roles r WHERE r.rolname = %s", (role,)).fetchone()
            if found is None:
                continue
            if found[1] != ROLE_MARK:
                kept.append(f"role {role}: imgsim did not create it")
                continue
            users = conn.execute(
                "SELECT DISTINCT coalesce(d.datname, '(shared objects)') "
                "FROM pg_catalog.pg_shdepend s LEFT JOIN pg_catalog.pg_database d "
                "ON d.oid = s.dbid WHERE s.refclassid = "
                "'pg_catalog.pg_authid'::pg_catalog.regclass AND s.refobjid = %s",
                (found[0],)).fetchall()
            if users:
                kept.append(f"role {role}: still owns or may use objects in "
                            f"{', '.join(sorted(u[0] for u in users))}")
                continue
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            removed.append(f"role {role}")
        conn.commit()
    if cron_db is not None and cron_db != database:
        dropped = drop_jobs(dsn)
        removed += [f"pg_cron job ({dropped})"] if dropped else []
    return {"database": database, "removed": removed, "kept": kept}
