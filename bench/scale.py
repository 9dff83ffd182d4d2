"""Scale: featurize the 70,000 images of Debian's dataset-fashion-mnist into SQLite and
into PostgreSQL (client), reporting throughput and peak memory at 10,000 images and at
all of them: memory should stay flat. Each run is a fresh process and database."""

import gzip
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import Timer, emit, in_subprocess, peak_rss_mb

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "ankle_boot")


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folder(out: Path, limit: int) -> Path:
    """The first ``limit`` images as PNG files, one sub-folder per class."""
    if not SOURCE.is_dir():
        raise SystemExit("install Debian's dataset-fashion-mnist (make bench-scale does)")
    images = np.concatenate([_idx(SOURCE / "train-images-idx3-ubyte.gz"),
                             _idx(SOURCE / "t10k-images-idx3-ubyte.gz")])[:limit]
    labels = np.concatenate([_idx(SOURCE / "train-labels-idx1-ubyte.gz"),
                             _idx(SOURCE / "t10k-labels-idx1-ubyte.gz")])[:limit]
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for n, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels, "L").save(out / CLASSES[label] / f"{n:05d}.png")
    return out


def one_run(url: str, folder: str) -> dict:
    from imgsim import featurize_images, open_store, sync_image_folder
    from imgsim.featurize import backbone_graph

    store = open_store(url)
    sync_image_folder(store, folder, progress=False)
    backbone_graph(store)
    with Timer() as t:
        counts = featurize_images(store, progress=False)
    return {"images": counts["featurized"], "seconds": t.seconds,
            "images_per_second": counts["featurized"] / t.seconds, "peak_rss_mb": peak_rss_mb()}


def main(total: int = 70_000, small: int = 10_000):
    import psycopg

    from pg_cluster import Cluster

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        folders = {n: str(write_folder(Path(tmp) / f"fmnist{n}", n)) for n in (small, total)}
        cluster = Cluster()
        try:
            for n, folder in folders.items():
                results[f"sqlite_{n}"] = in_subprocess(
                    "scale", "run", f"sqlite:///{tmp}/scale{n}.db", folder, timeout=7200)
                name = f"scale{n}"
                with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                    conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(
                        psycopg.sql.Identifier(name)))
                results[f"postgres_{n}"] = in_subprocess(
                    "scale", "run", cluster.dsn.rsplit("/", 1)[0] + "/" + name, folder,
                    timeout=7200)
        finally:
            cluster.stop()
    emit(results)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        emit(one_run(sys.argv[2], sys.argv[3]))
    else:
        main(*map(int, sys.argv[2:]))
