"""prepare_data: the train/test split and the evaluation set.

Images are grouped by content, so that copies never straddle the split: every copy of
one content goes to the same side. A content is what the backbone sees: files with the
same sha256, and files whose pixels decode the same (a re-encoded or padded copy: the
same features, to 4 decimals of the unit vector). Per category,
``ratio_train_test`` of its distinct contents (Python's ``round``, at least one)
go to training and at least two stay on the test side, so that every query has a
positive: ``n_train = min(max(round(ratio * n), 1), n - 2)`` for ``n`` distinct
contents. The stream is ``np.random.default_rng(seed)``, one permutation per
category in sorted order; on a collection without copies this is the split of
earlier versions wherever ``n - 2`` does not cap ``n_train``.

A category with fewer than 3 distinct contents cannot give a training image and a
query with a positive: it is left out of the split and of the evaluation set, and
named under ``left_out`` in the run's counts. Only when fewer than 2 categories
remain is the run refused.

A content filed under two or more categories is a labeling conflict. By default
every image of such a content is left out (of training and evaluation); with
``keep_conflicts=True`` each image keeps its own category, and all copies of the
content go to the side drawn for it by the first category, in sorted order, that
takes part in the split.

The evaluation set is drawn from the test images only: per category up to
``max_query_imgs_per_subdir`` queries, one per distinct test content (its lowest
image id), drawn without replacement (the template drew with replacement). Each
query gets one positive, a test image of its category with a different content
(never a copy of the query), and up to ``max_neg_imgs_per_query_img`` negatives,
test images of other categories without the query's content, drawn without
replacement. Everything is reproducible from ``seed``, which is recorded.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np

from . import checks, lineage, settings
from .backbones import DEFAULT_BACKBONE
from .featurize import feature_key
from .runs import recorded, stepwise

DEFAULT_SEED = 42
MIN_CONTENTS = 3  # one to train, a query and its positive to test


def split_train_test(ids, categories, ratio_train_test: float = 0.75,
                     seed: int = DEFAULT_SEED, contents=None, *, keep_conflicts: bool = False):
    """Split ``ids`` per category by content.

    Parameters
    ----------
    ids : sequence of int
        Distinct image ids.
    categories : sequence of str
        The category of each id.
    ratio_train_test : float in (0, 1)
        Share of each category's distinct contents that go to training.
    seed : int >= 0
        Seed of the permutation stream.
    contents : sequence of hashable, optional
        The content (sha256) of each id; by default every image is its own content.
    keep_conflicts : bool
        Keep contents found under 2+ categories (each image in its own category,
        the side drawn by the first such category in sorted order); by default
        every image of such a content is left out.

    Returns
    -------
    train, test : ndarray of int64
        Sorted ids.
    left_out : list of dict
        ``{"category", "images", "reason"}`` for each category with fewer than 3
        distinct contents; ``images`` counts its images left out for that reason
        (images of conflicting contents are not counted here).

    Raises
    ------
    ValueError
        When fewer than 2 categories can take part; the message names those left out.

    Example
    -------
    >>> train, test, left_out = split_train_test(
    ...     [1, 2, 3, 4, 5, 6, 7], ["a", "a", "a", "b", "b", "b", "c"], 0.5, seed=0)
    >>> len(train), len(test), [x["category"] for x in left_out]
    (2, 4, ['c'])
    """
    ratio = checks.ratio("ratio_train_test", ratio_train_test)
    seed = checks.seed("seed", seed)
    keep_conflicts = _flag("keep_conflicts", keep_conflicts)
    ids, categories, contents = _columns("ids", ids, categories, contents)
    conflicting = set() if keep_conflicts else set(label_conflicts(categories, contents))

    groups: dict[str, dict] = {}   # category -> {content: sorted ids}
    dropped = defaultdict(int)     # category -> images left out as conflicts
    for i, category, content in sorted(zip(ids, categories, contents), key=lambda r: r[0]):
        members = groups.setdefault(category, {})
        if content in conflicting:
            dropped[category] += 1
        else:
            members.setdefault(content, []).append(i)

    left_out = []
    for category in sorted(groups):
        n = len(groups[category])
        if n < MIN_CONTENTS:
            images = sum(len(m) for m in groups[category].values())
            reason = (f"{n} distinct content(s) in {images} image(s)"
                      + (f" after leaving out {dropped[category]} image(s) of contents also "
                         "filed under another category" if dropped[category] else "")
                      + f"; {MIN_CONTENTS} are needed: one to train, a query and its "
                      "positive to test")
            left_out.append({"category": category, "images": images, "reason": reason})
    skipped = {x["category"] for x in left_out}
    taking_part = [c for c in sorted(groups) if c not in skipped]
    if len(taking_part) < 2:
        named = "; ".join(f"{x['category']!r}: {x['reason']}" for x in left_out) or "none"
        raise ValueError(f"only {len(taking_part)} category(ies) can take part in the split "
                         f"({', '.join(map(repr, taking_part)) or 'none'}); at least 2 are "
                         f"needed. Left out: {named}")

    rng = np.random.default_rng(seed)
    to_train: dict = {}  # content -> True (train) or False (test), drawn once
    train, test = [], []
    for category in taking_part:
        members = groups[category]
        order = sorted(members, key=lambda k: members[k][0])  # by lowest id: ids if no copies
        n = len(order)
        n_train = min(max(int(round(ratio * n)), 1), n - 2)
        forced_train = sum(to_train.get(k) is True for k in order)
        free = [order[j] for j in rng.permutation(n) if order[j] not in to_train]
        n_free_train = min(max(n_train - forced_train, 0), len(free))
        for j, content in enumerate(free):
            to_train[content] = j < n_free_train
        if not any(to_train[content] for content in order):
            left_out.append({"category": category,
                             "images": sum(len(m) for m in members.values()),
                             "reason": "nothing left to train on: each of its contents is "
                                       "also filed under another category, whose draw put it "
                                       "on the test side (keep_conflicts)"})
            continue
        for content in order:
            (train if to_train[content] else test).extend(members[content])
    return (np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64)),
            left_out)


def evaluation_pairs(test_ids, categories, max_query_imgs_per_subdir: int = 20,
                     max_neg_imgs_per_query_img: int = 100, seed: int = DEFAULT_SEED,
                     contents=None):
    """Draw the evaluation set from test images.

    Parameters
    ----------
    test_ids : sequence of int
        Distinct ids of the test images.
    categories : sequence of str
        The category of each test id.
    max_query_imgs_per_subdir : int >= 1
        Most queries per category, one per distinct content (its lowest id).
    max_neg_imgs_per_query_img : int >= 0
        Most negatives per query.
    seed : int >= 0
        Seed of the draw (a stream of its own, not the split's).
    contents : sequence of hashable, optional
        The content (sha256) of each id; by default every image is its own content.

    Returns
    -------
    pairs : ndarray of int64, shape (n, 3)
        ``(query_id, candidate_id, is_positive)``. A positive is a test image of the
        query's category with another content; negatives are test images of other
        categories without the query's content.
    short : list of dict
        ``{"category", "queries", "negatives"}`` for each category that gave fewer
        queries or negatives (the fewest any of its queries got) than asked for. A
        category with fewer than 2 distinct test contents gives no query (0, 0);
        its images still serve as negatives.

    Raises
    ------
    ValueError
        When negatives are asked for and the test images cover fewer than 2 categories.
    """
    max_query = checks.count("max_query_imgs_per_subdir", max_query_imgs_per_subdir, 1)
    max_neg = checks.count("max_neg_imgs_per_query_img", max_neg_imgs_per_query_img, 0)
    seed = checks.seed("seed", seed)
    ids, categories, contents = _columns("test_ids", test_ids, categories, contents)
    rng = np.random.default_rng([seed, 1])
    by_category = _group(ids, categories)
    if len(by_category) < 2 and max_neg > 0:
        raise ValueError("the test images cover fewer than 2 categories: no negatives exist")
    content_of = dict(zip(ids, contents))
    ids_of_content = defaultdict(list)
    for i, content in zip(ids, contents):
        ids_of_content[content].append(i)
    order = np.argsort(np.array(ids, dtype=np.int64), kind="stable")
    all_ids = np.array(ids, dtype=np.int64)[order]
    all_categories = np.array(categories, dtype=object)[order]

    pairs, short = [], []
    for category in sorted(by_category):
        members = by_category[category]
        first_of_content = {}
        for m in members:  # sorted: the lowest id of each content
            first_of_content.setdefault(content_of[m], m)
        candidates = sorted(first_of_content.values())
        if len(candidates) < 2:
            short.append({"category": category, "queries": 0, "negatives": 0})
            continue
        others = all_ids[all_categories != category]
        queries = rng.choice(candidates, size=min(max_query, len(candidates)), replace=False)
        fewest_negatives = max_neg
        for query in sorted(queries.tolist()):
            content = content_of[query]
            positive = rng.choice([m for m in members if content_of[m] != content])
            pairs.append((query, positive, 1))
            copies = [i for i in ids_of_content[content] if i != query]
            pool = others[~np.isin(others, copies)] if copies else others
            n_neg = min(max_neg, len(pool))
            fewest_negatives = min(fewest_negatives, n_neg)
            pairs.extend((query, neg, 0) for neg in rng.choice(pool, n_neg, replace=False))
        if len(queries) < max_query or fewest_negatives < max_neg:
            short.append({"category": category, "queries": int(len(queries)),
                          "negatives": int(fewest_negatives)})
    return np.array(pairs, dtype=np.int64).reshape(-1, 3), short


def content_keys(matrix: np.ndarray, sha256) -> list[str]:
    """Each image's content: its features, rounded (pixel-identical files, whatever
    their bytes, have the same), joined with its file's sha256 (copies share one vector,
    computed once)."""
    unit = np.round(matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12),
                    4) + 0.0  # no -0.0
    by_vector, by_sha = {}, {}
    for row, sha in enumerate(sha256):
        vector = hashlib.sha256(unit[row].astype(np.float32).tobytes()).hexdigest()
        key = by_sha.get(sha) or by_vector.get(vector) or sha
        by_sha.setdefault(sha, key)
        by_vector.setdefault(vector, key)
    return [by_sha[sha] for sha in sha256]


def label_conflicts(categories, contents) -> dict:
    """Contents found under two or more categories.

    Returns
    -------
    dict
        ``{content: sorted categories}`` for each conflicting content.

    Example
    -------
    >>> label_conflicts(["a", "b", "b"], ["x", "x", "y"])
    {'x': ['a', 'b']}
    """
    categories, contents = list(categories), list(contents)
    if len(contents) != len(categories):
        raise checks.ParameterError(f"contents must have one entry per category; got "
                                    f"{len(contents)} for {len(categories)}")
    found = defaultdict(set)
    for category, content in zip(categories, contents):
        found[content].add(category)
    return {k: sorted(c) for k, c in found.items() if len(c) > 1}


@stepwise
def prepare_data(store, backbone: str = DEFAULT_BACKBONE, weights=None,
                 ratio_train_test: float = 0.75, max_query_imgs_per_subdir: int = 20,
                 max_neg_imgs_per_query_img: int = 100, seed: int = DEFAULT_SEED,
                 keep_conflicts: bool = False) -> dict:
    """Split the featurized images by content and draw the evaluation set; replaces both
    tables.

    Only images with features for ``backbone`` take part (bad images have none). The
    content of each image is its sha256 in ``images``.

    Returns
    -------
    dict
        The run's counts: ``train``, ``test``, ``queries``, ``pairs``, ``short`` (see
        :func:`evaluation_pairs`), ``left_out`` (see :func:`split_train_test`),
        ``copies`` (featurized images minus distinct contents), ``conflicts``
        (contents under 2+ categories) and ``conflict_images`` (their images, left out
        unless ``keep_conflicts``).

    Example
    -------
    >>> prepare_data(store, seed=7)  # doctest: +SKIP
    {'train': 264, 'test': 88, 'queries': 220, 'pairs': 22220, 'short': [], 'left_out': [],
     'copies': 0, 'conflicts': 0, 'conflict_images': 0}
    """
    ratio_train_test = checks.ratio("ratio_train_test", ratio_train_test)
    max_query_imgs_per_subdir = checks.count("max_query_imgs_per_subdir",
                                             max_query_imgs_per_subdir, 1)
    max_neg_imgs_per_query_img = checks.count("max_neg_imgs_per_query_img",
                                              max_neg_imgs_per_query_img, 0)
    seed = checks.seed("seed", seed)
    keep_conflicts = _flag("keep_conflicts", keep_conflicts)
    if weights is not None:
        weights = store.readable_path(weights, "weights")
    key = feature_key(backbone, weights)
    params = {"backbone": backbone, "weights": str(weights) if weights else None,
              "feature_key": key, "ratio_train_test": ratio_train_test,
              "max_query_imgs_per_subdir": max_query_imgs_per_subdir,
              "max_neg_imgs_per_query_img": max_neg_imgs_per_query_img,
              "keep_conflicts": keep_conflicts}
    with store.lock(), recorded(store, "prepare_data", params, seed) as run:
        yield
        synced = store.run_rows("sync_image_folder", limit=1)
        if synced and synced[0][2] != "succeeded":
            raise lineage.StaleInputs(
                f"the last sync (run {synced[0][0]}) did not finish ({synced[0][2]}): the "
                "images table may mirror its folder only in part; run sync again")
        if not store.image_index():
            raise lineage.StaleInputs("there are no images: run sync first")
        ids, categories, matrix = store.feature_matrix(key)
        if len(ids) == 0:
            if not store.pending_images(key, "featurize_images"):
                raise ValueError("no image could be decoded: see image_errors (the report's "
                                 "images not used)")
            raise ValueError(f"no image has features for {key}: run featurize"
                             f"{'' if backbone == DEFAULT_BACKBONE else ' --backbone ' + backbone}"
                             " first")
        retry = store.retry_shas("featurize_images")  # listed as not used, for now
        waiting = [i for i in store.pending_images(key, "featurize_images") if i[2] not in retry]
        if waiting:
            raise lineage.StaleInputs(
                f"{len(waiting)} images have no features for {key} yet (new or changed since "
                f"the last featurize): run featurize"
                f"{'' if backbone == DEFAULT_BACKBONE else ' --backbone ' + backbone} first")
        # all rows, filtered here: a list of every id in one IN (...) can exceed SQLite's
        # limit on bound variables
        info = store.image_info()
        sha256 = {row[0]: row[3] for row in info}
        unusable = Counter(row[2] for row in info) - Counter(categories)
        undecodable = [{"category": c, "images": n, "reason": "none of its images could be "
                        "decoded (see image_errors)"}
                       for c, n in sorted(unusable.items()) if c not in set(categories)]
        contents = content_keys(matrix, [sha256[i] for i in ids.tolist()])
        del matrix
        conflicts = label_conflicts(categories, contents)
        counts = {"copies": len(contents) - len(set(contents)), "conflicts": len(conflicts),
                  "conflict_images": sum(k in conflicts for k in contents)}
        run.counts.update(counts)  # recorded even if the split is refused
        train, test, left_out = split_train_test(ids, categories, ratio_train_test, seed,
                                                 contents, keep_conflicts=keep_conflicts)
        left_out = undecodable + left_out
        position = {i: p for p, i in enumerate(ids.tolist())}
        test_rows = [position[i] for i in test.tolist()]
        _check_pairs([categories[p] for p in test_rows], [contents[p] for p in test_rows],
                     max_query_imgs_per_subdir, max_neg_imgs_per_query_img,
                     min(MAX_PAIRS, settings.budget(store).pairs))
        pairs, short = evaluation_pairs(test, [categories[p] for p in test_rows],
                                        max_query_imgs_per_subdir, max_neg_imgs_per_query_img,
                                        seed, [contents[p] for p in test_rows])
        with store.transaction():
            store.replace_split(train, test)
            store.replace_evaluation(pairs)
            run.counts.clear()
            run.succeed(train=len(train), test=len(test),
                        queries=len(np.unique(pairs[:, 0])), pairs=len(pairs), short=short,
                        left_out=left_out, split_digest=lineage.split_digest(train, test),
                        pairs_digest=lineage.pairs_digest(pairs), **counts)
    return dict(run.counts)


MAX_PAIRS = 5_000_000


def _check_pairs(categories, contents, max_query: int, max_neg: int, limit: int) -> None:
    """Refuse an evaluation set of more than ``limit`` pairs before drawing it."""
    distinct, sizes = defaultdict(set), Counter(categories)
    for category, content in zip(categories, contents):
        distinct[category].add(content)
    pairs = sum(min(max_query, len(kinds)) * (1 + min(max_neg, len(categories) - sizes[c]))
                for c, kinds in distinct.items())
    if pairs > limit:
        raise checks.ParameterError(
            f"the evaluation set would hold {pairs} pairs, over the limit of {limit} (the "
            "memory setting's): lower max_query_imgs_per_subdir or max_neg_imgs_per_query_img")


def _columns(name: str, ids, categories, contents):
    """Check the parallel inputs; return them as lists (contents default to the ids)."""
    array = np.asarray(ids)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise checks.ParameterError(f"{name} must be a 1-d sequence of whole numbers; "
                                    f"got shape {array.shape}, dtype {array.dtype}")
    ids = array.astype(np.int64).tolist()
    if len(set(ids)) != len(ids):
        raise checks.ParameterError(f"{name} must be distinct; got {len(ids) - len(set(ids))} "
                                    "repeated id(s)")
    categories = list(categories)
    if len(categories) != len(ids):
        raise checks.ParameterError(f"categories must have one entry per id; got "
                                    f"{len(categories)} for {len(ids)} ids")
    if contents is None:
        return ids, categories, list(ids)
    contents = list(contents)
    if len(contents) != len(ids):
        raise checks.ParameterError(f"contents must have one entry per id; got "
                                    f"{len(contents)} for {len(ids)} ids")
    return ids, categories, contents


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise checks.ParameterError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _group(ids, categories) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, c in zip(np.asarray(ids).tolist(), categories):
        groups[c].append(i)
    return {c: sorted(m) for c, m in groups.items()}
