"""Shared fixtures: a small generated texture set (with bad files) and a database
that has run the whole pipeline once, copied for tests that change it."""

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Data"))

import generate_textures  # noqa: E402

PER_CATEGORY = 10
BAD_FILES = {
    "striped/truncated.jpg": "cannot decode",
    "striped/not_an_image.jpg": "not an image",
    "dotted/empty.png": "empty file",
}


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Keep exported graphs in a throwaway cache, so tests exercise the export."""
    cache = tmp_path_factory.mktemp("onnx_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("IMGSIM_CACHE", str(cache))
    yield cache
    patch.undo()


def add_odd_files(folder: Path) -> None:
    """Bad files that must be recorded, and odd modes that must be converted."""
    good = (folder / "striped" / "striped_000.jpg").read_bytes()
    (folder / "striped" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "striped" / "not_an_image.jpg").write_text("this is not an image")
    (folder / "dotted" / "empty.png").write_bytes(b"")
    dotted = Image.open(folder / "dotted" / "dotted_001.jpg")
    dotted.convert("RGBA").save(folder / "dotted" / "rgba.png")
    dotted.convert("P").save(folder / "dotted" / "palette.png")
    dotted.convert("CMYK").save(folder / "dotted" / "cmyk.jpg")
    gray16 = (np.asarray(dotted.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "dotted" / "gray16.png")


@pytest.fixture(scope="session")
def texture_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("textures")
    generate_textures.generate(folder, per_category=PER_CATEGORY, size=128, seed=3)
    add_odd_files(folder)
    return folder


@pytest.fixture
def small_folder(texture_folder, tmp_path):
    """A private folder of 3 categories x 4 images, to change on disk."""
    folder = tmp_path / "small"
    for category in ("argyle", "dotted", "zebra"):
        (folder / category).mkdir(parents=True)
        for n in range(4):
            name = f"{category}_{n:03d}.jpg"
            shutil.copy(texture_folder / category / name, folder / category / name)
    return folder


@pytest.fixture(scope="session")
def pipeline_db(tmp_path_factory, texture_folder):
    """A SQLite file on which run_image_similarity has run once, and its results."""
    from imgsim import open_store, run_image_similarity

    path = tmp_path_factory.mktemp("db") / "pipeline.db"
    store = open_store(f"sqlite:///{path}")
    results = run_image_similarity(store, texture_folder, max_query_imgs_per_subdir=5,
                                   max_neg_imgs_per_query_img=20, seed=1, progress=False)
    store.close()
    return path, results


@pytest.fixture
def pipeline_store(pipeline_db, tmp_path):
    """A private copy of the pipeline database."""
    from imgsim import open_store

    copy = tmp_path / "copy.db"
    shutil.copy(pipeline_db[0], copy)
    store = open_store(f"sqlite:///{copy}")
    yield store
    store.close()


@pytest.fixture
def empty_store(tmp_path):
    from imgsim import open_store

    store = open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    yield store
    store.close()


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


# -- PostgreSQL ------------------------------------------------------------------------
def psql(dsn, script, **variables):
    """Run ``script`` with psql (stops at the first error); returns stdout."""
    args = ["psql", dsn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    done = subprocess.run(args, input=script, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"psql failed: {done.stderr}")
    return done.stdout


def one(dsn, query, params=()):
    """One row of ``query``, in autocommit mode as psql runs (so CALL may commit)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchone()


SERVER_VENV = Path(os.environ.get("IMGSIM_TEST_SERVER_VENV", "/tmp/imgsim-test-server-venv"))


@pytest.fixture(scope="session")
def pg_cluster():
    """The throwaway PostgreSQL 15 cluster the tests start (None under IMGSIM_TEST_DSN)."""
    if os.environ.get("IMGSIM_TEST_DSN"):
        yield None
        return
    from pg_cluster import Cluster

    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster):
    """A real PostgreSQL 15 server: IMGSIM_TEST_DSN, or a throwaway cluster."""
    return os.environ.get("IMGSIM_TEST_DSN") or pg_cluster.dsn


def fresh_database(pg_dsn: str, name: str) -> str:
    """A new empty database on the test server; returns its DSN."""
    from psycopg import sql

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_dsn.rsplit("/", 1)[0] + "/" + name


def as_role(dsn: str, role: str) -> str:
    """The same DSN for another login role (the test server trusts loopback)."""
    return dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


@pytest.fixture(scope="session")
def deployed(pg_dsn):
    """imgsim deployed into the test database (server-side environment kept between runs)."""
    from imgsim.deploy import deploy

    report = deploy(pg_dsn, server_venv=SERVER_VENV, log=lambda *a: None)
    return pg_dsn, report


@pytest.fixture(scope="session")
def server_folder(texture_folder):
    """The texture set where the server's OS user can read it."""
    folder = Path(tempfile.mkdtemp(prefix="imgsim-images-"))
    os.chmod(folder, 0o755)
    shutil.copytree(texture_folder, folder, dirs_exist_ok=True)
    subprocess.run(["chmod", "-R", "o+rX", str(folder)], check=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def check_combined_search(store, monkeypatch) -> None:
    """rank.nearest in the combined space answers the rows of a full ranking, near copies
    first (one the classifier scores as another class too, one it scores less surely,
    whose features are further, and one found by its colour layout alone); with pgvector it
    reads the features of part of the collection only."""
    from imgsim import rank
    from imgsim.featurize import features_in_use

    key = features_in_use(store)
    ids, categories, matrix, space = rank.space_vectors(store, "combined", key)
    width = space.scores_dim
    read = []
    real = store.feature_matrix
    monkeypatch.setattr(store, "feature_matrix", lambda k, wanted=None: read.append(
        len(ids) if wanted is None else len(wanted)) or real(k, wanted))
    other = (int(np.argmax(matrix[0, :width])) + 1) % width  # image 0, scored as another class
    copy = np.concatenate([np.eye(width, dtype=np.float32)[other], matrix[0, width:]])
    own = int(np.argmax(matrix[0, :width]))  # image 0's category, predicted less surely
    unsure = np.full(width, 0.2 / width, np.float32)
    unsure[own] += 0.45
    unsure[other] += 0.35
    end = matrix.shape[1] - rank.LAYOUT_DIM  # the features' columns: [width:end]
    features = matrix[0, width:end] / np.linalg.norm(matrix[0, width:end])
    aside = np.random.default_rng(0).standard_normal(len(features)).astype(np.float32)
    aside -= (aside @ features) * features
    aside /= np.linalg.norm(aside)
    near = 1 - 0.75 * space.scale * rank.NEAR_SAME_CATEGORY  # 0.15 from image 0's at scale 1
    moved = near * features + np.sqrt(1 - near ** 2) * aside
    blurred = rank.combined(unsure[None], moved[None])[0]
    # image 0's colour layout only: another category's scores, features opposite to image 0's
    halved = rank.combined(np.eye(width)[other][None], -features[None],
                           matrix[:1, end:])[0]
    queries = ([(matrix[row], int(ids[row])) for row in (0, 7, 21)]
               + [(copy, -1), (blurred, -1), (halved, -1)])
    for vector, exclude in queries:
        for k, category in ((1, None), (5, None), (30, None), (4, categories[7])):
            read.clear()
            got = rank.nearest(store, vector, k, "combined", key, category, exclude=exclude)
            keep = (ids != exclude) & np.array([category in (None, c) for c in categories])
            idx, dist = rank.top_k_cosine(vector[None], matrix[keep], k, combined_space=space)
            assert [g[0] for g in got] == ids[keep][idx[0]].tolist()
            assert [g[3] for g in got] == pytest.approx(dist[0].tolist(), abs=1e-5)
            if store.has_vectors() and k <= 5:  # a few nearest: part of the features
                assert sum(read) < len(ids)
    assert [r[0] for r in rank.nearest(store, copy, 1, "combined", key)] == [ids[0]]
    assert [r[0] for r in rank.nearest(store, blurred, 1, "combined", key)] == [ids[0]]
    assert [r[0] for r in rank.nearest(store, halved, 1, "combined", key)] == [ids[0]]
    assert rank.nearest(store, copy[:width], 1, "scores", key)[0][0] != ids[0]
    if store.has_vectors():
        check_near_copies_from_the_index(store, key, ids, matrix, space)


def check_near_copies_from_the_index(store, key, ids, matrix, space) -> None:
    """The index answers the near copies of a query whose nearest image by features, within
    NEAR_SAME_CATEGORY but not NEAR_COPY (both scaled), is predicted another category: it
    takes more from the index until it has k near copies."""
    from imgsim import rank

    width, scale = space.scores_dim, space.scale
    features = rank.unit_rows(matrix[:, width:matrix.shape[1] - rank.LAYOUT_DIM])
    predictions = rank.predicted(matrix, width)
    halfway = 1 - np.sqrt((1 + features @ features.T) / 2)  # from the mean of two images
    a, b = np.argwhere((predictions[:, None] != predictions[None, :])
                       & (halfway > 0.12 * scale) & (halfway < 0.17 * scale))[0]
    vector = rank.combined(matrix[a:a + 1, :width],
                           (features[a] + 1.1 * features[b])[None])[0]  # nearer b, a's scores
    d_features = 1 - features @ rank.unit_rows(vector[None, width:-rank.LAYOUT_DIM])[0]
    assert scale * rank.NEAR_COPY <= d_features[b] == d_features.min() < d_features[a]
    near = (d_features < scale * rank.NEAR_COPY) | (
        (predictions == predictions[a]) & (d_features < scale * rank.NEAR_SAME_CATEGORY))
    expected = ids[near][np.argsort(d_features[near], kind="stable")]
    for k in (1, 3):
        got = rank._near_copies(store, key, vector, space, k, None, None, ids, predictions)
        assert ids[b] not in got and set(expected[:k].tolist()) <= set(got)
