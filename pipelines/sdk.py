"""The one module that imports the SageMaker Python SDK (3.x): its import paths move between minor releases.

Everything else (``pipelines.definition``, the CLI, the tests) imports SDK symbols from here, so an SDK upgrade
is fixed in one place. Verified against sagemaker 3.27 (sagemaker-core 2.27, sagemaker-mlops / -train / -serve
1.27).

Besides the re-exports this module holds the two SDK-specific helpers the pipeline needs:

* ``pipeline_session``: a ``PipelineSession`` with telemetry off (the SDK otherwise sends an HTTP request from a
  background thread) and no config files read from the machine;
* ``deterministic_uploads``: while rendering a definition, code is staged to S3 under keys derived from the
  code's *content* instead of timestamps (``ModelTrainer``) or absolute local paths (the pipeline's code
  hashes), so the same code gives the same definition on every machine and every call, and changed code gets
  new keys (in-flight executions keep reading their own code).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _import_region() -> Iterator[None]:
    """Importing ``sagemaker.serve`` creates a boto3 client at class definition (``AIRHub``), which needs *a* region
    even though nothing is sent: lend one for the import when the environment and AWS config name none."""
    import boto3

    if boto3.session.Session().region_name:
        yield
        return
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    try:
        yield
    finally:
        os.environ.pop("AWS_DEFAULT_REGION", None)


with _import_region():
    from sagemaker.core import image_uris
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError
    from sagemaker.core.lambda_helper import Lambda
    from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
    from sagemaker.core.processing import FrameworkProcessor
    from sagemaker.core.shapes import (
        MetricDefinition,
        ProcessingInput,
        ProcessingOutput,
        ProcessingS3Input,
        ProcessingS3Output,
    )
    from sagemaker.core.spark.processing import PySparkProcessor
    from sagemaker.core.training.configs import Compute, InputData, OutputDataConfig, SourceCode, StoppingCondition
    from sagemaker.core.workflow.conditions import ConditionGreaterThanOrEqualTo
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.core.workflow.pipeline_context import PipelineSession
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow import (
        ConditionStep,
        FailStep,
        LambdaOutput,
        LambdaStep,
        ModelStep,
        Pipeline,
        ProcessingStep,
        TrainingStep,
    )
    from sagemaker.mlops.workflow.lambda_step import LambdaOutputTypeEnum
    from sagemaker.serve.model_builder import ModelBuilder
    from sagemaker.train.model_trainer import ModelTrainer

__all__ = [
    "Compute", "ConditionGreaterThanOrEqualTo", "ConditionStep", "ExecutionVariables", "FailStep",
    "FrameworkProcessor", "InputData", "Join", "JsonGet", "Lambda", "LambdaOutput", "LambdaOutputTypeEnum",
    "LambdaStep", "MetricDefinition", "MetricsSource", "ModelBuilder", "ModelMetrics", "ModelStep", "ModelTrainer",
    "OutputDataConfig",
    "ParameterFloat", "ParameterInteger", "ParameterString", "Pipeline", "PipelineSession", "ProcessingInput",
    "ProcessingOutput", "ProcessingS3Input", "ProcessingS3Output", "ProcessingStep", "PropertyFile",
    "PySparkProcessor", "RoleValidationError", "SourceCode", "StoppingCondition", "TrainingStep", "content_hash",
    "deterministic_uploads", "files_under", "image_uri", "pipeline_session", "quiet", "sdk_version",
]

log = logging.getLogger("marketrank.pipelines.sdk")

#: A complete SageMaker SDK config: telemetry off, and nothing is read from ~/.config or /etc/xdg.
SDK_CONFIG: dict[str, Any] = {"SchemaVersion": "1.0",
                              "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
#: Never part of a code bundle or its hash.
IGNORED_NAMES = ("__pycache__", ".DS_Store", ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache")


def sdk_version() -> str:
    return metadata.version("sagemaker")


def pipeline_session(boto_session, bucket: str, prefix: str = "") -> PipelineSession:
    """A ``PipelineSession`` on ``boto_session`` that stages code under ``s3://<bucket>/<prefix>/``; steps built
    with it only record their requests (nothing runs until the pipeline does)."""
    return PipelineSession(boto_session=boto_session, default_bucket=bucket, default_bucket_prefix=prefix or None,
                           sagemaker_config=SDK_CONFIG)


def image_uri(framework: str, region: str, version: str, scope: str, *, py_version: str | None = None,
              instance_type: str = "ml.m5.xlarge", container_version: str | None = None) -> str:
    """An AWS Deep Learning Container image URI (from the SDK's bundled tables: no AWS call)."""
    return image_uris.retrieve(framework=framework, region=region, version=version, py_version=py_version,
                               instance_type=instance_type, image_scope=scope,
                               container_version=container_version)


def ignored(relative: Path) -> bool:
    return any(part in IGNORED_NAMES or part.endswith((".pyc", ".pyo")) for part in relative.parts)


def files_under(path: Path) -> list[Path]:
    """The files a code bundle holds: ``path`` itself, or every file under it but caches, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and not ignored(p.relative_to(path)))


def content_hash(paths: Iterable[str | Path]) -> str:
    """SHA-256 of files and directories by name and content only: not where they are, not their caches.

    Each entry hashes as its base name plus, for a directory, every file's relative path and bytes; entries are
    sorted, so neither the checkout location nor the argument order matters.
    """
    entries = []
    for raw in paths:
        text = str(raw)
        path = Path(text[len("file://"):] if text.lower().startswith("file://") else text)
        digest = hashlib.sha256()
        for file in files_under(path):
            relative = file.relative_to(path).as_posix() if path.is_dir() else ""
            digest.update(relative.encode() + b"\0")
            digest.update(file.read_bytes())
            digest.update(b"\0")
        entries.append(f"{path.name}:{digest.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


class _DropExpected(logging.Filter):
    """The compiler warns, for every step, that it drops fields (job names, ...) the execution sets anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Popping out")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Building and rendering without the SDK's expected chatter: its stdout prints (logged at DEBUG instead),
    its UserWarnings ("no job is started in a PipelineSession", ...) and the job-name warnings."""
    captured, expected = io.StringIO(), _DropExpected()
    loggers = [logging.getLogger(name) for name in ("sagemaker.core.workflow.utilities",
                                                     "sagemaker.mlops.workflow.model_step")]
    for logger in loggers:
        logger.addFilter(expected)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.filterwarnings("ignore", category=UserWarning, module=r"sagemaker(\..*)?$")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(expected)
        if captured.getvalue().strip():
            log.debug("SageMaker SDK output: %s", captured.getvalue().strip())


@contextlib.contextmanager
def deterministic_uploads(code_digest: str) -> Iterator[None]:
    """Within the block, the SDK names code uploads after content, not clocks or local paths.

    * ``ModelTrainer`` stages its code under ``<base_job_name>/<unique name>/input/``, the unique name carrying a
      timestamp: it becomes ``<base_job_name>-<code_digest[:10]>``.
    * The pipeline compiler's code hashes (the ``<pipeline>/code/<hash>/`` keys of processing code) hash absolute
      paths and ``__pycache__``: they become ``content_hash``.

    Both are module-level functions the SDK looks up at call time; they are restored on exit.
    """
    import sagemaker.core.workflow.utilities as workflow_utilities
    import sagemaker.train.model_trainer as model_trainer

    def unique_name(base: str, max_length: int = 63) -> str:
        suffix = f"-{code_digest[:10]}"
        return base.replace("_", "-")[: max_length - len(suffix)] + suffix

    saved = (model_trainer._get_unique_name, workflow_utilities.hash_files_or_dirs)
    model_trainer._get_unique_name = unique_name
    workflow_utilities.hash_files_or_dirs = content_hash
    try:
        yield
    finally:
        model_trainer._get_unique_name, workflow_utilities.hash_files_or_dirs = saved
