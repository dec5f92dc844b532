"""Data: the KMS key and the S3 buckets (raw logs, features, model artifacts, data capture) plus the log buckets.

Data buckets: SSE-KMS with the stage key (bucket keys on), SSL only, public access blocked, versioned, server
access logs to the access-log bucket, lifecycle rules. The two log buckets use SSE-S3 because S3 server access
logging and ALB access logging cannot write to SSE-KMS buckets.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from infra.config import StageConfig
from infra.nag import acknowledge
from infra.names import Names

#: Noncurrent versions are kept this long (days) for recovery, then expire.
NONCURRENT_DAYS = {"raw": 90, "features": 30, "artifacts": 90, "capture": 30}


class DataStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, stage: StageConfig, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        names = Names(stage)
        self.key = kms.Key(self, "Key", alias=names.kms_alias, enable_key_rotation=True,
                           description=f"marketrank {stage.name}: data, artifacts, capture, cache",
                           removal_policy=cdk.RemovalPolicy.RETAIN)

        def secure(bucket_id: str, kind: str, **props) -> s3.Bucket:
            return s3.Bucket(self, bucket_id, bucket_name=names.bucket(kind), enforce_ssl=True, versioned=True,
                             block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
                             object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
                             removal_policy=cdk.RemovalPolicy.RETAIN, **props)

        log_lifecycle = [s3.LifecycleRule(id="expire-logs", expiration=cdk.Duration.days(365),
                                          noncurrent_version_expiration=cdk.Duration.days(30),
                                          abort_incomplete_multipart_upload_after=cdk.Duration.days(7))]
        self.access_logs = secure("AccessLogs", "access-logs", encryption=s3.BucketEncryption.S3_MANAGED,
                                  lifecycle_rules=log_lifecycle)
        acknowledge(self.access_logs, "This is the access-log bucket; logging it into itself would loop.",
                    "AwsSolutions-S1")
        # ALB access logs (RankingService): their own bucket, access-logged like the others.
        self.alb_logs = secure("AlbLogs", "alb-logs", encryption=s3.BucketEncryption.S3_MANAGED,
                               lifecycle_rules=log_lifecycle, server_access_logs_bucket=self.access_logs,
                               server_access_logs_prefix="alb-logs/")

        def data_bucket(bucket_id: str, kind: str, extra_rules: list[s3.LifecycleRule] = ()) -> s3.Bucket:
            rules = [s3.LifecycleRule(id="noncurrent", noncurrent_version_expiration=cdk.Duration.days(
                         NONCURRENT_DAYS[kind]), abort_incomplete_multipart_upload_after=cdk.Duration.days(7)),
                     *extra_rules]
            return secure(bucket_id, kind, encryption=s3.BucketEncryption.KMS, encryption_key=self.key,
                          bucket_key_enabled=True, lifecycle_rules=rules,
                          server_access_logs_bucket=self.access_logs, server_access_logs_prefix=f"{kind}/")

        self.raw = data_bucket("Raw", "raw")
        self.features = data_bucket("Features", "features")
        self.artifacts = data_bucket("Artifacts", "artifacts")
        # Capture JSONL is read by the shadow report within days: infrequent access after 30, gone after a year.
        self.capture = data_bucket("Capture", "capture", [s3.LifecycleRule(
            id="capture-tiering", transitions=[s3.Transition(storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                                                             transition_after=cdk.Duration.days(30))],
            expiration=cdk.Duration.days(365))])
        for output, bucket in (("RawBucket", self.raw), ("FeaturesBucket", self.features),
                               ("ArtifactsBucket", self.artifacts), ("CaptureBucket", self.capture)):
            cdk.CfnOutput(self, output, value=bucket.bucket_name)
        cdk.CfnOutput(self, "KeyArn", value=self.key.key_arn)

        # Every stack's alarms notify this topic, encrypted with the stage key: CloudWatch needs the key to publish
        # to it (without this grant alarm notifications to an encrypted topic are dropped, silently).
        self.alarm_topic = sns.Topic(self, "Alarms", topic_name=names.alarm_topic, master_key=self.key,
                                     enforce_ssl=True, display_name=f"marketrank {stage.name} alarms")
        self.key.add_to_resource_policy(iam.PolicyStatement(
            sid="CloudWatchAlarmsPublish", principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
            actions=["kms:Decrypt", "kms:GenerateDataKey*"], resources=["*"],
            conditions={"StringEquals": {"aws:SourceAccount": stage.account}}))  # this account's alarms only
        for email in stage.alarm_emails:
            self.alarm_topic.add_subscription(subscriptions.EmailSubscription(email))
        cdk.CfnOutput(self, "AlarmTopicArn", value=self.alarm_topic.topic_arn)
