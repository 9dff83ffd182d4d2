"""The ``imgsim`` command: one sub-command per step, ``run`` for all, ``report``."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from . import backbones, checks, lineage, routines, serverenv
from .checks import ParameterError
from .deploy import DEFAULT_SERVER_VENV, deploy, drop_jobs, list_jobs, schedule_job, undeploy
from .evaluate import DEFAULT_KS, check_chart_path, evaluate_model, ranking_chart
from .featurize import featurize_images
from .finetune import DEFAULT_EPOCHS, VALIDATION
from .images import ImageError
from .pipeline import refresh, run_image_similarity, run_in_database
from .prepare import DEFAULT_SEED, prepare_data
from .rank import SPACES, rank_candidates
from .report import write_report
from .store import DEFAULT_URL, open_store
from .store.sqlalchemy_store import check_url
from .sync import sync_image_folder
from .train import KINDS, train_classifier


def _backbone_args(p, default=backbones.DEFAULT_BACKBONE):
    p.add_argument("--backbone", default=default, choices=sorted(backbones.SPECS),
                   help="CNN backbone (default: %s)" % (
                       default or "the features the current classifier was trained on"))
    p.add_argument("--weights", help="torchvision-format state_dict file (needed by resnet18)")


def _workers_arg(p):
    p.add_argument("--workers", type=int,
                   help="threads decoding images while others are inferred (default: half "
                        "the cores)")


def _ray_args(p, choices):
    p.add_argument("--compute", choices=choices, default="local",
                   help="local: here against --db; "
                        + ("in-db: CALL the procedures deployed in the PostgreSQL database "
                           "--db (FOLDER is then a path on the server); " if "in-db" in choices
                           else "")
                        + "ray: featurize on the Ray cluster --ray-address (pip install "
                          "'imgsim[ray]') (default: %(default)s)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", "local"),
                   help="with --compute ray: 'auto', HOST:PORT, ray://HOST:PORT, or 'local' "
                        "to start Ray here (default: $RAY_ADDRESS, else local)")
    p.add_argument("--cpus-per-actor", type=int, default=1,
                   help="with --compute ray: CPUs of each featurizing actor (default: 1)")


def _ray_address(args) -> str | None:
    return args.ray_address if args.compute == "ray" else None


def _prepare_args(p):
    p.add_argument("--keep-conflicts", action="store_true",
                   help="keep images whose content is filed under two categories (left out "
                        "of training and evaluation by default)")
    p.add_argument("--ratio-train-test", type=float, default=0.75,
                   help="share of each category used for training (default: %(default)s)")
    p.add_argument("--max-query-imgs-per-subdir", type=int, default=20,
                   help="evaluation queries per category (default: %(default)s)")
    p.add_argument("--max-neg-imgs-per-query-img", type=int, default=100,
                   help="negatives per evaluation query (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="random seed, recorded in runs (default: %(default)s)")


def _train_args(p):
    p.add_argument("--kind", choices=KINDS, default="mlp",
                   help="mlp (one hidden layer of 100, like rx_neural_network) or logistic "
                        "(default: %(default)s)")
    p.add_argument("--fine-tune", action="store_true",
                   help="first tune the backbone's last stages on the training images "
                        "(needs torch; minutes on a CPU; far better accuracy and ranking)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="most fine-tuning epochs (default: %(default)s)")
    p.add_argument("--validation", type=float, default=VALIDATION,
                   help="share of each category's training images held out of the "
                        "fine-tuning to stop it early and to judge it: the tuned backbone is "
                        "kept only when it beats the frozen one there; 0 keeps it always "
                        "(default: %(default)s)")
    p.add_argument("--tune-minutes", type=float, metavar="MINUTES",
                   help="stop the fine-tuning's views and epochs within this time (the "
                        "featurizing with the tuned backbone comes after)")


def _evaluate_args(p):
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS),
                   help="k values of top-k accuracy (default: %(default)s)")
    p.add_argument("--space", choices=SPACES, default="combined",
                   help="vectors compared: classifier scores with the features breaking "
                        "near-ties and near copies first, the scores alone (the template's), "
                        "or backbone features (default: %(default)s)")
    p.add_argument("--chart", help="also write the ranking chart to this PNG file")


def _rank_args(p):
    p.add_argument("--top-k-candidates", type=int, default=10,
                   help="candidates kept per query (default: %(default)s)")


def _common_args(p, before_command: bool):
    """--db, --quiet and --debug: before the command, and after it too (where a value
    given overrides the one before)."""
    def default(value):
        return value if before_command else argparse.SUPPRESS

    p.add_argument("--db", default=default(DEFAULT_URL),
                   help=f"SQLAlchemy database URL (default: {DEFAULT_URL})")
    p.add_argument("--quiet", action="store_true", default=default(False),
                   help="no progress bars")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="print the traceback of errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgsim", description="In-database image similarity: featurize images with a "
        "pretrained CNN, train a classifier, evaluate and rank similar images; every result "
        "is a table.")
    _common_args(parser, before_command=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_args(common, before_command=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])

    p = sub.add_parser("sync", help="mirror a folder (one sub-folder per category) into images")
    p.add_argument("folder")
    p.add_argument("--replace", action="store_true",
                   help="mirror FOLDER although the table mirrors another folder (its images "
                        "and everything derived from them are removed)")

    p = sub.add_parser("featurize", help="compute CNN features of new images")
    _backbone_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    _workers_arg(p)
    _ray_args(p, ("local", "ray"))

    p = sub.add_parser("prepare", help="split train/test and draw the evaluation set")
    _backbone_args(p)
    _prepare_args(p)

    p = sub.add_parser("train", help="train the classifier and score every image")
    _backbone_args(p, default=None)
    _train_args(p)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")

    p = sub.add_parser("evaluate", help="top-k ranking accuracy by L2 and cosine distance")
    _backbone_args(p, default=None)
    _evaluate_args(p)
    p.add_argument("--copies", action="store_true",
                   help="also rank four edited copies of each query among every image: how "
                        "often the copy comes first")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as JSON instead of a table")

    p = sub.add_parser("rank", help="top-k most similar candidates of each query image")
    _backbone_args(p, default=None)
    _rank_args(p)
    p.add_argument("--space", choices=SPACES, default="combined", help="ranking space")
    p.add_argument("--include-self", action="store_true", help="let a query rank itself")

    p = sub.add_parser("refresh", help="what the scheduled job runs: featurize new images "
                                       "with the classifier's backbone, score every image, "
                                       "rank again (no retraining)")
    _rank_args(p)
    p.add_argument("--space", choices=SPACES, default="combined", help="ranking space")

    p = sub.add_parser("run", help="all steps: [sync], featurize, prepare, train, evaluate, "
                                   "rank, report")
    p.add_argument("folder", nargs="?", help="image folder to sync first")
    p.add_argument("--replace", action="store_true",
                   help="mirror FOLDER although the table mirrors another folder")
    _backbone_args(p)
    _workers_arg(p)
    _prepare_args(p)
    _train_args(p)
    _evaluate_args(p)
    _rank_args(p)
    p.add_argument("--report", default="imgsim_report.html",
                   help="HTML report path (default: %(default)s)")
    _ray_args(p, ("local", "in-db", "ray"))

    p = sub.add_parser("deploy", help="install or upgrade imgsim inside PostgreSQL (--db)")
    p.add_argument("--dsn", help="postgresql://user@host:port/db of a superuser (or give --db)")
    p.add_argument("--server-venv", default=str(DEFAULT_SERVER_VENV),
                   help="server-side Python environment (default: %(default)s)")
    p.add_argument("--no-prepare-venv", action="store_true",
                   help="take --server-venv as the DBA prepared it; do not install into it")
    p.add_argument("--schedule", help="cron expression of the refresh job, e.g. '0 2 * * *'")
    p.add_argument("--admin-role", default="imgsim_admin", help="owner role (default: %(default)s)")
    p.add_argument("--analyst-role", default="imgsim_analyst",
                   help="role that runs procedures and reads results (default: %(default)s)")
    p.add_argument("--allow-folder", action="append", metavar="PATH",
                   help="a server folder analysts may sync (repeat for more; replaces the "
                        "list; by default only superusers may name server paths)")
    p.add_argument("--max-backend-memory-mb", type=int,
                   help="memory one step may use in one server process (default: 1024)")

    p = sub.add_parser("undeploy", help="remove schema imgsim with its data, its job, and the "
                                        "roles deploy created that no database still uses")
    p.add_argument("--dsn", help="postgresql://user@host:port/db of a superuser (or give --db)")

    p = sub.add_parser("server-env", help="prepare the server-side environment on the database "
                                          "host (then deploy with --no-prepare-venv)")
    p.add_argument("folder", nargs="?", default=str(DEFAULT_SERVER_VENV),
                   help="where (default: %(default)s)")
    p.add_argument("--python", help="the server's Python version, e.g. 3.11 (default: this "
                                    "Python's)")

    sub.add_parser("sql", help="print the SQL of the routines deploy installs")

    p = sub.add_parser("schedule", help="the pg_cron refresh job: list, drop, or set it")
    p.add_argument("--dsn", help="postgresql://user@host:port/db of a superuser (or give --db)")
    p.add_argument("action", choices=("list", "drop", "set"))
    p.add_argument("cron", nargs="?", help="cron expression, for set")

    p = sub.add_parser("report", help="write the HTML report of the latest results")
    p.add_argument("--out", default="imgsim_report.html", help="path (default: %(default)s)")
    p.add_argument("--sample-queries", type=int, default=8, help="queries shown (default: 8)")

    p = sub.add_parser("serve", help="the web page and REST API (reads only: an analyst's "
                                     "login is enough; needs the web extra)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a host name clients use in their URLs (repeat for more; '*' for "
                        "any); requests naming another are refused (by default the --host "
                        "address, and localhost on loopback)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes answering requests (default: %(default)s; each loads the "
                        "models: about the cores, memory allowing)")
    return parser


def _print_results_table(store) -> None:
    """The current classifier's accuracy and ranking figures, on this database's images."""
    results = lineage.current_results(store)
    if results["train"] is None or results["evaluation"] is None:
        print(f"no consistent results to show: {results['note'] or 'run evaluate'}")
        return
    train = results["train"][2]
    evaluation = results["evaluation"]
    top = {(m[0], m[1]): m[2] for m in store.metric_rows(evaluation[0])}
    print(f"results on this database's images ({train['train_images']} training, "
          f"{train['test_images']} test, {evaluation[2].get('queries', 0)} evaluation queries):")
    print(f"  {'train accuracy':<18}{100 * train['train_accuracy']:>7.1f}%")
    if train["test_accuracy"] is not None:
        print(f"  {'test accuracy':<18}{100 * train['test_accuracy']:>7.1f}%")
    for k in (1, 5, 10, 32):
        if ("cosine", k) in top:
            print(f"  {'cosine top-' + str(k):<18}{100 * top['cosine', k]:>7.1f}%")
    print(f"({_candidates_line(evaluation[2])})")
    print("(the template's published figures are on its own fashion images: bench/RESULTS.md "
          "compares imgsim with them on those images)")


def _candidates_line(counts: dict) -> str:
    """How many candidates each evaluation query ranks its positive among."""
    queries, pairs = counts.get("queries", 0), counts.get("pairs", 0)
    per = pairs // queries if queries else 0
    return (f"{queries} queries, each ranking its positive among {per} candidates (a top-k "
            f"with k >= {per} is 100% by construction)")


def _print_metrics(results: list[dict], counts: dict) -> None:
    """evaluate's metrics as a table: top-k accuracy by distance, the positive's mean and
    median rank, and the edited copies' figures when measured."""
    print(_candidates_line(counts))
    template = [r for r in results if r["measure"] == "template"]
    distances = sorted({r["distance"] for r in template})
    accuracy = {(r["distance"], r["k"]): r["accuracy"] for r in template}
    ranks = {r["distance"]: r for r in template}
    print(f"{'':<16}" + "".join(f"{d:>10}" for d in distances))
    for k in sorted({r["k"] for r in template}):
        print(f"{'top-' + str(k):<16}" + "".join(f"{100 * accuracy[d, k]:>9.1f}%"
                                               for d in distances))
    for name in ("mean_rank", "median_rank"):
        print(f"{name.replace('_', ' '):<16}" + "".join(f"{ranks[d][name]:>10.1f}"
                                                       for d in distances))
    copies = {r["distance"]: r for r in results if r["measure"] == "copy"}
    if copies:
        print(f"{'copy first':<16}" + "".join(f"{100 * copies[d]['accuracy']:>9.1f}%"
                                              for d in distances))
        print(f"{'copy mean rank':<16}" + "".join(f"{copies[d]['mean_rank']:>10.1f}"
                                                  for d in distances))


def _database_command(args):
    """deploy, undeploy and schedule: commands on a PostgreSQL database."""
    dsn = args.dsn or args.db
    if not dsn.startswith(("postgresql", "postgres:")):
        raise ParameterError(f"{args.command} needs --dsn postgresql://...; got {dsn}")
    if args.command == "deploy":
        return deploy(dsn, args.server_venv, not args.no_prepare_venv, args.schedule,
                      args.admin_role, args.analyst_role, args.allow_folder,
                      args.max_backend_memory_mb)
    if args.command == "undeploy":
        return undeploy(dsn)
    if args.action == "set":
        if not args.cron:
            raise ParameterError("schedule set needs a cron expression")
        return schedule_job(dsn, args.cron)
    if args.action == "drop":
        return {"dropped": drop_jobs(dsn)}
    return [dict(zip(("job", "name", "schedule", "command", "database", "active"), job))
            for job in list_jobs(dsn)]


def _shown(store) -> str:
    return store.engine.url.render_as_string(hide_password=True)


def _check_database_exists(args) -> None:
    """Only sync and run make a new SQLite database: a mistyped --db is an error, not a
    new empty file."""
    url = make_url(check_url(args.db))  # a URL, of SQLite or PostgreSQL, first
    if url.get_backend_name() == "sqlite" and args.command not in ("sync", "run") \
            and url.database not in (None, "", ":memory:") and not Path(url.database).exists():
        raise ParameterError(f"there is no SQLite database at {url.database} (sync or run "
                             "makes one)")


def _check_output_folder(path: str, option: str) -> None:
    """Refuse, before any step runs, an output file whose folder does not exist."""
    if not Path(path).resolve().parent.is_dir():
        raise ParameterError(f"{option} {path}: its folder does not exist")


def _hint(exc: Exception) -> str:
    """What to do about a database refusal an analyst's login meets."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, psycopg.errors.InsufficientPrivilege):
        return (" (a login of imgsim_analyst runs the steps inside the database: imgsim run "
                "--compute in-db, or CALL imgsim.featurize_images() and the other procedures "
                "from SQL)")
    return ""


def main(argv=None) -> int:
    """Run the command; errors are one line on stderr (exit 2), Ctrl-C exits 130, and
    ``--debug`` prints the traceback as well."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("imgsim: interrupted (finished batches were kept)", file=sys.stderr)
        return 130
    except (ParameterError, ValueError, FileNotFoundError, ImageError, RuntimeError,
            PermissionError, OSError, psycopg.Error, DBAPIError) as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"imgsim: error: {message}{_hint(exc)}", file=sys.stderr)
        return 2


def _run(args) -> int:
    progress = not args.quiet
    if args.command in ("deploy", "undeploy", "schedule"):
        print(json.dumps(_database_command(args), indent=2, default=str))
        return 0
    if args.command == "server-env":
        site = serverenv.prepare(args.folder, args.python)
        print(json.dumps({"server_site": str(site), "build": serverenv.package_build()},
                         indent=2))
        return 0
    if args.command == "sql":
        print(routines.script(), end="")
        return 0
    if args.command == "serve":  # before open_store: the app creates nothing
        try:
            from .web.app import serve
        except ImportError as exc:
            raise RuntimeError(f"imgsim serve needs the web extra: pip install 'imgsim[web]' "
                               f"({exc})") from None
        serve(args.db, args.host, args.port, checks.count("workers", args.workers, 1),
              args.allowed_host)
        return 0
    if args.command == "run":
        _check_output_folder(args.report, "--report")
    if args.command == "report":
        _check_output_folder(args.out, "--out")
    if getattr(args, "compute", None) == "ray" and args.workers is not None:
        raise ParameterError("--workers is for --compute local: on Ray each actor decodes "
                             "with the CPUs it was given (--cpus-per-actor)")
    if args.command == "run" and args.compute == "in-db":
        check_chart_path(args.chart)
        if args.workers is not None:
            raise ParameterError("--workers is for --compute local: inside the database one "
                                 "thread decodes, within the DBA's memory setting")
        if args.fine_tune:
            raise ParameterError("--fine-tune needs torch, which the database server does "
                                 "not have: run with --compute local against the same "
                                 "--db (the tuned backbone is stored in the database)")
        if not args.db.startswith(("postgresql", "postgres:")):
            raise ParameterError("--compute in-db calls the procedures deployed in a "
                                 "PostgreSQL database: --db must be its postgresql:// URL")
        run_in_database(args.db, args.folder, backbone=args.backbone, weights=args.weights,
                        ratio_train_test=args.ratio_train_test,
                        max_query_imgs_per_subdir=args.max_query_imgs_per_subdir,
                        max_neg_imgs_per_query_img=args.max_neg_imgs_per_query_img,
                        top_k_candidates=args.top_k_candidates, ks=args.ks,
                        kind=args.kind, space=args.space, seed=args.seed,
                        replace=args.replace, keep_conflicts=args.keep_conflicts)
    _check_database_exists(args)
    store = open_store(args.db)
    if args.command == "run" and args.compute != "in-db" and args.folder is None \
            and not store.categories():
        raise ParameterError(f"{_shown(store)} has no images yet: give run the image FOLDER "
                             "(one sub-folder of images per category)")
    weights = getattr(args, "weights", None)
    if args.command == "run" and args.compute == "in-db":
        _print_results_table(store)
        evaluation = lineage.current_results(store)["evaluation"]
        if args.chart and evaluation:
            Path(args.chart).write_bytes(ranking_chart(store.metric_rows(evaluation[0])))
        print(f"report: {write_report(store, args.report).resolve()}")
        return 0
    if args.command in ("featurize", "report") and not store.categories():
        raise ParameterError(f"{_shown(store)} has no images yet: run imgsim sync FOLDER "
                             "first (one sub-folder of images per category)")
    if args.command == "sync":
        result = sync_image_folder(store, args.folder, args.replace, progress=progress)
    elif args.command == "featurize":
        result = featurize_images(store, args.backbone, weights, args.batch_size,
                                  progress=progress, workers=args.workers,
                                  ray_address=_ray_address(args),
                                  cpus_per_actor=args.cpus_per_actor)
    elif args.command == "prepare":
        result = prepare_data(store, args.backbone, weights, args.ratio_train_test,
                              args.max_query_imgs_per_subdir,
                              args.max_neg_imgs_per_query_img, args.seed, args.keep_conflicts)
    elif args.command == "train":
        result = train_classifier(store, args.backbone, weights, args.kind, args.seed,
                                  args.fine_tune, args.epochs, progress, args.validation,
                                  args.tune_minutes)
    elif args.command == "evaluate":
        result = evaluate_model(store, args.ks, args.space, args.backbone, weights,
                                args.chart, args.copies)
        if not args.json:
            _print_metrics(result, store.last_run("evaluate_model")[2])
            return 0
    elif args.command == "rank":
        result = rank_candidates(store, args.top_k_candidates, args.space,
                                 args.include_self, args.backbone, weights)
    elif args.command == "report":
        result = {"report": str(write_report(store, args.out, args.sample_queries))}
    elif args.command == "refresh":
        result = refresh(store, args.top_k_candidates, args.space)
    else:
        run_image_similarity(
            store, args.folder, args.backbone, weights, args.ratio_train_test,
            args.max_query_imgs_per_subdir, args.max_neg_imgs_per_query_img,
            args.top_k_candidates, args.ks, args.kind, args.space, args.seed,
            args.fine_tune, args.epochs, args.chart, progress, args.replace,
            args.keep_conflicts, args.workers, _ray_address(args), args.cpus_per_actor,
            args.validation, args.tune_minutes)
        _print_results_table(store)
        print(f"report: {write_report(store, args.report).resolve()}")
        return 0
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
