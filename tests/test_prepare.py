import numpy as np
import pytest

from imgsim.checks import ParameterError
from imgsim.prepare import evaluation_pairs, split_train_test

IDS = np.arange(100, 160)
CATS = ["a"] * 20 + ["b"] * 30 + ["c"] * 10


def test_split_is_per_category_disjoint_and_reproducible():
    train, test = split_train_test(IDS, CATS, 0.75, seed=5)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(IDS)
    category = dict(zip(IDS, CATS))
    counts = {c: sum(category[i] == c for i in train) for c in "abc"}
    assert counts == {"a": 15, "b": 22, "c": 8}  # round(0.75 * n) of each category
    again = split_train_test(IDS, CATS, 0.75, seed=5)
    assert np.array_equal(train, again[0])
    assert not np.array_equal(train, split_train_test(IDS, CATS, 0.75, seed=6)[0])


def test_split_keeps_one_image_on_each_side():
    train, test = split_train_test([1, 2], ["a", "a"], 0.99, seed=0)
    assert len(train) == 1 and len(test) == 1


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, "x"])
def test_split_refuses_ratios_outside_0_1(ratio):
    with pytest.raises(ParameterError, match="ratio_train_test"):
        split_train_test(IDS, CATS, ratio)


def test_a_category_of_one_image_gets_a_clear_message():
    with pytest.raises(ValueError, match="category 'lonely' has 1 usable image"):
        split_train_test([1, 2, 3], ["a", "a", "lonely"], 0.5)


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


def test_small_categories_give_what_they_have_and_say_so():
    pairs, short = evaluation_pairs(IDS, CATS, max_query_imgs_per_subdir=25,
                                    max_neg_imgs_per_query_img=35, seed=0)
    # a and c have fewer than 25 images; b has only 30 images of other categories.
    assert {s["category"]: (s["queries"], s["negatives"]) for s in short} == {
        "a": (20, 35), "b": (25, 30), "c": (10, 35)}
    assert len(np.unique(pairs[:, 0])) == 20 + 25 + 10


def test_a_query_without_a_possible_positive_is_refused_clearly():
    with pytest.raises(ValueError, match="category 'c' has 1 test image"):
        evaluation_pairs([1, 2, 3], ["a", "a", "c"], 5, 5)
