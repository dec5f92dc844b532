"""Physical names of the resources other code must find, derived from the stage: one home for them.

The pipeline definition is rendered at synth time by the SageMaker SDK (``pipelines.definition.definition_json``),
which needs concrete strings (a CDK token cannot pass through the SDK), and ``marketrank pipeline upsert`` in CI
must render the very same definition. Deterministic names give both the same ``PipelineConfig`` without reading
stack outputs, so the template's definition and the upserted one are byte-identical.

``python -m infra.names [--stage prod]`` prints the ``MARKETRANK_*`` variables of ``PipelineConfig.from_env`` (what
the deploy workflow appends to ``$GITHUB_ENV``); ``--deploy-role`` prints the GitHub deploy role's ARN instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from infra.config import StageConfig, stage_config
from pipelines.definition import PipelineConfig

CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"
#: Everything the pipeline reads and writes lives under this prefix of the artifacts bucket.
PIPELINE_PREFIX = "marketrank"
#: Shadow reports live under this prefix of the capture bucket, beside the capture they summarise.
SHADOW_REPORT_PREFIX = "shadow-reports"
#: The endpoint's data capture lives under this prefix of the capture bucket.
DATA_CAPTURE_PREFIX = "data-capture"
#: The bucket kinds of the Data stack (``Names.bucket``).
BUCKETS = ("raw", "features", "artifacts", "capture", "access-logs", "alb-logs")


def partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    return "aws-us-gov" if region.startswith("us-gov-") else "aws"


@dataclasses.dataclass(frozen=True)
class Names:
    stage: StageConfig

    @property
    def base(self) -> str:
        return f"marketrank-{self.stage.name}"

    def arn(self, service: str, resource: str, *, region: bool = True) -> str:
        s = self.stage
        return f"arn:{partition(s.region)}:{service}:{s.region if region else ''}:{s.account}:{resource}"

    def bucket(self, kind: str) -> str:
        """Globally unique: stage, kind, account and region (at most 63 characters)."""
        if kind not in BUCKETS:
            raise ValueError(f"unknown bucket kind {kind!r}; expected one of {BUCKETS}")
        return f"{self.base}-{kind}-{self.stage.account}-{self.stage.region}"

    @property
    def kms_alias(self) -> str:
        return f"alias/{self.base}"

    @property
    def kms_alias_arn(self) -> str:
        """The stage key by its alias: SageMaker takes it wherever a KmsKeyId goes (the stack passes the key's ARN)."""
        return self.arn("kms", self.kms_alias)

    @property
    def data_capture_uri(self) -> str:
        return f"s3://{self.bucket('capture')}/{DATA_CAPTURE_PREFIX}"

    @property
    def alarm_topic(self) -> str:
        return f"{self.base}-alarms"

    @property
    def sagemaker_role(self) -> str:
        return f"{self.base}-sagemaker"

    @property
    def sagemaker_role_arn(self) -> str:
        return self.arn("iam", f"role/{self.sagemaker_role}", region=False)

    @property
    def deploy_function(self) -> str:
        return f"{self.base}-deploy"

    @property
    def deploy_function_arn(self) -> str:
        return self.arn("lambda", f"function:{self.deploy_function}")

    @property
    def github_deploy_role(self) -> str:
        return f"{self.base}-github-deploy"

    @property
    def github_deploy_role_arn(self) -> str:
        return self.arn("iam", f"role/{self.github_deploy_role}", region=False)

    @property
    def pipeline(self) -> str:
        return self.base

    @property
    def model_package_group(self) -> str:
        return self.base

    @property
    def endpoint(self) -> str:
        return self.base

    @property
    def endpoint_arn(self) -> str:
        return self.arn("sagemaker", f"endpoint/{self.endpoint}")

    @property
    def shadow_report_key(self) -> str:
        """Key in the capture bucket of the endpoint's shadow report (``marketrank shadow report --out``
        publishes it; the ranking API's shadow-agreement gauges read it)."""
        return f"{SHADOW_REPORT_PREFIX}/{self.endpoint}/latest.json"

    @property
    def shadow_report_uri(self) -> str:
        return f"s3://{self.bucket('capture')}/{self.shadow_report_key}"

    @property
    def mlflow_server(self) -> str:
        return f"{self.base}-mlflow"

    @property
    def mlflow_server_arn(self) -> str:
        return self.arn("sagemaker", f"mlflow-tracking-server/{self.mlflow_server}")

    @property
    def champion_parameter(self) -> str:
        """SSM parameter the deploy Lambda keeps at the live champion's model data URL (``none`` before one)."""
        return f"/marketrank/{self.stage.name}/champion-model-data-url"

    @property
    def previous_parameter(self) -> str:
        """The champion before the last promotion, as a variant tag value (``none`` when there is none): the
        rollback target, kept outside the EndpointConfig too, whose tag a `cdk deploy`'s config does not carry."""
        return f"/marketrank/{self.stage.name}/previous-production-variant"

    @property
    def challenger_parameter(self) -> str:
        """The shadow challenger's model data URL (``none`` when there is none) for the stack's baseline config."""
        return f"/marketrank/{self.stage.name}/challenger-model-data-url"

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(name=self.pipeline, region=self.stage.region, role_arn=self.sagemaker_role_arn,
                              bucket=self.bucket("artifacts"), prefix=PIPELINE_PREFIX,
                              model_package_group=self.model_package_group,
                              deploy_lambda_arn=self.deploy_function_arn, endpoint_name=self.endpoint,
                              processing_instance_type=self.stage.processing_instance_type,
                              training_instance_type=self.stage.training_instance_type,
                              shadow_sampling_percentage=self.stage.shadow_sampling_percentage,
                              endpoint_instance_type=self.stage.endpoint_instance_type,
                              mlflow_tracking_server_arn=self.mlflow_server_arn,
                              spark_image_uri=self.stage.spark_image_uri)

    @property
    def champion_object_uri(self) -> str:
        """The object the deploy Lambda copies the live champion's artifact to (``CHAMPION_URI``): inside the
        prefix the pipeline's Evaluate step mounts as the champion (``PipelineConfig.champion_uri``)."""
        return f"{self.pipeline_config().champion_uri}model.tar.gz"

    def deploy_environment(self, kms_key_id: str | None = None) -> dict[str, str]:
        """The deploy handler's environment (``pipelines.deploy_lambda``): the Lambda's, set by the MlPlatform
        stack, and the CLI's ``endpoint promote|reject|rollback --target sagemaker``, so a change made from a
        laptop creates the same configs (data capture, KMS) and moves the same parameters as the Lambda."""
        return {
            "MODEL_EXECUTION_ROLE_ARN": self.sagemaker_role_arn,
            "INSTANCE_TYPE": self.stage.endpoint_instance_type,
            "INSTANCE_COUNT": str(self.stage.endpoint_instance_count),
            "DATA_CAPTURE_URI": self.data_capture_uri,
            "KMS_KEY_ID": kms_key_id or self.kms_alias_arn,
            "CHAMPION_PARAMETER": self.champion_parameter,
            "CHALLENGER_PARAMETER": self.challenger_parameter,
            "PREVIOUS_PARAMETER": self.previous_parameter,
            "CREATE_ENDPOINT": "false",  # the Serving stack creates the endpoint; the handler changes variants
            "CHAMPION_URI": self.champion_object_uri,
            "ENDPOINT_NAME": self.endpoint,
        }

    def pipeline_env(self) -> dict[str, str]:
        """``PipelineConfig.from_env`` variables that reproduce ``pipeline_config()``."""
        config = self.pipeline_config()
        return {var: str(getattr(config, field)) for field, var in PipelineConfig.ENV.items()}


def cdk_context(path: Path = CDK_JSON) -> dict[str, Any]:
    return json.loads(path.read_text())["context"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", help="stage from cdk.json (default: its marketrank:stage)")
    parser.add_argument("--deploy-role", action="store_true", help="print the GitHub deploy role ARN")
    args = parser.parse_args(argv)
    names = Names(stage_config(cdk_context(), args.stage))
    if args.deploy_role:
        print(names.github_deploy_role_arn)
        return
    for key, value in names.pipeline_env().items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
