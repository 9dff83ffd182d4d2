"""Recording of steps in the runs table, and steps written in stretches.

A step is a generator that yields between *stretches*: after its runs row is written and
after each piece of work that should be kept even if a later one fails (a featurized
batch, a step of the pipeline). On a client the stretches simply follow each other (the
store commits its own transactions); inside PostgreSQL the routine that drives the step
commits after each stretch (see :mod:`imgsim.indb`), so a cancel, a crash or a late
failure loses only the stretch in progress.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

from .store.base import now


class Run:
    """A step being recorded: its id and the counts it will finish with."""

    def __init__(self, store, run_id: int | None, step: str, parameters: dict, seed=None):
        self.store, self.id, self.counts = store, run_id, {}
        self.step, self.parameters, self.seed = step, parameters, seed
        self._last_flush = 0.0
        self.succeeded = False

    def start(self) -> int:
        """Write the runs row of a step recorded only with its results (see
        :func:`recorded`), inside the transaction that writes them."""
        self.id = self.store.start_run(self.step, self.parameters, self.seed)
        return self.id

    def succeed(self, **counts) -> None:
        """Record success now, inside the transaction that writes the step's results, so
        that the results and their run's status are kept together or not at all."""
        self.counts.update(counts)
        self.store.update_run(self.id, status="succeeded", finished=now(),
                              counts=dict(self.counts))
        self.succeeded = True

    def progress(self, force: bool = False, **counts) -> None:
        """Update counts; written to ``runs`` at most every two seconds, or now (``force``:
        before a commit, so that the record matches the work kept)."""
        self.counts.update(counts)
        if force or time.monotonic() - self._last_flush > 2.0:
            self.store.update_run(self.id, counts=dict(self.counts))
            self._last_flush = time.monotonic()


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is someone stopping the step rather than the step failing."""
    return (isinstance(exc, (KeyboardInterrupt, GeneratorExit))
            or type(exc).__name__ in ("QueryCanceled", "AdminShutdown"))


@contextmanager
def recorded(store, step: str, parameters: dict, seed: int | None = None,
             with_results: bool = False):
    """Record ``step`` in ``runs``: running, then succeeded with counts, or failed (or
    interrupted) with the error, which is re-raised.

    ``with_results``: the step writes its row itself (:meth:`Run.start`) in the
    transaction of its results, so that it is never seen running (evaluate and rank,
    which hold no lock, could not be told from a process that died); a failure is
    recorded after the fact."""
    run = Run(store, None if with_results else store.start_run(step, parameters, seed),
              step, parameters, seed)
    try:
        yield run
    except BaseException as exc:
        status = "interrupted" if interrupted(exc) else "failed"
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if with_results:
            store.record_failed_run(step, parameters, seed, status, error, dict(run.counts))
        else:
            store.update_run(run.id, status=status, finished=now(), counts=dict(run.counts),
                             error=error)
        raise
    if not run.succeeded:
        store.update_run(run.id, status="succeeded", finished=now(), counts=dict(run.counts))


def finish(stretches):
    """Run a step's stretches to the end; return the step's result."""
    while True:
        try:
            next(stretches)
        except StopIteration as stop:
            return stop.value


def stepwise(generator_function):
    """Make a step written as a generator of stretches callable as a plain function; the
    generator stays reachable as ``.stretches`` for the routines inside PostgreSQL."""
    @functools.wraps(generator_function)
    def step(*args, **kwargs):
        return finish(generator_function(*args, **kwargs))

    step.stretches = generator_function
    return step
