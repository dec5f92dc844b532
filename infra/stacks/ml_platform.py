"""MlPlatform: the SageMaker execution role, the model package group, the MLflow tracking server, the champion
parameters, the deploy Lambda and the SageMaker Pipeline itself.

The pipeline is ``AWS::SageMaker::Pipeline`` whose body is ``pipelines.definition.definition_json`` rendered at synth
time for ``Names.pipeline_config()``: concrete names, not tokens, because the SDK renders strings, and because
``marketrank pipeline upsert`` (run by CI right after ``cdk deploy``) renders the same config to the same bytes, so
the two never drift. The step code the definition points at (content-derived keys under the artifacts bucket) is
uploaded by that upsert; ``cdk deploy`` alone does not stage it. A BucketDeployment would, but it needs a Lambda
custom resource (an awscli layer, more IAM, and neither emulator runs it), for code that upsert uploads anyway.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as events_targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from infra.config import StageConfig
from infra.images import Images, repository_arn
from infra.lambda_bundle import HANDLER, deploy_lambda_code
from infra.nag import acknowledge
from infra.names import DATA_CAPTURE_PREFIX, PIPELINE_PREFIX, Names, partition
from infra.stacks import retention
from pipelines.deploy_lambda import NO_MODEL


def image_repositories(images: Images, stage: StageConfig) -> list[str]:
    """The ECR repositories the jobs pull from: SageMaker's images, and the stage's own Spark image if it has one."""
    return sorted({*images.repository_arns(), *([repository_arn(stage.spark_image_uri)] if stage.spark_image_uri
                                                 else [])})


#: The MLflow tracking server's artifact store: this prefix of the artifacts bucket.
MLFLOW_PREFIX = "mlflow"
#: ``pipelines.definition.upsert``'s description: the same, so an upsert after ``cdk deploy`` changes nothing.
PIPELINE_DESCRIPTION = "marketrank: features -> train -> evaluate -> quality gate -> register -> shadow deploy"


class MlPlatformStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, stage: StageConfig, key: kms.IKey, images: Images,
                 pipeline_definition: str, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        names = Names(stage)
        artifacts, raw, features, capture = (names.bucket(k) for k in ("artifacts", "raw", "features", "capture"))

        def s3_arn(bucket: str, key: str = "") -> str:
            return f"arn:{partition(stage.region)}:s3:::{bucket}" + (f"/{key}" if key else "")

        self.data_capture_uri = names.data_capture_uri

        # ---- SageMaker execution role: the pipeline's steps, the pipeline itself (upsert passes one role for both,
        # so a separate pipeline role would be replaced by this one on every upsert), and the endpoint's models.
        self.execution_role = iam.Role(self, "ExecutionRole", role_name=names.sagemaker_role,
                                       assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                                       description="marketrank SageMaker jobs, pipeline and endpoint models")
        role = self.execution_role
        pipeline_data = f"{PIPELINE_PREFIX}/*"
        role.add_to_policy(iam.PolicyStatement(sid="ListOwnBuckets", actions=["s3:ListBucket", "s3:GetBucketLocation"],
                                               resources=[s3_arn(b) for b in (artifacts, raw, features, capture)]))
        role.add_to_policy(iam.PolicyStatement(sid="ReadRawAndCapture", actions=["s3:GetObject"],
                                               resources=[s3_arn(raw, "*"), s3_arn(capture, "*")]))
        capture_objects = s3_arn(capture, f"{DATA_CAPTURE_PREFIX}/*")
        role.add_to_policy(iam.PolicyStatement(sid="WriteDataCapture", actions=["s3:PutObject"],
                                               resources=[capture_objects]))
        # The MLflow artifact store too: the training job's MLflow client uploads the run's artifacts (the model,
        # its feature spec) straight to it with this role's credentials, not through the tracking server's role.
        role.add_to_policy(iam.PolicyStatement(
            sid="ReadWritePipelineData", actions=["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
            resources=[s3_arn(artifacts, pipeline_data), s3_arn(features, "*"),
                       s3_arn(artifacts, f"{MLFLOW_PREFIX}/*")]))
        key.grant_encrypt_decrypt(role)
        role.add_to_policy(iam.PolicyStatement(
            sid="PullSageMakerImages",
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=image_repositories(images, stage)))
        role.add_to_policy(iam.PolicyStatement(sid="EcrLogin", actions=["ecr:GetAuthorizationToken"],
                                               resources=["*"]))
        log_groups = [names.arn("logs", f"log-group:/aws/sagemaker/{group}:*")
                      for group in ("ProcessingJobs", "TrainingJobs", f"Endpoints/{names.endpoint}")]
        role.add_to_policy(iam.PolicyStatement(
            sid="OwnLogGroups", resources=log_groups,
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]))
        role.add_to_policy(iam.PolicyStatement(
            sid="SageMakerMetrics", actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}}))
        jobs = [names.arn("sagemaker", f"{kind}/*") for kind in ("processing-job", "training-job")]
        role.add_to_policy(iam.PolicyStatement(
            sid="PipelineJobs", resources=jobs,
            actions=["sagemaker:CreateProcessingJob", "sagemaker:DescribeProcessingJob",
                     "sagemaker:StopProcessingJob", "sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob",
                     "sagemaker:StopTrainingJob", "sagemaker:AddTags"]))
        experiments = [names.arn("sagemaker", f"{kind}/*")
                       for kind in ("experiment", "experiment-trial", "experiment-trial-component")]
        role.add_to_policy(iam.PolicyStatement(
            sid="PipelineExperiments", resources=experiments,
            actions=["sagemaker:CreateExperiment", "sagemaker:CreateTrial", "sagemaker:CreateTrialComponent",
                     "sagemaker:AssociateTrialComponent", "sagemaker:DescribeExperiment", "sagemaker:DescribeTrial",
                     "sagemaker:DescribeTrialComponent", "sagemaker:UpdateTrialComponent", "sagemaker:AddTags"]))
        group_arn = names.arn("sagemaker", f"model-package-group/{names.model_package_group}")
        packages_arn = names.arn("sagemaker", f"model-package/{names.model_package_group}/*")
        role.add_to_policy(iam.PolicyStatement(
            sid="ModelRegistry", resources=[group_arn, packages_arn],
            actions=["sagemaker:CreateModelPackage", "sagemaker:DescribeModelPackage",
                     "sagemaker:DescribeModelPackageGroup", "sagemaker:ListModelPackages",
                     "sagemaker:UpdateModelPackage", "sagemaker:AddTags"]))
        role.add_to_policy(iam.PolicyStatement(sid="InvokeDeployStep", actions=["lambda:InvokeFunction"],
                                               resources=[names.deploy_function_arn]))
        role.add_to_policy(iam.PolicyStatement(
            sid="PassSelfToJobs", actions=["iam:PassRole"], resources=[names.sagemaker_role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        mlflow_arn = names.mlflow_server_arn
        role.add_to_policy(iam.PolicyStatement(
            sid="TrackExperiments", resources=[mlflow_arn],
            actions=["sagemaker-mlflow:*", "sagemaker:DescribeMlflowTrackingServer",
                     "sagemaker:CreatePresignedMlflowTrackingServerUrl"]))
        acknowledge(role, "Scoped to this stage's prefixes and bucket names; object keys beneath are run-specific.",
                    f"AwsSolutions-IAM5[Resource::{s3_arn(artifacts, pipeline_data)}]",
                    *(f"AwsSolutions-IAM5[Resource::{s3_arn(b, '*')}]" for b in (raw, features, capture)),
                    f"AwsSolutions-IAM5[Resource::{capture_objects}]",
                    f"AwsSolutions-IAM5[Resource::{s3_arn(artifacts, MLFLOW_PREFIX + '/*')}]")
        acknowledge(role, "GetAuthorizationToken has no resource-level permissions in IAM; image pulls are scoped "
                    "to the SageMaker image repositories (and the stage's own Spark image's).",
                    "AwsSolutions-IAM5[Resource::*]")
        acknowledge(role, "Log streams are named per job and instance at run time; the groups are SageMaker's own "
                    "for jobs and this endpoint.", *(f"AwsSolutions-IAM5[Resource::{arn}]" for arn in log_groups))
        acknowledge(role, "The pipeline service names jobs, experiments and trials per execution "
                    "(pipelines-<execution id>-<step>-...); the ARNs are scoped to this account and region.",
                    *(f"AwsSolutions-IAM5[Resource::{arn}]" for arn in jobs + experiments))
        acknowledge(role, "Package versions are numbered by the registry; scoped to this stage's group.",
                    f"AwsSolutions-IAM5[Resource::{packages_arn}]")
        acknowledge(role, "MLflow's data-plane actions (runs, metrics, models) are all needed to log training, "
                    "and they are scoped to this stage's tracking server.",
                    "AwsSolutions-IAM5[Action::sagemaker-mlflow:*]")
        key_ack = "KMS grants for this stage's key only: S3 SSE-KMS data keys need kms:GenerateDataKey* and ReEncrypt*."
        acknowledge(role, key_ack, "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]",
                    "AwsSolutions-IAM5[Action::kms:ReEncrypt*]")

        # ---- Model registry and experiment tracking.
        self.model_package_group = sagemaker.CfnModelPackageGroup(
            self, "ModelPackageGroup", model_package_group_name=names.model_package_group,
            model_package_group_description=f"marketrank {stage.name}: TF-Ranking models that passed the gate")
        mlflow_role = iam.Role(self, "MlflowRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                               description="marketrank MLflow tracking server: its artifact store only")
        mlflow_role.add_to_policy(iam.PolicyStatement(
            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            resources=[s3_arn(artifacts, f"{MLFLOW_PREFIX}/*")]))
        mlflow_role.add_to_policy(iam.PolicyStatement(actions=["s3:ListBucket", "s3:GetBucketLocation"],
                                                      resources=[s3_arn(artifacts)]))
        key.grant_encrypt_decrypt(mlflow_role)
        acknowledge(mlflow_role, "The MLflow artifact store is this prefix of the artifacts bucket; objects are "
                    "named per run.", f"AwsSolutions-IAM5[Resource::{s3_arn(artifacts, MLFLOW_PREFIX + '/*')}]")
        acknowledge(mlflow_role, key_ack, "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]",
                    "AwsSolutions-IAM5[Action::kms:ReEncrypt*]")
        self.mlflow = sagemaker.CfnMlflowTrackingServer(
            self, "Mlflow", tracking_server_name=names.mlflow_server, role_arn=mlflow_role.role_arn,
            artifact_store_uri=f"s3://{artifacts}/{MLFLOW_PREFIX}", tracking_server_size=stage.mlflow_server_size,
            automatic_model_registration=False)
        self.mlflow.node.add_dependency(mlflow_role)
        # Run history and registered models outlive the stack (and a group holding versions cannot be deleted).
        for kept in (self.mlflow, self.model_package_group):
            kept.cfn_options.deletion_policy = cdk.CfnDeletionPolicy.RETAIN
            kept.cfn_options.update_replace_policy = cdk.CfnDeletionPolicy.RETAIN

        # ---- Champion and challenger: the deploy Lambda keeps them at the live variants' model data URLs and the
        # Serving stack reads them at deploy time, so `cdk deploy` redeploys what is live and never rolls it back.
        # CloudFormation only writes Value when this resource changes: keep its properties (tags included: the
        # app's stage tag skips SSM parameters) stable, or a deploy would reset them to NO_MODEL.
        self.champion_parameter = ssm.StringParameter(
            self, "ChampionParameter", parameter_name=names.champion_parameter, string_value=NO_MODEL,
            description="Live champion's model data URL (maintained by the deploy Lambda)")
        self.challenger_parameter = ssm.StringParameter(
            self, "ChallengerParameter", parameter_name=names.challenger_parameter, string_value=NO_MODEL,
            description="Shadow challenger's model data URL, or none")
        self.previous_parameter = ssm.StringParameter(
            self, "PreviousParameter", parameter_name=names.previous_parameter, string_value=NO_MODEL,
            description="Champion before the last promotion (the rollback target), or none")

        # ---- Deploy Lambda: the pipeline's DeployShadow step, promote / rollback automation.
        self.deploy_log_group = logs.LogGroup(self, "DeployLogs", log_group_name=f"/aws/lambda/{names.deploy_function}",
                                              retention=retention(stage.log_retention_days),
                                              removal_policy=cdk.RemovalPolicy.DESTROY)
        deploy_role = iam.Role(self, "DeployRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                               description="marketrank deploy Lambda: this endpoint, its configs and models")
        deploy_logs = names.arn("logs", f"log-group:/aws/lambda/{names.deploy_function}:*")
        deploy_role.add_to_policy(iam.PolicyStatement(sid="Logs", actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                                                      resources=[deploy_logs]))
        endpoint_configs = names.arn("sagemaker", f"endpoint-config/{names.endpoint}-*")
        lambda_models = names.arn("sagemaker", f"model/{names.model_package_group}-v*")
        any_model = names.arn("sagemaker", "model/*")
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="Endpoint", resources=[names.endpoint_arn],
            actions=["sagemaker:DescribeEndpoint", "sagemaker:UpdateEndpoint", "sagemaker:AddTags"]))
        # UpdateEndpoint is also authorised on the config it switches to (AWS CDK's own SageMakerUpdateEndpoint
        # task grants both): only this handler's configs.
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="UpdateToOwnConfigs", resources=[endpoint_configs], actions=["sagemaker:UpdateEndpoint"]))
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="EndpointConfigs", resources=[endpoint_configs],
            actions=["sagemaker:DescribeEndpointConfig", "sagemaker:CreateEndpointConfig", "sagemaker:ListTags",
                     "sagemaker:AddTags"]))
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="CreateModels", resources=[lambda_models],
            actions=["sagemaker:CreateModel", "sagemaker:DescribeModel", "sagemaker:AddTags"]))
        # The live champion may be the Serving stack's model, and the live config the Serving stack's, whose names
        # CloudFormation generates: read-only on those.
        any_config = names.arn("sagemaker", "endpoint-config/*")
        deploy_role.add_to_policy(iam.PolicyStatement(sid="DescribeModels", actions=["sagemaker:DescribeModel"],
                                                      resources=[any_model]))
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="ReadLiveConfig", actions=["sagemaker:DescribeEndpointConfig", "sagemaker:ListTags"],
            resources=[any_config]))
        deploy_role.add_to_policy(iam.PolicyStatement(sid="ReadPackages", actions=["sagemaker:DescribeModelPackage"],
                                                      resources=[packages_arn]))
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="PassModelRole", actions=["iam:PassRole"], resources=[names.sagemaker_role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        deploy_role.add_to_policy(iam.PolicyStatement(
            sid="PublishModels", actions=["ssm:PutParameter"],
            resources=[self.champion_parameter.parameter_arn, self.challenger_parameter.parameter_arn,
                       self.previous_parameter.parameter_arn]))
        deploy_role.add_to_policy(iam.PolicyStatement(sid="ReadRollbackTarget", actions=["ssm:GetParameter"],
                                                      resources=[self.previous_parameter.parameter_arn]))
        champion_key = names.champion_object_uri[len(f"s3://{artifacts}/"):]
        deploy_role.add_to_policy(iam.PolicyStatement(sid="ReadModelArtifacts", actions=["s3:GetObject"],
                                                      resources=[s3_arn(artifacts, pipeline_data)]))
        deploy_role.add_to_policy(iam.PolicyStatement(sid="WriteChampionObject", actions=["s3:PutObject"],
                                                      resources=[s3_arn(artifacts, champion_key)]))
        key.grant_encrypt_decrypt(deploy_role)
        key.grant(deploy_role, "kms:CreateGrant", "kms:DescribeKey")  # endpoint configs with KmsKeyId
        acknowledge(deploy_role, "Endpoint configs are named <endpoint>-<state hash> and models "
                    "<package group>-v<version> by pipelines/deploy.py; scoped to those prefixes.",
                    f"AwsSolutions-IAM5[Resource::{endpoint_configs}]", f"AwsSolutions-IAM5[Resource::{lambda_models}]")
        acknowledge(deploy_role, "Read-only DescribeModel: the live champion may be the Serving stack's model, whose "
                    "name CloudFormation generates.", f"AwsSolutions-IAM5[Resource::{any_model}]")
        acknowledge(deploy_role, "Read-only DescribeEndpointConfig/ListTags: after a cdk deploy the live config is "
                    "the Serving stack's, whose name CloudFormation generates.",
                    f"AwsSolutions-IAM5[Resource::{any_config}]")
        acknowledge(deploy_role, "Package versions are numbered by the registry; scoped to this stage's group.",
                    f"AwsSolutions-IAM5[Resource::{packages_arn}]")
        acknowledge(deploy_role, "Model artifacts sit under per-execution keys of the pipeline prefix.",
                    f"AwsSolutions-IAM5[Resource::{s3_arn(artifacts, pipeline_data)}]")
        acknowledge(deploy_role, "Log streams are created per Lambda instance in this function's own log group.",
                    f"AwsSolutions-IAM5[Resource::{deploy_logs}]")
        acknowledge(deploy_role, key_ack, "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]",
                    "AwsSolutions-IAM5[Action::kms:ReEncrypt*]")

        self.deploy_function = lambda_.Function(
            self, "DeployFunction", function_name=names.deploy_function, runtime=lambda_.Runtime.PYTHON_3_14,
            handler=HANDLER, code=lambda_.Code.from_asset(str(deploy_lambda_code())), role=deploy_role,
            log_group=self.deploy_log_group, timeout=cdk.Duration.minutes(1), memory_size=256,
            description="marketrank: shadow deploy / promote / rollback on the SageMaker endpoint",
            environment=names.deploy_environment(kms_key_id=key.key_arn))
        self.deploy_function.node.add_dependency(deploy_role)
        # Every state change of the endpoint (an update finished, failed or was rolled back, by the Lambda or by
        # CloudFormation) re-publishes the live variants to the parameters `cdk deploy` reads (action "sync").
        self.endpoint_events = events.Rule(
            self, "EndpointStateChange", description=f"{names.endpoint}: keep the champion parameters live",
            event_pattern=events.EventPattern(source=["aws.sagemaker"],
                                              detail_type=["SageMaker Endpoint State Change"],
                                              detail={"EndpointName": [names.endpoint]}),
            targets=[events_targets.LambdaFunction(self.deploy_function, retry_attempts=4)])

        # ---- The pipeline (see the module docstring for why its names are concrete).
        self.pipeline = sagemaker.CfnPipeline(
            self, "Pipeline", pipeline_name=names.pipeline, role_arn=names.sagemaker_role_arn,
            pipeline_description=PIPELINE_DESCRIPTION,
            pipeline_definition={"PipelineDefinitionBody": pipeline_definition})
        self.pipeline.node.add_dependency(role, self.model_package_group, self.deploy_function)

        cdk.CfnOutput(self, "ExecutionRoleArn", value=role.role_arn)
        cdk.CfnOutput(self, "DeployFunctionArn", value=self.deploy_function.function_arn)
        cdk.CfnOutput(self, "PipelineName", value=names.pipeline)
        cdk.CfnOutput(self, "MlflowTrackingServerArn", value=self.mlflow.attr_tracking_server_arn)
