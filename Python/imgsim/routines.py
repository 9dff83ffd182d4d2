"""The SQL routines `imgsim deploy` installs, generated from one definition of each
routine's parameters (names, types and defaults are the template's).

Every public routine is the same few lines of PL/Python running with its caller's
rights: put the server-side environment first on ``sys.path`` (its path and the build
they were deployed for are written into the body, where no session can change them),
then hand the routine's own arguments, by name, to :func:`imgsim.indb.call`. The one
routine that runs with its owner's rights is ``imgsim._step``, with its search_path
pinned to ``pg_catalog, imgsim, pg_temp``; every name in the SQL imgsim runs is
schema-qualified. ``sql/routines.sql`` shows the result (``imgsim sql`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

KS = "ARRAY[1,2,4,5,8,10,15,20,28,32]"
SIMILAR = ("TABLE(image_id pg_catalog.int4, path pg_catalog.text, category pg_catalog.text, "
           "distance pg_catalog.float8)")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None = None  # SQL text of the default; None: required


@dataclass(frozen=True)
class Routine:
    name: str
    doc: str
    params: tuple[Param, ...]
    returns: str | None = None  # a function's result; None: a procedure

    @property
    def procedure(self) -> bool:
        return self.returns is None


def _p(name, sql_type, default=None):
    return Param(name, sql_type, default)


# Every routine resolves names in these schemas only, whatever the caller's search_path:
# a SET clause on _step and the functions; a procedure, whose SET clause would forbid its
# commits, sets it for each of its transactions (indb.call).
SEARCH_PATH = "pg_catalog, imgsim, pg_temp"

# The messages a step sends, whatever the caller set: a session asking for every debug
# message (megabytes a step) and not reading them would stall the step, holding the lease.
STEP_MESSAGES = ("SET client_min_messages = notice SET debug_print_parse = off "
                 "SET debug_print_rewritten = off SET debug_print_plan = off "
                 "SET trace_sort = off ")

# Parameters that could be large are of domains whose bounds PostgreSQL checks before a
# routine's Python sees (and copies) them.
DOMAINS = {
    "imgsim.short_text": ("pg_catalog.text", "at_most_4096_characters",
                          "pg_catalog.length(VALUE) <= 4096"),
    "imgsim.k_list": ("pg_catalog.int4[]", "at_most_50_values",
                      "pg_catalog.cardinality(VALUE) <= 50"),
    "imgsim.id_list": ("pg_catalog.int4[]", "at_most_100000_ids",
                       "pg_catalog.cardinality(VALUE) <= 100000"),
    "imgsim.image_file": ("pg_catalog.bytea", "at_most_100_mb",
                          "pg_catalog.octet_length(VALUE) <= 104857600"),
}
TEXT, INT, FLOAT = "imgsim.short_text", "pg_catalog.int4", "pg_catalog.float8"
BOOL = "pg_catalog.bool"
NULL = "NULL"

ROUTINES = (
    Routine("sync_image_folder",
            "Mirror a server folder (one sub-folder per category, inside a folder the DBA "
            "allowed) into imgsim.images.",
            (_p("folder", TEXT), _p("replace", BOOL, "false"))),
    Routine("featurize_images", "CNN features of every image that has none for the backbone.",
            (_p("backbone", TEXT, "'efficientnet_lite0'"), _p("batch_size", INT, "32"),
             _p("weights", TEXT, NULL))),
    Routine("prepare_data",
            "Train/test split per category (by content) and the evaluation pairs.",
            (_p("ratio_train_test", FLOAT, "0.75"), _p("max_query_imgs_per_subdir", INT, "20"),
             _p("max_neg_imgs_per_query_img", INT, "100"), _p("seed", INT, "42"),
             _p("backbone", TEXT, "'efficientnet_lite0'"), _p("weights", TEXT, NULL),
             _p("keep_conflicts", BOOL, "false"))),
    Routine("train_classifier",
            "Train the classifier on the current split (stored as ONNX in imgsim.models) "
            "and score every image.",
            (_p("kind", TEXT, "'mlp'"), _p("seed", INT, "42"), _p("backbone", TEXT, NULL),
             _p("weights", TEXT, NULL))),
    Routine("evaluate_model",
            "Top-k ranking accuracy by L2 and cosine distance; stored in "
            "imgsim.ranking_metrics and returned.",
            (_p("ks", "imgsim.k_list", KS), _p("space", TEXT, "'combined'"),
             _p("backbone", TEXT, NULL), _p("weights", TEXT, NULL),
             _p("copies", BOOL, "false")),
            "TABLE(distance pg_catalog.text, k pg_catalog.int4, accuracy pg_catalog.float8, "
            "mean_rank pg_catalog.float8, median_rank pg_catalog.float8, "
            "measure pg_catalog.text)"),
    Routine("rank_candidates",
            "The top_k_candidates most similar images of each query image, into "
            "imgsim.ranking_results.",
            (_p("top_k_candidates", INT, "10"), _p("space", TEXT, "'combined'"),
             _p("include_self", BOOL, "false"), _p("query_table", TEXT, "'query_images'"),
             _p("backbone", TEXT, NULL), _p("weights", TEXT, NULL))),
    Routine("set_query_images",
            "Choose the query images of rank_candidates (an empty array: the test images).",
            (_p("image_ids", "imgsim.id_list"),)),
    Routine("run_image_similarity",
            "Every step: [sync], featurize, prepare, train, evaluate, rank.",
            (_p("image_folder", TEXT, NULL), _p("backbone", TEXT, "'efficientnet_lite0'"),
             _p("ratio_train_test", FLOAT, "0.75"), _p("max_query_imgs_per_subdir", INT, "20"),
             _p("max_neg_imgs_per_query_img", INT, "100"), _p("top_k_candidates", INT, "10"),
             _p("ks", "imgsim.k_list", KS), _p("kind", TEXT, "'mlp'"),
             _p("space", TEXT, "'combined'"), _p("seed", INT, "42"), _p("weights", TEXT, NULL),
             _p("replace", BOOL, "false"), _p("keep_conflicts", BOOL, "false"))),
    Routine("refresh",
            "The scheduled job: featurize new images, re-score them with the current "
            "classifier, rank again.",
            (_p("top_k_candidates", INT, "10"), _p("space", TEXT, "'combined'"))),
    Routine("similar_images",
            "Featurize and score one new image, and return the k most similar stored "
            "images, of one category and within a distance when given (writes nothing).",
            (_p("image", "imgsim.image_file"), _p("k", INT, "10"), _p("space", TEXT, "'combined'"),
             _p("category", TEXT, NULL), _p("max_distance", FLOAT, NULL)), SIMILAR),
    Routine("similar_to",
            "The k stored images most similar to a stored image, from its stored vector "
            "(writes nothing).",
            (_p("image_id", INT), _p("k", INT, "10"), _p("space", TEXT, "'combined'"),
             _p("category", TEXT, NULL), _p("max_distance", FLOAT, NULL)), SIMILAR),
    Routine("current_results",
            "The runs of the current results: split, classifier, evaluation and ranking "
            "(run_id NULL, and why, for one that is missing or stale); join results on "
            "these ids, not on the largest (writes nothing).",
            (), "TABLE(part pg_catalog.text, run_id pg_catalog.int4, note pg_catalog.text)"),
)

BOOTSTRAP = '''import sys
SITE, BUILD = {site!r}, {build!r}
if getattr(sys.modules.get("imgsim"), "__build__", None) != BUILD:
    if getattr(sys.modules.get("imgsim.indb"), "_INVOCATIONS", None):
        plpy.error("imgsim was upgraded while a call was running in this session: call again")
    for name in [m for m in sys.modules if m == "imgsim" or m.startswith("imgsim.")]:
        del sys.modules[name]
    if SITE in sys.path:
        sys.path.remove(SITE)
    sys.path.insert(0, SITE)
    import imgsim.serverenv
    imgsim.serverenv.check(SITE, BUILD)
'''


def body(routine: Routine, site: str, build: str) -> str:
    """The PL/Python body of a public routine."""
    arguments = ", ".join(f"{p.name!r}: {p.name}" for p in routine.params)
    if routine.procedure:  # returns None; pins search_path for each of its transactions
        run = f"call(plpy, {routine.name!r}, {{{arguments}}}, True, {SEARCH_PATH!r})"
    else:
        run = f"return call(plpy, {routine.name!r}, {{{arguments}}}, False)"
    return (BOOTSTRAP.format(site=site, build=build)
            + "from imgsim.indb import call\n" + run + "\n")


def step_body(site: str, build: str) -> str:
    """The PL/Python body of imgsim._step."""
    return (BOOTSTRAP.format(site=site, build=build)
            + "from imgsim.indb import step\nreturn step(plpy, token, action)\n")


def statements(site: str, build: str):
    """The CREATE statements of the domains and of every routine, as psycopg SQL (bodies
    as literals)."""
    from psycopg import sql

    created = [sql.SQL("CREATE DOMAIN {} AS {} CONSTRAINT {} CHECK ({})").format(
        sql.SQL(name), sql.SQL(base), sql.Identifier(constraint), sql.SQL(check))
        for name, (base, constraint, check) in DOMAINS.items()]
    created += [sql.SQL(
        "CREATE FUNCTION imgsim._step(token imgsim.short_text, action imgsim.short_text) "
        "RETURNS pg_catalog.text LANGUAGE plpython3u SECURITY DEFINER "
        "SET search_path = " + SEARCH_PATH + " " + STEP_MESSAGES + "AS {}").format(
            sql.Literal(step_body(site, build)))]
    for routine in ROUTINES:
        params = sql.SQL(", ").join(
            sql.SQL("{} {}{}").format(
                sql.Identifier(p.name), sql.SQL(p.type),
                sql.SQL("") if p.default is None else sql.SQL(" DEFAULT " + p.default))
            for p in routine.params)
        kind = sql.SQL("PROCEDURE" if routine.procedure else "FUNCTION")
        returns = sql.SQL("") if routine.procedure else sql.SQL(
            " RETURNS " + routine.returns + " SET search_path = " + SEARCH_PATH)
        created.append(sql.SQL("CREATE {} imgsim.{}({}){} LANGUAGE plpython3u AS {}").format(
            kind, sql.Identifier(routine.name), params, returns,
            sql.Literal(body(routine, site, build))))
        created.append(sql.SQL("COMMENT ON {} imgsim.{} IS {}").format(
            kind, sql.Identifier(routine.name), sql.Literal(routine.doc)))
    return created


def script(site: str = "<server-side site-packages>", build: str = "<build>") -> str:
    """The routines as one SQL script, for reading (what deploy runs, with the site and
    build of the deployment)."""
    lines = ["-- imgsim's routines, generated by imgsim/routines.py: imgsim sql prints them.",
             "-- Installed by imgsim deploy (which drops the routines of schema imgsim first)."]
    for statement in statements(site, build):
        lines.append(statement.as_string(None) + ";")
    return "\n".join(lines) + "\n"
