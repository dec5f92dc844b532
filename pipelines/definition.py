"""The SageMaker pipeline: PrepareFeatures -> Train -> Evaluate -> QualityGate -> RegisterModel -> DeployShadow.

::

    PrepareFeatures (PySpark 3.5, training/feature_job.py)      raw logs -> features/{train,valid,test}/
    Train           (ModelTrainer, TF 2.14.1, training/train.py) features/train + features/valid -> model.tar.gz
    Evaluate        (TF 2.14.1, training/evaluate.py)            model + features/test + champion -> evaluation.json
    QualityGate     (pipelines.gate.CHECKS on evaluation.json)
      pass: RegisterModel (model package group, TF Serving 2.14.1 image, evaluation.json as model statistics)
            DeployShadow  (Lambda pipelines.deploy_lambda: the challenger shadows the live champion)
      fail: QualityGateFailed (names each metric, its value and its threshold)

``definition_json`` renders the definition with no AWS account: the SDK's S3 calls (bucket check, code uploads)
go to an in-process moto mock, with fake credentials lent only for the call. Renders are deterministic: code is
staged under content-derived keys (``pipelines.sdk.deterministic_uploads``) and nothing reads the clock.
``upsert`` / ``start`` / ``status`` talk to the real account (or whatever ``AWS_ENDPOINT_URL`` names) with boto3;
nothing here calls AWS at import time. The SageMaker SDK is imported on first use (it takes seconds), from
``pipelines.sdk`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import training
from pipelines import gate
from training import report
from training import train as train_script
from training.hparams import LOSS_NAMES, SCORERS, HParams

if TYPE_CHECKING:
    from pipelines.sdk import Pipeline, PipelineSession

#: The ``training`` package: every step's code, wherever the package is installed (never the CWD).
TRAINING_DIR = Path(training.__file__).resolve().parent
FEATURE_JOB, TRAIN_SCRIPT, EVALUATE_SCRIPT = "feature_job.py", "train.py", "evaluate.py"
REQUIREMENTS = "requirements.txt"

# Images (AWS Deep Learning Containers, resolved from the SDK's bundled tables).
SPARK_VERSION = "3.5"
#: Spark image flavour: the py312 image, because the training package needs Python >= 3.10 (the default
#: ``3.5-cpu`` tag is Python 3.9).
SPARK_PY_VERSION, SPARK_CONTAINER_VERSION = "py312", "v1.0"
TF_VERSION, TF_PY_VERSION = "2.14.1", "py310"
#: Instance type the image lookups use: it only picks the CPU flavour of each image.
IMAGE_INSTANCE_TYPE = "ml.m5.xlarge"

# Container paths (the defaults of training/evaluate.py and the --input/--output of training/feature_job.py).
RAW_DIR = "/opt/ml/processing/input/raw"
FEATURES_DIR = "/opt/ml/processing/output/features"
MODEL_DIR, TEST_DIR = "/opt/ml/processing/model", "/opt/ml/processing/test"
CHAMPION_DIR, EVALUATION_DIR = "/opt/ml/processing/champion", "/opt/ml/processing/evaluation"

APPROVAL_STATUSES = ("Approved", "PendingManualApproval")
#: What the Lambda returns (pipelines.deploy_lambda.run), exposed as the DeployShadow step's outputs.
DEPLOY_OUTPUTS = ("action", "endpoint_config_name")


class PipelineError(RuntimeError):
    """An AWS call about the pipeline failed; the message is one line naming the pipeline or execution."""


#: PipelineConfig fields that may be empty (no prefix, no MLflow tracking, SageMaker's own Spark image).
OPTIONAL_FIELDS = ("prefix", "mlflow_tracking_server_arn", "spark_image_uri")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Where the pipeline lives and what it talks to. Pure data: no AWS calls, no clock."""

    name: str = "marketrank"
    region: str = "eu-west-1"
    role_arn: str = "arn:aws:iam::111111111111:role/marketrank-sagemaker"
    #: Artifacts bucket: code, features, models and evaluations go under ``s3://<bucket>/<prefix>/``.
    bucket: str = "marketrank-artifacts-111111111111"
    prefix: str = "marketrank"
    model_package_group: str = "marketrank"
    deploy_lambda_arn: str = "arn:aws:lambda:eu-west-1:111111111111:function:marketrank-deploy"
    endpoint_name: str = "marketrank"
    #: Defaults of the pipeline parameters of the same names (the CDK stage settings set them; an execution may
    #: still override them).
    processing_instance_type: str = "ml.m5.xlarge"
    training_instance_type: str = "ml.m5.xlarge"
    shadow_sampling_percentage: float = 20.0
    #: The endpoint's instance type (the stage's): registered with each model package as a supported type.
    endpoint_instance_type: str = "ml.m5.large"
    #: The stage's MLflow tracking server (the MlPlatform stack's): the Train step logs there unless an execution
    #: overrides it ("" = no tracking).
    mlflow_tracking_server_arn: str = ""
    #: The PrepareFeatures image ("" = SageMaker's Spark processing image, which lacks pyarrow: the job then
    #: pip-installs ``training.spark_runtime.REQUIREMENTS`` at start, so it needs egress to PyPI; an image with
    #: them already, for a VPC without it).
    spark_image_uri: str = ""

    #: Environment variable of each field for ``from_env``.
    ENV = {"name": "MARKETRANK_PIPELINE_NAME", "region": "MARKETRANK_REGION", "role_arn": "MARKETRANK_ROLE_ARN",
           "bucket": "MARKETRANK_BUCKET", "prefix": "MARKETRANK_PREFIX",
           "model_package_group": "MARKETRANK_MODEL_PACKAGE_GROUP",
           "deploy_lambda_arn": "MARKETRANK_DEPLOY_LAMBDA_ARN", "endpoint_name": "MARKETRANK_ENDPOINT_NAME",
           "processing_instance_type": "MARKETRANK_PROCESSING_INSTANCE_TYPE",
           "training_instance_type": "MARKETRANK_TRAINING_INSTANCE_TYPE",
           "shadow_sampling_percentage": "MARKETRANK_SHADOW_SAMPLING_PERCENTAGE",
           "endpoint_instance_type": "MARKETRANK_ENDPOINT_INSTANCE_TYPE",
           "mlflow_tracking_server_arn": "MARKETRANK_MLFLOW_TRACKING_SERVER_ARN",
           "spark_image_uri": "MARKETRANK_SPARK_IMAGE_URI"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        try:
            sampling = float(self.shadow_sampling_percentage)  # from the environment it arrives as text
        except (TypeError, ValueError):
            sampling = float("nan")
        if not 0 < sampling <= 100:
            raise ValueError(f"pipeline config: shadow_sampling_percentage must be in (0, 100], "
                             f"got {self.shadow_sampling_percentage!r}")
        object.__setattr__(self, "shadow_sampling_percentage", sampling)
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) and field.name not in OPTIONAL_FIELDS:
                raise ValueError(f"pipeline config: {field.name} must not be empty")
        if not all(c.isalnum() or c == "-" for c in self.name) or self.name.startswith("-"):
            raise ValueError(f"pipeline config: name {self.name!r} must be letters, digits and hyphens")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PipelineConfig:
        """Defaults, then ``MARKETRANK_*`` variables (see ``ENV``), then ``overrides`` (``None`` values ignored)."""
        environ = os.environ if environ is None else environ
        values = {field: environ[var] for field, var in cls.ENV.items() if environ.get(var)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> PipelineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def base_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def champion_uri(self) -> str:
        """Prefix the deploy step keeps pointing at the live champion (a ``no-champion`` marker before any)."""
        return f"{self.base_uri}/champion/"


# ---------------------------------------------------------------------------------------------- parameters

def parameter_defaults(config: PipelineConfig = PipelineConfig()) -> dict[str, str | int | float]:
    """Every pipeline parameter and its default, in definition order. Hyperparameters default to
    ``training.hparams.HParams()`` and gate thresholds to ``pipelines.gate.GateThresholds()``."""
    hparams, thresholds = HParams(), gate.GateThresholds()
    return {
        "InputDataUri": f"{config.base_uri}/raw",
        "ProcessingInstanceType": config.processing_instance_type,
        "TrainingInstanceType": config.training_instance_type,
        "Scorer": hparams.scorer,
        "Loss": hparams.loss,
        "Epochs": hparams.epochs,
        "LearningRate": hparams.learning_rate,
        "BatchSize": hparams.batch_size,
        # None = the feature job's position-bias estimate, which train.py spells "auto" on its command line.
        "IpwEta": "auto" if hparams.ipw_eta is None else str(hparams.ipw_eta),
        "Ensemble": hparams.ensemble,
        "NdcgFloor": thresholds.ndcg_floor,
        "MinLift": thresholds.min_lift,
        "MinLiftOverLogged": thresholds.min_lift_over_logged,
        # Approved: the quality gate is the approval. DeployShadow creates a SageMaker Model from the package,
        # which SageMaker only allows for Approved versions; the challenger then only shadows the champion
        # (copied traffic, no user impact) and promotion stays a separate, explicit action. With
        # PendingManualApproval the package is registered but DeployShadow fails until someone approves it.
        "ModelApprovalStatus": "Approved",
        "MlflowTrackingServerArn": config.mlflow_tracking_server_arn,
        "ShadowSamplingPercentage": config.shadow_sampling_percentage,
        "ChampionModelUri": config.champion_uri,
    }


#: Pipeline parameter -> train.py flag (SageMaker passes each hyperparameter as ``--<key> <value>``).
HYPERPARAMETERS = {"Scorer": "scorer", "Loss": "loss", "Epochs": "epochs", "LearningRate": "learning-rate",
                   "BatchSize": "batch-size", "IpwEta": "ipw-eta", "Ensemble": "ensemble",
                   "MlflowTrackingServerArn": "mlflow-tracking-uri"}
#: Gate threshold (``pipelines.gate.Check.threshold``) -> pipeline parameter.
THRESHOLD_PARAMETERS = {"ndcg_floor": "NdcgFloor", "min_lift": "MinLift", "min_lift_over_logged": "MinLiftOverLogged"}
ENUMS = {"Scorer": list(SCORERS), "Loss": list(LOSS_NAMES), "ModelApprovalStatus": list(APPROVAL_STATUSES)}


def _parameters(config: PipelineConfig, sdk) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, default in parameter_defaults(config).items():
        if isinstance(default, bool) or not isinstance(default, (int, float, str)):
            raise TypeError(f"parameter {name}: unsupported default {default!r}")
        if isinstance(default, int):
            params[name] = sdk.ParameterInteger(name, default_value=default)
        elif isinstance(default, float):
            params[name] = sdk.ParameterFloat(name, default_value=default)
        else:
            params[name] = sdk.ParameterString(name, default_value=default, enum_values=ENUMS.get(name))
    return params


# ---------------------------------------------------------------------------------------------- code bundle

@dataclasses.dataclass(frozen=True)
class CodeBundle:
    """The training package, staged for the steps.

    ``source_dir`` (the Train and Evaluate source dir) holds the package's files at its root, for the entry
    scripts, and the package again as ``training/``: SageMaker copies a source dir's *contents* to the working
    directory (``/opt/ml/input/data/code``, ``/opt/ml/processing/input/code``) and runs ``python train.py`` there,
    so ``from training import ...`` resolves through the script's directory. ``zip_path`` holds ``training/`` at
    its root for ``spark-submit --py-files``. Caches (``__pycache__``) are left out.

    ``digest`` hashes every file and the SDK version (its drivers ship with the code); the bundle sits in a temp
    directory named after it, built once and reused, and the zip is byte-for-byte reproducible.
    """

    digest: str
    source_dir: Path
    zip_path: Path


def code_bundle() -> CodeBundle:
    from pipelines import sdk

    files = [(path.relative_to(TRAINING_DIR).as_posix(), path.read_bytes()) for path in sdk.files_under(TRAINING_DIR)]
    digest = hashlib.sha256(f"sagemaker=={sdk.sdk_version()}\0".encode())
    for relative, data in files:
        digest.update(relative.encode() + b"\0" + data + b"\0")
    hexdigest = digest.hexdigest()
    root = Path(tempfile.gettempdir()) / "marketrank-pipeline-code" / hexdigest[:24]
    bundle = CodeBundle(hexdigest, root / "source", root / "training.zip")
    if _complete(bundle):
        return bundle
    staging = root.with_name(f".{root.name}-{uuid.uuid4().hex[:8]}")
    try:
        for relative, data in files:
            for target in (staging / "source" / relative, staging / "source" / "training" / relative):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        with zipfile.ZipFile(staging / "training.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for relative, data in files:  # fixed timestamps and modes: same files, same bytes
                info = zipfile.ZipInfo(f"training/{relative}", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
        shutil.rmtree(root, ignore_errors=True)  # an incomplete leftover (a temp cleaner took files)
        try:
            staging.rename(root)
        except OSError:  # another process staged the same digest first: theirs is identical
            if not _complete(bundle):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


def _complete(bundle: CodeBundle) -> bool:
    return (bundle.zip_path.is_file() and (bundle.source_dir / TRAIN_SCRIPT).is_file()
            and (bundle.source_dir / "training" / "__init__.py").is_file())


# ---------------------------------------------------------------------------------------------- the pipeline

def build_pipeline(config: PipelineConfig, session: PipelineSession) -> Pipeline:
    """The pipeline object. Building calls no AWS; rendering it (``definition()``) stages code in S3, so render
    it with ``render`` (as ``definition_json`` and ``upsert`` do) for content-derived code keys."""
    from pipelines import sdk

    bundle = code_bundle()
    params = _parameters(config, sdk)
    role, tag = config.role_arn, bundle.digest[:10]
    # The Train step's image follows the stage's training instance type (the GPU build on a GPU instance); an
    # execution that overrides TrainingInstanceType to another family keeps this image. Evaluate runs on CPU.
    tf_training_image = sdk.image_uri("tensorflow", config.region, TF_VERSION, "training", py_version=TF_PY_VERSION,
                                      instance_type=config.training_instance_type)
    tf_evaluate_image = sdk.image_uri("tensorflow", config.region, TF_VERSION, "training", py_version=TF_PY_VERSION,
                                      instance_type=IMAGE_INSTANCE_TYPE)
    tf_inference_image = sdk.image_uri("tensorflow", config.region, TF_VERSION, "inference",
                                       instance_type=IMAGE_INSTANCE_TYPE)

    def execution_uri(name: str):
        return sdk.Join(on="/", values=[f"{config.base_uri}/executions", sdk.ExecutionVariables.PIPELINE_EXECUTION_ID,
                                        name])

    def s3_input(name: str, uri, local_path: str):
        return sdk.ProcessingInput(input_name=name, s3_input=sdk.ProcessingS3Input(
            s3_uri=uri, local_path=local_path, s3_data_type="S3Prefix", s3_input_mode="File"))

    def s3_output(name: str, local_path: str):
        return sdk.ProcessingOutput(output_name=name, s3_output=sdk.ProcessingS3Output(
            s3_uri=execution_uri(name), local_path=local_path, s3_upload_mode="EndOfJob"))

    # PrepareFeatures: raw logs -> features/{train,valid,test}/ + feature_spec.json. feature_job.py imports the
    # training package, shipped as a zip on the Python path (--py-files).
    spark_image = config.spark_image_uri or sdk.image_uri(
        "spark", config.region, SPARK_VERSION, "processing", py_version=SPARK_PY_VERSION,
        container_version=SPARK_CONTAINER_VERSION, instance_type=IMAGE_INSTANCE_TYPE)
    spark = sdk.PySparkProcessor(
        role=role, framework_version=SPARK_VERSION, image_uri=spark_image,
        # One instance: the feature job runs Spark in local mode on node-local paths (a second one would idle).
        instance_type=params["ProcessingInstanceType"], instance_count=1,
        base_job_name=f"{config.name}-features",
        sagemaker_session=session, max_runtime_in_seconds=4 * 3600)
    prepare = sdk.ProcessingStep(name="PrepareFeatures", step_args=spark.run(
        submit_app=str(bundle.source_dir / FEATURE_JOB),
        submit_py_files=[str(bundle.zip_path)],
        inputs=[s3_input("raw", params["InputDataUri"], RAW_DIR)],
        outputs=[s3_output("features", FEATURES_DIR)],
        arguments=["--input", RAW_DIR, "--output", FEATURES_DIR],
        job_name=f"{config.name}-features-{tag}",
    ))
    features = prepare.properties.ProcessingOutputConfig.Outputs["features"].S3Output.S3Uri

    def split(name: str):
        return sdk.Join(on="/", values=[features, name])

    # Train: script mode on the TF 2.14.1 training image; hyperparameters become train.py flags. Numeric
    # parameters are cast to strings (SageMaker hyperparameters are a string map).
    hyperparameters = {flag: params[name].to_string() for name, flag in HYPERPARAMETERS.items()}
    trainer = sdk.ModelTrainer(
        sagemaker_session=session, role=role, training_image=tf_training_image, base_job_name=f"{config.name}-train",
        source_code=sdk.SourceCode(source_dir=str(bundle.source_dir), entry_script=TRAIN_SCRIPT,
                                   requirements=REQUIREMENTS),
        compute=sdk.Compute(instance_type=params["TrainingInstanceType"],
                            # One instance: SageMaker sets no TF_CONFIG, so more hosts would each train a copy.
                            instance_count=1, volume_size_in_gb=30),
        hyperparameters=hyperparameters,
        output_data_config=sdk.OutputDataConfig(s3_output_path=f"{config.base_uri}/models"),
        stopping_condition=sdk.StoppingCondition(max_runtime_in_seconds=6 * 3600),
    ).with_metric_definitions([sdk.MetricDefinition(name=f"train:{key}", regex=regex)
                               for key, regex in train_script.metric_patterns().items()])
    train = sdk.TrainingStep(name="Train", step_args=trainer.train(input_data_config=[
        sdk.InputData(channel_name="train", data_source=split("train")),
        sdk.InputData(channel_name="validation", data_source=split("valid")),
    ]))
    model_artifact = train.properties.ModelArtifacts.S3ModelArtifacts

    # Evaluate: challenger (and champion, when the prefix holds one) on the test split -> evaluation.json.
    evaluator = sdk.FrameworkProcessor(
        image_uri=tf_evaluate_image, command=["python3"], role=role, instance_type=params["ProcessingInstanceType"],
        instance_count=1, base_job_name=f"{config.name}-evaluate", sagemaker_session=session,
        max_runtime_in_seconds=2 * 3600)
    evaluation_report = sdk.PropertyFile(name="EvaluationReport", output_name="evaluation",
                                         path=report.EVALUATION_FILE)
    evaluate = sdk.ProcessingStep(name="Evaluate", property_files=[evaluation_report], step_args=evaluator.run(
        code=EVALUATE_SCRIPT, source_dir=str(bundle.source_dir), requirements=REQUIREMENTS,
        job_name=f"{config.name}-evaluate-{tag}",  # fixed: the code's S3 key derives from it
        inputs=[s3_input("model", model_artifact, MODEL_DIR), s3_input("test", split("test"), TEST_DIR),
                s3_input("champion", params["ChampionModelUri"], CHAMPION_DIR)],
        outputs=[s3_output("evaluation", EVALUATION_DIR)],
        arguments=["--model", MODEL_DIR, "--test", TEST_DIR, "--champion", CHAMPION_DIR, "--output", EVALUATION_DIR],
    ))

    def json_get(path: str):
        return sdk.JsonGet(step_name=evaluate.name, property_file=evaluation_report, json_path=path)

    thresholds = {key: params[name] for key, name in THRESHOLD_PARAMETERS.items()}

    # RegisterModel: a package version in the group, evaluation.json as its model quality statistics.
    evaluation_json = sdk.Join(on="/", values=[
        evaluate.properties.ProcessingOutputConfig.Outputs["evaluation"].S3Output.S3Uri, report.EVALUATION_FILE])
    builder = sdk.ModelBuilder(image_uri=tf_inference_image, s3_model_data_url=model_artifact, role_arn=role,
                               sagemaker_session=session, instance_type=config.endpoint_instance_type)
    register = sdk.ModelStep(name="RegisterModel", step_args=builder.register(
        model_package_group_name=config.model_package_group,
        content_types=["application/json"], response_types=["application/json"],
        inference_instances=list(dict.fromkeys([config.endpoint_instance_type, "ml.m5.large", "ml.m5.xlarge"])),
        transform_instances=["ml.m5.xlarge"],
        approval_status=params["ModelApprovalStatus"],
        model_metrics=sdk.ModelMetrics(model_statistics=sdk.MetricsSource(
            content_type="application/json", s3_uri=evaluation_json)),
        description=f"{config.name} TF-Ranking model (TF Serving {TF_VERSION})",
    ))

    # DeployShadow: pipelines.deploy_lambda puts the new package in shadow of the live champion.
    deploy = sdk.LambdaStep(
        name="DeployShadow",
        lambda_func=sdk.Lambda(function_arn=config.deploy_lambda_arn, session=session),
        inputs={"action": "deploy_shadow", "model_package_arn": register.properties.ModelPackageArn,
                "endpoint_name": config.endpoint_name,
                "shadow_sampling_percentage": params["ShadowSamplingPercentage"]},
        outputs=[sdk.LambdaOutput(output_name=name, output_type=sdk.LambdaOutputTypeEnum.String)
                 for name in DEPLOY_OUTPUTS],
    )

    # QualityGateFailed: every check's metric, its value and its threshold.
    message: list[Any] = ["quality gate failed:"]
    for index, check in enumerate(gate.CHECKS):
        message += [" " if index == 0 else "; ", f"{check.metric} = ", json_get(check.path), " (required >= ",
                    thresholds[check.threshold], ")"]
    fail = sdk.FailStep(name="QualityGateFailed", error_message=sdk.Join(on="", values=message))

    quality_gate = sdk.ConditionStep(
        name="QualityGate",
        conditions=gate.conditions(json_get, thresholds, sdk.ConditionGreaterThanOrEqualTo),
        if_steps=[register, deploy],
        else_steps=[fail],
    )
    return sdk.Pipeline(name=config.name, parameters=list(params.values()),
                        steps=[prepare, train, evaluate, quality_gate],  # the branches live in the condition
                        sagemaker_session=session)


def render(config: PipelineConfig, session: PipelineSession) -> str:
    """Build and render the definition on ``session`` (this stages the step code in S3), with content-derived
    code keys and without the SDK's chatter."""
    from pipelines import sdk

    with sdk.quiet(), sdk.deterministic_uploads(code_bundle().digest):
        return build_pipeline(config, session).definition()


# ---------------------------------------------------------------------------------------------- offline render

#: Variables that could point boto3 at a real account or endpoint; hidden while rendering offline.
_AWS_ENV_PREFIXES = ("AWS_", "SAGEMAKER_VALIDATE_ROLE")
_OFFLINE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true",
                # The fake role cannot be checked against IAM (the SDK would simulate its policies).
                "SAGEMAKER_VALIDATE_ROLE": "false"}


@contextlib.contextmanager
def _offline_environment(region: str) -> Iterator[None]:
    """Fake credentials and no endpoint overrides, profiles or config files; the environment is restored after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(_AWS_ENV_PREFIXES)}
    for key in saved:
        del os.environ[key]
    os.environ.update(_OFFLINE_ENV, AWS_DEFAULT_REGION=region)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(_AWS_ENV_PREFIXES)]:
            del os.environ[key]
        os.environ.update(saved)


@contextlib.contextmanager
def _default_region(region: str) -> Iterator[None]:
    """``AWS_DEFAULT_REGION`` = ``region`` while the SDK renders, unless set: parts of it build their own boto
    session from the environment and refuse to work without a region, whatever the pipeline session says."""
    if os.environ.get("AWS_DEFAULT_REGION"):
        yield
        return
    os.environ["AWS_DEFAULT_REGION"] = region
    try:
        yield
    finally:
        os.environ.pop("AWS_DEFAULT_REGION", None)


def definition_json(config: PipelineConfig = PipelineConfig()) -> str:
    """The pipeline definition (JSON), rendered without AWS credentials or network.

    The SDK's S3 calls go to an in-process moto mock holding ``config.bucket``; two calls give the same string.
    """
    import boto3
    from moto import mock_aws

    from pipelines import sdk

    with _offline_environment(config.region), mock_aws():
        boto_session = boto3.Session(region_name=config.region)
        _create_bucket(boto_session.client("s3"), config.bucket, config.region)
        return render(config, sdk.pipeline_session(boto_session, config.bucket, config.prefix))


def _create_bucket(s3, bucket: str, region: str) -> None:
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})


# ---------------------------------------------------------------------------------------------- AWS operations

@contextlib.contextmanager
def _aws_errors(resource: str) -> Iterator[None]:
    """botocore / boto3 errors -> ``PipelineError`` with one line naming ``resource``."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as err:
        error = err.response.get("Error", {})
        detail = f"{err.operation_name} failed: {error.get('Code', 'Error')}: {error.get('Message', '')}"
        raise PipelineError(_one_line(f"{resource}: {detail}")) from err
    except (BotoCoreError, Boto3Error) as err:
        raise PipelineError(_one_line(f"{resource}: {type(err).__name__}: {err}")) from err


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sagemaker(config: PipelineConfig):
    import boto3

    return boto3.Session(region_name=config.region).client("sagemaker")


def upsert(config: PipelineConfig = PipelineConfig(), role_arn: str | None = None) -> str:
    """Create the pipeline, or update it to this code and definition; returns the pipeline ARN.

    Rendering uploads the step code to ``s3://<bucket>/`` (content-derived keys), so the bucket must exist.
    """
    import boto3

    from pipelines import sdk

    resource = f"pipeline {config.name!r} ({config.region})"
    role = role_arn or config.role_arn
    description = "marketrank: features -> train -> evaluate -> quality gate -> register -> shadow deploy"
    with _aws_errors(resource), _default_region(config.region):
        boto_session = boto3.Session(region_name=config.region)
        definition = render(config, sdk.pipeline_session(boto_session, config.bucket, config.prefix))
        ensure_champion_prefix(boto_session.client("s3"), config)
        sm = boto_session.client("sagemaker")
        if _pipeline_exists(sm, config.name):
            response = sm.update_pipeline(PipelineName=config.name, PipelineDefinition=definition, RoleArn=role,
                                          PipelineDescription=description)
        else:
            response = sm.create_pipeline(PipelineName=config.name, PipelineDefinition=definition, RoleArn=role,
                                          PipelineDescription=description)
    return response["PipelineArn"]


NO_CHAMPION_MARKER = "no-champion"


def ensure_champion_prefix(s3, config: PipelineConfig) -> None:
    """Evaluate always mounts the champion prefix and SageMaker rejects an empty input prefix, so before the
    first deployment it holds a marker file (which ``training.evaluate.has_model`` treats as no champion)."""
    bucket, _, prefix = config.champion_uri[len("s3://"):].partition("/")
    if s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) == 0:
        s3.put_object(Bucket=bucket, Key=prefix + NO_CHAMPION_MARKER, Body=b"no champion deployed yet\n")


def _pipeline_exists(sm, name: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        sm.describe_pipeline(PipelineName=name)
    except ClientError as err:
        error = err.response.get("Error", {})
        if error.get("Code") in ("ResourceNotFound", "ResourceNotFoundException") or (
                error.get("Code") == "ValidationException" and "not find" in error.get("Message", "")):  # moto
            return False
        raise
    return True


def _parameter_value(name: str, value: str | int | float, kind: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"pipeline parameter {name}: expected a string or number, got {value!r}")
    try:
        if kind == "Integer":
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return str(int(number))
        if kind == "Float":
            return repr(float(value))
    except ValueError:
        raise ValueError(f"pipeline parameter {name} is {kind}: {value!r} is not one") from None
    return str(value)


def start(config: PipelineConfig = PipelineConfig(), parameters: Mapping[str, str | int | float] | None = None) -> str:
    """Start an execution with ``parameters`` overriding defaults; returns the execution ARN.

    Names and types are checked against the deployed pipeline's definition first: an unknown name raises
    ``ValueError`` naming it and the valid names.
    """
    parameters = dict(parameters or {})
    resource = f"pipeline {config.name!r} ({config.region})"
    with _aws_errors(resource):
        sm = _sagemaker(config)
        definition = json.loads(sm.describe_pipeline(PipelineName=config.name)["PipelineDefinition"])
    declared = {p["Name"]: p.get("Type", "String") for p in definition.get("Parameters", [])}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{resource}: unknown parameter(s) {', '.join(unknown)}; "
                         f"valid parameters: {', '.join(sorted(declared))}")
    values = [{"Name": name, "Value": _parameter_value(name, value, declared[name])}
              for name, value in sorted(parameters.items())]
    request: dict[str, Any] = {"PipelineName": config.name}
    if values:
        request["PipelineParameters"] = values
    with _aws_errors(resource):
        return sm.start_pipeline_execution(**request)["PipelineExecutionArn"]


def _timestamp(value: Any) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else 0.0


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


def status(config: PipelineConfig = PipelineConfig(), execution_arn: str | None = None) -> dict[str, Any]:
    """An execution's status, start time, parameters and steps (the latest execution when no ARN is given).

    ``steps`` is ``None`` with ``steps_error`` set when the steps cannot be listed (moto does not implement
    ListPipelineExecutionSteps, for one); everything else still comes back.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    sm = _sagemaker(config)
    if execution_arn is None:
        with _aws_errors(f"pipeline {config.name!r} ({config.region})"):
            summaries = sm.list_pipeline_executions(PipelineName=config.name, SortBy="CreationTime",
                                                    SortOrder="Descending", MaxResults=1)
        found = summaries.get("PipelineExecutionSummaries") or []
        if not found:
            raise PipelineError(f"pipeline {config.name!r} ({config.region}): no executions yet")
        # The newest by start time, not trusting the server's sort (moto ignores SortBy and MaxResults and lists
        # oldest first: on a tie the later entry wins).
        _, newest = max(enumerate(found), key=lambda item: (_timestamp(item[1].get("StartTime")), item[0]))
        execution_arn = newest["PipelineExecutionArn"]

    with _aws_errors(f"pipeline execution {execution_arn}"):
        described = sm.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        parameters: dict[str, str] = {}
        for page in sm.get_paginator("list_pipeline_parameters_for_execution").paginate(
                PipelineExecutionArn=execution_arn):
            parameters.update({p["Name"]: p["Value"] for p in page.get("PipelineParameters", [])})

    steps: list[dict[str, Any]] | None = None
    steps_error = None
    try:
        steps = []
        for page in sm.get_paginator("list_pipeline_execution_steps").paginate(
                PipelineExecutionArn=execution_arn, SortOrder="Ascending"):
            steps += [{"name": s.get("StepName"), "status": s.get("StepStatus"), "start_time": _iso(s.get("StartTime")),
                       "end_time": _iso(s.get("EndTime")), "failure_reason": s.get("FailureReason"),
                       "metadata": s.get("Metadata", {})}
                      for s in page.get("PipelineExecutionSteps", [])]
    except (NotImplementedError, ClientError, BotoCoreError) as err:
        steps, steps_error = None, _one_line(f"steps unavailable: {type(err).__name__}: {err}")

    return {"pipeline": config.name, "execution_arn": execution_arn,
            "display_name": described.get("PipelineExecutionDisplayName"),
            "status": described.get("PipelineExecutionStatus"),
            "start_time": _iso(described.get("CreationTime")),
            "last_modified_time": _iso(described.get("LastModifiedTime")),
            "failure_reason": described.get("FailureReason"),
            "parameters": parameters, "steps": steps, "steps_error": steps_error}
