"""Whole-pipeline wall time on the reference set: client on SQLite, client on PostgreSQL,
in-database on PostgreSQL (a throwaway cluster; IMGSIM_TEST_DSN to use a server)."""

import os
import sys
import tempfile

import psycopg

from bench.common import REFERENCE, Timer, emit
from imgsim import open_store, run_image_similarity
from imgsim.deploy import deploy
from imgsim.pipeline import run_in_database

SERVER_VENV = os.environ.get("IMGSIM_TEST_SERVER_VENV", "/tmp/imgsim-test-server-venv")


def fresh_database(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(
            psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    target = dsn.rsplit("/", 1)[0] + "/" + name
    deploy(target, server_venv=SERVER_VENV, log=lambda *a: None)
    return target


def main():
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/bench.db")
        with Timer() as t:
            run_image_similarity(store, REFERENCE, progress=False)
        results["sqlite_client"] = t.seconds
    cluster = None
    dsn = os.environ.get("IMGSIM_TEST_DSN")
    if not dsn:
        from pg_cluster import Cluster
        cluster = Cluster()
        dsn = cluster.dsn
    try:
        client = fresh_database(dsn, "bench_client")
        with Timer() as t:
            run_image_similarity(open_store(client), REFERENCE, progress=False)
        results["postgres_client"] = t.seconds
        indb = fresh_database(dsn, "bench_indb")
        with Timer() as t:
            run_in_database(indb, REFERENCE)
        results["postgres_in_db"] = t.seconds
    finally:
        if cluster:
            cluster.stop()
    emit(results)


if __name__ == "__main__":
    sys.exit(main())
