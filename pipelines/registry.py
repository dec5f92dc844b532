"""The local model registry: MLflow's registry (embedded sqlite by default) with aliases ``champion`` and
``challenger`` (and ``previous-champion`` for rollback), plus a copy of each registered SavedModel in TF Serving's
layout (``models/<model-name>/<version>/``) for the local endpoint. The SageMaker pipeline uses the SageMaker
model registry instead (RegisterModel step); both are written to by the same gate decision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
EXPORT_TAG = "saved_model_dir"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    name: str  # registry name
    version: int
    model_name: str  # deployable name: "<name>-v<version>", the endpoint variant's model
    saved_model_dir: Path  # TF Serving layout: <models>/<model_name>/<tf version>/

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "saved_model_dir": str(self.saved_model_dir)}


class LocalRegistry:
    def __init__(self, tracking_uri: str, models_dir: str | Path, name: str = "marketrank"):
        from mlflow import MlflowClient

        self.client, self.name, self.models_dir = MlflowClient(tracking_uri=tracking_uri), name, Path(models_dir)

    def register(self, export_dir: str | Path, run_id: str | None, description: str = "") -> RegisteredModel:
        """A new version from a training run's ``model`` artifact; the SavedModel is copied for serving."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="marketrank TF-Ranking ranker")
        source = f"runs:/{run_id}/model" if run_id else str(export_dir)
        version = int(self.client.create_model_version(self.name, source, run_id=run_id,
                                                       description=description).version)
        model_name = f"{self.name}-v{version}"
        target = self.models_dir / model_name / Path(export_dir).name
        staging = target.parent / f".{target.name}.tmp"  # the local endpoint never loads a half-copied version
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(export_dir, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        self.client.set_model_version_tag(self.name, str(version), EXPORT_TAG, str(target))
        return RegisteredModel(self.name, version, model_name, target)

    def get(self, alias: str) -> RegisteredModel | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return RegisteredModel(self.name, int(version.version), f"{self.name}-v{version.version}",
                               Path(version.tags[EXPORT_TAG]))

    def by_model_name(self, model_name: str) -> RegisteredModel:
        version = model_name.rsplit("-v", 1)[-1]
        found = self.client.get_model_version(self.name, version)
        return RegisteredModel(self.name, int(found.version), model_name, Path(found.tags[EXPORT_TAG]))

    def set_alias(self, alias: str, model: RegisteredModel | None) -> None:
        from mlflow.exceptions import MlflowException

        if model is None:
            with contextlib.suppress(MlflowException):  # no such alias: already absent
                self.client.delete_registered_model_alias(self.name, alias)
            return
        self.client.set_registered_model_alias(self.name, alias, str(model.version))

    def sync_aliases(self, production: str | None, shadow: str | None, previous: str | None) -> dict[str, int | None]:
        """Make the aliases follow an endpoint state (model names ``<name>-v<version>``)."""
        wanted = {CHAMPION: production, CHALLENGER: shadow, PREVIOUS: previous}
        for alias, model_name in wanted.items():
            self.set_alias(alias, self.by_model_name(model_name) if model_name else None)
        return {alias: int(m.rsplit("-v", 1)[-1]) if m else None for alias, m in wanted.items()}
