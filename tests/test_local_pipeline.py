"""The local pipeline end to end: the gate, the MLflow registry aliases and the local endpoint manifest.

Runs real `marketrank run`s (real training and evaluation) on the tiny dataset that the session's tiny run
already built (its data and features are copied in, so Spark does not run again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marketrank.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tiny_run, tmp_path_factory):
    home = tmp_path_factory.mktemp("pipeline-ws")
    shutil.copytree(tiny_run["home"] / "data", home / "data")
    return home


def _run(home, monkeypatch, *args: str) -> dict:
    monkeypatch.setenv("MARKETRANK_HOME", str(home))
    result = runner.invoke(app, ["run", "--size", "tiny", "--epochs", "3", "--learning-rate", "0.003", *args],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((home / "runs" / "latest" / "report.json").read_text())


def _endpoint(home) -> dict:
    return json.loads((home / "endpoints" / "marketrank.json").read_text())["state"]


def _aliases(home) -> dict[str, int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return {alias: int(version) for alias, version in client.get_registered_model("marketrank").aliases.items()}


def test_gate_registry_and_shadow_deployment_sequence(workspace, monkeypatch):
    # 1. First model: no champion, so the lift check passes by definition; it becomes the champion.
    first = _run(workspace, monkeypatch)
    assert first["gate"]["passed"] and first["champion_model"] is None
    assert first["deployment"]["action"] == "create"
    assert _endpoint(workspace)["production"]["model_name"] == "marketrank-v1"
    assert _aliases(workspace) == {"champion": 1}
    assert (workspace / "models" / "marketrank-v1").is_dir()

    # 2. A deliberately bad challenger (labels shuffled within lists) is stopped by the gate: the lift's CI
    #    lower bound is far below the minimum, nothing is registered and the champion stays deployed alone.
    bad = _run(workspace, monkeypatch, "--shuffle-labels")
    assert bad["champion_model"] == "marketrank-v1"
    assert bad["comparison"]["ci_high"] < 0  # clearly worse than the champion
    assert bad["comparison"]["resampled_by"] == "user_id"  # the gate's interval resamples users
    assert not bad["gate"]["passed"]
    failed = {c["threshold_name"]: c for c in bad["gate"]["checks"] if not c["passed"]}
    assert "min_lift" in failed
    for check in failed.values():  # the message names each failing metric and its value
        assert check["metric"] in bad["gate"]["message"] and f"{check['value']:.4f}" in bad["gate"]["message"]
    assert bad["deployment"]["action"] == "skipped" and bad["registered"] is None
    assert _endpoint(workspace) == first["deployment"]["state"]
    assert _aliases(workspace) == {"champion": 1}

    # 3. A good challenger (another seed; the gate tolerates noise-level differences here) goes into shadow.
    good = _run(workspace, monkeypatch, "--train-seed", "7", "--min-lift", "-0.05", "--shadow-sampling", "50")
    assert good["gate"]["passed"] and good["deployment"]["action"] == "shadow"
    state = _endpoint(workspace)
    assert state["production"]["model_name"] == "marketrank-v1"
    assert state["shadow"]["model_name"] == "marketrank-v2" and state["shadow"]["weight"] == 0.5
    assert _aliases(workspace) == {"champion": 1, "challenger": 2}

    # 4. Promote, twice (the retry is a no-op), then roll back, twice.
    monkeypatch.setenv("MARKETRANK_HOME", str(workspace))
    promoted = json.loads(runner.invoke(app, ["endpoint", "promote", "--force"], catch_exceptions=False).output)
    assert promoted["action"] == "promote"
    assert _aliases(workspace) == {"champion": 2, "previous-champion": 1}
    again = json.loads(runner.invoke(app, ["endpoint", "promote", "--force"], catch_exceptions=False).output)
    assert again["action"] == "noop" and _endpoint(workspace) == promoted["state"]
    rolled = json.loads(runner.invoke(app, ["endpoint", "rollback"], catch_exceptions=False).output)
    assert rolled["action"] == "rollback"
    assert _endpoint(workspace)["production"]["model_name"] == "marketrank-v1"
    assert _aliases(workspace) == {"champion": 1}
    assert json.loads(runner.invoke(app, ["endpoint", "rollback"], catch_exceptions=False).output)["action"] == "noop"


def test_features_from_another_feature_job_are_rebuilt(tiny_run, tmp_path):
    """Cached features that another feature job built (another fingerprint in stats.json) are rebuilt."""
    from pipelines.local import ensure_features
    from training.features import features_fingerprint

    raw, features = Path(tiny_run["report"]["dataset"]["raw"]), tmp_path / "features"
    shutil.copytree(tiny_run["features"], features)
    assert ensure_features(raw, features) is None  # this code's: reused as it is
    stats = json.loads((features / "stats.json").read_text())
    (features / "stats.json").write_text(json.dumps({**stats, "features_fingerprint": "an-older-job"}))
    rebuilt = ensure_features(raw, features)
    assert rebuilt is not None and rebuilt["splits"] == stats["splits"]
    assert json.loads((features / "stats.json").read_text())["features_fingerprint"] == features_fingerprint()


def test_fresh_never_removes_what_it_cannot_rebuild(tmp_path, monkeypatch):
    """`run --fresh` re-simulates: an unknown size fails before anything is removed, and logs the simulator did not
    write (a user's own, in a named dataset) are refused, not replaced by simulated ones."""
    from pipelines.local import LocalRunConfig, run_local

    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    raw = tmp_path / "data" / "mine" / "raw"
    (raw / "users").mkdir(parents=True)
    (raw / "users" / "part-0.parquet").write_bytes(b"the user's own logs")
    with pytest.raises(ValueError, match="unknown data size 'bogus'"):
        run_local(LocalRunConfig(size="bogus", dataset="mine", fresh=True))
    with pytest.raises(ValueError, match="--fresh would replace the logs in .*mine/raw"):
        run_local(LocalRunConfig(size="tiny", dataset="mine", fresh=True))
    assert (raw / "users" / "part-0.parquet").read_bytes() == b"the user's own logs"
    result = CliRunner().invoke(app, ["run", "--dataset", "mine", "--size", "tiny", "--fresh"])
    assert result.exit_code == 1 and "--fresh would replace" in result.output and "Traceback" not in result.output
