"""The local run: the pipeline's steps, in order, with local equivalents and the same entry points.

generate data (simulator) -> PrepareFeatures (Spark ``local[*]``, ``training.feature_job``) -> Train
(``training.train`` with SageMaker-style directories) -> Evaluate against the champion (``training.evaluate``)
-> QualityGate (``pipelines.gate.decide``, the ConditionStep's checks) -> RegisterModel (MLflow registry) ->
DeployShadow (``pipelines.deploy`` on the local endpoint's manifest) -> run report.
Data and features are cached per dataset name in the workspace, so a second run only trains and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from marketrank import simulator, ui, workspace
from pipelines import deploy, gate
from pipelines.registry import CHAMPION, LocalRegistry
from training import report as evaluation_report
from training.feature_spec import SPEC_FILE, FeatureSpec
from training.hparams import HParams

log = logging.getLogger("marketrank.local")
RANKERS = ("challenger", "champion", "legacy", "oracle")


@dataclasses.dataclass(frozen=True)
class LocalRunConfig:
    size: str = "default"
    seed: int = 7
    #: Dataset name in the workspace (default ``<size>-seed<seed>``); reused when it already exists.
    dataset: str | None = None
    hparams: HParams = HParams()
    #: Regenerate data and features even when the workspace has them.
    fresh: bool = False
    thresholds: gate.GateThresholds = gate.GateThresholds()
    endpoint: str = "marketrank"
    #: Share of production requests the shadow (challenger) variant receives, in percent.
    shadow_sampling_percentage: float = 100.0

    @property
    def dataset_name(self) -> str:
        return self.dataset or f"{self.size}-seed{self.seed}"


def generate_data(raw_dir: Path, size: str, seed: int) -> dict[str, int]:
    config = simulator.preset(size, seed)
    with ui.step(f"simulate marketplace logs ({size}: {config.requests:,} requests)", total=config.requests) as s:
        tables = simulator.simulate(config, progress=lambda done, total: s.advance(done))
        tmp = raw_dir.with_name(raw_dir.name + ".tmp")
        simulator.write_tables(tables, tmp, config)
        tmp.rename(raw_dir)
    return {name: len(frame) for name, frame in tables.items()}


def ensure_simulated(data_dir: Path, size: str, seed: int) -> dict[str, Any]:
    """``data_dir``'s ``raw/`` logs and ``features/`` for the ``size`` preset and ``seed`` as the preset is now.

    Logs simulated with another config (an earlier preset) are simulated again and their features rebuilt, so a
    cache named ``<size>-seed<seed>`` never passes off old data as today's preset. Logs with no readable record
    of their config (from before it was recorded, or not the simulator's) are moved aside, not deleted.
    Returns the config the logs were simulated with."""
    import shutil

    raw_dir, features_dir = data_dir / "raw", data_dir / "features"
    wanted = dataclasses.asdict(simulator.preset(size, seed))
    if raw_dir.exists():
        try:
            built = json.loads((raw_dir / simulator.CONFIG_FILE).read_text())
        except (OSError, ValueError):
            built = None
        if built == wanted:
            ui.console.print(f"[dim]using raw logs in {raw_dir}[/dim]")
        elif built is not None:
            ui.console.print(f"[yellow]raw logs in {raw_dir} were simulated with {built}; the {size!r} preset is "
                             f"now {wanted}: simulating again[/yellow]")
            shutil.rmtree(raw_dir)
        else:
            aside = raw_dir.with_name(f"raw.unrecorded-{time.strftime('%Y%m%d-%H%M%S')}")
            raw_dir.rename(aside)
            ui.console.print(f"[yellow]raw logs in {raw_dir} do not record the simulator config they came from: "
                             f"moved to {aside}, simulating the {size!r} preset[/yellow]")
    if not raw_dir.exists():
        shutil.rmtree(features_dir, ignore_errors=True)  # built from other logs, or of unknown origin
        data_dir.mkdir(parents=True, exist_ok=True)
        generate_data(raw_dir, size, seed)
    ensure_features(raw_dir, features_dir)
    return wanted


def build_features(raw_dir: Path, features_dir: Path) -> dict[str, Any]:
    from training.feature_job import run_feature_job

    with ui.step("Spark feature job") as s:
        return run_feature_job(raw_dir, features_dir, progress=lambda msg: s.note(f"Spark feature job: {msg}"))


def ensure_features(raw_dir: Path, features_dir: Path) -> dict[str, Any] | None:
    """Run the feature job unless ``features_dir`` already holds this code's features (its ``stats.json`` has
    ``training.features.features_fingerprint()``): output of another feature job is rebuilt, not reused."""
    from training.feature_job import STATS_FILE, built_fingerprint
    from training.features import features_fingerprint

    if (features_dir / SPEC_FILE).exists() and (features_dir / STATS_FILE).exists():
        built = built_fingerprint(features_dir)
        if built == features_fingerprint():
            ui.console.print(f"[dim]using features in {features_dir}[/dim]")
            return None
        ui.console.print(f"[yellow]features in {features_dir} come from another feature job (fingerprint {built}, "
                         f"this code's {features_fingerprint()}): rebuilding[/yellow]")
    return build_features(raw_dir, features_dir)


def train_model(features_dir: Path, run_dir: Path, hparams: HParams, run_name: str):
    from training.train import train

    spec = FeatureSpec.load(features_dir / "train")
    members = f", {hparams.ensemble} members" if hparams.ensemble > 1 else ""
    with ui.step(f"train TF-Ranking {hparams.scorer}/{hparams.loss}{members}",
                 total=hparams.epochs * hparams.ensemble) as s:
        def on_epoch(epoch: int, logs: dict) -> None:
            s.advance(epoch, f"train epoch {epoch}: val ndcg@10 {logs.get('val_ndcg_10', float('nan')):.4f}")

        return train(features_dir / "train", features_dir / "valid", spec, hparams, run_dir / "model",
                     run_dir / "training", tracking_uri=workspace.mlflow_uri(), run_name=run_name,
                     progress=on_epoch, artifact_location=workspace.mlflow_artifacts())


def evaluate_model(export_dir: Path, features_dir: Path, run_dir: Path, champion: Path | None = None) -> dict:
    from training.evaluate import evaluate

    title = "evaluate on the test split" + (f" against the champion ({champion.parent.name})" if champion else "")
    with ui.step(title):
        return evaluate(export_dir, features_dir / "test", run_dir / "evaluation", champion)


def summarize(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The run report's view of ``evaluation.json``: one block per ranker, overall and per segment."""
    out: dict[str, Any] = {"challenger": {"overall": evaluation["ranking_metrics"],
                                          "per_segment": evaluation["per_segment"]}}
    out.update({name: block for name, block in evaluation["baselines"].items()})
    if evaluation.get("champion"):
        out["champion"] = evaluation["champion"]
        out["comparison"] = evaluation["comparison"]
    if (evaluation.get("logged_order_comparison") or {}).get("mean_diff") is not None:
        out["logged_order_comparison"] = evaluation["logged_order_comparison"]
    primary = evaluation_report.PRIMARY_METRIC
    challenger = evaluation["ranking_metrics"][primary]["value"]
    if "oracle" in out and out["oracle"]["overall"][primary]["value"]:
        out["oracle_ratio"] = challenger / out["oracle"]["overall"][primary]["value"]
    if "legacy" in out:
        out["lift_over_legacy"] = challenger - out["legacy"]["overall"][primary]["value"]
    return out


def run_local(config: LocalRunConfig = LocalRunConfig()) -> dict[str, Any]:
    """Run every step and write ``runs/<run-id>/report.json`` (``runs/latest`` points at it)."""
    started = time.time()
    data_dir = workspace.dataset_dir(config.dataset_name)
    raw_dir, features_dir = data_dir / "raw", data_dir / "features"
    simulator.preset(config.size, config.seed)  # an unknown size fails here, before anything is removed
    if (config.fresh and config.dataset is not None and raw_dir.is_dir() and any(raw_dir.iterdir())
            and not (raw_dir / simulator.CONFIG_FILE).exists()):  # a named dataset: perhaps the user's own logs
        raise ValueError(f"--fresh would replace the logs in {raw_dir}, which the simulator did not write: move them "
                         "away first, or name another dataset")
    data_dir.mkdir(parents=True, exist_ok=True)
    if config.fresh:
        import shutil

        shutil.rmtree(raw_dir, ignore_errors=True)
        shutil.rmtree(features_dir, ignore_errors=True)
    if config.dataset is None:  # the preset's own dataset: kept only while it matches the preset
        ensure_simulated(data_dir, config.size, config.seed)
    else:  # a dataset named by the user (perhaps their own logs): simulated only when absent (or with --fresh)
        if not raw_dir.exists():
            generate_data(raw_dir, config.size, config.seed)
        else:
            ui.console.print(f"[dim]using raw logs in {raw_dir}[/dim]")
        ensure_features(raw_dir, features_dir)

    registry = LocalRegistry(workspace.mlflow_uri(), workspace.models_dir())
    champion = registry.get(CHAMPION)
    run_dir = workspace.new_run_dir()
    result = train_model(features_dir, run_dir, config.hparams, run_name=run_dir.name)
    evaluation = evaluate_model(result.export_dir, features_dir, run_dir,
                                champion.saved_model_dir if champion else None)
    _log_to_mlflow(result.mlflow_run_id, evaluation)
    decision = gate.decide(evaluation, config.thresholds)
    registered, deployment = None, None
    backend = deploy.LocalBackend(workspace.endpoints_dir(), config.endpoint)
    if decision.passed:
        registered = registry.register(result.export_dir, result.mlflow_run_id, description=decision.message)
        challenger = deploy.Variant(registered.model_name, instance_type="local",
                                    weight=config.shadow_sampling_percentage / 100)
        deployment = deploy.deploy_shadow(backend, challenger)
        deployment["aliases"] = sync_aliases(registry, deployment["state"])
    else:  # a rejected challenger never touches the endpoint
        deployment = {"action": "skipped", "reason": decision.message, **deploy.describe(backend)}
    serving_model = production_model_dir(config.endpoint)
    if serving_model is not None:
        with ui.step("materialize online features for serving"):
            deployment["feature_store"] = materialize_features(features_dir, serving_model)
    report = {
        "run_id": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "dataset": {"name": config.dataset_name, "size": config.size, "seed": config.seed,
                    "raw": str(raw_dir), "features": str(features_dir)},
        "hparams": dataclasses.asdict(config.hparams),
        "training": {"export_dir": str(result.export_dir), "seconds": round(result.seconds, 1),
                     "best_epoch": result.best_epoch, "member_best_epochs": result.member_best_epochs,
                     "lists_per_second": round(result.examples_per_second, 1),
                     "mlflow_run_id": result.mlflow_run_id},
        "evaluation": str(run_dir / "evaluation" / evaluation_report.EVALUATION_FILE),
        "eval_label": evaluation["eval_label"],
        "eval_gain_weights": evaluation.get("eval_gain_weights"),
        "lists": evaluation["lists"],
        **summarize(evaluation),
        "champion_model": champion.model_name if champion else None,
        "gate": {**decision.to_dict(), "thresholds": dataclasses.asdict(config.thresholds)},
        "registered": registered.to_dict() if registered else None,
        "deployment": deployment,
    }
    workspace.write_report(run_dir, report)
    return report


def production_model_dir(endpoint: str = "marketrank") -> Path | None:
    """The SavedModel version dir the local endpoint's production variant serves, if any."""
    from training.export import latest_version

    state = deploy.LocalBackend(workspace.endpoints_dir(), endpoint).current()
    if state is None or state.production is None:
        return None
    return latest_version(workspace.models_dir() / state.production.model_name)


def materialize_features(features_dir: Path, model_dir: Path, location: str | None = None) -> dict[str, int]:
    """Fill the online feature store (embedded file by default) with the model's spec."""
    from serving.feature_store import DEFAULT_STORE_FILE, materialize, open_store
    from training.export import load_spec

    store = open_store(location, workspace.home() / DEFAULT_STORE_FILE)
    try:
        return materialize(features_dir, store, load_spec(model_dir))
    finally:
        store.close()


def sync_aliases(registry: LocalRegistry, state: dict[str, Any] | None) -> dict[str, int | None]:
    """Registry aliases follow the endpoint: champion = production, challenger = shadow, previous = rollback."""
    state = state or {}

    def name(role: str) -> str | None:
        return (state.get(role) or {}).get("model_name")

    return registry.sync_aliases(name("production"), name("shadow"), name("previous"))


def _log_to_mlflow(run_id: str | None, evaluation: dict[str, Any]) -> None:
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=workspace.mlflow_uri())
    for name, stat in evaluation["ranking_metrics"].items():
        if stat.get("value") is not None:
            client.log_metric(run_id, "test_" + name.replace("@", "_at_"), stat["value"])
