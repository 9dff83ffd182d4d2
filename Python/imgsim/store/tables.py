"""The imgsim tables, defined once with SQLAlchemy Core.

They live in schema ``imgsim`` on PostgreSQL; on SQLite the schema is translated
away (``schema_translate_map``) so the same definitions serve both. Vectors are
float32 little-endian bytes; parameters and counts are JSON.
"""

import functools

from sqlalchemy import (JSON, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text, cast)
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import UserDefinedType

SCHEMA = "imgsim"
# What only imgsim's owner may touch, out of analysts' reach entirely: PostgreSQL locks a
# table it merely parses a statement about (PREPARE), before checking any privilege, but
# not in a schema the role may not use.
PRIVATE = "imgsim_private"
metadata = MetaData(schema=SCHEMA)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("step", String(40), nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("seed", Integer),
    Column("started", DateTime(timezone=True), nullable=False),
    Column("finished", DateTime(timezone=True)),
    # running, succeeded, failed, interrupted (cancelled, Ctrl-C), abandoned (its process died)
    Column("status", String(20), nullable=False),
    Column("counts", JSON),
    Column("error", Text),
    Column("started_by", Text),  # who and where: role and backend, or user, host and pid
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False, unique=True),
    Column("category", Text, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("added", DateTime(timezone=True), nullable=False),
)

image_errors = Table(
    "image_errors", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("imgsim.runs.id", ondelete="SET NULL")),
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE")),
    Column("path", Text, nullable=False),
    Column("sha256", String(64)),
    Column("step", String(40), nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("retry", Boolean),  # the failure may pass another time (more memory): tried again
)

features = Table(
    "features", metadata,
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
    Column("backbone", String(80), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("vector", LargeBinary, nullable=False),
)
Index("features_backbone_sha256", features.c.backbone, features.c.sha256)

training_images = Table(
    "training_images", metadata,
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
)

testing_images = Table(
    "testing_images", metadata,
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
)

evaluation_images = Table(
    "evaluation_images", metadata,
    Column("query_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
    Column("candidate_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
    Column("is_positive", Boolean, nullable=False),
)

models = Table(
    "models", metadata,
    Column("name", String(200), primary_key=True),
    Column("kind", String(40), nullable=False),  # backbone, classifier
    Column("format", String(20), nullable=False),  # onnx
    Column("data", LargeBinary, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("sha256", String(64)),  # of data: sessions are cached by it
)

scores = Table(
    "scores", metadata,
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
    Column("model", String(200), nullable=False),
    Column("label", Text, nullable=False),
    Column("predicted_label", Text, nullable=False),
    Column("score", LargeBinary, nullable=False),
)

query_images = Table(
    "query_images", metadata,
    Column("image_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
)

ranking_results = Table(
    "ranking_results", metadata,
    Column("run_id", Integer, ForeignKey("imgsim.runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("query_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("candidate_id", Integer, ForeignKey("imgsim.images.id", ondelete="CASCADE"),
           nullable=False),
    Column("distance", Float, nullable=False),
)

ranking_metrics = Table(
    "ranking_metrics", metadata,
    Column("run_id", Integer, ForeignKey("imgsim.runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("distance", String(20), primary_key=True),
    Column("k", Integer, primary_key=True),
    Column("accuracy", Float, nullable=False),
    Column("mean_rank", Float, nullable=False),
    Column("median_rank", Float, nullable=False),
)

# Who holds imgsim in PostgreSQL: the lease of the step holding it (see Store.lock); no
# one but the owner may read, write or lock it (schema imgsim_private).
step_locks = Table(
    "step_locks", metadata,
    Column("token", Integer, primary_key=True, autoincrement=False),
    Column("pid", Integer, nullable=False),
    Column("holder", Text, nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
    schema=PRIVATE,
)

# What the DBA decides (see imgsim.settings): written by `imgsim deploy`, read by the steps.
settings = Table(
    "settings", metadata,
    Column("name", String(80), primary_key=True),
    Column("value", JSON, nullable=False),
)


class Vector(UserDefinedType):
    """pgvector's ``vector`` type, with or without a dimension, named with the schema
    pgvector lives in (so that no search_path decides which type or operator is meant)."""

    cache_ok = True

    def __init__(self, dim: int | None = None, schema: str | None = None):
        self.dim = None if dim is None else int(dim)
        self.schema = schema

    def get_col_spec(self, **kw):
        name = "vector" if self.schema is None else f"{_quote(self.schema)}.vector"
        return name if self.dim is None else f"{name}({self.dim})"

    def bind_expression(self, bindvalue):
        return cast(bindvalue, self)  # values travel as text, '[1,2,3]'


def _quote(identifier: str) -> str:
    return postgresql.dialect().identifier_preparer.quote_identifier(identifier)


def vector_operator(schema: str, name: str) -> str:
    """A pgvector operator by its schema-qualified name, e.g. ``OPERATOR("public".<=>)``."""
    return f"OPERATOR({_quote(schema)}.{name})"


def vector_text(values) -> str:
    """A vector in pgvector's text form, ``[1,2,3]`` (bound through :class:`Vector`)."""
    return "[" + ",".join(f"{float(v):.9g}" for v in values) + "]"


@functools.cache
def feature_vectors(schema: str) -> Table:
    """The features table as seen where pgvector is installed in ``schema``: deploy adds
    ``embedding`` (and HNSW indexes, sql/vector.sql). Kept out of ``metadata``: SQLite has
    no such type."""
    return Table(
        "features", MetaData(schema=SCHEMA),
        *(Column(c.name, c.type, primary_key=c.primary_key) for c in features.columns),
        Column("embedding", Vector(schema=schema)),
    )
