import subprocess
import sys

import pytest

from imgsim.cli import build_parser, main

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
    assert report.is_file()
    assert main(["--db", db, "rank", "--top-k-candidates", "3"]) == 0


def test_bad_parameter_exits_2_with_the_reason(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'bad.db'}"
    assert main(["--db", db, "prepare", "--ratio-train-test", "1.5"]) == 2
    assert "ratio_train_test must be in (0, 1); got 1.5" in capsys.readouterr().err


def test_the_routines_sql_in_the_repository_is_what_deploy_installs(capsys):
    from imgsim.deploy import SQL_DIR

    assert main(["sql"]) == 0
    assert capsys.readouterr().out == (SQL_DIR / "routines.sql").read_text()  # imgsim sql >
