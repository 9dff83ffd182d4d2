import numpy as np
import pytest

from imgsim.evaluate import pair_distances, positive_ranks, ranking_chart, topk_accuracy


def test_pair_distances_match_their_definitions():
    a = np.array([[1.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [6.0, 8.0]])
    assert np.allclose(pair_distances(a, b, "l2"), [np.sqrt(2), 5.0])
    assert np.allclose(pair_distances(a, b, "cosine"), [1.0, 0.0])


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance must be one of"):
        pair_distances(np.ones((1, 2)), np.ones((1, 2)), "manhattan")


def test_positive_rank_counts_closer_negatives_and_ties_against_it():
    query = [7, 7, 7, 7, 9, 9, 9]
    distance = [0.5, 0.1, 0.5, 0.9, 0.2, 0.3, 0.4]
    positive = [1, 0, 0, 0, 1, 0, 0]
    assert positive_ranks(query, distance, positive).tolist() == [3, 1]


def test_a_query_needs_exactly_one_positive():
    with pytest.raises(ValueError, match="2 positives"):
        positive_ranks([1, 1], [0.1, 0.2], [1, 1])


def test_topk_accuracy_is_the_share_within_k():
    assert topk_accuracy([1, 2, 5, 40], [1, 2, 32]) == {1: 0.25, 2: 0.5, 32: 0.75}


def test_chart_is_a_png():
    png = ranking_chart([("cosine", 1, 0.4), ("cosine", 5, 0.7), ("l2", 1, 0.3)])
    assert png.startswith(b"\x89PNG")
