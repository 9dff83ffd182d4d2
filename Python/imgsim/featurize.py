"""featurize_images: CNN embeddings of every image, run by ONNX Runtime.

Each backbone is exported once to ONNX (see :mod:`imgsim.backbones`), keyed by the
SHA-256 of its weights: cached on disk (``$IMGSIM_CACHE``, default
``~/.cache/imgsim``) and stored in the models table, from which later runs load it
without torch. Images are decoded on a worker thread while the previous batch is
inferred; only one batch of image bytes is held at a time, and a batch holds no more
images than the memory setting allows (:mod:`imgsim.settings`), so memory stays flat
however many images there are and whatever batch size is asked for. Each finished
batch is kept (committed) before the next one starts. The step is incremental: an image
whose content already has features for this backbone (under any path) is not run again,
and content already recorded as undecodable is not retried.

Each image also gets its *colour layout* (:func:`colour_layout`, stored like features
under ``LAYOUT_KEY``): the combined ranking space takes an image whose colour layout
nearly matches the query's for a near copy (:mod:`imgsim.rank`). Images featurized
before colour layouts existed are featurized once more to get theirs.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backbones, checks, settings
from .images import MAX_PIXELS, ImageError, preprocess
from .runs import recorded, stepwise
from .store.base import to_blob

STEP = "featurize_images"
LAYOUT_KEY = "colour-layout-16"
LAYOUT_SIDE = 16
LAYOUT_DIM = LAYOUT_SIDE * LAYOUT_SIDE * 3


def cache_dir() -> Path:
    return Path(os.environ.get("IMGSIM_CACHE", Path.home() / ".cache" / "imgsim"))


def feature_key(backbone: str, weights=None) -> str:
    """The name features and the exported graph are kept under: backbone, input size and
    weights hash (so new weights or new preprocessing never mix with old features)."""
    digest = backbones.file_sha256(backbones.weights_path(backbone, weights))
    return f"{backbone}-{backbones.INPUT_SIZE}@{digest[:12]}"


def backbone_graph(store, backbone: str = backbones.DEFAULT_BACKBONE, weights=None):
    """ONNX bytes of ``backbone``: from the models table, the disk cache, or a fresh export
    (stored in both). Returns ``(key, onnx_bytes)``. Inside the server only the models
    table is used (no torch, no files written)."""
    key = feature_key(backbone, weights)
    stored = store.load_model(key)
    if stored is not None:
        return key, stored[0]
    if not store.local_files:
        raise checks.ParameterError(
            f"backbone {backbone}{' with these weights' if weights else ''} is not in the "
            "models table: deploy stores the default backbone; store another by featurizing "
            f"with it once from a client (imgsim --db ... featurize --backbone {backbone})")
    cached = cache_dir() / f"{key}.onnx"
    if cached.is_file():
        graph = cached.read_bytes()
    else:
        graph = backbones.export_onnx(backbone, weights)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(graph)
        tmp.replace(cached)
    with store.transaction():
        store.save_model(key, "backbone", graph, graph_metadata(backbone))
    return key, graph


def graph_metadata(backbone: str) -> dict:
    """What the models table keeps beside a backbone graph (its ``input_size`` marks it)."""
    spec = backbones.get_spec(backbone)
    return {"backbone": backbone, "dim": spec.dim, "input_size": backbones.INPUT_SIZE,
            "mean": list(spec.mean), "std": list(spec.std), "weights": spec.weights_source}


@contextmanager
def signals_blocked():
    """Threads started inside inherit a mask that blocks every signal, so that signals
    (Ctrl-C; a cancel or shutdown inside a PostgreSQL backend) reach the main thread."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def block_signals() -> None:
    """In a worker thread: leave every signal to the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def onnx_session(graph: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for a graph given as bytes (telemetry off: see
    ``imgsim/__init__.py``)."""
    import onnxruntime as ort

    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: the cores go to the threads decoding the
    # next batch meanwhile (measured: 12-megapixel photos 33 img/s against 29, the
    # reference set unchanged, on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with signals_blocked():  # ONNX Runtime's thread pool starts here
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class Featurizer:
    """Bytes of images to embeddings with one backbone graph; ``max_decode_bytes`` bounds
    the memory decoding one image may take (see :mod:`imgsim.settings`)."""

    def __init__(self, graph: bytes, threads: int | None = None,
                 max_decode_bytes: int | None = None):
        self.session = onnx_session(graph, threads)
        self.input = self.session.get_inputs()[0].name
        self.max_decode_bytes = max_decode_bytes

    def prepare(self, data: bytes):
        """Preprocess one image; an ImageError is returned, not raised."""
        try:
            return preprocess(data, MAX_PIXELS, self.max_decode_bytes)
        except ImageError as exc:
            return exc

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0].astype(np.float32)

    def embed(self, data: bytes) -> np.ndarray:
        """The embedding of one image (raises ImageError for a bad one)."""
        array = self.prepare(data)
        if isinstance(array, ImageError):
            raise array
        return self.run(array[None])[0]


def colour_layout(array: np.ndarray) -> np.ndarray:
    """The colour layout of a preprocessed image (288 x 288 x 3 pixels): the means of its 18 x 18
    pixel blocks, each channel's mean removed, unit length (zeros for a flat image). Near
    copies of a picture, halved, recompressed or recoloured, keep nearly the same one."""
    side = LAYOUT_SIDE
    block = array.shape[0] // side
    means = array.astype(np.float32).reshape(side, block, side, block, -1).mean(axis=(1, 3))
    means -= means.mean(axis=(0, 1))
    norm = np.linalg.norm(means)
    return (means / norm if norm > 0 else means).ravel()


def features_in_use(store, backbone: str | None = None, weights=None) -> str:
    """The feature key of ``backbone``; by default the current classifier's (a fine-tuned
    backbone's when it was tuned), or the default backbone's before any training."""
    if backbone is None:
        train = store.last_run("train_classifier")
        if train is not None:
            return train[2].get("feature_key") or train[1]["feature_key"]
        backbone = backbones.DEFAULT_BACKBONE
    return feature_key(backbone, weights)


@stepwise
def featurize_images(store, backbone: str = backbones.DEFAULT_BACKBONE, weights=None,
                     batch_size: int = 32, progress: bool = True, model: str | None = None,
                     workers: int | None = None, ray_address: str | None = None,
                     cpus_per_actor: int = 1) -> dict:
    """Compute features for every image that has none for ``backbone`` (or ``model``).

    Parameters
    ----------
    store : Store
    backbone : {'efficientnet_lite0', 'mobilenet_v2', 'resnet18'}
    weights : path, optional
        A torchvision-format state_dict file (required for resnet18).
    batch_size : int
        Images per batch (1 to 1024); fewer when the memory setting allows fewer.
    model : str, optional
        The name of a backbone graph in the models table (such as a fine-tuned one,
        ``efficientnet_lite0-288-tuned@...``) to use instead of ``backbone``.
    workers : int, optional
        Threads decoding the next batch while the current one is inferred (Pillow decodes
        and resizes without holding the GIL): by default half the cores, at least one;
        one inside the server (each may take the memory setting's decoding share). An
        image refused for memory is tried again by the next featurize.
    ray_address : str, optional
        Decode and infer on a Ray cluster instead of this process
        (:mod:`imgsim.compute.ray_featurize`): ``'auto'``, ``'host:6379'``,
        ``'ray://host:10001'``, or ``'local'`` to start one here. Needs ``imgsim[ray]``.
    cpus_per_actor : int
        On Ray: the CPUs each featurizing actor takes (and ONNX Runtime's threads in it).

    Returns
    -------
    dict of counts: ``featurized``, ``reused`` (same content seen before),
    ``failed`` (recorded in image_errors), ``pending`` (images considered),
    ``batch_size`` (images per batch at most, as the memory setting allowed; a batch also
    holds no more bytes of files than it allows).

    Example
    -------
    >>> featurize_images(store)  # doctest: +SKIP
    {'pending': 352, 'featurized': 350, 'reused': 0, 'failed': 2, 'batch_size': 16}
    """
    checks.choice("backbone", backbone, sorted(backbones.SPECS))
    batch_size = checks.count("batch_size", batch_size, 1)
    if batch_size > 1024:
        raise checks.ParameterError(f"batch_size must be <= 1024; got {batch_size}")
    workers = default_workers(store) if workers is None else checks.count("workers", workers, 1)
    if workers > 64:
        raise checks.ParameterError(f"workers must be <= 64; got {workers}")
    if model is None and backbone == "resnet18" and weights is None:
        raise checks.ParameterError("backbone resnet18 needs weights=PATH (a torchvision-"
                                    "format state_dict file)")
    if ray_address is not None:
        from .compute import ray_featurize

        ray_featurize.check_request(store, ray_address, cpus_per_actor)
    if weights is not None:
        weights = store.readable_path(weights, "weights")
    params = {"backbone": backbone, "weights": str(weights) if weights else None,
              "batch_size": batch_size}
    if ray_address is not None:
        params.update(ray_address=ray_address, cpus_per_actor=cpus_per_actor)
    if model is None:
        key = feature_key(backbone, weights)
        if not store.local_files and not store.model_digests([key]):
            backbone_graph(store, backbone, weights)  # refuses, saying how to store it
    else:
        found = store.model_digests([model]).get(model)
        if found is None or "input_size" not in found[1]:
            raise checks.ParameterError(f"model {model!r} is not a backbone graph in the "
                                        "models table")
        key = model
        params.update(backbone=found[1]["backbone"], weights=None, model=model)
    params["feature_key"] = key
    budget = settings.budget(store)
    batch_size = min(batch_size, budget.images_at_once)
    with store.lock(), recorded(store, STEP, params) as run:
        yield
        graph = (backbone_graph(store, backbone, weights)[1] if model is None
                 else store.load_model(model)[0])
        with store.transaction():  # a copy of content that failed before fails the same way
            store.add_image_errors([{"run_id": run.id, **row}
                                    for row in store.unrecorded_bad_copies(STEP)])
        pending = store.pending_images(key, STEP, LAYOUT_KEY)
        counts = {"pending": len(pending), "featurized": 0, "reused": 0, "failed": 0,
                  "batch_size": batch_size, "workers": workers}
        run.progress(**counts)
        if ray_address is not None:
            del counts["workers"]  # on Ray: actors, each with its CPUs
        if pending and ray_address is not None:
            ray_featurize.featurize(store, key, _batches(pending, batch_size,
                                                         budget.batch_bytes),
                                    run, counts, ray_address, cpus_per_actor, progress)
        elif pending:
            featurizer = Featurizer(graph, max_decode_bytes=budget.decode_bytes)
            bar = tqdm(total=len(pending), desc=f"featurize {backbone}", unit="img",
                       disable=not progress)
            batches = _batches(pending, batch_size, budget.batch_bytes)
            # Store access stays on this thread (plpy is single-threaded); the workers
            # only decode, the next batch while this one is inferred. Stopped, the step
            # waits for the decodes in progress (none is left running), not the queued.
            pool = ThreadPoolExecutor(max_workers=workers, initializer=block_signals)
            try:
                future = start_decoding(pool, featurizer, load_batch(store, key, batches[0]))
                for index in range(len(batches)):
                    decoded = wait_decoded(store, future)
                    if index + 1 < len(batches):
                        future = start_decoding(pool, featurizer,
                                         load_batch(store, key, batches[index + 1]))
                    embed_and_store(store, featurizer, key, decoded, run, counts)
                    bar.update(len(batches[index]))
                    run.progress(force=True, **counts)
                    yield
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        run.counts.update(counts)
    return counts


def _batches(pending, images: int, max_bytes: int) -> list[list[tuple]]:
    """``pending`` in order, in batches of at most ``images`` images and ``max_bytes``
    bytes of files (a larger file makes a batch of its own)."""
    batches, batch, held = [], [], 0
    for image_id, path, sha, size in pending:
        if batch and (len(batch) == images or held + size > max_bytes):
            batches.append(batch)
            batch, held = [], 0
        batch.append((image_id, path, sha))
        held += size
    return batches + ([batch] if batch else [])


def prepare_answering(store, featurizer, data: bytes):
    """Preprocess one image on a worker thread, checking for a cancel while it decodes.
    A cancel waits for the decode in progress (bounded by the limits of
    :mod:`imgsim.images`): a thread left behind in a server process would keep its
    memory, and its CPU, after the call."""
    with ThreadPoolExecutor(max_workers=1, initializer=block_signals) as pool:
        future = pool.submit(featurizer.prepare, data)
        while True:
            try:
                return future.result(timeout=0.25)
            except TimeoutError:
                store.check_interrupts()


def default_workers(store) -> int:
    """Decoding threads: half the cores on a client, one inside the server (where the
    DBA's memory setting is shared by the images decoded at once)."""
    return 1 if not store.local_files else max(1, (os.cpu_count() or 1) // 2)


def wait_decoded(store, decoding):
    """The decoded batch, answering a cancel while the workers decode."""
    reused_rows, todo, copies, futures = decoding
    arrays = []
    for (image_id, path, sha), future in zip(todo, futures):
        while True:
            try:
                arrays.append((image_id, path, sha, future.result(timeout=0.25)))
                break
            except TimeoutError:
                store.check_interrupts()
    return reused_rows, arrays, copies


def load_batch(store, key, batch):
    """Fetch one batch's bytes; take vectors of content already featurized instead
    (``(features, colour layout)``), and decode a content that the batch holds twice only once."""
    shas = {sha for _, _, sha in batch}
    layouts = store.vectors_by_sha(LAYOUT_KEY, shas)
    reused = {s: (v, layouts[s]) for s, v in store.vectors_by_sha(key, shas).items()
              if s in layouts}
    todo, copies, seen = [], [], set()
    for image_id, path, sha in batch:
        if sha in reused:
            continue
        if sha in seen:
            copies.append((image_id, path, sha))
        else:
            seen.add(sha)
            todo.append((image_id, path, sha))
    data = store.image_data([i for i, _, _ in todo]) if todo else {}
    return [(i, s, reused[s]) for i, _, s in batch if s in reused], todo, copies, data


def start_decoding(pool, featurizer, loaded):
    """Start decoding a loaded batch on the pool: ``(reused rows, todo, copies, futures)``."""
    reused_rows, todo, copies, data = loaded
    futures = [pool.submit(featurizer.prepare, data.pop(i)) for i, _, _ in todo]
    return reused_rows, todo, copies, futures


def embed_and_store(store, featurizer, key, decoded, run, counts):
    reused_rows, arrays, copies = decoded
    good = [(i, s, a) for i, _, s, a in arrays if not isinstance(a, ImageError)]
    failed = {s: a for _, _, s, a in arrays if isinstance(a, ImageError)}
    errors = [{"run_id": run.id, "image_id": i, "path": p, "sha256": s, "step": STEP,
               "reason": str(failed[s]), "retry": failed[s].transient} for i, p, s in
              [(i, p, s) for i, p, s, _ in arrays] + copies if s in failed]
    rows = list(reused_rows)
    if good:
        vectors = featurizer.run(np.stack([a for _, _, a in good]))
        rows += [(i, s, (to_blob(v), to_blob(colour_layout(a))))
                 for (i, s, a), v in zip(good, vectors)]
    vector_of = {s: v for _, s, v in rows}
    copied = [(i, s, vector_of[s]) for i, _, s in copies if s in vector_of]
    with store.transaction():
        store.put_features(key, [(i, s, v) for i, s, (v, _) in rows + copied])
        store.put_features(LAYOUT_KEY, [(i, s, t) for i, s, (_, t) in rows + copied])
        store.delete_image_errors(STEP, {s for _, s, _ in rows + copied} | set(failed),
                                  retry_only=True)  # tried again: the new outcome stands
        store.add_image_errors(errors)
    counts["featurized"] += len(good)
    counts["reused"] += len(reused_rows) + len(copied)
    counts["failed"] += len(errors)
