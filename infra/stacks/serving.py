"""Serving: the SageMaker endpoint (TF Serving, tensorflow-inference 2.14.1) with the champion in production and
the challenger as a ShadowProductionVariant, data capture, autoscaling and the alarms rollback automation reads.

Ownership: the pipeline's deploy Lambda changes the live variants (its own EndpointConfigs). This stack reads the
champion's and challenger's model data URLs from the SSM parameters the Lambda maintains, resolved by
CloudFormation at deploy time, so a `cdk deploy` redeploys what is live and never rolls the model back. While the
champion parameter is ``none`` (no model yet) the endpoint and its scaling are not created (condition
``HasChampion``); without a challenger the config has no shadow variant (``HasChallenger``).
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_sns as sns
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from infra.config import StageConfig
from infra.nag import acknowledge
from infra.names import Names
from pipelines.deploy import PRODUCTION, SHADOW
from pipelines.deploy_lambda import NO_MODEL

#: SageMaker reports ModelLatency in microseconds.
MICROSECONDS_PER_MS = 1000


class ServingStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, stage: StageConfig, key: kms.IKey,
                 inference_image: str, data_capture_uri: str, alarm_topic: sns.ITopic, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        names = Names(stage)
        self.endpoint_name = names.endpoint
        champion_url = ssm.StringParameter.value_for_string_parameter(self, names.champion_parameter)
        challenger_url = ssm.StringParameter.value_for_string_parameter(self, names.challenger_parameter)
        has_champion = cdk.CfnCondition(self, "HasChampion", expression=cdk.Fn.condition_not(
            cdk.Fn.condition_equals(champion_url, NO_MODEL)))
        has_challenger = cdk.CfnCondition(self, "HasChallenger", expression=cdk.Fn.condition_and(
            has_champion, cdk.Fn.condition_not(cdk.Fn.condition_equals(challenger_url, NO_MODEL))))

        def model(model_id: str, url: str, condition: cdk.CfnCondition) -> sagemaker.CfnModel:
            resource = sagemaker.CfnModel(
                self, model_id, execution_role_arn=names.sagemaker_role_arn,
                primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(image=inference_image,
                                                                                 model_data_url=url),
                enable_network_isolation=True)  # TF Serving needs no network; SageMaker stages the artifact
            resource.cfn_options.condition = condition
            # A new model data URL replaces the model; the old one may still be the deploy Lambda's rollback target
            # (a promotion from this stack's config records it), so CloudFormation keeps it instead of deleting it.
            resource.cfn_options.deletion_policy = cdk.CfnDeletionPolicy.RETAIN
            resource.cfn_options.update_replace_policy = cdk.CfnDeletionPolicy.RETAIN
            acknowledge(resource, "Network isolation is on: the container has no network at all, which is "
                        "stricter than a VPC; the ranking API reaches it through the SageMaker runtime API.",
                        "AwsSolutions-SM1")
            return resource

        champion = model("ChampionModel", champion_url, has_champion)
        challenger = model("ChallengerModel", challenger_url, has_challenger)

        # CloudFormation casing: the shadow variant sits inside Fn::If, where CDK does not rename properties.
        shadow_variant = {"VariantName": SHADOW, "ModelName": challenger.attr_model_name,
                          "InstanceType": stage.endpoint_instance_type,
                          "InitialInstanceCount": stage.endpoint_instance_count,
                          "InitialVariantWeight": stage.shadow_sampling_percentage / 100}

        # The same shape as pipelines.deploy.SageMakerBackend._config_spec, so a cdk deploy and the Lambda agree.
        self.endpoint_config = sagemaker.CfnEndpointConfig(
            self, "EndpointConfig", kms_key_id=key.key_arn,
            production_variants=[sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                variant_name=PRODUCTION, model_name=champion.attr_model_name,
                instance_type=stage.endpoint_instance_type, initial_instance_count=stage.endpoint_instance_count,
                initial_variant_weight=1.0)],
            shadow_production_variants=cdk.Fn.condition_if(
                has_challenger.logical_id, [shadow_variant], cdk.Aws.NO_VALUE),
            data_capture_config=sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=True, initial_sampling_percentage=100, destination_s3_uri=data_capture_uri,
                kms_key_id=key.key_arn,
                capture_options=[sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode=mode)
                                 for mode in ("Input", "Output")],
                capture_content_type_header=sagemaker.CfnEndpointConfig.CaptureContentTypeHeaderProperty(
                    json_content_types=["application/json"])))
        self.endpoint_config.cfn_options.condition = has_champion
        # As pipelines.deploy's updates: autoscaling's live instance count survives a new config (a deploy at peak
        # must not drop the champion to its minimum); the config's weights and data capture apply.
        self.endpoint = sagemaker.CfnEndpoint(
            self, "Endpoint", endpoint_name=names.endpoint,
            endpoint_config_name=self.endpoint_config.attr_endpoint_config_name,
            retain_all_variant_properties=True,
            exclude_retained_variant_properties=[
                sagemaker.CfnEndpoint.VariantPropertyProperty(variant_property_type=kind)
                for kind in ("DesiredWeight", "DataCaptureConfig")])
        self.endpoint.cfn_options.condition = has_champion

        # Autoscaling of the production variant on invocations per instance. L1 without a RoleARN: Application Auto
        # Scaling then uses its service-linked role (the L2 would create a role of its own).
        self.scalable_target = appscaling.CfnScalableTarget(
            self, "ChampionScaling", service_namespace="sagemaker",
            resource_id=f"endpoint/{names.endpoint}/variant/{PRODUCTION}",
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=stage.endpoint_instance_count, max_capacity=stage.endpoint_max_instance_count)
        self.scalable_target.node.add_dependency(self.endpoint)
        policy = appscaling.CfnScalingPolicy(
            self, "InvocationsPerInstance", policy_name=f"{names.endpoint}-invocations-per-instance",
            policy_type="TargetTrackingScaling", scaling_target_id=self.scalable_target.ref,
            target_tracking_scaling_policy_configuration=appscaling.CfnScalingPolicy.
            TargetTrackingScalingPolicyConfigurationProperty(
                target_value=stage.endpoint_invocations_per_instance, scale_in_cooldown=300, scale_out_cooldown=60,
                predefined_metric_specification=appscaling.CfnScalingPolicy.PredefinedMetricSpecificationProperty(
                    predefined_metric_type="SageMakerVariantInvocationsPerInstance")))
        for scaling in (self.scalable_target, policy):
            scaling.cfn_options.condition = has_champion

        # Alarms per variant: what promote / rollback automation watches (exposed as attributes and outputs).
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        for variant_name in (PRODUCTION, SHADOW):
            def metric(name: str, statistic: str, variant_name: str = variant_name) -> cloudwatch.Metric:
                return cloudwatch.Metric(namespace="AWS/SageMaker", metric_name=name, statistic=statistic,
                                         period=cdk.Duration.minutes(1),
                                         dimensions_map={"EndpointName": names.endpoint, "VariantName": variant_name})

            specs = {
                "LatencyP99": (metric("ModelLatency", "p99"), stage.endpoint_latency_p99_ms * MICROSECONDS_PER_MS,
                               f"p99 model latency above {stage.endpoint_latency_p99_ms} ms"),
                "Errors5xx": (metric("Invocation5XXErrors", "Sum"), 0, "5xx responses from the model container"),
                "ModelErrors": (metric("InvocationModelErrors", "Sum"), 0, "invocation errors from the model"),
            }
            for suffix, (m, threshold, what) in specs.items():
                alarm_id = f"{variant_name.capitalize()}{suffix}"
                alarm = cloudwatch.Alarm(
                    self, alarm_id, alarm_name=f"{names.endpoint}-{variant_name}-{suffix.lower()}", metric=m,
                    threshold=threshold, evaluation_periods=5, datapoints_to_alarm=3,
                    comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                    treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                    alarm_description=f"{names.endpoint} {variant_name}: {what} (3 of 5 minutes)")
                alarm.add_alarm_action(cloudwatch_actions.SnsAction(alarm_topic))
                self.alarms[alarm_id] = alarm
                cdk.CfnOutput(self, f"{alarm_id}Alarm", value=alarm.alarm_arn)
        cdk.CfnOutput(self, "EndpointName", value=names.endpoint)
