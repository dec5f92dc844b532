"""Where local runs keep their state: ``$MARKETRANK_HOME`` (default ``./workspace``).

    workspace/
      data/<dataset>/raw/{users,items,requests,impressions,interactions}/   simulated raw logs
      data/<dataset>/features/{train,valid,test}/ + feature_spec.json       feature job output
      runs/<run-id>/{model/,evaluation/,training/,report.json}              one `marketrank run`
      runs/latest -> <run-id>
      mlflow.db, mlartifacts/                                               MLflow tracking + registry
      models/<model-name>/<version>/                                         registered SavedModels (TF Serving layout)
      endpoints/<endpoint>.json                                             local endpoint manifest (champion, shadow)
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

HOME_ENV = "MARKETRANK_HOME"
LATEST = "latest"
REPORT_FILE = "report.json"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV, "workspace")).resolve()


def dataset_dir(name: str) -> Path:
    return home() / "data" / name


def runs_dir() -> Path:
    return home() / "runs"


def mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded sqlite store in the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifacts() -> str | None:
    """Where the embedded MLflow store keeps artifacts (beside its database, not in the current directory);
    None with a tracking server (MLFLOW_TRACKING_URI), which decides where its artifacts go."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else (home() / "mlartifacts").as_uri()


def models_dir() -> Path:
    """Registered models in TF Serving's layout: ``models/<model-name>/<version>/saved_model.pb``."""
    return home() / "models"


def endpoints_dir() -> Path:
    """Local endpoint manifests (``pipelines.deploy.LocalBackend``)."""
    return home() / "endpoints"


def capture_dir() -> Path:
    """Data capture of the local endpoint (SageMaker's JSONL layout): the shadow report reads it."""
    return home() / "data-capture"


def shadow_dir() -> Path:
    """Shadow reports per endpoint (``latest.json``, ``shadow.png``); ``endpoint promote`` acts on them."""
    return home() / "shadow"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def new_run_dir() -> Path:
    path = runs_dir() / new_run_id()
    path.mkdir(parents=True)
    return path


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and point ``runs/latest`` at the run (atomically replaced symlink)."""
    path = run_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{secrets.token_hex(3)}"
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    tmp.replace(link)
    return path


def read_report(run: str = LATEST) -> dict[str, Any]:
    path = runs_dir() / run / REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no report for run {run!r}: {path} does not exist (run `marketrank run` first)")
    from training.storage import json_object

    return json_object(path.read_text(), f"run report {path}")
