"""What the DBA decides, kept in the settings table (set by `imgsim deploy`).

- ``allowed_folders``: the server folders whose images and weights files routines may
  read. Empty (the default): only superusers and members of ``pg_read_server_files`` may
  name a server path; analysts then work on what was synced for them.
- ``max_backend_memory_mb`` (default 1024): the memory one step may use in one server
  process (or client process). Featurize infers at most as many images at once as fit in
  it, and an image whose decoded pixels would not fit is recorded as too large instead of
  being decoded.
- ``roles``: the admin and analyst roles of this deployment (undeploy drops those of
  them that deploy created, marked by a comment on the role, once no database uses them).

Analysts may read the settings; only the table's owner may change them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from . import checks

DEFAULTS = {"allowed_folders": [], "max_backend_memory_mb": 1024}
MIN_MEMORY_MB = 256
# What a backend holds before any image (Python, numpy, ONNX Runtime, a backbone graph),
# and ONNX Runtime's working memory per 288 px image (measured 28 MB for efficientnet_lite0
# with its memory arena at 8 to 64 images; bench/featurize_speed.py).
BASE_MB = 224
INFERENCE_MB_PER_IMAGE = 30


def check_memory_mb(value) -> int:
    value = checks.count("max_backend_memory_mb", value, MIN_MEMORY_MB)
    return value


def check_folders(value) -> list[str]:
    """A list of absolute server paths."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise checks.ParameterError(f"allowed_folders must be a list of paths; got {value!r}")
    for folder in value:
        if not os.path.isabs(folder):
            raise checks.ParameterError(f"allowed_folders must be absolute paths; got {folder!r}")
    return [os.path.normpath(v) for v in value]


def read(store) -> dict:
    """The settings, defaults filled in; a value someone stored by hand is checked."""
    values = {**DEFAULTS, **store.setting_values()}
    values["max_backend_memory_mb"] = check_memory_mb(values["max_backend_memory_mb"])
    values["allowed_folders"] = check_folders(values["allowed_folders"])
    return values


@dataclass(frozen=True)
class Budget:
    """How a step spends ``memory_mb`` beyond the process's own ``BASE_MB``: 40% for
    inference, 30% for decoding one image, 15% for the bytes of each of the two batches
    in flight (the one inferred, the one decoded meanwhile); ranking's blocks of query
    similarities take 40%."""

    memory_mb: int

    @property
    def _spare(self) -> int:
        return max(self.memory_mb - BASE_MB, 32) << 20

    @property
    def images_at_once(self) -> int:
        """How many images one ONNX Runtime call may take."""
        return max(1, int(self._spare * 0.4) // (INFERENCE_MB_PER_IMAGE << 20))

    @property
    def decode_bytes(self) -> int:
        """How much memory decoding one image may take."""
        return int(self._spare * 0.3)

    @property
    def batch_bytes(self) -> int:
        """How many bytes of image files one batch may hold (at least one image)."""
        return int(self._spare * 0.15)

    @property
    def pairs(self) -> int:
        """How many evaluation pairs a split may draw (about 300 bytes each, drawn and
        evaluated: 40%)."""
        return int(self._spare * 0.4) // 300

    def ranking_block(self, candidates: int, bytes_per_pair: int = 8) -> int:
        """How many queries one block of exact ranking may compare with ``candidates``,
        each pair taking ``bytes_per_pair`` at once (a similarity and its partial sort's
        index: 8; the combined space's parts, masks and temporaries: 48)."""
        return max(1, min(1024, int(self._spare * 0.4)
                          // (bytes_per_pair * max(candidates, 1))))


def budget(store) -> Budget:
    return Budget(read(store)["max_backend_memory_mb"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith(field + ":")))


@contextmanager
def capped(memory_mb: int):
    """Hold this process to ``memory_mb``: for the time being it may map no more new
    memory than ``memory_mb`` minus what it holds now (at least 64 MB), so that beyond the
    setting an allocation fails (MemoryError in Python, "out of memory" in the server)
    instead of the whole server being killed. Used around each stretch of a step inside
    PostgreSQL, where the estimates of :class:`Budget` could be beaten by crafted input."""
    import resource

    if not os.path.exists("/proc/self/status"):  # where this cannot be measured: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    room = max(memory_mb * 1024 - _status_kb("VmRSS"), 64 * 1024)
    limit = (_status_kb("VmSize") + room) * 1024
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

