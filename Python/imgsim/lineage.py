"""What each result was computed from, and the checks that a step's inputs are current.

Every step records its inputs in its run's counts:

- ``prepare_data``: the feature key whose images it split (the split is its own run);
- ``train_classifier``: ``prepare_run`` (the split it was trained on) and ``feature_key``;
- ``score_images``: ``train_run``;
- ``evaluate_model`` and ``rank_candidates``: ``prepare_run``, and ``train_run`` with the
  ``model`` when they used the classifier (its scores, or the features of a backbone it
  tuned).

The current split is the last prepare that succeeded; the current classifier is the
last train that succeeded. A step whose inputs are no longer current refuses with
:class:`StaleInputs`, which says which step to run again: evaluating a classifier on a
split that now puts its training images in the test set would report figures that are
silently wrong.
"""

from __future__ import annotations


class StaleInputs(ValueError):
    """A step's inputs are missing or out of date; the message says what to run."""


def current_split(store) -> tuple:
    """``(run id, parameters, counts, seed)`` of the prepare run that made the split."""
    split = store.last_run("prepare_data")
    if split is None:
        raise StaleInputs("there is no train/test split yet: run prepare first")
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
    expected = split[2].get("pairs")
    found = store.evaluation_pair_count()
    if expected is not None and found != expected:
        raise StaleInputs(f"{expected - found} evaluation pairs of prepare run {split[0]} "
                          "lost an image that sync removed: run prepare again")


def uses_classifier(space: str, feature_key: str | None, train) -> bool:
    """Whether results in ``space`` depend on the classifier: its scores, or the features
    of a backbone tuned on its training images."""
    if space == "scores":
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
        if space == "scores":
            check_scores(store, train)
        record.update(train_run=train[0], model=train[2]["model"])
    if feature_key is not None:
        record["feature_key"] = feature_key
    return record


def current_results(store) -> dict:
    """The latest results of one consistent lineage, for reports: the current split, its
    classifier (None when stale), and the latest evaluation and ranking computed from
    them. ``note`` says what is missing or stale."""
    split = store.last_run("prepare_data")
    found = {"split": split, "train": None, "evaluation": None, "ranking": None, "note": None}
    if split is None:
        found["note"] = "no split yet: run prepare"
        return found
    train = store.last_run("train_classifier")
    if train is not None and train[2].get("prepare_run") == split[0]:
        found["train"] = train
    elif train is not None:
        found["note"] = (f"the classifier (train run {train[0]}) was trained on another split "
                         f"than the current one (prepare run {split[0]}): run train")

    def matches(counts):
        if counts.get("prepare_run") not in (None, split[0]):
            return False
        used = counts.get("train_run")
        return used is None or (found["train"] is not None and used == found["train"][0])

    for step, name in (("evaluate_model", "evaluation"), ("rank_candidates", "ranking")):
        for run in store.run_rows(step, limit=50):
            run_id, _, status, _, _, _, _, counts, _ = run
            if status == "succeeded" and counts and "prepare_run" in counts and matches(counts):
                found[name] = (run_id, run[6], counts)
                break
    return found
