"""featurize_images on a Ray cluster, with Ray Data.

The step itself (its lock, its runs row, the list of pending images) stays in the
calling process. Ray Data hands blocks of image ids to a pool of actors, one or more a
node; each actor opens its own connection to the database, loads the backbone graph
from the models table and checks it against the SHA-256 the caller recorded (every node
computes with the same bytes; no node needs torch), reads its images' bytes, decodes and
infers them with ONNX Runtime on the CPUs Ray gave it, and writes the block's features
back in one transaction (COPY on PostgreSQL). A block is kept whole or not at all, and
writing it again replaces its rows: a task Ray retries after a lost worker neither
duplicates nor loses a feature row, and its counts are those of the attempt that ended.

The database must be reachable from every node under the same URL. SQLite is a file on
this machine: it is refused for any cluster but a Ray started here (``ray_address=
'local'``). Ray keeps the actors' arguments, the URL among them, in its object store: give
a PostgreSQL password through each node's ``~/.pgpass`` or ``PGPASSWORD``, not the URL.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy.engine import make_url
from tqdm import tqdm

from .. import checks, settings
from ..featurize import (Featurizer, block_signals, embed_and_store, load_batch,
                         start_decoding, wait_decoded)

LOCAL = "local"  # Ray's own name for a new cluster started in this process


def check_request(store, ray_address: str, cpus_per_actor: int) -> None:
    """Refuse, before any table is touched, what cannot run on Ray."""
    if not isinstance(ray_address, str) or not 0 < len(ray_address) <= 1000:
        raise checks.ParameterError(f"ray_address must be a Ray address such as 'auto', "
                                    f"'local' or 'host:6379'; got {ray_address!r}")
    if checks.count("cpus_per_actor", cpus_per_actor, 1) > 1024:
        raise checks.ParameterError(f"cpus_per_actor must be <= 1024; got {cpus_per_actor}")
    if not store.local_files:
        raise checks.ParameterError("ray_address is for a client: inside the database a step "
                                    "runs in its server process")
    if store.dialect_name == "sqlite":
        database = make_url(store.url).database
        if database in (None, "", ":memory:"):
            raise checks.ParameterError("an in-memory SQLite database cannot be shared with "
                                        "Ray's worker processes: use a file or PostgreSQL")
        if ray_address != LOCAL:
            raise checks.ParameterError(
                f"SQLite is a file on this machine: the nodes of the Ray cluster "
                f"{ray_address!r} cannot write it. Keep the images in PostgreSQL "
                "(--db postgresql://user@host/db), or featurize with a Ray started here "
                "(--ray-address local)")
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise checks.ParameterError("Ray is not installed: pip install 'imgsim[ray]'") from None


def worker_url(store) -> str:
    """The store's URL as a process elsewhere opens it (a SQLite path made absolute)."""
    url = make_url(store.url)
    if store.dialect_name == "sqlite":
        url = url.set(database=str(Path(url.database).resolve()))
    return url.render_as_string(hide_password=False)


class FeaturizeBlock:
    """A Ray actor: one database connection and one ONNX Runtime session, for blocks of
    image ids."""

    def __init__(self, url: str, key: str, digest: str, run_id: int):
        import ray

        from ..store.sqlalchemy_store import SQLAlchemyStore

        self.store = SQLAlchemyStore(url)
        graph = self.store.load_model(key)
        if graph is None or hashlib.sha256(graph[0]).hexdigest() != digest:
            raise RuntimeError(f"the models table's graph {key} is not the one this step "
                               "started with")
        context = ray.get_runtime_context()
        cpus = max(1, int(context.get_assigned_resources().get("CPU", 1)))
        budget = settings.budget(self.store)
        # Ray starts workers with OMP_NUM_THREADS=1: the threads are set from the CPUs
        # this actor was given, explicitly.
        self.featurizer = Featurizer(graph[0], threads=cpus,
                                     max_decode_bytes=budget.decode_bytes)
        self.pool = ThreadPoolExecutor(max_workers=cpus, initializer=block_signals)
        self.key, self.run = key, SimpleNamespace(id=run_id)
        self.node = context.get_node_id()

    def __call__(self, block: dict) -> dict:
        out = {"node": [], "images": [], "featurized": [], "reused": [], "failed": []}
        for ids in block["ids"]:
            counts = self.featurize([int(i) for i in ids])
            out["node"].append(self.node)
            out["images"].append(len(ids))
            for name in ("featurized", "reused", "failed"):
                out[name].append(counts[name])
        return out

    def featurize(self, ids: list[int]) -> dict:
        batch = [(i, p, s) for i, p, _, s in self.store.image_info(ids)]
        counts = {"featurized": 0, "reused": 0, "failed": 0}
        decoded = wait_decoded(self.store, start_decoding(self.pool, self.featurizer,
                                            load_batch(self.store, self.key, batch)))
        with self.store.transaction():  # the block, and nothing of an attempt before it
            self.store.delete_run_errors(self.run.id, ids)
            embed_and_store(self.store, self.featurizer, self.key, decoded, self.run,
                             counts)
        return counts


def featurize(store, key: str, batches: list[list[tuple]], run, counts: dict,
              ray_address: str, cpus_per_actor: int = 1, progress: bool = True) -> None:
    """Featurize ``batches`` (lists of ``(image_id, path, sha256)``) on the Ray cluster at
    ``ray_address``; ``counts`` gains the totals and ``nodes`` (images done a node)."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its own progress lines
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]),
                      default=0)
        if largest < cpus_per_actor:
            raise checks.ParameterError(
                f"no node of the Ray cluster {ray_address!r} has {cpus_per_actor} CPU(s) for "
                f"an actor (the largest has {largest:g}): lower cpus_per_actor")
        # every actor from the start (a pool growing later runs the first blocks alone)
        actors = min(len(batches),
                     max(1, int(ray.available_resources().get("CPU", 1) // cpus_per_actor)))
        counts.update(actors=actors, cpus_per_actor=cpus_per_actor)
        digest = store.model_digests([key])[key][0]
        blocks = ray.data.from_items([{"ids": [i for i, _, _ in b]} for b in batches],
                                     override_num_blocks=len(batches))
        results = blocks.map_batches(
            FeaturizeBlock, fn_constructor_args=(worker_url(store), key, digest, run.id),
            batch_size=1, num_cpus=cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=actors))
        nodes = {}
        with tqdm(total=sum(map(len, batches)), desc="featurize on ray", unit="img",
                  disable=not progress) as bar:
            try:
                for row in results.iter_rows():
                    for name in ("featurized", "reused", "failed"):
                        counts[name] += int(row[name])
                    nodes[row["node"]] = nodes.get(row["node"], 0) + int(row["images"])
                    counts["nodes"] = nodes
                    bar.update(int(row["images"]))
                    run.progress(**counts)
            except ray.exceptions.RayError as exc:  # one line, not the remote traceback
                cause = getattr(exc, "cause", None) or exc
                raise RuntimeError(f"featurize on Ray failed: {type(cause).__name__}: "
                                   f"{str(cause).strip().splitlines()[-1]}") from exc
    finally:
        if started:
            ray.shutdown()
