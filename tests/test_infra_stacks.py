"""The CDK stacks, synthesised once (dev stage from cdk.json, offline) and checked on the properties that matter.

These assertions are the only check of what the emulators drop (bucket policies, public access blocks, shadow
variants, ElastiCache encryption). cdk-nag's AwsSolutions pack runs inside the synthesis: an unacknowledged finding
fails it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
from aws_cdk import aws_s3 as s3
from aws_cdk.assertions import Match, Template

from infra import nag
from infra.app import STACK_IDS, build_app, offline_app
from infra.config import stage_config
from infra.lambda_bundle import FILES, HANDLER
from infra.names import Names, cdk_context
from pipelines.deploy import PRODUCTION, SHADOW

STAGE = stage_config(cdk_context())
NAMES = Names(STAGE)
#: Actions IAM offers no resource-level permission for: the only ones allowed on "*".
STAR_ACTIONS = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cdk.out")
    try:
        build_app(offline_app(str(out))).synth()
    except RuntimeError as err:  # cdk-nag (or CloudFormation validation) refused the app: show the findings
        report = out / nag.REPORT_FILE
        findings = []
        if report.exists():
            for plugin in json.loads(report.read_text())["pluginReports"]:
                findings += [f"{v['ruleName']} at {c['constructPath']}" for v in plugin["violations"]
                             for c in v["violatingConstructs"]]
        pytest.fail(f"synthesis failed: {err}\n" + "\n".join(findings))
    return out


@pytest.fixture(scope="module")
def raw(outdir) -> dict[str, dict[str, Any]]:
    return {stack: json.loads((outdir / f"{stack}.template.json").read_text()) for stack in STACK_IDS}


@pytest.fixture(scope="module")
def templates(raw) -> dict[str, Template]:
    return {stack: Template.from_json(template) for stack, template in raw.items()}


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def one(template: dict[str, Any], kind: str) -> dict[str, Any]:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.values()))


def statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement of the IAM policies (managed-by-CDK default policies and inline role policies)."""
    found = []
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy":
            found += resource["Properties"]["PolicyDocument"]["Statement"]
        elif resource["Type"] == "AWS::IAM::Role":
            for policy in resource["Properties"].get("Policies", []):
                found += policy["PolicyDocument"]["Statement"]
    return found


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_statements(template: dict[str, Any], role_name_fragment: str) -> list[dict[str, Any]]:
    """Statements of the default policy attached to the role whose logical id starts with the fragment."""
    found = []
    for resource in resources(template, "AWS::IAM::Policy").values():
        roles = [r["Ref"] for r in resource["Properties"]["Roles"]]
        if any(r.startswith(role_name_fragment) for r in roles):
            found += resource["Properties"]["PolicyDocument"]["Statement"]
    assert found, f"no policy for role {role_name_fragment}"
    return found


# ---------------------------------------------------------------------------------------------- cdk-nag

def test_cdk_nag_has_no_unacknowledged_findings_and_every_acknowledgement_has_a_reason(outdir, raw):
    report = outdir / nag.REPORT_FILE
    if report.exists():
        for plugin in json.loads(report.read_text())["pluginReports"]:
            assert plugin["violations"] == [], plugin["pluginName"]
    acknowledged = [(stack, logical_id, rule) for stack, template in raw.items()
                    for logical_id, resource in template["Resources"].items()
                    for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
                    if rule["id"].startswith("AwsSolutions")]  # CDK acknowledges some CloudFormation-Validate rules
    assert acknowledged, "the acknowledgements are written to the templates (audit trail)"
    assert all(len(rule["reason"]) > 20 for _, _, rule in acknowledged)
    # Only IAM wildcards with reasons, the log bucket's own logging, and the documented exceptions.
    assert {rule["id"].split("[")[0] for _, _, rule in acknowledged} <= {
        "AwsSolutions-IAM5", "AwsSolutions-S1", "AwsSolutions-SM1", "AwsSolutions-AEC6", "AwsSolutions-ECS2"}


def test_synthesis_is_hermetic(outdir):
    """No context look-up is left for the CLI to make against an account (AZs, AMIs, VPCs...)."""
    assert "missing" not in json.loads((outdir / "manifest.json").read_text())


def test_cdk_nag_fails_synthesis_on_a_finding(tmp_path):
    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "Bad")
    s3.Bucket(stack, "Open")  # no SSL enforcement, no access logs
    nag.add_checks(app)
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / nag.REPORT_FILE).read_text())
    rules = {v["ruleName"] for p in report["pluginReports"] for v in p["violations"]}
    assert {"AwsSolutions-S1", "AwsSolutions-S10"} <= rules


def test_no_wildcard_resource_outside_the_actions_iam_cannot_scope(raw):
    for stack, template in raw.items():
        for statement in statements(template):
            if "*" in as_list(statement["Resource"]):
                actions = set(as_list(statement["Action"]))
                assert actions <= STAR_ACTIONS, f"{stack}: {actions} on Resource *"


# ---------------------------------------------------------------------------------------------- Data

@pytest.mark.parametrize("kind", ["raw", "features", "artifacts", "capture"])
def test_data_buckets_are_kms_encrypted_private_versioned_logged_and_ssl_only(raw, kind):
    template = raw["Data"]
    buckets = {v["Properties"]["BucketName"]: (k, v["Properties"])
               for k, v in resources(template, "AWS::S3::Bucket").items()}
    logical_id, props = buckets[NAMES.bucket(kind)]
    key_id = next(iter(resources(template, "AWS::KMS::Key")))
    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert sse["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms",
                                                    "KMSMasterKeyID": {"Fn::GetAtt": [key_id, "Arn"]}}
    assert props["PublicAccessBlockConfiguration"] == {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                                       "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    access_logs_id = buckets[NAMES.bucket("access-logs")][0]
    assert props["LoggingConfiguration"] == {"DestinationBucketName": {"Ref": access_logs_id},
                                             "LogFilePrefix": f"{kind}/"}
    rules = props["LifecycleConfiguration"]["Rules"]
    assert any(r.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays") for r in rules)
    policy = next(p["Properties"] for p in resources(template, "AWS::S3::BucketPolicy").values()
                  if p["Properties"]["Bucket"] == {"Ref": logical_id})
    assert {"Effect": "Deny", "Action": "s3:*", "Principal": {"AWS": "*"},
            "Condition": {"Bool": {"aws:SecureTransport": "false"}}} in [
        {k: v for k, v in st.items() if k != "Resource"} for st in policy["PolicyDocument"]["Statement"]]


def test_every_alarm_notifies_the_stage_alarm_topic(raw):
    """Alarms that notify nobody only turn a console red: each one publishes to the Data stack's topic, which is
    encrypted with the stage key that CloudWatch may use (else the notifications are dropped)."""
    data = raw["Data"]
    [(topic_id, topic)] = resources(data, "AWS::SNS::Topic").items()
    assert topic["Properties"]["TopicName"] == NAMES.alarm_topic
    assert topic["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0] in resources(data, "AWS::KMS::Key")
    key_policy = one(data, "AWS::KMS::Key")["Properties"]["KeyPolicy"]["Statement"]
    [publish] = [st for st in key_policy if st.get("Sid") == "CloudWatchAlarmsPublish"]
    assert publish["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    assert publish["Condition"] == {"StringEquals": {"aws:SourceAccount": STAGE.account}}
    assert set(publish["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    [policy] = resources(data, "AWS::SNS::TopicPolicy").values()  # enforce_ssl: publishing over TLS only
    assert any(st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
               for st in policy["Properties"]["PolicyDocument"]["Statement"])
    assert STAGE.alarm_emails == [] and not resources(data, "AWS::SNS::Subscription")
    alarms = 0
    for name in ("Serving", "RankingService"):
        for alarm in resources(raw[name], "AWS::CloudWatch::Alarm").values():
            assert len(alarm["Properties"]["AlarmActions"]) == 1, name
            assert "Fn::ImportValue" in alarm["Properties"]["AlarmActions"][0], name  # the Data stack's topic
            alarms += 1
    assert alarms >= 6 and topic_id


def test_alarm_emails_subscribe_to_the_topic(tmp_path):
    from infra.stacks.data import DataStack

    stages = cdk_context()["marketrank:stages"]
    context = {"marketrank:stages": {**stages, "dev": {**stages["dev"], "alarm_emails": ["oncall@example.com"]}}}
    app = offline_app(str(tmp_path), context)  # cdk.json's feature flags
    stack = DataStack(app, "Data", stage=stage_config({**cdk_context(), **context}, "dev"))
    Template.from_stack(stack).has_resource_properties("AWS::SNS::Subscription", {
        "Protocol": "email", "Endpoint": "oncall@example.com"})


def test_key_rotation_and_log_buckets(templates, raw):
    templates["Data"].has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    for kind in ("access-logs", "alb-logs"):  # S3 and ALB log delivery cannot write SSE-KMS buckets
        templates["Data"].has_resource_properties("AWS::S3::Bucket", {
            "BucketName": NAMES.bucket(kind),
            "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
            "PublicAccessBlockConfiguration": Match.object_like({"BlockPublicPolicy": True})})
    templates["Data"].has_resource_properties("AWS::S3::Bucket", {
        "BucketName": NAMES.bucket("capture"),
        "LifecycleConfiguration": {"Rules": Match.array_with([Match.object_like({
            "Transitions": [{"StorageClass": "STANDARD_IA", "TransitionInDays": 30}], "ExpirationInDays": 365})])}})


# ---------------------------------------------------------------------------------------------- MlPlatform

def test_pipeline_is_the_definition_pipelines_renders(raw):
    from pipelines.definition import definition_json

    config = NAMES.pipeline_config()
    pipeline = one(raw["MlPlatform"], "AWS::SageMaker::Pipeline")["Properties"]
    assert pipeline["PipelineName"] == config.name
    assert pipeline["RoleArn"] == config.role_arn == NAMES.sagemaker_role_arn
    body = pipeline["PipelineDefinition"]["PipelineDefinitionBody"]
    assert body == definition_json(config)
    rendered = json.loads(body)
    assert NAMES.deploy_function_arn in body and f"s3://{NAMES.bucket('artifacts')}/" in body
    assert {p["Name"] for p in rendered["Parameters"]} >= {"InputDataUri", "ShadowSamplingPercentage"}
    defaults = {p["Name"]: p["DefaultValue"] for p in rendered["Parameters"]}  # the stage's settings, not the SDK's
    assert (defaults["TrainingInstanceType"], defaults["ProcessingInstanceType"]) == (
        STAGE.training_instance_type, STAGE.processing_instance_type)
    assert defaults["ShadowSamplingPercentage"] == STAGE.shadow_sampling_percentage


def test_execution_role_is_scoped_to_the_stage(raw):
    template = raw["MlPlatform"]
    role = resources(template, "AWS::IAM::Role")
    execution = next(k for k, v in role.items() if v["Properties"].get("RoleName") == NAMES.sagemaker_role)
    stmts = {s.get("Sid"): s for s in role_statements(template, execution)}
    s3_resources = {r for sid in ("ListOwnBuckets", "ReadRawAndCapture", "ReadWritePipelineData", "WriteDataCapture")
                    for r in as_list(stmts[sid]["Resource"])}
    assert all(any(NAMES.bucket(k) in r for k in ("raw", "features", "artifacts", "capture")) for r in s3_resources)
    assert f"arn:aws:s3:::{NAMES.bucket('artifacts')}/marketrank/*" in s3_resources
    # the training job's MLflow client writes the run's artifacts to the tracking server's store itself
    assert f"arn:aws:s3:::{NAMES.bucket('artifacts')}/mlflow/*" in as_list(stmts["ReadWritePipelineData"]["Resource"])
    assert all(r.startswith("arn:aws:ecr:") and r.endswith(("tensorflow-training", "tensorflow-inference",
                                                             "sagemaker-spark-processing"))
               for r in stmts["PullSageMakerImages"]["Resource"])
    assert stmts["EcrLogin"]["Action"] == "ecr:GetAuthorizationToken"
    assert stmts["SageMakerMetrics"]["Condition"]["StringLike"]["cloudwatch:namespace"]
    assert all(":log-group:/aws/sagemaker/" in r for r in stmts["OwnLogGroups"]["Resource"])
    assert stmts["ModelRegistry"]["Resource"] == [
        f"arn:aws:sagemaker:{STAGE.region}:{STAGE.account}:model-package-group/{NAMES.model_package_group}",
        f"arn:aws:sagemaker:{STAGE.region}:{STAGE.account}:model-package/{NAMES.model_package_group}/*"]
    assert stmts["PassSelfToJobs"]["Resource"] == NAMES.sagemaker_role_arn
    assert stmts["InvokeDeployStep"]["Resource"] == NAMES.deploy_function_arn


def test_model_registry_and_mlflow_outlive_the_stack(raw):
    for kind in ("AWS::SageMaker::ModelPackageGroup", "AWS::SageMaker::MlflowTrackingServer"):
        resource = one(raw["MlPlatform"], kind)
        assert resource["DeletionPolicy"] == resource["UpdateReplacePolicy"] == "Retain", kind


def test_model_registry_and_mlflow(templates):
    templates["MlPlatform"].has_resource_properties("AWS::SageMaker::ModelPackageGroup", {
        "ModelPackageGroupName": NAMES.model_package_group})
    templates["MlPlatform"].has_resource_properties("AWS::SageMaker::MlflowTrackingServer", {
        "TrackingServerName": NAMES.mlflow_server, "ArtifactStoreUri": f"s3://{NAMES.bucket('artifacts')}/mlflow",
        "RoleArn": {"Fn::GetAtt": [Match.string_like_regexp("^MlflowRole"), "Arn"]},
        "TrackingServerSize": STAGE.mlflow_server_size})
    for name in (NAMES.champion_parameter, NAMES.challenger_parameter):
        templates["MlPlatform"].has_resource_properties("AWS::SSM::Parameter", {"Name": name, "Value": "none",
                                                                               "Tags": Match.absent()})


def test_every_stage_sets_its_pipeline_defaults():
    """Stage settings reach the pipeline config (and so the definition's parameter defaults) for each stage."""
    for name in ("dev", "prod"):
        stage = stage_config(cdk_context(), name)
        config = Names(stage).pipeline_config()
        assert (config.training_instance_type, config.processing_instance_type, config.shadow_sampling_percentage) \
            == (stage.training_instance_type, stage.processing_instance_type, stage.shadow_sampling_percentage)
        env = Names(stage).pipeline_env()
        assert env["MARKETRANK_TRAINING_INSTANCE_TYPE"] == stage.training_instance_type
        assert config.endpoint_instance_type == stage.endpoint_instance_type
        assert env["MARKETRANK_ENDPOINT_INSTANCE_TYPE"] == stage.endpoint_instance_type
        # the Train step logs to the stage's own tracking server by default
        assert config.mlflow_tracking_server_arn.endswith(f":mlflow-tracking-server/{Names(stage).mlflow_server}")


def test_deploy_lambda_environment_and_role(raw, outdir):
    template = raw["MlPlatform"]
    [(function_id, function)] = resources(template, "AWS::Lambda::Function").items()
    function = function["Properties"]
    assert function["FunctionName"] == NAMES.deploy_function and function["Handler"] == HANDLER
    assert function["Runtime"].startswith("python3.1")
    env = function["Environment"]["Variables"]
    config = NAMES.pipeline_config()
    assert env == {
        "MODEL_EXECUTION_ROLE_ARN": NAMES.sagemaker_role_arn, "INSTANCE_TYPE": STAGE.endpoint_instance_type,
        "INSTANCE_COUNT": str(STAGE.endpoint_instance_count),
        "DATA_CAPTURE_URI": f"s3://{NAMES.bucket('capture')}/data-capture",
        "KMS_KEY_ID": env["KMS_KEY_ID"],
        "CHAMPION_PARAMETER": NAMES.champion_parameter, "CHALLENGER_PARAMETER": NAMES.challenger_parameter,
        "PREVIOUS_PARAMETER": NAMES.previous_parameter,
        "CREATE_ENDPOINT": "false",  # the Serving stack creates the endpoint; the Lambda only changes variants
        "CHAMPION_URI": f"{config.champion_uri}model.tar.gz", "ENDPOINT_NAME": config.endpoint_name}
    assert "Fn::ImportValue" in env["KMS_KEY_ID"]  # the Data stack's key
    role_id = function["Role"]["Fn::GetAtt"][0]
    stmts = {s["Sid"]: s for s in role_statements(template, role_id) if "Sid" in s}
    assert stmts["Endpoint"]["Resource"] == NAMES.endpoint_arn
    assert stmts["EndpointConfigs"]["Resource"].endswith(f":endpoint-config/{NAMES.endpoint}-*")
    assert stmts["UpdateToOwnConfigs"]["Resource"] == stmts["EndpointConfigs"]["Resource"]
    assert stmts["UpdateToOwnConfigs"]["Action"] == "sagemaker:UpdateEndpoint"
    assert "sagemaker:CreateEndpoint" not in stmts["Endpoint"]["Action"]
    # the Serving stack's config (a name CloudFormation generates) is readable: the Lambda starts by describing it
    assert stmts["ReadLiveConfig"]["Resource"] == NAMES.arn("sagemaker", "endpoint-config/*")
    assert stmts["ReadLiveConfig"]["Action"] == ["sagemaker:DescribeEndpointConfig", "sagemaker:ListTags"]
    rule = one(template, "AWS::Events::Rule")["Properties"]  # endpoint state changes -> the Lambda's "sync"
    assert rule["EventPattern"] == {"source": ["aws.sagemaker"], "detail-type": ["SageMaker Endpoint State Change"],
                                    "detail": {"EndpointName": [NAMES.endpoint]}}
    assert rule["Targets"][0]["Arn"]["Fn::GetAtt"][0] == function_id
    assert stmts["PublishModels"]["Action"] == "ssm:PutParameter"
    assert len(stmts["PublishModels"]["Resource"]) == 3  # the champion, challenger and rollback-target parameters
    # the rollback target a `cdk deploy`'s config has no tag for: read from its parameter, and only that one
    assert stmts["ReadRollbackTarget"]["Action"] == "ssm:GetParameter"
    assert stmts["ReadRollbackTarget"]["Resource"] in stmts["PublishModels"]["Resource"]
    parameters = {p["Properties"]["Name"]: p["Properties"]["Value"]
                  for p in resources(template, "AWS::SSM::Parameter").values()}
    assert parameters[NAMES.previous_parameter] == "none"
    assert stmts["WriteChampionObject"]["Resource"] == (
        f"arn:aws:s3:::{NAMES.bucket('artifacts')}/marketrank/champion/model.tar.gz")
    assert stmts["PassModelRole"]["Resource"] == NAMES.sagemaker_role_arn

    # The asset holds only the handler's modules, and they import without site-packages (no TF, no SDK).
    asset = outdir / function["Code"]["S3Key"].replace(".zip", "").join(["asset.", ""])
    files = sorted(p.relative_to(asset).as_posix() for p in asset.rglob("*") if p.is_file())
    assert files == sorted(FILES)
    probe = "import pipelines.deploy_lambda, training.storage; import sys; assert 'boto3' not in sys.modules"
    subprocess.run([sys.executable, "-S", "-c", probe], cwd=asset, check=True)


# ---------------------------------------------------------------------------------------------- Serving

def test_endpoint_config_champion_shadow_capture_and_kms(raw):
    template = raw["Serving"]
    parameters = {k: v for k, v in template["Parameters"].items() if v["Type"].startswith("AWS::SSM::Parameter")}
    by_name = {v["Default"]: k for k, v in parameters.items()}
    champion_ref, challenger_ref = by_name[NAMES.champion_parameter], by_name[NAMES.challenger_parameter]
    models = resources(template, "AWS::SageMaker::Model")
    urls = {v["Properties"]["PrimaryContainer"]["ModelDataUrl"]["Ref"]: (k, v) for k, v in models.items()}
    champion_id, champion = urls[champion_ref]
    challenger_id, challenger = urls[challenger_ref]
    assert champion["Condition"] == "HasChampion" and challenger["Condition"] == "HasChallenger"
    assert champion["Properties"]["PrimaryContainer"]["Image"].endswith("/tensorflow-inference:2.14.1-cpu")
    assert champion["Properties"]["ExecutionRoleArn"] == NAMES.sagemaker_role_arn

    config = one(template, "AWS::SageMaker::EndpointConfig")
    props = config["Properties"]
    assert props["ProductionVariants"] == [{
        "VariantName": PRODUCTION, "ModelName": {"Fn::GetAtt": [champion_id, "ModelName"]},
        "InstanceType": STAGE.endpoint_instance_type, "InitialInstanceCount": STAGE.endpoint_instance_count,
        "InitialVariantWeight": 1}]
    assert props["ShadowProductionVariants"] == {"Fn::If": ["HasChallenger", [{
        "VariantName": SHADOW, "ModelName": {"Fn::GetAtt": [challenger_id, "ModelName"]},
        "InstanceType": STAGE.endpoint_instance_type, "InitialInstanceCount": STAGE.endpoint_instance_count,
        "InitialVariantWeight": STAGE.shadow_sampling_percentage / 100}], {"Ref": "AWS::NoValue"}]}
    capture = props["DataCaptureConfig"]
    assert capture["EnableCapture"] is True and capture["InitialSamplingPercentage"] == 100
    assert capture["DestinationS3Uri"] == f"s3://{NAMES.bucket('capture')}/data-capture"
    assert capture["CaptureOptions"] == [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]
    assert "Fn::ImportValue" in capture["KmsKeyId"] and props["KmsKeyId"] == capture["KmsKeyId"]

    endpoint = one(template, "AWS::SageMaker::Endpoint")
    assert endpoint["Properties"]["EndpointName"] == NAMES.pipeline_config().endpoint_name
    assert endpoint["Condition"] == "HasChampion"
    # A config change keeps autoscaling's instance count, takes the new weights and capture (as the Lambda's).
    from pipelines.deploy import RETAIN_VARIANT_PROPERTIES

    assert endpoint["Properties"]["RetainAllVariantProperties"] is True
    assert endpoint["Properties"]["ExcludeRetainedVariantProperties"] == \
        RETAIN_VARIANT_PROPERTIES["ExcludeRetainedVariantProperties"]
    assert template["Conditions"]["HasChampion"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": champion_ref}, "none"]}]}


def test_endpoint_autoscaling_and_alarms(raw, templates):
    template = raw["Serving"]
    target = one(template, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert {k: v for k, v in target["Properties"].items() if k != "Tags"} == {
        "ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{NAMES.endpoint}/variant/{PRODUCTION}",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        "MinCapacity": STAGE.endpoint_instance_count, "MaxCapacity": STAGE.endpoint_max_instance_count}
    assert target["DependsOn"] == ["Endpoint"] and target["Condition"] == "HasChampion"
    templates["Serving"].has_resource_properties("AWS::ApplicationAutoScaling::ScalingPolicy", {
        "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": Match.object_like({
            "TargetValue": STAGE.endpoint_invocations_per_instance,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})})
    alarms = [a["Properties"] for a in resources(template, "AWS::CloudWatch::Alarm").values()]
    found = {(a["MetricName"], {d["Name"]: d["Value"] for d in a["Dimensions"]}["VariantName"]): a for a in alarms}
    for variant in (PRODUCTION, SHADOW):
        latency = found[("ModelLatency", variant)]
        assert latency["ExtendedStatistic"] == "p99"
        assert latency["Threshold"] == STAGE.endpoint_latency_p99_ms * 1000  # microseconds
        for metric in ("Invocation5XXErrors", "InvocationModelErrors"):
            assert found[(metric, variant)]["Threshold"] == 0
    assert all({"Name": "EndpointName", "Value": NAMES.endpoint} in a["Dimensions"] for a in alarms)


# ---------------------------------------------------------------------------------------------- RankingService

def test_redis_is_encrypted_and_reachable_only_from_the_service_and_its_fill_task(raw):
    template = raw["RankingService"]
    redis = one(template, "AWS::ElastiCache::ReplicationGroup")["Properties"]
    assert redis["AtRestEncryptionEnabled"] is True and redis["TransitEncryptionEnabled"] is True
    assert redis["TransitEncryptionMode"] == "required" and "Fn::ImportValue" in redis["KmsKeyId"]
    assert redis["MultiAZEnabled"] is True and redis["NumCacheClusters"] == STAGE.redis_nodes
    redis_sg = redis["SecurityGroupIds"][0]["Fn::GetAtt"][0]
    ingress = [r["Properties"] for r in resources(template, "AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"]["GroupId"] == {"Fn::GetAtt": [redis_sg, "GroupId"]}]
    assert len(ingress) == 2 and all(r["FromPort"] == r["ToPort"] == STAGE.redis_port for r in ingress)
    service_sgs = one(template, "AWS::ECS::Service")["Properties"]["NetworkConfiguration"][
        "AwsvpcConfiguration"]["SecurityGroups"]
    fill_sg = next(k for k, v in resources(template, "AWS::EC2::SecurityGroup").items()
                   if "fill task" in v["Properties"]["GroupDescription"])
    sources = [r["SourceSecurityGroupId"] for r in ingress]
    assert sources[0] in service_sgs or sources[1] in service_sgs
    assert {"Fn::GetAtt": [fill_sg, "GroupId"]} in sources
    assert "SecurityGroupIngress" not in template["Resources"][redis_sg]["Properties"]
    replication_group = next(iter(resources(template, "AWS::ElastiCache::ReplicationGroup").values()))
    assert replication_group["DeletionPolicy"] == replication_group["UpdateReplacePolicy"] == "Snapshot"


def test_the_feature_store_fill_task_reads_features_and_champion_only(raw):
    template = raw["RankingService"]
    tasks = resources(template, "AWS::ECS::TaskDefinition")
    fill = next(v["Properties"] for v in tasks.values()
                if v["Properties"]["ContainerDefinitions"][0]["Name"] == "Materialize")
    container = fill["ContainerDefinitions"][0]
    assert container["Command"] == ["python", "-m", "serving.materialize"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["MARKETRANK_CHAMPION_URI"] == NAMES.champion_object_uri
    assert env["MARKETRANK_FEATURE_STORE"]["Fn::Join"][1][0] == "rediss://"
    api = next(v["Properties"] for v in tasks.values() if v["Properties"]["ContainerDefinitions"][0]["Name"] == "Api")
    assert container["Image"] == api["ContainerDefinitions"][0]["Image"]  # the API's image: one build
    role = fill["TaskRoleArn"]["Fn::GetAtt"][0]
    stmts = {s.get("Sid"): s for s in role_statements(template, role)}
    artifacts = f"arn:aws:s3:::{NAMES.bucket('artifacts')}"
    assert stmts["ReadFeaturesAndChampion"]["Resource"] == [
        f"{artifacts}/marketrank/executions/*", f"{artifacts}/marketrank/champion/model.tar.gz"]
    assert stmts["ListFeatures"]["Condition"]["StringLike"]["s3:prefix"] == ["marketrank/executions/*"]
    outputs = template["Outputs"]
    assert {"MaterializeTaskDefinition", "MaterializeNetwork", "ClusterName"} <= set(outputs)
    # run after every successful execution of this stage's pipeline, on the newest features
    rule = next(v["Properties"] for v in resources(template, "AWS::Events::Rule").values()
                if "Pipeline Execution" in v["Properties"]["EventPattern"]["detail-type"][0])
    assert rule["EventPattern"]["detail"] == {"currentPipelineExecutionStatus": ["Succeeded"],
                                              "pipelineArn": [{"suffix": f":pipeline/{NAMES.pipeline.lower()}"}]}
    [target] = rule["Targets"]
    transformer = target["InputTransformer"]  # the event's own execution, not the newest features
    assert transformer["InputPathsMap"] == {"detail-pipelineExecutionArn": "$.detail.pipelineExecutionArn"}
    # EventBridge puts the event's string in as a JSON value, quotes included
    command = json.loads(transformer["InputTemplate"].replace("<detail-pipelineExecutionArn>", '"ARN"'))[
        "containerOverrides"][0]["command"]
    assert command == ["python", "-m", "serving.materialize", "--executions",
                       f"s3://{NAMES.bucket('artifacts')}/marketrank/executions", "--execution", "ARN"]
    assert target["EcsParameters"]["LaunchType"] == "FARGATE"


def test_api_task_role_container_env_logs_and_alb(raw, templates):
    template = raw["RankingService"]
    task = next(v for v in resources(template, "AWS::ECS::TaskDefinition").values()
                if v["Properties"]["ContainerDefinitions"][0]["Name"] == "Api")["Properties"]
    role_id = task["TaskRoleArn"]["Fn::GetAtt"][0]
    statements = role_statements(template, role_id)
    assert statements[:2] == [
        {"Action": ["sagemaker:InvokeEndpoint", "sagemaker:DescribeEndpoint"], "Effect": "Allow",
         "Resource": NAMES.endpoint_arn},  # DescribeEndpoint: the API's readiness probe
        {"Action": "s3:GetObject", "Effect": "Allow",  # the shadow report, one object
         "Resource": f"arn:aws:s3:::{NAMES.bucket('capture')}/shadow-reports/{NAMES.endpoint}/latest.json"}]
    assert len(statements) == 3 and statements[2]["Action"] == "kms:Decrypt"  # the stage key, imported
    container = task["ContainerDefinitions"][0]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["MARKETRANK_MODEL_BACKEND"] == "sagemaker" and env["MARKETRANK_ENDPOINT_NAME"] == NAMES.endpoint
    assert env["MARKETRANK_SHADOW_REPORT"] == (
        f"s3://{NAMES.bucket('capture')}/shadow-reports/{NAMES.endpoint}/latest.json")
    assert env["MARKETRANK_FEATURE_STORE"]["Fn::Join"][1][0].startswith("rediss://")
    assert container["PortMappings"][0]["ContainerPort"] == 8080
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert "Fn::Sub" in container["Image"]  # built from serving/Dockerfile (a CDK image asset)
    templates["RankingService"].has_resource_properties("AWS::Logs::LogGroup", {
        "RetentionInDays": STAGE.log_retention_days})
    templates["RankingService"].has_resource_properties("AWS::ECS::Cluster", {
        "ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}]})
    templates["RankingService"].has_resource_properties("AWS::EC2::FlowLog", {"ResourceType": "VPC"})
    assert len(resources(template, "AWS::EC2::Subnet")) == 4  # public + private in two AZs
    alb = one(template, "AWS::ElasticLoadBalancingV2::LoadBalancer")["Properties"]
    attributes = {a["Key"]: a["Value"] for a in alb["LoadBalancerAttributes"]}
    assert alb["Scheme"] == "internal" and attributes["access_logs.s3.enabled"] == "true"
    assert "Fn::ImportValue" in attributes["access_logs.s3.bucket"]
    alb_sg = alb["SecurityGroups"][0]["Fn::GetAtt"][0]
    assert [r["CidrIp"] for r in template["Resources"][alb_sg]["Properties"]["SecurityGroupIngress"]] == [
        STAGE.vpc_cidr]


def test_api_autoscaling_and_alarms(raw):
    template = raw["RankingService"]
    target = one(template, "AWS::ApplicationAutoScaling::ScalableTarget")["Properties"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (STAGE.api_desired_count, STAGE.api_max_count)
    metrics = {p["Properties"]["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"][
        "PredefinedMetricType"] for p in resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy").values()}
    assert metrics == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}
    [requests] = [p["Properties"]["TargetTrackingScalingPolicyConfiguration"]
                  for p in resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy").values()
                  if "ALBRequestCountPerTarget" in json.dumps(p)]
    assert requests["TargetValue"] == STAGE.api_requests_per_task_per_second * 60  # the metric is per minute
    alarms = {a["Properties"]["MetricName"]: a["Properties"]
              for a in resources(template, "AWS::CloudWatch::Alarm").values()}
    assert set(alarms) == {"HTTPCode_Target_5XX_Count", "TargetResponseTime", "UnHealthyHostCount"}
    assert alarms["TargetResponseTime"]["Threshold"] == STAGE.api_latency_p99_ms / 1000


def test_api_keep_alive_outlasts_the_load_balancer_idle_timeout(raw):
    import re

    from infra.stacks.ranking_service import ALB_IDLE_TIMEOUT_S

    alb = one(raw["RankingService"], "AWS::ElasticLoadBalancingV2::LoadBalancer")["Properties"]
    attributes = {a["Key"]: a["Value"] for a in alb["LoadBalancerAttributes"]}
    assert attributes["idle_timeout.timeout_seconds"] == str(ALB_IDLE_TIMEOUT_S)
    dockerfile = (Path(__file__).parent.parent / "serving" / "Dockerfile").read_text()
    keep_alive = int(re.search(r'"--timeout-keep-alive", "(\d+)"', dockerfile).group(1))
    assert keep_alive > ALB_IDLE_TIMEOUT_S  # else the ALB reuses connections uvicorn closed: 502s


def test_api_image_from_registry_needs_no_docker():
    from aws_cdk import aws_ecs as ecs

    from infra.stacks.ranking_service import api_image

    stack = cdk.Stack(cdk.App())
    task = ecs.FargateTaskDefinition(stack, "Task")
    task.add_container("Api", image=api_image(stack, "public.ecr.aws/example/marketrank-api:1"))
    template = Template.from_stack(stack).to_json()
    definition = one(template, "AWS::ECS::TaskDefinition")["Properties"]["ContainerDefinitions"][0]
    assert definition["Image"] == "public.ecr.aws/example/marketrank-api:1"


@pytest.mark.parametrize("reference", [":7", "@sha256:" + "ab" * 32])
def test_api_image_from_a_private_ecr_repository_is_pulled_with_a_grant(reference):
    from aws_cdk import aws_ecs as ecs

    from infra.stacks.ranking_service import api_image

    uri = f"111111111111.dkr.ecr.eu-west-1.amazonaws.com/team/marketrank-api{reference}"
    stack = cdk.Stack(cdk.App())
    task = ecs.FargateTaskDefinition(stack, "Task")
    task.add_container("Api", image=api_image(stack, uri))
    template = Template.from_stack(stack).to_json()
    image = one(template, "AWS::ECS::TaskDefinition")["Properties"]["ContainerDefinitions"][0]["Image"]
    assert image["Fn::Join"][1][-1] == f"/team/marketrank-api{reference}"
    pulls = [st for st in statements(template) if "ecr:BatchGetImage" in st["Action"]]
    assert [st["Resource"] for st in pulls] == [
        "arn:aws:ecr:eu-west-1:111111111111:repository/team/marketrank-api"]  # the execution role may pull it


# ---------------------------------------------------------------------------------------------- Ci

def test_github_oidc_deploy_role(raw):
    template = raw["Ci"]
    provider = one(template, "AWS::IAM::OIDCProvider")["Properties"]
    assert provider["Url"] == "https://token.actions.githubusercontent.com"
    assert provider["ClientIdList"] == ["sts.amazonaws.com"]
    role = one(template, "AWS::IAM::Role")
    assert role["Properties"]["RoleName"] == NAMES.github_deploy_role
    trust = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust == [{"Action": "sts:AssumeRoleWithWebIdentity", "Effect": "Allow",
                      "Principal": {"Federated": {"Ref": next(iter(resources(template, "AWS::IAM::OIDCProvider")))}},
                      "Condition": {"StringEquals": {
                          "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
                          "token.actions.githubusercontent.com:sub":
                              f"repo:{STAGE.github_repo}:environment:{STAGE.name}"}}}]
    # ...which is the environment the deploy workflow's job runs in (GitHub then names it in the token's sub)
    import yaml

    workflow = yaml.safe_load((Path(__file__).parent.parent / ".github/workflows/deploy.yml").read_text())
    assert workflow["jobs"]["deploy"]["environment"] == "${{ inputs.stage || 'dev' }}" and STAGE.name == "dev"
    stmts = {s["Sid"]: s for s in statements(template) if "Sid" in s}
    a, r, q = STAGE.account, STAGE.region, STAGE.cdk_qualifier
    assert stmts["CdkBootstrapRoles"]["Resource"] == [
        f"arn:aws:iam::{a}:role/cdk-{q}-{kind}-role-{a}-{r}"
        for kind in ("deploy", "file-publishing", "image-publishing", "lookup")]
    assert stmts["UpsertPipeline"]["Resource"] == f"arn:aws:sagemaker:{r}:{a}:pipeline/{NAMES.pipeline}"
    assert stmts["PassPipelineRole"]["Resource"] == NAMES.sagemaker_role_arn
    assert not any(action.startswith(("iam:Create", "iam:Put", "iam:Attach", "cloudformation:"))
                   for s in stmts.values() for action in as_list(s["Action"]))


# ---------------------------------------------------------------------------------------------- names

def test_pipeline_env_reproduces_the_stack_config():
    from pipelines.definition import PipelineConfig

    out = subprocess.run([sys.executable, "-m", "infra.names"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert PipelineConfig.from_env(env) == NAMES.pipeline_config()
    assert len(NAMES.bucket("access-logs")) <= 63
    role = subprocess.run([sys.executable, "-m", "infra.names", "--deploy-role"], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    assert role == f"arn:aws:iam::{STAGE.account}:role/{NAMES.github_deploy_role}"


def test_a_stages_own_spark_image_can_be_pulled():
    import dataclasses

    from infra.images import images
    from infra.stacks.ml_platform import image_repositories

    found = images(STAGE.region)
    assert image_repositories(found, STAGE) == found.repository_arns()
    own = dataclasses.replace(STAGE, spark_image_uri=f"{STAGE.account}.dkr.ecr.{STAGE.region}.amazonaws.com/spark-pa:1")
    assert f"arn:aws:ecr:{STAGE.region}:{STAGE.account}:repository/spark-pa" in image_repositories(found, own)
