"""prepare_data: the train/test split and the evaluation set.

The split is per category: ``ratio_train_test`` of each category's images (rounded,
at least one on each side) go to training, the rest to testing. The evaluation set
is drawn from the test images only: up to ``max_query_imgs_per_subdir`` distinct
queries per category (the template drew them with replacement), each paired with
one positive (another test image of its category) and up to
``max_neg_imgs_per_query_img`` negatives (test images of other categories), drawn
without replacement. Everything is reproducible from ``seed``, which is recorded.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from . import checks
from .backbones import DEFAULT_BACKBONE
from .featurize import feature_key
from .runs import recorded

DEFAULT_SEED = 42


def split_train_test(ids, categories, ratio_train_test: float = 0.75, seed: int = DEFAULT_SEED):
    """Split ``ids`` per category. Returns sorted ``(train_ids, test_ids)`` arrays.

    Example
    -------
    >>> train, test = split_train_test([1, 2, 3, 4], ["a", "a", "b", "b"], 0.5, seed=0)
    >>> len(train), len(test)
    (2, 2)
    """
    ratio = checks.ratio("ratio_train_test", ratio_train_test)
    rng = np.random.default_rng(seed)
    by_category = _group(ids, categories)
    train, test = [], []
    for category in sorted(by_category):
        members = by_category[category]
        if len(members) < 2:
            raise ValueError(f"category {category!r} has {len(members)} usable image(s); "
                             "at least 2 are needed to split it into train and test")
        members = rng.permutation(members)
        n_train = min(max(int(round(ratio * len(members))), 1), len(members) - 1)
        train.extend(members[:n_train])
        test.extend(members[n_train:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def evaluation_pairs(test_ids, categories, max_query_imgs_per_subdir: int = 20,
                     max_neg_imgs_per_query_img: int = 100, seed: int = DEFAULT_SEED):
    """Draw the evaluation set from test images.

    Returns ``(pairs, short)``: ``pairs`` is an ``(n, 3)`` int array of
    ``(query_id, candidate_id, is_positive)``; ``short`` lists the categories that
    gave fewer queries or negatives than asked for, with what they gave.
    """
    max_query = checks.count("max_query_imgs_per_subdir", max_query_imgs_per_subdir, 1)
    max_neg = checks.count("max_neg_imgs_per_query_img", max_neg_imgs_per_query_img, 0)
    rng = np.random.default_rng([seed, 1])  # a stream of its own, not the split's
    by_category = _group(test_ids, categories)
    if len(by_category) < 2 and max_neg > 0:
        raise ValueError("the test images cover fewer than 2 categories: no negatives exist")
    pairs, short = [], []
    for category in sorted(by_category):
        members = by_category[category]
        if len(members) < 2:
            raise ValueError(f"category {category!r} has {len(members)} test image(s); a query "
                             "needs another test image of its category as positive "
                             "(add images, or lower ratio_train_test)")
        others = np.array(sorted(i for c, m in by_category.items() if c != category
                                 for i in m), dtype=np.int64)
        queries = rng.choice(members, size=min(max_query, len(members)), replace=False)
        n_neg = min(max_neg, len(others))
        if len(queries) < max_query or n_neg < max_neg:
            short.append({"category": category, "queries": int(len(queries)),
                          "negatives": int(n_neg)})
        for query in sorted(queries):
            positive = rng.choice([m for m in members if m != query])
            pairs.append((query, positive, 1))
            pairs.extend((query, neg, 0) for neg in rng.choice(others, n_neg, replace=False))
    return np.array(pairs, dtype=np.int64).reshape(-1, 3), short


def prepare_data(store, backbone: str = DEFAULT_BACKBONE, weights=None,
                 ratio_train_test: float = 0.75, max_query_imgs_per_subdir: int = 20,
                 max_neg_imgs_per_query_img: int = 100, seed: int = DEFAULT_SEED) -> dict:
    """Split the featurized images and draw the evaluation set; replaces both tables.

    Only images with features for ``backbone`` take part (bad images have none).

    Example
    -------
    >>> prepare_data(store, seed=7)  # doctest: +SKIP
    {'train': 264, 'test': 88, 'queries': 220, 'pairs': 22220, 'short': []}
    """
    checks.ratio("ratio_train_test", ratio_train_test)
    checks.count("max_query_imgs_per_subdir", max_query_imgs_per_subdir, 1)
    checks.count("max_neg_imgs_per_query_img", max_neg_imgs_per_query_img, 0)
    checks.count("seed", seed, 0)
    key = feature_key(backbone, weights)
    params = {"backbone": backbone, "feature_key": key, "ratio_train_test": ratio_train_test,
              "max_query_imgs_per_subdir": max_query_imgs_per_subdir,
              "max_neg_imgs_per_query_img": max_neg_imgs_per_query_img}
    with recorded(store, "prepare_data", params, seed) as run:
        ids, categories, _ = store.feature_matrix(key)
        if len(ids) == 0:
            raise ValueError(f"no image has features for {key}: run featurize first")
        train, test = split_train_test(ids, categories, ratio_train_test, seed)
        category_of = dict(zip(ids.tolist(), categories))
        pairs, short = evaluation_pairs(test, [category_of[i] for i in test.tolist()],
                                        max_query_imgs_per_subdir, max_neg_imgs_per_query_img,
                                        seed)
        with store.transaction():
            store.replace_split(train, test)
            store.replace_evaluation(pairs)
        run.counts.update(train=len(train), test=len(test),
                          queries=len(np.unique(pairs[:, 0])), pairs=len(pairs), short=short)
    return dict(run.counts)


def _group(ids, categories) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, c in zip(np.asarray(ids).tolist(), categories):
        groups[c].append(i)
    return {c: sorted(m) for c, m in groups.items()}
