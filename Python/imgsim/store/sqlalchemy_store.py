"""The store for clients: SQLite (the embedded default) or PostgreSQL, through SQLAlchemy."""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, OperationalError, SAWarning,
                            SQLAlchemyError)
from sqlalchemy.schema import CreateColumn, CreateSchema

from .. import checks
from . import tables
from .base import LEASE_KEY, VECTOR_DTYPE, Busy, Store

DEFAULT_URL = "sqlite:///imgsim.db"


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` URLs go through psycopg 3 (SQLAlchemy's default is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def libpq_dsn(url: str) -> str:
    """The same URL as libpq and psycopg read it (without SQLAlchemy's driver name)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def check_url(url: str) -> str:
    """Refuse, with one clear line, a URL that is not a database URL, or a SQLite file
    whose folder does not exist; return the SQLAlchemy URL."""
    try:
        parsed = make_url(sqlalchemy_url(url))
    except ArgumentError:
        raise checks.ParameterError(
            f"--db {url!r} is not a database URL (examples: sqlite:///imgsim.db, "
            "postgresql://user@host/dbname)") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise checks.ParameterError(
            f"--db {parsed.drivername}://...: imgsim keeps its tables in SQLite or PostgreSQL "
            "(sqlite:///imgsim.db, postgresql://user@host/dbname)")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).parent
        if not folder.is_dir():
            raise checks.ParameterError(
                f"cannot open the SQLite database {parsed.database}: the folder {folder} does "
                "not exist")
    return str(parsed.render_as_string(hide_password=False))


class SQLAlchemyStore(Store):
    """A :class:`~imgsim.store.base.Store` over a SQLAlchemy engine.

    Parameters
    ----------
    url : str
        A SQLAlchemy URL, e.g. ``sqlite:///imgsim.db`` or
        ``postgresql+psycopg://user@host/db``.
    """

    def __init__(self, url: str = DEFAULT_URL):
        self.url = url = check_url(url)
        engine = create_engine(url, pool_pre_ping=True)  # a connection the server dropped
        # while idle (idle_session_timeout, a firewall) is replaced, not used
        self.dialect_name = engine.dialect.name
        if self.dialect_name == "sqlite":
            engine = engine.execution_options(
                schema_translate_map={tables.SCHEMA: None, tables.PRIVATE: None})

            @event.listens_for(engine.engine, "connect")
            def _pragmas(dbapi_connection, _record):
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

        self.engine = engine
        self._local = threading.local()  # each thread's open transaction: a store is shared
        self._lock = None  # the file (SQLite) or connection (PostgreSQL) holding the lock

    @property
    def _connection(self):
        return getattr(self._local, "connection", None)

    @_connection.setter
    def _connection(self, connection) -> None:
        self._local.connection = connection
        self._local.wrote = False

    @contextmanager
    def transaction(self):
        if self._connection is not None:  # nested: join the open transaction
            yield
            return
        with self.engine.begin() as connection:
            self._connection = connection
            try:
                yield
                if self._local.wrote:  # nothing is kept by a step that lost the database
                    self._check_lease()
            finally:
                self._connection = None

    def _fetch(self, statement):
        with self.transaction():
            return [tuple(row) for row in self._connection.execute(statement)]

    def _write(self, statement, rows=None):
        with self.transaction():
            self._local.wrote = True
            if rows is not None:
                if rows:
                    self._connection.execute(statement, rows)
                return None
            result = self._connection.execute(statement)
            return result.scalar() if result.returns_rows else None

    def create_tables(self) -> None:
        """Create missing tables, and add the nullable columns that later versions of
        imgsim added to existing ones (so an upgraded database keeps its data)."""
        with self.engine.begin() as connection:
            inspector = inspect(connection)
            if self.dialect_name != "sqlite":  # only what is missing: a client of a deployed
                for schema in (tables.SCHEMA, tables.PRIVATE):  # database needs no rights
                    if not inspector.has_schema(schema):  # to create anything
                        connection.execute(CreateSchema(schema))
            tables.metadata.create_all(connection, checkfirst=True)
            inspector = inspect(connection)
            preparer = connection.dialect.identifier_preparer
            for table in tables.metadata.sorted_tables:
                schema = None if self.dialect_name == "sqlite" else table.schema
                with warnings.catch_warnings():  # pgvector's column type is not SQLAlchemy's
                    warnings.simplefilter("ignore", SAWarning)
                    have = {c["name"] for c in inspector.get_columns(table.name, schema=schema)}
                for column in table.columns:
                    if column.name not in have and column.nullable:
                        name = (preparer.quote(table.name) if schema is None
                                else preparer.format_table(table))
                        ddl = CreateColumn(column).compile(dialect=connection.dialect)
                        connection.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {ddl}")

    def _insert_features(self, backbone: str, rows: list[tuple[int, str, bytes]]) -> None:
        """On PostgreSQL, by COPY: a batch of features in one stream."""
        if self.dialect_name != "postgresql":
            return super()._insert_features(backbone, rows)
        from psycopg import sql

        columns = ["image_id", "backbone", "sha256", "vector"]
        if self.has_vectors():
            columns.append("embedding")
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(tables.SCHEMA, "features"),
            sql.SQL(", ").join(map(sql.Identifier, columns)))
        with self.transaction():
            self._local.wrote = True
            cursor = self._connection.connection.driver_connection.cursor()
            with cursor.copy(statement) as copy:
                for image_id, sha, vector in rows:
                    row = (image_id, backbone, sha, vector)
                    if len(columns) == 5:
                        row += (tables.vector_text(np.frombuffer(vector, VECTOR_DTYPE)),)
                    copy.write_row(row)

    # -- the step lock: a lock file beside SQLite, a lease in PostgreSQL --------------
    def _acquire(self) -> bool:
        if self.dialect_name == "sqlite":
            return self._flock()
        connection = self.engine.connect()  # held for the step: the lease's token is its own
        self._connection = connection
        try:  # idle while the step works: not to be ended as idle by the server
            connection.execute(text("SET idle_session_timeout = 0"))
            token = self._lease_acquire()
            connection.commit()
        except OperationalError as exc:
            connection.rollback()
            connection.close()
            if getattr(exc.orig, "sqlstate", None) == "55P03":  # a lease is being taken
                return False
            raise
        except BaseException:
            connection.rollback()
            connection.close()
            raise
        finally:
            self._connection = None
        if token is None:
            connection.close()
            return False
        self._lock = (connection, token)
        return True

    def _flock(self) -> bool:
        """SQLite: a lock file beside the database (an in-memory one is this process's)."""
        import fcntl

        path = self._lock_file()
        if path is None:
            self._lock = None
            return True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: locking needs no write right
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.mark_abandoned()  # no one else holds it
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd
        return True

    def _check_lease(self) -> None:
        """On PostgreSQL, while a step holds the database: its lease's connection is alive
        and still holds the lease's key (a server or firewall may end idle connections)."""
        if self.dialect_name == "sqlite" or self._lock is None:
            return
        connection, token = self._lock
        try:
            held = connection.execute(text(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND "
                "classid = :key AND objid = :token AND objsubid = 2 AND granted AND "
                "pid = pg_catalog.pg_backend_pid()"),
                {"key": LEASE_KEY, "token": token}).scalar()
            connection.commit()
        except DBAPIError:
            held = 0
        if held != 1:
            raise Busy("this step lost its hold on the database (the connection holding "
                       "imgsim's lease was ended): it stops here, without keeping its last "
                       "part; run it again")

    def _lock_file(self) -> Path | None:
        database = self.engine.url.database  # by its real path: one lock however it is named
        return (None if database in (None, "", ":memory:")
                else Path(os.path.realpath(database) + ".imgsim-lock"))

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if self.dialect_name == "sqlite":
            os.close(lock)  # closing the file releases its lock
            return
        connection, token = lock
        self._connection = connection
        try:
            self._lease_release(token)
            connection.commit()
        except SQLAlchemyError:  # the connection was lost: its key went with its session
            pass
        finally:
            self._connection = None
            connection.close()  # its session ends: its key with it, whatever happened

    def close(self) -> None:
        self._release()
        self.engine.dispose()


def open_store(url: str = DEFAULT_URL) -> SQLAlchemyStore:
    """Open (and create the tables of) the store at SQLAlchemy ``url``."""
    store = SQLAlchemyStore(url)
    store.create_tables()
    return store
