"""Recording of steps in the runs table."""

from __future__ import annotations

import time
from contextlib import contextmanager

from .store.base import now


class Run:
    """A step being recorded: its id and the counts it will finish with."""

    def __init__(self, store, run_id: int):
        self.store, self.id, self.counts = store, run_id, {}
        self._last_flush = 0.0

    def progress(self, **counts) -> None:
        """Update counts; written to ``runs`` at most every two seconds."""
        self.counts.update(counts)
        if time.monotonic() - self._last_flush > 2.0:
            self.store.update_run(self.id, counts=dict(self.counts))
            self._last_flush = time.monotonic()


@contextmanager
def recorded(store, step: str, parameters: dict, seed: int | None = None):
    """Record ``step`` in ``runs``: running, then succeeded with counts, or failed with
    the error (which is re-raised)."""
    run = Run(store, store.start_run(step, parameters, seed))
    try:
        yield run
    except BaseException as exc:
        store.update_run(run.id, status="failed", finished=now(), counts=dict(run.counts),
                         error=f"{type(exc).__name__}: {exc}")
        raise
    store.update_run(run.id, status="succeeded", finished=now(), counts=dict(run.counts))
