"""``marketrank`` command line: thin Typer commands over the step functions; errors become one line + exit 1."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer
from botocore.exceptions import BotoCoreError, ClientError

from marketrank import ui, workspace
from pipelines.deploy import DeployError
from pipelines.gate import GateThresholds
from serving.errors import StoreUnavailable
from training.hparams import HParams

app = typer.Typer(help="marketrank: learning-to-rank for a second-hand fashion marketplace.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Simulated marketplace logs.", no_args_is_help=True)
features_app = typer.Typer(help="The Spark feature job.", no_args_is_help=True)
report_app = typer.Typer(help="Run reports.", no_args_is_help=True)
endpoint_app = typer.Typer(help="The model endpoint: champion, shadow challenger, promotion, rollback.",
                           no_args_is_help=True)
pipeline_app = typer.Typer(help="The SageMaker Pipeline: definition, upsert, start, status.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
shadow_app = typer.Typer(help="Shadow evaluation of the challenger against the champion.", no_args_is_help=True)
app.add_typer(shadow_app, name="shadow")
bench_app = typer.Typer(help="Benchmarks the project ships (numbers come only from runs).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(endpoint_app, name="endpoint")
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(report_app, name="report")

#: Exceptions that are the user's input, not a bug: shown as one line.
USER_ERRORS = (ValueError, KeyError, OSError, DeployError, BotoCoreError, ClientError, StoreUnavailable)


def _one_line_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            ui.error(str(message))
            raise typer.Exit(1) from None

    return wrapper


def _quiet_logs(verbose: bool, configure: bool = True) -> None:
    if not verbose:  # set before TensorFlow / MLflow are imported (they read these once)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # CUDA plugin noise on CPU-only machines
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not configure:  # the command installs its own handlers (the API logs JSON lines)
        return
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("py4j", "absl", "tensorflow", "alembic", "mlflow", "sagemaker", "botocore", "moto"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


Scorer = Annotated[str, typer.Option(help="dnn | din (document-interaction attention)")]
Loss = Annotated[str, typer.Option(help="softmax | approx_ndcg | pairwise_logistic")]
Ensemble = Annotated[int, typer.Option(min=1, help="members of a seed ensemble (1: one model); the export averages "
                                                  "them")]
DEFAULT = HParams()
GATE = GateThresholds()


def _hparams(scorer: str, loss: str, epochs: int, learning_rate: float, batch_size: int, ipw_eta: float | None,
             seed: int, ensemble: int = 1):
    from training.hparams import HParams

    return HParams(scorer=scorer, loss=loss, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                   ipw_eta=ipw_eta, seed=seed, ensemble=ensemble)


@app.command()
@_one_line_errors
def run(
    size: Annotated[str, typer.Option(help="simulated data size: tiny | small | default | large")] = "default",
    seed: Annotated[int, typer.Option(min=0, help="simulator seed")] = 7,
    dataset: Annotated[str | None, typer.Option(help="workspace dataset name (default <size>-seed<seed>)")] = None,
    scorer: Scorer = DEFAULT.scorer,
    loss: Loss = DEFAULT.loss,
    epochs: int = DEFAULT.epochs,
    learning_rate: float = DEFAULT.learning_rate,
    batch_size: int = DEFAULT.batch_size,
    ipw_eta: Annotated[float | None, typer.Option(help="position-bias exponent; default: estimated")] = None,
    train_seed: int = DEFAULT.seed,
    ensemble: Ensemble = DEFAULT.ensemble,
    shuffle_labels: Annotated[bool, typer.Option(help="sanity check: train on labels shuffled within lists")] = False,
    ndcg_floor: Annotated[float, typer.Option(
        help="gate: minimum NDCG@10 on the evaluation label (logged clicks: a lower scale, see README)")
    ] = GATE.ndcg_floor,
    min_lift: Annotated[float, typer.Option(help="gate: minimum 95% CI lower bound of the lift")] = GATE.min_lift,
    min_lift_over_logged: Annotated[float, typer.Option(
        help="gate: minimum 95% CI lower bound of the lift over the logged order")] = GATE.min_lift_over_logged,
    shadow_sampling: Annotated[float, typer.Option(min=0.01, max=100.0, help="% of requests copied to the shadow")
                               ] = 100.0,
    fresh: Annotated[bool, typer.Option(help="regenerate data and features")] = False,
    verbose: bool = False,
) -> None:
    """The local pipeline: data -> Spark features -> TF-Ranking -> evaluation vs champion -> gate -> registry
    -> shadow deployment on the local endpoint -> report."""
    _quiet_logs(verbose)
    from pipelines.local import LocalRunConfig, run_local

    hparams = dataclasses.replace(_hparams(scorer, loss, epochs, learning_rate, batch_size, ipw_eta, train_seed,
                                           ensemble), shuffle_labels=shuffle_labels)
    config = LocalRunConfig(size=size, seed=seed, dataset=dataset, fresh=fresh, hparams=hparams,
                            thresholds=GateThresholds(ndcg_floor=ndcg_floor, min_lift=min_lift,
                                                      min_lift_over_logged=min_lift_over_logged),
                            shadow_sampling_percentage=shadow_sampling)
    report = run_local(config)
    ui.print_run(report)


@data_app.command("generate")
@_one_line_errors
def data_generate(
    out: Annotated[str, typer.Option(help="local directory or s3:// URI")],
    size: str = "default",
    seed: Annotated[int, typer.Option(min=0, help="simulator seed")] = 7,
) -> None:
    """Simulate marketplace logs and write the five raw Parquet tables."""
    import tempfile

    from marketrank import simulator
    from training import storage

    config = simulator.preset(size, seed)
    with ui.step(f"simulate {config.requests:,} requests", total=config.requests) as s:
        tables = simulator.simulate(config, progress=lambda done, total: s.advance(done))
    if not storage.is_s3(out):
        simulator.write_tables(tables, Path(out), config)
    else:
        with tempfile.TemporaryDirectory(prefix="marketrank-data-") as staging:
            simulator.write_tables(tables, Path(staging), config)
            storage.stage_out(Path(staging), out)
    ui.console.print(json.dumps({name: len(frame) for name, frame in tables.items()}))


@features_app.command("build")
@_one_line_errors
def features_build(
    raw: Annotated[str, typer.Option(help="raw tables: local directory or s3:// URI")],
    out: Annotated[str, typer.Option(help="output: local directory or s3:// URI")],
    list_size: int = 64,
    verbose: bool = False,
) -> None:
    """Run the Spark feature job (local[*])."""
    _quiet_logs(verbose)
    from training.feature_job import FeatureJobConfig, run_feature_job

    with ui.step("Spark feature job") as s:
        stats = run_feature_job(raw, out, FeatureJobConfig(list_size=list_size),
                                progress=lambda msg: s.note(f"Spark feature job: {msg}"))
    ui.console.print(json.dumps(stats["splits"]))


@app.command()
@_one_line_errors
def train(
    output: Annotated[Path, typer.Option(help="output dir: model/ (TF Serving layout), training.json")],
    features: Annotated[Path | None, typer.Option(help="feature job output (train/, valid/)")] = None,
    letor: Annotated[Path | None, typer.Option(help="LETOR dir with train.txt, vali.txt, test.txt")] = None,
    scorer: Scorer = DEFAULT.scorer,
    loss: Loss = DEFAULT.loss,
    epochs: int = DEFAULT.epochs,
    learning_rate: float = DEFAULT.learning_rate,
    batch_size: int = DEFAULT.batch_size,
    ipw_eta: Annotated[float | None, typer.Option(help="position-bias exponent; default: estimated")] = None,
    seed: int = DEFAULT.seed,
    ensemble: Ensemble = DEFAULT.ensemble,
    verbose: bool = False,
) -> None:
    """Train on the feature job's output, or on a LETOR/SVMlight dataset (then also evaluates its test split)."""
    _quiet_logs(verbose)
    from training import train as training

    if (features is None) == (letor is None):
        raise ValueError("give exactly one of --features or --letor")
    if output.exists() and not output.is_dir():  # found now, not when the model is saved after training
        raise ValueError(f"--output {output} is a file, not a directory")
    hparams = _hparams(scorer, loss, epochs, learning_rate, batch_size, ipw_eta, seed, ensemble)
    with ui.step(f"train {scorer}/{loss}" + (f" x{ensemble}" if ensemble > 1 else ""), total=epochs * ensemble) as s:
        def on_epoch(epoch: int, logs: dict) -> None:
            s.advance(epoch, f"epoch {epoch}: val ndcg@10 {logs.get('val_ndcg_10', float('nan')):.4f}")

        if letor is not None:
            summary = training.train_letor(letor, output, hparams, tracking_uri=workspace.mlflow_uri(),
                                           progress=on_epoch, artifact_location=workspace.mlflow_artifacts())
            metrics = summary["evaluation"]["ranking_metrics"]
        else:
            from training.feature_spec import FeatureSpec

            result = training.train(features / "train", features / "valid", FeatureSpec.load(features / "train"),
                                    hparams, output / "model", output, tracking_uri=workspace.mlflow_uri(),
                                    progress=on_epoch, artifact_location=workspace.mlflow_artifacts())
            summary, metrics = {"export_dir": str(result.export_dir)}, None
    ui.console.print(f"exported {summary['export_dir']}")
    if metrics:
        ui.console.print(f"test ndcg@10 {metrics['ndcg@10']['value']:.4f} -> {output / 'evaluation.json'}")


@app.command()
@_one_line_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="exported model dir (base, model or version dir)")],
    test: Annotated[Path, typer.Option(help="test split directory")],
    output: Annotated[Path, typer.Option(help="where evaluation.json goes")],
    champion: Annotated[Path | None, typer.Option(help="champion model to compare against")] = None,
    propensity_eta: Annotated[float | None, typer.Option(
        min=0.0, help="position-bias exponent for NDCG on logged clicks (default: the feature spec's)")] = None,
    verbose: bool = False,
) -> None:
    """Evaluate a SavedModel on a test split (the processing step's entry point)."""
    _quiet_logs(verbose)
    from pipelines.local import summarize
    from training.evaluate import evaluate as run_evaluation

    with ui.step("evaluate"):
        result = run_evaluation(model, test, output, champion, propensity_eta=propensity_eta)
    ui.console.print(ui.quality_table({"eval_label": result["eval_label"], "lists": result["lists"],
                                       "eval_gain_weights": result.get("eval_gain_weights"), **summarize(result)}))


@report_app.command("show")
@_one_line_errors
def report_show(run_id: Annotated[str, typer.Argument(help="run id or 'latest'")] = workspace.LATEST) -> None:
    """Print a run's quality table, gate decision and deployment."""
    ui.print_run(workspace.read_report(run_id))


Target = Annotated[str, typer.Option(help="local (the workspace's endpoint) or sagemaker (boto3, AWS_* env)")]
LOCAL_ENDPOINT = "marketrank"
ActionEndpoint = Annotated[str | None, typer.Option(
    "--endpoint", help=f"endpoint name (default: {LOCAL_ENDPOINT} locally, the stage's on SageMaker)")]
Stage = Annotated[str | None, typer.Option(
    help="with --target sagemaker: the cdk.json stage whose deploy settings apply (default: cdk.json's)")]
EndpointName = Annotated[str, typer.Option("--endpoint", help="endpoint name")]
CaptureUri = Annotated[str | None, typer.Option(help="SageMaker data capture S3 URI for new endpoint configs")]


def _backend(target: str, endpoint: str | None, stage: str | None = None):
    from pipelines import deploy

    if target == "local":
        return deploy.LocalBackend(workspace.endpoints_dir(), endpoint or LOCAL_ENDPOINT)
    if target == "sagemaker":
        import boto3

        names = _stage_names(stage)
        return deploy.SageMakerBackend(boto3.client("sagemaker", region_name=names.stage.region),
                                       endpoint or names.endpoint)
    raise ValueError(f"unknown target {target!r}: use local or sagemaker")


def _stage_names(stage: str | None, endpoint: str | None = None):
    """``infra.names.Names`` of a cdk.json stage (default: cdk.json's); with ``endpoint``, it must be the stage's:
    the stage's deploy settings and SSM parameters belong to that endpoint alone."""
    from infra.config import stage_config
    from infra.names import Names, cdk_context

    names = Names(stage_config(cdk_context(), stage))
    if endpoint is not None and endpoint != names.endpoint:
        raise ValueError(f"endpoint {endpoint!r} is not stage {names.stage.name!r}'s ({names.endpoint}): name its "
                         "stage with --stage (the stage's parameters and capture belong to its own endpoint)")
    return names


def _endpoint_action(action: str, target: str, endpoint: str | None, data_capture_uri: str | None,
                     stage: str | None = None) -> None:
    """On SageMaker: the deploy Lambda's handler with the Lambda's environment for the stage
    (``Names.deploy_environment``), so a change made here creates the same endpoint configs (data capture, the
    stage's KMS key) and moves the same SSM parameters (the champion `cdk deploy` redeploys, the rollback
    target) as the Lambda's."""
    from pipelines import deploy

    if target == "sagemaker":
        import boto3

        from pipelines import deploy_lambda

        names = _stage_names(stage, endpoint)
        env = names.deploy_environment()
        if data_capture_uri:
            env["DATA_CAPTURE_URI"] = data_capture_uri
        region = names.stage.region
        result = deploy_lambda.run({"action": action, "endpoint_name": names.endpoint},
                                   boto3.client("sagemaker", region_name=region),
                                   boto3.client("s3", region_name=region), boto3.client("ssm", region_name=region),
                                   env)
        result["state"] = json.loads(result["state"])
    else:
        backend = _backend(target, endpoint)
        result = {"promote": deploy.promote, "rollback": deploy.rollback, "reject": deploy.reject}[action](backend)
        from pipelines.local import sync_aliases
        from pipelines.registry import LocalRegistry

        if result["action"] != "noop":
            from mlflow.exceptions import MlflowException

            try:
                result["aliases"] = sync_aliases(LocalRegistry(workspace.mlflow_uri(), workspace.models_dir()),
                                                 result["state"])
            except MlflowException as err:  # models deployed by hand, not through the registry
                result["aliases"] = f"registry aliases not updated: {err}"
    ui.console.print(json.dumps(result, indent=2))


@endpoint_app.command("describe")
@_one_line_errors
def endpoint_describe(target: Target = "local", endpoint: ActionEndpoint = None, stage: Stage = None) -> None:
    """Show the endpoint's production (champion) and shadow (challenger) variants."""
    from pipelines import deploy

    ui.console.print(json.dumps(deploy.describe(_backend(target, endpoint, stage)), indent=2))


@endpoint_app.command("promote")
@_one_line_errors
def endpoint_promote(target: Target = "local", endpoint: ActionEndpoint = None, stage: Stage = None,
                     data_capture_uri: CaptureUri = None,
                     force: Annotated[bool, typer.Option(help="promote even if the shadow report disagrees")] = False,
                     report: Annotated[str | None, typer.Option(
                         help="the shadow report to act on: latest.json path or s3:// URI (default: the "
                              "workspace's shadow/<endpoint>/latest.json; on SageMaker the stage's, "
                              "s3://<capture bucket>/shadow-reports/<endpoint>/latest.json)")] = None,
                     ) -> None:
    """Make the shadow challenger the production champion (the old champion is kept for rollback).

    Acts on the latest `marketrank shadow report` for the endpoint: refused unless it recommends promote."""
    from serving.shadow_report import REPORT_FILE, load_report

    if target == "sagemaker":
        names = _stage_names(stage, endpoint)
        endpoint, report_path = names.endpoint, report or names.shadow_report_uri
    else:
        endpoint = endpoint or LOCAL_ENDPOINT
        report_path = report or str(workspace.shadow_dir() / endpoint / REPORT_FILE)
    if not force:
        try:
            shadow = load_report(report_path)
        except FileNotFoundError as err:
            raise ValueError(f"no shadow report for endpoint {endpoint!r} ({report_path}): run "
                             "`marketrank shadow report` first, or pass --force") from err
        if "recommendation" not in shadow:
            raise ValueError(f"{report_path} is not a shadow report: it has no 'recommendation'")
        if shadow["recommendation"] != "promote":
            raise ValueError(f"the shadow report ({report_path}) recommends {shadow['recommendation']}: "
                             f"{'; '.join(map(str, shadow.get('reasons') or []))} (use --force to override)")
    _endpoint_action("promote", target, endpoint, data_capture_uri, stage)


@endpoint_app.command("reject")
@_one_line_errors
def endpoint_reject(target: Target = "local", endpoint: ActionEndpoint = None, stage: Stage = None,
                    data_capture_uri: CaptureUri = None) -> None:
    """Drop the shadow challenger; the live champion stays (what a shadow report's rollback means)."""
    _endpoint_action("reject", target, endpoint, data_capture_uri, stage)


@endpoint_app.command("rollback")
@_one_line_errors
def endpoint_rollback(target: Target = "local", endpoint: ActionEndpoint = None, stage: Stage = None,
                      data_capture_uri: CaptureUri = None) -> None:
    """Back to the previous champion (or stop shadowing when nothing was promoted yet)."""
    _endpoint_action("rollback", target, endpoint, data_capture_uri, stage)


def _pipeline_config(name: str | None, region: str | None, bucket: str | None, role_arn: str | None):
    """Defaults, then the MARKETRANK_* environment (what CI sets from the CDK outputs), then the options."""
    from pipelines.definition import PipelineConfig

    return PipelineConfig.from_env(name=name, region=region, bucket=bucket, role_arn=role_arn)


PipelineName = Annotated[str | None, typer.Option("--name", help="pipeline name (default marketrank)")]
Region = Annotated[str | None, typer.Option(help="AWS region (default eu-west-1)")]
Bucket = Annotated[str | None, typer.Option(help="artifact bucket")]
RoleArn = Annotated[str | None, typer.Option(help="SageMaker execution role ARN")]


def _pipeline_errors(command):
    """AWS failures of pipeline commands become one line naming the resource (PipelineError)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from pipelines.definition import PipelineError

        try:
            return command(*args, **kwargs)
        except PipelineError as err:
            ui.error(str(err))
            raise typer.Exit(1) from None

    return wrapper


@pipeline_app.command("definition")
@_one_line_errors
@_pipeline_errors
def pipeline_definition(name: PipelineName = None, region: Region = None, bucket: Bucket = None,
                        role_arn: RoleArn = None) -> None:
    """Print the pipeline definition JSON (offline: no AWS credentials needed)."""
    _quiet_logs(False)
    from pipelines.definition import definition_json

    typer.echo(definition_json(_pipeline_config(name, region, bucket, role_arn)))


@pipeline_app.command("upsert")
@_one_line_errors
@_pipeline_errors
def pipeline_upsert(name: PipelineName = None, region: Region = None, bucket: Bucket = None,
                    role_arn: RoleArn = None) -> None:
    """Create or update the pipeline in SageMaker."""
    _quiet_logs(False)
    from pipelines.definition import upsert

    ui.console.print(upsert(_pipeline_config(name, region, bucket, role_arn)))


@pipeline_app.command("start")
@_one_line_errors
@_pipeline_errors
def pipeline_start(
    param: Annotated[list[str] | None, typer.Option("--param", help="KEY=VALUE pipeline parameter override")] = None,
    name: PipelineName = None, region: Region = None, bucket: Bucket = None, role_arn: RoleArn = None,
) -> None:
    """Start an execution, optionally overriding parameters (--param Epochs=20 --param NdcgFloor=0.4)."""
    _quiet_logs(False)
    from pipelines.definition import start

    overrides = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        overrides[key] = value
    ui.console.print(start(_pipeline_config(name, region, bucket, role_arn), overrides))


@pipeline_app.command("status")
@_one_line_errors
@_pipeline_errors
def pipeline_status(
    execution: Annotated[str | None, typer.Argument(help="execution ARN (default: the latest)")] = None,
    name: PipelineName = None, region: Region = None,
) -> None:
    """Status of an execution and its steps."""
    _quiet_logs(False)
    from pipelines.definition import status

    ui.console.print(json.dumps(status(_pipeline_config(name, region, None, None), execution), indent=2,
                                default=str))


@shadow_app.command("report")
@_one_line_errors
def shadow_report(
    capture: Annotated[str | None, typer.Option(help="data capture root: local dir or s3:// prefix "
                                                     "(default: the local endpoint's; on SageMaker the stage's)")
                       ] = None,
    endpoint: ActionEndpoint = None,
    target: Annotated[str | None, typer.Option(
        help="where the endpoint runs, for its shadow share and start time: local or sagemaker (default: "
             "sagemaker for an s3:// capture, else local)")] = None,
    stage: Stage = None,
    since: Annotated[str | None, typer.Option(
        help="read records from this UTC time on (ISO 8601), or 'all' (default: when the endpoint's live "
             "variants were configured: older records belong to earlier challengers)")] = None,
    k: Annotated[int, typer.Option(min=1, help="top-k for the overlap")] = 10,
    min_pairs: Annotated[int, typer.Option(min=1, help="paired requests needed before recommending promote")] = 200,
    shadow_sampling: Annotated[float | None, typer.Option(
        min=0.01, max=100.0, help="% of requests copied to the shadow (default: the endpoint's shadow weight "
                                  "relative to its production weight)")] = None,
    out: Annotated[str | None, typer.Option(help="directory or s3:// prefix for latest.json and shadow.png "
                                                 "(default: the workspace's shadow/<endpoint>; on SageMaker, for "
                                                 "the stage's endpoint, where the API and promote read it)")
                   ] = None,
) -> None:
    """Compare champion and challenger responses from data capture; recommend promote / keep-watching / rollback."""
    from serving import shadow_report as shadow

    target = target or ("sagemaker" if (capture or "").startswith("s3://") else "local")
    region = None
    if target == "sagemaker":
        names = _stage_names(stage)
        endpoint, region = endpoint or names.endpoint, names.stage.region
        root = capture or names.data_capture_uri
        if out is None and endpoint == names.endpoint:  # published: the API's gauges and promote read it there
            out = names.shadow_report_uri.rsplit("/", 1)[0]
    else:
        endpoint, root = endpoint or LOCAL_ENDPOINT, capture or str(workspace.capture_dir())
    backend = _backend(target, endpoint, stage)
    start = _since(since, backend) if since != "all" else None
    production = shadow.read_capture(root, endpoint, shadow.PRODUCTION, start)
    challenger = shadow.read_capture(root, endpoint, shadow.SHADOW, start)
    window = f" since {start.isoformat(timespec='seconds')}" if start else ""
    if not production:
        raise FileNotFoundError(f"no capture records for endpoint {endpoint!r} under {root}{window}")
    thresholds = dataclasses.replace(shadow.ShadowThresholds(), min_pairs=min_pairs)
    if shadow_sampling is None:
        state = backend.current()
        if state is None or state.shadow is None:
            raise ValueError(f"endpoint {endpoint!r} ({target}) has no shadow variant now, so its shadow share is "
                             "unknown: pass --shadow-sampling")
        share = shadow.shadow_share(state)
    else:
        share = shadow_sampling / 100
    analysis = shadow.analyse(production, challenger, k)
    cloudwatch = None
    if target == "sagemaker" and not any(analysis.latency.values()):  # SageMaker's records carry no latency
        # from the challenger's first record: until the update that added it finished, the variant names served
        # the previous config's models (a rolled-back challenger's latency must not count)
        first = min(filter(None, map(shadow.event_time, challenger)), default=None) or start or min(
            filter(None, map(shadow.event_time, production)), default=None)
        if first is not None:
            import boto3

            try:
                until = datetime.now(timezone.utc) + timedelta(minutes=1)  # the current minute's points too
                cloudwatch = shadow.cloudwatch_latency(boto3.client("cloudwatch", region_name=region), endpoint,
                                                        first, until)
            except (BotoCoreError, ClientError) as err:
                logging.getLogger("marketrank").warning("no ModelLatency from CloudWatch: %s", err)
    report = shadow.build_report(production, challenger, k, thresholds, share, analysis, cloudwatch)
    report["since"] = start.isoformat() if start else None
    saved = shadow.save_report(report, analysis, out or workspace.shadow_dir() / endpoint)
    agreement, latency = report["agreement"], report["latency_ms"]

    def value(number: float | None, digits: int = 3) -> str:
        return "n/a" if number is None else f"{number:.{digits}f}"

    ui.console.print(f"{report['pairs']} paired requests{window} ({report['skipped_pairs']} skipped, "
                     f"{report['missing_shadow_share']:.0%} of the {share:.0%} copied missing); top-{k} overlap "
                     f"{value(agreement['overlap']['mean'])}, Spearman {value(agreement['spearman']['mean'])}, "
                     f"drift {value(agreement['drift']['mean'])}; latency ({report['latency_source']}) p95 / mean "
                     f"champion {value(latency['champion']['p95'], 1)} / {value(latency['champion']['mean'], 1)} ms, "
                     f"challenger {value(latency['challenger']['p95'], 1)} / "
                     f"{value(latency['challenger']['mean'], 1)} ms")
    ui.console.print(f"recommendation: [bold]{report['recommendation']}[/bold] ({'; '.join(report['reasons'])})")
    ui.console.print(f"report {saved}, chart {saved.rsplit('/', 1)[0]}/{shadow.CHART_FILE}")


def _since(text: str | None, backend) -> datetime | None:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise), else when the endpoint's variants went live."""
    if text is None:
        start = backend.live_since()
        if start is None:
            raise ValueError(f"endpoint {backend.endpoint_name!r} does not exist, so the start of its records is "
                             "unknown: pass --since TIME or --since all")
        return start
    try:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise ValueError(f"--since {text!r} is not an ISO 8601 time (e.g. 2026-11-25T14:00:00Z) or 'all'") from err
    return start if start.tzinfo else start.replace(tzinfo=timezone.utc)


Store = Annotated[str, typer.Option(help="feature store: embedded (a file in the workspace) or redis://host:port/0")]


@features_app.command("materialize")
@_one_line_errors
def features_materialize(
    features: Annotated[Path | None, typer.Option(help="feature job output (default: the latest run's)")] = None,
    model: Annotated[Path | None, typer.Option(help="model whose spec the API uses (default: the champion)")] = None,
    store: Store = "embedded",
    endpoint: EndpointName = "marketrank",
) -> None:
    """Load the feature job's online state (items, users) and the model's feature spec into the feature store."""
    _quiet_logs(False)
    from pipelines.local import materialize_features, production_model_dir

    features = features or Path(workspace.read_report()["dataset"]["features"])
    model = model or production_model_dir(endpoint)
    if model is None:
        raise ValueError(f"endpoint {endpoint!r} has no production model: run `marketrank run` or pass --model")
    with ui.step("materialize online features"):
        counts = materialize_features(features, model, store)
    ui.console.print(json.dumps({"store": store, **counts, "spec_from": str(model)}))


def _check_free(option: str, host: str, port: int) -> None:
    """ValueError naming ``option`` when ``host:port`` cannot be bound (in use, or not an address here)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as err:  # socket.gaierror included: a host that is no address here
        raise ValueError(f"{option} {port}: cannot listen on {host}:{port} ({err.strerror or err})") from None


@app.command()
@_one_line_errors
def serve(
    host: Annotated[str, typer.Option(help="API address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="API port")] = 8080,
    endpoint_port: Annotated[int, typer.Option(min=1, max=65535, help="local model endpoint port (TF Serving REST)")
                             ] = 8501,
    endpoint: EndpointName = "marketrank",
    store: Store = "embedded",
    budget_ms: Annotated[float, typer.Option(help="per-request time budget")] = 150.0,
    model_server: Annotated[str, typer.Option(
        help="local endpoint in its own 'process' (as production runs TF Serving) or a 'thread' of this one")] = (
        "process"),
) -> None:
    """Serve on this machine: the local endpoint (champion + shadow challenger, data capture) and the ranking API.

    Then: curl -X POST localhost:8080/v1/rank -d '{"user_id": "u000001", "surface": "feed", "candidates": [...]}'
    """
    _quiet_logs(False, configure=False)
    from serving import app as api
    from serving import servers
    from serving.feature_store import DEFAULT_STORE_FILE, open_store
    from serving.shadow_report import REPORT_FILE

    if model_server not in ("process", "thread"):
        raise ValueError(f"--model-server: expected 'process' or 'thread', got {model_server!r}")
    manifest = workspace.endpoints_dir() / f"{endpoint}.json"
    if not manifest.exists():
        raise FileNotFoundError(f"no local endpoint {endpoint!r} ({manifest}): run `marketrank run` first")
    if budget_ms <= 0:
        raise ValueError(f"--budget-ms must be > 0, got {budget_ms}")
    if port == endpoint_port:
        raise ValueError(f"--port and --endpoint-port are both {port}: the API and the endpoint need one each")
    for option, address, number in (("--endpoint-port", "127.0.0.1", endpoint_port), ("--port", host, port)):
        _check_free(option, address, number)  # now, not after the model has loaded
    store_path = workspace.home() / DEFAULT_STORE_FILE
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops as Ctrl-C does, during start-up too
    try:
        probe = open_store(store, store_path)
        try:
            empty = probe.get_spec() is None
        finally:
            probe.close()
        if empty:  # in a process of its own: reading the model's spec loads TensorFlow, which the API goes without
            done = subprocess.run([sys.executable, "-m", "marketrank.cli", "features", "materialize", "--store",
                                   store, "--endpoint", endpoint])
            if done.returncode:
                raise RuntimeError(f"materializing the feature store {store!r} failed (exit {done.returncode}; "
                                   "see above)")
        with contextlib.ExitStack() as stack:
            if model_server == "process":  # its own GIL and TensorFlow pools: p99 20.2 ms against 26.5 in a thread
                model_url, pid = stack.enter_context(servers.running_process(
                    workspace.models_dir(), manifest, workspace.capture_dir(), port=endpoint_port, log_level="info"))
                where = f"process {pid}"
            else:
                from serving import local_endpoint  # TensorFlow in this process

                model_app = local_endpoint.create_app(workspace.models_dir(), manifest, workspace.capture_dir())
                model_url = stack.enter_context(servers.running(model_app, port=endpoint_port))
                where = "this process"
            ui.console.print(f"local endpoint {endpoint} on {model_url} ({where}; capture: "
                             f"{workspace.capture_dir()})")
            settings = api.Settings(feature_store=store, store_path=str(store_path), model_url=model_url,
                                    model_name=endpoint, budget_ms=budget_ms,
                                    shadow_report=str(workspace.shadow_dir() / endpoint / REPORT_FILE))
            api.configure_logging(settings.log_level)
            # The API in a thread, this one waiting: Ctrl-C or SIGTERM then stops the servers in order, without
            # the traceback uvicorn prints when it re-raises the signal into a main-thread server's lifespan.
            api_url = stack.enter_context(servers.running(api.create_app(settings), host=host, port=port))
            ui.console.print(f"ranking API on {api_url}/v1/rank  (/healthz /readyz /metrics); Ctrl-C stops both")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    ui.console.print("stopped")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


Results = Annotated[Path | None, typer.Option("--out", help="results dir: JSON + PNG (default benchmarks/results)")]
Cache = Annotated[Path | None, typer.Option(help="data cache: <cache>/<size>-seed<seed> (default: the workspace's)")]
Models = Annotated[str, typer.Option(help="TF-Ranking models: 'all' or scorer/loss\\[/members],... (e.g. "
                                          "dnn/softmax,dnn/softmax/3: the last a seed ensemble of 3)")]


def _results(out: Path | None) -> Path:
    from benchmarks.common import RESULTS_DIR

    return out or RESULTS_DIR


@bench_app.command("serve")
@_one_line_errors
def bench_serve(
    candidates: Annotated[str, typer.Option(help="comma-separated candidate counts per request")] = "50,300,1000",
    rate: Annotated[float, typer.Option(help="offered load, requests per second")] = 100.0,
    seconds: Annotated[float, typer.Option(help="measured seconds per candidate count")] = 60.0,
    model_server: Annotated[str, typer.Option(
        help="local endpoint in a 'process' of its own (as `serve` and production run it) or a 'thread' of the "
             "benchmark's")] = "process",
    endpoint_alone: Annotated[bool, typer.Option(
        help="after each load, send the same arrivals straight to the model endpoint (the API's lower bound)")] = True,
    transport_floor: Annotated[bool, typer.Option(
        help="then through an API and an endpoint that do no ranking work (what the stacks and machine cost)")
    ] = True,
    out: Results = None,
    endpoint: EndpointName = "marketrank",
) -> None:
    """Load-test the ranking API on loopback (after `make run`): p50/p95/p99, throughput, errors, raw-model floor."""
    _quiet_logs(False)
    from serving import bench

    try:
        counts = [int(c) for c in candidates.split(",")]
    except ValueError:
        raise ValueError(f"--candidates: expected comma-separated whole numbers, got {candidates!r}") from None
    out = _results(out)
    with ui.step("serving benchmark") as s:
        report = bench.run_serving_benchmark(workspace.home(), candidates=counts,
                                             rate=rate, seconds=seconds, endpoint=endpoint, out=out,
                                             model_server=model_server, endpoint_alone=endpoint_alone,
                                             transport_floor=transport_floor,
                                             progress=s.note)
    ui.console.print(bench.format_table(report))
    ui.console.print(f"results {out / 'serving.json'}, plot {out / 'serving_latency.png'}")



def _bench_quality(size: str, letor: Path | None, models: str, epochs: int, seed: int, cache: Path | None,
                   out: Path | None, trained_out: dict | None = None) -> None:
    from benchmarks import suite

    chosen = suite.parse_models(models)  # a typo fails now, not after the data are built
    dataset = suite.load_dataset(size, seed, cache, letor)
    path, result = suite.run_quality(dataset, _results(out), models=chosen,
                                     hparams=suite.with_epochs(DEFAULT, epochs), trained_out=trained_out)
    ui.console.print("\n".join(suite.summary_lines(result)) + f"\nresults {path}")


def _bench_unbiased(size: str, epochs: int, seed: int, cache: Path | None, out: Path | None,
                    reuse: dict | None = None) -> None:
    from benchmarks import suite

    path, result = suite.run_unbiased(suite.load_dataset(size, seed, cache), _results(out),
                                      hparams=suite.with_epochs(DEFAULT, epochs), reuse=reuse)
    ui.console.print("\n".join(suite.summary_lines(result)) + f"\nresults {path}")


def _bench_train(sizes: str, seed: int, cache: Path | None, out: Path | None) -> None:
    from benchmarks import suite

    path, result = suite.run_throughput([s.strip() for s in sizes.split(",")], _results(out), seed=seed,
                                        cache=cache)
    ui.console.print("\n".join(suite.summary_lines(result)) + f"\nresults {path}")


def _bench_report(results: Path | None, report: Path | None) -> None:
    from benchmarks import report as rendering

    with ui.step("render BENCHMARKS.md and plots"):
        path = rendering.write_report(_results(results), report or rendering.REPORT)
    ui.console.print(f"report {path}")


@bench_app.command("quality")
@_one_line_errors
def bench_quality(
    size: Annotated[str, typer.Option(help="simulated data size: tiny | small | default | large")] = "default",
    letor: Annotated[Path | None, typer.Option(help="LETOR dir (train.txt, vali.txt, test.txt) instead")] = None,
    models: Models = "all", epochs: int = DEFAULT.epochs, seed: int = 7, cache: Cache = None, out: Results = None,
    verbose: bool = False,
) -> None:
    """Legacy policy, LightGBM LambdaMART, TF-Ranking models and the oracle on the same splits and features."""
    _quiet_logs(verbose)
    _bench_quality(size, letor, models, epochs, seed, cache, out)


@bench_app.command("unbiased")
@_one_line_errors
def bench_unbiased(size: str = "default", epochs: int = DEFAULT.epochs, seed: int = 7, cache: Cache = None,
                   out: Results = None, verbose: bool = False) -> None:
    """Naive versus inverse-propensity-weighted training on position-biased clicks, scored on true relevance."""
    _quiet_logs(verbose)
    _bench_unbiased(size, epochs, seed, cache, out)


@bench_app.command("train")
@_one_line_errors
def bench_train(
    sizes: Annotated[str, typer.Option(help="comma-separated data sizes")] = "tiny,small,default",
    seed: int = 7, cache: Cache = None, out: Results = None, verbose: bool = False,
) -> None:
    """Training throughput on CPU: lists/s, time-to-quality, input-pipeline share, scaling with data size."""
    _quiet_logs(verbose)
    _bench_train(sizes, seed, cache, out)


@bench_app.command("report")
@_one_line_errors
def bench_report(
    results: Annotated[Path | None, typer.Option(help="results dir (default benchmarks/results)")] = None,
    report: Annotated[Path | None, typer.Option(help="Markdown file (default BENCHMARKS.md)")] = None,
) -> None:
    """Regenerate BENCHMARKS.md and the plots from the JSON results only."""
    _bench_report(results, report)


@bench_app.command("all")
@_one_line_errors
def bench_all(
    size: Annotated[str, typer.Option(help="data size of the quality and unbiased benchmarks")] = "default",
    sizes: Annotated[str, typer.Option(help="data sizes of the throughput benchmark")] = "tiny,small,default",
    letor: Annotated[Path | None, typer.Option(help="also benchmark quality on this LETOR dir")] = None,
    serve: Annotated[bool, typer.Option(help="run the serving benchmark (needs the local run: made if absent)")] = True,
    candidates: str = "50,300,1000", rate: float = 100.0, seconds: float = 60.0,
    seed: int = 7, cache: Cache = None, out: Results = None, verbose: bool = False,
) -> None:
    """Every benchmark (quality, unbiased, train, serve), then BENCHMARKS.md and the plots."""
    _quiet_logs(verbose)
    trained: dict = {}
    _bench_quality(size, None, "all", DEFAULT.epochs, seed, cache, out, trained_out=trained)
    if letor is not None:
        _bench_quality(size, letor, "all", DEFAULT.epochs, seed, cache, out)
    _bench_unbiased(size, DEFAULT.epochs, seed, cache, out, reuse=trained)
    trained.clear()  # frees the SavedModels before the timed runs
    _bench_train(sizes, seed, cache, out)
    if serve:
        if not (workspace.endpoints_dir() / "marketrank.json").exists():
            from pipelines.local import LocalRunConfig, run_local

            ui.print_run(run_local(LocalRunConfig(size=size, seed=seed)))
        bench_serve(candidates=candidates, rate=rate, seconds=seconds, model_server="process",
                    out=_results(out), endpoint="marketrank")
    _bench_report(out, out / "BENCHMARKS.md" if out is not None else None)  # --out elsewhere: leave the repo's


if __name__ == "__main__":
    app()
