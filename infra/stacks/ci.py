"""Ci: the GitHub OIDC provider and the role the deploy workflow assumes.

The role can do two things: assume the CDK bootstrap roles (``cdk deploy`` then works through CloudFormation's
execution role, never with this role's own rights) and upsert the pipeline (render uploads the step code under the
pipeline prefix of the artifacts bucket, then Create/UpdatePipeline passing the SageMaker role). Its trust is
limited to the configured repository's jobs in the GitHub environment named after the stage (the deploy workflow
runs there; limit that environment's deployment branches to ``deploy_branch`` in GitHub).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from infra.config import StageConfig
from infra.nag import acknowledge
from infra.names import PIPELINE_PREFIX, Names, partition

GITHUB_OIDC_URL = "https://token.actions.githubusercontent.com"
GITHUB_AUDIENCE = "sts.amazonaws.com"
BOOTSTRAP_ROLES = ("deploy", "file-publishing", "image-publishing", "lookup")


def github_subject(stage: StageConfig) -> str:
    """The OIDC ``sub`` of the deploy workflow's job: ``environment: <stage>`` makes it name the environment."""
    return f"repo:{stage.github_repo}:environment:{stage.name}"


class CiStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, stage: StageConfig, key: kms.IKey, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        names = Names(stage)
        # Native AWS::IAM::OIDCProvider (no custom-resource Lambda); IAM fetches the thumbprint itself.
        provider = iam.OidcProviderNative(self, "GitHubOidc", url=GITHUB_OIDC_URL, client_ids=[GITHUB_AUDIENCE])
        # The deploy job runs in the GitHub environment named after the stage, and GitHub then issues tokens whose
        # subject names that environment, not the branch: which branches may deploy is the environment's rule.
        subject = github_subject(stage)
        self.deploy_role = iam.Role(
            self, "DeployRole", role_name=names.github_deploy_role, max_session_duration=cdk.Duration.hours(1),
            description=f"GitHub Actions deploys from {stage.github_repo}, environment {stage.name}",
            assumed_by=iam.WebIdentityPrincipal(provider.oidc_provider_arn, conditions={
                "StringEquals": {"token.actions.githubusercontent.com:aud": GITHUB_AUDIENCE,
                                 "token.actions.githubusercontent.com:sub": subject}}))
        cdk.CfnOutput(self, "GitHubEnvironment", value=stage.name,
                      description=f"the deploy job's GitHub environment: limit its deployment branches to "
                                  f"{stage.deploy_branch}")
        role = self.deploy_role
        q, account, region = stage.cdk_qualifier, stage.account, stage.region
        bootstrap = [f"arn:{partition(region)}:iam::{account}:role/cdk-{q}-{kind}-role-{account}-{region}"
                     for kind in BOOTSTRAP_ROLES]
        role.add_to_policy(iam.PolicyStatement(sid="CdkBootstrapRoles", actions=["sts:AssumeRole", "sts:TagSession"],
                                               resources=bootstrap))
        pipeline_arn = names.arn("sagemaker", f"pipeline/{names.pipeline}")
        role.add_to_policy(iam.PolicyStatement(
            sid="UpsertPipeline", resources=[pipeline_arn],
            actions=["sagemaker:DescribePipeline", "sagemaker:CreatePipeline", "sagemaker:UpdatePipeline",
                     "sagemaker:AddTags"]))
        role.add_to_policy(iam.PolicyStatement(
            sid="PassPipelineRole", actions=["iam:PassRole"], resources=[names.sagemaker_role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        artifacts = names.bucket("artifacts")
        s3_partition = partition(region)
        code = f"arn:{s3_partition}:s3:::{artifacts}/{PIPELINE_PREFIX}/*"
        role.add_to_policy(iam.PolicyStatement(sid="StageStepCode", actions=["s3:PutObject", "s3:GetObject"],
                                               resources=[code]))
        role.add_to_policy(iam.PolicyStatement(
            sid="ListArtifacts", actions=["s3:ListBucket", "s3:GetBucketLocation"],
            resources=[f"arn:{s3_partition}:s3:::{artifacts}"]))
        key.grant_encrypt_decrypt(role)
        acknowledge(role, "Step code is staged under content-derived keys of the pipeline prefix.",
                    f"AwsSolutions-IAM5[Resource::{code}]")
        acknowledge(role, "KMS data keys for this stage's key only (SSE-KMS uploads of the step code).",
                    "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]", "AwsSolutions-IAM5[Action::kms:ReEncrypt*]")
        cdk.CfnOutput(self, "DeployRoleArn", value=role.role_arn)
