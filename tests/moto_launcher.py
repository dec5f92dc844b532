"""``moto_server`` with fixes for moto's CloudFormation gaps that stop the project's stacks from deploying.

Run as ``python tests/moto_launcher.py -H 127.0.0.1 -p PORT`` (what ``emulators.MotoServer`` does). Each patch
below works around one moto (5.2.5) bug in the emulator, never in the stacks; drop a patch when moto fixes its bug.
The two that replace moto code check that code still looks as expected and refuse to start otherwise; the others
wrap moto functions.

* ``AWS::KMS::Key`` with ``Tags``: moto passes CloudFormation's ``Key``/``Value`` tags to a backend that reads
  ``TagKey``/``TagValue``, raises ``KeyError`` and reports the key as an undefined resource
  ("instance of Fn::GetAtt references undefined resource"). CDK tags every key.
* ``Fn::GetAtt`` of a resource type moto does not model (``AWS::SageMaker::MlflowTrackingServer``, say): moto
  skips such resources but then crashes validating an output that reads one of their attributes, or refuses the
  template. CloudFormation would return the attribute; here it resolves to ``unsupported-by-moto:<id>.<attr>``.
* A ``KeyError`` raised while moto creates a resource (a property it expects but the template lacks) is
  swallowed by the lazy resource map's ``Mapping.get``: the resource is silently missing and the stack still
  reports ``CREATE_COMPLETE``. Re-raised here as an error that names the resource, so the deploy fails loudly.
* ``AWS::SageMaker::Endpoint`` ignores its ``EndpointName`` (moto declares no name property for the type) and
  makes up a name; the ranking API and the deploy Lambda find the endpoint by its name.
* ``ExecuteChangeSet``: moto does not recompute the stack's outputs, so exports of a stack created from a change
  set are missing. Not patched: the deploy tests use ``cdk deploy --method direct`` on moto instead.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any


def _patch_kms_key_tags() -> None:
    from moto.kms.models import Key

    original = Key.create_from_cloudformation_json.__func__
    if "tags=properties.get(\"Tags\", [])" not in inspect.getsource(original):
        raise RuntimeError("moto's Key.create_from_cloudformation_json changed: review tests/moto_launcher.py")

    def create_from_cloudformation_json(cls, resource_name: str, cloudformation_json: Any, account_id: str,
                                        region_name: str, **kwargs: Any):
        properties = dict(cloudformation_json.get("Properties", {}))
        properties["Tags"] = [{"TagKey": tag["Key"], "TagValue": tag["Value"]} if "Key" in tag else tag
                              for tag in properties.get("Tags", [])]
        return original(cls, resource_name, {**cloudformation_json, "Properties": properties}, account_id,
                        region_name, **kwargs)

    Key.create_from_cloudformation_json = classmethod(create_from_cloudformation_json)


def _unsupported_getatt(value: Any, resource_map: Any) -> str | None:
    """The placeholder for ``{"Fn::GetAtt": [id, attr]}`` when ``id`` is a resource type moto does not model."""
    from moto.cloudformation import parsing

    if not (isinstance(value, dict) and "Fn::GetAtt" in value):
        return None
    target = value["Fn::GetAtt"]
    logical_id, attribute = target if isinstance(target, list) else target.split(".", 1)
    definition = resource_map._resource_json_map.get(logical_id)
    if not definition or definition["Type"] in parsing.NULL_MODELS:
        return None
    if definition["Type"].startswith("Custom::") or definition["Type"] in parsing.get_model_map():
        return None
    return f"unsupported-by-moto:{logical_id}.{attribute}"


def _patch_getatt_of_unsupported_types() -> None:
    from moto.cloudformation import parsing

    clean_json, validate_outputs = parsing.clean_json, parsing.ResourceMap.validate_outputs

    def clean_json_tolerant(resource_json: Any, resources_map: Any) -> Any:
        placeholder = _unsupported_getatt(resource_json, resources_map)
        return placeholder if placeholder is not None else clean_json(resource_json, resources_map)

    def validate_outputs_tolerant(self) -> None:
        template = self._template
        outputs = template.get("Outputs") or {}
        self._template = {**template, "Outputs": {key: output for key, output in outputs.items()
                                                  if _unsupported_getatt(output.get("Value"), self) is None}}
        try:
            validate_outputs(self)
        finally:
            self._template = template

    parsing.clean_json = clean_json_tolerant  # clean_json recurses through the module global
    parsing.ResourceMap.validate_outputs = validate_outputs_tolerant


class ResourceCreationError(RuntimeError):
    pass


def _patch_silent_resource_failures() -> None:
    from moto.cloudformation import parsing

    parse_and_create_resource = parsing.parse_and_create_resource

    def parse_and_create_resource_loudly(logical_id: str, resource_json: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return parse_and_create_resource(logical_id, resource_json, *args, **kwargs)
        except KeyError as error:
            raise ResourceCreationError(f"moto could not create {logical_id} ({resource_json.get('Type')}): "
                                        f"KeyError {error}") from error

    parsing.parse_and_create_resource = parse_and_create_resource_loudly


def _patch_sagemaker_endpoint_name() -> None:
    from moto.sagemaker.models import FakeEndpoint

    if FakeEndpoint.cloudformation_name_type() not in ("", "EndpointName"):
        raise RuntimeError("moto's FakeEndpoint.cloudformation_name_type changed: review tests/moto_launcher.py")
    FakeEndpoint.cloudformation_name_type = staticmethod(lambda: "EndpointName")


def main(argv: list[str] | None = None) -> None:
    _patch_kms_key_tags()
    _patch_getatt_of_unsupported_types()
    _patch_silent_resource_failures()
    _patch_sagemaker_endpoint_name()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
