"""The store for code running inside PostgreSQL (PL/Python), over ``plpy``.

The statements are the same SQLAlchemy Core statements the client store runs,
compiled for PostgreSQL with ``$n`` placeholders and run as prepared plans; values
travel as parameters, never in the SQL text.

Transactions: :meth:`transaction` is a subtransaction (all or nothing) inside the
caller's transaction; the public routine that drives the step commits between its
stretches when it may (see :mod:`imgsim.indb`).

The store also carries the caller (the role that called the public routine) and
enforces what the caller may read on the server: any path for superusers and members
of ``pg_read_server_files`` (PostgreSQL's own privilege for it), otherwise only paths
inside the folders the DBA allowed (:mod:`imgsim.settings`), symbolic links resolved.
The error is the same whether or not the path exists.
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import JSON, LABEL_STYLE_TABLENAME_PLUS_COL, Boolean, Column, MetaData, String
from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Select

from .. import backbones, files, settings
from . import tables as t
from .base import LEASE_KEY, Store, now

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


_roles = Table("pg_roles", MetaData(schema="pg_catalog"),
               Column("rolname", String), Column("rolsuper", Boolean))


class PathNotAllowed(PermissionError):
    """A server path the caller may not make the server read."""


class PlpyStore(Store):
    """A :class:`~imgsim.store.base.Store` inside the server, through ``plpy``, for the
    role ``caller``."""

    dialect_name = "postgresql"
    local_files = False

    def __init__(self, plpy, caller: str | None = None, login: str | None = None):
        self.plpy = plpy
        self.caller, self.login = caller, login or caller
        self._depth = 0
        self._plans = {}
        self._started = []
        self._failed = []
        self._token = None
        self._last_check = time.monotonic()

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

    # -- the caller ---------------------------------------------------------------------
    def who(self) -> str:
        role = self.login if self.login == self.caller else f"{self.login} as {self.caller}"
        return f"{role} (backend {os.getpid()})"

    def readable_path(self, path, what: str = "path") -> Path:
        """``path`` resolved, if the caller may make the server read it."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise PathNotAllowed(f"{what} must be a path on the server; got {path!r}")
        if not os.path.isabs(path):
            raise PathNotAllowed(f"{what} must be an absolute path on the server; got {path!r}")
        if self._reads_server_files():
            return Path(os.path.realpath(path))
        roots = settings.read(self)["allowed_folders"]
        real = files.beneath(path, roots)
        if real is None:
            raise PathNotAllowed(
                f"{what} {path!r} is not inside a folder the DBA allowed imgsim to read, "
                "reached through no link "
                f"(allowed_folders: {', '.join(roots) or 'none'}); the DBA sets them with "
                "imgsim deploy --allow-folder")
        real = Path(real)
        if what != "weights":
            return real
        private = PathNotAllowed(f"{what} {path!r} is not readable by every user of the "
                                 "server: imgsim does not read files private to it")
        if not files.searchable_by_all(real):  # before the file is looked at: a private
            raise private                      # folder's names are not told either
        found = files.regular_file(real)  # where the checked path leads, no link on the way
        if found is None:
            raise PathNotAllowed(f"weights {path!r} is not a regular file reached through no "
                                 "link (or does not exist)")
        if not found.st_mode & stat.S_IROTH:
            raise private
        if not (real.suffix in (".pth", ".pt")
                and 1 << 20 <= found.st_size <= backbones.MAX_WEIGHTS_BYTES):
            raise PathNotAllowed(f"weights {path!r} must be a .pth or .pt file of 1 to "
                                 f"{backbones.MAX_WEIGHTS_BYTES >> 20} MB (a network's "
                                 "weights)")
        return real

    def shared_only(self) -> bool:
        return not self._reads_server_files()

    def _reads_server_files(self) -> bool:
        r = _roles.c
        return bool(self._fetch(select(
            func.coalesce(r.rolsuper, False)
            | func.pg_has_role(self.caller, "pg_read_server_files", "MEMBER"))
            .where(r.rolname == self.caller))[0][0])

    def check_interrupts(self) -> None:
        """A cheap statement lets the server act on a pending cancel or shutdown (it raises
        here); at most every 0.2 s."""
        if time.monotonic() - self._last_check > 0.2:
            self._fetch(select(1))
            self._last_check = time.monotonic()

    # -- the step lock: a lease held by this backend --------------------------------------
    def _acquire(self) -> bool:
        try:
            with self.transaction():
                token = self._lease_acquire()
        except self.plpy.SPIError as exc:
            if getattr(exc, "sqlstate", None) == "55P03":  # a lease is being taken
                return False
            raise
        self._token = token
        return token is not None

    @property
    def lease_token(self) -> int | None:
        """The token of the lease this store holds, if any."""
        return self._token

    def _release(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            self._fetch(select(func.pg_advisory_unlock(LEASE_KEY, token)))  # dead from here
            try:
                with self.transaction():
                    self._lease_forget(token)
            except self.plpy.SPIError:
                pass  # the row of a dead lease: the next step to take one removes it

    # -- runs -----------------------------------------------------------------------------
    def start_run(self, step: str, parameters: dict, seed: int | None = None) -> int:
        run_id = super().start_run(step, parameters, seed)
        self._started.append(run_id)
        return run_id

    def record_failed_run(self, step, parameters, seed, status, error, counts) -> None:
        # inside the failing stretch, which is rolled back: kept for record_failure
        self._failed.append((step, parameters, seed, status, error, counts))

    def record_failure(self, exc: BaseException) -> None:
        """After a stretch failed and its writes were rolled back: mark the runs this
        store started and that are still running as failed (or interrupted), record the
        steps that failed before their row was kept, and let go of the lock."""
        from ..runs import interrupted

        self._release()
        self._lock_depth = 0
        message = exc.args[0] if exc.args else type(exc).__name__
        if self._started:
            self._write(update(t.runs).where(t.runs.c.id.in_(self._started),
                                             t.runs.c.status == "running").values(
                status="interrupted" if interrupted(exc) else "failed", finished=now(),
                error=f"{type(exc).__name__}: {message}"))
        failed, self._failed = self._failed, []
        for row in failed:
            super().record_failed_run(*row)
