"""The storage seam: every read and write the steps make, in one class.

Steps call only these methods. Each is written once as SQLAlchemy Core statements;
a backend supplies three primitives: ``_fetch`` (run a statement, return rows as
tuples), ``_write`` (run a statement, optionally with a list of parameter rows) and
``transaction`` (a context in which all writes commit together or not at all).
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager

import numpy as np
from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, and_, bindparam, cast,
                        delete, func, insert, literal, not_, select, update)

from .. import checks
from . import tables as t

VECTOR_DTYPE = np.dtype("<f4")


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


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Store:
    """Domain reads and writes over the imgsim tables (see :mod:`imgsim.store.tables`)."""

    dialect_name = "generic"

    # -- primitives a backend provides ------------------------------------------------
    def _fetch(self, statement) -> list[tuple]:
        raise NotImplementedError

    def _write(self, statement, rows: list[dict] | None = None):
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager:
        raise NotImplementedError

    def create_tables(self) -> None:
        raise NotImplementedError

    # -- runs ---------------------------------------------------------------------------
    def start_run(self, step: str, parameters: dict, seed: int | None = None) -> int:
        with self.transaction():
            result = self._write(insert(t.runs).values(
                step=step, parameters=parameters, seed=seed, started=now(),
                status="running", counts={}).returning(t.runs.c.id))
        return int(result)

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
    def image_index(self) -> dict[str, tuple[int, str]]:
        """``{path: (id, sha256)}`` of every stored image."""
        c = t.images.c
        return {p: (i, s) for i, p, s in self._fetch(select(c.id, c.path, c.sha256))}

    def add_image(self, path, category, sha256, data) -> None:
        self._write(insert(t.images).values(path=path, category=category, sha256=sha256,
                                            size_bytes=len(data), data=data, added=now()))

    def replace_image(self, image_id, category, sha256, data) -> None:
        self._write(update(t.images).where(t.images.c.id == image_id).values(
            category=category, sha256=sha256, size_bytes=len(data), data=data, added=now()))

    def image_info(self, ids=None) -> list[tuple[int, str, str, str]]:
        """``(id, path, category, sha256)`` rows, by id."""
        c = t.images.c
        query = select(c.id, c.path, c.category, c.sha256).order_by(c.id)
        if ids is not None:
            query = query.where(c.id.in_(list(map(int, ids))))
        return self._fetch(query)

    def image_data(self, ids) -> dict[int, bytes]:
        c = t.images.c
        rows = self._fetch(select(c.id, c.data).where(c.id.in_(list(map(int, ids)))))
        return {i: bytes(d) for i, d in rows}

    def add_image_errors(self, rows: list[dict]) -> None:
        if rows:
            self._write(insert(t.image_errors), [{"at": now(), **row} for row in rows])

    def image_error_rows(self) -> list[tuple]:
        c = t.image_errors.c
        return self._fetch(select(c.path, c.step, c.reason, c.at).order_by(c.id))

    # -- features -----------------------------------------------------------------------
    def pending_images(self, backbone: str, step: str) -> list[tuple[int, str, str]]:
        """Images without current features for ``backbone``, skipping content already
        recorded as bad in ``step``: ``(id, path, sha256)``."""
        i, f, e = t.images.c, t.features.c, t.image_errors.c
        has_features = select(f.image_id).where(
            f.image_id == i.id, f.backbone == backbone, f.sha256 == i.sha256).exists()
        known_bad = select(e.id).where(e.sha256 == i.sha256, e.step == step).exists()
        return self._fetch(select(i.id, i.path, i.sha256)
                           .where(not_(has_features), not_(known_bad)).order_by(i.id))

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
        self._write(delete(t.features).where(
            f.backbone == backbone, f.image_id.in_([r[0] for r in rows])))
        values = [{"image_id": i, "backbone": backbone, "sha256": s, "vector": v}
                  for i, s, v in rows]
        if self.has_vectors():
            for row in values:
                row["embedding"] = t.vector_text(np.frombuffer(row["vector"], VECTOR_DTYPE))
            self._write(insert(t.feature_vectors), values)
        else:
            self._write(insert(t.features), values)

    # -- pgvector -----------------------------------------------------------------------
    _vectors: bool | None = None

    def has_vectors(self) -> bool:
        """Whether features carry a pgvector ``embedding`` column (PostgreSQL, deployed)."""
        if self._vectors is None:
            self._vectors = False
            if self.dialect_name == "postgresql":
                c = _information_columns.c
                self._vectors = bool(self._fetch(select(func.count()).where(
                    c.table_schema == t.SCHEMA, c.table_name == "features",
                    c.column_name == "embedding"))[0][0])
        return self._vectors

    def nearest_features(self, key: str, vector, k: int, ef_search: int = 200):
        """``(image_id, cosine distance)`` of the ``k`` nearest features by the HNSW index."""
        fv = t.feature_vectors.c
        dim = len(vector)
        target = cast(literal(t.vector_text(vector), t.Vector()), t.Vector(dim))
        distance = cast(fv.embedding, t.Vector(dim)).op("<=>", return_type=Float)(target)
        with self.transaction():
            self._fetch(select(func.set_config("hnsw.ef_search", str(max(ef_search, k)), True)))
            return self._fetch(
                select(fv.image_id, distance)
                .where(fv.backbone == key,
                       func.vector_dims(fv.embedding) == bindparam("dim", dim,
                                                                   literal_execute=True))
                .order_by(distance).limit(k))

    def backfill_embeddings(self) -> int:
        """Fill the pgvector column of features stored before pgvector was installed."""
        fv = t.feature_vectors.c
        rows = self._fetch(select(fv.image_id, fv.backbone, fv.vector)
                           .where(fv.embedding.is_(None)))
        with self.transaction():
            for image_id, backbone, vector in rows:
                self._write(update(t.feature_vectors).where(
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

    def evaluation_pairs(self) -> list[tuple[int, int, bool]]:
        c = t.evaluation_images.c
        return self._fetch(select(c.query_id, c.candidate_id, c.is_positive)
                           .order_by(c.query_id, c.candidate_id))

    # -- models -------------------------------------------------------------------------
    def save_model(self, name, kind, data: bytes, metadata: dict, fmt: str = "onnx") -> None:
        self._write(delete(t.models).where(t.models.c.name == name))
        self._write(insert(t.models).values(name=name, kind=kind, format=fmt, data=data,
                                            metadata=metadata, created=now()))

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

    def score_matrix(self):
        """``(ids, labels, predicted, matrix)`` of every scored image."""
        c = t.scores.c
        rows = self._fetch(select(c.image_id, c.label, c.predicted_label, c.score)
                           .order_by(c.image_id))
        return (np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                [r[2] for r in rows], from_blobs([bytes(r[3]) for r in rows]))

    # -- ranking ------------------------------------------------------------------------
    def query_ids(self, table_name: str = "query_images") -> list[int]:
        """Ids in the ``image_id`` column of table ``table_name`` (schema imgsim); for the
        default query_images, the testing images when it is empty.

        The name is checked as a plain identifier and quoted by SQLAlchemy."""
        checks.identifier("query_table", table_name)
        table = Table(table_name, MetaData(schema=t.SCHEMA), Column("image_id", Integer))
        try:
            with self.transaction():
                rows = self._fetch(select(table.c.image_id).order_by(table.c.image_id))
        except Exception as exc:
            raise ValueError(f"query_table {table_name!r} cannot be read as a table of "
                             f"image_id in schema {t.SCHEMA}: {exc}") from None
        ids = [int(r[0]) for r in rows]
        return ids if ids or table_name != "query_images" else self.split()[1]

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
