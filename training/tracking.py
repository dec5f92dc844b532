"""MLflow tracking through an explicit client: no process-global state, so several stores can coexist
(tests, notebooks) and ``MLFLOW_TRACKING_URI`` is honoured without being overwritten."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("marketrank.tracking")


class Tracker:
    """One MLflow run."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str | None = None,
              artifact_location: str | None = None) -> Tracker | None:
        """A new run, or None when no tracking URI is configured (then nothing is tracked).

        ``artifact_location`` applies when the experiment is created (a local store keeps artifacts beside its
        database instead of in ``./mlruns`` of whatever directory the process runs in).
        """
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            log.info("MLflow disabled: no MLFLOW_TRACKING_URI")
            return None
        from mlflow import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_location)
            return cls(client, client.create_run(experiment_id, run_name=run_name).info.run_id)
        except Exception as err:  # noqa: BLE001 - a stopped or unreachable tracking server must not cost the model
            log.warning("MLflow tracking at %s unavailable, training continues untracked: %s: %s", uri,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=values)

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=values)

    def artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._upload(f"{local_dir} -> {artifact_path or '.'}", self.client.log_artifacts, self.run_id, str(local_dir),
                     artifact_path)

    def json(self, obj: dict[str, Any], name: str) -> None:
        self._upload(name, self.client.log_dict, self.run_id, obj, name)

    def _upload(self, what: str, fn, *args: Any) -> None:
        """Artifacts go to the tracking server's store (S3 on SageMaker, with this job's credentials): a store this
        job cannot write costs the run its copy of the artifact, never the trained model."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow artifact %s not logged (run %s): %s: %s", what, self.run_id, type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
