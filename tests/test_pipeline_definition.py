"""The SageMaker pipeline definition (pipelines.definition), rendered offline, and upsert/start/status on moto.

The definition tests read the parsed JSON that ``definition_json`` returns: steps and their types, how steps
consume each other's properties, the quality gate's JsonGet paths (from ``pipelines.gate.CHECKS``), parameters
and their defaults (from ``HParams()`` and ``GateThresholds()``), images, and the code staged for each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import tarfile
import zipfile
from typing import Any

import boto3
import pytest
from moto import mock_aws

from pipelines import gate
from pipelines.definition import (
    TRAINING_DIR,
    PipelineConfig,
    PipelineError,
    definition_json,
    parameter_defaults,
    start,
    status,
    upsert,
)
from training import report
from training.hparams import HParams

CONFIG = PipelineConfig()
FEATURES = {"Get": "Steps.PrepareFeatures.ProcessingOutputConfig.Outputs['features'].S3Output.S3Uri"}
MODEL_ARTIFACTS = {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
REPORT = {"Get": "Steps.Evaluate.PropertyFiles.EvaluationReport"}


def param(name: str) -> dict[str, str]:
    return {"Get": f"Parameters.{name}"}


def json_get(path: str) -> dict[str, Any]:
    return {"Std:JsonGet": {"PropertyFile": REPORT, "Path": path}}


def join(*values: Any, on: str = "/") -> dict[str, Any]:
    return {"Std:Join": {"On": on, "Values": list(values)}}


@pytest.fixture(scope="module")
def rendered() -> str:
    return definition_json(CONFIG)


@pytest.fixture(scope="module")
def definition(rendered) -> dict[str, Any]:
    return json.loads(rendered)


@pytest.fixture(scope="module")
def steps(definition) -> dict[str, dict[str, Any]]:
    """Every step by name, the condition's branches included (each tagged with where it sits)."""
    found = {}
    for step in definition["Steps"]:
        found[step["Name"]] = {**step, "_branch": "top"}
        for branch, key in (("if", "IfSteps"), ("else", "ElseSteps")):
            for inner in step.get("Arguments", {}).get(key, []):
                found[inner["Name"]] = {**inner, "_branch": f"{step['Name']}:{branch}"}
    return found


def inputs(step: dict[str, Any]) -> dict[str, Any]:
    return {i["InputName"]: i["S3Input"] for i in step["Arguments"]["ProcessingInputs"]}


def references(node: Any) -> set[str]:
    """Every ``Get`` expression inside a step's arguments."""
    if isinstance(node, dict):
        found = {node["Get"]} if isinstance(node.get("Get"), str) else set()
        return found.union(*(references(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(references(v) for v in node))
    return set()


def upstream_steps(step: dict[str, Any]) -> set[str]:
    return {ref.split(".")[1] for ref in references(step["Arguments"]) if ref.startswith("Steps.")}


# ============================================================================================ steps

def test_steps_types_and_branches(definition, steps):
    assert [(s["Name"], s["Type"]) for s in definition["Steps"]] == [
        ("PrepareFeatures", "Processing"), ("Train", "Training"), ("Evaluate", "Processing"),
        ("QualityGate", "Condition")]
    gate_args = steps["QualityGate"]["Arguments"]
    assert [(s["Name"], s["Type"]) for s in gate_args["IfSteps"]] == [("RegisterModel", "RegisterModel"),
                                                                      ("DeployShadow", "Lambda")]
    assert [(s["Name"], s["Type"]) for s in gate_args["ElseSteps"]] == [("QualityGateFailed", "Fail")]
    assert {n: s["_branch"] for n, s in steps.items() if s["_branch"] != "top"} == {
        "RegisterModel": "QualityGate:if", "DeployShadow": "QualityGate:if", "QualityGateFailed": "QualityGate:else"}


def test_each_step_consumes_the_previous_steps_outputs(steps):
    assert upstream_steps(steps["PrepareFeatures"]) == set()
    assert upstream_steps(steps["Train"]) == {"PrepareFeatures"}
    assert upstream_steps(steps["Evaluate"]) == {"PrepareFeatures", "Train"}
    assert upstream_steps(steps["RegisterModel"]) == {"Train", "Evaluate"}
    assert upstream_steps(steps["DeployShadow"]) == {"RegisterModel"}

    prepare = steps["PrepareFeatures"]["Arguments"]
    assert inputs(steps["PrepareFeatures"])["raw"]["S3Uri"] == param("InputDataUri")
    [features] = prepare["ProcessingOutputConfig"]["Outputs"]
    assert features["OutputName"] == "features"
    assert features["S3Output"]["LocalPath"] == "/opt/ml/processing/output/features"
    assert prepare["AppSpecification"]["ContainerArguments"] == [
        "--input", "/opt/ml/processing/input/raw", "--output", "/opt/ml/processing/output/features"]

    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in steps["Train"]["Arguments"]["InputDataConfig"]}
    assert channels["train"] == join(FEATURES, "train")
    assert channels["validation"] == join(FEATURES, "valid")

    evaluate = inputs(steps["Evaluate"])
    assert evaluate["model"]["S3Uri"] == MODEL_ARTIFACTS
    assert evaluate["model"]["LocalPath"] == "/opt/ml/processing/model"
    assert evaluate["test"]["S3Uri"] == join(FEATURES, "test")
    assert evaluate["test"]["LocalPath"] == "/opt/ml/processing/test"
    assert evaluate["champion"]["S3Uri"] == param("ChampionModelUri")
    assert evaluate["champion"]["LocalPath"] == "/opt/ml/processing/champion"
    assert steps["Evaluate"]["Arguments"]["AppSpecification"]["ContainerArguments"] == [
        "--model", "/opt/ml/processing/model", "--test", "/opt/ml/processing/test",
        "--champion", "/opt/ml/processing/champion", "--output", "/opt/ml/processing/evaluation"]
    [evaluation] = steps["Evaluate"]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    assert (evaluation["OutputName"], evaluation["S3Output"]["LocalPath"]) == ("evaluation",
                                                                                "/opt/ml/processing/evaluation")
    assert steps["Evaluate"]["PropertyFiles"] == [{"PropertyFileName": "EvaluationReport", "OutputName": "evaluation",
                                                   "FilePath": report.EVALUATION_FILE}]


def test_register_model_and_deploy_shadow(steps):
    register = steps["RegisterModel"]["Arguments"]
    assert register["ModelPackageGroupName"] == CONFIG.model_package_group
    assert register["ModelApprovalStatus"] == param("ModelApprovalStatus")
    [container] = register["InferenceSpecification"]["Containers"]
    assert container["ModelDataUrl"] == MODEL_ARTIFACTS
    statistics = register["ModelMetrics"]["ModelQuality"]["Statistics"]
    evaluation_uri = {"Get": "Steps.Evaluate.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"}
    assert statistics == {"ContentType": "application/json", "S3Uri": join(evaluation_uri, report.EVALUATION_FILE)}
    spec = register["InferenceSpecification"]
    assert spec["SupportedRealtimeInferenceInstanceTypes"][0] == CONFIG.endpoint_instance_type  # what it runs on

    deploy = steps["DeployShadow"]
    assert deploy["FunctionArn"] == CONFIG.deploy_lambda_arn
    assert deploy["Arguments"] == {"action": "deploy_shadow",
                                   "model_package_arn": {"Get": "Steps.RegisterModel.ModelPackageArn"},
                                   "endpoint_name": CONFIG.endpoint_name,
                                   "shadow_sampling_percentage": param("ShadowSamplingPercentage")}
    assert deploy["OutputParameters"] == [{"OutputName": "action", "OutputType": "String"},
                                          {"OutputName": "endpoint_config_name", "OutputType": "String"}]


# ============================================================================================ quality gate

def test_gate_conditions_are_the_gate_checks(steps):
    conditions = steps["QualityGate"]["Arguments"]["Conditions"]
    assert [c["Type"] for c in conditions] == ["GreaterThanOrEqualTo"] * len(gate.CHECKS)
    assert [c["LeftValue"] for c in conditions] == [json_get(check.path) for check in gate.CHECKS]
    assert [c["LeftValue"]["Std:JsonGet"]["Path"] for c in conditions] == [c.path for c in gate.CHECKS]
    thresholds = {"ndcg_floor": "NdcgFloor", "min_lift": "MinLift", "min_lift_over_logged": "MinLiftOverLogged"}
    assert [c["RightValue"] for c in conditions] == [param(thresholds[c.threshold]) for c in gate.CHECKS]
    assert {c.threshold for c in gate.CHECKS} == set(thresholds)


def test_fail_message_names_every_metric_value_and_threshold(steps):
    message = steps["QualityGateFailed"]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    text = "".join(v for v in message if isinstance(v, str))
    thresholds = {"ndcg_floor": "NdcgFloor", "min_lift": "MinLift", "min_lift_over_logged": "MinLiftOverLogged"}
    for check in gate.CHECKS:
        assert check.metric in text
        at = message.index(json_get(check.path))
        assert message.index(param(thresholds[check.threshold])) > at
        assert check.metric in message[at - 1]


# ============================================================================================ parameters

def test_parameters_and_defaults(definition):
    declared = {p["Name"]: (p["Type"], p["DefaultValue"]) for p in definition["Parameters"]}
    hparams, thresholds = HParams(), gate.GateThresholds()
    assert declared == {
        "InputDataUri": ("String", f"s3://{CONFIG.bucket}/{CONFIG.prefix}/raw"),
        "ProcessingInstanceType": ("String", "ml.m5.xlarge"),
        "TrainingInstanceType": ("String", "ml.m5.xlarge"),
        "Scorer": ("String", hparams.scorer),
        "Loss": ("String", hparams.loss),
        "Epochs": ("Integer", hparams.epochs),
        "LearningRate": ("Float", hparams.learning_rate),
        "BatchSize": ("Integer", hparams.batch_size),
        "IpwEta": ("String", "auto" if hparams.ipw_eta is None else str(hparams.ipw_eta)),
        "Ensemble": ("Integer", hparams.ensemble),
        "NdcgFloor": ("Float", thresholds.ndcg_floor),
        "MinLift": ("Float", thresholds.min_lift),
        "MinLiftOverLogged": ("Float", thresholds.min_lift_over_logged),
        "ModelApprovalStatus": ("String", "Approved"),
        "MlflowTrackingServerArn": ("String", ""),
        "ShadowSamplingPercentage": ("Float", 20.0),
        "ChampionModelUri": ("String", f"s3://{CONFIG.bucket}/{CONFIG.prefix}/champion/"),
    }
    assert {k: v for k, (_, v) in declared.items()} == parameter_defaults(CONFIG)


def test_default_hyperparameters_are_train_py_flags_that_give_hparams_defaults(definition, steps):
    """Train's hyperparameters, with each parameter at its default, parse (train.py's parser) to HParams()."""
    from training.train import hparams_from_args, hparams_parser

    defaults = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}

    def value(node: Any) -> str:
        if isinstance(node, dict) and "Get" in node:
            return str(defaults[node["Get"].removeprefix("Parameters.")])
        if isinstance(node, dict) and "Std:Join" in node:  # numbers cast to strings
            return node["Std:Join"]["On"].join(value(v) for v in node["Std:Join"]["Values"])
        return str(node)

    hyperparameters = steps["Train"]["Arguments"]["HyperParameters"]
    argv = [arg for key, node in hyperparameters.items() for arg in (f"--{key}", value(node))]
    parser = argparse.ArgumentParser(exit_on_error=False)
    hparams_parser(parser)
    parser.add_argument("--mlflow-tracking-uri", default=None)
    args = parser.parse_args(argv)  # an unknown flag or a bad value raises here
    assert hparams_from_args(args) == HParams()
    assert args.mlflow_tracking_uri == ""
    assert set(hyperparameters) == {"scorer", "loss", "epochs", "learning-rate", "batch-size", "ipw-eta",
                                    "ensemble", "mlflow-tracking-uri"}
    assert hyperparameters["epochs"] == join(param("Epochs"), on="")


# ============================================================================================ images and code

def test_images(steps):
    spark = steps["PrepareFeatures"]["Arguments"]["AppSpecification"]["ImageUri"]
    assert spark.endswith("/sagemaker-spark-processing:3.5-cpu-py312-v1.0")
    assert ".eu-west-1." in spark
    training_image = steps["Train"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
    assert training_image.endswith("/tensorflow-training:2.14.1-cpu-py310")
    assert steps["Evaluate"]["Arguments"]["AppSpecification"]["ImageUri"] == training_image
    [container] = steps["RegisterModel"]["Arguments"]["InferenceSpecification"]["Containers"]
    assert container["Image"].endswith("/tensorflow-inference:2.14.1-cpu")


def test_training_metrics_match_the_lines_train_py_logs(steps):
    """Studio shows the Train step's curves only when a MetricDefinition's regex matches the job's log."""
    import re

    from training.train import LOGGED_METRICS, epoch_line

    definitions = steps["Train"]["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"]
    assert [d["Name"] for d in definitions] == [f"train:{key}" for key in LOGGED_METRICS]
    logs = {"loss": 0.5, "mrr": 0.9, "ndcg_10": 0.8123, "ndcg_5": 0.7, "val_loss": 0.61, "val_mrr": 0.95,
            "val_ndcg_10": 0.7766, "val_ndcg_5": 0.72, "ipw_ndcg_10": 0.4512, "val_ipw_ndcg_10": 0.4879}
    line = "2026-11-26 07:00:00 INFO marketrank.train " + epoch_line(4, logs)
    for definition in definitions:
        key = definition["Name"].removeprefix("train:")
        assert float(re.search(definition["Regex"], line).group(1)) == pytest.approx(logs[key], abs=1e-4), key
    assert re.search(definitions[0]["Regex"], "exported /opt/ml/model (best epoch 3, 12.0s)") is None


def test_entry_points_in_the_definition(steps):
    spark = steps["PrepareFeatures"]["Arguments"]["AppSpecification"]["ContainerEntrypoint"]
    assert spark[0] == "smspark-submit"
    assert spark[spark.index("--py-files") + 1] == inputs(steps["PrepareFeatures"])["py-files"]["LocalPath"]
    assert spark[-1] == "/opt/ml/processing/input/code/feature_job.py"
    channels = {c["ChannelName"] for c in steps["Train"]["Arguments"]["InputDataConfig"]}
    assert channels == {"train", "validation", "code", "sm_drivers"}
    assert "runproc.sh" in steps["Evaluate"]["Arguments"]["AppSpecification"]["ContainerEntrypoint"][-1]


def test_definition_is_deterministic_and_location_free(rendered):
    import sagemaker.core.workflow.utilities as workflow_utilities
    import sagemaker.train.model_trainer as model_trainer

    originals = (model_trainer._get_unique_name, workflow_utilities.hash_files_or_dirs)
    assert definition_json(CONFIG) == rendered
    assert (model_trainer._get_unique_name, workflow_utilities.hash_files_or_dirs) == originals  # restored
    assert str(TRAINING_DIR) not in rendered
    assert "/tmp" not in rendered and "marketrank-pipeline-code" not in rendered
    assert "123456789012" not in rendered  # moto's account never leaks into the definition


def test_renders_without_credentials_or_network(monkeypatch, rendered):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")

    def no_network(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert definition_json(CONFIG) == rendered
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # the fake credentials were only lent
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"


def test_config_reaches_the_definition():
    config = PipelineConfig.from_env({"MARKETRANK_BUCKET": "other-bucket", "MARKETRANK_PREFIX": "/mr/",
                                      "MARKETRANK_TRAINING_INSTANCE_TYPE": "ml.c5.2xlarge",
                                      "MARKETRANK_SHADOW_SAMPLING_PERCENTAGE": "12.5",
                                      "MARKETRANK_ENDPOINT_INSTANCE_TYPE": "ml.c5.xlarge",
                                      "MARKETRANK_SPARK_IMAGE_URI": "123.dkr.ecr.us-east-1.amazonaws.com/spark:arrow"},
                                     region="us-east-1", endpoint_name="ranker", deploy_lambda_arn=None)
    assert (config.bucket, config.prefix, config.region, config.deploy_lambda_arn) == (
        "other-bucket", "mr", "us-east-1", CONFIG.deploy_lambda_arn)
    definition = json.loads(definition_json(config))
    defaults = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    assert defaults["InputDataUri"] == "s3://other-bucket/mr/raw"
    assert defaults["ChampionModelUri"] == "s3://other-bucket/mr/champion/"
    assert (defaults["TrainingInstanceType"], defaults["ShadowSamplingPercentage"]) == ("ml.c5.2xlarge", 12.5)
    assert defaults["ProcessingInstanceType"] == CONFIG.processing_instance_type
    with pytest.raises(ValueError, match="shadow_sampling_percentage must be in"):
        PipelineConfig.from_env({"MARKETRANK_SHADOW_SAMPLING_PERCENTAGE": "0"})
    by_name = {s["Name"]: s for s in definition["Steps"]}
    assert ".us-east-1." in by_name["Train"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
    # a GPU training instance type gets the GPU build for Train; Evaluate stays on the CPU one
    assert by_name["Train"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"].endswith(":2.14.1-cpu-py310")
    gpu = {s["Name"]: s for s in json.loads(definition_json(config.replace(training_instance_type="ml.g5.xlarge")))[
        "Steps"]}
    assert gpu["Train"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"].endswith(":2.14.1-gpu-py310")
    assert gpu["Evaluate"]["Arguments"]["AppSpecification"]["ImageUri"].endswith(":2.14.1-cpu-py310")
    prepare = by_name["PrepareFeatures"]["Arguments"]["AppSpecification"]["ImageUri"]
    assert prepare == "123.dkr.ecr.us-east-1.amazonaws.com/spark:arrow"  # an image with pyarrow, for no egress
    [deploy] = [s for s in by_name["QualityGate"]["Arguments"]["IfSteps"] if s["Name"] == "DeployShadow"]
    assert deploy["Arguments"]["endpoint_name"] == "ranker"
    [register] = [s for s in by_name["QualityGate"]["Arguments"]["IfSteps"] if s["Name"] == "RegisterModel"]
    assert "ml.c5.xlarge" in register["Arguments"]["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"]
    assert all(uri.startswith("s3://other-bucket/mr/")
               for uri in _strings(definition) if uri.startswith("s3://"))
    with pytest.raises(ValueError, match="name"):
        PipelineConfig(name="bad name")


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# ============================================================================================ AWS (moto)

@pytest.fixture(scope="module")
def aws():
    """moto with fake credentials, the artifacts bucket, and the pipeline upserted twice (create, then update).
    No region in the environment: the config's region is the one used (CI's `pipeline upsert` sets none)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)  # nor from ~/.aws/config
        mp.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
        with mock_aws():
            boto3.client("s3", region_name=CONFIG.region).create_bucket(
                Bucket=CONFIG.bucket, CreateBucketConfiguration={"LocationConstraint": CONFIG.region})
            arns = [upsert(CONFIG), upsert(CONFIG, role_arn="arn:aws:iam::123456789012:role/other")]
            yield {"arns": arns, "sm": boto3.client("sagemaker", region_name=CONFIG.region),
                   "s3": boto3.client("s3", region_name=CONFIG.region)}


def test_upsert_creates_then_updates_with_the_offline_definition(aws, rendered):
    assert aws["arns"][0] == aws["arns"][1]
    assert aws["arns"][0].endswith(f":pipeline/{CONFIG.name}")
    described = aws["sm"].describe_pipeline(PipelineName=CONFIG.name)
    assert described["RoleArn"] == "arn:aws:iam::123456789012:role/other"
    assert described["PipelineDefinition"] == rendered  # same code, same definition, any account


def test_upsert_stages_each_steps_code(aws, steps):
    s3 = aws["s3"]

    def read(uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if key.endswith("/"):
            [key] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
                     if o["Key"].endswith(".tar.gz")]
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def listing(uri: str) -> dict[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return {o["Key"].removeprefix(key).lstrip("/"): o["Key"]
                for o in s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}

    prepare = inputs(steps["PrepareFeatures"])
    assert read(prepare["code"]["S3Uri"]) == (TRAINING_DIR / "feature_job.py").read_bytes()
    [zip_key] = listing(prepare["py-files"]["S3Uri"]).values()
    archive = zipfile.ZipFile(io.BytesIO(s3.get_object(Bucket=CONFIG.bucket, Key=zip_key)["Body"].read()))
    assert {"training/__init__.py", "training/feature_job.py", "training/features.py"} <= set(archive.namelist())
    assert not any("__pycache__" in n for n in archive.namelist())

    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in steps["Train"]["Arguments"]["InputDataConfig"]}
    source_code = json.loads(read(channels["sm_drivers"] + "/sourcecode.json"))
    assert (source_code["entry_script"], source_code["requirements"]) == ("train.py", "requirements.txt")
    code = listing(channels["code"])
    assert {"train.py", "requirements.txt", "training/__init__.py", "training/train.py"} <= set(code)

    evaluate = inputs(steps["Evaluate"])
    with tarfile.open(fileobj=io.BytesIO(read(evaluate["code"]["S3Uri"]))) as bundle:
        names = bundle.getnames()
    assert {"evaluate.py", "requirements.txt", "training/evaluate.py", "training/report.py"} <= set(names)
    runproc = read(evaluate["entrypoint"]["S3Uri"]).decode()
    assert 'python3 evaluate.py "$@"' in runproc


def test_start_with_overrides_and_validation(aws):
    arn = start(CONFIG, {"Epochs": 3, "LearningRate": 0.01, "Scorer": "din"})
    assert arn.startswith(aws["arns"][0] + "/execution/")
    given = aws["sm"].list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]
    assert {p["Name"]: p["Value"] for p in given} == {"Epochs": "3", "LearningRate": "0.01", "Scorer": "din"}

    with pytest.raises(ValueError, match="Epoch\\b.*valid parameters: .*Epochs") as unknown:
        start(CONFIG, {"Epoch": 3})
    assert all(name in str(unknown.value) for name in parameter_defaults(CONFIG))
    with pytest.raises(ValueError, match="Epochs is Integer"):
        start(CONFIG, {"Epochs": "many"})
    with pytest.raises(PipelineError, match="pipeline 'missing'") as missing:
        start(dataclasses.replace(CONFIG, name="missing"), {})
    assert "\n" not in str(missing.value)


def test_status_of_the_latest_and_of_a_given_execution(aws):
    first = start(CONFIG, {"BatchSize": 32})
    latest = start(CONFIG, {"NdcgFloor": 0.4})
    summary = status(CONFIG)
    assert summary["execution_arn"] == latest
    assert summary["parameters"] == {"NdcgFloor": "0.4"}
    assert summary["status"] and summary["start_time"]
    assert summary["steps"] is None and "unavailable" in summary["steps_error"]  # moto lacks the call
    json.dumps(summary)  # plain JSON types
    assert status(CONFIG, first)["parameters"] == {"BatchSize": "32"}

    bogus = first + "x"
    with pytest.raises(PipelineError, match=f"pipeline execution {bogus}: DescribePipelineExecution failed"):
        status(CONFIG, bogus)
    with pytest.raises(PipelineError, match="pipeline 'missing'"):
        status(dataclasses.replace(CONFIG, name="missing"))
