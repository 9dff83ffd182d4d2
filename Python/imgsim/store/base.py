"""The storage seam: every read and write the steps make, in one class.

Steps call only these methods. Each is written once as SQLAlchemy Core statements;
a backend supplies the primitives: ``_fetch`` (run a statement, return rows as
tuples), ``_write`` (run a statement, optionally with a list of parameter rows),
``transaction`` (a context in which all writes commit together or not at all), and
the two of the step lock (``_acquire``, ``_release``).

The store also answers for where it runs: who is running the step (``who``), which
files a step may read (``readable_path``: anything on a client, an allowed folder inside
the server), and whether the caller has asked to stop (``check_interrupts``).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import os
import secrets
import socket
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import (Boolean, Column, Float, Integer, MetaData, String, Table, and_,
                        bindparam, cast, delete, func, insert, literal, not_, or_, select, text,
                        update)

from .. import checks
from . import tables as t

VECTOR_DTYPE = np.dtype("<f4")
MAX_EF_SEARCH = 1000  # pgvector's largest hnsw.ef_search


def to_blob(vector) -> bytes:
    """A vector as float32 little-endian bytes."""
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def from_blobs(blobs, dim: int | None = None) -> np.ndarray:
    """Stack float32 blobs into an ``(n, dim)`` float32 matrix."""
    if not blobs:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.stack([np.frombuffer(b, dtype=VECTOR_DTYPE) for b in blobs]).astype(np.float32)


_information_columns = Table(
    "columns", MetaData(schema="information_schema"),
    Column("table_schema", String), Column("table_name", String), Column("column_name", String))
_extension = Table("pg_extension", MetaData(schema="pg_catalog"),
                   Column("extname", String), Column("extnamespace", Integer))
_namespace = Table("pg_namespace", MetaData(schema="pg_catalog"),
                   Column("oid", Integer), Column("nspname", String))
_pg_class = Table("pg_class", MetaData(schema="pg_catalog"),
                  Column("oid", Integer), Column("relname", String),
                  Column("relnamespace", Integer))
_pg_locks = Table("pg_locks", MetaData(schema="pg_catalog"),
                  Column("locktype", String), Column("database", Integer),
                  Column("relation", Integer),
                  Column("classid", Integer), Column("objid", Integer),
                  Column("objsubid", Integer), Column("pid", Integer),
                  Column("granted", Boolean))
_pg_stat_activity = Table("pg_stat_activity", MetaData(schema="pg_catalog"),
                          Column("pid", Integer), Column("usename", String))
_pg_database = Table("pg_database", MetaData(schema="pg_catalog"),
                     Column("oid", Integer), Column("datname", String))


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Busy(RuntimeError):
    """Another imgsim step holds the database; raised at once, before anything is written."""


# The first key of the advisory locks that keep imgsim's leases alive ('imgs'), and how
# long taking a lease waits for another backend taking one.
LEASE_KEY = 0x696D6773
LEASE_WAIT = "2s"
_LOCK_LEASES = text("LOCK TABLE imgsim_private.step_locks IN SHARE ROW EXCLUSIVE MODE")


class Store:
    """Domain reads and writes over the imgsim tables (see :mod:`imgsim.store.tables`)."""

    dialect_name = "generic"
    local_files = True  # may use the user's disk cache and export graphs (not in the server)

    # -- primitives a backend provides ------------------------------------------------
    def _fetch(self, statement) -> list[tuple]:
        raise NotImplementedError

    def _write(self, statement, rows: list[dict] | None = None):
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager:
        raise NotImplementedError

    def create_tables(self) -> None:
        raise NotImplementedError

    def _acquire(self) -> bool:
        """Take the step lock without waiting (marking abandoned runs: no one else holds
        it); False when another holder has it."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    # -- the step lock in PostgreSQL: a lease in imgsim.step_locks -------------------------
    # A lease is a row of step_locks naming its holder's backend and a token: a session
    # advisory lock (LEASE_KEY, token) that backend keeps while it holds the lease. The
    # lease is alive while that backend holds that lock, so a lease whose backend died is
    # seen as gone, and another backend taking the token over keeps nothing alive. Analysts
    # may not use schema imgsim_private, so they cannot read, write or even lock (with a
    # PREPAREd statement) step_locks: no one holds imgsim but through its routines. Leases
    # are taken under a table lock, waited for at most LEASE_WAIT.
    def _lease_acquire(self) -> int | None:
        """In the caller's transaction: the token of a new lease, or None when a live
        lease is in the way. Raises the server's lock_not_available after LEASE_WAIT."""
        previous = self._fetch(select(func.current_setting("lock_timeout")))[0][0]
        self._fetch(select(func.set_config("lock_timeout", LEASE_WAIT, True)))
        self._write(_LOCK_LEASES)
        self._fetch(select(func.set_config("lock_timeout", previous, True)))
        s = t.step_locks.c
        leases = dict(self._fetch(select(s.token, s.pid)))
        live = self._live_tokens(leases)
        dead = [token for token in leases if token not in live]
        if dead:
            self._write(delete(t.step_locks).where(s.token.in_(dead)))
        if live:
            return None
        self.mark_abandoned()
        while True:
            token = secrets.randbelow(2**31 - 1) + 1
            if self._fetch(select(func.pg_try_advisory_lock(LEASE_KEY, token)))[0][0]:
                break
        self._write(insert(t.step_locks).values(
            token=token, pid=self._fetch(select(func.pg_backend_pid()))[0][0],
            holder=self.who(), since=now()))
        return token

    def _lease_release(self, token: int) -> None:
        """End a lease: its key first (the lease is dead at once, whatever happens next),
        then its row (a row left behind by a failure is dead and removed by the next
        step to take a lease)."""
        self._fetch(select(func.pg_advisory_unlock(LEASE_KEY, token)))
        self._lease_forget(token)

    def _lease_forget(self, token: int) -> None:
        """Remove the row of a lease whose key is released."""
        self._write(delete(t.step_locks).where(t.step_locks.c.token == token))

    def _live_tokens(self, leases: dict[int, int]) -> set[int]:
        """The tokens of ``{token: pid}`` still held by the backend that took them."""
        if not leases:
            return set()
        lock, d = _pg_locks.c, _pg_database.c
        return {token for token, pid in self._fetch(
            select(lock.objid, lock.pid).where(
                lock.locktype == "advisory", lock.classid == LEASE_KEY, lock.objsubid == 2,
                lock.granted, lock.objid.in_(list(leases)),
                lock.database == select(d.oid).where(d.datname == func.current_database())
                .scalar_subquery())) if leases.get(token) == pid}

    def _lock_holder(self) -> str | None:
        """Who holds imgsim in PostgreSQL (SQLite cannot tell)."""
        if self.dialect_name != "postgresql":
            return None
        s = t.step_locks.c
        leases = self._fetch(select(s.token, s.pid, s.holder, s.since))
        live = self._live_tokens({token: pid for token, pid, _, _ in leases})
        holders = [f"{holder} (since {str(since)[:19]})" for token, _, holder, since in leases
                   if token in live]
        return ", ".join(holders) or None

    # -- where the store runs -------------------------------------------------------------
    def who(self) -> str:
        """Who runs the steps of this store, recorded in runs.started_by."""
        return f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()})"

    def readable_path(self, path, what: str = "path") -> Path:
        """A file or folder a step may read, resolved: on a client, any the client's user
        can."""
        return Path(os.path.realpath(path))

    def shared_only(self) -> bool:
        """Whether steps may read only files every user of the machine may read (inside
        the server, for callers who may not read the server's files)."""
        return False

    def check_interrupts(self) -> None:
        """Raise if the caller asked the step to stop (a no-op where Ctrl-C does it)."""

    # -- the step lock --------------------------------------------------------------------
    _lock_depth = 0

    @contextmanager
    def lock(self):
        """Hold the database alone for a step that replaces shared state.

        Re-entrant (a pipeline holds it for its steps). A step that cannot have it fails
        at once with :class:`Busy`, naming the run that holds it, so that two runs never
        mix. Whoever takes it marks the runs that were left ``running`` by a process that
        died as ``abandoned``. (Steps that only read shared state and add results of
        their own, evaluate and rank, take no lock: they check that their inputs did not
        change while they read them, see :mod:`imgsim.lineage`.)
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        if not self._acquire():
            raise Busy(self._busy_message())
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._release()

    def _busy_message(self) -> str:
        running = [f"run {i} ({step}, started {str(started)[:19]} by {by or 'unknown'})"
                   for i, step, started, by in self.running_runs()]
        holder = self._lock_holder()
        what = ", ".join(running) if running else holder or "another process"
        return (f"imgsim is busy: {what} is using this database; try again when it has "
                "finished (nothing was changed)")

    # -- runs ---------------------------------------------------------------------------
    def start_run(self, step: str, parameters: dict, seed: int | None = None) -> int:
        with self.transaction():
            result = self._write(insert(t.runs).values(
                step=step, parameters=parameters, seed=seed, started=now(),
                status="running", counts={}, started_by=self.who()).returning(t.runs.c.id))
        return int(result)

    def record_failed_run(self, step, parameters, seed, status, error, counts) -> None:
        """A finished row for a step that failed before its own row was kept."""
        with self.transaction():
            self._write(insert(t.runs).values(
                step=step, parameters=parameters, seed=seed, started=now(), finished=now(),
                status=status, counts=counts, error=error, started_by=self.who()))

    def running_runs(self) -> list[tuple]:
        """``(id, step, started, started_by)`` of runs recorded as running."""
        c = t.runs.c
        return self._fetch(select(c.id, c.step, c.started, c.started_by)
                           .where(c.status == "running").order_by(c.id))

    def mark_abandoned(self) -> None:
        """Runs left ``running`` while no one holds the step lock lost their process."""
        with self.transaction():
            self._write(update(t.runs).where(t.runs.c.status == "running").values(
                status="abandoned", finished=now(),
                error="its process ended before the step finished (killed, or the server "
                      "restarted); finished batches were kept"))

    def update_run(self, run_id: int, **values) -> None:
        with self.transaction():
            self._write(update(t.runs).where(t.runs.c.id == run_id).values(**values))

    def run_rows(self, step: str | None = None, limit: int = 50) -> list[tuple]:
        c = t.runs.c
        query = select(c.id, c.step, c.status, c.started, c.finished, c.seed, c.parameters,
                       c.counts, c.error).order_by(c.id.desc()).limit(limit)
        if step:
            query = query.where(c.step == step)
        return self._fetch(query)

    def last_run(self, step: str, status: str = "succeeded") -> tuple | None:
        c = t.runs.c
        rows = self._fetch(select(c.id, c.parameters, c.counts, c.seed)
                           .where(c.step == step, c.status == status)
                           .order_by(c.id.desc()).limit(1))
        return rows[0] if rows else None

    # -- images -------------------------------------------------------------------------
    def image_index(self) -> dict[str, tuple[int, str, str]]:
        """``{path: (id, sha256, category)}`` of every stored image."""
        c = t.images.c
        return {p: (i, s, k) for i, p, s, k in self._fetch(
            select(c.id, c.path, c.sha256, c.category))}

    def add_image(self, path, category, sha256, data) -> None:
        self._write(insert(t.images).values(path=path, category=category, sha256=sha256,
                                            size_bytes=len(data), data=data, added=now()))

    def delete_images(self, ids) -> None:
        """Remove images and, by the tables' cascades, everything derived from them."""
        ids = list(map(int, ids))
        for start in range(0, len(ids), 1000):
            self._write(delete(t.images).where(t.images.c.id.in_(ids[start:start + 1000])))

    def image_info(self, ids=None) -> list[tuple[int, str, str, str]]:
        """``(id, path, category, sha256)`` rows, by id."""
        c = t.images.c
        query = select(c.id, c.path, c.category, c.sha256).order_by(c.id)
        if ids is not None:
            query = query.where(c.id.in_(list(map(int, ids))))
        return self._fetch(query)

    def unscored_count(self) -> int:
        """Images without scores (added since the classifier scored), other than those
        recorded as unusable: no candidates of rankings and searches until scored."""
        i, s, e = t.images.c, t.scores.c, t.image_errors.c
        return self._fetch(select(func.count()).select_from(t.images).where(
            i.id.not_in(select(s.image_id)),
            i.id.not_in(select(e.image_id).where(e.image_id.is_not(None)))))[0][0]

    def copies(self, limit: int = 1000) -> list[tuple[str, int, str, str]]:
        """``(sha256, image_id, path, category)`` of the images whose content is stored
        more than once, by content then id (the first ``limit``)."""
        c = t.images.c
        repeated = select(c.sha256).group_by(c.sha256).having(func.count() > 1)
        return self._fetch(select(c.sha256, c.id, c.path, c.category)
                           .where(c.sha256.in_(repeated)).order_by(c.sha256, c.id)
                           .limit(limit))

    def categories(self) -> list[tuple[str, int]]:
        """``(category, number of images)``, by category."""
        c = t.images.c
        return self._fetch(select(c.category, func.count()).group_by(c.category)
                           .order_by(c.category))

    def image_data(self, ids) -> dict[int, bytes]:
        c = t.images.c
        rows = self._fetch(select(c.id, c.data).where(c.id.in_(list(map(int, ids)))))
        return {i: bytes(d) for i, d in rows}

    def add_image_errors(self, rows: list[dict]) -> None:
        if rows:
            self._write(insert(t.image_errors), [{"at": now(), **row} for row in rows])

    def delete_image_errors(self, step: str, shas=None, retry_only: bool = False) -> None:
        """Forget ``step``'s errors (of content ``shas`` only; only those that may pass
        another time)."""
        e = t.image_errors.c
        query = delete(t.image_errors).where(e.step == step)
        if shas is not None:
            query = query.where(e.sha256.in_(list(shas)))
        if retry_only:
            query = query.where(e.retry.is_(True))
        self._write(query)

    def delete_run_errors(self, run_id: int, ids) -> None:
        """Forget what run ``run_id`` recorded against images ``ids`` (done again)."""
        e = t.image_errors.c
        self._write(delete(t.image_errors).where(
            e.run_id == run_id, e.image_id.in_(list(map(int, ids)))))

    def image_errors_of(self, ids) -> list[tuple]:
        """``(image_id, step, reason)`` of what was recorded against images ``ids``."""
        e = t.image_errors.c
        return self._fetch(select(e.image_id, e.step, e.reason).where(
            e.image_id.in_(list(map(int, ids)))).order_by(e.id))

    def retry_shas(self, step: str) -> set[str]:
        """Contents whose failure in ``step`` may pass another time."""
        e = t.image_errors.c
        return {r[0] for r in self._fetch(select(e.sha256).where(e.step == step,
                                                                 e.retry.is_(True)))}

    def unrecorded_bad_copies(self, step: str) -> list[dict]:
        """Error rows for images whose content failed in ``step`` under another path (they
        are not tried again, but must be listed as not used)."""
        e = t.image_errors.c
        failed = dict(self._fetch(select(e.sha256, e.reason).where(
            e.step == step, e.sha256.is_not(None), func.coalesce(e.retry, False).is_(False))))
        recorded = {r[0] for r in self._fetch(select(e.image_id).where(e.step == step))}
        return [{"image_id": i, "path": p, "sha256": s, "step": step, "reason": failed[s]}
                for i, p, _, s in self.image_info() if s in failed and i not in recorded]

    def image_error_rows(self) -> list[tuple]:
        c = t.image_errors.c
        return self._fetch(select(c.path, c.step, c.reason, c.at).order_by(c.id))

    # -- features -----------------------------------------------------------------------
    def pending_images(self, backbone: str, step: str, also: str | None = None
                       ) -> list[tuple[int, str, str, int]]:
        """Images without current features for ``backbone`` (or, when given, for ``also``),
        skipping content already recorded as bad in ``step`` (not what may pass another
        time): ``(id, path, sha256, size_bytes)``."""
        i, f, e = t.images.c, t.features.c, t.image_errors.c

        def has(key):
            return select(f.image_id).where(
                f.image_id == i.id, f.backbone == key, f.sha256 == i.sha256).exists()

        missing = not_(has(backbone)) if also is None else or_(not_(has(backbone)),
                                                               not_(has(also)))
        known_bad = select(e.id).where(e.sha256 == i.sha256, e.step == step,
                                       func.coalesce(e.retry, False).is_(False)).exists()
        return self._fetch(select(i.id, i.path, i.sha256, i.size_bytes)
                           .where(missing, not_(known_bad)).order_by(i.id))

    def vectors_by_sha(self, backbone: str, shas) -> dict[str, bytes]:
        f = t.features.c
        rows = self._fetch(select(f.sha256, f.vector).where(
            f.backbone == backbone, f.sha256.in_(list(shas))))
        return {s: bytes(v) for s, v in rows}

    def put_features(self, backbone: str, rows: list[tuple[int, str, bytes]]) -> None:
        """Insert or replace ``(image_id, sha256, vector_bytes)`` rows (and their pgvector
        embedding where the server has it)."""
        if not rows:
            return
        f = t.features.c
        with self.transaction():
            self._write(delete(t.features).where(
                f.backbone == backbone, f.image_id.in_([r[0] for r in rows])))
            self._insert_features(backbone, rows)

    def _insert_features(self, backbone: str, rows: list[tuple[int, str, bytes]]) -> None:
        values = [{"image_id": i, "backbone": backbone, "sha256": s, "vector": v}
                  for i, s, v in rows]
        if self.has_vectors():
            for row in values:
                row["embedding"] = t.vector_text(np.frombuffer(row["vector"], VECTOR_DTYPE))
            self._write(insert(t.feature_vectors(self._vector_schema)), values)
        else:
            self._write(insert(t.features), values)

    # -- pgvector -----------------------------------------------------------------------
    _vector_schema: str | None = None
    _vectors: bool | None = None

    def has_vectors(self) -> bool:
        """Whether features carry a pgvector ``embedding`` column (PostgreSQL, deployed).
        pgvector's type, functions and operators are then named with their schema."""
        if self._vectors is None:
            self._vectors = False
            if self.dialect_name == "postgresql":
                c = _information_columns.c
                self._vectors = bool(self._fetch(select(func.count()).where(
                    c.table_schema == t.SCHEMA, c.table_name == "features",
                    c.column_name == "embedding"))[0][0])
                if self._vectors:
                    self._vector_schema = self._fetch(
                        select(_namespace.c.nspname)
                        .select_from(_extension.join(
                            _namespace, _extension.c.extnamespace == _namespace.c.oid))
                        .where(_extension.c.extname == "vector"))[0][0]
        return self._vectors

    def nearest_features(self, key: str, vector, k: int, ef_search: int = 200,
                         category: str | None = None, max_distance: float | None = None,
                         exclude: int | None = None):
        """``(image_id, cosine distance)`` of the ``k`` nearest features by the HNSW index
        (of ``category``, within ``max_distance``, without ``exclude``, when given: the
        index's iterative scans go on until they find k rows that pass)."""
        schema = self._vector_schema
        fv = t.feature_vectors(schema).c
        dim = len(vector)
        target = cast(literal(t.vector_text(vector), t.Vector(schema=schema)),
                      t.Vector(dim, schema))
        distance = cast(fv.embedding, t.Vector(dim, schema)).op(
            t.vector_operator(schema, "<=>"), return_type=Float)(target)
        dims = getattr(func, schema).vector_dims(fv.embedding)
        query = (select(fv.image_id, distance)
                 .where(fv.backbone == key, dims == bindparam("dim", dim, literal_execute=True))
                 .order_by(distance).limit(k))
        if category is not None:
            query = query.where(fv.image_id.in_(select(t.images.c.id).where(
                t.images.c.category == category)))
        if max_distance is not None:
            query = query.where(distance <= max_distance)
        if exclude is not None:
            query = query.where(fv.image_id != exclude)
        ef_search = min(MAX_EF_SEARCH, max(ef_search, 2 * k))  # iterative scans go past it
        with self.transaction():
            self._fetch(select(func.set_config("hnsw.ef_search", str(ef_search), True)))
            self._fetch(select(func.set_config("hnsw.iterative_scan", "relaxed_order", True)))
            found = self._fetch(query)
        return sorted(found, key=lambda row: (row[1], row[0]))  # relaxed order: sorted here

    def backfill_embeddings(self) -> int:
        """Fill the pgvector column of features stored before pgvector was installed."""
        table = t.feature_vectors(self._vector_schema)
        fv = table.c
        rows = self._fetch(select(fv.image_id, fv.backbone, fv.vector)
                           .where(fv.embedding.is_(None)))
        with self.transaction():
            for image_id, backbone, vector in rows:
                self._write(update(table).where(
                    fv.image_id == image_id, fv.backbone == backbone).values(
                    embedding=t.vector_text(np.frombuffer(bytes(vector), VECTOR_DTYPE))))
        return len(rows)

    def feature_matrix(self, backbone: str, ids=None):
        """``(ids, categories, matrix)`` of images with current features for ``backbone``."""
        i, f = t.images.c, t.features.c
        query = (select(i.id, i.category, f.vector)
                 .join(t.features, and_(f.image_id == i.id, f.sha256 == i.sha256))
                 .where(f.backbone == backbone).order_by(i.id))
        if ids is not None:
            query = query.where(i.id.in_(list(map(int, ids))))
        rows = self._fetch(query)
        return (np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                from_blobs([bytes(r[2]) for r in rows]))

    # -- splits and evaluation pairs ----------------------------------------------------
    def replace_split(self, train_ids, test_ids) -> None:
        self._write(delete(t.training_images))
        self._write(delete(t.testing_images))
        self._write(insert(t.training_images), [{"image_id": int(i)} for i in train_ids])
        self._write(insert(t.testing_images), [{"image_id": int(i)} for i in test_ids])

    def split(self) -> tuple[list[int], list[int]]:
        train = [r[0] for r in self._fetch(select(t.training_images.c.image_id)
                                           .order_by(t.training_images.c.image_id))]
        test = [r[0] for r in self._fetch(select(t.testing_images.c.image_id)
                                          .order_by(t.testing_images.c.image_id))]
        return train, test

    def replace_evaluation(self, pairs) -> None:
        """Replace the evaluation set with ``(query_id, candidate_id, is_positive)`` rows."""
        self._write(delete(t.evaluation_images))
        if len(pairs):
            self._write(insert(t.evaluation_images), [
                {"query_id": int(q), "candidate_id": int(c), "is_positive": bool(p)}
                for q, c, p in pairs])

    def evaluation_pair_count(self) -> int:
        return self._fetch(select(func.count()).select_from(t.evaluation_images))[0][0]

    def evaluation_pairs(self) -> list[tuple[int, int, bool]]:
        c = t.evaluation_images.c
        return self._fetch(select(c.query_id, c.candidate_id, c.is_positive)
                           .order_by(c.query_id, c.candidate_id))

    # -- models -------------------------------------------------------------------------
    def save_model(self, name, kind, data: bytes, metadata: dict, fmt: str = "onnx") -> None:
        self._write(delete(t.models).where(t.models.c.name == name))
        self._write(insert(t.models).values(name=name, kind=kind, format=fmt, data=data,
                                            metadata=metadata, created=now(),
                                            sha256=hashlib.sha256(data).hexdigest()))

    def model_digests(self, names) -> dict[str, tuple[str, dict]]:
        """``{name: (sha256 of its bytes, metadata)}``, without reading the bytes (a model
        stored before digests were kept is hashed once here)."""
        c = t.models.c
        found = {}
        for name, digest, metadata in self._fetch(
                select(c.name, c.sha256, c.metadata).where(c.name.in_(list(names)))):
            if digest is None:
                digest = hashlib.sha256(self.load_model(name)[0]).hexdigest()
            found[name] = (digest, metadata)
        return found

    def load_model(self, name) -> tuple[bytes, dict] | None:
        c = t.models.c
        rows = self._fetch(select(c.data, c.metadata).where(c.name == name))
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    # -- scores -------------------------------------------------------------------------
    def replace_scores(self, model: str, rows: list[tuple[int, str, str, bytes]]) -> None:
        """Replace all scores with ``(image_id, label, predicted_label, score)`` rows."""
        self._write(delete(t.scores))
        if rows:
            self._write(insert(t.scores), [
                {"image_id": i, "model": model, "label": lab, "predicted_label": pred,
                 "score": s} for i, lab, pred, s in rows])

    def score_models(self) -> set[str]:
        """The models whose scores the scores table holds (one, after train or refresh)."""
        return {r[0] for r in self._fetch(select(t.scores.c.model).distinct())}

    def score_matrix(self, ids=None):
        """``(ids, labels, predicted, matrix)`` of every scored image (of ``ids`` only)."""
        c = t.scores.c
        query = select(c.image_id, c.label, c.predicted_label, c.score).order_by(c.image_id)
        if ids is not None:
            query = query.where(c.image_id.in_(list(map(int, ids))))
        rows = self._fetch(query)
        return (np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                [r[2] for r in rows], from_blobs([bytes(r[3]) for r in rows]))

    # -- ranking ------------------------------------------------------------------------
    def query_ids(self, table_name: str = "query_images", fallback: bool = True) -> list[int]:
        """Ids in the ``image_id`` column of table ``table_name`` (schema imgsim); for the
        default query_images, the testing images when it is empty (unless not
        ``fallback``).

        The name is checked as a plain identifier and quoted by SQLAlchemy."""
        checks.identifier("query_table", table_name)
        table = Table(table_name, MetaData(schema=t.SCHEMA), Column("image_id", Integer))
        try:
            with self.transaction():
                rows = self._fetch(select(table.c.image_id).where(table.c.image_id.is_not(None))
                                   .order_by(table.c.image_id))
        except Exception as exc:
            raise ValueError(f"query_table {table_name!r} cannot be read as a table of "
                             f"image_id in schema {t.SCHEMA}: {exc}") from None
        ids = [int(r[0]) for r in rows]
        if ids or table_name != "query_images" or not fallback:
            return ids
        return self.split()[1]

    def set_query_images(self, ids) -> None:
        with self.transaction():
            self._write(delete(t.query_images))
            if len(ids):
                self._write(insert(t.query_images), [{"image_id": int(i)} for i in ids])

    def add_ranking_results(self, run_id: int, rows) -> None:
        if rows:
            self._write(insert(t.ranking_results), [
                {"run_id": run_id, "query_id": q, "rank": r, "candidate_id": c,
                 "distance": d} for q, r, c, d in rows])

    def keep_rankings(self, runs: int) -> None:
        """Keep the results of the last ``runs`` rank runs only (their runs rows stay)."""
        r = t.runs.c
        kept = select(r.id).where(r.step == "rank_candidates").order_by(r.id.desc()).limit(runs)
        self._write(delete(t.ranking_results).where(
            t.ranking_results.c.run_id.not_in(select(kept.subquery().c.id))))

    def ranking_row_count(self, run_id: int) -> int:
        c = t.ranking_results.c
        return self._fetch(select(func.count()).where(c.run_id == run_id))[0][0]

    def ranking_rows(self, run_id: int, query_ids=None) -> list[tuple]:
        c = t.ranking_results.c
        query = (select(c.query_id, c.rank, c.candidate_id, c.distance)
                 .where(c.run_id == run_id).order_by(c.query_id, c.rank))
        if query_ids is not None:
            query = query.where(c.query_id.in_(list(map(int, query_ids))))
        return self._fetch(query)

    def add_ranking_metrics(self, run_id: int, rows: list[dict]) -> None:
        self._write(insert(t.ranking_metrics), [{"run_id": run_id, **r} for r in rows])

    def metric_rows(self, run_id: int) -> list[tuple]:
        c = t.ranking_metrics.c
        return self._fetch(select(c.distance, c.k, c.accuracy, c.mean_rank, c.median_rank)
                           .where(c.run_id == run_id).order_by(c.distance, c.k))

    # -- settings -----------------------------------------------------------------------
    def setting_values(self) -> dict:
        """The stored settings (see :mod:`imgsim.settings` for their meaning and defaults)."""
        c = t.settings.c
        return {name: value for name, value in self._fetch(select(c.name, c.value))}

    def put_setting(self, name: str, value) -> None:
        self._write(delete(t.settings).where(t.settings.c.name == name))
        self._write(insert(t.settings).values(name=name, value=value))
