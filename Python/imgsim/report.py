"""report: one self-contained HTML file of the latest results of one lineage.

Which split, classifier and features the results come from; classifier accuracy, the
ranking chart and metrics, a confusion matrix of the test images, copies and label
conflicts the split found, the images that could not be used, and for a sample of
queries their top-K candidates as thumbnails with distances (green: same category).
Results computed from an earlier split or classifier are not shown (see
:func:`imgsim.lineage.current_results`).
"""

from __future__ import annotations

import base64
import datetime as dt
from html import escape
from pathlib import Path

import numpy as np

from . import checks, lineage
from .evaluate import ranking_chart
from .images import ImageError, thumbnail

STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}
.q img{border:3px solid #555}.hit img{border:3px solid #2a2}.miss img{border:3px solid #c33}
figure{display:inline-block;margin:2px;text-align:center;font-size:11px}"""


def _img(data: bytes, mime: str = "image/jpeg") -> str:
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}">'


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
    parts = [f"<!doctype html><meta charset='utf-8'><title>imgsim report</title>"
             f"<style>{STYLE}</style><h1>imgsim report</h1>"
             f"<p>Written {dt.datetime.now().isoformat(timespec='seconds')}.</p>"]
    parts.append(_lineage_html(results))
    train = results["train"]
    if train:
        counts = train[2]
        test_acc = counts.get("test_accuracy")
        parts.append(f"<h2>Classifier</h2><p>Model <code>{escape(counts['model'])}</code>: "
                     f"training accuracy {100 * counts['train_accuracy']:.1f}%, test accuracy "
                     f"{'n/a' if test_acc is None else f'{100 * test_acc:.1f}%'}.</p>")
        parts.append(_confusion_html(store))
    evaluation = results["evaluation"]
    if evaluation:
        metrics = store.metric_rows(evaluation[0])
        parts.append(f"<h2>Ranking accuracy ({_space(evaluation[1])}, "
                     f"{evaluation[2]['queries']} queries, evaluate run {evaluation[0]})</h2>")
        parts.append(_img(ranking_chart(metrics), "image/png"))
        parts.append(_metrics_html(metrics))
    errors = store.image_error_rows()
    parts.append(f"<h2>Images not used ({len(errors)})</h2>")
    if errors:
        parts.append("<table><tr><th>path</th><th>step</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{escape(p)}</td><td>{escape(s)}</td><td>{escape(r)}</td></tr>"
            for p, s, r, _ in errors) + "</table>")
    ranking = results["ranking"]
    if ranking:
        parts.append(_ranking_html(store, ranking, sample_queries))
    return "\n".join(parts)


def _space(params) -> str:
    """Which vectors a ranking compared: the classifier's scores, or which features."""
    if params.get("space") == "features":
        return f"features <code>{escape(str(params.get('feature_key')))}</code>"
    return "classifier scores"


def _lineage_html(results) -> str:
    """What the results below were computed from, and the split's copies and conflicts."""
    split, train = results["split"], results["train"]
    html = ["<h2>Lineage</h2><ul>"]
    if split is not None:
        counts = split[2]
        html.append(f"<li>Split: prepare run {split[0]} (seed {split[3]}, features "
                    f"<code>{escape(str(split[1].get('feature_key')))}</code>): "
                    f"{counts.get('train')} training and {counts.get('test')} test images, "
                    f"{counts.get('queries')} evaluation queries.</li>")
        kept = "kept" if split[1].get("keep_conflicts") else "left out"
        html.append(f"<li>Exact copies among the images: {counts.get('copies', 0)} (always on "
                    f"one side of the split); label conflicts (one content under two "
                    f"categories): {counts.get('conflicts', 0)}, "
                    f"{counts.get('conflict_images', 0)} images, {kept}.</li>")
        for left in counts.get("left_out") or []:
            html.append(f"<li>Category <b>{escape(left['category'])}</b> left out: "
                        f"{escape(left['reason'])}.</li>")
    if train is not None:
        html.append(f"<li>Classifier: train run {train[0]}, model "
                    f"<code>{escape(train[2]['model'])}</code>, on features "
                    f"<code>{escape(train[2]['feature_key'])}</code>.</li>")
    if results["note"]:
        html.append(f"<li><b>Not shown:</b> {escape(results['note'])}.</li>")
    return "".join(html) + "</ul>"


def _confusion_html(store) -> str:
    ids, labels, predicted, _ = store.score_matrix()
    test = set(store.split()[1])
    keep = [n for n, i in enumerate(ids.tolist()) if i in test]
    labels = [labels[n] for n in keep]
    predicted = [predicted[n] for n in keep]
    classes = sorted(set(labels) | set(predicted))
    matrix = confusion(labels, predicted, classes)
    rows = []
    for n, c in enumerate(classes):
        total = max(matrix[n].sum(), 1)
        cells = "".join(
            f"<td style='background:rgba(40,120,200,{v / total:.2f})'>{v}</td>"
            for v in matrix[n])
        rows.append(f"<tr><th>{escape(c)}</th>{cells}</tr>")
    head = "".join(f"<th>{escape(c[:8])}</th>" for c in classes)
    return (f"<h3>Confusion matrix, test images (rows: true, columns: predicted)</h3>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def _metrics_html(metrics) -> str:
    distances = sorted({m[0] for m in metrics})
    ks = sorted({m[1] for m in metrics})
    value = {(m[0], m[1]): m[2] for m in metrics}
    ranks = {m[0]: (m[3], m[4]) for m in metrics}
    head = "".join(f"<th>top-{k}</th>" for k in ks)
    body = "".join(
        f"<tr><th>{escape(d)}</th>" + "".join(f"<td>{100 * value[d, k]:.1f}%</td>" for k in ks)
        + f"<td>{ranks[d][0]:.1f}</td><td>{ranks[d][1]:.0f}</td></tr>" for d in distances)
    return (f"<table><tr><th>distance</th>{head}<th>mean rank</th><th>median rank</th></tr>"
            f"{body}</table>")


def _ranking_html(store, ranking, sample: int) -> str:
    run_id, params, _ = ranking
    rows = store.ranking_rows(run_id)
    queries = sorted({r[0] for r in rows})
    if not queries:
        return ""
    chosen = [queries[n] for n in np.linspace(0, len(queries) - 1, min(sample, len(queries)),
                                              dtype=int)]
    chosen_rows = [r for r in rows if r[0] in set(chosen)]
    ids = set(chosen) | {r[2] for r in chosen_rows}
    info = {i: (p, c) for i, p, c, _ in store.image_info(ids)}
    data = store.image_data(ids)
    thumbs = {}
    for i in ids:
        try:
            thumbs[i] = _img(thumbnail(data[i]))
        except ImageError:
            thumbs[i] = "(unreadable)"
    html = [f"<h2>Top candidates for {len(chosen)} of {len(queries)} queries (rank run "
            f"{run_id}, {_space(params)})</h2><table>"]
    for q in chosen:
        cells = [f"<td class='q'><figure>{thumbs[q]}<figcaption>{escape(info[q][1])}"
                 f"</figcaption></figure></td>"]
        for _, rank, c, distance in (r for r in chosen_rows if r[0] == q):
            css = "hit" if info[c][1] == info[q][1] else "miss"
            cells.append(f"<td class='{css}'><figure>{thumbs[c]}<figcaption>#{rank} "
                         f"{distance:.3f}<br>{escape(info[c][1])}</figcaption></figure></td>")
        html.append(f"<tr>{''.join(cells)}</tr>")
    return "".join(html) + "</table>"
