"""The web page and REST API (imgsim serve) through FastAPI's TestClient: every route, every
error status, and that the app only reads (on PostgreSQL, as a member of imgsim_analyst)."""

import hashlib
import io
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import imgsim.web.app
from imgsim import lineage, rank, report
from imgsim.checks import ParameterError
from imgsim.cli import build_parser, main
from imgsim.store import SQLAlchemyStore
from imgsim.sync import sync_image_folder
from imgsim.web.app import create_app, host_names, listening_socket


@pytest.fixture
def db(pipeline_db, tmp_path):
    """A private copy of the pipeline database, and a store reading it."""
    path = tmp_path / "web.db"
    shutil.copy(pipeline_db[0], path)
    store = SQLAlchemyStore(f"sqlite:///{path}")
    yield path, store
    store.close()


@pytest.fixture
def client(db):
    with TestClient(create_app(f"sqlite:///{db[0]}")) as client:
        yield client


@pytest.fixture
def unready(small_folder, empty_store):
    """The app over a database with images but no classifier yet."""
    sync_image_folder(empty_store, small_folder, progress=False)
    with TestClient(create_app(empty_store.url)) as client:
        yield client


def upload(texture_folder, path="zebra/zebra_003.jpg"):
    return {"image": ("query.jpg", (texture_folder / path).read_bytes(), "image/jpeg")}


def image_id(store, path) -> int:
    return next(i for i, p, _, _ in store.image_info() if p == path)


def same(results, rows):
    """The API's results are ``rows`` of imgsim.rank, in the same order."""
    assert [(r["image_id"], r["path"], r["category"]) for r in results] == [
        row[:3] for row in rows]
    assert [r["distance"] for r in results] == pytest.approx([row[3] for row in rows])


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels, with one tiny data chunk:
    refused on its header, before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


# -- similar images ----------------------------------------------------------------------
def test_similar_to_an_upload_is_what_similar_images_answers(client, db, texture_folder):
    response = client.post("/api/similar", files=upload(texture_folder), data={"k": "4"})
    assert response.status_code == 200
    body = response.json()
    assert body["query"]["predicted"] == "zebra" and 0.5 < body["query"]["probability"] <= 1
    data = (texture_folder / "zebra" / "zebra_003.jpg").read_bytes()
    same(body["results"], rank.similar_images(db[1], data, k=4))
    assert body["results"][0]["path"] == "zebra/zebra_003.jpg"
    assert body["results"][0]["distance"] == pytest.approx(0, abs=1e-6)
    first = body["results"][0]
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    assert first["image_url"] == f"/api/images/{first['image_id']}"
    assert first["thumbnail_url"] == f"/api/images/{first['image_id']}/thumbnail"
    assert first["similar_url"] == f"/similar/{first['image_id']}?k=4&space=combined"


def test_an_upload_search_filters_by_category_and_distance(client, texture_folder):
    body = client.post("/api/similar", files=upload(texture_folder),
                       data={"k": "5", "category": "dotted", "space": "features"}).json()
    assert len(body["results"]) == 5 and {r["category"] for r in body["results"]} == {"dotted"}
    near = client.post("/api/similar", files=upload(texture_folder),
                       data={"k": "5", "space": "features", "max_distance": "0.0001"}
                       ).json()["results"]
    assert [r["path"] for r in near] == ["zebra/zebra_003.jpg"]  # itself, nothing else


def test_similar_to_a_stored_image_leaves_it_out(client, db):
    zebra = image_id(db[1], "zebra/zebra_003.jpg")
    response = client.get(f"/api/images/{zebra}/similar", params={"k": 5, "space": "features"})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] | {"probability": None} == {
        "image_id": zebra, "path": "zebra/zebra_003.jpg", "category": "zebra",
        "predicted": "zebra", "probability": None}
    same(body["results"], rank.similar_to(db[1], zebra, k=5, space="features"))
    assert zebra not in [r["image_id"] for r in body["results"]]


def test_the_search_page_offers_the_stored_categories_and_images(client, db):
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    counts = Counter(c for _, _, c, _ in db[1].image_info())
    for category, n in counts.items():
        assert f'<option value="{category}">{category} ({n})</option>' in html
    assert html.count('class="similar"') == len(counts)  # one stored image per category,
    assert "not_an_image.jpg" not in html  # one that has neighbours
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/search.js").status_code == 200


def test_an_uploaded_image_shows_its_prediction_and_k_neighbours(client, texture_folder):
    response = client.post("/search", files=upload(texture_folder, "dotted/dotted_002.jpg"),
                           data={"k": "7", "category": "", "max_distance": ""})
    assert response.status_code == 200
    html = response.text
    assert "<dd>uploaded</dd>" in html and "dotted, probability" in html
    assert 'src="data:image/jpeg;base64,' in html  # the upload itself, not stored
    assert html.count('<figure class="card') == 7 and "7 similar images" in html


def test_a_search_by_a_stored_image_has_a_shareable_url(client, db):
    zebra = image_id(db[1], "zebra/zebra_003.jpg")
    response = client.get(f"/similar/{zebra}?k=3&category=zebra&max_distance=")
    assert response.status_code == 200
    html = response.text
    assert html.count('<figure class="card hit') == 3 and "3 similar images" in html
    assert f"#{zebra} <span" in html and "probability" in html
    assert "?k=3&amp;space=combined&amp;category=zebra" in html  # the links keep the search
    assert f'formaction="/similar/{zebra}"' in html


def test_pages_escape_what_they_are_given(client, db):
    zebra = image_id(db[1], "zebra/zebra_003.jpg")
    attack = "<script>alert(1)</script>"
    html = client.get(f"/similar/{zebra}", params={"category": attack}).text
    assert attack not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    html = client.get("/results/confusion", params={"actual": attack, "predicted": "x"}).text
    assert attack not in html and "&lt;script&gt;" in html
    html = client.get(f"/similar/{zebra}", params={"space": attack}).text  # in the error
    assert attack not in html


# -- images --------------------------------------------------------------------------------
def test_an_image_and_its_thumbnail(client, db):
    zebra = image_id(db[1], "zebra/zebra_003.jpg")
    response = client.get(f"/api/images/{zebra}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == db[1].image_data([zebra])[zebra]
    for size, want in ((None, 192), (64, 64)):
        thumb = client.get(f"/api/images/{zebra}/thumbnail",
                           params={} if size is None else {"size": size})
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (want, want)
    cache = client.app.state.thumbnail
    hits = cache.cache_info().hits
    assert client.get(f"/api/images/{zebra}/thumbnail?size=64").content == thumb.content
    assert cache.cache_info().hits == hits + 1
    for size in (8, 65, 1024):  # a few sizes only: each new one is decoded again
        assert client.get(f"/api/images/{zebra}/thumbnail?size={size}").status_code == 422


def test_an_unreadable_image_has_no_thumbnail(small_folder, empty_store):
    (small_folder / "zebra" / "broken.jpg").write_bytes(b"not an image at all")
    sync_image_folder(empty_store, small_folder, progress=False)
    broken = image_id(empty_store, "zebra/broken.jpg")
    with TestClient(create_app(empty_store.url)) as client:
        response = client.get(f"/api/images/{broken}/thumbnail")
    assert response.status_code == 422 and "not an image" in response.json()["detail"]


# -- categories, runs, metrics, results --------------------------------------------------
def test_categories_runs_and_metrics(client, db):
    store = db[1]
    counts = Counter(c for _, _, c, _ in store.image_info())
    assert client.get("/api/categories").json() == [
        {"name": name, "images": n} for name, n in sorted(counts.items())]
    runs = client.get("/api/runs").json()
    assert [r["id"] for r in runs] == sorted((r["id"] for r in runs), reverse=True)
    assert {r["step"] for r in runs} >= {"prepare_data", "train_classifier", "rank_candidates"}
    train = client.get("/api/runs", params={"step": "train_classifier", "limit": 1}).json()
    assert len(train) == 1 and train[0]["counts"]["model"].startswith("mlp-run")
    metrics = client.get("/api/metrics").json()
    evaluation = lineage.current_results(store)["evaluation"]
    assert metrics["run_id"] == evaluation[0] and metrics["space"] == "combined"
    assert [(m["distance"], m["k"], m["accuracy"]) for m in metrics["metrics"]] == [
        row[:3] for row in store.metric_rows(evaluation[0])]


def test_the_results_page(client, db):
    response = client.get("/results")
    assert response.status_code == 200
    html = response.text
    for part in ("Lineage", "prepare run", "Test accuracy per category", "Confusion matrix",
                 "Ranking accuracy (classifier scores", 'src="data:image/png;base64,',
                 "Worst queries", "Images not used (3)", "not an image (format not recognised)",
                 "Top candidates for 8 of"):
        assert part in html, part
    assert "/results/confusion?actual=zebra&amp;predicted=zebra" in html
    assert 'src="/api/images/' in html and "similar to this" in html


def test_a_confusion_cell_lists_the_images_behind_it(client, db):
    predictions = report.classified_test_images(db[1])
    actual, predicted = next((c, p) for _, c, p in predictions if c != p)
    behind = [i for i, c, p in predictions if (c, p) == (actual, predicted)]
    html = client.get("/results/confusion",
                      params={"actual": actual, "predicted": predicted}).text
    assert f"Test images of {actual} predicted as {predicted}" in html
    assert html.count('<figure class="card miss') == len(behind)
    for i in behind:
        assert f'src="/api/images/{i}/thumbnail"' in html
    from imgsim import prepare_data
    prepare_data(db[1], seed=7, max_query_imgs_per_subdir=5, max_neg_imgs_per_query_img=20)
    stale = client.get("/results/confusion", params={"actual": actual, "predicted": predicted})
    assert stale.status_code == 409 and "run train again" in stale.text  # not another split's


def test_the_api_is_documented(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/similar", "/api/images/{image_id}/similar", "/api/images/{image_id}",
            "/api/images/{image_id}/thumbnail", "/api/categories", "/api/runs",
            "/api/metrics"} <= set(paths)
    assert not {"/", "/search", "/results"} & set(paths)
    assert "413" in paths["/api/similar"]["post"]["responses"]


# -- errors ------------------------------------------------------------------------------
def test_an_undecodable_upload_is_422(client):
    response = client.post("/api/similar", files={"image": ("x.jpg", b"not an image", "")})
    assert response.status_code == 422
    assert response.json() == {"detail": "not an image (format not recognised)"}


def test_an_image_over_the_pixel_limit_is_413(client):
    response = client.post("/api/similar", files={"image": ("big.png", png_declaring(
        10_000, 5_000), "image/png")})
    assert response.status_code == 413
    assert "10000x5000 pixels is over the limit" in response.json()["detail"]


def test_a_file_over_the_size_limit_is_413_before_it_is_read(client, monkeypatch):
    monkeypatch.setattr(imgsim.web.app, "MAX_FILE_BYTES", 1 << 20)
    response = client.post("/api/similar", files={"image": ("big.jpg", b"\0" * (2 << 20), "")})
    assert response.status_code == 413
    assert response.json()["detail"] == "the file is 2.0 MB, over the limit of 1 MB"
    page = client.post("/search", files={"image": ("big.jpg", b"\0" * (2 << 20), "")})
    assert page.status_code == 413 and "over the limit of 1 MB" in page.text


def test_a_body_over_the_limit_is_refused_before_it_is_spooled(db, monkeypatch):
    """Over the file limit (and a form's overhead), a declared or streamed body is
    answered 413 without being read to the end (the form parser would spool it to disk)."""
    monkeypatch.setattr(imgsim.web.app, "MAX_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(imgsim.web.app, "FORM_OVERHEAD", 1 << 10)
    def chunks():  # a file part of 4 MB, 64 KB at a time, without a declared length
        yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(64):
            yield b"\0" * (64 << 10)

    with TestClient(create_app(f"sqlite:///{db[0]}")) as client:
        declared = client.post("/api/similar", files={"image": ("big.jpg", b"\0" * (2 << 20))})
        assert declared.status_code == 413 and "over the limit of 1 MB" in declared.text
        streamed = client.post("/api/similar", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413  # not the parser's 400 for a body cut short
        assert client.get("/api/categories").status_code == 200


def test_an_unknown_image_is_404(client):
    for url in ("/api/images/99999", "/api/images/99999/thumbnail",
                "/api/images/99999/similar"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert response.json() == {"detail": "image 99999 is not in the images table"}
    page = client.get("/similar/99999")
    assert page.status_code == 404 and "image 99999 is not in the images table" in page.text


def test_no_classifier_yet_is_409_naming_the_step_to_run(unready, texture_folder):
    response = unready.post("/api/similar", files=upload(texture_folder))
    assert response.status_code == 409 and "run train first" in response.json()["detail"]
    assert unready.get("/api/images/1/similar").status_code == 409
    assert "run evaluate" in unready.get("/api/metrics").json()["detail"]
    page = unready.post("/search", files=upload(texture_folder))
    assert page.status_code == 409 and "run train first" in page.text
    results = unready.get("/results")
    assert results.status_code == 200 and "run prepare first" in results.text
    assert "Confusion matrix" not in results.text


def test_bad_parameters_are_422(client, db):
    zebra = image_id(db[1], "zebra/zebra_003.jpg")
    for params in ({"k": 0}, {"k": rank.MAX_K + 1}, {"space": "pixels"},
                   {"max_distance": 3}, {"max_distance": "far"}):
        response = client.get(f"/api/images/{zebra}/similar", params=params)
        assert response.status_code == 422, params
        assert response.json()["detail"][0]["loc"][-1] == next(iter(params))
        page = client.get(f"/similar/{zebra}", params=params)
        assert page.status_code == 422 and "Bad parameters" in page.text
    assert client.get("/api/runs", params={"limit": 0}).status_code == 422
    assert client.post("/api/similar", data={"k": "3"}).status_code == 422  # no image


def test_concurrent_requests_share_the_one_store(client):
    """Requests run on many threads sharing the app's store: each thread keeps its own open
    transaction."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a race would show
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda n: client.get(
                "/api/categories" if n % 2 else f"/api/images/{1 + n % 20}/similar").status_code,
                range(80)))
    finally:
        sys.setswitchinterval(interval)
    assert statuses == [200] * 80


def test_uploads_are_decoded_a_few_at_a_time(client, texture_folder, monkeypatch):
    """However many clients upload at once, a process decodes at most DECODING at a time
    (each decode may take the whole decode budget)."""
    import threading

    monkeypatch.setattr(imgsim.web.app, "DECODING", threading.BoundedSemaphore(2))
    real, busy, most, guard = rank.query, [0], [0], threading.Lock()

    def counted(*args, **kwargs):
        with guard:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                busy[0] -= 1

    monkeypatch.setattr(rank, "query", counted)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda n: client.post(
            "/api/similar", data={"k": "2"}, files=upload(texture_folder)).status_code,
            range(16)))
    assert statuses == [200] * 16 and most[0] <= 2


def test_requests_for_other_host_names_are_refused(db):
    """A page of another site whose name resolves to this machine (DNS rebinding) cannot
    read the app, nor steer its redirects."""
    app = create_app(f"sqlite:///{db[0]}", host_names("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/categories").status_code == 200
        assert client.get("/api/categories", headers={"Host": "localhost:8000"}).status_code \
            == 200
        for host in ("attacker.example:8000", "attacker.example"):
            assert client.get("/api/images/1", headers={"Host": host}).status_code == 400
        assert client.get("/results/", headers={"Host": "evil.example"},
                          follow_redirects=False).status_code == 400
    assert host_names("0.0.0.0", ["photos.example"]) == ["photos.example"]
    assert host_names("192.0.2.7") == ["192.0.2.7"]
    with pytest.raises(ParameterError, match="--allowed-host"):
        host_names("0.0.0.0")


def test_options_a_route_does_not_take_are_refused(client, db, texture_folder):
    """A misspelt option, or options in the URL of an upload (where the form's are read),
    would be ignored: the defaults would answer as if asked."""
    response = client.post("/api/similar?k=3&space=bogus", files=upload(texture_folder))
    assert response.status_code == 422
    assert {e["loc"][1] for e in response.json()["detail"]} == {"k", "space"}
    assert client.get("/api/images/2/similar", params={"spcae": "features"}).status_code == 422
    assert "spcae" in client.get("/similar/2", params={"spcae": "features"}).text
    assert client.get("/api/images/2/similar", params={"space": "features"}).status_code == 200


def test_ids_beyond_the_database_integers_are_422_not_500(client):
    for path in ("/api/images/2147483648", "/api/images/2147483648/thumbnail",
                 "/api/images/99999999999999999999/similar", "/similar/2147483648"):
        assert client.get(path).status_code == 422, path


def test_the_api_page_loads_one_pinned_script_that_talks_only_to_the_app(client):
    docs = client.get("/docs")
    policy = docs.headers["content-security-policy"]
    assert docs.status_code == 200 and "swagger-ui-dist@5.17.14/swagger-ui-bundle.js" in docs.text
    assert "connect-src 'self'" in policy and "swagger-ui-dist@5/" not in docs.text
    assert client.get("/redoc").status_code == 404


# -- the app only reads -------------------------------------------------------------------
def test_the_app_writes_nothing(db, texture_folder):
    before = hashlib.sha256(db[0].read_bytes()).hexdigest()
    with TestClient(create_app(f"sqlite:///{db[0]}")) as client:
        assert client.post("/api/similar", files=upload(texture_folder)).status_code == 200
        assert client.get("/api/images/3/similar").status_code == 200
        assert client.get("/results").status_code == 200
    assert hashlib.sha256(db[0].read_bytes()).hexdigest() == before


def test_an_app_needs_an_imgsim_database_and_creates_none(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    with pytest.raises(ParameterError, match="no SQLite database"):
        create_app(f"sqlite:///{missing}")
    assert not missing.exists()
    other = tmp_path / "other.db"
    other.write_bytes(b"")  # a database without tables
    with pytest.raises(ParameterError, match="holds no imgsim tables"):
        create_app(f"sqlite:///{other}")
    assert main(["serve", "--db", f"sqlite:///{missing}"]) == 2
    assert "no SQLite database" in capsys.readouterr().err and not missing.exists()


def test_serve_takes_db_before_or_after_the_command_and_binds_loopback():
    parse = build_parser().parse_args
    assert parse(["serve", "--db", "sqlite:///a.db"]).db == "sqlite:///a.db"
    served = parse(["--db", "sqlite:///b.db", "serve", "--port", "8123"])
    assert (served.db, served.host, served.port) == ("sqlite:///b.db", "127.0.0.1", 8123)


def test_connections_to_the_workers_send_at_once():
    """TCP_NODELAY on the workers' socket: without it each response waited for a delayed
    ACK (~40 ms a request)."""
    config = uvicorn.Config("imgsim.web.app:app_from_environment", host="127.0.0.1", port=0)
    with listening_socket(config) as listening:
        listening.listen()
        with socket.create_connection(listening.getsockname()):
            accepted, _ = listening.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return found


def test_serve_with_workers_answers_from_each(db, texture_folder):
    """``imgsim serve --workers 2``: the processes answer what imgsim.rank answers, and the
    database URL is passed to them in their environment, not on command lines ps shows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"sqlite:///{db[0]}"
    server = subprocess.Popen([sys.executable, "-m", "imgsim.cli", "--quiet", "serve",
                               "--db", url, "--port", str(port), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx2.get(f"{base}/api/categories", timeout=5).raise_for_status()
                break
            except httpx2.TransportError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "imgsim serve did not start"
                time.sleep(0.2)
        expected = rank.similar_images(db[1], (texture_folder / "zebra/zebra_003.jpg")
                                       .read_bytes(), k=5)
        answered = set()
        for _ in range(4):  # new connections: the workers share the accepting
            with httpx2.Client(base_url=base, timeout=60) as http:
                response = http.post("/api/similar", data={"k": "5"},
                                     files=upload(texture_folder))
                same(response.json()["results"], expected)
                answered.add(response.status_code)
        assert answered == {200}
        workers = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children(server.pid)]
        assert len(workers) >= 2 and not any(url.encode() in c for c in workers)
    finally:
        server.terminate()
        server.wait(30)


def test_an_analyst_login_is_enough_on_postgresql(pg_dsn, texture_folder):
    from conftest import SERVER_VENV, as_role, fresh_database
    from imgsim import open_store, run_image_similarity
    from imgsim.deploy import deploy

    dsn = fresh_database(pg_dsn, "imgsim_web")
    deploy(dsn, server_venv=SERVER_VENV, log=lambda *a: None)
    owner = open_store(dsn)
    run_image_similarity(owner, texture_folder, max_query_imgs_per_subdir=3,
                         max_neg_imgs_per_query_img=10, progress=False)
    runs = len(owner.run_rows(limit=1000))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS web_reader")
        conn.execute("CREATE ROLE web_reader LOGIN IN ROLE imgsim_analyst")
    zebra = image_id(owner, "zebra/zebra_003.jpg")
    with TestClient(create_app(as_role(dsn, "web_reader"))) as client:
        for space in ("scores", "features"):  # features: pgvector's index
            body = client.post("/api/similar", files=upload(texture_folder),
                               data={"k": "3", "space": space}).json()
            assert body["results"][0]["path"] == "zebra/zebra_003.jpg", space
            assert client.get(f"/api/images/{zebra}/similar",
                              params={"space": space}).status_code == 200
        for url in ("/", "/results", f"/api/images/{zebra}/thumbnail", "/api/metrics",
                    "/api/runs", "/api/categories"):
            assert client.get(url).status_code == 200, url
    assert len(owner.run_rows(limit=1000)) == runs
    owner.close()


def test_copies_and_label_conflicts_are_listed_conflicts_first(small_folder, empty_store,
                                                               tmp_path):
    zebra = (small_folder / "zebra").iterdir().__next__()
    shutil.copy(zebra, small_folder / "argyle" / "filed_twice.jpg")  # a label conflict
    dotted = sorted((small_folder / "dotted").glob("*.jpg"))[0]
    shutil.copy(dotted, small_folder / "dotted" / "again.jpg")        # a plain copy
    sync_image_folder(empty_store, small_folder, progress=False)
    groups = report.copy_groups(empty_store.copies())
    assert [g["categories"] for g in groups] == [["argyle", "zebra"], ["dotted"]]
    assert {p for _, p, _ in groups[1]["images"]} == {f"dotted/{dotted.name}", "dotted/again.jpg"}
    with TestClient(create_app(empty_store.url)) as client:
        html = client.get("/results").text
    assert "2 contents stored more than once: 4 files, 2 of them extra copies" in html
    assert html.index("argyle/filed_twice.jpg") < html.index("dotted/again.jpg")
    assert html.count("<strong>conflict</strong>") == 1
    offline = report.write_report(empty_store, tmp_path / "report.html").read_text()
    assert "argyle/filed_twice.jpg" in offline and "<strong>conflict</strong>" in offline
