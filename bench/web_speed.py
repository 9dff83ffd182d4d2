"""Similar images by upload through the web API, against the query called directly.

Requests per second and p50/p99 latency of ``POST /api/similar`` (``imgsim serve
--workers`` one a core, one keep-alive connection per client) with 1, 4 and 16 concurrent clients,
against the same figures for the query itself in this process: the Python function
``imgsim.rank.similar_images`` on SQLite (one store per client), and on PostgreSQL
``SELECT * FROM imgsim.similar_images(...)`` (one connection per client) on a throwaway
cluster (IMGSIM_BENCH_DSN: a deployed database with a classifier, instead). The databases
are made here from the generated texture set; the queries are textures that are not
stored.

    python -m bench.web_speed [--requests 48]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg

from bench.common import ROOT, emit
from imgsim import open_store, rank, run_image_similarity
from imgsim.store import SQLAlchemyStore

sys.path.insert(0, str(ROOT / "Data"))
import generate_textures  # noqa: E402

CLIENTS = (1, 4, 16)
WORKERS = os.cpu_count() or 1  # imgsim serve --workers: one process a core
K = 10


def measure(open_client, clients: int, requests: int, queries: list[bytes]) -> dict:
    """``requests`` queries shared by ``clients`` concurrent clients, each opened with
    ``open_client()`` (a context giving a function of the image's bytes) and warmed by one
    query before the clock starts."""
    per_client = -(-requests // clients)
    start = threading.Barrier(clients + 1, timeout=300)

    def client(n: int) -> list[float]:
        with open_client() as ask:
            ask(queries[n % len(queries)])
            start.wait()
            took = []
            for i in range(per_client):
                began = time.perf_counter()
                ask(queries[(n + i) % len(queries)])
                took.append(time.perf_counter() - began)
            return took

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, n) for n in range(clients)]
        start.wait()
        began = time.perf_counter()
        latencies = np.concatenate([f.result() for f in futures])
        wall = time.perf_counter() - began
    return {"requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}


@contextmanager
def served(url: str):
    """``imgsim serve`` on a free loopback port, until the block ends; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imgsim.cli", "--db", url, "serve",
                               "--port", str(port), "--workers", str(WORKERS)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"imgsim serve did not start: {server.stderr.read()}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def web_client(base: str):
    """A client of the API: one keep-alive connection."""
    import httpx2

    @contextmanager
    def opened():
        with httpx2.Client(base_url=base, timeout=120) as http:
            def ask(image: bytes):
                response = http.post("/api/similar", data={"k": str(K)},
                                     files={"image": ("query.jpg", image, "image/jpeg")})
                response.raise_for_status()
                return response.json()
            yield ask
    return opened


def python_client(url: str):
    """``imgsim.rank.similar_images`` on a store of its own."""
    @contextmanager
    def opened():
        store = SQLAlchemyStore(url)
        try:
            yield lambda image: rank.similar_images(store, image, k=K)
        finally:
            store.close()
    return opened


def sql_client(dsn: str):
    """``SELECT * FROM imgsim.similar_images(...)`` on a connection of its own."""
    import psycopg

    @contextmanager
    def opened():
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield lambda image: conn.execute(
                "SELECT * FROM imgsim.similar_images(%s, %s)", (image, K)).fetchall()
    return opened


def compare(url: str, direct, requests: int, queries: list[bytes]) -> dict:
    """The API against ``direct`` at each number of clients; ``ratio``: the API's requests
    per second over the direct calls'."""
    found = {}
    with served(url) as base:
        for clients in CLIENTS:
            web = measure(web_client(base), clients, requests, queries)
            itself = measure(direct, clients, requests, queries)
            found[clients] = {"api": web, "direct": itself,
                              "ratio": round(web["requests_per_s"]
                                             / itself["requests_per_s"], 3)}
    return found


def postgresql(stored: Path, requests: int, queries: list[bytes]) -> dict:
    """The same on PostgreSQL: IMGSIM_BENCH_DSN's database (deployed, with a classifier),
    or a throwaway cluster where the stored images are run through the pipeline; the app
    and the SQL calls then use a login that is only a member of imgsim_analyst."""
    dsn = os.environ.get("IMGSIM_BENCH_DSN")
    if dsn:
        return compare(dsn, sql_client(dsn), requests, queries)
    from bench.pipeline_time import fresh_database
    from pg_cluster import Cluster

    cluster = Cluster()
    try:
        target = fresh_database(cluster.dsn, "bench_web")
        store = open_store(target)
        run_image_similarity(store, stored, max_query_imgs_per_subdir=5,
                             max_neg_imgs_per_query_img=20, progress=False)
        store.close()
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("CREATE ROLE bench_analyst LOGIN IN ROLE imgsim_analyst")
        analyst = target.replace("postgresql://postgres@", "postgresql://bench_analyst@", 1)
        return compare(analyst, sql_client(analyst), requests, queries)
    finally:
        cluster.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48,
                        help="queries per measurement (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgsim-web-") as tmp:
        stored = generate_textures.generate(Path(tmp) / "stored", per_category=12, seed=0)
        asked = generate_textures.generate(Path(tmp) / "asked", per_category=1, seed=1)
        queries = [p.read_bytes() for p in sorted(asked.glob("*/*.jpg"))]
        url = f"sqlite:///{tmp}/web.db"
        store = open_store(url)
        run_image_similarity(store, stored, max_query_imgs_per_subdir=5,
                             max_neg_imgs_per_query_img=20, progress=False)
        store.close()
        results = {"images": 11 * 12, "k": K, "requests": args.requests, "workers": WORKERS,
                   "sqlite": compare(url, python_client(url), args.requests, queries),
                   "postgresql": postgresql(stored, args.requests, queries)}
    emit(results)


if __name__ == "__main__":
    main()
