"""What each result was computed from, and the checks that a step's inputs are current.

Every step records its inputs in its run's counts:

- ``prepare_data``: the feature key whose images it split (the split is its own run), and
  digests of the split and of the evaluation pairs it wrote (so that a split the tables no
  longer hold, because sync removed images or the prepare was interrupted, is seen);
- ``train_classifier``: ``prepare_run`` (the split it was trained on) and ``feature_key``;
- ``score_images``: ``train_run``;
- ``evaluate_model`` and ``rank_candidates``: ``prepare_run``, and ``train_run`` with the
  ``model`` when they used the classifier (its scores, or the features of a backbone it
  tuned).

The current split is the last prepare that succeeded; the current classifier is the
last train that succeeded. Evaluate and rank hold no lock: they read their inputs, and
before keeping their results check that the inputs did not change meanwhile
(:func:`unchanged`). A step whose inputs are no longer current refuses with
:class:`StaleInputs`, which says which step to run again: evaluating a classifier on a
split that now puts its training images in the test set would report figures that are
silently wrong.
"""

from __future__ import annotations

import hashlib

import numpy as np


class StaleInputs(ValueError):
    """A step's inputs are missing or out of date; the message says what to run."""


def _digest(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes() + b"|")
    return digest.hexdigest()[:16]


def split_digest(train_ids, test_ids) -> str:
    """A digest of a train/test split (the ids of each side, in any order)."""
    return _digest(sorted(map(int, train_ids)), sorted(map(int, test_ids)))


def pairs_digest(pairs) -> str:
    """A digest of evaluation pairs ``(query, candidate, is_positive)``, in any order."""
    return _digest(sorted(tuple(map(int, p)) for p in pairs))


def current_split(store) -> tuple:
    """``(run id, parameters, counts, seed)`` of the prepare run that made the split the
    tables hold."""
    split = store.last_run("prepare_data")
    if split is None:
        raise StaleInputs("there is no train/test split yet: run prepare first")
    if "split_digest" not in split[2]:
        raise StaleInputs(f"prepare run {split[0]} was made by an earlier version of imgsim, "
                          "which kept no digest of its split: run prepare again")
    if split[2]["split_digest"] != split_digest(*store.split()):
        raise StaleInputs(f"the split tables no longer hold the split of prepare run "
                          f"{split[0]} (sync removed images of it, or a prepare was "
                          "interrupted): run prepare again")
    return split


def current_classifier(store) -> tuple:
    """The train run of the current classifier, checked against the current split."""
    train = store.last_run("train_classifier")
    if train is None:
        raise StaleInputs("no classifier has been trained yet: run train first")
    split = current_split(store)
    trained_on = train[2].get("prepare_run")
    if trained_on != split[0]:
        raise StaleInputs(
            f"the classifier (train run {train[0]}) was trained on the split of "
            f"{'an earlier prepare' if trained_on is None else f'prepare run {trained_on}'}, "
            f"but the current split is prepare run {split[0]}: its test images may be "
            "training images; run train again")
    return train


def check_scores(store, train) -> None:
    """The scores table must hold the current classifier's scores."""
    models = store.score_models()
    if models and models != {train[2]["model"]}:
        raise StaleInputs(f"the scores are not those of the current classifier "
                          f"{train[2]['model']}: run train again")


def check_evaluation_set(store, split) -> None:
    """The evaluation pairs must be those the split drew, none lost to a removed image."""
    if split[2].get("pairs_digest") != pairs_digest(store.evaluation_pairs()):
        raise StaleInputs(f"the evaluation pairs are no longer those of prepare run "
                          f"{split[0]} (sync removed images of them): run prepare again")


def uses_classifier(space: str, feature_key: str | None, train) -> bool:
    """Whether results in ``space`` depend on the classifier: its scores, or the features
    of a backbone tuned on its training images."""
    if space != "features":
        return True
    return train is not None and feature_key == train[2].get("feature_key") and \
        "-tuned@" in (feature_key or "")


def inputs(store, space: str, feature_key: str | None = None, need_split: bool = True) -> dict:
    """The checked inputs of a step that ranks in ``space`` (evaluate, rank), as counts.
    ``need_split``: the step reads the split (its evaluation pairs or test images)."""
    split = current_split(store) if need_split else store.last_run("prepare_data")
    train = store.last_run("train_classifier")
    record = {"prepare_run": None if split is None else split[0]}
    if uses_classifier(space, feature_key, train):
        train = current_classifier(store)
        if space != "features":
            check_scores(store, train)
        record.update(train_run=train[0], model=train[2]["model"])
    if feature_key is not None:
        record["feature_key"] = feature_key
    return record


def unchanged(store, used: dict, space: str, feature_key, need_split: bool, what: str):
    """Before evaluate or rank keep their results: their inputs are still those they read
    (they take no lock, so a prepare or train may have run meanwhile)."""
    try:
        now = inputs(store, space, feature_key, need_split)
        if need_split and what == "evaluation":
            check_evaluation_set(store, current_split(store))
    except StaleInputs:
        now = None
    if now != used:
        raise StaleInputs(f"the split or the classifier changed while the {what} read them: "
                          "run it again")


def current_results(store) -> dict:
    """The latest results of one consistent lineage, for reports: the current split, its
    classifier, and the latest evaluation and ranking computed from them (in any space:
    the combined one, the scores or the classifier's own features). A part that is missing or
    stale is None, and ``note`` says why."""
    found = {"split": None, "train": None, "evaluation": None, "ranking": None, "note": None}
    try:
        split = current_split(store)
    except StaleInputs as stale:
        found["note"] = str(stale)
        return found
    found["split"] = split
    try:
        found["train"] = current_classifier(store)
        check_scores(store, found["train"])
        key = found["train"][2]["feature_key"]
    except StaleInputs as stale:
        found["train"], key = None, split[1].get("feature_key")
        found["note"] = str(stale)

    def matches(params, counts, space):
        if counts.get("prepare_run") not in (None, split[0]) or params.get("space") != space:
            return False
        if space != "features":
            return (found["train"] is not None and counts.get("train_run") == found["train"][0]
                    and params.get("feature_key") == (key if space == "combined" else None))
        return params.get("feature_key") == key and (
            "train_run" not in counts or (found["train"] is not None
                                          and counts["train_run"] == found["train"][0]))

    for step, name in (("evaluate_model", "evaluation"), ("rank_candidates", "ranking")):
        runs = [r for r in store.run_rows(step, limit=50)
                if r[2] == "succeeded" and r[7] and "prepare_run" in r[7]]
        chosen = next((r for r in runs if any(matches(r[6], r[7], space) for space in
                                              ("combined", "scores", "features"))), None)
        if chosen is not None:
            found[name] = (chosen[0], chosen[6], chosen[7])
    ranking = found["ranking"]
    if ranking and store.ranking_row_count(ranking[0]) != ranking[2].get("rows"):
        found["ranking"] = None
        found["note"] = (f"results of rank run {ranking[0]} were removed since (images "
                         "removed by sync, or results older than the last rankings): run "
                         "rank again")
    return found


def current_runs(store) -> list[tuple]:
    """``(part, run_id, note)`` of :func:`current_results`: the split, the classifier, the
    evaluation and the ranking the report shows (run_id None, and why, for a part that is
    missing or stale). What SQL readers join results on: the largest run id of a table
    may be another split's or classifier's."""
    found = current_results(store)
    steps = {"split": "prepare", "train": "train", "evaluation": "evaluate", "ranking": "rank"}
    return [(name, found[part][0] if found[part] else None,
             None if found[part] else found["note"] or f"no current {name}: run {steps[part]}")
            for part, name in (("split", "split"), ("train", "classifier"),
                               ("evaluation", "evaluation"), ("ranking", "ranking"))]
