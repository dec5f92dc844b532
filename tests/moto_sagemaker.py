"""A small moto extension: what ``pipelines.deploy`` needs from SageMaker that moto 5.2.5 lacks.

moto's SageMaker backend (measured on 5.2.5):

* ``CreateEndpointConfig`` accepts ``ShadowProductionVariants`` and drops them: ``DescribeEndpointConfig`` never
  returns them, and ``DescribeEndpoint`` has no shadow variants either. (``DataCaptureConfig`` and ``KmsKeyId`` are
  kept: moto's ``FakeEndpointConfig`` dumps every attribute into its response.)
* ``UpdateEndpoint`` is not implemented (``NotImplementedError``).
* ``CreateEndpoint`` is ``InService`` at once, and ``CreateEndpoint`` / ``CreateEndpointConfig`` silently overwrite
  an existing resource of the same name, where SageMaker answers ``ValidationException: Cannot create already
  existing ...`` (which is what would expose a deploy that re-creates instead of re-using).

``sagemaker_extension()`` patches moto's classes in-process (``moto.mock_aws()``, not server mode) and restores
them on exit. The request and response member names come from botocore's service model (``UpdateEndpointInput``,
``DescribeEndpointConfigOutput``, ``PendingDeploymentSummary``, ...): the extension checks, when activated, that
every member it reads or writes is in that model, so a botocore that renames one fails here, loudly.

Timing model (deterministic, no clocks): the extension advances time by one step per ``DescribeEndpoint`` call,
the way a client polls. After ``CreateEndpoint`` the endpoint is ``Creating`` and after ``UpdateEndpoint`` it is
``Updating`` for the next ``transition_describes`` DescribeEndpoint calls (default 1); the call after those finds
it ``InService``. With ``transition_describes=None`` it stays in transition until ``ext.complete(name)`` (or
``ext.complete()`` for all). ``transition_describes=0`` gives moto's old "InService at once".

While ``Updating`` -- as ``PendingDeploymentSummary`` ("the summary of an in-progress deployment when an endpoint
is creating or updating with a new endpoint configuration") implies -- ``DescribeEndpoint`` still shows the old
``EndpointConfigName`` / ``ProductionVariants`` / ``ShadowProductionVariants`` and carries the new ones in
``PendingDeploymentSummary``; they switch when the endpoint is ``InService``. ``UpdateEndpoint`` on an endpoint
that is not ``InService`` is rejected as SageMaker does: ``ValidationException: Cannot update in-progress
endpoint "<arn>".``

``CreateEndpointConfig`` checks its tags as the service does (botocore's ``TagKey`` / ``TagValue`` pattern and
lengths: letters, numbers, white space and ``_.:/=+-@``), where moto accepts anything: a JSON tag value passed
here and failed every promotion on AWS.

Not modelled: DeploymentConfig (blue/green, rolling), RetainAllVariantProperties / ExcludeRetainedVariantProperties
(accepted, ignored), failures and rollbacks (``Failed`` / ``RollingBack``), ``DeleteEndpoint`` while in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import unicodedata
import weakref
from collections.abc import Iterator
from typing import Any

import botocore.session
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models as sm_models
from moto.sagemaker import responses as sm_responses
from moto.sagemaker.exceptions import ValidationError

TRANSITIONAL = ("Creating", "Updating")

#: SageMaker's TagKey / TagValue pattern (Java regex) and what ``tag_text_ok`` implements of it.
TAG_PATTERN = "([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)"


def tag_text_ok(text: str) -> bool:
    """``TAG_PATTERN``: each character a letter (L*), a separator (Z*), a number (N*) or one of ``_.:/=+-@``."""
    return all(unicodedata.category(c)[0] in "LZN" or c in "_.:/=+-@" for c in text)


def check_tags(tags: list[dict[str, str]] | None) -> None:
    for tag in tags or []:
        key, value = tag.get("Key", ""), tag.get("Value", "")
        if not (1 <= len(key) <= 128 and tag_text_ok(key) and len(value) <= 256 and tag_text_ok(value)):
            raise ValidationError(message=f"1 validation error detected: Value '{value}' at 'tags' failed to "
                                          f"satisfy constraint: Member must satisfy regular expression pattern: "
                                          f"{TAG_PATTERN} (key {key!r})")


#: Every (shape, member) this extension reads from a request or writes into a response.
SHAPE_MEMBERS: dict[str, tuple[str, ...]] = {
    "CreateEndpointConfigInput": ("EndpointConfigName", "ProductionVariants", "ShadowProductionVariants",
                                  "DataCaptureConfig", "KmsKeyId", "AsyncInferenceConfig", "Tags"),
    "DescribeEndpointConfigOutput": ("EndpointConfigName", "EndpointConfigArn", "ProductionVariants",
                                     "ShadowProductionVariants", "DataCaptureConfig", "KmsKeyId"),
    "UpdateEndpointInput": ("EndpointName", "EndpointConfigName"),
    "UpdateEndpointOutput": ("EndpointArn",),
    "DescribeEndpointOutput": ("EndpointName", "EndpointArn", "EndpointConfigName", "EndpointStatus",
                               "ProductionVariants", "ShadowProductionVariants", "PendingDeploymentSummary",
                               "DataCaptureConfig", "LastModifiedTime"),
    "ProductionVariantSummary": ("VariantName", "CurrentWeight", "DesiredWeight", "CurrentInstanceCount",
                                 "DesiredInstanceCount"),
    "PendingDeploymentSummary": ("EndpointConfigName", "ProductionVariants", "ShadowProductionVariants",
                                 "StartTime"),
    "PendingProductionVariantSummary": ("VariantName", "DesiredWeight", "DesiredInstanceCount", "InstanceType"),
}


def check_service_model() -> None:
    """Raise if botocore's SageMaker model lacks an operation, shape or member that the extension relies on."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    if "UpdateEndpoint" not in model.operation_names:
        raise RuntimeError("botocore's SageMaker model has no UpdateEndpoint operation")
    missing = [f"{shape}.{member}" for shape, members in SHAPE_MEMBERS.items()
               for member in members if member not in model.shape_for(shape).members]
    if missing:
        raise RuntimeError(f"botocore's SageMaker model lacks members the moto extension uses: {missing}")
    statuses = model.shape_for("EndpointStatus").enum
    if not {"Creating", "Updating", "InService"} <= set(statuses):
        raise RuntimeError(f"unexpected EndpointStatus enum: {statuses}")


@dataclasses.dataclass
class _Transition:
    backend: Any  # the SageMakerModelBackend holding the endpoint
    status: str  # Creating | Updating
    config_name: str  # the config the endpoint is moving to
    remaining: int | None  # DescribeEndpoint calls left in the transition; None: until complete()
    started: Any = dataclasses.field(default_factory=utcnow)


class SageMakerExtension:
    """The active extension: its transitions, and ``complete()`` to finish them by hand.

    ``transition_describes`` may be changed while active; it applies to the transitions started afterwards.
    """

    def __init__(self, transition_describes: int | None):
        if transition_describes is not None and transition_describes < 0:
            raise ValueError("transition_describes must be >= 0 or None")
        self.transition_describes = transition_describes
        self._transitions: weakref.WeakKeyDictionary[Any, _Transition] = weakref.WeakKeyDictionary()

    # ---------------------------------------------------------------------- state

    def _start(self, backend, endpoint, status: str, config_name: str) -> None:
        if self.transition_describes == 0:
            self._finish(backend, endpoint, config_name)
            return
        endpoint.endpoint_status = status
        endpoint.last_modified_time = utcnow()
        self._transitions[endpoint] = _Transition(backend, status, config_name, self.transition_describes)

    def _finish(self, backend, endpoint, config_name: str) -> None:
        config = backend.endpoint_configs.get(config_name)
        if config is not None:  # (deleted meanwhile: AWS loses visibility too; keep what is shown)
            endpoint.endpoint_config_name = config_name
            endpoint.production_variants = endpoint._process_production_variants(config.production_variants)
            endpoint.shadow_production_variants = endpoint._process_production_variants(
                getattr(config, "shadow_production_variants", None) or [])
            endpoint.data_capture_config = config.data_capture_config
        endpoint.endpoint_status = "InService"
        endpoint.last_modified_time = utcnow()
        self._transitions.pop(endpoint, None)

    def _tick(self, backend, endpoint) -> None:
        """One DescribeEndpoint call: one step of time."""
        transition = self._transitions.get(endpoint)
        if transition is None or transition.remaining is None:
            return
        if transition.remaining == 0:
            self._finish(backend, endpoint, transition.config_name)
        else:
            transition.remaining -= 1

    def complete(self, endpoint_name: str | None = None) -> None:
        """Finish the transition of ``endpoint_name`` (every endpoint's when None): it is InService on its new
        config. Raises KeyError for a named endpoint that is not in transition."""
        found = False
        for endpoint, transition in list(self._transitions.items()):
            if endpoint_name is None or endpoint.endpoint_name == endpoint_name:
                self._finish(transition.backend, endpoint, transition.config_name)
                found = True
        if endpoint_name is not None and not found:
            raise KeyError(f"endpoint {endpoint_name!r} is not creating or updating")

    # ---------------------------------------------------------------------- responses

    def _pending_summary(self, endpoint) -> dict[str, Any] | None:
        transition = self._transitions.get(endpoint)
        if transition is None or transition.status != "Updating":
            return None
        config = transition.backend.endpoint_configs.get(transition.config_name)

        def pending(variants: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
            out = []
            for variant in variants or []:
                item = {"VariantName": variant["VariantName"], "DesiredWeight": variant.get("InitialVariantWeight"),
                        "DesiredInstanceCount": variant.get("InitialInstanceCount"),
                        "InstanceType": variant.get("InstanceType")}
                out.append({k: v for k, v in item.items() if v is not None})
            return out or None

        summary = {"EndpointConfigName": transition.config_name, "StartTime": transition.started,
                   "ProductionVariants": pending(config.production_variants if config else None),
                   "ShadowProductionVariants": pending(getattr(config, "shadow_production_variants", None))}
        return {k: v for k, v in summary.items() if v is not None}


def _arn(kind: str, name: str, backend) -> str:
    return sm_models.arn_formatter(kind, name, backend.account_id, backend.region_name)


_active: SageMakerExtension | None = None
_MISSING = object()


def _patches(ext: SageMakerExtension) -> dict[tuple[type, str], Any]:
    Backend, Response = sm_models.SageMakerModelBackend, sm_responses.SageMakerResponse
    FakeEndpoint, FakeEndpointConfig = sm_models.FakeEndpoint, sm_models.FakeEndpointConfig
    orig_create_config = Backend.create_endpoint_config
    orig_create_endpoint = Backend.create_endpoint
    orig_describe_endpoint = Backend.describe_endpoint
    orig_config_response = FakeEndpointConfig.response_object
    orig_endpoint_response = FakeEndpoint.response_object

    # ---- backend ----

    def create_endpoint_config(self, *args: Any, shadow_production_variants: list[dict[str, Any]] | None = None,
                               **kwargs: Any):
        name = kwargs["endpoint_config_name"] if "endpoint_config_name" in kwargs else args[0]
        if name in self.endpoint_configs:
            raise ValidationError(message=f'Cannot create already existing endpoint configuration '
                                          f'"{_arn("endpoint-config", name, self)}".')
        check_tags(kwargs.get("tags"))
        shadow = shadow_production_variants or None
        if shadow:
            self.validate_production_variants(shadow)  # the shadow's models exist
        config = orig_create_config(self, *args, **kwargs)
        if shadow:
            try:
                config.validate_production_variants(shadow)  # instance types
            except ValidationError:
                del self.endpoint_configs[name]
                raise
        config.shadow_production_variants = shadow
        return config

    def create_endpoint(self, endpoint_name: str, endpoint_config_name: str, tags: list[dict[str, str]]):
        if endpoint_name in self.endpoints:
            raise ValidationError(message=f'Cannot create already existing endpoint '
                                          f'"{_arn("endpoint", endpoint_name, self)}".')
        if endpoint_config_name not in self.endpoint_configs:
            raise ValidationError(message=f'Could not find endpoint configuration '
                                          f'"{_arn("endpoint-config", endpoint_config_name, self)}".')
        endpoint = orig_create_endpoint(self, endpoint_name, endpoint_config_name, tags)
        config = self.endpoint_configs[endpoint_config_name]
        endpoint.shadow_production_variants = endpoint._process_production_variants(
            getattr(config, "shadow_production_variants", None) or [])
        ext._start(self, endpoint, "Creating", endpoint_config_name)
        return endpoint

    def describe_endpoint(self, endpoint_name: str) -> dict[str, Any]:
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is not None:
            ext._tick(self, endpoint)
        return orig_describe_endpoint(self, endpoint_name)

    def update_endpoint(self, endpoint_name: str, endpoint_config_name: str) -> str:
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is None:
            raise ValidationError(message=f'Could not find endpoint "{_arn("endpoint", endpoint_name, self)}".')
        if endpoint_config_name not in self.endpoint_configs:
            raise ValidationError(message=f'Could not find endpoint configuration '
                                          f'"{_arn("endpoint-config", endpoint_config_name, self)}".')
        if endpoint.endpoint_status != "InService":
            raise ValidationError(message=f'Cannot update in-progress endpoint "{endpoint.arn}".')
        ext._start(self, endpoint, "Updating", endpoint_config_name)
        return endpoint.arn

    # ---- models' response dicts ----

    def config_response_object(self) -> dict[str, Any]:
        response = orig_config_response.fget(self)
        response.pop("ShadowProductionVariants", None)
        if getattr(self, "shadow_production_variants", None):
            response["ShadowProductionVariants"] = self.shadow_production_variants
        return response

    def endpoint_response_object(self) -> dict[str, Any]:
        response = orig_endpoint_response.fget(self)
        response.pop("ShadowProductionVariants", None)
        if getattr(self, "shadow_production_variants", None):
            response["ShadowProductionVariants"] = self.shadow_production_variants
        summary = ext._pending_summary(self)
        if summary:
            response["PendingDeploymentSummary"] = summary
        return response

    # ---- responses (request parsing; member names from the service model) ----

    def response_create_endpoint_config(self) -> ActionResult:
        config = self.sagemaker_backend.create_endpoint_config(
            endpoint_config_name=self._get_param("EndpointConfigName"),
            async_inference_config=self._get_param("AsyncInferenceConfig"),
            production_variants=self._get_param("ProductionVariants"),
            data_capture_config=self._get_param("DataCaptureConfig"),
            tags=self._get_param("Tags"),
            kms_key_id=self._get_param("KmsKeyId"),
            shadow_production_variants=self._get_param("ShadowProductionVariants"),
        )
        return ActionResult({"EndpointConfigArn": config.endpoint_config_arn})

    def response_update_endpoint(self) -> ActionResult:
        arn = self.sagemaker_backend.update_endpoint(endpoint_name=self._get_param("EndpointName"),
                                                     endpoint_config_name=self._get_param("EndpointConfigName"))
        return ActionResult({"EndpointArn": arn})

    return {
        (Backend, "create_endpoint_config"): create_endpoint_config,
        (Backend, "create_endpoint"): create_endpoint,
        (Backend, "describe_endpoint"): describe_endpoint,
        (Backend, "update_endpoint"): update_endpoint,
        (FakeEndpointConfig, "response_object"): property(config_response_object),
        (FakeEndpoint, "response_object"): property(endpoint_response_object),
        (Response, "create_endpoint_config"): response_create_endpoint_config,
        (Response, "update_endpoint"): response_update_endpoint,
    }


@contextlib.contextmanager
def sagemaker_extension(*, transition_describes: int | None = 1) -> Iterator[SageMakerExtension]:
    """Patch moto's SageMaker backend, models and responses for the duration of the block (see the module doc).

    Use inside or around ``moto.mock_aws()``; not re-entrant. Yields the ``SageMakerExtension`` (``complete()``).
    """
    global _active
    if _active is not None:
        raise RuntimeError("sagemaker_extension() is already active")
    check_service_model()
    ext = SageMakerExtension(transition_describes)
    patches = _patches(ext)
    saved = {(cls, name): cls.__dict__.get(name, _MISSING) for cls, name in patches}
    for (cls, name), value in patches.items():
        setattr(cls, name, value)
    _active = ext
    try:
        yield ext
    finally:
        for (cls, name), value in saved.items():
            if value is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value)
        _active = None
