"""The store for code running inside PostgreSQL (PL/Python), over ``plpy``.

The statements are the same SQLAlchemy Core statements the client store runs,
compiled for PostgreSQL with ``$n`` placeholders and run as prepared plans; values
travel as parameters, never in the SQL text.

Transactions: :meth:`transaction` is a subtransaction (all or nothing) inside the
caller's transaction; the routine that runs the step commits or not (see
``SQLPy/procedures.sql``: a routine with pinned settings may not commit itself).
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
from contextlib import contextmanager

from sqlalchemy import JSON, LABEL_STYLE_TABLENAME_PLUS_COL
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Select

from .base import Store

DIALECT = postgresql.dialect(paramstyle="numeric_dollar")


def _pg_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int8"
    if isinstance(value, numbers.Real):
        return "float8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytea"
    if isinstance(value, (dict, list)):
        return "json"
    if isinstance(value, dt.datetime):
        return "timestamptz"
    return "text"


def _pg_value(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


class PlpyStore(Store):
    """A :class:`~imgsim.store.base.Store` inside the server, through ``plpy``."""

    dialect_name = "postgresql"

    def __init__(self, plpy):
        self.plpy = plpy
        self._depth = 0
        self._plans = {}

    # -- primitives ---------------------------------------------------------------------
    def _compile(self, statement, keys=None):
        if isinstance(statement, Select):
            statement = statement.set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL)
        compiled = statement.compile(dialect=DIALECT, column_keys=keys,
                                     compile_kwargs={"render_postcompile": True})
        return compiled

    def _run(self, sql: str, names, params: dict):
        values = [params[name] for name in names]
        types = tuple(_pg_type(v) for v in values)
        plan = self._plans.get((sql, types))
        if plan is None:
            plan = self._plans[sql, types] = self.plpy.prepare(sql, list(types))
        return self.plpy.execute(plan, [_pg_value(v) for v in values])

    def _fetch(self, statement):
        compiled = self._compile(statement)
        result = self._run(compiled.string, compiled.positiontup or [],
                           compiled.construct_params())
        names = result.colnames()
        json_columns = {n for n, c in zip(names, statement.selected_columns)
                        if isinstance(c.type, JSON)} if isinstance(statement, Select) else set()
        return [tuple(json.loads(row[n]) if n in json_columns and row[n] is not None
                      else row[n] for n in names) for row in result]

    def _write(self, statement, rows=None):
        if rows is not None:
            if not rows:
                return None
            compiled = self._compile(statement, keys=list(rows[0]))
            names = compiled.positiontup or []
            for row in rows:
                params = compiled.construct_params(row)
                self._run(compiled.string, names, params)
            return None
        compiled = self._compile(statement)
        result = self._run(compiled.string, compiled.positiontup or [],
                           compiled.construct_params())
        if compiled.returning:
            return result[0][result.colnames()[0]]
        return None

    @contextmanager
    def transaction(self):
        if self._depth:
            yield
            return
        self._depth = 1
        try:
            with self.plpy.subtransaction():
                yield
        finally:
            self._depth = 0

    def create_tables(self) -> None:
        raise RuntimeError("tables are created by `imgsim deploy`, not from inside the server")
