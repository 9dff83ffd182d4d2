"""featurize on a real two-node Ray cluster (a head and a second raylet, one CPU each, on
loopback only), against a real PostgreSQL server."""

import os
import signal
import subprocess
import threading
import time

import numpy as np
import psycopg
import pytest
from conftest import fresh_database, one

import generate_textures
from imgsim import ParameterError, featurize_images, open_store, sync_image_folder
from imgsim.cli import main
from imgsim.featurize import features_in_use

ACTOR = "ray::MapWorker(MapBatches(FeaturizeBlock))"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray keeps every node on 127.0.0.1 under this variable (without it, on the machine's
    network address, ray-project/ray#26293)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    yield cluster.address
    cluster.shutdown()
    patch.undo()


def synced(pg_dsn, name, folder):
    url = fresh_database(pg_dsn, name)
    store = open_store(url)
    sync_image_folder(store, folder, progress=False)
    return url, store


def features_by_path(store) -> dict[str, np.ndarray]:
    key = features_in_use(store)
    ids, _, matrix = store.feature_matrix(key)
    paths = {i: p for i, p, _, _ in store.image_info()}
    return {paths[i]: row for i, row in zip(ids, matrix)}


def test_both_nodes_featurize_what_a_local_run_computes(ray_cluster, pg_dsn, pipeline_db,
                                                        texture_folder, capsys):
    url, store = synced(pg_dsn, "imgsim_ray", texture_folder)
    assert main(["--db", url, "--quiet", "featurize", "--compute", "ray", "--ray-address",
                 ray_cluster, "--batch-size", "4"]) == 0
    counts = store.last_run("featurize_images")[2]
    assert counts["featurized"] + counts["reused"] + counts["failed"] == counts["pending"]
    assert len(counts["nodes"]) == 2 and all(n > 0 for n in counts["nodes"].values())
    assert counts["failed"] == 3  # the three bad files, recorded once each
    local = open_store(f"sqlite:///{pipeline_db[0]}")
    expected, got = features_by_path(local), features_by_path(store)
    assert sorted(got) == sorted(expected)
    for path, vector in expected.items():
        np.testing.assert_allclose(got[path], vector, rtol=1e-4, atol=1e-5)
    local.close()
    store.close()


def test_a_worker_killed_mid_job_leaves_every_image_featurized_once(ray_cluster, pg_dsn,
                                                                     tmp_path):
    folder = tmp_path / "images"
    generate_textures.generate(folder, per_category=16, size=160, seed=11)
    url, store = synced(pg_dsn, "imgsim_ray_kill", folder)
    images = len(store.image_info())
    killed = []

    def kill_one_actor_once_features_appear():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            done = one(url, "SELECT count(DISTINCT image_id) FROM imgsim.features")[0]
            actors = [int(line.split()[0]) for line in subprocess.run(
                ["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
                if ACTOR in line]
            if 0 < done and actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.append((actors[0], done))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor_once_features_appear)
    killer.start()
    try:
        counts = featurize_images(store, batch_size=2, progress=False,
                                  ray_address=ray_cluster)
    finally:
        killer.join()
    assert killed and killed[0][1] < images  # killed while images were still to do
    assert counts["featurized"] + counts["reused"] == images and counts["failed"] == 0
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT image_id, count(*) FROM imgsim.features "
                            "GROUP BY image_id, backbone").fetchall()
        ids = {r[0] for r in conn.execute("SELECT id FROM imgsim.images")}
    assert {i for i, _ in rows} == ids and {n for _, n in rows} == {1}
    assert len(rows) == 2 * len(ids)  # features and a colour layout each
    assert store.last_run("featurize_images") is not None  # the step succeeded
    store.close()


def test_an_actor_larger_than_every_node_is_refused_with_the_largest_named(ray_cluster, pg_dsn,
                                                                          small_folder):
    url, store = synced(pg_dsn, "imgsim_ray_big", small_folder)
    with pytest.raises(ParameterError, match=r"has 2 CPU\(s\).*the largest has 1"):
        featurize_images(store, ray_address=ray_cluster, cpus_per_actor=2, progress=False)
    assert one(url, "SELECT count(*) FROM imgsim.features")[0] == 0
    store.close()


def test_sqlite_is_refused_for_a_cluster_elsewhere_before_anything_is_written(empty_store):
    with pytest.raises(ParameterError, match="SQLite is a file on this machine"):
        featurize_images(empty_store, ray_address="10.0.0.7:6379")
    with pytest.raises(ParameterError, match="cpus_per_actor"):
        featurize_images(empty_store, ray_address="local", cpus_per_actor=0)
    assert empty_store.run_rows() == []
