"""The store for clients: SQLite (the embedded default) or PostgreSQL, through SQLAlchemy."""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.schema import CreateSchema

from . import tables
from .base import Store

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


class SQLAlchemyStore(Store):
    """A :class:`~imgsim.store.base.Store` over a SQLAlchemy engine.

    Parameters
    ----------
    url : str
        A SQLAlchemy URL, e.g. ``sqlite:///imgsim.db`` or
        ``postgresql+psycopg://user@host/db``.
    """

    def __init__(self, url: str = DEFAULT_URL):
        self.url = url = sqlalchemy_url(url)
        engine = create_engine(url)
        self.dialect_name = engine.dialect.name
        if self.dialect_name == "sqlite":
            engine = engine.execution_options(schema_translate_map={tables.SCHEMA: None})

            @event.listens_for(engine.engine, "connect")
            def _pragmas(dbapi_connection, _record):
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

        else:
            @event.listens_for(engine, "connect")
            def _find_pgvector(dbapi_connection, _record):
                cursor = dbapi_connection.cursor()
                cursor.execute(  # let this session see pgvector's type wherever it lives
                    "SELECT set_config('search_path', current_setting('search_path') || ', ' "
                    "|| quote_ident(n.nspname), false) FROM pg_extension e JOIN pg_namespace n "
                    "ON n.oid = e.extnamespace WHERE e.extname = 'vector'")
                cursor.close()
                dbapi_connection.commit()

        self.engine = engine
        self._connection = None

    @contextmanager
    def transaction(self):
        if self._connection is not None:  # nested: join the open transaction
            yield
            return
        with self.engine.begin() as connection:
            self._connection = connection
            try:
                yield
            finally:
                self._connection = None

    def _fetch(self, statement):
        with self.transaction():
            return [tuple(row) for row in self._connection.execute(statement)]

    def _write(self, statement, rows=None):
        with self.transaction():
            if rows is not None:
                if rows:
                    self._connection.execute(statement, rows)
                return None
            result = self._connection.execute(statement)
            return result.scalar() if result.returns_rows else None

    def create_tables(self) -> None:
        with self.engine.begin() as connection:
            if self.dialect_name != "sqlite":
                connection.execute(CreateSchema(tables.SCHEMA, if_not_exists=True))
            tables.metadata.create_all(connection)

    def close(self) -> None:
        self.engine.dispose()


def open_store(url: str = DEFAULT_URL) -> SQLAlchemyStore:
    """Open (and create the tables of) the store at SQLAlchemy ``url``."""
    store = SQLAlchemyStore(url)
    store.create_tables()
    return store
