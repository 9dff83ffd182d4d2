"""Ranking speed and recall.

``exact``  exact top-10 for 1,000 queries against 100,000 clustered candidates of the
           default backbone's dimension: imgsim's top_k_cosine against faiss IndexFlatIP
           on the same unit vectors (faiss is a bench-only dependency);
``hnsw``   pgvector HNSW (m=16, ef_construction=64) on the same kind of vectors in a
           throwaway PostgreSQL: recall@10 against exact results and median latency per
           query, at ef_search 40, 100 and 200 (imgsim searches with 200).
"""

import os
import sys
import time

import numpy as np

from bench.common import Timer, emit
from imgsim.rank import top_k_cosine, unit_rows

DIM = 1280


def clustered(n: int, seed: int, centres: int = 200, latent: int = 32) -> np.ndarray:
    """Clustered non-negative vectors of low intrinsic dimension, like pooled CNN features:
    Gaussian clusters in a 32-d latent space, mapped to DIM by a fixed random ReLU layer."""
    layer = np.random.default_rng(12345).normal(size=(latent, DIM)).astype(np.float32)
    means = np.random.default_rng(6789).normal(size=(centres, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    z = means[rng.integers(0, centres, n)] + rng.normal(scale=0.3, size=(n, latent))
    noise = rng.normal(scale=0.01, size=(n, DIM))
    return np.maximum(z.astype(np.float32) @ layer, 0) + noise.astype(np.float32)


def exact(n: int = 100_000, queries: int = 1000, k: int = 10):
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    candidates, q = clustered(n, 0), clustered(queries, 1)
    cu, qu = unit_rows(candidates), unit_rows(q)
    top_k_cosine(qu[:10], cu, k)  # warm-up
    with Timer() as ours:
        mine, _ = top_k_cosine(qu, cu, k)
    index = faiss.IndexFlatIP(DIM)
    index.add(cu)
    with Timer() as theirs:
        _, found = index.search(qu, k)
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, found)])
    return {"candidates": n, "queries": queries, "imgsim_seconds": ours.seconds,
            "faiss_seconds": theirs.seconds, "speed_vs_faiss": theirs.seconds / ours.seconds,
            "agreement": float(agree)}


def hnsw(n: int = 100_000, queries: int = 200, k: int = 10):
    import psycopg

    from pg_cluster import Cluster

    candidates, q = clustered(n, 0), clustered(queries, 1)
    truth, _ = top_k_cosine(q, candidates, k)
    cluster = Cluster()
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute(psycopg.sql.SQL("CREATE TABLE items (id int PRIMARY KEY, "
                                         "embedding vector({}))").format(DIM))
            with Timer() as load:
                with conn.cursor().copy("COPY items (id, embedding) FROM STDIN") as copy:
                    for i, row in enumerate(candidates):
                        copy.write_row((i, "[" + ",".join(f"{v:.6g}" for v in row) + "]"))
            conn.execute("SET maintenance_work_mem = '4GB'")
            conn.execute("SET max_parallel_maintenance_workers = 1")
            with Timer() as build:
                conn.execute("CREATE INDEX ON items USING hnsw (embedding vector_cosine_ops)")
            result = {"vectors": n, "queries": queries, "load_seconds": load.seconds,
                      "build_seconds": build.seconds}
            for ef in (40, 100, 200):
                conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
                latencies, recall = [], []
                for vector, want in zip(q, truth):
                    text = "[" + ",".join(f"{v:.6g}" for v in vector) + "]"
                    start = time.perf_counter()
                    got = conn.execute("SELECT id FROM items ORDER BY embedding <=> %s::vector "
                                       "LIMIT %s", (text, k)).fetchall()
                    latencies.append(time.perf_counter() - start)
                    recall.append(len({g[0] for g in got} & set(want.tolist())) / k)
                result[f"ef{ef}"] = {"recall_at_10": float(np.mean(recall)),
                                     "median_ms": 1000 * float(np.median(latencies))}
            return result
    finally:
        cluster.stop()


if __name__ == "__main__":
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    emit({"exact": exact, "hnsw": hnsw}[sys.argv[1]](size))
