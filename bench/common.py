"""Helpers shared by the benchmarks: the reference data, timing, peak memory, a section
runner in a fresh process (so peak memory is the section's own)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "data" / "fashion-texture"
sys.path.insert(0, str(ROOT / "tests"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_files() -> list[tuple[str, bytes]]:
    """``(category, bytes)`` of every reference image."""
    if not REFERENCE.is_dir():
        raise SystemExit(f"reference data not found at {REFERENCE}")
    return [(p.parent.name, p.read_bytes()) for p in sorted(REFERENCE.glob("*/*")) if p.is_file()]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def in_subprocess(module: str, *args: str, timeout: int = 1800) -> dict:
    """Run ``python -m bench.<module> args`` and return the JSON it prints last."""
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"bench.{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """Print a section's result as the last line (read by :func:`in_subprocess`)."""
    print(json.dumps(result))
