"""Deployment: the challenger in shadow of the champion, promotion and rollback, each idempotent.

One module serves the pipeline's Lambda (``pipelines.deploy_lambda``), the CLI (``marketrank endpoint ...``),
the local run and the tests. The decisions are pure functions from the endpoint's current state to the next
one (``plan_*``); a backend reads and applies states: ``SageMakerBackend`` (boto3: Model, EndpointConfig with a
ShadowProductionVariant and data capture, CreateEndpoint / UpdateEndpoint) or ``LocalBackend`` (a JSON manifest
that the local endpoint serves).

Idempotency: an EndpointConfig's name is a hash of the state it encodes, so re-applying a state finds the
config already there and the endpoint already on it, and does nothing. Promotion keeps the old champion's
model as ``previous`` (an EndpointConfig tag) for rollback; a retried promote or rollback finds nothing left
to do and says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

PREVIOUS_TAG = "marketrank:previous-production"
MANAGED_TAG = "marketrank:managed-by"  # on the EndpointConfigs this module creates
#: When this module last put a config live (an ISO time, set again whenever a config is reused): the start of
#: the capture records that belong to its variants. A reused config's CreationTime can be weeks old.
APPLIED_TAG = "marketrank:applied-at"
#: SageMaker's tag values: letters, numbers, white space and ``_.:/=+-@``, at most 256 characters (no JSON).
TAG_VALUE = re.compile(r"[\w .:/=+\-@]{0,256}")
#: On UpdateEndpoint the live instance counts stay (Application Auto Scaling owns them: a promotion at peak must
#: not drop the champion to its minimum), while the new config's weights and data capture apply.
RETAIN_VARIANT_PROPERTIES = {"RetainAllVariantProperties": True, "ExcludeRetainedVariantProperties": [
    {"VariantPropertyType": "DesiredWeight"}, {"VariantPropertyType": "DataCaptureConfig"}]}
#: Endpoint statuses during which its described config may be stale and no update is accepted.
BUSY_STATUSES = ("Creating", "Updating", "SystemUpdating", "RollingBack")
PRODUCTION, SHADOW = "champion", "challenger"  # variant names


class DeployError(RuntimeError):
    """A deployment request that cannot be carried out; the message names the endpoint."""


class EndpointBusy(DeployError):
    """The endpoint is being created or updated: retry once it is InService (a pipeline execution that failed on
    this is retried with RetryPipelineExecution, which re-runs the failed step only)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    model_name: str
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    #: Production: 1.0. Shadow: the share of production requests copied to it (0.2 = 20%).
    weight: float = 1.0


def variant_tag(variant: Variant) -> str:
    """A Variant as a tag value: ``model_name=m-v3 instance_type=ml.m5.large instance_count=1 weight=1.0``."""
    value = " ".join(f"{key}={value}" for key, value in dataclasses.asdict(variant).items())
    if not TAG_VALUE.fullmatch(value):
        raise DeployError(f"variant {variant} does not fit a SageMaker tag value: {value!r}")
    return value


def variant_from_tag(value: str) -> Variant:
    """The Variant ``variant_tag`` wrote (DeployError naming the value if it is not one)."""
    try:
        fields = dict(item.split("=", 1) for item in value.split())
        return Variant(model_name=fields["model_name"], instance_type=fields["instance_type"],
                       instance_count=int(fields["instance_count"]), weight=float(fields["weight"]))
    except (KeyError, ValueError) as err:
        raise DeployError(f"tag {PREVIOUS_TAG} holds {value!r}, not a variant ({type(err).__name__}: {err})") from err


@dataclasses.dataclass(frozen=True)
class EndpointState:
    production: Variant | None = None
    shadow: Variant | None = None
    #: The champion before the last promotion, kept for rollback.
    previous: Variant | None = None

    def config_suffix(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointState:
        return cls(**{k: Variant(**v) if v else None for k, v in data.items()})


# ---------------------------------------------------------------------------------------------- plans (pure)

def plan_deploy_shadow(current: EndpointState | None, challenger: Variant) -> tuple[str, EndpointState]:
    """First model: it becomes production. Otherwise the champion stays and the challenger shadows it."""
    if current is None or current.production is None:
        return "create", EndpointState(production=dataclasses.replace(challenger, weight=1.0))
    if current.production.model_name == challenger.model_name:
        return "noop", current
    if current.shadow == challenger:
        return "noop", current
    return "shadow", dataclasses.replace(current, shadow=challenger)


def plan_promote(current: EndpointState | None) -> tuple[str, EndpointState | None]:
    """The shadow becomes production; the old champion is kept as ``previous``."""
    if current is None or current.production is None:
        raise DeployError("nothing is deployed: there is no endpoint to promote on")
    if current.shadow is None:
        return "noop", current
    production = dataclasses.replace(current.shadow, weight=1.0, instance_count=current.production.instance_count)
    return "promote", EndpointState(production=production, shadow=None, previous=current.production)


def plan_rollback(current: EndpointState | None) -> tuple[str, EndpointState | None]:
    """Back to the previous champion (any shadow is dropped too). A second rollback has nothing to do.
    With no promotion to undo, a shadow deployment is undone instead (the challenger is dropped)."""
    if current is None or current.production is None:
        raise DeployError("nothing is deployed: there is no endpoint to roll back")
    if current.previous is None:
        return plan_reject(current)
    return "rollback", EndpointState(production=current.previous, shadow=None, previous=None)


def plan_reject(current: EndpointState | None) -> tuple[str, EndpointState | None]:
    """Drop the shadow challenger and leave the live champion (and its rollback target) alone: what a shadow
    report's "rollback" recommendation means. Idempotent: with no shadow there is nothing to do."""
    if current is None or current.production is None:
        raise DeployError("nothing is deployed: there is no endpoint to reject a challenger on")
    if current.shadow is None:
        return "noop", current
    return "drop-shadow", dataclasses.replace(current, shadow=None)


# ---------------------------------------------------------------------------------------------- backends

class Backend(Protocol):
    endpoint_name: str

    def current(self) -> EndpointState | None: ...

    def apply(self, state: EndpointState) -> str: ...

    def ensure_settled(self) -> None: ...

    def describe_extra(self) -> dict[str, Any]: ...

    def live_since(self) -> datetime | None:
        """When the live variants were configured (None: no endpoint): the first capture record that can
        belong to them. A shadow report reads from here on, since variant names are reused by every deployment."""
        ...


def _apply(backend: Backend, action: str, state: EndpointState | None) -> dict[str, Any]:
    config = backend.apply(state) if action != "noop" and state is not None else None
    return {"action": action, "endpoint": backend.endpoint_name, "endpoint_config_name": config,
            "state": state.to_dict() if state else None}


def _plan(backend: Backend, plan, *args: Any) -> tuple[str, EndpointState | None]:
    """Plan from a settled endpoint (mid-update it still describes the old config) with errors naming it."""
    backend.ensure_settled()
    try:
        return plan(backend.current(), *args)
    except DeployError as err:
        raise DeployError(f"endpoint {backend.endpoint_name!r}: {err}") from err


def deploy_shadow(backend: Backend, challenger: Variant) -> dict[str, Any]:
    return _apply(backend, *_plan(backend, plan_deploy_shadow, challenger))


def promote(backend: Backend) -> dict[str, Any]:
    return _apply(backend, *_plan(backend, plan_promote))


def rollback(backend: Backend) -> dict[str, Any]:
    return _apply(backend, *_plan(backend, plan_rollback))


def reject(backend: Backend) -> dict[str, Any]:
    return _apply(backend, *_plan(backend, plan_reject))


def describe(backend: Backend) -> dict[str, Any]:
    state = backend.current()
    return {"endpoint": backend.endpoint_name, "state": state.to_dict() if state else None,
            **backend.describe_extra()}


class SageMakerBackend:
    """Reads and writes a real (or moto) SageMaker endpoint with boto3."""

    def __init__(self, sagemaker_client, endpoint_name: str, *, data_capture_uri: str | None = None,
                 kms_key_id: str | None = None, previous_fallback: Callable[[], Variant | None] | None = None):
        self.sm, self.endpoint_name = sagemaker_client, endpoint_name
        self.data_capture_uri, self.kms_key_id = data_capture_uri, kms_key_id
        #: Reads the rollback target when the live config is not one of this backend's (CloudFormation's, after a
        #: `cdk deploy`, carries no previous-champion tag): the deploy Lambda keeps it in an SSM parameter. Called
        #: only then, so a bad parameter cannot fail calls on our own configs.
        self.previous_fallback = previous_fallback
        #: Whether the config ``current()`` last read was made by this module (None before a read).
        self.live_config_managed: bool | None = None

    def _error(self, err: Exception, doing: str) -> DeployError:
        return DeployError(f"endpoint {self.endpoint_name!r}: {doing} failed: {err}")

    def _endpoint(self) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.sm.describe_endpoint(EndpointName=self.endpoint_name)
        except ClientError as err:
            if "Could not find" in str(err) or err.response["Error"]["Code"] in ("ValidationException",
                                                                                  "ResourceNotFound"):
                return None
            raise self._error(err, "DescribeEndpoint") from err

    def current(self) -> EndpointState | None:
        endpoint = self._endpoint()
        if endpoint is None:
            return None
        config = self.sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])

        def variant(raw: dict[str, Any] | None) -> Variant | None:
            if not raw:
                return None
            return Variant(model_name=raw["ModelName"], instance_type=raw.get("InstanceType", "ml.m5.large"),
                           instance_count=int(raw.get("InitialInstanceCount", 1)),
                           weight=float(raw.get("InitialVariantWeight", 1.0)))

        tags = self._tags(config)
        previous = variant_from_tag(tags[PREVIOUS_TAG]) if tags.get(PREVIOUS_TAG) else None
        self.live_config_managed = MANAGED_TAG in tags
        if not self.live_config_managed:  # not our config: its tags say nothing about the rollback target
            previous = self.previous_fallback() if self.previous_fallback is not None else None
        return EndpointState(production=variant((config.get("ProductionVariants") or [None])[0]),
                             shadow=variant((config.get("ShadowProductionVariants") or [None])[0]),
                             previous=previous)

    def _tags(self, config: dict[str, Any]) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.sm.list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"]}

    def _current_capture(self) -> dict[str, Any] | None:
        """The live config's DataCaptureConfig, kept when this backend was not given one (a caller without
        ``DATA_CAPTURE_URI``, e.g. tests or a hand-made account)."""
        endpoint = self._endpoint()
        if endpoint is None:
            return None
        return self.sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"]).get(
            "DataCaptureConfig")

    def _config_spec(self, state: EndpointState) -> dict[str, Any]:
        def variant(v: Variant, name: str) -> dict[str, Any]:
            return {"VariantName": name, "ModelName": v.model_name, "InstanceType": v.instance_type,
                    "InitialInstanceCount": v.instance_count, "InitialVariantWeight": v.weight}

        spec: dict[str, Any] = {"ProductionVariants": [variant(state.production, PRODUCTION)]}
        if state.shadow is not None:
            spec["ShadowProductionVariants"] = [variant(state.shadow, SHADOW)]
        kept = None if self.data_capture_uri else self._current_capture()
        if kept:
            spec["DataCaptureConfig"] = kept
        elif self.data_capture_uri:
            spec["DataCaptureConfig"] = {
                "EnableCapture": True, "InitialSamplingPercentage": 100, "DestinationS3Uri": self.data_capture_uri,
                "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
                "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
                **({"KmsKeyId": self.kms_key_id} if self.kms_key_id else {})}
        if self.kms_key_id:
            spec["KmsKeyId"] = self.kms_key_id
        return spec

    def ensure_settled(self) -> None:
        endpoint = self._endpoint()
        if endpoint is not None and endpoint["EndpointStatus"] in BUSY_STATUSES:
            raise EndpointBusy(f"endpoint {self.endpoint_name!r} is {endpoint['EndpointStatus']}: retry later")

    def apply(self, state: EndpointState) -> str:
        from botocore.exceptions import ClientError

        endpoint = self._endpoint()
        if endpoint is not None and endpoint["EndpointStatus"] in BUSY_STATUSES:
            raise EndpointBusy(f"endpoint {self.endpoint_name!r} is {endpoint['EndpointStatus']}: retry later")
        name = f"{self.endpoint_name}-{state.config_suffix()}"
        applied = {"Key": APPLIED_TAG, "Value": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tags = [{"Key": MANAGED_TAG, "Value": "pipelines.deploy"}, applied]
        if state.previous is not None:
            tags.append({"Key": PREVIOUS_TAG, "Value": variant_tag(state.previous)})
        try:
            try:
                config = self.sm.describe_endpoint_config(EndpointConfigName=name)
            except ClientError:
                config = None
                self.sm.create_endpoint_config(EndpointConfigName=name, Tags=tags, **self._config_spec(state))
            going_live = endpoint is None or endpoint["EndpointConfigName"] != name
            if config is not None and going_live:  # an earlier state again: its records start now, not then
                self.sm.add_tags(ResourceArn=config["EndpointConfigArn"], Tags=[applied])
            if endpoint is None:
                self.sm.create_endpoint(EndpointName=self.endpoint_name, EndpointConfigName=name)
            elif going_live:
                self.sm.update_endpoint(EndpointName=self.endpoint_name, EndpointConfigName=name,
                                        **RETAIN_VARIANT_PROPERTIES)
        except ClientError as err:
            raise self._error(err, f"applying endpoint config {name}") from err
        return name

    def ensure_model(self, model_package_arn: str, role_arn: str) -> str:
        """A SageMaker Model for a registered package (named after the package version; reused if present)."""
        from botocore.exceptions import ClientError

        match = re.search(r"model-package/([^/]+)/(\d+)$", model_package_arn)
        if not match:
            raise DeployError(f"endpoint {self.endpoint_name!r}: not a versioned model package ARN: "
                              f"{model_package_arn!r}")
        name = f"{match.group(1)}-v{match.group(2)}"[:63]
        try:
            self.sm.describe_model(ModelName=name)
        except ClientError:
            self.sm.create_model(ModelName=name, ExecutionRoleArn=role_arn,
                                 Containers=[{"ModelPackageName": model_package_arn}])
        return name

    def describe_extra(self) -> dict[str, Any]:
        endpoint = self._endpoint()
        return {"status": endpoint["EndpointStatus"] if endpoint else "absent",
                "endpoint_config_name": endpoint["EndpointConfigName"] if endpoint else None}

    def live_since(self) -> datetime | None:
        """When the live EndpointConfig was put live: its ``APPLIED_TAG`` (set by ``apply``, again when a config
        is reused), else (CloudFormation's config) its CreationTime, just before the update that put it live.
        Not the endpoint's LastModifiedTime, which every autoscaling change of an instance count moves. While
        the endpoint is updating, this is still the old config's time (its records are still being written)."""
        endpoint = self._endpoint()
        if endpoint is None:
            return None
        config = self.sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        applied = self._tags(config).get(APPLIED_TAG)
        when = datetime.fromisoformat(applied) if applied else config["CreationTime"]
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


class LocalBackend:
    """The local endpoint's manifest (``<workspace>/endpoints/<name>.json``): same states, no AWS."""

    def __init__(self, manifest_dir: str | Path, endpoint_name: str = "marketrank"):
        self.endpoint_name = endpoint_name
        self.path = Path(manifest_dir) / f"{endpoint_name}.json"

    def current(self) -> EndpointState | None:
        if not self.path.exists():
            return None
        state = self._manifest().get("state")
        if not isinstance(state, dict):
            raise DeployError(f"endpoint manifest {self.path} is unreadable: no 'state' object")
        return EndpointState.from_dict(state)

    def _manifest(self) -> dict[str, Any]:
        from training.storage import json_object  # stdlib only, and in the Lambda's bundle

        try:
            return json_object(self.path.read_text(), f"endpoint manifest {self.path}")
        except ValueError as err:
            raise DeployError(str(err)) from None

    def ensure_settled(self) -> None:  # a manifest is replaced atomically: never mid-update
        return None

    def apply(self, state: EndpointState) -> str:
        name = f"{self.endpoint_name}-{state.config_suffix()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint": self.endpoint_name, "endpoint_config_name": name,
                                   "state": state.to_dict(),
                                   "updated_at": datetime.now(timezone.utc).isoformat()}, indent=2))
        os.replace(tmp, self.path)  # the local endpoint never reads a half-written manifest
        return name

    def describe_extra(self) -> dict[str, Any]:
        return {"status": "InService" if self.path.exists() else "absent", "manifest": str(self.path)}

    def live_since(self) -> datetime | None:
        """When the manifest was last written (its ``updated_at``; the file's mtime for older manifests): the
        local endpoint serves a new manifest within one poll."""
        if not self.path.exists():
            return None
        written = self._manifest().get("updated_at")
        if written:
            return datetime.fromisoformat(written)
        return datetime.fromtimestamp(self.path.stat().st_mtime, timezone.utc)
