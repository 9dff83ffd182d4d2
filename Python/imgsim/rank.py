"""rank_candidates: the top-k most similar candidates of each query image.

Similarity is cosine, computed one block of queries at a time as a single matrix
product against all (unit-normalised) candidates, followed by a partial sort
(``argpartition``) of each row; ties are broken by candidate id. Stored rankings are
exact, the same on a client and in the server; ``similar_images`` on one new image uses
pgvector's HNSW index in feature space where the server has it (approximate: recall@10
0.993 in bench/RESULTS.md). The query itself is excluded unless ``include_self``.

The ranking space is one of:

- ``combined`` (the default): the classifier's score vector and the backbone features,
  each unit-normalised, the features weighted by ``FEATURE_WEIGHT``; the cosine distance
  is then ``(d_scores + w d_features) / (1 + w)``. The scores decide between categories;
  among images the classifier scores alike (a confident classifier scores most of a
  category alike) the features decide, so the most similar come first instead of a tie
  broken by id. A *near copy* (the same picture cropped, mirrored, recoloured, resized) is
  an image whose features are within ``s NEAR_COPY`` cosine distance of the query's, or
  within ``s NEAR_SAME_CATEGORY`` where the classifier predicts one category for both (a
  copy it scores less surely than the original), or whose colour layout
  (:func:`imgsim.featurize.colour_layout`, the last columns of a combined row) is within
  ``NEAR_LAYOUT`` of the query's (a halved or recompressed copy, whose features
  moved). Its score distance is left out: its distance is
  ``(NEAR_COPY / NEAR_SAME_CATEGORY) w d_copy / (1 + w)``, with
  ``d_copy = min(d_features, s (NEAR_COPY / NEAR_LAYOUT) d_layout)``, below any other
  image's distance (at least ``w s NEAR_COPY / (1 + w)``), so near copies come first,
  nearest first, even where the classifier scores them apart. The feature thresholds were
  chosen on the reference set, where ``s`` is 1; on a collection whose images' features lie
  closer together ``s`` is smaller (:func:`near_scale`), or a collection of small
  look-alike images (digits) would be mostly "near copies".
- ``scores``: the classifier's score vectors alone (the template's).
- ``features``: the backbone features alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import checks, lineage, settings
from .featurize import LAYOUT_DIM, LAYOUT_KEY, colour_layout, features_in_use
from .images import ImageError
from .runs import recorded, stepwise
from .sync import MAX_FILE_BYTES

SPACES = ("combined", "scores", "features")
# Reference set, seed 42 (template top-k by cosine / edited copies of the queries ranked
# first): weight 0: 48.2% top-1, 91.8% top-32 / 16%; 0.1: 50.0%, 91.8% / 69%; 0.3: 47.7%,
# 91.4% / 76%; 1: 42.3%, 89.5% / 82%; features alone: 6.4%, 50.0% / 94%.
FEATURE_WEIGHT = 0.1
# Near copies, measured on the reference set, default configuration, five seeds (copies
# ranked first / template top-1): none 69.0% / 44.7%; features within 0.1: 80.0% / 44.7%;
# 0.12: 83.2%, 0.13: 84.5% (top-1 kept, but other products of one photo shoot, a zebra vest
# for a paisley one, pass from 0.104); 0.15: 87.1%, 0.2: 91.0% / 44.2% (a zebra print
# T-shirt for an argyle one). What 0.1 misses is mostly the halved copies (features at
# median 0.145) and the cropped ones (0.097). Within 0.1, or 0.2 and one predicted
# category: 84.9% / 44.9% (offline); and a colour layout within 0.03 (16 x 16, 94.2% alone;
# greyscale ones took T-shirts of one cut for copies): 95.9% / 44.9%, every seed >= 95.6%
# and no top-1 lower (bench/RESULTS.md).
NEAR_COPY = 0.1
NEAR_SAME_CATEGORY = 0.2
NEAR_LAYOUT = 0.03
# The feature thresholds scale with a collection's close pairs: the 1% quantile of the
# cosine distances between its distinct training images' features (train_classifier
# measures it). Reference set 0.29 (five seeds; 0.30 to 0.34 fine-tuned); 8 x 8 digits
# 0.032, where half of all pairs are within 0.1 (unscaled, the default top-1 fell from 85%
# to 19%; scaled, 84.3%); fashion-mnist 0.15 (58.0%; bench/RESULTS.md). At or above
# CLOSE_PAIRS the thresholds are as chosen; below, in proportion. Scaled by the median pair
# distance instead (digits 0.19), the rule on one predicted category still cost digits 2
# points of top-1 (seed 0, offline).
CLOSE_PAIRS = 0.25
CLOSE_PAIRS_SAMPLE = 2000  # training images whose pairs are measured
MAX_K = 1000
MAX_QUERIES = 100_000
MAX_RANKING_ROWS = 5_000_000  # a run's results; the results of the last KEEP_RANKINGS
KEEP_RANKINGS = 10            # rank runs are kept (their runs rows always are)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


@dataclass(frozen=True)
class CombinedSpace:
    """How combined rows are compared: their first ``scores_dim`` columns are scores, and
    the feature near-copy thresholds are ``scale`` times ``NEAR_COPY`` and
    ``NEAR_SAME_CATEGORY`` (:func:`near_scale`)."""

    scores_dim: int
    scale: float = 1.0


def top_k_cosine(queries, candidates, k: int, query_ids=None, candidate_ids=None,
                 block: int = 1024, between_blocks=None,
                 combined_space: CombinedSpace | None = None):
    """Top-``k`` candidates of each query by cosine distance.

    With ``combined_space``, rows are combined vectors (:func:`combined`), compared as it
    says, near copies first (module docstring).
    When both id arrays are given, a candidate with the query's own id is excluded.
    ``between_blocks()`` is called before each block of queries (to answer a cancel).
    Returns ``(indices, distances)``, both ``(n_queries, min(k, n))``, best first;
    indices are rows of ``candidates``; ties go to the lower row.

    Example
    -------
    >>> idx, dist = top_k_cosine([[1, 0]], [[0, 1], [1, 0.1]], k=1)
    >>> idx.tolist()
    [[1]]
    """
    if combined_space is None:
        q, c = unit_rows(queries), unit_rows(candidates)
    else:
        q, c = np.asarray(queries, np.float32), np.asarray(candidates, np.float32)
    exclude = query_ids is not None and candidate_ids is not None
    k = min(k, len(c) - (1 if exclude else 0))
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    indices = np.empty((len(q), k), np.int64)
    distances = np.empty((len(q), k), np.float32)
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # the partial sorts release the GIL
        for start in range(0, len(q), block):
            if between_blocks is not None:
                between_blocks()
            sims = (q[start:start + block] @ c.T if combined_space is None else
                    np.subtract(1, combined_distances(q[start:start + block], c,
                                                      combined_space)))
            if exclude:
                own = np.asarray(query_ids)[start:start + block, None]
                sims[own == np.asarray(candidate_ids)[None, :]] = -np.inf
            rows = np.array_split(np.arange(len(sims)), workers)
            for part, (best, best_sims) in zip(rows, pool.map(
                    lambda r: _best_of_rows(sims[r], k), rows)):
                indices[start + part] = best
                distances[start + part] = np.maximum(1.0 - best_sims, 0.0)  # no -0.000
    return indices, distances


def _best_of_rows(sims: np.ndarray, k: int):
    """The ``k`` largest of each row, largest first, ties to the lower column (also at the
    k-th place, where the partial sort alone would pick any of the tied columns)."""
    part = np.argpartition(sims, -k, axis=1)[:, -k:]
    part_sims = np.take_along_axis(sims, part, axis=1)
    kth = part_sims.min(axis=1, keepdims=True)
    tied = np.flatnonzero((sims == kth).sum(axis=1) > (part_sims == kth).sum(axis=1))
    for row in tied:  # more columns share the k-th value than were taken: take the lowest
        columns = np.flatnonzero(sims[row] >= kth[row, 0])
        order = np.lexsort((columns, -sims[row, columns]))[:k]
        part[row], part_sims[row] = columns[order], sims[row, columns[order]]
    order = np.lexsort((part, -part_sims), axis=1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_sims, order, axis=1)


def combined(scores: np.ndarray, features: np.ndarray, layouts=None) -> np.ndarray:
    """Rows of the combined space: unit scores, unit features times ``sqrt(FEATURE_WEIGHT)``
    (their product is w times their cosine), and the images' colour layouts (unit, zeros where
    unknown; the last ``LAYOUT_DIM`` columns), which only find near copies."""
    if layouts is None:
        layouts = np.zeros((len(scores), LAYOUT_DIM), np.float32)
    return np.hstack([unit_rows(scores), np.sqrt(FEATURE_WEIGHT) * unit_rows(features),
                      np.asarray(layouts, np.float32)])


def combined_distance(by_scores, by_features, by_layouts, same_category, scale: float):
    """The combined distance from the cosines of two images' scores, features and colour layouts
    and whether the classifier predicts one category for both, the feature thresholds
    ``scale`` times their value (module docstring)."""
    w = FEATURE_WEIGHT
    d_features = 1 - by_features
    d_layouts = 1 - by_layouts
    near = ((d_features < scale * NEAR_COPY)
            | (same_category & (d_features < scale * NEAR_SAME_CATEGORY))
            | (d_layouts < NEAR_LAYOUT))
    copy = np.minimum(d_features, scale * NEAR_COPY / NEAR_LAYOUT * d_layouts)
    return np.where(near, NEAR_COPY / NEAR_SAME_CATEGORY * w * copy,
                    1 - by_scores + w * d_features) / (1 + w)


def predicted(rows, scores_dim: int) -> np.ndarray:
    """The category each combined row's scores predict (a column number)."""
    return np.argmax(rows[..., :scores_dim], axis=-1)


def combined_distances(queries, candidates, space: CombinedSpace) -> np.ndarray:
    """:func:`combined_distance` of every combined row of ``queries`` to every one of
    ``candidates``."""
    s, f = space.scores_dim, queries.shape[1] - LAYOUT_DIM
    return combined_distance(
        queries[:, :s] @ candidates[:, :s].T,
        queries[:, s:f] @ candidates[:, s:f].T / np.float32(FEATURE_WEIGHT),
        queries[:, f:] @ candidates[:, f:].T,
        predicted(queries, s)[:, None] == predicted(candidates, s)[None, :], space.scale)


def combined_pair_distances(a, b, space: CombinedSpace) -> np.ndarray:
    """:func:`combined_distance` of each combined row of ``a`` to the same row of ``b``."""
    s, f = space.scores_dim, a.shape[1] - LAYOUT_DIM

    def products(part):
        return np.einsum("ij,ij->i", a[:, part], b[:, part])

    return combined_distance(products(slice(0, s)),
                             products(slice(s, f)) / FEATURE_WEIGHT,
                             products(slice(f, None)),
                             predicted(a, s) == predicted(b, s), space.scale)


def space_vectors(store, space: str, key: str | None, ids=None):
    """``(ids, categories, matrix, combined_space)`` of every image's vector in ``space``
    (of images ``ids`` only, when given): the classifier's scores, the features kept under
    ``key`` (the classifier's, in the combined space), or both combined; ``combined_space``
    (:class:`CombinedSpace`) in the combined space only (else None)."""
    if space == "features":
        return (*store.feature_matrix(key, ids), None)
    found, categories, _, matrix = store.score_matrix(ids)
    if space == "scores":
        return found, categories, matrix, None
    with_features, _, features = store.feature_matrix(key, ids)
    keep = np.isin(found, with_features)  # scores are made from features: all, as a rule
    rows = np.searchsorted(with_features, found[keep])
    return (found[keep], [c for c, k in zip(categories, keep) if k],
            combined(matrix[keep], features[rows], layouts_of(store, found[keep], ids)),
            CombinedSpace(matrix.shape[1], near_scale(store)))


def close_pair_distance(features, seed: int) -> float:
    """The 1% quantile of the cosine distances between pairs of distinct ``features`` rows
    (of ``CLOSE_PAIRS_SAMPLE`` rows drawn with ``seed`` where there are more): how close
    the distinct images of a collection come to each other (exact copies, which have one
    vector, do not make a collection look crowded)."""
    features = np.unique(np.asarray(features, np.float32), axis=0)
    if len(features) > CLOSE_PAIRS_SAMPLE:
        features = features[np.sort(np.random.default_rng(seed).choice(
            len(features), CLOSE_PAIRS_SAMPLE, replace=False))]
    rows = unit_rows(features)
    upper = np.triu_indices(len(rows), 1)
    if len(upper[0]) == 0:
        return CLOSE_PAIRS
    return float(np.quantile(1 - (rows @ rows.T)[upper], 0.01))


def near_scale(store) -> float:
    """The scale of the feature near-copy thresholds in ``store``'s combined space: the
    current classifier's ``close_pair_distance`` over ``CLOSE_PAIRS``, at most 1 (for a
    classifier trained before train measured it, measured here)."""
    train = store.last_run("train_classifier")
    if train is None:
        return 1.0
    close = train[2].get("close_pair_distance")
    if close is None:  # read a sample's features only, not every training image's
        ids = store.split()[0]
        if len(ids) > CLOSE_PAIRS_SAMPLE:
            ids = np.random.default_rng(train[3]).choice(ids, CLOSE_PAIRS_SAMPLE, replace=False)
        _, _, features = store.feature_matrix(train[2]["feature_key"], ids)
        close = round(close_pair_distance(features, train[3]), 4)
    return min(1.0, close / CLOSE_PAIRS)


def layouts_of(store, ids, wanted=None) -> np.ndarray:
    """The colour layouts of images ``ids`` (sorted; read for images ``wanted``, or all), a row
    of zeros for an image without one."""
    found, _, matrix = store.feature_matrix(LAYOUT_KEY, wanted)
    layouts = np.zeros((len(ids), LAYOUT_DIM), np.float32)
    if len(found):
        rows, known = _rows_of(ids, found)
        layouts[rows[known]] = matrix[known]
    return layouts


def _rows_of(ids, wanted):
    """``(rows, known)``: where each of ``wanted`` is in the sorted ``ids``, and whether it
    is there at all."""
    wanted = np.asarray(wanted, np.int64)
    if len(ids) == 0:
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return rows, ids[rows] == wanted


def ranking_key(store, space: str, backbone, weights) -> str | None:
    """The feature key a step ranking in ``space`` compares: ``backbone``'s, or the
    current classifier's (None in score space, where neither may be given)."""
    if space != "features" and (backbone is not None or weights is not None):
        raise checks.ParameterError("backbone and weights choose the features compared in "
                                    "space 'features'; the other spaces use the "
                                    "classifier's")
    if space == "scores":
        return None
    if weights is not None:
        weights = store.readable_path(weights, "weights")
    return features_in_use(store, backbone, weights)


def check_k(name: str, k) -> int:
    k = checks.count(name, k, 1)
    if k > MAX_K:
        raise checks.ParameterError(f"{name} must be <= {MAX_K}; got {k}")
    return k


@stepwise
def rank_candidates(store, top_k_candidates: int = 10, space: str = "combined",
                    include_self: bool = False, backbone: str | None = None,
                    weights=None, query_table: str = "query_images") -> dict:
    """Rank every scored (or featurized) image as a candidate for each query image.

    In feature space, the features are ``backbone``'s when it is given, else those the
    current classifier was trained on (a fine-tuned backbone's when it was tuned).
    Queries come from ``query_table`` (a table of schema imgsim with an ``image_id``
    column; by default query_images, or the testing images when it is empty). The
    results go to ranking_results under this run's id; the run's counts name the split
    and classifier they were computed from (a classifier trained on another split than
    the current one is refused).

    Example
    -------
    >>> rank_candidates(store, top_k_candidates=5)  # doctest: +SKIP
    {'run_id': 9, 'queries': 88, 'candidates': 352, 'rows': 440, ...}
    """
    top_k = check_k("top_k_candidates", top_k_candidates)
    checks.choice("space", space, SPACES)
    checks.identifier("query_table", query_table)
    if not isinstance(include_self, bool):
        raise checks.ParameterError(f"include_self must be true or false; got {include_self!r}")
    key = ranking_key(store, space, backbone, weights)
    params = {"top_k_candidates": top_k, "space": space, "include_self": include_self,
              "query_table": query_table}
    if key is not None:
        params["feature_key"] = key
    store.query_ids(query_table)  # a table that cannot be read is refused here
    with recorded(store, "rank_candidates", params, with_results=True) as run:  # no lock
        yield
        chosen = store.query_ids(query_table, fallback=False)
        from_split = query_table == "query_images" and not chosen
        if query_table == "query_images":
            choice = store.last_run("set_query_images")
            if choice is not None and choice[2].get("queries", 0) != len(chosen):
                raise lineage.StaleInputs(
                    f"{choice[2]['queries'] - len(chosen)} of the {choice[2]['queries']} query "
                    f"images chosen by run {choice[0]} were removed by sync: choose them again "
                    "(set_query_images; an empty list ranks the test images)")
        used = lineage.inputs(store, space, key, from_split)  # before the split's queries
        query_ids = chosen or store.query_ids(query_table)
        ids, _, matrix, combined_space = space_vectors(store, space, key)
        if len(ids) == 0:
            raise lineage.StaleInputs(
                f"no image has {space} vectors: run " + (
                    "train" if space != "features" else
                    f"featurize --backbone {key.split('-')[0]}"))
        row_of = {i: n for n, i in enumerate(ids.tolist())}
        without = [i for i in query_ids if i not in row_of]
        if without and from_split:
            raise lineage.StaleInputs(f"{len(without)} test images have no {space} vector: "
                                      f"run {'train' if space != 'features' else 'featurize'} "
                                      "again")
        query_ids = [i for i in query_ids if i in row_of]
        if not query_ids:
            raise ValueError("no query image has a vector: fill query_images or run prepare")
        if len(query_ids) * min(top_k, len(ids)) > MAX_RANKING_ROWS:
            raise checks.ParameterError(
                f"{len(query_ids)} queries x {min(top_k, len(ids))} candidates is over the "
                f"limit of {MAX_RANKING_ROWS} rows: choose fewer queries or a smaller "
                "top_k_candidates")
        block = settings.budget(store).ranking_block(len(ids),
                                                     8 if combined_space is None else 48)
        written = 0
        with store.transaction():  # results stream out a block of queries at a time
            run.start()
            for start in range(0, len(query_ids), block):
                store.check_interrupts()
                chunk = query_ids[start:start + block]
                indices, distances = top_k_cosine(
                    matrix[[row_of[i] for i in chunk]], matrix, top_k,
                    None if include_self else np.array(chunk),
                    None if include_self else ids, block=block, combined_space=combined_space)
                rows = [(q, r + 1, int(ids[c]), float(d)) for q, idx, dist in
                        zip(chunk, indices, distances)
                        for r, (c, d) in enumerate(zip(idx, dist))]
                store.add_ranking_results(run.id, rows)
                written += len(rows)
            lineage.unchanged(store, used, space, key, from_split, "ranking")
            run.succeed(**used, queries=len(query_ids), candidates=len(ids), rows=written,
                        search="exact", queries_without_vectors=len(without),
                        images_without_scores=store.unscored_count())
            store.keep_rankings(KEEP_RANKINGS)
    return {"run_id": run.id, **run.counts}


@stepwise
def set_query_images(store, image_ids) -> dict:
    """Choose the query images of rank_candidates (an empty list: the testing images).

    What an analyst may change: the routine checks the ids and holds the step lock, so
    no one holds the table itself.
    """
    if isinstance(image_ids, (str, bytes)) or not hasattr(image_ids, "__len__"):
        raise checks.ParameterError(f"image_ids must be a list of image ids; got {image_ids!r}")
    if len(image_ids) > MAX_QUERIES:
        raise checks.ParameterError(f"image_ids must hold at most {MAX_QUERIES} ids; got "
                                    f"{len(image_ids)}")
    ids = sorted({checks.count("image_ids", i, 1) for i in image_ids})
    known = {i for i, _, _, _ in store.image_info(ids)} if ids else set()
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise checks.ParameterError(f"image_ids holds ids that are not images: {unknown[:10]}")
    with store.lock(), recorded(store, "set_query_images", {"images": len(ids)}) as run:
        yield
        store.set_query_images(ids)
        run.counts.update(queries=len(ids))
    return dict(run.counts)


_SESSIONS: dict = {}


def _cached(name: str, digest: str, load, build):
    """ONNX sessions kept per process, by model name and the SHA-256 of its bytes (a server
    backend keeps them between calls; the bytes are read only when the digest is new)."""
    key = (name, digest)
    if key not in _SESSIONS:
        for stale in [k for k in _SESSIONS if k[0] == name]:
            del _SESSIONS[stale]
        _SESSIONS[key] = build(load(name))
    return _SESSIONS[key]


@dataclass
class Query:
    """A new image as the current classifier sees it: its vector in ``space``, its
    predicted category and that category's probability."""

    vector: np.ndarray
    predicted: str
    probability: float
    feature_key: str


def _current_models(store, space: str = "features"):
    """The current classifier's name and metadata and the digests of its graphs (and, to
    compare in score space, the check that the scores table holds its scores)."""
    train = store.last_run("train_classifier")
    if train is None:
        raise lineage.StaleInputs("no classifier has been trained: run train first")
    if space != "features":
        lineage.check_scores(store, train)
    model_name = train[2]["model"]
    digests = store.model_digests([model_name])
    if model_name not in digests:
        raise lineage.StaleInputs(f"classifier {model_name} is not in the models table: "
                                  "run train again")
    meta = digests[model_name][1]
    digests.update(store.model_digests([meta["feature_key"]]))
    if meta["feature_key"] not in digests:
        raise lineage.StaleInputs(f"backbone graph {meta['feature_key']} is not in the models "
                                  "table: featurize first")
    return model_name, meta, digests


def query(store, image: bytes, space: str = "combined") -> Query:
    """Featurize and score one new ``image`` (bytes) with the current classifier's graphs
    (kept per process, by their SHA-256, so that only a first call reads them)."""
    from .featurize import Featurizer, prepare_answering
    from .train import Classifier

    checks.choice("space", space, SPACES)
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise checks.ParameterError("image must be the bytes of an image file")
    if len(image) > MAX_FILE_BYTES:
        raise checks.ParameterError(f"image is {len(image) / 2**20:.1f} MB, over the limit "
                                    f"of {MAX_FILE_BYTES >> 20} MB")
    model_name, meta, digests = _current_models(store, space)
    key = meta["feature_key"]
    featurizer = _cached(key, digests[key][0], lambda n: store.load_model(n)[0],
                         lambda graph: Featurizer(graph))
    featurizer.max_decode_bytes = settings.budget(store).decode_bytes
    array = prepare_answering(store, featurizer, bytes(image))
    if not isinstance(array, np.ndarray):
        raise array
    features = featurizer.run(array[None])[0]
    classifier = _cached(model_name, digests[model_name][0], lambda n: store.load_model(n)[0],
                         lambda graph: Classifier(graph, meta["classes"]))
    labels, scores = classifier.predict(features[None])
    vector = {"scores": scores[0], "features": features,
              "combined": combined(scores, features[None], colour_layout(array)[None])[0]}[space]
    return Query(vector, labels[0], float(scores[0].max()), key)


def nearest(store, vector, k: int = 10, space: str = "combined",
            feature_key: str | None = None,
            category: str | None = None, max_distance: float | None = None,
            exclude: int | None = None) -> list[tuple]:
    """The ``k`` stored images nearest ``vector`` in ``space`` by cosine distance:
    ``(image_id, path, category, distance)`` rows, nearest first, of ``category`` only
    when given, no farther than ``max_distance`` when given, without image ``exclude``.
    Exact, or through pgvector's index in feature space where the server has it (in the
    combined space, for the near copies)."""
    k = check_k("k", k)
    checks.choice("space", space, SPACES)
    if category is not None and not isinstance(category, str):
        raise checks.ParameterError(f"category must be text; got {category!r}")
    if max_distance is not None:
        max_distance = checks.distance("max_distance", max_distance)
    if space == "features" and store.has_vectors():
        found = store.nearest_features(feature_key, vector, k, category=category,
                                       max_distance=max_distance, exclude=exclude)
    else:
        ids, categories, matrix, combined_space = (
            _combined_candidates(store, vector, k, feature_key, category, exclude)
            if space == "combined" else space_vectors(store, space, feature_key))
        keep = _kept(ids, categories, category, exclude)
        ids, matrix = ids[keep], matrix[keep]
        indices, distances = top_k_cosine(np.asarray(vector)[None], matrix, k,
                                          combined_space=combined_space)
        found = [(int(ids[i]), float(d)) for i, d in zip(indices[0], distances[0])
                 if max_distance is None or d <= max_distance]
    info = {i: (p, c) for i, p, c, _ in store.image_info([i for i, _ in found])}
    return [(i, info[i][0], info[i][1], d) for i, d in found]


def _combined_candidates(store, vector, k: int, key: str, category, exclude):
    """``(ids, categories, combined matrix, combined_space)`` of the images that can be among
    the ``k`` nearest ``vector`` in the combined space. Without pgvector, every image:
    near copies are found by their features and colour layouts alone. With it, near copies
    come from the feature and colour layout indexes (:func:`_near_copies`), and the others'
    features are read only where they can be nearer: a distance is at least
    ``d_scores / (1 + w)``, so no image whose score distance is over ``1 + w`` times the
    distance of the k-th nearest by scores can be."""
    if not store.has_vectors():
        return space_vectors(store, "combined", key)
    ids, categories, _, scores = store.score_matrix()
    keep = _kept(ids, categories, category, exclude)
    if not keep.any():
        return space_vectors(store, "combined", key, [])
    ids, scores = ids[keep], scores[keep]
    categories = [c for c, kept in zip(categories, keep) if kept]
    width = scores.shape[1]
    space = CombinedSpace(width, near_scale(store))
    vector = np.asarray(vector, np.float32)
    by_scores = 1.0 - unit_rows(scores) @ vector[:width]
    first = np.sort(np.argsort(by_scores, kind="stable")[:k])  # by id, as features come
    found, matrix = _combined_rows(store, key, ids[first], scores[first])
    if len(found) < len(first):  # some lack features: every image, the plain way
        return space_vectors(store, "combined", key)
    near = combined_distances(vector[None], matrix, space)[0]
    bound = (1 + FEATURE_WEIGHT) * float(near.max(initial=0.0)) + 1e-6
    copies = _near_copies(store, key, vector, space, k, category, exclude, ids,
                          predicted(scores, width))
    rows = np.flatnonzero((by_scores <= bound) | np.isin(ids, copies))
    found, matrix = _combined_rows(store, key, ids[rows], scores[rows])
    rows = rows[np.isin(ids[rows], found)]
    return ids[rows], [categories[r] for r in rows], matrix, space


def _near_copies(store, key: str, vector, space: CombinedSpace, k: int, category, exclude,
                 ids, predictions) -> list[int]:
    """Ids of the near copies of combined ``vector`` that can be among its ``k`` nearest,
    from the indexes: the ``k`` nearest colour layouts within ``NEAR_LAYOUT``, and the
    nearest features within ``NEAR_SAME_CATEGORY`` (both feature thresholds times
    ``space.scale``), as many as it takes to find ``k`` near copies (within ``NEAR_COPY``,
    or predicted the query's category: ``predictions`` are those of the images ``ids``,
    which are sorted)."""
    width, end = space.scores_dim, len(vector) - LAYOUT_DIM
    copies = [i for i, _ in store.nearest_features(
        LAYOUT_KEY, vector[end:], k, category=category, max_distance=NEAR_LAYOUT,
        exclude=exclude)] if np.any(vector[end:]) else []
    query_category = predicted(vector, width)
    wanted = k
    while True:
        found = store.nearest_features(key, vector[width:end], wanted, category=category,
                                       max_distance=space.scale * NEAR_SAME_CATEGORY,
                                       exclude=exclude)
        rows, known = _rows_of(ids, [i for i, _ in found])
        same = known & (predictions[rows] == query_category)
        by_features = [i for (i, d), s in zip(found, same)
                       if d < space.scale * NEAR_COPY or s]
        if len(by_features) >= k or len(found) < wanted:
            return copies + by_features
        wanted *= 4


def _kept(ids, categories, category, exclude) -> np.ndarray:
    """Which images a search may answer: of ``category`` when given, not ``exclude``."""
    keep = ids != exclude if exclude is not None else np.ones(len(ids), bool)
    if category is not None:
        keep &= np.array([c == category for c in categories], bool)
    return keep


def _combined_rows(store, key: str, ids, scores, chunk: int = 10_000):
    """``(ids, combined rows)`` of those of images ``ids`` (sorted; their ``scores``) with
    features, a chunk of ids a statement (SQLite bounds the parameters of one)."""
    found, features, layouts = [], [], []
    for start in range(0, len(ids), chunk):
        part, _, part_features = store.feature_matrix(key, ids[start:start + chunk].tolist())
        if len(part):
            found.append(part)
            features.append(part_features)
            layouts.append(layouts_of(store, part, part.tolist()))
    if not found:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    found = np.concatenate(found)
    return found, combined(scores[np.isin(ids, found)], np.concatenate(features),
                           np.concatenate(layouts))


def similar_images(store, image: bytes, k: int = 10, space: str = "combined",
                   category: str | None = None, max_distance: float | None = None
                   ) -> list[tuple]:
    """The ``k`` stored images most similar to a new ``image`` (bytes), by cosine distance.

    The image is featurized with the backbone the current classifier was trained on and
    scored by that classifier, then ranked against every scored (or featurized) image,
    of ``category`` only and no farther than ``max_distance`` when given. A query: it
    writes nothing (so it runs in a read-only transaction and on a standby) and takes no
    lock. Returns ``(image_id, path, category, distance)`` rows, nearest first.

    Example
    -------
    >>> similar_images(store, open("shirt.jpg", "rb").read(), k=3)  # doctest: +SKIP
    [(17, 'striped/s1.jpg', 'striped', 0.0004), ...]
    """
    check_k("k", k)
    with store.transaction():  # one connection and transaction for the query's reads
        asked = query(store, image, space)
        return nearest(store, asked.vector, k, space, asked.feature_key, category,
                       max_distance)


def similar_to(store, image_id: int, k: int = 10, space: str = "combined",
               category: str | None = None, max_distance: float | None = None
               ) -> list[tuple]:
    """The ``k`` stored images most similar to stored image ``image_id`` (itself left
    out), from its stored scores or features: nothing is featurized again."""
    image_id = checks.count("image_id", image_id, 1)
    check_k("k", k)
    checks.choice("space", space, SPACES)
    with store.transaction():
        if not store.image_info([image_id]):
            raise checks.UnknownImage(f"image {image_id} is not in the images table")
        _, meta, _ = _current_models(store, space)
        key = meta["feature_key"]
        ids, _, matrix, _ = space_vectors(store, space, key, [image_id])
        if len(ids) == 0:
            reasons = [r for i, _, r in store.image_errors_of([image_id])]
            if reasons:
                raise ImageError(f"image {image_id} could not be used: {reasons[0]}")
            again = ("imgsim refresh (CALL imgsim.refresh())" if space != "features"
                     else f"featurize --backbone {key.split('-')[0]}")
            raise lineage.StaleInputs(f"image {image_id} has no {space} vector yet: "
                                      f"run {again}")
        return nearest(store, matrix[0], k, space, key, category, max_distance,
                       exclude=image_id)
