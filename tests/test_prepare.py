from collections import defaultdict

import numpy as np
import pytest

from imgsim.checks import ParameterError
from imgsim.prepare import evaluation_pairs, label_conflicts, split_train_test

IDS = np.arange(100, 160)
CATS = ["a"] * 20 + ["b"] * 30 + ["c"] * 10


# -- the protocol before contents, as a reference for copy-free inputs ------------------
def old_split(ids, categories, ratio, seed):
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for i, c in zip(np.asarray(ids).tolist(), categories):
        groups[c].append(i)
    train, test = [], []
    for category in sorted(groups):
        members = rng.permutation(sorted(groups[category]))
        n_train = min(max(int(round(ratio * len(members))), 1), len(members) - 1)
        train.extend(members[:n_train])
        test.extend(members[n_train:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def old_evaluation_pairs(test_ids, categories, max_query, max_neg, seed):
    rng = np.random.default_rng([seed, 1])
    groups = defaultdict(list)
    for i, c in zip(np.asarray(test_ids).tolist(), categories):
        groups[c].append(i)
    groups = {c: sorted(m) for c, m in groups.items()}
    pairs = []
    for category in sorted(groups):
        members = groups[category]
        others = np.array(sorted(i for c, m in groups.items() if c != category for i in m),
                          dtype=np.int64)
        queries = rng.choice(members, size=min(max_query, len(members)), replace=False)
        n_neg = min(max_neg, len(others))
        for query in sorted(queries):
            pairs.append((query, rng.choice([m for m in members if m != query]), 1))
            pairs.extend((query, neg, 0) for neg in rng.choice(others, n_neg, replace=False))
    return np.array(pairs, dtype=np.int64).reshape(-1, 3)


def collection_with_copies(seed=0):
    """Ids, categories and contents: 4 categories, many contents copied 1-4 times."""
    rng = np.random.default_rng(seed)
    ids, categories, contents = [], [], []
    next_id = 1
    for category, n_contents in [("cats", 12), ("dogs", 7), ("owls", 5), ("yaks", 9)]:
        for k in range(n_contents):
            for _ in range(rng.integers(1, 5)):
                ids.append(next_id)
                categories.append(category)
                contents.append(f"{category}-{k}")
                next_id += 1
    order = rng.permutation(len(ids))  # ids need not come sorted
    return ([ids[j] for j in order], [categories[j] for j in order],
            [contents[j] for j in order])


def by_content(ids, contents):
    groups = defaultdict(set)
    for i, k in zip(ids, contents):
        groups[k].add(i)
    return groups


# -- split ------------------------------------------------------------------------------
def test_split_is_per_category_disjoint_and_reproducible():
    train, test, left_out = split_train_test(IDS, CATS, 0.75, seed=5)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(IDS)
    assert left_out == []
    category = dict(zip(IDS, CATS))
    counts = {c: sum(category[i] == c for i in train) for c in "abc"}
    assert counts == {c: round(0.75 * CATS.count(c)) for c in "abc"}
    again = split_train_test(IDS, CATS, 0.75, seed=5)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(train, split_train_test(IDS, CATS, 0.75, seed=6)[0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
def test_split_without_copies_is_the_old_split_where_the_formulas_agree(seed, ratio):
    rng = np.random.default_rng(100 + seed)
    sizes = {f"k{j}": int(n) for j, n in enumerate(rng.integers(3, 30, size=8))}
    sizes.update(big=50, tiny=3, small=4)  # n - 2 caps n_train of small ones at high ratios
    categories = [c for c, n in sizes.items() for _ in range(n)]
    ids = rng.permutation(np.arange(1000, 1000 + len(categories)))
    train, test, left_out = split_train_test(ids, categories, ratio, seed)
    old_train, old_test = old_split(ids, categories, ratio, seed)
    assert left_out == []
    category = dict(zip(ids.tolist(), categories))
    agreeing = disagreeing = 0
    for c, n in sizes.items():
        new_c = {i for i in train.tolist() if category[i] == c}
        old_c = {i for i in old_train.tolist() if category[i] == c}
        n_old = min(max(round(ratio * n), 1), n - 1)
        n_new = min(max(round(ratio * n), 1), n - 2)
        assert len(new_c) == n_new and len(old_c) == n_old
        if n_old == n_new:
            agreeing += 1
            assert new_c == old_c, c
        else:  # the same permutation, cut one earlier
            disagreeing += 1
            assert new_c < old_c, c
    assert agreeing >= 1 and (disagreeing >= 1 or ratio < 0.5)  # both cases were seen


@pytest.mark.parametrize("per_category, ratio", [(120, 0.75), (10, 0.75)])
def test_the_reference_and_test_sets_split_exactly_as_before(per_category, ratio):
    categories = [c for c in ["argyle", "dotted", "floral", "plaid"] for _ in range(per_category)]
    ids = np.arange(1, len(categories) + 1)
    train, test, _ = split_train_test(ids, categories, ratio, seed=42)
    old_train, old_test = old_split(ids, categories, ratio, seed=42)
    assert np.array_equal(train, old_train) and np.array_equal(test, old_test)
    assert np.array_equal(evaluation_pairs(test, [categories[i - 1] for i in test], 5, 20, 42)[0],
                          old_evaluation_pairs(test, [categories[i - 1] for i in test], 5, 20, 42))


@pytest.mark.parametrize("seed", range(5))
def test_copies_always_go_to_one_side(seed):
    ids, categories, contents = collection_with_copies(seed)
    train, test, left_out = split_train_test(ids, categories, 0.6, seed, contents)
    assert left_out == [] and set(train) | set(test) == set(ids)
    assert set(train).isdisjoint(test)
    for members in by_content(ids, contents).values():
        assert members <= set(train) or members <= set(test)
    # the ratio is taken of distinct contents, not of images
    content = dict(zip(ids, contents))
    category = dict(zip(ids, categories))
    for c in set(categories):
        n = len({content[i] for i in ids if category[i] == c})
        n_train = len({content[i] for i in train.tolist() if category[i] == c})
        assert n_train == min(max(round(0.6 * n), 1), n - 2)


def test_every_category_keeps_a_training_content_and_two_test_contents():
    for ratio in (0.01, 0.99):
        train, test, _ = split_train_test([1, 2, 3, 4, 5, 6], list("aaabbb"), ratio, seed=0)
        assert len(train) == 2 and len(test) == 4
    train, test, _ = split_train_test([1, 2, 3, 4, 5, 6, 7, 8], list("aaaabbbb"), 0.99, seed=0,
                                      contents=list("xxyzpqrs"))
    assert {1, 2} <= set(test) or {1, 2} <= set(train)
    assert len(set(train) & {5, 6, 7, 8}) == 2  # b: 4 contents, at most n - 2 train


def test_small_categories_are_left_out_and_named_and_the_split_goes_on():
    ids = list(range(1, 14))
    categories = ["a"] * 4 + ["b"] * 4 + ["one"] + ["two"] * 2 + ["copies"] * 2
    contents = list(range(1, 12)) + ["same", "same"]  # 'copies': 2 images, 1 content
    train, test, left_out = split_train_test(ids, categories, 0.5, 0, contents)
    assert [x["category"] for x in left_out] == ["copies", "one", "two"]
    assert {x["category"]: x["images"] for x in left_out} == {"copies": 2, "one": 1, "two": 2}
    assert all("3 are needed" in x["reason"] for x in left_out)
    assert set(train) | set(test) == set(range(1, 9))  # only a and b take part
    pairs, short = evaluation_pairs(test, ["a" if i <= 4 else "b" for i in test], 5, 5)
    assert set(pairs[:, :2].ravel()) <= set(range(1, 9))


def test_fewer_than_two_remaining_categories_are_refused_naming_the_left_out():
    with pytest.raises(ValueError, match="at least 2 are needed") as error:
        split_train_test([1, 2, 3, 4, 5, 6], ["a", "a", "a", "lonely", "pair", "pair"], 0.5)
    assert "'lonely'" in str(error.value) and "'pair'" in str(error.value)
    assert "'a'" in str(error.value)
    with pytest.raises(ValueError, match="only 0 categor"):
        split_train_test([1, 2], ["x", "y"], 0.5)


# -- label conflicts --------------------------------------------------------------------
CONFLICT_IDS = list(range(1, 15))
CONFLICT_CATS = ["a"] * 6 + ["b"] * 5 + ["c"] * 3
#                 a: 4 own contents + x + y;   b: 3 own + x + x;   c: y + 2 own
CONFLICT_CONTENTS = ["a1", "a2", "a3", "a4", "x", "y",
                     "b1", "b2", "b3", "x", "x",
                     "y", "c1", "c2"]


def test_label_conflicts_finds_contents_under_several_categories():
    assert label_conflicts(CONFLICT_CATS, CONFLICT_CONTENTS) == {"x": ["a", "b"],
                                                                 "y": ["a", "c"]}
    assert label_conflicts(list("aab"), [1, 2, 3]) == {}


def test_conflicts_are_left_out_by_default():
    conflicting = {i for i, k in zip(CONFLICT_IDS, CONFLICT_CONTENTS) if k in ("x", "y")}
    for seed in range(5):
        train, test, left_out = split_train_test(CONFLICT_IDS, CONFLICT_CATS, 0.5, seed,
                                                 CONFLICT_CONTENTS)
        assert conflicting.isdisjoint(set(train) | set(test))
        # c keeps 2 contents once y is gone: left out, and the reason says why
        assert [(x["category"], x["images"]) for x in left_out] == [("c", 2)]
        assert "another category" in left_out[0]["reason"]
        assert set(train) | set(test) == set(CONFLICT_IDS) - conflicting - {13, 14}


def test_conflicts_kept_stay_in_their_categories_on_one_side():
    content = dict(zip(CONFLICT_IDS, CONFLICT_CONTENTS))
    sides = set()
    for seed in range(20):
        train, test, left_out = split_train_test(CONFLICT_IDS, CONFLICT_CATS, 0.5, seed,
                                                 CONFLICT_CONTENTS, keep_conflicts=True)
        assert left_out == [] and set(train) | set(test) == set(CONFLICT_IDS)
        for members in by_content(CONFLICT_IDS, CONFLICT_CONTENTS).values():
            assert members <= set(train) or members <= set(test)
        # a (first in sorted order) draws x and y like its own contents; b and c count
        # them on the side a drew and fill the rest: each still trains round(0.5 * n)
        for c, n_train in {"a": 3, "b": 2, "c": 1}.items():
            assert len({content[i] for i in train.tolist()
                        if CONFLICT_CATS[i - 1] == c}) == n_train, c
        sides.add((5 in train, 6 in train))
        test_cats = [CONFLICT_CATS[i - 1] for i in test]
        pairs, _ = evaluation_pairs(test, test_cats, 10, 50, seed,
                                    [content[i] for i in test])
        for q, candidate, positive in pairs:
            assert content[candidate] != content[q]  # neither positive nor negative a copy
    assert len(sides) > 1  # the side of a conflict is drawn, not fixed


def test_keep_conflicts_must_be_a_flag():
    with pytest.raises(ParameterError, match="keep_conflicts"):
        split_train_test(IDS, CATS, 0.5, 0, keep_conflicts="yes")


# -- evaluation pairs -------------------------------------------------------------------
def test_evaluation_pairs_follow_the_template_protocol():
    category = dict(zip(IDS, CATS))
    pairs, short = evaluation_pairs(IDS, CATS, max_query_imgs_per_subdir=5,
                                    max_neg_imgs_per_query_img=12, seed=3)
    queries = np.unique(pairs[:, 0])
    assert len(queries) == 15  # 5 distinct queries per category
    for q in queries:
        rows = pairs[pairs[:, 0] == q]
        positives = rows[rows[:, 2] == 1, 1]
        negatives = rows[rows[:, 2] == 0, 1]
        assert len(positives) == 1 and positives[0] != q
        assert category[positives[0]] == category[q]
        assert len(negatives) == 12 and len(set(negatives)) == 12
        assert all(category[n] != category[q] for n in negatives)
    assert short == []


@pytest.mark.parametrize("seed", range(5))
def test_queries_are_distinct_contents_and_positives_are_never_copies(seed):
    ids, categories, contents = collection_with_copies(seed)
    content = dict(zip(ids, contents))
    category = dict(zip(ids, categories))
    lowest = {k: min(m) for k, m in by_content(ids, contents).items()}
    pairs, short = evaluation_pairs(ids, categories, 50, 30, seed, contents)
    queries = np.unique(pairs[:, 0]).tolist()
    assert sorted(content[q] for q in queries) == sorted(set(contents))  # all, once each
    assert all(lowest[content[q]] == q for q in queries)
    for q in queries:
        rows = pairs[pairs[:, 0] == q]
        (positive,) = rows[rows[:, 2] == 1, 1]
        assert category[positive] == category[q] and content[positive] != content[q]
        assert all(category[n] != category[q] for n in rows[rows[:, 2] == 0, 1])
    # a query with a copy in its category: the copy is never its positive
    copied = [q for q in queries if len(by_content(ids, contents)[content[q]]) > 1]
    assert copied


def test_small_categories_give_what_they_have_and_say_so():
    pairs, short = evaluation_pairs(IDS, CATS, max_query_imgs_per_subdir=25,
                                    max_neg_imgs_per_query_img=35, seed=0)
    # a and c have fewer than 25 images; b has only 30 images of other categories.
    assert {s["category"]: (s["queries"], s["negatives"]) for s in short} == {
        "a": (20, 35), "b": (25, 30), "c": (10, 35)}
    assert len(np.unique(pairs[:, 0])) == 20 + 25 + 10


def test_a_category_without_a_possible_positive_gives_no_query_and_says_so():
    pairs, short = evaluation_pairs([1, 2, 3, 4, 5], ["a", "a", "c", "c", "d"], 5, 5,
                                    contents=["p", "q", "r", "r", "s"])
    assert set(pairs[:, 0].tolist()) == {1, 2}  # c holds one content twice, d one image
    assert {s["category"]: s["queries"] for s in short} == {"a": 2, "c": 0, "d": 0}
    assert {3, 4, 5} <= set(pairs[pairs[:, 2] == 0, 1].tolist())  # still negatives


# -- parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, "x"])
def test_split_refuses_ratios_outside_0_1(ratio):
    with pytest.raises(ParameterError, match="ratio_train_test"):
        split_train_test(IDS, CATS, ratio)


@pytest.mark.parametrize("call, name", [
    (lambda: split_train_test(IDS, CATS[:-1]), "categories"),
    (lambda: split_train_test(IDS, CATS, contents=["x"]), "contents"),
    (lambda: split_train_test([1, 1, 2], list("aab")), "ids"),
    (lambda: split_train_test(IDS, CATS, seed=-1), "seed"),
    (lambda: evaluation_pairs(IDS, CATS, 0), "max_query_imgs_per_subdir"),
    (lambda: evaluation_pairs(IDS, CATS, 5, -1), "max_neg_imgs_per_query_img"),
    (lambda: evaluation_pairs(IDS, CATS, 5, 5, 1.5), "seed"),
    (lambda: evaluation_pairs([[1, 2]], ["a"]), "test_ids"),
    (lambda: evaluation_pairs(IDS, CATS, contents=list(range(3))), "contents"),
])
def test_parameter_errors_name_the_parameter(call, name):
    with pytest.raises(ParameterError, match=f"^{name} "):
        call()


# -- prepare_data on a store ------------------------------------------------------------
def test_prepare_data_reads_contents_and_counts_copies_conflicts_and_left_out(empty_store):
    from imgsim.backbones import DEFAULT_BACKBONE
    from imgsim.featurize import feature_key
    from imgsim.prepare import prepare_data
    from imgsim.store.base import to_blob

    store = empty_store
    files = ([("a", f"a{k}") for k in range(5)] + [("a", "a0"), ("a", "a1")]   # 2 copies
             + [("b", f"b{k}") for k in range(5)]
             + [("b", "shared"), ("c", "shared"), ("c", "shared")]          # a conflict
             + [("c", f"c{k}") for k in range(2)]
             + [("d", "d0")])
    with store.transaction():
        for n, (category, sha) in enumerate(files):
            store.add_image(f"{category}/{n}.jpg", category, sha, b"x")
    rows = store.image_info()
    key = feature_key(DEFAULT_BACKBONE)
    with store.transaction():
        store.put_features(key, [(i, sha, to_blob([float(i), 1.0])) for i, _, _, sha in rows])
    sha = {i: s for i, _, _, s in rows}

    counts = prepare_data(store, ratio_train_test=0.5, max_query_imgs_per_subdir=3,
                          max_neg_imgs_per_query_img=4, seed=1)
    assert (counts["copies"], counts["conflicts"], counts["conflict_images"]) == (4, 1, 3)
    # c keeps 2 contents once 'shared' is left out, d has 1: both named
    assert [(x["category"], x["images"]) for x in counts["left_out"]] == [("c", 2), ("d", 1)]
    train, test = store.split()
    assert counts["train"] == len(train) and counts["test"] == len(test)
    assert len(train) + len(test) == len(files) - 3 - 2 - 1
    for members in by_content([i for i, *_ in rows], [s for *_, s in rows]).values():
        assert members <= set(train) or members <= set(test) or members.isdisjoint(train + test)
    pairs = store.evaluation_pairs()
    assert counts["pairs"] == len(pairs) > 0
    assert all(sha[q] != sha[c] for q, c, _ in pairs)
    assert store.run_rows("prepare_data")[0][6]["keep_conflicts"] is False

    kept = prepare_data(store, ratio_train_test=0.5, max_query_imgs_per_subdir=3,
                        max_neg_imgs_per_query_img=4, seed=1, keep_conflicts=True)
    assert (kept["copies"], kept["conflicts"], kept["conflict_images"]) == (4, 1, 3)
    assert [x["category"] for x in kept["left_out"]] == ["d"]  # c: shared, c0, c1
    train, test = store.split()
    assert len(train) + len(test) == len(files) - 1
    with pytest.raises(ParameterError, match="keep_conflicts"):
        prepare_data(store, keep_conflicts=1)


def test_a_category_left_with_nothing_to_train_on_by_kept_conflicts_is_left_out():
    from imgsim.prepare import split_train_test

    # category "a" has 9 contents; "z" holds copies of 3 of them and nothing else
    ids = list(range(1, 13))
    categories = ["a"] * 9 + ["z"] * 3
    contents = [f"c{n}" for n in range(9)] + ["c0", "c1", "c2"]
    hits = 0
    for seed in range(20):
        train, test, left_out = split_train_test(ids, categories, 0.3, seed, contents,
                                                 keep_conflicts=True)
        if not {10, 11, 12} & set(train.tolist()):  # a's draw put c0-c2 on the test side
            hits += 1
            assert [x["category"] for x in left_out] == ["z"]
            assert not {10, 11, 12} & set(test.tolist())
        else:
            assert left_out == []
    assert hits > 0
