"""Entry point of the routines in ``SQLPy/procedures.sql``.

Each SQL routine ends in a few lines of PL/Python that put the deployed environment on
``sys.path`` and call :func:`call` here with the step's name and its arguments; the
step code is the package's own, running on a
:class:`~imgsim.store.plpy_store.PlpyStore`. Errors reach the SQL caller as SQL
errors: bad parameters with SQLSTATE 22023 (invalid_parameter_value).
"""

from __future__ import annotations

from .checks import ParameterError
from .evaluate import evaluate_model
from .featurize import feature_key, featurize_images, features_in_use
from .pipeline import run_image_similarity
from .prepare import prepare_data
from .rank import rank_candidates, similar_images
from .store.plpy_store import PlpyStore
from .sync import sync_image_folder
from .train import score_images, train_classifier


def _evaluate(store, **kw):
    return [(m["distance"], m["k"], m["accuracy"], m["mean_rank"], m["median_rank"])
            for m in evaluate_model(store, **kw)]


def _refresh(store, top_k_candidates=10, space="scores"):
    """The scheduled job: featurize new images, re-score with the current classifier,
    rank again."""
    train = store.last_run("train_classifier")
    if train is None:
        raise ValueError("no classifier has been trained yet: nothing to refresh")
    backbone, weights = train[1]["backbone"], train[1].get("weights")
    featurize_images(store, backbone, weights, progress=False)
    key = features_in_use(store)
    if key != feature_key(backbone, weights):  # a fine-tuned backbone's features too
        featurize_images(store, model=key, progress=False)
    score_images(store)
    rank_candidates(store, top_k_candidates, space)


STEPS = {
    "sync_image_folder": lambda store, folder: sync_image_folder(store, folder, progress=False),
    "featurize_images": lambda store, **kw: featurize_images(store, progress=False, **kw),
    "prepare_data": prepare_data,
    "train_classifier": train_classifier,
    "evaluate_model": _evaluate,
    "rank_candidates": rank_candidates,
    "run_image_similarity": lambda store, **kw: run_image_similarity(store, progress=False,
                                                                     **kw),
    "similar_images": similar_images,
    "refresh": _refresh,
}


def call(plpy, step: str, **arguments):
    """Run ``step`` inside the server with the non-NULL ``arguments``."""
    store = PlpyStore(plpy)
    arguments = {k: v for k, v in arguments.items() if v is not None}
    if "ks" in arguments:
        arguments["ks"] = list(arguments["ks"])
    try:
        return STEPS[step](store, **arguments)
    except ParameterError as exc:
        raise plpy.spiexceptions.InvalidParameterValue(str(exc)) from None
