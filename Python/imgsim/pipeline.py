"""run_image_similarity: every step in order, as the template's main procedure."""

from __future__ import annotations

from . import checks
from .backbones import DEFAULT_BACKBONE, SPECS
from .evaluate import DEFAULT_KS, evaluate_model
from .featurize import featurize_images
from .finetune import DEFAULT_EPOCHS, check_request
from .prepare import DEFAULT_SEED, prepare_data
from .rank import SPACES, rank_candidates
from .store.sqlalchemy_store import libpq_dsn
from .sync import sync_image_folder
from .train import KINDS, train_classifier


def run_image_similarity(store, image_folder=None, backbone: str = DEFAULT_BACKBONE,
                         weights=None, ratio_train_test: float = 0.75,
                         max_query_imgs_per_subdir: int = 20,
                         max_neg_imgs_per_query_img: int = 100, top_k_candidates: int = 10,
                         ks=DEFAULT_KS, kind: str = "mlp", space: str = "scores",
                         seed: int = DEFAULT_SEED, fine_tune: bool = False,
                         epochs: int = DEFAULT_EPOCHS, chart_path=None,
                         progress: bool = True) -> dict:
    """Sync (when ``image_folder`` is given), featurize, prepare, train (fine-tuning the
    backbone first when ``fine_tune``), evaluate, rank.

    Every parameter is checked before any step runs. Returns each step's result
    under its name.
    """
    checks.choice("backbone", backbone, sorted(SPECS))
    checks.ratio("ratio_train_test", ratio_train_test)
    checks.count("max_query_imgs_per_subdir", max_query_imgs_per_subdir, 1)
    checks.count("max_neg_imgs_per_query_img", max_neg_imgs_per_query_img, 0)
    checks.count("top_k_candidates", top_k_candidates, 1)
    checks.ks("ks", ks)
    checks.choice("kind", kind, KINDS)
    checks.choice("space", space, SPACES)
    checks.count("seed", seed, 0)
    if fine_tune:
        check_request(epochs)
    if backbone == "resnet18" and weights is None:
        raise checks.ParameterError("backbone resnet18 needs weights=PATH")
    results = {}
    if image_folder is not None:
        results["sync_image_folder"] = sync_image_folder(store, image_folder, progress=progress)
    results["featurize_images"] = featurize_images(store, backbone, weights, progress=progress)
    results["prepare_data"] = prepare_data(store, backbone, weights, ratio_train_test,
                                      max_query_imgs_per_subdir, max_neg_imgs_per_query_img,
                                      seed)
    results["train_classifier"] = train_classifier(store, backbone, weights, kind, seed,
                                                   fine_tune, epochs, progress)
    # evaluate and rank use the features the classifier was just trained on
    results["evaluate_model"] = evaluate_model(store, ks, space, chart_path=chart_path)
    results["rank_candidates"] = rank_candidates(store, top_k_candidates, space)
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
