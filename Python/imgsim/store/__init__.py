"""Storage: one seam (:class:`Store`) with one backend module per place the steps run."""

from .base import Store
from .sqlalchemy_store import DEFAULT_URL, SQLAlchemyStore, open_store

__all__ = ["Store", "SQLAlchemyStore", "open_store", "DEFAULT_URL"]
