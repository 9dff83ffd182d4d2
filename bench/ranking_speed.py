"""Ranking speed and recall.

``exact``  exact top-10 for 1,000 queries against 100,000 clustered candidates of the
           default backbone's dimension: imgsim's top_k_cosine against faiss IndexFlatIP
           on the same unit vectors (faiss is a bench-only dependency);
``hnsw``   pgvector HNSW (m=16, ef_construction=64) on the same kind of vectors in a
           throwaway PostgreSQL: load (binary COPY) and build time, table and index size,
           recall@10 against exact results and p50/p99 latency per query, at ef_search
           40, 100 and 200 (imgsim searches with 200).
"""

import os
import sys
import time

import numpy as np

from bench.common import Timer, emit
from imgsim.rank import top_k_cosine, unit_rows

DIM = 1280


def clustered(n: int, seed: int, centres: int = 200, latent: int = 32,
              chunk: int = 50_000) -> np.ndarray:
    """Clustered non-negative vectors of low intrinsic dimension, like pooled CNN features:
    Gaussian clusters in a 32-d latent space, mapped to DIM by a fixed random ReLU layer
    (made in chunks: a million of them take 4.8 GiB, and no more)."""
    layer = np.random.default_rng(12345).normal(size=(latent, DIM)).astype(np.float32)
    means = np.random.default_rng(6789).normal(size=(centres, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = means[rng.integers(0, centres, m)] + rng.normal(scale=0.3, size=(m, latent))
        noise = rng.normal(scale=0.01, size=(m, DIM)).astype(np.float32)
        out[start:start + m] = np.maximum(z.astype(np.float32) @ layer, 0) + noise
    return out


def exact_top_k(queries: np.ndarray, candidates: np.ndarray, k: int,
                chunk: int = 100_000) -> np.ndarray:
    """Ids of each query's k nearest candidates by cosine, a chunk of candidates at a time."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best = np.empty((len(queries), 0), dtype=np.float32)
    for start in range(0, len(candidates), chunk):
        ids, distances = top_k_cosine(queries, candidates[start:start + chunk], k)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        best = np.concatenate([best, distances], axis=1)
        keep = np.argsort(best, axis=1, kind="stable")[:, :k]
        best_ids = np.take_along_axis(best_ids, keep, 1)
        best = np.take_along_axis(best, keep, 1)
    return best_ids


def binary_copy(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Rows ``(int4, vector)`` in COPY's binary format (pgvector's binary input: int16
    dimensions, int16 unused, float4 values, all big-endian)."""
    dim = vectors.shape[1]
    row = np.dtype([("fields", ">i2"), ("id_size", ">i4"), ("id", ">i4"), ("size", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("values", ">f4", (dim,))])
    rows = np.zeros(len(ids), dtype=row)
    rows["fields"], rows["id_size"], rows["id"] = 2, 4, ids
    rows["size"], rows["dim"], rows["values"] = 4 + 4 * dim, dim, vectors
    return rows.tobytes()


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
    truth = exact_top_k(q, candidates, k)
    # the graph is built in memory while it fits: about 8.2 kB a 1280-d vector (m 16)
    memory = f"{max(1, int(np.ceil(n * 9e3 / 2**30)))}GB"
    cluster = Cluster()
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            notices = []
            conn.add_notice_handler(lambda notice: notices.append(notice.message_primary))
            conn.execute("CREATE EXTENSION vector")
            conn.execute(psycopg.sql.SQL("CREATE TABLE items (id int PRIMARY KEY, "
                                         "embedding vector({}))").format(DIM))
            with Timer() as load:
                with conn.cursor().copy("COPY items (id, embedding) FROM STDIN "
                                        "(FORMAT BINARY)") as copy:
                    copy.write(b"PGCOPY\n\xff\r\n\x00" + bytes(8))
                    for start in range(0, n, 10_000):
                        part = candidates[start:start + 10_000]
                        copy.write(binary_copy(np.arange(start, start + len(part)), part))
                    copy.write(b"\xff\xff")
                conn.execute("VACUUM ANALYZE items")
            del candidates
            conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
            conn.execute("SET max_parallel_maintenance_workers = 1")
            with Timer() as build:
                conn.execute("CREATE INDEX items_hnsw ON items "
                             "USING hnsw (embedding vector_cosine_ops)")
            size = conn.execute("SELECT pg_total_relation_size('items') - "
                                "pg_relation_size('items_hnsw'), "
                                "pg_relation_size('items_hnsw')").fetchone()
            result = {"vectors": n, "queries": queries, "load_seconds": load.seconds,
                      "build_seconds": build.seconds, "maintenance_work_mem": memory,
                      "build_workers": 2, "table_mb": size[0] / 2**20,
                      "index_mb": size[1] / 2**20,
                      "graph_fit_in_memory": not any("no longer fits" in m for m in notices)}
            for vector in q:  # warm-up: the index read once from disk, not timed
                conn.execute("SELECT id FROM items ORDER BY embedding <=> %s::vector LIMIT %s",
                             ("[" + ",".join(f"{v:.6g}" for v in vector) + "]", k))
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
                                     "median_ms": 1000 * float(np.median(latencies)),
                                     "p99_ms": 1000 * float(np.percentile(latencies, 99))}
            return result
    finally:
        cluster.stop()


if __name__ == "__main__":
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    emit({"exact": exact, "hnsw": hnsw}[sys.argv[1]](size))
