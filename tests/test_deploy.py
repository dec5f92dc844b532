"""Deployment: pure plans, the DeployShadow Lambda against moto (+ tests/moto_sagemaker.py), backends' agreement.

The SageMaker side runs on ``moto.mock_aws()`` with the ``sagemaker_extension`` (ShadowProductionVariants kept,
UpdateEndpoint with Creating/Updating -> InService). Between pipeline steps the tests wait for the endpoint with
boto3's own ``endpoint_in_service`` waiter, as a client of the real service would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.sagemaker import models as sm_models
from moto.sagemaker import responses as sm_responses
from moto_sagemaker import SHAPE_MEMBERS, TAG_PATTERN, check_service_model, sagemaker_extension, tag_text_ok

from pipelines import deploy, deploy_lambda, gate
from pipelines.deploy import DeployError, EndpointBusy, EndpointState, Variant
from training import report

REGION = "eu-west-1"
ENDPOINT = "marketrank-test"
GROUP = "marketrank-ranker"
BUCKET = "marketrank-artifacts"
PARAMETER = "/marketrank/champion/model-data-url"
CHALLENGER_PARAMETER = "/marketrank/challenger/model-data-url"
PREVIOUS_PARAMETER = "/marketrank/previous-production-variant"
CHAMPION_URI = f"s3://{BUCKET}/champion/model.tar.gz"
CAPTURE_URI = f"s3://{BUCKET}/data-capture"
M1, M2 = f"{GROUP}-v1", f"{GROUP}-v2"  # the Model names ensure_model gives packages 1 and 2


# ============================================================================================ pure plans

V1 = Variant("m1")
V2 = Variant("m2", weight=0.2)


def test_first_deploy_creates_with_challenger_as_production():
    for current in (None, EndpointState()):
        action, state = deploy.plan_deploy_shadow(current, Variant("m1", instance_count=2, weight=0.2))
        assert action == "create"
        assert state == EndpointState(production=Variant("m1", instance_count=2, weight=1.0))


def test_second_deploy_adds_the_challenger_as_shadow_and_keeps_previous():
    action, state = deploy.plan_deploy_shadow(EndpointState(production=V1), V2)
    assert (action, state) == ("shadow", EndpointState(production=V1, shadow=V2))
    old = Variant("m0")
    action, state = deploy.plan_deploy_shadow(EndpointState(production=V1, previous=old), V2)
    assert (action, state) == ("shadow", EndpointState(production=V1, shadow=V2, previous=old))


def test_a_new_challenger_replaces_the_shadow():
    v3 = Variant("m3", weight=0.5)
    action, state = deploy.plan_deploy_shadow(EndpointState(production=V1, shadow=V2), v3)
    assert (action, state) == ("shadow", EndpointState(production=V1, shadow=v3))


def test_deploy_retries_are_noop():
    current = EndpointState(production=V1, shadow=V2)
    assert deploy.plan_deploy_shadow(current, V2) == ("noop", current)
    assert deploy.plan_deploy_shadow(current, Variant("m1", weight=0.3)) == ("noop", current)  # already champion


def test_promote_swaps_and_keeps_previous():
    current = EndpointState(production=Variant("m1", instance_count=3), shadow=Variant("m2", weight=0.2))
    action, state = deploy.plan_promote(current)
    assert action == "promote"
    assert state == EndpointState(production=Variant("m2", instance_count=3, weight=1.0), shadow=None,
                                  previous=Variant("m1", instance_count=3))
    assert deploy.plan_promote(state) == ("noop", state)  # retried promote


def test_rollback_restores_previous_and_drops_shadow():
    current = EndpointState(production=Variant("m2"), shadow=Variant("m3", weight=0.1), previous=V1)
    action, state = deploy.plan_rollback(current)
    assert (action, state) == ("rollback", EndpointState(production=V1))
    assert deploy.plan_rollback(state) == ("noop", state)  # retried rollback


def test_rollback_of_a_shadow_only_deployment_drops_the_shadow():
    action, state = deploy.plan_rollback(EndpointState(production=V1, shadow=V2))
    assert (action, state) == ("drop-shadow", EndpointState(production=V1))
    assert deploy.plan_rollback(state) == ("noop", state)


@pytest.mark.parametrize("plan", [deploy.plan_promote, deploy.plan_rollback])
@pytest.mark.parametrize("current", [None, EndpointState()])
def test_promote_or_rollback_with_nothing_deployed_is_an_error(plan, current):
    with pytest.raises(DeployError, match="nothing is deployed"):
        plan(current)


def test_config_suffix_is_a_function_of_the_state():
    a = EndpointState(production=V1, shadow=V2)
    same = EndpointState(production=Variant("m1"), shadow=Variant("m2", weight=0.2))
    assert a.config_suffix() == same.config_suffix()
    assert a.config_suffix() != EndpointState(production=V1, shadow=Variant("m2", weight=0.3)).config_suffix()
    assert EndpointState.from_dict(json.loads(json.dumps(a.to_dict()))) == a


# ============================================================================================ moto world


@pytest.fixture
def ext(aws_env):
    with mock_aws(), sagemaker_extension() as extension:
        yield extension


@dataclasses.dataclass
class World:
    sm: object
    s3: object
    ssm: object
    env: dict[str, str]
    packages: list[str]  # model package ARNs, versions 1..3
    urls: list[str]  # their ModelDataUrl
    bodies: list[bytes]  # the artifacts' bytes


@pytest.fixture
def world(ext) -> World:
    sm = boto3.client("sagemaker", region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    ssm = boto3.client("ssm", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    kms = boto3.client("kms", region_name=REGION)
    role = iam.create_role(RoleName="marketrank-model", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                               "Principal": {"Service": "sagemaker.amazonaws.com"}}]}))["Role"]["Arn"]
    key = kms.create_key(Description="marketrank data capture")["KeyMetadata"]["Arn"]
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    # as the MlPlatform stack creates it (the champion and challenger ones the Lambda's first call writes)
    ssm.put_parameter(Name=PREVIOUS_PARAMETER, Value=deploy_lambda.NO_MODEL, Type="String")
    sm.create_model_package_group(ModelPackageGroupName=GROUP)
    packages, urls, bodies = [], [], []
    for version in (1, 2, 3):
        url, body = f"s3://{BUCKET}/models/v{version}/model.tar.gz", f"model {version} weights".encode()
        s3.put_object(Bucket=BUCKET, Key=f"models/v{version}/model.tar.gz", Body=body)
        arn = sm.create_model_package(
            ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved",
            InferenceSpecification={"Containers": [{"Image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/rank:1",
                                                    "ModelDataUrl": url}],
                                    "SupportedContentTypes": ["application/json"],
                                    "SupportedResponseMIMETypes": ["application/json"]})["ModelPackageArn"]
        assert arn.endswith(f":model-package/{GROUP}/{version}"), arn  # the versioned form ensure_model parses
        packages.append(arn)
        urls.append(url)
        bodies.append(body)
    env = {"MODEL_EXECUTION_ROLE_ARN": role, "INSTANCE_TYPE": "ml.m5.large", "INSTANCE_COUNT": "1",
           "DATA_CAPTURE_URI": CAPTURE_URI, "KMS_KEY_ID": key, "CHAMPION_PARAMETER": PARAMETER,
           "CHALLENGER_PARAMETER": CHALLENGER_PARAMETER, "PREVIOUS_PARAMETER": PREVIOUS_PARAMETER,
           "CHAMPION_URI": CHAMPION_URI}
    return World(sm, s3, ssm, env, packages, urls, bodies)


def invoke(w: World, action: str, package: int | None = None, settle: bool = True, **event) -> dict:
    """One Lambda invocation; then (as the pipeline does between steps) wait for the endpoint to be InService."""
    event = {"action": action, "endpoint_name": ENDPOINT, **event}
    if package is not None:
        event["model_package_arn"] = w.packages[package - 1]
    if action == "deploy_shadow":
        event.setdefault("shadow_sampling_percentage", 20)
    out = deploy_lambda.run(event, w.sm, w.s3, w.ssm, w.env)
    assert all(isinstance(v, str) for v in out.values()), out  # LambdaStep outputs are top-level strings
    if settle:
        wait_in_service(w.sm)
    return out


def wait_in_service(sm, name: str = ENDPOINT) -> None:
    sm.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 0, "MaxAttempts": 5})


def endpoint_config(sm, name: str = ENDPOINT) -> dict:
    return sm.describe_endpoint_config(EndpointConfigName=sm.describe_endpoint(EndpointName=name)["EndpointConfigName"])


def n_configs(sm) -> int:
    return len(sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"])


def tags(sm, config: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"]}


def champion(w: World) -> tuple[str, bytes]:
    value = w.ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"]
    body = w.s3.get_object(Bucket=BUCKET, Key="champion/model.tar.gz")["Body"].read()
    return value, body


def models(variants: list[dict] | None) -> list[tuple[str, float]]:
    return [(v["ModelName"], v["InitialVariantWeight"]) for v in variants or []]


# ============================================================================================ the Lambda, end to end


def test_lambda_first_deploy_creates_the_endpoint_with_the_challenger_as_production(world):
    out = invoke(world, "deploy_shadow", 1)
    assert out["action"] == "create" and out["production_model"] == M1 and out["shadow_model"] == ""
    config = endpoint_config(world.sm)
    assert config["EndpointConfigName"] == out["endpoint_config_name"]
    assert models(config["ProductionVariants"]) == [(M1, 1.0)]
    assert config["ProductionVariants"][0]["VariantName"] == deploy.PRODUCTION
    assert "ShadowProductionVariants" not in config
    assert config["DataCaptureConfig"]["EnableCapture"] is True
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == CAPTURE_URI
    assert config["KmsKeyId"] == world.env["KMS_KEY_ID"]
    # the model is built from the registered package
    container = world.sm.describe_model(ModelName=M1)["Containers"][0]
    assert container["ModelPackageName"] == world.packages[0]
    assert world.sm.describe_model(ModelName=M1)["ExecutionRoleArn"] == world.env["MODEL_EXECUTION_ROLE_ARN"]
    # the champion pointers follow the live production model
    assert out["champion_model_data_url"] == world.urls[0]
    assert champion(world) == (world.urls[0], world.bodies[0])
    assert json.loads(out["state"])["production"]["model_name"] == M1


def challenger(w: World) -> str:
    return w.ssm.get_parameter(Name=CHALLENGER_PARAMETER)["Parameter"]["Value"]


def test_lambda_leaves_creating_the_endpoint_to_cloudformation_when_told(world):
    world.env["CREATE_ENDPOINT"] = "false"  # the CDK Serving stack owns the endpoint
    out = invoke(world, "deploy_shadow", 1, settle=False)
    assert out["action"] == "publish_champion" and out["production_model"] == M1
    assert world.sm.list_endpoints()["Endpoints"] == [] and n_configs(world.sm) == 0
    assert champion(world) == (world.urls[0], world.bodies[0])  # what the next `cdk deploy` serves
    assert challenger(world) == deploy_lambda.NO_MODEL
    assert world.sm.describe_model(ModelName=M1)["Containers"][0]["ModelPackageName"] == world.packages[0]
    # once CloudFormation has made the endpoint (here: by the Lambda's own backend), variants change as usual
    world.env["CREATE_ENDPOINT"] = "true"
    invoke(world, "deploy_shadow", 1)
    world.env["CREATE_ENDPOINT"] = "false"
    out = invoke(world, "deploy_shadow", 2)
    assert out["action"] == "shadow" and out["shadow_model"] == M2
    assert challenger(world) == world.urls[1]


def test_lambda_keeps_the_challenger_parameter_at_the_shadow_model(world):
    invoke(world, "deploy_shadow", 1)
    assert challenger(world) == deploy_lambda.NO_MODEL
    invoke(world, "deploy_shadow", 2)
    assert challenger(world) == world.urls[1]
    invoke(world, "promote")
    assert challenger(world) == deploy_lambda.NO_MODEL and champion(world)[0] == world.urls[1]


def test_lambda_on_an_endpoint_cloudformation_made(world):
    """The Serving stack's endpoint: a config name CloudFormation chose and a model with a PrimaryContainer."""
    world.env["CREATE_ENDPOINT"] = "false"
    world.sm.create_model(ModelName="Serving-ChampionModel-1A2B",
                          ExecutionRoleArn=world.env["MODEL_EXECUTION_ROLE_ARN"],
                          PrimaryContainer={"Image": "763104351884.dkr.ecr.eu-west-1.amazonaws.com/"
                                                     "tensorflow-inference:2.14.1-cpu", "ModelDataUrl": world.urls[0]})
    world.sm.create_endpoint_config(EndpointConfigName="EndpointConfig-3C4D", ProductionVariants=[{
        "VariantName": deploy.PRODUCTION, "ModelName": "Serving-ChampionModel-1A2B", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}])
    world.sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="EndpointConfig-3C4D")
    wait_in_service(world.sm)
    invoke(world, "deploy_shadow", 2)
    assert champion(world) == (world.urls[0], world.bodies[0]) and challenger(world) == world.urls[1]
    invoke(world, "promote")
    assert champion(world) == (world.urls[1], world.bodies[1]) and challenger(world) == deploy_lambda.NO_MODEL
    out = invoke(world, "rollback")  # back to CloudFormation's model: its URL comes from PrimaryContainer
    assert out["production_model"] == "Serving-ChampionModel-1A2B"
    assert champion(world) == (world.urls[0], world.bodies[0])


def cloudformation_config(w: World, suffix: str, package: int) -> str:
    """What the Serving stack deploys from the champion parameter: its own model and config, with no tags."""
    model = f"Serving-ChampionModel-{suffix}"
    w.sm.create_model(ModelName=model, ExecutionRoleArn=w.env["MODEL_EXECUTION_ROLE_ARN"],
                      PrimaryContainer={"Image": "tensorflow-inference:2.14.1-cpu", "ModelDataUrl": w.urls[package]})
    w.sm.create_endpoint_config(EndpointConfigName=f"EndpointConfig-{suffix}", ProductionVariants=[{
        "VariantName": deploy.PRODUCTION, "ModelName": model, "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}])
    return f"EndpointConfig-{suffix}"


def test_rollback_after_a_cdk_deploy_still_restores_the_previous_champion(world):
    """A `cdk deploy` after a promotion puts the endpoint on CloudFormation's config, which carries no
    previous-champion tag: the rollback target comes from the SSM parameter the Lambda keeps."""
    def previous() -> str:
        return world.ssm.get_parameter(Name=PREVIOUS_PARAMETER)["Parameter"]["Value"]

    invoke(world, "deploy_shadow", 1)
    invoke(world, "deploy_shadow", 2)
    assert previous() == deploy_lambda.NO_MODEL
    invoke(world, "promote")
    assert previous() == deploy_lambda.NO_MODEL  # written from settled endpoints only: the update's sync does
    invoke(world, "sync")  # what EventBridge starts when the update has finished
    champion_v1 = deploy.variant_from_tag(endpoint_tag(world, deploy.PREVIOUS_TAG))
    assert champion_v1.model_name.endswith("-v1") and previous() == deploy.variant_tag(champion_v1)
    # a `cdk deploy` after the promotion: the endpoint on the Serving stack's config
    world.sm.update_endpoint(EndpointName=ENDPOINT, EndpointConfigName=cloudformation_config(world, "9Z", 1))
    wait_in_service(world.sm)
    assert invoke(world, "sync")["action"] == "sync" and previous() == deploy.variant_tag(champion_v1)  # kept

    out = invoke(world, "rollback")
    assert out["action"] == "rollback" and out["production_model"] == champion_v1.model_name
    assert champion(world) == (world.urls[0], world.bodies[0])
    invoke(world, "sync")
    assert previous() == deploy_lambda.NO_MODEL  # rolled back: nothing left to roll back to
    assert invoke(world, "rollback")["action"] == "noop"


def test_rollback_on_a_cloudformation_config_without_a_known_target_changes_nothing(world):
    """No tag and no parameter (a CLI without PREVIOUS_PARAMETER, or a parameter never written): an error, not a
    silent `reject` that would drop the challenger instead of restoring a champion."""
    world.sm.create_endpoint(EndpointName=ENDPOINT, EndpointConfigName=cloudformation_config(world, "1A", 0))
    wait_in_service(world.sm)
    configs = n_configs(world.sm)
    with pytest.raises(DeployError, match="no rollback target is known"):
        invoke(world, "rollback", settle=False)
    world.ssm.put_parameter(Name=PREVIOUS_PARAMETER, Value="model_name=broken", Type="String", Overwrite=True)
    with pytest.raises(DeployError, match=PREVIOUS_PARAMETER):  # a bad value is named
        invoke(world, "rollback", settle=False)
    assert endpoint_config(world.sm)["EndpointConfigName"] == "EndpointConfig-1A" and n_configs(world.sm) == configs
    world.ssm.put_parameter(Name=PREVIOUS_PARAMETER, Value=deploy_lambda.NO_MODEL, Type="String", Overwrite=True)
    invoke(world, "deploy_shadow", 2)
    world.ssm.put_parameter(Name=PREVIOUS_PARAMETER, Value="model_name=broken", Type="String", Overwrite=True)
    assert invoke(world, "reject")["action"] == "drop-shadow"  # our own config: its tags decide, the value unread


def test_cli_changes_a_stage_endpoint_as_its_lambda_does(world):
    """`marketrank endpoint promote|rollback --target sagemaker` runs the handler with the stage's Lambda
    environment (``infra.names.Names.deploy_environment``), not the caller's shell: its configs carry the stage's
    data capture and KMS key, the champion parameter `cdk deploy` reads follows at once, and after a `cdk deploy`
    the rollback target comes from the stage's parameter."""
    from typer.testing import CliRunner

    from marketrank.cli import _stage_names, app

    names = _stage_names(None)
    assert names.stage.region == REGION  # the CLI calls the stage's region: cdk.json's `dev` is where moto serves
    env = {**names.deploy_environment(), "MODEL_EXECUTION_ROLE_ARN": world.env["MODEL_EXECUTION_ROLE_ARN"],
           "CREATE_ENDPOINT": "true"}  # the Serving stack's first endpoint, made here by the handler
    for kind in ("artifacts", "capture"):
        world.s3.create_bucket(Bucket=names.bucket(kind), CreateBucketConfiguration={"LocationConstraint": REGION})
    world.ssm.put_parameter(Name=names.previous_parameter, Value=deploy_lambda.NO_MODEL, Type="String")
    for package in world.packages[:2]:
        deploy_lambda.run({"action": "deploy_shadow", "endpoint_name": names.endpoint, "model_package_arn": package,
                           "shadow_sampling_percentage": 20}, world.sm, world.s3, world.ssm, env)
        wait_in_service(world.sm, names.endpoint)

    def cli(*args: str) -> None:
        result = CliRunner().invoke(app, ["endpoint", *args, "--target", "sagemaker"])
        assert result.exit_code == 0, result.output
        wait_in_service(world.sm, names.endpoint)

    cli("promote", "--force")  # no --endpoint: the stage's
    config = endpoint_config(world.sm, names.endpoint)
    assert models(config["ProductionVariants"]) == [(M2, 1.0)] and not config.get("ShadowProductionVariants")
    assert config["KmsKeyId"] == names.kms_alias_arn
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == names.data_capture_uri
    assert world.ssm.get_parameter(Name=names.champion_parameter)["Parameter"]["Value"] == world.urls[1]
    deploy_lambda.run({"action": "sync"}, world.sm, world.s3, world.ssm, env)  # EventBridge, once InService
    # a `cdk deploy`: the endpoint on the Serving stack's untagged config
    world.sm.update_endpoint(EndpointName=names.endpoint, EndpointConfigName=cloudformation_config(world, "7C", 1))
    wait_in_service(world.sm, names.endpoint)

    cli("rollback")
    assert models(endpoint_config(world.sm, names.endpoint)["ProductionVariants"]) == [(M1, 1.0)]
    assert world.ssm.get_parameter(Name=names.champion_parameter)["Parameter"]["Value"] == world.urls[0]
    # another endpoint with this stage's parameters would move the stage's champion: refused, nothing changed
    configs = n_configs(world.sm)
    refused = CliRunner().invoke(app, ["endpoint", "reject", "--target", "sagemaker", "--endpoint", ENDPOINT])
    assert refused.exit_code != 0 and f"is not stage {names.stage.name!r}'s" in refused.output
    assert n_configs(world.sm) == configs


def endpoint_tag(w: World, key: str) -> str:
    return tags(w.sm, endpoint_config(w.sm)).get(key, "")


def test_lambda_sync_republishes_what_is_live(world):
    """A failure after UpdateEndpoint (or an update that SageMaker reverted) leaves stale parameters: any later
    call, and the EventBridge-triggered sync, puts them back to the live variants."""
    invoke(world, "deploy_shadow", 1)
    invoke(world, "deploy_shadow", 2)
    world.ssm.put_parameter(Name=PARAMETER, Value="s3://stale/model.tar.gz", Type="String", Overwrite=True)
    world.ssm.put_parameter(Name=CHALLENGER_PARAMETER, Value=deploy_lambda.NO_MODEL, Type="String", Overwrite=True)
    configs = n_configs(world.sm)
    out = invoke(world, "sync")
    assert out["action"] == "sync" and n_configs(world.sm) == configs  # nothing changed on the endpoint
    assert champion(world)[0] == world.urls[0] and challenger(world) == world.urls[1]
    world.ssm.put_parameter(Name=PARAMETER, Value="s3://stale/model.tar.gz", Type="String", Overwrite=True)
    assert invoke(world, "deploy_shadow", 2)["action"] == "noop"  # a retry also repairs them
    assert champion(world)[0] == world.urls[0]


def test_lambda_rejects_a_create_endpoint_setting_it_cannot_read(world):
    world.env["CREATE_ENDPOINT"] = "no"
    with pytest.raises(deploy.DeployError, match="CREATE_ENDPOINT must be 'true' or 'false', got 'no'"):
        invoke(world, "deploy_shadow", 1, settle=False)
    assert world.sm.list_endpoints()["Endpoints"] == []


def test_lambda_second_deploy_adds_the_shadow_and_keeps_the_champion(world):
    invoke(world, "deploy_shadow", 1)
    out = invoke(world, "deploy_shadow", 2, shadow_sampling_percentage=20)
    assert out["action"] == "shadow" and out["production_model"] == M1 and out["shadow_model"] == M2
    assert out["champion_model_data_url"] == ""
    config = endpoint_config(world.sm)
    assert models(config["ProductionVariants"]) == [(M1, 1.0)]
    assert models(config["ShadowProductionVariants"]) == [(M2, 0.2)]
    assert config["ShadowProductionVariants"][0]["VariantName"] == deploy.SHADOW
    assert config["DataCaptureConfig"]["EnableCapture"] is True
    assert {o["CaptureMode"] for o in config["DataCaptureConfig"]["CaptureOptions"]} == {"Input", "Output"}
    endpoint = world.sm.describe_endpoint(EndpointName=ENDPOINT)
    assert [v["VariantName"] for v in endpoint["ShadowProductionVariants"]] == [deploy.SHADOW]
    assert champion(world) == (world.urls[0], world.bodies[0])  # unchanged: model 1 is still the champion


def test_lambda_promote_swaps_and_keeps_the_previous_champion(world):
    invoke(world, "deploy_shadow", 1)
    invoke(world, "deploy_shadow", 2)
    out = invoke(world, "promote")
    assert out["action"] == "promote" and out["production_model"] == M2 and out["shadow_model"] == ""
    config = endpoint_config(world.sm)
    assert models(config["ProductionVariants"]) == [(M2, 1.0)]
    assert "ShadowProductionVariants" not in config
    previous = deploy.variant_from_tag(tags(world.sm, config)[deploy.PREVIOUS_TAG])
    assert previous.model_name == M1 and previous.weight == 1.0
    assert out["champion_model_data_url"] == world.urls[1]
    assert champion(world) == (world.urls[1], world.bodies[1])


def test_lambda_rollback_restores_the_previous_champion(world):
    invoke(world, "deploy_shadow", 1)
    first_config = world.sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    invoke(world, "deploy_shadow", 2)
    invoke(world, "promote")
    configs = n_configs(world.sm)
    out = invoke(world, "rollback")
    assert out["action"] == "rollback" and out["production_model"] == M1 and out["shadow_model"] == ""
    config = endpoint_config(world.sm)
    assert models(config["ProductionVariants"]) == [(M1, 1.0)]
    assert "ShadowProductionVariants" not in config and deploy.PREVIOUS_TAG not in tags(world.sm, config)
    # the state is the first deployment's again: its config is re-used, not re-created
    assert config["EndpointConfigName"] == first_config and n_configs(world.sm) == configs
    assert champion(world) == (world.urls[0], world.bodies[0])


def test_lambda_rollback_of_a_shadow_deployment_stops_shadowing(world):
    invoke(world, "deploy_shadow", 1)
    invoke(world, "deploy_shadow", 2)
    out = invoke(world, "rollback")
    assert out["action"] == "drop-shadow" and out["production_model"] == M1
    assert "ShadowProductionVariants" not in endpoint_config(world.sm)
    assert champion(world) == (world.urls[0], world.bodies[0])


def test_lambda_every_retry_is_a_noop_that_creates_nothing(world):
    sm = world.sm
    steps = [("deploy_shadow", 1), ("deploy_shadow", 2), ("promote", None), ("rollback", None)]
    for action, package in steps:
        first = invoke(world, action, package)
        assert first["action"] != "noop"
        configs, endpoint = n_configs(sm), sm.describe_endpoint(EndpointName=ENDPOINT)
        champ = champion(world)
        for _ in range(2):
            again = invoke(world, action, package, settle=False)
            assert again["action"] == "noop", (action, again)
            assert again["endpoint_config_name"] == ""
            assert json.loads(again["state"]) == json.loads(first["state"])
            assert again["champion_model_data_url"] == ""
        now = sm.describe_endpoint(EndpointName=ENDPOINT)
        assert n_configs(sm) == configs
        assert now["EndpointStatus"] == "InService"  # no UpdateEndpoint was issued
        assert (now["EndpointConfigName"], now["LastModifiedTime"]) == (endpoint["EndpointConfigName"],
                                                                         endpoint["LastModifiedTime"])
        assert champion(world) == champ


def test_lambda_on_an_endpoint_being_updated_raises_endpoint_busy_and_succeeds_on_retry(world, ext):
    invoke(world, "deploy_shadow", 1)
    ext.transition_describes = None  # the update lasts until ext.complete()
    invoke(world, "deploy_shadow", 2, settle=False)
    endpoint = world.sm.describe_endpoint(EndpointName=ENDPOINT)
    assert endpoint["EndpointStatus"] == "Updating"
    configs = n_configs(world.sm)
    with pytest.raises(EndpointBusy, match=rf"'{ENDPOINT}' is Updating: retry later") as err:
        invoke(world, "deploy_shadow", 2, settle=False)
    assert isinstance(err.value, DeployError)  # the Lambda step's retry policy catches this class
    assert n_configs(world.sm) == configs
    # a raw UpdateEndpoint is refused too, as SageMaker does
    with pytest.raises(ClientError, match="Cannot update in-progress endpoint"):
        world.sm.update_endpoint(EndpointName=ENDPOINT, EndpointConfigName=endpoint["EndpointConfigName"])
    ext.complete(ENDPOINT)
    assert invoke(world, "deploy_shadow", 2)["action"] == "noop"
    assert models(endpoint_config(world.sm)["ShadowProductionVariants"]) == [(M2, 0.2)]


def test_lambda_promote_while_the_shadow_update_is_in_progress_is_busy_not_noop(world, ext):
    invoke(world, "deploy_shadow", 1)
    ext.transition_describes = None
    invoke(world, "deploy_shadow", 2, settle=False)
    with pytest.raises(EndpointBusy):
        invoke(world, "promote", settle=False)  # today: returns "noop" and the promotion is silently lost


def test_a_failed_quality_gate_leaves_the_endpoint_as_it_was(world):
    """The pipeline's ConditionStep runs DeployShadow only when ``gate.decide`` passes; mirrored here."""
    def deploy_if_passed(evaluation: dict, package: int) -> dict | None:
        decision = gate.decide(evaluation, gate.GateThresholds())
        return invoke(world, "deploy_shadow", package) if decision.passed else None

    def evaluation(ndcg: float, lift_low: float, over_logged_low: float = 0.3) -> dict:
        doc = {"ranking_metrics": {"ndcg@10": {"value": ndcg}}, "comparison": {"ci_low": lift_low},
               "logged_order_comparison": {"ci_low": over_logged_low}}
        assert report.get_path(doc, report.metric_path()) == ndcg  # the gate's own paths resolve in it
        assert report.get_path(doc, report.LIFT_LOWER_BOUND_PATH) == lift_low
        assert report.get_path(doc, report.LOGGED_ORDER_LIFT_PATH) == over_logged_low
        return doc

    assert deploy_if_passed(evaluation(0.7, report.NO_CHAMPION_LIFT), 1)["action"] == "create"
    before = (world.sm.describe_endpoint(EndpointName=ENDPOINT), endpoint_config(world.sm), n_configs(world.sm))
    bad = evaluation(0.7, -0.03)  # significantly worse than the champion
    decision = gate.decide(bad, gate.GateThresholds())
    assert not decision.passed and "lift" in decision.message
    assert not gate.decide(evaluation(0.2, 0.01), gate.GateThresholds()).passed  # under the floor
    worse_than_shown = gate.decide(evaluation(0.7, report.NO_CHAMPION_LIFT, -0.02), gate.GateThresholds())
    assert not worse_than_shown.passed and "logged order" in worse_than_shown.message  # a first model, too
    assert not gate.decide({"comparison": {"ci_low": 0.1}}, gate.GateThresholds()).passed  # metric missing
    assert deploy_if_passed(bad, 2) is None
    after = (world.sm.describe_endpoint(EndpointName=ENDPOINT), endpoint_config(world.sm), n_configs(world.sm))
    for doc in (before[0], after[0], before[1], after[1]):
        doc.pop("ResponseMetadata")
    assert after == before
    with pytest.raises(ClientError):
        world.sm.describe_model(ModelName=M2)  # not even a Model was made for the rejected challenger


@pytest.mark.parametrize("event, needle", [
    ({"action": "deploy", "model_package_arn": "x"}, "'deploy'"),
    ({"action": "deploy_shadow"}, "needs model_package_arn"),
    ({"action": "deploy_shadow", "model_package_arn": "PKG1", "shadow_sampling_percentage": 0}, "got 0"),
    ({"action": "deploy_shadow", "model_package_arn": "PKG1", "shadow_sampling_percentage": 150}, "got 150"),
    ({"action": "deploy_shadow", "model_package_arn": f"arn:aws:sagemaker:{REGION}:123456789012:model-package/{GROUP}"},
     f"model-package/{GROUP}'"),
    ({"action": "deploy_shadow", "model_package_arn": f"arn:aws:sagemaker:{REGION}:123456789012:model-package-group/"
                                                      f"{GROUP}"}, "model-package-group"),
])
def test_lambda_rejects_invalid_input_without_touching_the_endpoint(world, event, needle):
    invoke(world, "deploy_shadow", 1)
    before = endpoint_config(world.sm)["EndpointConfigName"], n_configs(world.sm)
    if event.get("model_package_arn") == "PKG1":
        event["model_package_arn"] = world.packages[0]
    with pytest.raises(DeployError) as err:
        deploy_lambda.run({"endpoint_name": ENDPOINT, **event}, world.sm, world.s3, world.ssm, world.env)
    assert needle in str(err.value)
    assert (endpoint_config(world.sm)["EndpointConfigName"], n_configs(world.sm)) == before


def test_lambda_without_an_endpoint_name_is_an_error(world):
    with pytest.raises(DeployError, match="endpoint_name"):
        deploy_lambda.run({"action": "promote"}, world.sm, world.s3, world.ssm, world.env)


@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_lambda_promote_or_rollback_with_nothing_deployed_is_an_error(world, action):
    with pytest.raises(DeployError, match="nothing is deployed"):
        invoke(world, action)
    assert n_configs(world.sm) == 0
    assert world.sm.list_endpoints()["Endpoints"] == []


@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_nothing_deployed_error_names_the_endpoint(world, action):
    with pytest.raises(DeployError, match=ENDPOINT):
        invoke(world, action)


# ============================================================================================ backends


def make_models(sm, role: str, *names: str) -> None:
    for name in names:
        sm.create_model(ModelName=name, ExecutionRoleArn=role,
                        PrimaryContainer={"Image": "rank:1", "ModelDataUrl": f"s3://{BUCKET}/{name}.tar.gz"})


def test_sagemaker_backend_reads_back_exactly_what_it_applied(world):
    sm = world.sm
    make_models(sm, world.env["MODEL_EXECUTION_ROLE_ARN"], "m1", "m2", "m3")
    backend = deploy.SageMakerBackend(sm, ENDPOINT, data_capture_uri=CAPTURE_URI, kms_key_id=world.env["KMS_KEY_ID"])
    assert backend.current() is None
    assert deploy.describe(backend) == {"endpoint": ENDPOINT, "state": None, "status": "absent",
                                        "endpoint_config_name": None}
    states = [
        EndpointState(production=Variant("m1")),
        EndpointState(production=Variant("m1", instance_type="ml.c5.xlarge", instance_count=3),
                      shadow=Variant("m2", instance_type="ml.m5.xlarge", instance_count=2, weight=0.35)),
        EndpointState(production=Variant("m2", instance_count=3), previous=Variant("m1", instance_count=3)),
        EndpointState(production=Variant("m2"), shadow=Variant("m3", weight=0.05), previous=Variant("m1")),
    ]
    for state in states:
        name = backend.apply(state)
        assert name == f"{ENDPOINT}-{state.config_suffix()}"
        wait_in_service(sm)
        assert backend.current() == state
        assert deploy.describe(backend) == {"endpoint": ENDPOINT, "state": state.to_dict(), "status": "InService",
                                            "endpoint_config_name": name}
    # re-applying the current state is a no-op: same name, no new config, no UpdateEndpoint (it would show Updating)
    configs = n_configs(sm)
    assert backend.apply(states[-1]) == f"{ENDPOINT}-{states[-1].config_suffix()}"
    assert n_configs(sm) == configs
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"


def test_sagemaker_backend_resumes_after_a_crash_between_config_and_update(world):
    """A Lambda killed after CreateEndpointConfig: the retry finds the config (no duplicate) and updates."""
    sm = world.sm
    make_models(sm, world.env["MODEL_EXECUTION_ROLE_ARN"], "m1", "m2")
    backend = deploy.SageMakerBackend(sm, ENDPOINT, data_capture_uri=CAPTURE_URI)
    backend.apply(EndpointState(production=Variant("m1")))
    wait_in_service(sm)
    target = EndpointState(production=Variant("m1"), shadow=Variant("m2", weight=0.2))
    name = f"{ENDPOINT}-{target.config_suffix()}"
    sm.create_endpoint_config(EndpointConfigName=name, **backend._config_spec(target))  # the half-done attempt
    assert backend.apply(target) == name
    assert sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Updating"
    wait_in_service(sm)
    assert backend.current() == target


def test_local_backend_goes_through_the_same_states_as_sagemaker(world, tmp_path):
    sm = world.sm
    make_models(sm, world.env["MODEL_EXECUTION_ROLE_ARN"], "m1", "m2", "m3")
    remote = deploy.SageMakerBackend(sm, ENDPOINT, data_capture_uri=CAPTURE_URI)
    local = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    v1, v2, v3 = Variant("m1"), Variant("m2", weight=0.2), Variant("m3", weight=0.5)
    steps = [(deploy.deploy_shadow, v1), (deploy.deploy_shadow, v1), (deploy.deploy_shadow, v2),
             (deploy.deploy_shadow, v2), (deploy.promote, None), (deploy.promote, None),
             (deploy.deploy_shadow, v3), (deploy.rollback, None), (deploy.rollback, None),
             (deploy.deploy_shadow, v2), (deploy.rollback, None), (deploy.rollback, None)]
    actions = []
    for step, arg in steps:
        args = (arg,) if arg is not None else ()
        got_remote, got_local = step(remote, *args), step(local, *args)
        wait_in_service(sm)
        assert got_remote == got_local, (step.__name__, arg)
        assert remote.current() == local.current()
        actions.append(got_local["action"])
    assert actions == ["create", "noop", "shadow", "noop", "promote", "noop", "shadow", "rollback", "noop",
                       "shadow", "drop-shadow", "noop"]
    assert local.current() == EndpointState(production=Variant("m1"))
    manifest = json.loads((tmp_path / "endpoints" / f"{ENDPOINT}.json").read_text())
    assert manifest["endpoint_config_name"] == sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]


def test_live_since_is_when_the_live_variants_were_configured(world, tmp_path):
    sm = world.sm
    make_models(sm, world.env["MODEL_EXECUTION_ROLE_ARN"], "m1", "m2")
    remote = deploy.SageMakerBackend(sm, ENDPOINT, data_capture_uri=CAPTURE_URI)
    local = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    assert remote.live_since() is None and local.live_since() is None
    for backend in (remote, local):
        deploy.deploy_shadow(backend, Variant("m1"))
    wait_in_service(sm)
    first_remote, first_local = remote.live_since(), local.live_since()
    created = endpoint_config(sm)["CreationTime"]
    assert abs((first_remote - created).total_seconds()) < 2 and first_remote.utcoffset().total_seconds() == 0
    assert first_local.tzinfo is not None and first_local <= datetime.now(timezone.utc)
    time.sleep(0.01)
    for backend in (remote, local):
        deploy.deploy_shadow(backend, Variant("m2", weight=0.2))
    wait_in_service(sm)
    second = remote.live_since()
    assert second >= first_remote and local.live_since() > first_local
    # not the endpoint's LastModifiedTime, which autoscaling moves without changing the variants
    sm.update_endpoint_weights_and_capacities(EndpointName=ENDPOINT, DesiredWeightsAndCapacities=[
        {"VariantName": deploy.PRODUCTION, "DesiredInstanceCount": 2}])
    assert remote.live_since() == second
    # the first state again reuses its config: its records start now, not when the config was created
    time.sleep(1.1)
    for backend in (remote, local):
        deploy.reject(backend)
    wait_in_service(sm)
    assert endpoint_config(sm)["CreationTime"] == created and remote.live_since() > second
    # CloudFormation's configs carry no tag: their creation time
    sm.create_endpoint_config(EndpointConfigName="EndpointConfig-CFN", ProductionVariants=[{
        "VariantName": deploy.PRODUCTION, "ModelName": "m1", "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}])
    sm.update_endpoint(EndpointName=ENDPOINT, EndpointConfigName="EndpointConfig-CFN")
    wait_in_service(sm)
    assert remote.live_since() == endpoint_config(sm)["CreationTime"].astimezone(timezone.utc)


def test_local_backend_with_nothing_deployed(tmp_path):
    local = deploy.LocalBackend(tmp_path, "ep")
    assert local.current() is None
    assert deploy.describe(local)["status"] == "absent"
    for step in (deploy.promote, deploy.rollback):
        with pytest.raises(DeployError):
            step(local)
    assert not (tmp_path / "ep.json").exists()


# ============================================================================================ the extension itself


def test_previous_champion_tag_is_a_tag_value_sagemaker_accepts():
    """The tag holding the rollback target must pass the service's TagValue pattern (moto itself accepts any)."""
    model = botocore.session.get_session().get_service_model("sagemaker").shape_for("TagValue").metadata
    assert model["pattern"] == TAG_PATTERN and model["max"] == 256
    longest = deploy.Variant(model_name="m" * 63, instance_type="ml.p4de.24xlarge", instance_count=100,
                             weight=0.123456789)
    for variant in (deploy.Variant("marketrank-v12"), longest):
        value = deploy.variant_tag(variant)
        assert tag_text_ok(value) and len(value) <= 256, value
        assert deploy.variant_from_tag(value) == variant
    assert not tag_text_ok(json.dumps({"model_name": "m"}))  # what was stored before: braces, quotes, commas
    with pytest.raises(deploy.DeployError, match="not a variant"):
        deploy.variant_from_tag("model_name=m weight=1.0")
    with mock_aws(), sagemaker_extension():  # the extension refuses such a tag as AWS does
        sm = boto3.client("sagemaker", region_name=REGION)
        make_models(sm, "arn:aws:iam::123456789012:role/r", "m1")
        with pytest.raises(ClientError, match="regular expression pattern"):
            sm.create_endpoint_config(EndpointConfigName="c", Tags=[{"Key": "k", "Value": '{"a": 1}'}],
                                      ProductionVariants=[{"VariantName": "p", "ModelName": "m1",
                                                           "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])


def test_extension_matches_botocore_service_model():
    check_service_model()
    model = botocore.session.get_session().get_service_model("sagemaker")
    op = model.operation_model("UpdateEndpoint")
    assert set(op.input_shape.required_members) == {"EndpointName", "EndpointConfigName"}
    assert op.output_shape.required_members == ["EndpointArn"]
    for shape, members in SHAPE_MEMBERS.items():
        assert set(members) <= set(model.shape_for(shape).members), shape


def test_extension_update_endpoint_wire_format(world):
    """What the handler sends and gets back, as botocore serialized and parsed it, matches the model."""
    model = world.sm.meta.service_model.operation_model("UpdateEndpoint")
    calls = []
    world.sm.meta.events.register("provide-client-params.sagemaker.UpdateEndpoint",
                                  lambda params, **kw: calls.append(("request", dict(params))))
    world.sm.meta.events.register("after-call.sagemaker.UpdateEndpoint",
                                  lambda parsed, **kw: calls.append(("response", dict(parsed))))
    invoke(world, "deploy_shadow", 1)
    invoke(world, "deploy_shadow", 2)
    (_, request), (_, response) = calls
    assert set(request) == {"EndpointName", "EndpointConfigName", *deploy.RETAIN_VARIANT_PROPERTIES}
    assert set(request) <= set(model.input_shape.members)
    # Application Auto Scaling's instance count stays; the new config's weights and data capture apply.
    assert request["RetainAllVariantProperties"] is True
    assert {p["VariantPropertyType"] for p in request["ExcludeRetainedVariantProperties"]} == {
        "DesiredWeight", "DataCaptureConfig"}
    assert set(response) - {"ResponseMetadata"} == {"EndpointArn"}
    assert response["EndpointArn"] == world.sm.describe_endpoint(EndpointName=ENDPOINT)["EndpointArn"]
    assert response["EndpointArn"] == f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/{ENDPOINT}"


def test_extension_transitions_and_errors(world, ext):
    sm = world.sm
    make_models(sm, world.env["MODEL_EXECUTION_ROLE_ARN"], "m1", "m2")
    pv = [{"VariantName": "p", "ModelName": "m1", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1,
           "InitialVariantWeight": 1.0}]
    shadow = [{**pv[0], "VariantName": "s", "ModelName": "m2", "InitialVariantWeight": 0.2}]
    sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=pv)
    sm.create_endpoint_config(EndpointConfigName="c2", ProductionVariants=pv, ShadowProductionVariants=shadow)
    assert models(sm.describe_endpoint_config(EndpointConfigName="c2")["ShadowProductionVariants"]) == [("m2", 0.2)]
    with pytest.raises(ClientError, match='Cannot create already existing endpoint configuration ".*/c2"'):
        sm.create_endpoint_config(EndpointConfigName="c2", ProductionVariants=pv)
    with pytest.raises(ClientError, match="Could not find model"):
        sm.create_endpoint_config(EndpointConfigName="c3", ProductionVariants=pv,
                                  ShadowProductionVariants=[{**shadow[0], "ModelName": "nope"}])
    with pytest.raises(ClientError, match="Could not find endpoint configuration"):
        sm.describe_endpoint_config(EndpointConfigName="c3")  # nothing half-created

    sm.create_endpoint(EndpointName="e", EndpointConfigName="c1")
    statuses = [sm.describe_endpoint(EndpointName="e")["EndpointStatus"] for _ in range(3)]
    assert statuses == ["Creating", "InService", "InService"]
    with pytest.raises(ClientError, match='Cannot create already existing endpoint ".*endpoint/e"'):
        sm.create_endpoint(EndpointName="e", EndpointConfigName="c1")

    for name, config, message in [("nope", "c2", 'Could not find endpoint ".*endpoint/nope"'),
                                  ("e", "nope", 'Could not find endpoint configuration ".*endpoint-config/nope"')]:
        with pytest.raises(ClientError, match=message) as err:
            sm.update_endpoint(EndpointName=name, EndpointConfigName=config)
        assert err.value.response["Error"]["Code"] == "ValidationException"

    arn = sm.update_endpoint(EndpointName="e", EndpointConfigName="c2")["EndpointArn"]
    assert arn.endswith(":endpoint/e")
    with pytest.raises(ClientError, match="Cannot update in-progress endpoint"):
        sm.update_endpoint(EndpointName="e", EndpointConfigName="c1")
    updating = sm.describe_endpoint(EndpointName="e")
    assert updating["EndpointStatus"] == "Updating"
    assert updating["EndpointConfigName"] == "c1" and "ShadowProductionVariants" not in updating  # still the old
    pending = updating["PendingDeploymentSummary"]
    assert pending["EndpointConfigName"] == "c2"
    assert [(v["VariantName"], v["DesiredWeight"]) for v in pending["ShadowProductionVariants"]] == [("s", 0.2)]
    done = sm.describe_endpoint(EndpointName="e")
    assert done["EndpointStatus"] == "InService" and done["EndpointConfigName"] == "c2"
    assert "PendingDeploymentSummary" not in done
    assert [(v["VariantName"], v["CurrentWeight"]) for v in done["ShadowProductionVariants"]] == [("s", 0.2)]
    assert [v["VariantName"] for v in done["ProductionVariants"]] == ["p"]

    ext.transition_describes = None
    sm.update_endpoint(EndpointName="e", EndpointConfigName="c1")
    assert {sm.describe_endpoint(EndpointName="e")["EndpointStatus"] for _ in range(5)} == {"Updating"}
    ext.complete("e")
    assert sm.describe_endpoint(EndpointName="e")["EndpointConfigName"] == "c1"
    with pytest.raises(KeyError):
        ext.complete("e")


def test_extension_is_scoped_and_restores_moto(aws_env):
    Backend, Response = sm_models.SageMakerModelBackend, sm_responses.SageMakerResponse
    saved = {(cls, name): cls.__dict__.get(name) for cls, name in [
        (Backend, "create_endpoint_config"), (Backend, "create_endpoint"), (Backend, "describe_endpoint"),
        (Backend, "update_endpoint"), (Response, "create_endpoint_config"), (Response, "update_endpoint"),
        (sm_models.FakeEndpoint, "response_object"), (sm_models.FakeEndpointConfig, "response_object")]}
    with sagemaker_extension():
        assert Response.__dict__.get("update_endpoint") is not None
        assert Backend.__dict__["describe_endpoint"] is not saved[(Backend, "describe_endpoint")]
        with pytest.raises(RuntimeError, match="already active"), sagemaker_extension():
            pass
    assert {key: key[0].__dict__.get(key[1]) for key in saved} == saved
    with sagemaker_extension(transition_describes=0), mock_aws():  # also works entered outside mock_aws
        sm = boto3.client("sagemaker", region_name=REGION)
        make_models(sm, "arn:aws:iam::123456789012:role/r", "m1")
        sm.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[
            {"VariantName": "p", "ModelName": "m1", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
        sm.create_endpoint(EndpointName="e", EndpointConfigName="c")
        assert sm.describe_endpoint(EndpointName="e")["EndpointStatus"] == "InService"  # 0: moto's "at once"
    assert {key: key[0].__dict__.get(key[1]) for key in saved} == saved


def test_unreadable_local_manifest_is_an_error_naming_it(tmp_path):
    backend = deploy.LocalBackend(tmp_path, "marketrank")
    for content, problem in (("", "not valid JSON"), ("[]", "not a JSON object"), ('{"state": 3}', "no 'state'")):
        backend.path.write_text(content)
        with pytest.raises(deploy.DeployError, match=f"endpoint manifest {backend.path} .*{problem}"):
            backend.current()
        if problem != "no 'state'":
            with pytest.raises(deploy.DeployError, match=str(backend.path)):
                backend.live_since()
