"""The SageMaker images the pipeline and the endpoint run, from the SDK's bundled tables (no AWS call), and the
ECR repositories the execution role may pull them from."""

from __future__ import annotations

import dataclasses
import re

from infra.names import partition


@dataclasses.dataclass(frozen=True)
class Images:
    spark_processing: str
    tf_training: str
    tf_inference: str

    def repository_arns(self) -> list[str]:
        return sorted({repository_arn(uri) for uri in dataclasses.astuple(self)})


def repository_arn(image_uri: str) -> str:
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)[:@].+", image_uri)
    if not match:
        raise ValueError(f"not an ECR image URI: {image_uri!r}")
    account, region, repository = match.groups()
    return f"arn:{partition(region)}:ecr:{region}:{account}:repository/{repository}"


def images(region: str) -> Images:
    """The same look-ups as ``pipelines.definition.build_pipeline`` (its version constants), for ``region``."""
    from pipelines import definition as d
    from pipelines import sdk

    return Images(
        spark_processing=sdk.image_uri("spark", region, d.SPARK_VERSION, "processing", py_version=d.SPARK_PY_VERSION,
                                       container_version=d.SPARK_CONTAINER_VERSION,
                                       instance_type=d.IMAGE_INSTANCE_TYPE),
        tf_training=sdk.image_uri("tensorflow", region, d.TF_VERSION, "training", py_version=d.TF_PY_VERSION,
                                  instance_type=d.IMAGE_INSTANCE_TYPE),
        tf_inference=sdk.image_uri("tensorflow", region, d.TF_VERSION, "inference",
                                   instance_type=d.IMAGE_INSTANCE_TYPE))
