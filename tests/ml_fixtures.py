"""Session fixtures with real artifacts: one real `marketrank run` on tiny simulated data.

The run goes through the CLI (simulator -> Spark feature job -> TF-Ranking training -> export -> evaluation),
and the other tests reuse its features, SavedModel and report instead of repeating the slow steps.
conftest.py exposes them to every test module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TINY_EPOCHS = 4


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    from typer.testing import CliRunner

    from marketrank.cli import app

    home = tmp_path_factory.mktemp("workspace")
    old = os.environ.get("MARKETRANK_HOME")
    os.environ["MARKETRANK_HOME"] = str(home)
    try:
        result = CliRunner().invoke(app, ["run", "--size", "tiny", "--epochs", str(TINY_EPOCHS),
                                          "--learning-rate", "0.003"], catch_exceptions=False)
    finally:
        if old is None:
            os.environ.pop("MARKETRANK_HOME")
        else:
            os.environ["MARKETRANK_HOME"] = old
    assert result.exit_code == 0, result.output
    report_path = home / "runs" / "latest" / "report.json"
    report = json.loads(report_path.read_text())
    return {"home": home, "report": report, "report_path": report_path, "output": result.output,
            "features": Path(report["dataset"]["features"]), "export_dir": Path(report["training"]["export_dir"])}
