"""Deploy the CDK app (``infra/app.py``) with the real ``cdk`` CLI (npm ``aws-cdk``, pinned in package.json) to
local AWS emulators, then check the resources with boto3. Dummy credentials, loopback only: never real AWS.

The app is synthesised once by ``cdk synth`` (the dev stage of ``cdk.json``; the API image from a registry through
``marketrank:api_image`` because no Docker engine builds one here), and that cloud assembly is deployed to:

* **moto server** (``tests/moto_launcher.py``): ``cdk bootstrap`` + ``cdk deploy --all``. Then, as the pipeline's
  deploy step would, the champion and challenger SSM parameters get model URLs and the Serving stack is deployed
  again: the endpoint appears, serving the champion's model data. moto executes change sets without outputs, so
  it deploys with ``--method direct``; and it does not re-resolve SSM parameters on update, so the redeploy is a
  destroy + deploy of Serving.
* **LocalStack** community in host mode (Python 3.13 venv, ``make localstack``): ``cdk bootstrap`` + ``cdk deploy``
  through CloudFormation change sets of the stacks it can run, Data and Ci, to check that bucket policies, key
  rotation, the GitHub OIDC provider and the deploy role's trust really apply. It cannot create Lambda functions
  without Docker (MlPlatform), so Serving (which needs MlPlatform's parameters) is out too, and RankingService
  fails on the ALB attributes its scaling policy reads (ELBv2 is not in the community edition).

What each emulator drops (bucket encryption on LocalStack; bucket policies, public access blocks, lifecycle rules,
access logging, alarms, scaling and shadow variants on moto) is checked only by ``tests/test_infra_stacks.py``.
The README's infrastructure section has the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest
from emulators import Emulator, LocalStack, MotoServer, base_env, cdk, running

from infra.config import API_IMAGE_KEY, stage_config
from infra.names import BUCKETS, Names, cdk_context

# The first test of each emulator pays for synth, bootstrap and deploys (module fixtures): more than the default 600 s
# on a slow CI runner is possible.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STAGE = stage_config(cdk_context())  # the default stage (dev): account 111111111111, eu-west-1
NAMES = Names(STAGE)
ENVIRONMENT = f"aws://{STAGE.account}/{STAGE.region}"
#: Any registry image: the emulators never pull it. A real deploy builds serving/Dockerfile instead.
API_IMAGE = f"{STAGE.account}.dkr.ecr.{STAGE.region}.amazonaws.com/marketrank-api:emulator"
DATA_BUCKETS = ("raw", "features", "artifacts", "capture")
LOG_BUCKETS = tuple(kind for kind in BUCKETS if kind not in DATA_BUCKETS)
CHAMPION_URL = f"s3://{NAMES.bucket('artifacts')}/marketrank/models/champion/model.tar.gz"
CHALLENGER_URL = f"s3://{NAMES.bucket('artifacts')}/marketrank/models/challenger/model.tar.gz"
CLI_FLAGS = ["--no-notices", "--ci"]


@dataclasses.dataclass
class Assembly:
    path: Path
    stacks: dict[str, str]  # construct id -> CloudFormation stack name
    synth_s: float


@dataclasses.dataclass
class Deployment:
    emulator: Emulator
    env: dict[str, str]
    timings: dict[str, float]
    facts: dict  # what the tests read of an earlier phase

    def client(self, service: str):
        return self.emulator.client(service)

    def stack_statuses(self) -> dict[str, str]:
        return {s["StackName"]: s["StackStatus"] for s in self.client("cloudformation").describe_stacks()["Stacks"]}

    def outputs(self, stack_name: str) -> dict[str, str]:
        stack = self.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"][0]
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs") or []}


def timed(timings: dict[str, float], name: str, action):
    began = time.monotonic()
    result = action()
    timings[name] = round(time.monotonic() - began, 1)
    return result


@pytest.fixture(scope="module")
def assembly(tmp_path_factory) -> Assembly:
    """``cdk synth`` of the repository's app (cdk.json runs ``python3 -m infra.app``: this venv's python)."""
    out = tmp_path_factory.mktemp("cdk") / "cdk.out"
    env = base_env(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    began = time.monotonic()
    cdk(["synth", "--quiet", "--output", str(out), "-c", f"{API_IMAGE_KEY}={API_IMAGE}", *CLI_FLAGS], env)
    manifest = json.loads((out / "manifest.json").read_text())
    stacks = {name: artifact["properties"]["stackName"] for name, artifact in manifest["artifacts"].items()
              if artifact["type"] == "aws:cloudformation:stack"}
    return Assembly(out, stacks, round(time.monotonic() - began, 1))


def deploy(deployment: Deployment, assembly: Assembly, stacks: list[str], *extra: str, name: str = "deploy") -> str:
    args = ["deploy", *stacks, "--app", str(assembly.path), "--require-approval", "never", "--progress", "events",
            *extra, *CLI_FLAGS]
    return timed(deployment.timings, name, lambda: cdk(args, deployment.env, emulator=deployment.emulator)).stdout


def bootstrap(deployment: Deployment, assembly: Assembly) -> None:
    timed(deployment.timings, "bootstrap", lambda: cdk(
        ["bootstrap", ENVIRONMENT, "--app", str(assembly.path), *CLI_FLAGS], deployment.env,
        emulator=deployment.emulator))


# -- moto ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto(assembly: Assembly):
    with running(MotoServer, STAGE.account, STAGE.region) as emulator:
        # The CLI puts the template URL for CloudFormation on this endpoint; moto only parses it with a host name.
        env = emulator.aws_env(CDK_HOME=str(emulator.dir / "cdk-home"),
                               AWS_ENDPOINT_URL_S3_FOR_CLOUDFORMATION=f"http://localhost:{emulator.port}")
        deployment = Deployment(emulator, env, {"start": round(emulator.started_s, 1)}, {})
        bootstrap(deployment, assembly)
        # Phase 1: everything, before any model exists (the champion parameter is "none").
        deployment.facts["deploy_all_output"] = deploy(deployment, assembly, ["--all"], "--method", "direct",
                                                       "--concurrency", "3")
        deployment.facts["stacks_after_deploy_all"] = deployment.stack_statuses()
        deployment.facts["endpoints_before_champion"] = deployment.client("sagemaker").list_endpoints()["Endpoints"]
        parameters = deployment.client("ssm").get_parameters(
            Names=[NAMES.champion_parameter, NAMES.challenger_parameter])["Parameters"]
        deployment.facts["parameters_before_champion"] = {p["Name"]: p["Value"] for p in parameters}
        # Phase 2: the deploy step has promoted a champion (and a shadow challenger); Serving is deployed again.
        ssm = deployment.client("ssm")
        for name, url in ((NAMES.champion_parameter, CHAMPION_URL), (NAMES.challenger_parameter, CHALLENGER_URL)):
            ssm.put_parameter(Name=name, Value=url, Type="String", Overwrite=True)
        timed(deployment.timings, "destroy Serving", lambda: cdk(
            ["destroy", "Serving", "--exclusively", "--force", "--app", str(assembly.path), *CLI_FLAGS], env,
            emulator=emulator))
        deploy(deployment, assembly, ["Serving"], "--exclusively", "--method", "direct", name="redeploy Serving")
        print(f"\nmoto deploy timings (s): synth {assembly.synth_s}, {deployment.timings}")
        yield deployment


def test_moto_cdk_deploy_all_creates_every_stack(moto: Deployment, assembly: Assembly):
    assert set(assembly.stacks) == {"Data", "MlPlatform", "Serving", "RankingService", "Ci"}
    statuses = moto.facts["stacks_after_deploy_all"]
    for stack_name in assembly.stacks.values():
        assert statuses.get(stack_name) == "CREATE_COMPLETE", (stack_name, statuses)
    assert moto.facts["deploy_all_output"].count("✅") == len(assembly.stacks)
    assert statuses["CDKToolkit"] == "CREATE_COMPLETE"
    key_arn = moto.outputs(assembly.stacks["Data"])["KeyArn"]
    assert key_arn.startswith(f"arn:aws:kms:{STAGE.region}:{STAGE.account}:key/")


def test_moto_data_buckets_encrypted_with_the_stage_key(moto: Deployment, assembly: Assembly):
    s3, kms = moto.client("s3"), moto.client("kms")
    key_arn = moto.outputs(assembly.stacks["Data"])["KeyArn"]
    existing = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
    assert {NAMES.bucket(kind) for kind in BUCKETS} <= existing
    for kind in DATA_BUCKETS:
        (rule,) = s3.get_bucket_encryption(Bucket=NAMES.bucket(kind))["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
    for kind in LOG_BUCKETS:  # S3 server access logs and ALB logs can only be written to SSE-S3 buckets
        (rule,) = s3.get_bucket_encryption(Bucket=NAMES.bucket(kind))["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    key_id = key_arn.rsplit("/", 1)[1]
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"]
    aliases = {a["AliasName"]: a.get("TargetKeyId") for a in kms.list_aliases()["Aliases"]}
    assert aliases[NAMES.kms_alias] == key_id


def _statements(iam, role_name: str) -> list[dict]:
    statements = []
    for policy_name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
        statements += document["Statement"]
    return statements


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_moto_sagemaker_execution_role_is_scoped_to_the_stage(moto: Deployment, assembly: Assembly):
    iam = moto.client("iam")
    role = iam.get_role(RoleName=NAMES.sagemaker_role)["Role"]
    assert role["Arn"] == NAMES.sagemaker_role_arn
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert iam.list_attached_role_policies(RoleName=NAMES.sagemaker_role)["AttachedPolicies"] == []
    statements = _statements(iam, NAMES.sagemaker_role)
    assert statements
    key_arn = moto.outputs(assembly.stacks["Data"])["KeyArn"]
    own_buckets = tuple(f"arn:aws:s3:::{NAMES.bucket(kind)}" for kind in DATA_BUCKETS)
    for statement in statements:
        actions, resources = _as_list(statement["Action"]), _as_list(statement["Resource"])
        if any(action.startswith("s3:") for action in actions):
            assert all(resource.startswith(own_buckets) for resource in resources), statement
        if any(action.startswith("kms:") for action in actions):
            assert resources == [key_arn], statement


def test_moto_pipeline_deploy_function_and_champion_parameters(moto: Deployment):
    function = moto.client("lambda").get_function(FunctionName=NAMES.deploy_function)["Configuration"]
    assert function["FunctionArn"] == NAMES.deploy_function_arn
    assert function["Handler"] == "pipelines.deploy_lambda.handler"
    # The stack creates both parameters as "none" (no model yet): the endpoint waits for a champion.
    assert moto.facts["parameters_before_champion"] == {NAMES.champion_parameter: "none",
                                                         NAMES.challenger_parameter: "none"}
    assert moto.facts["endpoints_before_champion"] == []
    groups = moto.client("logs").describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{NAMES.deploy_function}")
    assert [g.get("retentionInDays") for g in groups["logGroups"]] == [STAGE.log_retention_days]


def test_moto_endpoint_serves_the_champion_from_the_ssm_parameter(moto: Deployment, assembly: Assembly):
    sagemaker = moto.client("sagemaker")
    endpoint = sagemaker.describe_endpoint(EndpointName=NAMES.endpoint)
    assert endpoint["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]  # moto drops ShadowProductionVariants (checked by assertions)
    assert (variant["VariantName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        "champion", STAGE.endpoint_instance_type, STAGE.endpoint_instance_count)
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == CHAMPION_URL
    assert model["PrimaryContainer"]["Image"].endswith("/tensorflow-inference:2.14.1-cpu")
    assert model["ExecutionRoleArn"] == NAMES.sagemaker_role_arn
    key_arn = moto.outputs(assembly.stacks["Data"])["KeyArn"]
    capture = config["DataCaptureConfig"]
    assert capture["EnableCapture"] and capture["KmsKeyId"] == key_arn
    assert capture["DestinationS3Uri"].startswith(f"s3://{NAMES.bucket('capture')}/")
    # The challenger's model exists too: the shadow variant's (moto keeps the model, not the variant).
    urls = {sagemaker.describe_model(ModelName=m["ModelName"])["PrimaryContainer"]["ModelDataUrl"]
            for m in sagemaker.list_models()["Models"]}
    assert urls == {CHAMPION_URL, CHALLENGER_URL}
    assert moto.outputs(assembly.stacks["Serving"])["EndpointName"] == NAMES.endpoint


def test_moto_ranking_service_runs_the_api_image(moto: Deployment, assembly: Assembly):
    ecs, iam = moto.client("ecs"), moto.client("iam")
    services = [service for cluster in ecs.list_clusters()["clusterArns"]
                for service in ecs.describe_services(cluster=cluster,
                                                     services=ecs.list_services(cluster=cluster)["serviceArns"]
                                                     )["services"]]
    (service,) = services
    assert service["desiredCount"] == STAGE.api_desired_count
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    (container,) = task["containerDefinitions"]
    assert container["image"] == API_IMAGE
    # moto keeps only the containers and the memory of a task definition, and drops the service's LaunchType (it
    # reports EC2) and load balancers: Fargate, CPU and the roles are checked by the assertion tests.
    assert int(task["memory"]) == STAGE.api_memory_mib
    resources = moto.client("cloudformation").describe_stack_resources(
        StackName=assembly.stacks["RankingService"])["StackResources"]
    (task_role,) = [r["PhysicalResourceId"] for r in resources
                    if r.get("ResourceType") == "AWS::IAM::Role" and r["LogicalResourceId"].startswith("TaskRole")]
    invoke = [s for s in _statements(iam, task_role) if "sagemaker:InvokeEndpoint" in _as_list(s["Action"])]
    assert [_as_list(s["Resource"]) for s in invoke] == [[NAMES.endpoint_arn]]
    assert moto.client("elbv2").describe_load_balancers()["LoadBalancers"]
    assert [v for v in moto.client("ec2").describe_vpcs()["Vpcs"] if not v.get("IsDefault")]


def test_moto_ci_deploy_role_exists(moto: Deployment):
    role = moto.client("iam").get_role(RoleName=NAMES.github_deploy_role)["Role"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"]["StringEquals"]["token.actions.githubusercontent.com:sub"] == (
        f"repo:{STAGE.github_repo}:environment:{STAGE.name}")  # the deploy job's GitHub environment


# -- LocalStack -----------------------------------------------------------------------------------------------------
LOCALSTACK_STACKS = ("Data", "Ci")


@pytest.fixture(scope="module")
def localstack(assembly: Assembly):
    with running(LocalStack, STAGE.account, STAGE.region) as emulator:
        env = emulator.aws_env(CDK_HOME=str(emulator.dir / "cdk-home"))
        deployment = Deployment(emulator, env, {"start": round(emulator.started_s, 1)}, {})
        bootstrap(deployment, assembly)
        deployment.facts["deploy_output"] = deploy(deployment, assembly, list(LOCALSTACK_STACKS), "--exclusively")
        print(f"\nLocalStack deploy timings (s): {deployment.timings}")
        yield deployment


def test_localstack_deploys_data_and_ci_through_change_sets(localstack: Deployment, assembly: Assembly):
    statuses = localstack.stack_statuses()
    for stack in LOCALSTACK_STACKS:
        assert statuses.get(assembly.stacks[stack]) == "CREATE_COMPLETE", statuses
    assert statuses["CDKToolkit"] == "CREATE_COMPLETE"


def test_localstack_bucket_policies_deny_insecure_transport(localstack: Deployment):
    s3 = localstack.client("s3")
    for kind in BUCKETS:
        bucket = NAMES.bucket(kind)
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        deny = [s for s in policy["Statement"] if s["Effect"] == "Deny"
                and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
        assert len(deny) == 1, (bucket, policy)
        assert _as_list(deny[0]["Action"]) == ["s3:*"]
        assert sorted(_as_list(deny[0]["Resource"])) == [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
        assert s3.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"


def test_localstack_kms_key_rotates_and_has_the_stage_alias(localstack: Deployment, assembly: Assembly):
    kms = localstack.client("kms")
    key_arn = localstack.outputs(assembly.stacks["Data"])["KeyArn"]
    key_id = key_arn.rsplit("/", 1)[1]
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"]
    assert kms.describe_key(KeyId=NAMES.kms_alias)["KeyMetadata"]["Arn"] == key_arn


def test_localstack_github_deploy_role_trust_and_scoped_policy(localstack: Deployment, assembly: Assembly):
    """The trust's condition and the policy as IAM stored them (the AWS::IAM::OIDCProvider itself is emulated by
    neither LocalStack community nor moto: the role's Federated principal reads "unknown" here)."""
    iam = localstack.client("iam")
    role = iam.get_role(RoleName=NAMES.github_deploy_role)["Role"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"]["StringEquals"] == {
        "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
        "token.actions.githubusercontent.com:sub": f"repo:{STAGE.github_repo}:environment:{STAGE.name}"}
    statements = _statements(iam, NAMES.github_deploy_role)
    resources = {r for s in statements for r in _as_list(s["Resource"])}
    assert resources and "*" not in resources
    # The key's ARN came through the Data stack's export, resolved by LocalStack's change set.
    kms = [s for s in statements if any(a.startswith("kms:") for a in _as_list(s["Action"]))]
    assert [_as_list(s["Resource"]) for s in kms] == [[localstack.outputs(assembly.stacks["Data"])["KeyArn"]]]
