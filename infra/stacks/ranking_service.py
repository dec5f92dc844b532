"""RankingService: the ranking API (``serving/Dockerfile``) on ECS Fargate behind an internal ALB, with its Redis
feature store (ElastiCache), autoscaling, alarms and logs.

The image is built from the repository root with a tight context (only what the Dockerfile copies). Where Docker is
missing (the emulator deploy tests, these machines) the ``marketrank:api_image`` context names a pushed image
instead. The task role may only invoke this stage's endpoint and read its shadow report; Redis is reachable only
from the service's security group and its fill task's, over TLS, encrypted at rest with the stage key. The fill
task (``serving.materialize``) runs after each successful pipeline execution.
"""

from __future__ import annotations

import re
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_ecs_patterns as ecs_patterns
from aws_cdk import aws_elasticache as elasticache
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as events_targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from infra.config import StageConfig
from infra.nag import acknowledge
from infra.names import Names, partition
from infra.stacks import retention

ROOT = Path(__file__).resolve().parents[2]
#: The Docker build context is the repository root; everything but what serving/Dockerfile copies is left out (the
#: venv, workspace and cdk.out would otherwise be hashed and sent).
DOCKER_CONTEXT_EXCLUDE = ["*", "!pyproject.toml", "!README.md", "!serving/", "!training/", "!marketrank/",
                          "!pipelines/", "!infra/", "**/__pycache__", "**/*.pyc"]
API_PORT = 8080
LISTENER_PORT = 80
#: The ALB's idle timeout; the API's keep-alive (serving/Dockerfile) must outlast it, or the ALB answers 502.
ALB_IDLE_TIMEOUT_S = 60


#: A private ECR image: ``<account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:<tag>|@<digest>]``.
ECR_IMAGE = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                       r"(?P<repository>[a-z0-9._/-]+)(?::(?P<tag>[\w.-]+)|@(?P<digest>sha256:[0-9a-f]{64}))?")


def api_image(scope: Construct, image_uri: str | None) -> ecs.ContainerImage:
    """The API's image: built from serving/Dockerfile, or ``image_uri`` (``marketrank:api_image``). A private
    ECR image goes through its repository, so the task's execution role is granted the pull (an image named only
    by its URI gets no permissions, and the tasks would fail with CannotPullContainerError)."""
    if not image_uri:
        return ecs.ContainerImage.from_asset(str(ROOT), file="serving/Dockerfile", exclude=DOCKER_CONTEXT_EXCLUDE)
    ecr_image = ECR_IMAGE.fullmatch(image_uri)
    if ecr_image is None:
        return ecs.ContainerImage.from_registry(image_uri)
    region, name = ecr_image["region"], ecr_image["repository"]
    repository = ecr.Repository.from_repository_attributes(
        scope, "ApiRepository", repository_name=name,
        repository_arn=f"arn:{partition(region)}:ecr:{region}:{ecr_image['account']}:repository/{name}")
    return ecs.ContainerImage.from_ecr_repository(repository, ecr_image["digest"] or ecr_image["tag"] or "latest")


class RankingServiceStack(cdk.Stack):
    @property
    def availability_zones(self) -> list[str]:
        """The region's first two AZs, resolved by CloudFormation (Fn::GetAZs) at deploy time: CDK would otherwise
        look them up in the account at synth time."""
        return [cdk.Fn.select(index, cdk.Fn.get_azs()) for index in range(2)]

    def __init__(self, scope: Construct, construct_id: str, *, stage: StageConfig, key: kms.IKey,
                 alb_logs: s3.IBucket, alarm_topic: sns.ITopic, image_uri: str | None = None, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        names = Names(stage)
        log_retention = retention(stage.log_retention_days)

        self.vpc = ec2.Vpc(self, "Vpc", ip_addresses=ec2.IpAddresses.cidr(stage.vpc_cidr),
                           max_azs=2, nat_gateways=stage.nat_gateways, subnet_configuration=[
                               ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC),
                               ec2.SubnetConfiguration(name="app", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)])
        flow_logs = logs.LogGroup(self, "FlowLogs", retention=log_retention, removal_policy=cdk.RemovalPolicy.DESTROY)
        self.vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                              traffic_type=ec2.FlowLogTrafficType.REJECT)

        self.cluster = ecs.Cluster(self, "Cluster", vpc=self.vpc,
                                   container_insights_v2=ecs.ContainerInsights.ENABLED)

        # Task role: invoke this endpoint, nothing else (the feature store is reached over the network).
        task_role = iam.Role(self, "TaskRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                             description="marketrank ranking API: invoke and describe its endpoint only")
        # DescribeEndpoint: the API's readiness probe (serving.backends.SageMakerBackend.probe).
        task_role.add_to_policy(iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint", "sagemaker:DescribeEndpoint"],
                                                    resources=[names.endpoint_arn]))
        # The shadow report (one object, KMS-encrypted like its bucket): the API's shadow-agreement gauges.
        task_role.add_to_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=[
            f"arn:{partition(stage.region)}:s3:::{names.bucket('capture')}/{names.shadow_report_key}"]))
        key.grant_decrypt(task_role)
        task = ecs.FargateTaskDefinition(self, "Task", cpu=stage.api_cpu, memory_limit_mib=stage.api_memory_mib,
                                         task_role=task_role)
        self.api_logs = logs.LogGroup(self, "ApiLogs", retention=log_retention,
                                      removal_policy=cdk.RemovalPolicy.DESTROY)

        # Redis: TLS in transit, KMS at rest, a replica in the second AZ, reachable from the API's group only.
        redis_sg = ec2.SecurityGroup(self, "RedisSecurityGroup", vpc=self.vpc, allow_all_outbound=False,
                                     description="marketrank feature store: ingress from the ranking API only")
        subnets = elasticache.CfnSubnetGroup(
            self, "RedisSubnets", description="marketrank feature store (private subnets)",
            subnet_ids=self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids)
        self.redis = elasticache.CfnReplicationGroup(
            self, "Redis", replication_group_description=f"marketrank {stage.name} online features",
            engine="redis", engine_version="7.1", cache_node_type=stage.redis_node_type,
            num_cache_clusters=stage.redis_nodes, automatic_failover_enabled=True, multi_az_enabled=True,
            at_rest_encryption_enabled=True, kms_key_id=key.key_arn, transit_encryption_enabled=True,
            transit_encryption_mode="required", port=stage.redis_port, cache_subnet_group_name=subnets.ref,
            security_group_ids=[redis_sg.security_group_id], snapshot_retention_limit=1)
        # A stack deletion or a replacing change (its port, say) keeps a final snapshot instead of losing the store.
        self.redis.cfn_options.deletion_policy = cdk.CfnDeletionPolicy.SNAPSHOT
        self.redis.cfn_options.update_replace_policy = cdk.CfnDeletionPolicy.SNAPSHOT
        acknowledge(self.redis, "Access is network-only (the API's security group, TLS required); AUTH would need "
                    "a token in MARKETRANK_FEATURE_STORE, which the API reads as one URL.", "AwsSolutions-AEC6")
        feature_store = f"rediss://{self.redis.attr_primary_end_point_address}:{stage.redis_port}/0"

        image = api_image(self, image_uri)
        task.add_container(
            "Api", image=image, port_mappings=[ecs.PortMapping(container_port=API_PORT)],
            logging=ecs.LogDrivers.aws_logs(stream_prefix="api", log_group=self.api_logs),
            environment={"MARKETRANK_FEATURE_STORE": feature_store, "MARKETRANK_MODEL_BACKEND": "sagemaker",
                         "MARKETRANK_ENDPOINT_NAME": names.endpoint,
                         "MARKETRANK_SHADOW_REPORT": names.shadow_report_uri, "AWS_REGION": stage.region,
                         "AWS_DEFAULT_REGION": stage.region})
        acknowledge(task.obtain_execution_role(), "ecr:GetAuthorizationToken has no resource-level permissions; "
                    "image pulls are scoped to the API's repository.", "AwsSolutions-IAM5[Resource::*]")
        acknowledge(task, "The environment holds endpoint names and the cache address only, no secrets.",
                    "AwsSolutions-ECS2")

        self.service = ecs_patterns.ApplicationLoadBalancedFargateService(
            self, "Api", cluster=self.cluster, task_definition=task, desired_count=stage.api_desired_count,
            public_load_balancer=False, open_listener=False, listener_port=LISTENER_PORT,
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True), min_healthy_percent=100)
        alb = self.service.load_balancer
        # Callers are the marketplace's services inside the VPC.
        alb.connections.allow_from(ec2.Peer.ipv4(stage.vpc_cidr), ec2.Port.tcp(LISTENER_PORT),
                                   "marketplace services in the VPC")
        alb.log_access_logs(alb_logs, prefix=names.base)
        alb.set_attribute("routing.http.drop_invalid_header_fields.enabled", "true")
        alb.set_attribute("idle_timeout.timeout_seconds", str(ALB_IDLE_TIMEOUT_S))
        self.service.target_group.configure_health_check(path="/healthz", healthy_http_codes="200")
        redis_sg.add_ingress_rule(self.service.service.connections.security_groups[0],
                                  ec2.Port.tcp(stage.redis_port), "ranking API tasks")

        scaling = self.service.service.auto_scale_task_count(min_capacity=stage.api_desired_count,
                                                             max_capacity=stage.api_max_count)
        scaling.scale_on_cpu_utilization("Cpu", target_utilization_percent=60)
        # ALBRequestCountPerTarget is a per-minute sum per task: the stage sets requests per second.
        scaling.scale_on_request_count("Requests", requests_per_target=stage.api_requests_per_task_per_second * 60,
                                       target_group=self.service.target_group)

        target_group = self.service.target_group
        specs = {
            "Target5xx": (alb.metrics.http_code_target(elbv2.HttpCodeTarget.TARGET_5XX_COUNT,
                                                       period=cdk.Duration.minutes(1)), 0, "5xx from the API"),
            "LatencyP99": (target_group.metrics.target_response_time(statistic="p99", period=cdk.Duration.minutes(1)),
                           stage.api_latency_p99_ms / 1000, f"p99 latency above {stage.api_latency_p99_ms} ms"),
            "UnhealthyHosts": (target_group.metrics.unhealthy_host_count(period=cdk.Duration.minutes(1)), 0,
                               "unhealthy API tasks"),
        }
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for alarm_id, (metric, threshold, what) in specs.items():
            self.alarms[alarm_id] = cloudwatch.Alarm(
                self, alarm_id, alarm_name=f"{names.base}-api-{alarm_id.lower()}", metric=metric, threshold=threshold,
                evaluation_periods=5, datapoints_to_alarm=3,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"{names.base} ranking API: {what} (3 of 5 minutes)")
            self.alarms[alarm_id].add_alarm_action(cloudwatch_actions.SnsAction(alarm_topic))
        self.materialize = self._materialize_task(names, stage, key, image, feature_store, redis_sg, log_retention)
        cdk.CfnOutput(self, "ApiUrl", value=f"http://{alb.load_balancer_dns_name}")
        cdk.CfnOutput(self, "RedisAddress", value=self.redis.attr_primary_end_point_address)

    def _materialize_task(self, names: Names, stage: StageConfig, key: kms.IKey, image: ecs.ContainerImage,
                          feature_store: str, redis_sg: ec2.SecurityGroup,
                          log_retention: logs.RetentionDays) -> ecs.FargateTaskDefinition:
        """The task that fills Redis (``python -m serving.materialize``, the API's image): started by EventBridge after
        each successful pipeline execution, and by hand with ``aws ecs run-task`` (README, "Filling the feature store
        in AWS")."""
        config = names.pipeline_config()
        artifacts = f"arn:{partition(stage.region)}:s3:::{config.bucket}"
        role = iam.Role(self, "MaterializeRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
                        description="marketrank feature store fill: read the pipeline's features and the champion")
        executions = f"{config.prefix}/executions/*"
        role.add_to_policy(iam.PolicyStatement(sid="ListFeatures", actions=["s3:ListBucket"], resources=[artifacts],
                                               conditions={"StringLike": {"s3:prefix": [executions]}}))
        role.add_to_policy(iam.PolicyStatement(sid="ReadFeaturesAndChampion", actions=["s3:GetObject"], resources=[
            f"{artifacts}/{executions}", f"{artifacts}/{names.champion_object_uri.split('/', 3)[3]}"]))
        key.grant_decrypt(role)
        acknowledge(role, "Feature job outputs are written per pipeline execution under this prefix.",
                    f"AwsSolutions-IAM5[Resource::{artifacts}/{executions}]")
        task = ecs.FargateTaskDefinition(self, "MaterializeTask", cpu=512, memory_limit_mib=2048, task_role=role)
        task.add_container(
            "Materialize", image=image, command=["python", "-m", "serving.materialize"],
            logging=ecs.LogDrivers.aws_logs(stream_prefix="materialize", log_group=logs.LogGroup(
                self, "MaterializeLogs", retention=log_retention, removal_policy=cdk.RemovalPolicy.DESTROY)),
            environment={"MARKETRANK_FEATURE_STORE": feature_store,
                         "MARKETRANK_CHAMPION_URI": names.champion_object_uri,
                         "AWS_REGION": stage.region, "AWS_DEFAULT_REGION": stage.region})
        acknowledge(task.obtain_execution_role(), "ecr:GetAuthorizationToken has no resource-level permissions; "
                    "image pulls are scoped to the API's repository.", "AwsSolutions-IAM5[Resource::*]")
        acknowledge(task, "The environment holds the cache address and an S3 URI only, no secrets.",
                    "AwsSolutions-ECS2")
        group = ec2.SecurityGroup(self, "MaterializeSecurityGroup", vpc=self.vpc,
                                  description="marketrank feature store fill task: Redis, and S3 through the NAT")
        redis_sg.add_ingress_rule(group, ec2.Port.tcp(stage.redis_port), "feature store fill task")
        # After every successful pipeline execution: the newest features (fresh counters) with the live champion's
        # spec. SageMaker lower-cases the pipeline's name in its ARN.
        runner = iam.Role(self, "MaterializeRunRole", assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
                          description="EventBridge: run the feature store fill task after a pipeline execution")
        cluster_id = self.resolve(self.get_logical_id(self.cluster.node.default_child))
        acknowledge(runner, "EventBridge tags the tasks it starts; their ids are known only at run time, within "
                    "this cluster.", f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ecs:{stage.region}:*:task/"
                    f"<{cluster_id}>/*]")
        events.Rule(self, "MaterializeAfterPipeline", description=f"{names.pipeline}: refill the feature store",
                    event_pattern=events.EventPattern(
                        source=["aws.sagemaker"],
                        detail_type=["SageMaker Model Building Pipeline Execution Status Change"],
                        detail={"currentPipelineExecutionStatus": ["Succeeded"],
                                "pipelineArn": [{"suffix": f":pipeline/{names.pipeline.lower()}"}]}),
                    targets=[events_targets.EcsTask(
                        cluster=self.cluster, task_definition=task, security_groups=[group], role=runner,
                        subnet_selection=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                        container_overrides=[events_targets.ContainerOverride(
                            container_name="Materialize", command=[
                                "python", "-m", "serving.materialize", "--executions", f"{config.base_uri}/executions",
                                # the execution that succeeded, not whichever wrote features last
                                "--execution", events.EventField.from_path("$.detail.pipelineExecutionArn")])],
                        retry_attempts=2)])
        subnets = self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS).subnet_ids
        cdk.CfnOutput(self, "MaterializeTaskDefinition", value=task.task_definition_arn)
        cdk.CfnOutput(self, "MaterializeNetwork", value=cdk.Fn.join("", [
            "awsvpcConfiguration={subnets=[", cdk.Fn.join(",", subnets), "],securityGroups=[",
            group.security_group_id, "],assignPublicIp=DISABLED}"]))
        cdk.CfnOutput(self, "ClusterName", value=self.cluster.cluster_name)
        return task

