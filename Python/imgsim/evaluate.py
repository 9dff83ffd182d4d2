"""evaluate_model: how well distances between vectors rank each query's positive.

For every evaluation pair the L2 and cosine distances between the two images'
vectors are computed (score vectors by default, as in the template; or the raw
features). Within each query, the positive's rank is one plus the number of
negatives at a distance smaller than or equal to its own (ties count against the
positive). Top-k accuracy is the share of queries whose positive ranks k or better.

With ``copies``, a second measure, of what a person means by similar: each query is
edited four ways (see :func:`edited_copies`), and each copy is ranked among every stored
image by its distance to the query (ties count against it): how often the copy comes
first, and its mean rank (the near-duplicate task of copy-detection benchmarks).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from PIL import ImageEnhance, ImageOps

from . import checks, images, lineage, rank, settings
from .featurize import features_in_use
from .rank import SPACES, ranking_key, space_vectors
from .runs import recorded, stepwise

DEFAULT_KS = (1, 2, 4, 5, 8, 10, 15, 20, 28, 32)
DISTANCES = ("l2", "cosine")
PAIR_CHUNK = 2048  # pairs whose vectors are gathered at once (1291-d: 42 MB in float64)


def distances_in(space: str) -> tuple[str, ...]:
    """The distances worth computing in ``space``: every combined vector has the same
    length, so there L2 orders exactly as cosine does and only cosine is given."""
    return ("cosine",) if space == "combined" else DISTANCES


def pair_distances(a: np.ndarray, b: np.ndarray, distance: str,
                   combined_space: rank.CombinedSpace | None = None) -> np.ndarray:
    """Row-wise distance between ``a[i]`` and ``b[i]`` (``'l2'`` or ``'cosine'``); with
    ``combined_space``, the cosine distance of combined vectors (near copies first, see
    :mod:`imgsim.rank`)."""
    checks.choice("distance", distance, DISTANCES)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if distance == "l2":
        return np.linalg.norm(a - b, axis=1)
    if combined_space is not None:
        return rank.combined_pair_distances(a, b, combined_space)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    norms = np.where(norms == 0, 1.0, norms)
    return 1.0 - np.einsum("ij,ij->i", a, b) / norms


def positive_ranks(query_ids, distances, is_positive) -> np.ndarray:
    """Rank of the positive of each query (sorted by query id); ties count against it."""
    query_ids = np.asarray(query_ids)
    distances = np.asarray(distances, np.float64)
    is_positive = np.asarray(is_positive, bool)
    order = np.argsort(query_ids, kind="stable")
    query_ids, distances, is_positive = query_ids[order], distances[order], is_positive[order]
    queries, starts = np.unique(query_ids, return_index=True)
    ranks = np.empty(len(queries), dtype=np.int64)
    for n, (start, end) in enumerate(zip(starts, list(starts[1:]) + [len(query_ids)])):
        positives = distances[start:end][is_positive[start:end]]
        if len(positives) != 1:
            raise ValueError(f"query {queries[n]} has {len(positives)} positives; expected 1")
        negatives = distances[start:end][~is_positive[start:end]]
        ranks[n] = 1 + int(np.sum(negatives <= positives[0]))
    return ranks


def topk_accuracy(ranks, ks=DEFAULT_KS) -> dict[int, float]:
    ranks = np.asarray(ranks)
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def ranking_chart(metrics: list[tuple], title: str = "Ranking accuracy") -> bytes:
    """A PNG of top-k accuracy against k, one line per distance, like the template's."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for distance in sorted({m[0] for m in metrics}):
        points = sorted((k, acc) for d, k, acc, *_ in metrics if d == distance)
        axes.plot([k for k, _ in points], [100 * a for _, a in points], marker="o",
                  label=distance)
    axes.set_xlabel("k (positive within the top k candidates)")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def query_ranks(store, space: str = "combined", feature_key: str | None = None,
                distance: str = "cosine"):
    """``(query ids, positive ids, ranks)`` of the evaluation set: the rank of each query's
    positive among its candidates by ``distance`` in ``space`` (ties count against it)."""
    pairs = np.array(store.evaluation_pairs(), dtype=np.int64).reshape(-1, 3)
    if len(pairs) == 0:
        raise lineage.StaleInputs("evaluation_images is empty: run prepare first")
    ids, _, matrix, combined_space = space_vectors(store, space, feature_key)
    row_of = {i: n for n, i in enumerate(ids.tolist())}
    missing = {int(i) for i in np.unique(pairs[:, :2]) if int(i) not in row_of}
    if missing:
        again = ("train" if space != "features" else
                 f"featurize --backbone {feature_key.split('-')[0]}")
        raise lineage.StaleInputs(f"{len(missing)} evaluation images have no {space} "
                                  f"vector: run {again}")
    first = np.array([row_of[i] for i in pairs[:, 0].tolist()], dtype=np.int64)
    second = np.array([row_of[i] for i in pairs[:, 1].tolist()], dtype=np.int64)
    distances = np.empty(len(pairs))
    for start in range(0, len(pairs), PAIR_CHUNK):  # not every pair's two vectors at once
        part = slice(start, start + PAIR_CHUNK)
        distances[part] = pair_distances(matrix[first[part]], matrix[second[part]], distance,
                                         combined_space)
    ranks = positive_ranks(pairs[:, 0], distances, pairs[:, 2])
    positives = pairs[pairs[:, 2] == 1]
    order = np.argsort(positives[:, 0], kind="stable")
    return positives[order, 0], positives[order, 1], ranks


def check_chart_path(chart_path) -> None:
    """A chart path whose folder exists (checked before any step runs)."""
    if chart_path is not None and not Path(chart_path).resolve().parent.is_dir():
        raise checks.ParameterError(f"chart_path {chart_path}: its folder does not exist")


def edited_copies(data: bytes, max_decode_bytes: int | None = None) -> list[bytes]:
    """Four edited copies of an image file, as JPEG files (the same every time): its
    middle 80% enlarged back, mirrored, brighter and more saturated, and at half size
    (the last two at JPEG quality 50)."""
    image = images.load_rgb(data, max_decode_bytes=max_decode_bytes)
    width, height = image.size
    edits = ((image.crop((width // 10, height // 10, width - width // 10,
                          height - height // 10)).resize((width, height)), 85),
             (ImageOps.mirror(image), 85),
             (ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.15)).enhance(1.3),
              50),
             (image.resize((max(1, width // 2), max(1, height // 2))), 50))
    files = []
    for edited, quality in edits:
        out = io.BytesIO()
        edited.save(out, "JPEG", quality=quality)
        files.append(out.getvalue())
    return files


def copy_ranks(store, space: str, feature_key: str | None) -> dict[str, np.ndarray]:
    """By distance, the rank of each edited copy of each evaluation query among every
    stored image but the query and its exact copies (same content), by distance to the
    query (ties count against the copy). The copies are featurized and scored with the
    current classifier's graphs."""
    queries = sorted({q for q, _, _ in store.evaluation_pairs()})
    ids, _, matrix, combined_space = space_vectors(store, space, feature_key)
    content = {i: sha for i, _, _, sha in store.image_info()}
    shas = np.array([content[i] for i in ids.tolist()])
    row_of = {i: n for n, i in enumerate(ids.tolist())}
    squares = np.einsum("ij,ij->i", matrix, matrix)
    norms = np.where(squares > 0, np.sqrt(squares), 1.0)  # no second copy of the matrix
    data = store.image_data(queries)
    budget = settings.budget(store).decode_bytes
    ranks = {d: [] for d in distances_in(space)}
    for query in queries:
        store.check_interrupts()
        row = row_of[query]
        others = shas != shas[row]
        copied = np.array([rank.query(store, copy, space).vector
                           for copy in edited_copies(data[query], budget)], np.float32)
        products = matrix @ matrix[row]
        to_all = {"cosine": _cosine_to(matrix, norms, matrix[row], combined_space),
                  "l2": np.sqrt(np.maximum(squares + squares[row] - 2 * products, 0))}
        to_copies = {"cosine": _cosine_to(copied, np.linalg.norm(copied, axis=1), matrix[row],
                                          combined_space),
                     "l2": np.sqrt(np.maximum(np.einsum("ij,ij->i", copied, copied)
                                              + squares[row] - 2 * copied @ matrix[row], 0))}
        for distance in ranks:
            competing = to_all[distance][others]
            ranks[distance] += [1 + int(np.sum(competing <= d)) for d in to_copies[distance]]
    return {d: np.array(r, dtype=np.int64) for d, r in ranks.items()}


def _cosine_to(rows, norms, vector, combined_space):
    """Cosine distances of ``rows`` (their norms ``norms``) to ``vector``; with
    ``combined_space``, the combined distances of combined rows (near copies first)."""
    if combined_space is not None:
        return rank.combined_distances(vector[None], rows, combined_space)[0]
    norms = np.where(norms == 0, 1.0, norms)
    return 1.0 - rows @ (vector / max(np.linalg.norm(vector), 1e-30)) / norms


@stepwise
def evaluate_model(store, ks=DEFAULT_KS, space: str = "combined", backbone: str | None = None,
                   weights=None, chart_path=None, copies: bool = False) -> list[dict]:
    """Rank each evaluation query's positive by L2 and cosine distance (cosine only in the
    combined space, where L2 orders the same); store the metrics.

    Parameters
    ----------
    ks : list of int
        The k of top-k accuracy (default 1 2 4 5 8 10 15 20 28 32).
    space : {'combined', 'scores', 'features'}
        The vectors compared (see :mod:`imgsim.rank`): the classifier's scores with the
        features breaking near-ties, the score vectors alone (the template's), or the raw
        backbone features: those of ``backbone`` when given, else those the current
        classifier was trained on.
    chart_path : path, optional
        Where to write the PNG chart as well (a client's file; not offered inside the
        server).
    copies : bool
        Also rank four edited copies of each query (module docstring); with the current
        classifier's backbone only. Seconds per hundred queries.

    The evaluation is refused (:class:`~imgsim.lineage.StaleInputs`) when the classifier
    was trained on another split than the current one, or when sync removed images of
    the evaluation set: the figures would not mean what they say. The run's counts name
    the split and classifier they were computed from.

    Returns
    -------
    list of dicts ``measure, distance, k, accuracy, mean_rank, median_rank``: measure
    ``template`` for the template's top-k accuracy, also stored in ranking_metrics under
    this run's id; with ``copies``, measure ``copy`` (k 1: the share of copies ranked
    first), also kept in the run's counts.

    Example
    -------
    >>> [m["accuracy"] for m in evaluate_model(store, ks=[1]) ]  # doctest: +SKIP
    [0.62, 0.58]
    """
    ks = checks.ks("ks", ks)
    checks.choice("space", space, SPACES)
    check_chart_path(chart_path)
    if not isinstance(copies, bool):
        raise checks.ParameterError(f"copies must be true or false; got {copies!r}")
    key = ranking_key(store, space, backbone, weights)
    if copies and key is not None and key != features_in_use(store):
        raise checks.ParameterError("copies are featurized with the current classifier's "
                                    f"backbone: compare its features, not {key}")
    params = {"ks": ks, "space": space}
    if key is not None:
        params["feature_key"] = key
    if copies:
        params["copies"] = True
    with recorded(store, "evaluate_model", params, with_results=True) as run:  # no lock
        yield
        used = lineage.inputs(store, space, key)
        lineage.check_evaluation_set(store, lineage.current_split(store))
        results = []
        for distance in distances_in(space):
            ranks = query_ranks(store, space, key, distance)[2]
            for k, accuracy in topk_accuracy(ranks, ks).items():
                results.append({"measure": "template", "distance": distance, "k": k,
                                "accuracy": accuracy, "mean_rank": float(np.mean(ranks)),
                                "median_rank": float(np.median(ranks))})
        copied = {}
        if copies:
            for distance, found in copy_ranks(store, space, key).items():
                results.append({"measure": "copy", "distance": distance, "k": 1,
                                "accuracy": float(np.mean(found == 1)),
                                "mean_rank": float(np.mean(found)),
                                "median_rank": float(np.median(found))})
                copied.update({f"copy_{distance}_top1": results[-1]["accuracy"],
                               f"copy_{distance}_mean_rank": results[-1]["mean_rank"],
                               "copies": len(found)})
        template = [r for r in results if r["measure"] == "template"]
        if chart_path:  # before anything is stored: a chart that cannot be written fails it
            Path(chart_path).write_bytes(ranking_chart(
                [(r["distance"], r["k"], r["accuracy"]) for r in template],
                f"Ranking accuracy ({space})"))
        with store.transaction():
            store.add_ranking_metrics(run.start(), [
                {k: r[k] for k in ("distance", "k", "accuracy", "mean_rank", "median_rank")}
                for r in template])
            lineage.unchanged(store, used, space, key, True, "evaluation")
            run.succeed(**used, queries=int(len(ranks)), pairs=store.evaluation_pair_count(),
                        **{f"{r['distance']}_top{r['k']}": r["accuracy"] for r in template},
                        **copied)
    return results
