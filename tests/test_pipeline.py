"""End to end on the generated texture set: real weights, real ONNX Runtime, SQLite."""

import io

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import func, select

from conftest import BAD_FILES, PER_CATEGORY
from imgsim import (ParameterError, featurize_images, prepare_data, rank_candidates,
                    run_image_similarity, sync_image_folder, train_classifier, write_report)
from imgsim.store import tables as t

N_CATEGORIES = 11


def count(store, table):
    return store._fetch(select(func.count()).select_from(table))[0][0]


def test_bad_files_are_recorded_and_nothing_else_is_lost(pipeline_store):
    errors = {path: (step, reason) for path, step, reason, _ in pipeline_store.image_error_rows()}
    assert set(errors) == set(BAD_FILES)
    for path, reason in BAD_FILES.items():
        assert errors[path][0] == "featurize_images" and reason in errors[path][1]
    total = N_CATEGORIES * PER_CATEGORY + 4 + len(BAD_FILES)  # 4 odd-mode files convert
    assert count(pipeline_store, t.images) == total
    assert count(pipeline_store, t.features) == 2 * (total - len(BAD_FILES))  # and colour layouts


def test_classifier_scores_well_above_chance(pipeline_db):
    train = pipeline_db[1]["train_classifier"]
    assert len(train["classes"]) == N_CATEGORIES
    assert train["test_accuracy"] > 0.6  # chance is 1/11
    assert train["train_accuracy"] >= train["test_accuracy"]


def test_ranking_puts_the_positive_first_for_easy_pairs(pipeline_db):
    metrics = {(m["distance"], m["k"]): m["accuracy"] for m in pipeline_db[1]["evaluate_model"]}
    assert metrics["cosine", 1] > 0.5
    assert ("l2", 1) not in metrics  # the combined space: L2 would order as cosine does
    assert metrics["cosine", 32] >= metrics["cosine", 10] >= metrics["cosine", 1]


def test_stored_classifier_reproduces_the_scores_table(pipeline_store):
    run = pipeline_store.last_run("train_classifier")
    graph, metadata = pipeline_store.load_model(run[2]["model"])
    ids, labels, predicted, scores = pipeline_store.score_matrix()
    _, _, features = pipeline_store.feature_matrix(metadata["feature_key"], ids)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got_labels, got_scores = session.run(None, {"features": features})
    assert list(got_labels) == predicted
    assert np.allclose(got_scores, scores, atol=1e-6)
    assert scores.shape == (len(ids), len(metadata["classes"]))
    assert np.allclose(scores.sum(axis=1), 1, atol=1e-4)


def test_ranking_results_exclude_the_query_and_are_sorted(pipeline_store):
    run_id = pipeline_store.last_run("rank_candidates")[0]
    rows = pipeline_store.ranking_rows(run_id)
    queries = {r[0] for r in rows}
    assert queries == set(pipeline_store.split()[1])
    for q in queries:
        mine = [r for r in rows if r[0] == q]
        assert [r[1] for r in mine] == list(range(1, 11))
        assert all(r[2] != q for r in mine)
        assert [r[3] for r in mine] == sorted(r[3] for r in mine)


def test_every_step_is_recorded_with_parameters_and_seed(pipeline_store):
    steps = {r[1]: r for r in pipeline_store.run_rows()}
    assert set(steps) == {"sync_image_folder", "featurize_images", "prepare_data",
                          "train_classifier", "evaluate_model", "rank_candidates"}
    assert all(r[2] == "succeeded" and r[4] is not None for r in steps.values())
    assert steps["prepare_data"][5] == 1
    assert steps["prepare_data"][6]["max_query_imgs_per_subdir"] == 5
    assert steps["featurize_images"][7]["failed"] == len(BAD_FILES)


def test_featurize_is_incremental_by_content(pipeline_store):
    again = featurize_images(pipeline_store, progress=False)
    assert again["featurized"] == 0 and again["pending"] == 0  # bad content is not retried


def test_a_copy_reuses_features_and_a_changed_file_is_featurized_again(small_folder,
                                                                       empty_store):
    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    source = small_folder / "zebra" / "zebra_000.jpg"
    (small_folder / "zebra" / "copy.jpg").write_bytes(source.read_bytes())
    assert sync_image_folder(empty_store, small_folder, progress=False)["added"] == 1
    again = featurize_images(empty_store, progress=False)
    assert [again[k] for k in ("pending", "featurized", "reused", "failed")] == [1, 0, 1, 0]
    (small_folder / "zebra" / "copy.jpg").write_bytes(
        (small_folder / "zebra" / "zebra_001.jpg").read_bytes())
    assert sync_image_folder(empty_store, small_folder, progress=False)["changed"] == 1
    assert featurize_images(empty_store, progress=False)["reused"] == 1


def test_featurize_stores_colour_layouts_and_gives_older_images_theirs(small_folder, empty_store):
    from imgsim.featurize import LAYOUT_KEY, features_in_use

    sync_image_folder(empty_store, small_folder, progress=False)
    featurize_images(empty_store, progress=False)
    key = features_in_use(empty_store)
    ids = empty_store.feature_matrix(key)[0].tolist()
    assert empty_store.feature_matrix(LAYOUT_KEY)[0].tolist() == ids == list(range(1, 13))
    with empty_store.transaction():  # as featurized before colour layouts existed
        empty_store._write(t.features.delete().where(
            t.features.c.backbone == LAYOUT_KEY, t.features.c.image_id <= 3))
    again = featurize_images(empty_store, progress=False)
    assert again["pending"] == 3 and again["failed"] == 0
    assert empty_store.feature_matrix(LAYOUT_KEY)[0].tolist() == ids


def test_a_halved_recompressed_copy_keeps_its_colour_layout(texture_folder):
    from PIL import Image

    from imgsim.featurize import colour_layout
    from imgsim.images import MAX_PIXELS, preprocess
    from imgsim.rank import NEAR_LAYOUT

    def of(data):
        return colour_layout(preprocess(data, MAX_PIXELS, None))

    data = (texture_folder / "zebra" / "zebra_000.jpg").read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    halved = io.BytesIO()
    image.resize((image.width // 2, image.height // 2)).save(halved, "JPEG", quality=50)
    original = of(data)
    assert np.linalg.norm(original) == pytest.approx(1, abs=1e-5)
    assert 1 - original @ of(halved.getvalue()) < NEAR_LAYOUT
    other = of((texture_folder / "zebra" / "zebra_001.jpg").read_bytes())
    assert 1 - original @ other > NEAR_LAYOUT
    flat = io.BytesIO()
    Image.new("RGB", (300, 300), (120, 30, 200)).save(flat, "PNG")
    assert not of(flat.getvalue()).any()  # a flat image has no colour layout to match


@pytest.mark.parametrize("bad", [
    {"ratio_train_test": 1.0}, {"ratio_train_test": 0}, {"max_query_imgs_per_subdir": 0},
    {"max_neg_imgs_per_query_img": -1}, {"top_k_candidates": 0}, {"backbone": "vgg16"},
    {"kind": "forest"}, {"ks": [0, 5]}, {"space": "pixels"}, {"seed": -3},
])
def test_bad_parameters_are_refused_before_any_table_is_touched(empty_store, texture_folder,
                                                                bad):
    with pytest.raises(ParameterError):
        run_image_similarity(empty_store, texture_folder, progress=False, **bad)
    assert count(empty_store, t.runs) == 0 and count(empty_store, t.images) == 0


def test_a_failed_step_is_recorded_and_keeps_the_previous_results(pipeline_store, tmp_path):
    before = pipeline_store.split()
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"weights no image was featurized with")
    with pytest.raises(ValueError, match="no image has features"):
        prepare_data(pipeline_store, backbone="resnet18", weights=weights)
    assert pipeline_store.split() == before
    failed = pipeline_store.run_rows("prepare_data")[0]
    assert failed[2] == "failed" and "no image has features" in failed[8]


def test_logistic_classifier_and_feature_space_ranking(pipeline_store):
    result = train_classifier(pipeline_store, kind="logistic", seed=2)
    assert result["model"].startswith("logistic-run") and result["test_accuracy"] > 0.6
    ranked = rank_candidates(pipeline_store, top_k_candidates=3, space="features",
                             include_self=True)
    rows = pipeline_store.ranking_rows(ranked["run_id"])
    firsts = [r for r in rows if r[1] == 1]
    assert all(r[0] == r[2] for r in firsts)  # each query is its own nearest neighbour


def test_report_is_self_contained_html(pipeline_store, tmp_path):
    html = write_report(pipeline_store, tmp_path / "r.html").read_text()
    assert "Confusion matrix" in html and "data:image/png;base64" in html
    assert html.count("data:image/jpeg;base64") >= 8 * 11  # 8 queries with 10 candidates
    for path in BAD_FILES:
        assert path in html


def test_chosen_query_images_are_ranked_instead_of_the_test_images(pipeline_store):
    chosen = pipeline_store.split()[0][:3]
    pipeline_store.set_query_images(chosen)
    ranked = rank_candidates(pipeline_store, top_k_candidates=2)
    assert ranked["queries"] == 3
    assert {r[0] for r in pipeline_store.ranking_rows(ranked["run_id"])} == set(chosen)


def test_a_batch_holds_no_more_bytes_than_allowed():
    from imgsim.featurize import _batches

    pending = [(i, f"p{i}", f"s{i}", size) for i, size in enumerate([5, 5, 5, 30, 1, 1, 1])]
    batches = _batches(pending, images=3, max_bytes=12)
    assert [[i for i, _, _ in b] for b in batches] == [[0, 1], [2], [3], [4, 5, 6]]


CAPPED = """
import io

import numpy as np
from imgsim import settings

with settings.capped(300):
    try:
        np.ones(600 << 20, dtype=np.uint8)  # twice the setting
        print("allocated")
    except MemoryError:
        print("refused")
print("after:", np.ones(600 << 20, dtype=np.uint8).size >> 20)
"""


def test_the_memory_setting_is_enforced_where_it_is_applied():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CAPPED], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["refused", "after:", "600"]


def test_a_cancel_during_a_decode_leaves_no_thread_behind():
    """Decoding runs in C, where a cancel is not seen: the caller checks for one while a
    worker decodes, and when it comes waits for that decode (bounded by the image limits)
    rather than leave a thread running in a server process."""
    import threading

    from imgsim.featurize import prepare_answering

    release, finished = threading.Event(), threading.Event()

    class SlowDecoder:
        def prepare(self, data):
            release.wait(30)
            finished.set()
            return data

    class Cancelled(Exception):
        pass

    class Store:
        calls = 0

        def check_interrupts(self):
            Store.calls += 1
            if Store.calls == 2:
                release.set()  # the decode ends soon after the cancel
                raise Cancelled

    threads = threading.active_count()
    with pytest.raises(Cancelled):
        prepare_answering(Store(), SlowDecoder(), b"bytes")
    assert finished.is_set() and threading.active_count() == threads
