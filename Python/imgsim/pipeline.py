"""run_image_similarity: every step in order, as the template's main procedure; refresh:
what the scheduled job runs."""

from __future__ import annotations

from . import checks, lineage
from .backbones import DEFAULT_BACKBONE, SPECS
from .backbones import weights_path as backbones_weights_path
from .evaluate import DEFAULT_KS, check_chart_path, evaluate_model
from .featurize import featurize_images, features_in_use
from .finetune import DEFAULT_EPOCHS, VALIDATION, check_request
from .prepare import DEFAULT_SEED, prepare_data
from .rank import SPACES, check_k, rank_candidates
from .runs import stepwise
from .store.sqlalchemy_store import libpq_dsn
from .sync import sync_image_folder
from .train import KINDS, score_images, train_classifier


@stepwise
def run_image_similarity(store, image_folder=None, backbone: str = DEFAULT_BACKBONE,
                         weights=None, ratio_train_test: float = 0.75,
                         max_query_imgs_per_subdir: int = 20,
                         max_neg_imgs_per_query_img: int = 100, top_k_candidates: int = 10,
                         ks=DEFAULT_KS, kind: str = "mlp", space: str = "combined",
                         seed: int = DEFAULT_SEED, fine_tune: bool = False,
                         epochs: int = DEFAULT_EPOCHS, chart_path=None,
                         progress: bool = True, replace: bool = False,
                         keep_conflicts: bool = False, workers: int | None = None,
                         ray_address: str | None = None, cpus_per_actor: int = 1,
                         validation: float = VALIDATION,
                         tune_minutes: float | None = None) -> dict:
    """Sync (when ``image_folder`` is given), featurize, prepare, train (fine-tuning the
    backbone first when ``fine_tune``: see :func:`imgsim.train_classifier` for
    ``epochs``, ``validation`` and ``tune_minutes``), evaluate, rank.

    Every parameter is checked before any step runs; the steps run under one lock, so
    no other run's step comes between them, and each step's results are kept (committed,
    with its record) before the next one starts, so a later failure takes none of them
    back. Returns each step's result under its name. ``ray_address`` featurizes on a
    Ray cluster (see :func:`imgsim.featurize_images`).
    """
    checks.choice("backbone", backbone, sorted(SPECS))
    checks.ratio("ratio_train_test", ratio_train_test)
    checks.count("max_query_imgs_per_subdir", max_query_imgs_per_subdir, 1)
    checks.count("max_neg_imgs_per_query_img", max_neg_imgs_per_query_img, 0)
    check_k("top_k_candidates", top_k_candidates)
    checks.ks("ks", ks)
    checks.choice("kind", kind, KINDS)
    checks.choice("space", space, SPACES)
    seed = checks.seed("seed", seed)
    check_chart_path(chart_path)
    if workers is not None:
        checks.count("workers", workers, 1)
    if fine_tune:
        check_request(epochs, validation, tune_minutes)
    if ray_address is not None:
        from .compute import ray_featurize

        ray_featurize.check_request(store, ray_address, cpus_per_actor)
    if backbone == "resnet18" and weights is None:
        raise checks.ParameterError("backbone resnet18 needs weights=PATH")
    if weights is not None:
        weights = store.readable_path(weights, "weights")
        backbones_weights_path(backbone, weights)  # it exists and is not too large
    if image_folder is not None:
        store.readable_path(image_folder, "folder")
    results = {}
    with store.lock():  # each step's result and record are kept (yield) before the next
        if image_folder is not None:
            results["sync_image_folder"] = yield from sync_image_folder.stretches(
                store, image_folder, replace, progress=progress)
            yield
        results["featurize_images"] = yield from featurize_images.stretches(
            store, backbone, weights, progress=progress, workers=workers,
            ray_address=ray_address, cpus_per_actor=cpus_per_actor)
        yield
        results["prepare_data"] = yield from prepare_data.stretches(
            store, backbone, weights, ratio_train_test, max_query_imgs_per_subdir,
            max_neg_imgs_per_query_img, seed, keep_conflicts)
        yield
        results["train_classifier"] = yield from train_classifier.stretches(
            store, backbone, weights, kind, seed, fine_tune, epochs, progress, validation,
            tune_minutes)
        yield
        # evaluate and rank use the features the classifier was just trained on
        results["evaluate_model"] = yield from evaluate_model.stretches(
            store, ks, space, chart_path=chart_path)
        yield
        results["rank_candidates"] = yield from rank_candidates.stretches(
            store, top_k_candidates, space)
    return results


@stepwise
def refresh(store, top_k_candidates: int = 10, space: str = "combined") -> dict:
    """The scheduled job: featurize new images, re-score every image with the current
    classifier, rank again (refused, saying what to run, when the classifier is stale)."""
    check_k("top_k_candidates", top_k_candidates)
    checks.choice("space", space, SPACES)
    train = store.last_run("train_classifier")
    if train is None:
        raise lineage.StaleInputs("no classifier has been trained yet: nothing to refresh")
    results = {}
    with store.lock():  # each step's result and record are kept (yield) before the next
        # the graphs stored when the classifier was trained: no file is read again
        base, key = train[1]["feature_key"], features_in_use(store)
        results["featurize_images"] = yield from featurize_images.stretches(
            store, model=base, progress=False)
        yield
        if key != base:  # a fine-tuned backbone's features too
            results["featurize_tuned"] = yield from featurize_images.stretches(
                store, model=key, progress=False)
            yield
        results["score_images"] = yield from score_images.stretches(store)
        yield
        results["rank_candidates"] = yield from rank_candidates.stretches(
            store, top_k_candidates, space)
    return results


def run_in_database(dsn: str, image_folder=None, **parameters) -> None:
    """The in-database compute context: ``CALL imgsim.run_image_similarity(...)`` with the
    same parameters; ``image_folder`` is a path on the database server."""
    import psycopg
    from psycopg import sql

    arguments = {"image_folder": None if image_folder is None else str(image_folder),
                 **parameters}
    arguments = {k: (list(v) if k == "ks" else v) for k, v in arguments.items()
                 if v is not None}
    call = sql.SQL("CALL imgsim.run_image_similarity({})").format(sql.SQL(", ").join(
        sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in arguments))
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        conn.execute(call, arguments)
