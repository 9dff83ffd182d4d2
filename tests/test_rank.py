import numpy as np
import pytest

from imgsim.rank import CombinedSpace, top_k_cosine


def brute_force(q, c, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    d = 1 - qn @ cn.T
    return np.argsort(d, axis=1, kind="stable")[:, :k], np.sort(d, axis=1)[:, :k]


def test_matches_a_full_sort_across_blocks():
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(37, 16)), rng.normal(size=(200, 16))
    idx, dist = top_k_cosine(q, c, 10, block=8)
    want_idx, want_dist = brute_force(q, c, 10)
    assert np.array_equal(idx, want_idx)
    assert np.allclose(dist, want_dist, atol=1e-5)


def test_excludes_the_query_itself_unless_asked():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(30, 8))
    ids = np.arange(500, 530)
    idx, _ = top_k_cosine(c[:5], c, 3, query_ids=ids[:5], candidate_ids=ids)
    assert all(q not in row for q, row in zip(range(5), idx))
    idx_self, dist_self = top_k_cosine(c[:5], c, 3)
    assert idx_self[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert np.allclose(dist_self[:, 0], 0, atol=1e-6)


def test_ties_break_by_candidate_order_and_k_is_capped():
    c = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    idx, dist = top_k_cosine([[1.0, 0.0]], c, 10)
    assert idx.tolist() == [[0, 1, 2]]
    assert np.allclose(dist, [[0, 0, 1]], atol=1e-6)


def test_ties_go_to_the_lower_candidate_also_at_the_kth_place():
    copies = np.tile([1.0, 0.0], (50, 1))  # fifty exact copies: all tied
    index, _ = top_k_cosine([[1.0, 0.0]], copies, k=5)
    assert index.tolist() == [[0, 1, 2, 3, 4]]
    mixed = np.array([[1, 0]] * 10 + [[0, 1]] * 10 + [[1, 1]] * 3, dtype=float)
    index, _ = top_k_cosine([[1.0, 0.0], [0.0, 1.0]], mixed, k=12)
    assert index.tolist() == [list(range(10)) + [20, 21], list(range(10, 20)) + [20, 21]]


def test_similar_to_a_stored_image_and_filters(pipeline_store):
    from imgsim import checks
    from imgsim.rank import similar_images, similar_to

    ids, categories, _, _ = pipeline_store.score_matrix()
    image_id, category = int(ids[0]), categories[0]
    rows = similar_to(pipeline_store, image_id, k=5)
    assert image_id not in [r[0] for r in rows] and len(rows) == 5
    assert [r[3] for r in rows] == sorted(r[3] for r in rows)
    other = next(c for c in categories if c != category)
    only = similar_to(pipeline_store, image_id, k=3, category=other)
    assert len(only) == 3 and {r[2] for r in only} == {other}
    near = similar_to(pipeline_store, image_id, k=50, max_distance=0.01)
    assert all(r[3] <= 0.01 for r in near) and len(near) < 50
    data = pipeline_store.image_data([image_id])[image_id]
    assert similar_images(pipeline_store, data, k=1, category=other)[0][2] == other
    with pytest.raises(checks.UnknownImage):
        similar_to(pipeline_store, 999999)
    with pytest.raises(checks.ParameterError, match="max_distance"):
        similar_to(pipeline_store, image_id, max_distance=3)


def test_the_combined_space_orders_by_scores_then_features(pipeline_store):
    """Combined distance = (d_scores + w d_features) / (1 + w); for near copies
    (d_features < s NEAR_COPY, or < s NEAR_SAME_CATEGORY and one predicted category, or
    d_layouts < NEAR_LAYOUT) (NEAR_COPY / NEAR_SAME_CATEGORY) w d_copy / (1 + w), s the
    distinct training images' 1% quantile of feature distances over CLOSE_PAIRS, at most 1:
    where the classifier scores images alike (ties in score space), the features order
    them."""
    from imgsim.featurize import LAYOUT_KEY, features_in_use
    from imgsim.rank import (CLOSE_PAIRS, FEATURE_WEIGHT as w, NEAR_COPY, NEAR_SAME_CATEGORY,
                             NEAR_LAYOUT, near_scale, similar_to, unit_rows)

    ids, _, _, scores = pipeline_store.score_matrix()
    _, _, features = pipeline_store.feature_matrix(features_in_use(pipeline_store), ids)
    with_layouts, _, layouts = pipeline_store.feature_matrix(LAYOUT_KEY, ids)
    assert with_layouts.tolist() == ids.tolist()  # featurize made them
    d_scores = 1 - unit_rows(scores) @ unit_rows(scores)[0]
    d_features = 1 - unit_rows(features) @ unit_rows(features)[0]
    d_layouts = 1 - layouts @ layouts[0]
    train = unit_rows(np.unique(features[np.isin(ids, pipeline_store.split()[0])], axis=0))
    close = np.quantile((1 - train @ train.T)[np.triu_indices(len(train), 1)], 0.01)
    recorded = pipeline_store.last_run("train_classifier")[2]["close_pair_distance"]
    assert recorded == pytest.approx(close, abs=1e-4)
    s = near_scale(pipeline_store)
    assert s == pytest.approx(min(1.0, recorded / CLOSE_PAIRS)) and s < 1
    same = scores.argmax(axis=1) == scores[0].argmax()
    near = ((d_features < s * NEAR_COPY) | (same & (d_features < s * NEAR_SAME_CATEGORY))
            | (d_layouts < NEAR_LAYOUT))
    d_copy = np.minimum(d_features, s * NEAR_COPY / NEAR_LAYOUT * d_layouts)
    expected = np.where(near, NEAR_COPY / NEAR_SAME_CATEGORY * w * d_copy,
                        d_scores + w * d_features) / (1 + w)
    order = [n for n in np.argsort(expected, kind="stable") if n != 0][:8]
    rows = similar_to(pipeline_store, int(ids[0]), k=8)
    assert [r[0] for r in rows] == ids[order].tolist()
    assert [r[3] for r in rows] == pytest.approx(expected[order], abs=1e-5)
    tied = similar_to(pipeline_store, int(ids[0]), k=8, space="scores")
    # score space ties most of a category (an order by id); the combined space does not
    assert len({round(r[3], 4) for r in tied}) < len({round(r[3], 4) for r in rows}) == 8


def test_near_copies_come_first_even_where_the_classifier_scores_them_apart():
    from imgsim.evaluate import pair_distances
    from imgsim.rank import FEATURE_WEIGHT as w, NEAR_COPY, NEAR_SAME_CATEGORY, combined

    scores = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    features = np.array([[1.0, 0.0, 0.0],
                         [1.0, 0.8, 0.0],    # scored alike, features 0.22 apart
                         [1.0, 0.1, 0.3],    # scored apart, features 0.05 apart: a copy
                         [0.0, 0.0, 1.0]])   # scored apart, features 1 apart
    matrix = combined(scores, features)
    d_features = 1 - (features / np.linalg.norm(features, axis=1, keepdims=True)) @ [1, 0, 0]
    index, distances = top_k_cosine(matrix[:1], matrix[1:], 3, combined_space=CombinedSpace(2))
    assert index.tolist() == [[1, 0, 2]]  # the copy first, then the same-scored image
    half = NEAR_COPY / NEAR_SAME_CATEGORY
    want = [half * w * d_features[2], w * d_features[1], 1 + w * d_features[3]]
    assert distances[0] == pytest.approx(np.array(want) / (1 + w), abs=1e-6)
    assert distances[0] == pytest.approx(pair_distances(
        np.repeat(matrix[:1], 3, axis=0), matrix[[2, 1, 3]], "cosine", CombinedSpace(2)),
        abs=1e-6)
    plain, _ = top_k_cosine(matrix[:1], matrix[1:], 3)  # one cosine: the copy comes second
    assert plain.tolist() == [[0, 1, 2]]


def test_a_copy_scored_less_surely_comes_first_within_its_predicted_category():
    """Features within NEAR_SAME_CATEGORY make a near copy only where the classifier
    predicts the query's category for it."""
    from imgsim.evaluate import pair_distances
    from imgsim.rank import FEATURE_WEIGHT as w, NEAR_COPY, NEAR_SAME_CATEGORY, combined

    def at(distance):  # a unit feature vector at cosine distance ``distance`` from [1, 0]
        return [1 - distance, np.sqrt(1 - (1 - distance) ** 2)]

    scores = np.array([[1.0, 0.0], [0.6, 0.4], [1.0, 0.0], [0.4, 0.6]])
    features = np.array([at(0), at(0.15), at(0.25), at(0.15)])
    matrix = combined(scores, features)
    index, distances = top_k_cosine(matrix[:1], matrix[1:], 3, combined_space=CombinedSpace(2))
    # the copy predicted the query's category first; then the surely scored image 0.25
    # apart; the one predicted another category, as far in features as the copy, last
    assert index.tolist() == [[0, 1, 2]]
    d_scores = 1 - scores[3] @ scores[0] / np.linalg.norm(scores[3])
    want = [NEAR_COPY / NEAR_SAME_CATEGORY * w * 0.15, w * 0.25, d_scores + w * 0.15]
    assert distances[0] == pytest.approx(np.array(want) / (1 + w), abs=1e-6)
    assert distances[0] == pytest.approx(pair_distances(
        np.repeat(matrix[:1], 3, axis=0), matrix[1:], "cosine", CombinedSpace(2)), abs=1e-6)
    assert top_k_cosine(matrix[:1], matrix[1:], 3)[0].tolist() == [[1, 0, 2]]


def test_a_copy_found_by_its_colour_layout_comes_first():
    """A colour layout within NEAR_LAYOUT makes a near copy whatever its scores and
    features say; its distance counts the layout's, scaled to NEAR_COPY."""
    from imgsim.featurize import LAYOUT_DIM
    from imgsim.rank import (FEATURE_WEIGHT as w, NEAR_COPY, NEAR_SAME_CATEGORY,
                             NEAR_LAYOUT, combined)

    layouts = np.zeros((3, LAYOUT_DIM), np.float32)
    layouts[:, :2] = [[1.0, 0.0], [0.98, np.sqrt(1 - 0.98 ** 2)], [0.9, np.sqrt(0.19)]]
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, np.sqrt(0.51)]])
    matrix = combined(scores, features, layouts)
    index, distances = top_k_cosine(matrix[:1], matrix[1:], 2, combined_space=CombinedSpace(2))
    assert index.tolist() == [[0, 1]]  # layouts 0.02 apart; the other 0.1 apart, not near
    want = [NEAR_COPY / NEAR_SAME_CATEGORY * w * min(1.0, NEAR_COPY / NEAR_LAYOUT * 0.02),
            w * 0.3]
    assert distances[0] == pytest.approx(np.array(want) / (1 + w), abs=1e-6)
    assert top_k_cosine(matrix[:1], combined(scores, features)[1:], 2,
                        combined_space=CombinedSpace(2))[0].tolist() == [[1, 0]]  # without layouts


def test_combined_search_finds_near_copies_and_matches_a_full_ranking(pipeline_store,
                                                                      monkeypatch):
    from conftest import check_combined_search

    check_combined_search(pipeline_store, monkeypatch)


def test_on_a_crowded_collection_the_feature_thresholds_shrink():
    """Where distinct images' features all lie within NEAR_COPY of each other (small
    look-alike images), the thresholds scale with the collection's close pairs: the scores
    decide between categories again, and a real copy still comes first."""
    from imgsim.rank import CLOSE_PAIRS, close_pair_distance, combined

    rng = np.random.default_rng(0)
    base = np.zeros(64)
    base[0] = 1.0
    features = base + 0.2 * rng.standard_normal((40, 64)) / np.sqrt(64)  # ~0.02 apart
    features[1] = features[0] + 1e-3 * rng.standard_normal(64)            # a copy of image 0
    scores = np.eye(2)[np.arange(40) % 2]  # even images one category, odd the other
    scores[1] = [0.3, 0.7]  # the copy, scored as the other category
    close = close_pair_distance(features, seed=0)
    assert close < 0.1 * CLOSE_PAIRS  # every distinct pair would pass for a copy at scale 1
    matrix = combined(scores, features)
    crowded = CombinedSpace(2, min(1.0, close / CLOSE_PAIRS))
    index, _ = top_k_cosine(matrix[::2], matrix, 5, np.arange(0, 40, 2), np.arange(40),
                            combined_space=crowded)
    assert index[0, 0] == 1  # the copy first
    assert all(row % 2 == 0 for row in index[1:].ravel()) and all(index[0, 1:] % 2 == 0)
    unscaled, _ = top_k_cosine(matrix[::2], matrix, 5, np.arange(0, 40, 2), np.arange(40),
                               combined_space=CombinedSpace(2))
    assert any(row % 2 == 1 for row in unscaled[1:].ravel())  # by features alone: mixed
    spread = rng.standard_normal((40, 64))  # a collection whose images lie apart
    assert close_pair_distance(spread, seed=0) > CLOSE_PAIRS
    copies = np.vstack([spread, np.repeat(spread[:10], 4, axis=0)])  # 3% of pairs: copies
    assert close_pair_distance(copies, seed=0) == close_pair_distance(spread, seed=0)


def test_a_classifier_trained_before_close_pairs_were_measured_gets_them_measured(
        pipeline_store):
    from sqlalchemy import update

    from imgsim.rank import near_scale
    from imgsim.store import tables

    run_id, _, counts, _ = pipeline_store.last_run("train_classifier")
    scale = near_scale(pipeline_store)
    older = {k: v for k, v in counts.items() if k != "close_pair_distance"}
    with pipeline_store.transaction():
        pipeline_store._write(update(tables.runs).where(tables.runs.c.id == run_id)
                              .values(counts=older))
    assert "close_pair_distance" not in pipeline_store.last_run("train_classifier")[2]
    assert near_scale(pipeline_store) == pytest.approx(scale, abs=1e-3)
