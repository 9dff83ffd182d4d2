"""featurize_images on Ray against local threads, in a deployed PostgreSQL (a throwaway
cluster): local (this process, all cores), Ray with one node of one CPU, Ray with two
nodes of one CPU each (a head and a second raylet on loopback). The images: the reference
set and three edits of each (mirrored, flipped, turned; 6,848 contents). Each run
featurizes them all from none; its time includes connecting to Ray and starting the
actors (about 5 s here)."""

import os
import sys
import tempfile
from pathlib import Path

import psycopg
from PIL import Image

from bench.common import REFERENCE, Timer, emit
from bench.pipeline_time import fresh_database
from imgsim import featurize_images, open_store, sync_image_folder
from imgsim.featurize import backbone_graph

EDITS = {"": None, "mirrored": Image.Transpose.FLIP_LEFT_RIGHT,
         "flipped": Image.Transpose.FLIP_TOP_BOTTOM, "turned": Image.Transpose.ROTATE_90}


def write_images(out: Path) -> int:
    """The reference images and their edits, as JPEG files in category folders."""
    count = 0
    for path in sorted(REFERENCE.glob("*/*")):
        (out / path.parent.name).mkdir(exist_ok=True)
        with Image.open(path) as image:
            image = image.convert("RGB")
            for name, edit in EDITS.items():
                edited = image if edit is None else image.transpose(edit)
                edited.save(out / path.parent.name / f"{path.stem}{name}.jpg", quality=90)
                count += 1
    return count


def timed(url: str, **ray) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE imgsim.features")
        conn.execute("DELETE FROM imgsim.image_errors")
    store = open_store(url)
    with Timer() as t:
        counts = featurize_images(store, progress=False, **ray)
    store.close()
    assert counts["featurized"] + counts["reused"] == counts["pending"], counts
    return {"seconds": t.seconds, "images_per_second": counts["pending"] / t.seconds,
            "nodes": len(counts.get("nodes", {})) or None}


def main():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    from ray.cluster_utils import Cluster as RayCluster

    from pg_cluster import Cluster

    cluster = Cluster()
    try:
        url = fresh_database(cluster.dsn, "bench_ray")
        store = open_store(url)
        with tempfile.TemporaryDirectory(prefix="imgsim-ray-") as folder:
            images = write_images(Path(folder))
            sync_image_folder(store, folder, progress=False)
        backbone_graph(store)  # stored in models, where the actors load it from
        store.close()
        results = {"images": images, "cores": os.cpu_count(), "local": timed(url)}
        node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
        ray = RayCluster(initialize_head=True,
                         head_node_args={**node, "include_dashboard": False})
        try:
            results["ray_1_node"] = timed(url, ray_address=ray.address)
            ray.add_node(**node)
            results["ray_2_nodes"] = timed(url, ray_address=ray.address)
        finally:
            ray.shutdown()
    finally:
        cluster.stop()
    rate = {k: results[k]["images_per_second"] for k in ("local", "ray_1_node", "ray_2_nodes")}
    results["two_nodes_vs_one"] = rate["ray_2_nodes"] / rate["ray_1_node"]
    results["two_nodes_vs_local"] = rate["ray_2_nodes"] / rate["local"]
    emit(results)


if __name__ == "__main__":
    sys.exit(main())
