import json
import shutil
import subprocess
import sys

import pytest

from imgsim import open_store
from imgsim.cli import build_parser, main
from imgsim.store.sqlalchemy_store import SQLAlchemyStore

COMMANDS = ["sync", "featurize", "prepare", "train", "evaluate", "rank", "run", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: imgsim " + command in capsys.readouterr().out


def test_run_from_the_command_line_writes_a_report(texture_folder, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    report = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "imgsim.cli", "--db", db, "--quiet", "run", str(texture_folder),
         "--max-query-imgs-per-subdir", "4", "--max-neg-imgs-per-query-img", "10",
         "--report", str(report)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "cosine top-1" in done.stdout
    # the template's figures, on other images, are not put beside these as if comparable
    assert "results on this database's images" in done.stdout
    assert not any(figure in done.stdout for figure in ("75.1", "89.7", "35.5", "89.5"))
    assert report.is_file()
    assert main(["--db", db, "rank", "--top-k-candidates", "3"]) == 0


def test_bad_parameter_exits_2_with_the_reason(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'bad.db'}"
    open_store(db).close()
    assert main(["--db", db, "prepare", "--ratio-train-test", "1.5"]) == 2
    assert "ratio_train_test must be in (0, 1); got 1.5" in capsys.readouterr().err


def test_the_routines_sql_in_the_repository_is_what_deploy_installs(capsys):
    from imgsim.deploy import SQL_DIR

    assert main(["sql"]) == 0
    assert capsys.readouterr().out == (SQL_DIR / "routines.sql").read_text()  # imgsim sql >


def test_evaluate_prints_a_table_or_its_json(pipeline_db, tmp_path, capsys):
    path = tmp_path / "evaluate.db"
    shutil.copy(pipeline_db[0], path)
    db = f"sqlite:///{path}"
    assert main(["evaluate", "--db", db, "--ks", "1", "5", "--space", "scores", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--db", db, "--ks", "1", "5", "--space", "scores"]) == 0
    first, *table = capsys.readouterr().out.splitlines()
    counts = SQLAlchemyStore(db).last_run("evaluate_model")[2]
    per = counts["pairs"] // counts["queries"]
    assert first.startswith(f"{counts['queries']} queries, each ranking its positive among "
                            f"{per} candidates")
    assert table[0].split() == ["cosine", "l2"] and len(table) == 5
    accuracy = {(m["distance"], m["k"]): m["accuracy"] for m in metrics}
    for line, k in zip(table[1:3], (1, 5)):
        assert line.split() == [f"top-{k}", f"{100 * accuracy['cosine', k]:.1f}%",
                                f"{100 * accuracy['l2', k]:.1f}%"]
    mean = {m["distance"]: m["mean_rank"] for m in metrics}
    assert table[3].split() == ["mean", "rank", f"{mean['cosine']:.1f}", f"{mean['l2']:.1f}"]


def test_common_options_go_before_or_after_the_command():
    parse = build_parser().parse_args
    assert (parse(["featurize"]).db, parse(["featurize"]).quiet) == ("sqlite:///imgsim.db", False)
    after = parse(["featurize", "--db", "sqlite:///a.db", "--quiet", "--debug"])
    assert (after.db, after.quiet, after.debug) == ("sqlite:///a.db", True, True)
    before = parse(["--db", "sqlite:///b.db", "--quiet", "train"])
    assert (before.db, before.quiet, before.debug) == ("sqlite:///b.db", True, False)
    assert parse(["--db", "sqlite:///b.db", "report", "--db", "sqlite:///c.db"]).db == \
        "sqlite:///c.db"


@pytest.mark.parametrize("command", [["featurize"], ["report"]])
def test_an_empty_database_is_said_to_be_empty(command, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    open_store(db).close()
    assert main(["--db", db, *command, "--quiet"] if command == ["featurize"]
                else ["--db", db, *command, "--out", str(tmp_path / "r.html")]) == 2
    assert "has no images yet: run imgsim sync FOLDER first" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--report", "/no/such/folder/r.html"], "--report /no/such/folder/r.html: its "
                                                     "folder does not exist"),
    (["report", "--out", "/no/such/folder/r.html"], "its folder does not exist"),
    (["run", "--compute", "in-db"], "--db must be its postgresql:// URL"),
    (["--db", "mysql://someone@host/db", "featurize"], "imgsim keeps its tables in SQLite or "
                                                        "PostgreSQL"),
    (["--db", "sqlite:///typo.db", "evaluate"], "there is no SQLite database at typo.db"),
    (["--db", "sqlite:///new.db", "run"], "has no images yet: give run the image FOLDER"),
])
def test_wrong_options_are_one_line_before_anything_is_made(argv, message, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] in ([], ["new.db"])  # no other file
    if (tmp_path / "new.db").exists():  # run makes the database, and stops before any step
        assert SQLAlchemyStore(f"sqlite:///{tmp_path / 'new.db'}").last_run(
            "featurize_images", status="succeeded") is None
