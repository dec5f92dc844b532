"""The `marketrank` CLI: LETOR training end to end, and user errors as one readable line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marketrank.cli import app

LETOR_SAMPLE = Path(__file__).parent / "data" / "letor-sample"
runner = CliRunner()


@pytest.mark.slow
def test_train_on_letor_writes_export_and_test_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path / "ws"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--letor", str(LETOR_SAMPLE), "--output", str(out), "--epochs", "2",
                                 "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert 0.0 < evaluation["ranking_metrics"]["ndcg@10"]["value"] <= 1.0
    assert evaluation["source"] == "letor"
    assert evaluation["lists"] == 9  # test.txt has 9 queries
    versions = list((out / "model" / "marketrank").iterdir())
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").exists()
    spec = json.loads((versions[0] / "assets" / "feature_spec.json").read_text())
    assert spec["features"][0]["shape"] == [136]


def test_letor_missing_split_is_one_line_error(tmp_path):
    shutil.copy(LETOR_SAMPLE / "train.txt", tmp_path / "train.txt")
    result = runner.invoke(app, ["train", "--letor", str(tmp_path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "vali" in result.output and str(tmp_path) in result.output
    assert "Traceback" not in result.output


def test_train_needs_exactly_one_input(tmp_path):
    result = runner.invoke(app, ["train", "--output", str(tmp_path)])
    assert result.exit_code == 1
    assert "--features or --letor" in result.output


def test_unknown_size_is_rejected(tmp_path):
    result = runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--size", "huge"])
    assert result.exit_code == 1
    assert "huge" in result.output and "tiny" in result.output


def test_report_without_runs_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    result = runner.invoke(app, ["report", "show"])
    assert result.exit_code == 1
    assert "marketrank run" in result.output


def _command_paths(group, prefix=()):
    """Every command of the CLI as its argv path (groups and their commands)."""
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, command in click_group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _command_paths(command, (*prefix, name))


def test_every_command_renders_its_help():
    # Help text is rich markup: an unescaped "[/...]" in one option's help once crashed `bench quality --help`.
    paths = list(_command_paths(app))
    assert ("bench", "quality") in paths and len(paths) > 20
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, f"marketrank {' '.join(path)} --help: {result.output[-500:]}"
        assert "Usage" in result.output
    help_text = runner.invoke(app, ["bench", "quality", "--help"], env={"COLUMNS": "200"}).output
    assert "scorer/loss[/members]" in help_text


def test_user_errors_are_one_plain_line(tmp_path, monkeypatch):
    """Messages are printed as text, not rich markup (a path or an AWS message may hold "[...]"), and a wrong value
    names its option, before any work."""
    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    (tmp_path / "a-file").write_text("x")
    cases = [(["report", "show", "[/x]"], "no report for run '[/x]'"),
             (["report", "show", "[bold]run"], "no report for run '[bold]run'"),
             (["bench", "serve", "--candidates", "50,abc"], "--candidates: expected comma-separated whole numbers"),
             (["train", "--letor", str(LETOR_SAMPLE), "--output", str(tmp_path / "a-file")],
              f"--output {tmp_path / 'a-file'} is a file"),
             (["train", "--letor", str(LETOR_SAMPLE), "--output", str(tmp_path / "out"), "--epochs", "0"],
              "epochs and batch_size must be >= 1")]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()  # refused before training
