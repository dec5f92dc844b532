"""Stage settings for the CDK app, read from ``cdk.json`` context: data, never hard-coded in stacks.

``cdk deploy -c marketrank:stage=prod`` picks a stage; an unknown stage or a missing setting is an error that
names it, never a silent default.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

STAGE_KEY = "marketrank:stage"
STAGES_KEY = "marketrank:stages"
#: Optional context: an image URI for the ranking API instead of building ``serving/Dockerfile`` (no Docker needed:
#: the emulator deploy tests and machines without Docker use it).
API_IMAGE_KEY = "marketrank:api_image"

#: The retention periods CloudWatch Logs accepts.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                      3288, 3653)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str
    account: str
    region: str
    # SageMaker endpoint (champion + shadow challenger)
    endpoint_instance_type: str
    endpoint_instance_count: int
    endpoint_max_instance_count: int
    endpoint_invocations_per_instance: int  # target-tracking target (SageMakerVariantInvocationsPerInstance)
    endpoint_latency_p99_ms: int  # ModelLatency alarm threshold
    training_instance_type: str
    processing_instance_type: str
    shadow_sampling_percentage: float
    # Ranking API (ECS Fargate) and its Redis feature store
    api_desired_count: int
    api_max_count: int
    api_cpu: int
    api_memory_mib: int
    #: Scale out above this many requests per second per task (ALBRequestCountPerTarget, a per-minute sum, x 60).
    api_requests_per_task_per_second: int
    api_latency_p99_ms: int
    redis_node_type: str
    redis_nodes: int  # primary + replicas; >= 2 for Multi-AZ failover
    redis_port: int
    vpc_cidr: str
    nat_gateways: int
    log_retention_days: int
    mlflow_server_size: str  # Small | Medium | Large
    #: Who the alarms notify (e-mail subscriptions to the stage's alarm topic; other subscribers, such as a
    #: paging tool, subscribe to the topic themselves).
    alarm_emails: list[str]
    # CI/CD: GitHub OIDC trust and the CDK bootstrap the deploy role may use
    github_repo: str  # owner/name
    deploy_branch: str
    cdk_qualifier: str
    #: Optional: the feature job's Spark image where the stage's VPC has no egress to PyPI (README, PrepareFeatures);
    #: "" = SageMaker's Spark image, which pip-installs pyarrow and pandas 2 at start.
    spark_image_uri: str = ""

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"stage {self.name!r}: {message}")

        if not (self.account.isdigit() and len(self.account) == 12):
            fail(f"account must be 12 digits, got {self.account!r}")
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", self.region):
            fail(f"region must look like eu-west-1, got {self.region!r}")
        if not 0 < self.shadow_sampling_percentage <= 100:
            fail("shadow_sampling_percentage must be in (0, 100]")
        if self.endpoint_instance_count < 1 or self.api_desired_count < 1:
            fail("instance and task counts must be >= 1")
        if self.endpoint_max_instance_count < self.endpoint_instance_count:
            fail("endpoint_max_instance_count must be >= endpoint_instance_count")
        if self.api_max_count < self.api_desired_count:
            fail("api_max_count must be >= api_desired_count")
        if self.redis_nodes < 2:
            fail("redis_nodes must be >= 2 (a replica in a second AZ for failover)")
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            fail(f"log_retention_days must be one of {LOG_RETENTION_DAYS}, got {self.log_retention_days}")
        if self.mlflow_server_size not in ("Small", "Medium", "Large"):
            fail(f"mlflow_server_size must be Small, Medium or Large, got {self.mlflow_server_size!r}")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.github_repo):
            fail(f"github_repo must be owner/name, got {self.github_repo!r}")
        if not re.fullmatch(r"\d+\.\d+\.\d+\.\d+/(1[6-9]|2[0-4])", self.vpc_cidr):
            fail(f"vpc_cidr must be an IPv4 /16../24 block, got {self.vpc_cidr!r}")
        if not isinstance(self.alarm_emails, (list, tuple)):
            fail(f"alarm_emails must be a list of e-mail addresses, got {self.alarm_emails!r}")
        bad = [e for e in self.alarm_emails if not isinstance(e, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+\.\w+", e)]
        if bad:
            fail(f"alarm_emails must be a list of e-mail addresses, got {bad!r}")
        if self.spark_image_uri and not re.fullmatch(
                r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[^:@]+[:@].+", self.spark_image_uri):
            fail(f"spark_image_uri must be an ECR image URI with a tag or digest "
                 f"(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>), got {self.spark_image_uri!r}")
        if self.nat_gateways < 1:
            fail("nat_gateways must be >= 1 (the private subnets reach SageMaker and ECR through it)")


def stage_config(context: Mapping[str, Any], stage: str | None = None) -> StageConfig:
    """The named stage (default: the ``marketrank:stage`` context value) from ``marketrank:stages``."""
    stages = context.get(STAGES_KEY)
    if not isinstance(stages, Mapping) or not stages:
        raise ValueError(f"cdk.json context has no {STAGES_KEY!r} mapping")
    name = stage or context.get(STAGE_KEY)
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; cdk.json defines {sorted(stages)}")
    settings = dict(stages[name])
    fields = {f.name for f in dataclasses.fields(StageConfig)} - {"name"}
    optional = {f.name for f in dataclasses.fields(StageConfig) if f.default is not dataclasses.MISSING}
    missing, unknown = sorted(fields - optional - set(settings)), sorted(set(settings) - fields)
    if missing or unknown:
        raise ValueError(f"stage {name!r}: missing settings {missing}, unknown settings {unknown}")
    return StageConfig(name=name, **settings)
