import io

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


def test_edited_copies_are_four_jpegs_made_the_same_every_time(texture_folder):
    from PIL import Image

    from imgsim.evaluate import edited_copies

    data = (texture_folder / "zebra/zebra_003.jpg").read_bytes()
    copies = edited_copies(data)
    assert copies == edited_copies(data) and len(set(copies)) == 4
    original = Image.open(texture_folder / "zebra/zebra_003.jpg").size
    sizes = [Image.open(io.BytesIO(c)).size for c in copies]
    assert sizes[:3] == [original] * 3 and sizes[3] == (original[0] // 2, original[1] // 2)


def test_copies_are_ranked_among_every_image(pipeline_store):
    from imgsim import checks, evaluate_model

    queries = len({q for q, _, _ in pipeline_store.evaluation_pairs()})
    found = {}
    for space in ("combined", "scores", "features"):
        results = evaluate_model(pipeline_store, ks=[1], space=space, copies=True)
        copies = {r["distance"]: r for r in results if r["measure"] == "copy"}
        assert set(copies) == ({"cosine"} if space == "combined" else {"cosine", "l2"})
        assert {r["distance"] for r in results} == set(copies)  # in the template's too
        assert all(r["k"] == 1 for r in copies.values())
        counts = pipeline_store.last_run("evaluate_model")[2]
        assert counts["copies"] == 4 * queries
        assert counts["copy_cosine_top1"] == copies["cosine"]["accuracy"]
        assert pipeline_store.metric_rows(pipeline_store.last_run("evaluate_model")[0]) == [
            (r["distance"], 1, r["accuracy"], r["mean_rank"], r["median_rank"])
            for r in sorted(results, key=lambda r: r["distance"])
            if r["measure"] == "template"]  # the copies' figures are not stored as top-k
        found[space] = copies["cosine"]
    # the features find the copies; the scores alone tie them with their whole category
    assert found["features"]["accuracy"] > found["scores"]["accuracy"]
    assert found["combined"]["accuracy"] > found["scores"]["accuracy"]
    assert found["combined"]["mean_rank"] < found["scores"]["mean_rank"]
    with pytest.raises(checks.ParameterError, match="copies"):
        evaluate_model(pipeline_store, space="features", backbone="mobilenet_v2", copies=True)


def test_a_querys_exact_copies_are_no_competitors_of_its_edited_copies(pipeline_store):
    import hashlib

    from imgsim.evaluate import copy_ranks
    from imgsim.pipeline import refresh

    queries = sorted({q for q, _, _ in pipeline_store.evaluation_pairs()})
    before = copy_ranks(pipeline_store, "scores", None)["cosine"]
    (_, path, category, _), = pipeline_store.image_info([queries[0]])
    data = pipeline_store.image_data([queries[0]])[queries[0]]
    pipeline_store.add_image(f"{category}/same_again.jpg", category,
                             hashlib.sha256(data).hexdigest(), data)
    refresh(pipeline_store)  # the copy is scored: a candidate like any other image
    after = copy_ranks(pipeline_store, "scores", None)["cosine"]
    assert after[:4].tolist() == before[:4].tolist()  # not ranked behind its own content


def test_the_results_show_the_latest_evaluation_in_whatever_space(pipeline_store):
    from imgsim import evaluate_model, lineage

    evaluate_model(pipeline_store, ks=[1], space="scores")
    latest = pipeline_store.last_run("evaluate_model")[0]
    assert lineage.current_results(pipeline_store)["evaluation"][0] == latest
    evaluate_model(pipeline_store, ks=[1, 5])
    assert lineage.current_results(pipeline_store)["evaluation"][1]["space"] == "combined"
