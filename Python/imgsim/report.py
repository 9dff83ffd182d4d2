"""report: the results page of the latest results of one lineage, as one self-contained file.

The page is the template ``results.html`` of :mod:`imgsim.web`, the one ``imgsim serve``
shows at /results: which split, classifier and features the results come from (with
their runs' parameters, seeds and times), classifier accuracy overall and per category,
a confusion matrix of the test images, copies and label conflicts the split found, the
ranking chart and metrics, the evaluation queries whose positive ranked lowest, the
images that could not be used, and for a sample of queries their top-K candidates as
thumbnails with distances (green: same category). In the file, images are embedded as
data: URIs. Results computed from an earlier split or classifier are not shown (see
:func:`imgsim.lineage.current_results`).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
from pathlib import Path

import numpy as np

from . import checks, lineage
from .evaluate import query_ranks
from .images import ImageError, thumbnail

WEB = Path(__file__).with_name("web")
STEPS = {"split": "prepare_data", "train": "train_classifier", "evaluation": "evaluate_model",
         "ranking": "rank_candidates"}
THUMBNAIL = 96  # pixels, in the file


@functools.cache
def templates():
    """The Jinja2 environment of the web package's templates (HTML autoescaped); imported
    here, not at module level: the server-side environment has no Jinja2."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([WEB / "templates", WEB / "static"]),
        autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def confusion(labels, predicted, classes) -> np.ndarray:
    """Counts ``[true, predicted]`` over ``classes``."""
    index = {c: n for n, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, pred in zip(labels, predicted):
        if true in index and pred in index:
            matrix[index[true], index[pred]] += 1
    return matrix


def write_report(store, path="imgsim_report.html", sample_queries: int = 8) -> Path:
    """Write the HTML report to ``path`` and return the path.

    The report takes no lock: it is written again if a step changed the results it
    shows while it read them (and refused if that keeps happening)."""
    sample_queries = checks.count("sample_queries", sample_queries, 0)
    for _ in range(3):
        results = lineage.current_results(store)
        html = _html(store, results, sample_queries)
        if _seen(lineage.current_results(store)) == _seen(results):
            path = Path(path)
            path.write_text(html, encoding="utf-8")
            return path
    raise lineage.StaleInputs("the results kept changing while the report was written "
                              "(steps are running): write it again when they have finished")


def _seen(results) -> tuple:
    """What a report shows of ``results``: which runs, or why none."""
    return tuple(results[k] and results[k][0] for k in ("split", "train", "evaluation",
                                                         "ranking")) + (results["note"],)


def _html(store, results, sample_queries: int) -> str:
    """The page with every image embedded (unreadable ones have no thumbnail)."""
    page = results_page(store, results, sample_queries)
    thumbs = {}
    for image_id, data in store.image_data(page["images"]).items():
        try:
            thumbs[image_id] = data_uri(thumbnail(data, THUMBNAIL))
        except ImageError:
            pass
    return templates().get_template("results.html").render(
        page, thumb=thumbs.get, similar=None, cell=None, nav=False)


def copy_groups(rows) -> list[dict]:
    """Images of one content stored more than once, from :meth:`Store.copies` rows:
    label conflicts (the content under two or more categories) first."""
    groups = {}
    for sha256, image_id, path, category in rows:
        groups.setdefault(sha256, []).append((image_id, path, category))
    found = [{"sha256": sha256, "images": images,
              "categories": sorted({c for _, _, c in images})}
             for sha256, images in groups.items()]
    return sorted(found, key=lambda g: (len(g["categories"]) == 1, g["images"][0][1]))


def results_page(store, results, sample_queries: int = 8, worst_queries: int = 8) -> dict:
    """What the results page shows of ``results`` (:func:`imgsim.lineage.current_results`),
    for the template ``results.html``; ``images`` are the ids of the images it shows."""
    page = {"written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "runs": _runs(store, results), "note": results["note"], "confusion": None,
            "evaluation": None, "worst": None, "samples": None}
    if results["train"]:
        page["confusion"] = _confusion_html(store)
    evaluation = results["evaluation"]
    if evaluation:
        metrics = store.metric_rows(evaluation[0])
        page["evaluation"] = {"space": evaluation[1].get("space"),
                              "feature_key": evaluation[1].get("feature_key"),
                              "metrics": _metrics_table(metrics),
                              "chart": data_uri(chart(metrics), "image/png")}
        page["worst"] = _worst(store, evaluation[1], worst_queries)
    page["errors"] = store.image_error_rows()
    page["copies"] = copy_groups(store.copies())
    page["unscored"] = store.unscored_count() if results["train"] else 0
    if results["ranking"]:
        page["samples"] = _samples(store, results["ranking"], sample_queries)
    shown = set()
    for row in page["worst"] or []:
        shown.update(row[:2])
    for sample in (page["samples"] or {}).get("queries", []):
        shown.add(sample[0])
        shown.update(c[1] for c in sample[1])
    page["images"] = sorted(shown)
    page["info"] = {i: (p, c) for i, p, c, _ in store.image_info(shown)} if shown else {}
    return page


def _runs(store, results) -> dict:
    """The runs behind ``results``: id, seed, parameters, counts and times (UTC, as runs
    keeps them), by part (None for a part not shown)."""
    found = dict.fromkeys(STEPS)
    for part, step in STEPS.items():
        if results[part] is None:
            continue
        run_id, parameters, counts = results[part][:3]
        row = next((r for r in store.run_rows(step, limit=50) if r[0] == run_id), None)
        started, finished = (row[3], row[4]) if row else (None, None)
        found[part] = {"id": run_id, "parameters": parameters, "counts": counts,
                       "seed": row[5] if row else None,
                       "started": started and _utc(started),
                       "took": (finished - started).total_seconds() if finished else None}
    return found


def _utc(moment: dt.datetime) -> str:
    """A time of runs as UTC (SQLite gives it back without its zone, in UTC)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def classified_test_images(store) -> list[tuple[int, str, str]]:
    """``(image id, category, predicted category)`` of the scored test images."""
    ids, labels, predicted, _ = store.score_matrix()
    test = set(store.split()[1])
    return [(i, c, p) for i, c, p in zip(ids.tolist(), labels, predicted) if i in test]


def _confusion_html(store) -> dict:
    """The confusion section of the page: the test images' matrix (rows: true category,
    columns: predicted) and each category's test accuracy."""
    rows = classified_test_images(store)
    labels, predicted = [r[1] for r in rows], [r[2] for r in rows]
    classes = sorted(set(labels) | set(predicted))
    matrix = confusion(labels, predicted, classes)
    return {"classes": classes, "matrix": matrix.tolist(),
            "accuracy": [(c, int(matrix[n, n]), int(matrix[n].sum()))
                         for n, c in enumerate(classes) if matrix[n].sum()]}


def _metrics_table(metrics) -> dict:
    """Top-k accuracy by distance and k, with mean and median ranks."""
    distances = sorted({m[0] for m in metrics})
    return {"ks": sorted({m[1] for m in metrics}), "distances": distances,
            "accuracy": {(m[0], m[1]): m[2] for m in metrics},
            "ranks": {m[0]: (m[3], m[4]) for m in metrics}}


def chart(metrics) -> bytes:
    """A PNG of top-k accuracy against k, one line per distance. The axis spans the values
    (not 0 to 100%), so that distances and ks that differ by a point stay apart."""
    from matplotlib.figure import Figure  # no pyplot: its global state is not for threads

    figure = Figure(figsize=(6.4, 3.4), dpi=100, layout="tight")
    axes = figure.subplots()
    values = [100 * m[2] for m in metrics]
    for (distance, style) in zip(sorted({m[0] for m in metrics}), ("o-", "s--", "^:")):
        points = sorted((m[1], 100 * m[2]) for m in metrics if m[0] == distance)
        axes.plot([k for k, _ in points], [a for _, a in points], style, label=distance)
    low, high = min(values), max(values)
    margin = max(high - low, 2.0) * 0.08
    axes.set_ylim(max(0.0, low - margin), min(100.0, high) + margin)
    axes.set_xticks(sorted({m[1] for m in metrics}))
    axes.set_xlabel("k (positive within the top k candidates)")
    axes.set_ylabel("accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _worst(store, params, count: int) -> list[tuple[int, int, int]]:
    """``(query, positive, rank)`` of the evaluation queries whose positive ranked lowest
    by cosine distance, in the evaluation's space (ranks above 1 only)."""
    queries, positives, ranks = query_ranks(store, params.get("space", "combined"),
                                            params.get("feature_key"), "cosine")
    order = np.lexsort((queries, -ranks))[:count]
    return [(int(queries[n]), int(positives[n]), int(ranks[n])) for n in order if ranks[n] > 1]


def _samples(store, ranking, sample: int) -> dict:
    """The top candidates of ``sample`` queries of a ranking, spread over its queries."""
    run_id, params, _ = ranking
    rows = store.ranking_rows(run_id)
    queries = sorted({r[0] for r in rows})
    chosen = [queries[n] for n in np.linspace(0, len(queries) - 1, min(sample, len(queries)),
                                              dtype=int)] if queries else []
    return {"run": run_id, "space": params.get("space"),
            "feature_key": params.get("feature_key"), "total": len(queries),
            "queries": [(q, [r[1:] for r in rows if r[0] == q]) for q in chosen]}
