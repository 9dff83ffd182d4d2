"""The web page and REST API of ``imgsim serve``: thin routes over the queries of
:mod:`imgsim.rank` and the results page of :mod:`imgsim.report`.

One store per app, handed to each route by :func:`get_store`. The app only reads: it
runs no step, so on PostgreSQL a login that is only a member of ``imgsim_analyst`` is
enough. Errors are JSON (``{"detail": message}``) under /api/ and a page elsewhere, with
the status of :func:`status_of`. The OpenAPI page is FastAPI's /docs.
"""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import socket
import threading
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import DBAPIError
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__, images, lineage, rank, report
from ..checks import ParameterError, UnknownImage
from ..store import SQLAlchemyStore, Store
from ..sync import MAX_FILE_BYTES

STATIC = FilePath(__file__).with_name("static")
TEMPLATES = Jinja2Templates(env=report.templates())
# The pages' own script and style, images from the app or embedded; no other origin.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
               "img-src 'self' data:; form-action 'self'; base-uri 'none'; "
               "frame-ancestors 'none'")
# /docs: FastAPI's Swagger UI page, its files from one published (immutable) version on
# the CDN, and its script may talk to this app only.
SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14/"
DOCS_POLICY = (f"default-src 'none'; script-src {SWAGGER}swagger-ui-bundle.js 'unsafe-inline'; "
               f"style-src {SWAGGER}swagger-ui.css 'unsafe-inline'; img-src 'self' data: "
               "https://fastapi.tiangolo.com; connect-src 'self'; form-action 'none'; "
               "base-uri 'none'; frame-ancestors 'none'")
FORM_OVERHEAD = 1 << 20  # a form's other fields and boundaries, beside its file
THUMBNAIL = 192  # pixels, in the pages
URL_VARIABLE = "IMGSIM_SERVE_DB"
HOSTS_VARIABLE = "IMGSIM_SERVE_HOSTS"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
# Uploads decoded at once by a process: each may take up to the decode budget (a 40 MP
# PNG: 160 MB), so that many clients uploading at once cannot pin a process's memory.
DECODING = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
GALLERY = 12  # stored images offered on the empty search page, one per category


# -- errors ---------------------------------------------------------------------------
class Error(BaseModel):
    detail: str


def status_of(exc: Exception) -> int:
    """404 an unknown image; 409 no classifier yet or stale inputs (the message names the
    step to run); 413 an image over a limit (pixels, file size); 422 any other bad
    image or parameter."""
    if isinstance(exc, UnknownImage):
        return 404
    if isinstance(exc, lineage.StaleInputs):
        return 409
    if isinstance(exc, images.ImageError) and exc.too_large:
        return 413
    return 422


def _errors(*statuses: int) -> dict:
    """The error responses of a route, for the OpenAPI page."""
    return {status: {"model": Error} for status in statuses}


# -- the store, and what routes take --------------------------------------------------
def get_store(request: Request) -> Store:
    """The app's store, shared by the requests' threads (each has its own connection)."""
    return request.app.state.store


StoreDep = Annotated[Store, Depends(get_store)]
ImageId = Annotated[int, Path(ge=1, le=2**31 - 1, description="an image's id (images.id)")]


class Options(BaseModel):
    """How to search: the parameters of :func:`imgsim.rank.similar_images`."""

    k: int = Field(10, ge=1, le=rank.MAX_K, description="how many similar images")
    space: Literal[rank.SPACES] = Field(
        "combined", description="the vectors compared: the classifier's scores with the "
        "features breaking near-ties and near copies first, the scores alone, or the "
        "features")
    category: str | None = Field(None, max_length=4096,
                                 description="only images of this category")
    max_distance: float | None = Field(None, ge=0, le=2,
                                       description="only images no farther (cosine distance)")

    @field_validator("category", "max_distance", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value == "" else value

    def query_string(self) -> str:
        return urlencode(self.model_dump(exclude_none=True))


class Asked(BaseModel):
    """The query: a stored image (``image_id``) or an upload, and the category the current
    classifier predicts for it with that category's probability."""

    image_id: int | None = None
    path: str | None = None
    category: str | None = None
    predicted: str | None = None
    probability: float | None = None


class Neighbour(BaseModel):
    rank: int
    image_id: int
    path: str
    category: str
    distance: float
    image_url: str
    thumbnail_url: str
    similar_url: str


class Similar(BaseModel):
    query: Asked
    results: list[Neighbour]


class Category(BaseModel):
    name: str
    images: int


class Run(BaseModel):
    id: int
    step: str
    status: str
    started: datetime
    finished: datetime | None
    seed: int | None
    parameters: dict
    counts: dict | None
    error: str | None


class Metric(BaseModel):
    distance: str
    k: int
    accuracy: float
    mean_rank: float
    median_rank: float


class Metrics(BaseModel):
    run_id: int
    space: str
    queries: int
    metrics: list[Metric]


# -- what the routes share --------------------------------------------------------------
def _read(upload: UploadFile) -> bytes:
    """The uploaded file's bytes, refused over the file size limit before being read."""
    if upload.size is not None and upload.size > MAX_FILE_BYTES:
        raise images.ImageError(f"the file is {upload.size / 2**20:.1f} MB, over the limit "
                                f"of {MAX_FILE_BYTES >> 20} MB", too_large=True)
    return upload.file.read()


def _search_upload(store, data: bytes, options: Options) -> tuple[Asked, list[tuple]]:
    """An uploaded image as the classifier sees it, and the stored images nearest it.
    Uploads are decoded a few at a time: each may take up to the decode budget."""
    with DECODING, store.transaction():  # one connection and transaction for the reads
        asked = rank.query(store, data, options.space)
        rows = rank.nearest(store, asked.vector, options.k, options.space, asked.feature_key,
                            options.category, options.max_distance)
    return Asked(predicted=asked.predicted, probability=asked.probability), rows


def _search_stored(store, image_id: int, options: Options) -> tuple[Asked, list[tuple]]:
    """A stored image, with its scores' prediction when it has some, and its neighbours."""
    rows = rank.similar_to(store, image_id, options.k, options.space, options.category,
                           options.max_distance)
    _, path, category, _ = store.image_info([image_id])[0]
    ids, _, predicted, scores = store.score_matrix([image_id])
    asked = Asked(image_id=image_id, path=path, category=category)
    if len(ids):
        asked.predicted, asked.probability = predicted[0], float(scores[0].max())
    return asked, rows


def _stored(store, image_id: int) -> tuple[str, str]:
    """``(path, sha256)`` of a stored image."""
    found = store.image_info([image_id])
    if not found:
        raise UnknownImage(f"image {image_id} is not in the images table")
    return found[0][1], found[0][3]


class Links:
    """The app's URLs of an image, its thumbnail and its neighbours (with ``options``)."""

    def __init__(self, request: Request, options: Options | None = None):
        self.app, self.options = request.app, options or Options()

    def image(self, image_id: int) -> str:
        return self.app.url_path_for("image", image_id=image_id)

    def thumbnail(self, image_id: int) -> str:
        return self.app.url_path_for("thumbnail", image_id=image_id)

    def similar(self, image_id: int) -> str:
        path = self.app.url_path_for("similar_page", image_id=image_id)
        return f"{path}?{self.options.query_string()}"

    def cell(self, actual: str, predicted: str) -> str:
        path = self.app.url_path_for("confusion_cell")
        return f"{path}?{urlencode({'actual': actual, 'predicted': predicted})}"

    def neighbours(self, rows) -> list[Neighbour]:
        return [Neighbour(rank=n, image_id=i, path=p, category=c, distance=d,
                          image_url=self.image(i), thumbnail_url=self.thumbnail(i),
                          similar_url=self.similar(i))
                for n, (i, p, c, d) in enumerate(rows, 1)]


def _page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    """A page of the web package's templates, its images served by the app."""
    links = context.pop("links", None) or Links(request)
    return TEMPLATES.TemplateResponse(
        request, name, {"nav": True, "thumb": links.thumbnail, "similar": links.similar,
                        "full": links.image, "cell": links.cell, **context},
        status_code=status_code, headers={"Content-Security-Policy": PAGE_POLICY})


def _search_page(request: Request, store, options: Options, query: dict | None = None,
                 rows=(), gallery=(), again: str | None = None) -> HTMLResponse:
    """The search page: the form (with the stored categories), and the query's results or
    the ``gallery`` of stored images to start from."""
    return _page(request, "search.html", links=Links(request, options), options=options,
                 spaces=rank.SPACES, max_k=rank.MAX_K, categories=store.categories(),
                 query=query, rows=rows, gallery=gallery, again=again,
                 unscored=store.unscored_count() if query else 0)


def _gallery(store) -> list[tuple]:
    """A scored image of each category (``image_info`` rows): ones that have neighbours."""
    ids, categories, _, _ = store.score_matrix()
    first = {}
    for image_id, category in zip(ids.tolist(), categories):
        first.setdefault(category, image_id)
    return store.image_info(list(first.values())[:GALLERY]) if first else []


# -- pages ----------------------------------------------------------------------------
def _query_names(dependant) -> set[str]:
    """The query parameters a route (its dependencies too) reads; a model's fields."""
    names = set()
    for field in dependant.query_params:
        model = field.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names |= {info.alias or name for name, info in model.model_fields.items()}
        else:
            names.add(field.alias)
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def known_parameters(request: Request) -> None:
    """Refuse query parameters the route does not take (a misspelt option, or options sent
    in the URL of an upload, would otherwise be ignored and the defaults used)."""
    route = request.scope.get("route")
    if route is None:
        return
    known = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", name), "input": request.query_params[name],
             "msg": f"unknown parameter (this route takes: {', '.join(sorted(known)) or 'none'})"}
            for name in unknown])


pages = APIRouter(include_in_schema=False, dependencies=[Depends(known_parameters)])


@pages.get("/", response_class=HTMLResponse)
def search(request: Request, store: StoreDep):
    return _search_page(request, store, Options(), gallery=_gallery(store))


@pages.post("/search", response_class=HTMLResponse)
def search_upload(request: Request, store: StoreDep, image: Annotated[UploadFile, File()],
                  options: Annotated[Options, Form()]):
    data = _read(image)
    asked, rows = _search_upload(store, data, options)
    preview = report.data_uri(images.thumbnail(data, THUMBNAIL))
    return _search_page(request, store, options, query={**asked.model_dump(),
                                                        "preview": preview}, rows=rows)


@pages.get("/similar/{image_id}", response_class=HTMLResponse)
def similar_page(request: Request, store: StoreDep, image_id: ImageId,
                 options: Annotated[Options, Query()]):
    asked, rows = _search_stored(store, image_id, options)
    again = request.app.url_path_for("similar_page", image_id=image_id)
    return _search_page(request, store, options, query=asked.model_dump(), rows=rows,
                        again=again)


@pages.get("/results", response_class=HTMLResponse)
def results(request: Request, store: StoreDep):
    page = report.results_page(store, lineage.current_results(store))
    return _page(request, "results.html", **page)


@pages.get("/results/confusion", response_class=HTMLResponse)
def confusion_cell(request: Request, store: StoreDep,
                   actual: Annotated[str, Query(max_length=4096)],
                   predicted: Annotated[str, Query(max_length=4096)]):
    with store.transaction():  # the test images of the classifier's own split only
        lineage.check_scores(store, lineage.current_classifier(store))
        ids = [i for i, c, p in report.classified_test_images(store)
               if (c, p) == (actual, predicted)]
        rows = store.image_info(ids) if ids else []
    return _page(request, "cell.html", actual=actual, predicted=predicted, rows=rows)


# -- the REST API ---------------------------------------------------------------------
api = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(known_parameters)])


@api.post("/similar", response_model=Similar, responses=_errors(409, 413, 422))
def similar_to_upload(request: Request, store: StoreDep,
                      image: Annotated[UploadFile, File(description="an image file")],
                      options: Annotated[Options, Form()]):
    """The stored images most similar to an uploaded image, nearest first."""
    asked, rows = _search_upload(store, _read(image), options)
    return Similar(query=asked, results=Links(request, options).neighbours(rows))


@api.get("/images/{image_id}/similar", response_model=Similar,
         responses=_errors(404, 409, 422))
def similar_to_stored(request: Request, store: StoreDep, image_id: ImageId,
                      options: Annotated[Options, Query()]):
    """The stored images most similar to stored image ``image_id`` (itself left out)."""
    asked, rows = _search_stored(store, image_id, options)
    return Similar(query=asked, results=Links(request, options).neighbours(rows))


@api.get("/images/{image_id}", name="image", response_class=Response,
         responses={200: {"content": {"image/*": {}}}, **_errors(404)})
def image_bytes(store: StoreDep, image_id: ImageId):
    """The image's file, as stored."""
    path, _ = _stored(store, image_id)
    return Response(store.image_data([image_id])[image_id],
                    media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")


@api.get("/images/{image_id}/thumbnail", name="thumbnail", response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}, **_errors(404, 422)})
def thumbnail(request: Request, store: StoreDep, image_id: ImageId,
              size: Annotated[int, Query(ge=32, le=512, multiple_of=32, description=(
                  "pixels: a multiple of 32 (few sizes, so that the cache serves them)"))]
              = THUMBNAIL):
    """A square JPEG of the image's centre, ``size`` pixels wide."""
    _, sha256 = _stored(store, image_id)
    return Response(request.app.state.thumbnail(image_id, sha256, size),
                    media_type="image/jpeg")


@api.get("/categories", response_model=list[Category])
def categories(store: StoreDep):
    """The categories of the stored images, with how many images each has."""
    return [Category(name=name, images=n) for name, n in store.categories()]


@api.get("/runs", response_model=list[Run])
def runs(store: StoreDep, step: Annotated[str | None, Query(max_length=40)] = None,
         limit: Annotated[int, Query(ge=1, le=1000)] = 50):
    """The latest runs of the steps (of ``step`` only, when given), newest first."""
    fields = Run.model_fields
    return [Run(**dict(zip(fields, row))) for row in store.run_rows(step, limit)]


@api.get("/metrics", response_model=Metrics, responses=_errors(409))
def metrics(store: StoreDep):
    """Top-k ranking accuracy of the current evaluation (of the current split and
    classifier)."""
    evaluation = lineage.current_results(store)["evaluation"]
    if evaluation is None:
        raise lineage.StaleInputs("there is no current evaluation: run evaluate")
    rows = store.metric_rows(evaluation[0])
    return Metrics(run_id=evaluation[0], space=evaluation[1].get("space", "combined"),
                   queries=evaluation[2].get("queries", 0),
                   metrics=[Metric(**dict(zip(Metric.model_fields, row))) for row in rows])


# -- the app --------------------------------------------------------------------------
def create_app(url: str, hosts=None) -> FastAPI:
    """The app over the imgsim database at ``url`` (SQLite or PostgreSQL; its tables must
    exist: the app creates nothing), answering requests for the host names ``hosts`` only
    when given (a page of another site whose name resolves here is then refused: DNS
    rebinding)."""
    store = SQLAlchemyStore(url)
    database = store.engine.url.database
    if store.dialect_name == "sqlite" and not FilePath(database or "").is_file():
        raise ParameterError(f"there is no SQLite database at {database}")
    try:
        store.image_info([0])
    except DBAPIError as exc:
        shown = store.engine.url.render_as_string(hide_password=True)
        raise ParameterError(f"{shown} holds no imgsim tables, or they cannot be read: "
                             f"{str(exc.orig).splitlines()[0]}") from None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        store.engine.dispose()

    app = FastAPI(title="imgsim", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Similar images and the results of imgsim's "
                  "steps, read from the imgsim database.")
    app.state.store = store
    if hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))

    @app.get("/docs", include_in_schema=False)
    def docs():
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="imgsim API",
                                   swagger_js_url=f"{SWAGGER}swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER}swagger-ui.css")
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page

    @functools.lru_cache(maxsize=1024)
    def thumbnail_of(image_id: int, sha256: str, size: int) -> bytes:
        """Kept by content too: SQLite may give a removed image's id to a new one."""
        return images.thumbnail(store.image_data([image_id])[image_id], size)

    app.state.thumbnail = thumbnail_of
    app.include_router(pages)
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(ParameterError, _error)
    app.add_exception_handler(images.ImageError, _error)
    app.add_exception_handler(lineage.StaleInputs, _error)
    app.add_exception_handler(RequestValidationError, _invalid)

    @app.middleware("http")
    async def nosniff(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    app.add_middleware(BodyLimit, limit=MAX_FILE_BYTES + FORM_OVERHEAD)
    return app


class BodyLimit:
    """Requests whose body is over ``limit`` bytes are answered 413 as soon as that is
    known (a declared length at once, a streamed one when it passes the limit), before
    the form parser spools them to disk."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(send)
        received, started, over = 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                raise _TooLarge
            return message

        async def sending(message):
            nonlocal started
            if over:  # the app's answer to a body cut short (a parse error): ours instead
                if not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        await JSONResponse({"detail": f"the request is over the limit of "
                                      f"{MAX_FILE_BYTES >> 20} MB for a file"},
                           status_code=413)({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


def _error(request: Request, exc: Exception):
    status = status_of(exc)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return _page(request, "error.html", status, status=status, message=str(exc),
                 title="Cannot search" if status != 409 else "Not ready")


async def _invalid(request: Request, exc: RequestValidationError):
    """Parameters FastAPI refused: its JSON under /api/, a page elsewhere."""
    if request.url.path.startswith("/api/"):
        return await request_validation_exception_handler(request, exc)
    message = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
    return _page(request, "error.html", 422, status=422, message=message,
                 title="Bad parameters")


def app_from_environment() -> FastAPI:
    """The app over the database named by IMGSIM_SERVE_DB, for the host names of
    IMGSIM_SERVE_HOSTS: what each worker process of ``imgsim serve --workers N`` builds."""
    return create_app(os.environ[URL_VARIABLE], json.loads(os.environ[HOSTS_VARIABLE]))


def host_names(host: str, allowed=()) -> list[str]:
    """The host names the app answers for: those ``allowed``, and the address it listens
    on (a loopback address: the loopback names). Listening on every address needs them
    named."""
    names = list(allowed or ())
    if host in ("0.0.0.0", "::", ""):
        if not names:
            raise ParameterError(f"--host {host or '(every address)'} listens on every "
                                 "address: name the host names clients use with "
                                 "--allowed-host (or '*' for any)")
    elif host in LOOPBACK_NAMES or host.startswith("127."):
        names += [host, *LOOPBACK_NAMES]
    else:
        names.append(host)
    return sorted(set(names))


def listening_socket(config) -> socket.socket:
    """uvicorn's socket for its worker processes, with TCP_NODELAY, which the connections
    accepted on it inherit (on Linux). uvicorn leaves it off there (asyncio sets it only on
    sockets made with IPPROTO_TCP), and each response then waited ~40 ms for a delayed ACK."""
    listening = config.bind_socket()
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listening


def serve(url: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          allowed_hosts=()) -> None:
    """Serve the app with uvicorn until interrupted, in ``workers`` processes, for the
    host names of :func:`host_names`."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    hosts = host_names(host, allowed_hosts)
    app = create_app(url, hosts)  # a wrong URL is one error, before any worker starts
    if workers == 1:
        uvicorn.run(app, host=host, port=port)
        return
    app.state.store.close()
    os.environ[URL_VARIABLE] = url  # not on the command line, where ps would show it
    os.environ[HOSTS_VARIABLE] = json.dumps(hosts)
    config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, host=host,
                            port=port, workers=workers)
    try:
        Multiprocess(config, sockets=[listening_socket(config)]).run()
    except KeyboardInterrupt:
        pass
