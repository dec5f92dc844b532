"""AWS Lambda entry point of the pipeline's DeployShadow step (and of promote / rollback automation).

Event: ``{"action": "deploy_shadow" | "promote" | "rollback" | "reject" | "sync", "endpoint_name": ...,
"model_package_arn": ..., "shadow_sampling_percentage": 20}``, or an EventBridge "SageMaker Endpoint State
Change" event (a ``sync``: re-publish the live variants once an update has finished or failed).
Environment (set by the CDK stack): ``MODEL_EXECUTION_ROLE_ARN``,
``INSTANCE_TYPE``, ``INSTANCE_COUNT``, ``DATA_CAPTURE_URI``, optional ``KMS_KEY_ID``, ``CHAMPION_PARAMETER`` and
``CHALLENGER_PARAMETER`` (SSM parameters holding the live production and shadow models' data URLs, or ``none``:
``cdk deploy`` reads them, so it redeploys what is live and never rolls the model back), optional
``PREVIOUS_PARAMETER`` (the rollback target as a variant tag value, or ``none``: a `cdk deploy` puts the endpoint
on CloudFormation's config, which has no previous-champion tag, and a rollback then reads it from here),
``CHAMPION_URI`` (S3 object the pipeline's Evaluate step reads as the champion) and ``CREATE_ENDPOINT``.

Ownership: with ``CREATE_ENDPOINT=false`` (the CDK Serving stack's setting) the endpoint is CloudFormation's to
create; this Lambda only changes the variants of an existing one. A first model, with no endpoint yet, is then
published to the champion parameter (action ``publish_champion``) and the next ``cdk deploy`` creates the endpoint
serving it. Without the setting (tests, a hand-made account) the first deploy creates the endpoint itself.

The outputs are top-level strings, as SageMaker's LambdaStep expects.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pipelines import deploy

log = logging.getLogger("marketrank.deploy_lambda")
ACTIONS = ("deploy_shadow", "promote", "rollback", "reject", "sync")
#: The parameters' value while no model holds the role (the Serving stack's conditions test for it).
NO_MODEL = "none"


def _model_data_url(sm, model_name: str) -> str:
    """The artifact a SageMaker Model serves: from its container, or its model package's (DeployError if none)."""
    described = sm.describe_model(ModelName=model_name)
    # CloudFormation's models (the Serving stack) use PrimaryContainer; the Lambda's own use Containers.
    container = described.get("PrimaryContainer") or (described.get("Containers") or [{}])[0]
    if container.get("ModelDataUrl"):
        return container["ModelDataUrl"]
    if container.get("ModelPackageName"):
        package = sm.describe_model_package(ModelPackageName=container["ModelPackageName"])
        url = package["InferenceSpecification"]["Containers"][0].get("ModelDataUrl")
        if url:
            return url
    raise deploy.DeployError(f"model {model_name!r} has no model data URL to publish")


def publish_challenger(sm, ssm, model_name: str | None, env: dict[str, str]) -> None:
    """Point the challenger SSM parameter at the shadow model's artifact (``none`` without a shadow)."""
    if env.get("CHALLENGER_PARAMETER"):
        url = _model_data_url(sm, model_name) if model_name else NO_MODEL
        ssm.put_parameter(Name=env["CHALLENGER_PARAMETER"], Value=url, Type="String", Overwrite=True)


def read_previous(ssm, env: dict[str, str]) -> deploy.Variant | None:
    """The rollback target kept in ``PREVIOUS_PARAMETER`` (None: no parameter, ``none``, or not created yet)."""
    if not env.get("PREVIOUS_PARAMETER") or ssm is None:
        return None
    try:
        value = ssm.get_parameter(Name=env["PREVIOUS_PARAMETER"])["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        return None
    try:
        return None if value == NO_MODEL else deploy.variant_from_tag(value)
    except deploy.DeployError as err:
        raise deploy.DeployError(f"SSM parameter {env['PREVIOUS_PARAMETER']}: {err}") from err


def publish_previous(ssm, previous: dict[str, Any] | None, env: dict[str, str]) -> None:
    """Set ``PREVIOUS_PARAMETER`` to a settled endpoint's rollback target (``none`` without one). Only from a
    settled endpoint: written when an update starts, a failed update would leave the target of a config that
    never went live (the config's own tag covers the time until the update's ``sync``)."""
    if env.get("PREVIOUS_PARAMETER"):
        value = deploy.variant_tag(deploy.Variant(**previous)) if previous else NO_MODEL
        ssm.put_parameter(Name=env["PREVIOUS_PARAMETER"], Value=value, Type="String", Overwrite=True)


def _creates_endpoint(env: dict[str, str]) -> bool:
    value = env.get("CREATE_ENDPOINT", "true").strip().lower()
    if value not in ("true", "false"):
        raise deploy.DeployError(f"CREATE_ENDPOINT must be 'true' or 'false', got {env['CREATE_ENDPOINT']!r}")
    return value == "true"


def publish_champion(sm, s3, ssm, model_name: str, env: dict[str, str]) -> str:
    """Point the SSM parameter and the champion S3 object at the live production model's artifact."""
    url = _model_data_url(sm, model_name)
    if env.get("CHAMPION_PARAMETER"):
        ssm.put_parameter(Name=env["CHAMPION_PARAMETER"], Value=url, Type="String", Overwrite=True)
    if env.get("CHAMPION_URI"):
        from training.storage import split_s3

        src_bucket, src_key = split_s3(url)
        bucket, key = split_s3(env["CHAMPION_URI"])
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key})
    return url


def run(event: dict[str, Any], sm, s3=None, ssm=None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The handler's logic with its clients injected (tests pass moto clients)."""
    env = dict(os.environ if env is None else env)
    action = event.get("action", "deploy_shadow")
    if action not in ACTIONS:
        raise deploy.DeployError(f"unknown action {action!r}; expected one of {ACTIONS}")
    endpoint = event.get("endpoint_name") or env.get("ENDPOINT_NAME")
    if not endpoint:
        raise deploy.DeployError("no endpoint_name in the event and no ENDPOINT_NAME in the environment")
    creates_endpoint = _creates_endpoint(env)
    backend = deploy.SageMakerBackend(sm, endpoint, data_capture_uri=env.get("DATA_CAPTURE_URI"),
                                      kms_key_id=env.get("KMS_KEY_ID") or None,
                                      previous_fallback=lambda: read_previous(ssm, env))
    before = backend.current()
    if action == "deploy_shadow" and before is None and not creates_endpoint:
        return _publish_first_model(event, backend, sm, s3, ssm, env)
    if action == "deploy_shadow":
        if not event.get("model_package_arn"):
            raise deploy.DeployError(f"endpoint {endpoint!r}: deploy_shadow needs model_package_arn")
        raw_sampling = event.get("shadow_sampling_percentage", 20)
        try:
            sampling = float(raw_sampling)
        except (TypeError, ValueError):
            sampling = float("nan")
        if not 0 < sampling <= 100:  # checked before anything is created
            raise deploy.DeployError(f"endpoint {endpoint!r}: shadow_sampling_percentage must be in (0, 100], "
                                     f"got {raw_sampling!r}")
        model = backend.ensure_model(event["model_package_arn"], env["MODEL_EXECUTION_ROLE_ARN"])
        challenger = deploy.Variant(model, instance_type=env.get("INSTANCE_TYPE", "ml.m5.large"),
                                    instance_count=int(env.get("INSTANCE_COUNT", "1")), weight=sampling / 100)
        result = deploy.deploy_shadow(backend, challenger)
    elif action == "promote":
        result = deploy.promote(backend)
    elif action == "reject":
        result = deploy.reject(backend)
    elif action == "rollback":
        if before is not None and before.previous is None and backend.live_config_managed is False:
            raise deploy.DeployError(
                f"endpoint {endpoint!r} runs a config marketrank's deploy did not make (a `cdk deploy`'s) and no "
                f"rollback target is known ({env.get('PREVIOUS_PARAMETER') or 'PREVIOUS_PARAMETER unset'}): "
                "nothing was changed; use `reject` to drop a challenger")
        result = deploy.rollback(backend)
    else:  # sync: change nothing, re-publish what is live (after a failed update, a partial earlier call, ...)
        result = {**deploy.describe(backend), "action": "sync"}
    state = result["state"]
    production = (state or {}).get("production") or {}
    # Published on every call, changed or not: a retry after a failure between UpdateEndpoint and these writes
    # (or a `sync`) puts them right, and `cdk deploy` never reads a stale champion.
    champion_url = publish_champion(sm, s3, ssm, production["model_name"], env) if production else None
    publish_challenger(sm, ssm, ((state or {}).get("shadow") or {}).get("model_name"), env)
    # Settled: a noop was planned on a settled endpoint (``deploy._plan``); a sync described the status already.
    settled = result["action"] == "noop" or (action == "sync" and result.get("status") not in deploy.BUSY_STATUSES)
    if state is not None and settled:
        publish_previous(ssm, state.get("previous"), env)
    changed = production and (before is None or before.production is None
                              or before.production.model_name != production["model_name"])
    log.info("endpoint %s: %s -> %s", endpoint, result["action"], result["endpoint_config_name"])
    return {"action": result["action"], "endpoint_config_name": result["endpoint_config_name"] or "",
            "production_model": production.get("model_name", ""),
            "shadow_model": ((state or {}).get("shadow") or {}).get("model_name", ""),
            "champion_model_data_url": (champion_url or "") if changed else "", "state": json.dumps(state)}


def _publish_first_model(event: dict[str, Any], backend: deploy.SageMakerBackend, sm, s3, ssm,
                         env: dict[str, str]) -> dict[str, Any]:
    """No endpoint and CloudFormation creates it: make the model the champion the next ``cdk deploy`` serves."""
    if not event.get("model_package_arn"):
        raise deploy.DeployError(f"endpoint {backend.endpoint_name!r}: deploy_shadow needs model_package_arn")
    if not env.get("CHAMPION_PARAMETER"):
        raise deploy.DeployError(f"endpoint {backend.endpoint_name!r} does not exist and CREATE_ENDPOINT=false, "
                                 "but no CHAMPION_PARAMETER is set for `cdk deploy` to create it from")
    model = backend.ensure_model(event["model_package_arn"], env["MODEL_EXECUTION_ROLE_ARN"])
    url = publish_champion(sm, s3, ssm, model, env)
    publish_challenger(sm, ssm, None, env)
    publish_previous(ssm, None, env)  # a new endpoint: nothing from an older one to roll back to
    log.info("endpoint %s does not exist: model %s published as champion (%s); `cdk deploy` of the Serving stack "
             "creates the endpoint", backend.endpoint_name, model, url)
    return {"action": "publish_champion", "endpoint_config_name": "", "production_model": model, "shadow_model": "",
            "champion_model_data_url": url or "", "state": json.dumps(None)}


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    import boto3

    logging.getLogger().setLevel(logging.INFO)
    if event.get("source") == "aws.sagemaker":  # EventBridge: an endpoint update finished (or failed)
        event = {"action": "sync", "endpoint_name": (event.get("detail") or {}).get("EndpointName")}
    return run(event, boto3.client("sagemaker"), boto3.client("s3"), boto3.client("ssm"))
