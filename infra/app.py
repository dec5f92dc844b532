"""CDK app entry point (``cdk.json``: ``python3 -m infra.app``; ``make synth`` runs it without the CLI).

One small stack per concern, composed here with cross-stack references passed as constructor arguments::

    Data ──key, buckets──▶ MlPlatform ──▶ Serving
      └──key, ALB log bucket──▶ RankingService        Data ──key──▶ Ci

The stage comes from the context (``marketrank:stage``; ``infra/config.py``). Synthesis is hermetic: no AWS calls,
no clock, no look-ups; the pipeline definition is rendered offline (``pipelines.definition.definition_json``).
cdk-nag's AwsSolutions pack runs on every synthesis, and an unacknowledged finding fails it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import aws_cdk as cdk

from infra import nag
from infra.config import API_IMAGE_KEY, STAGE_KEY, STAGES_KEY, StageConfig, stage_config
from infra.images import images
from infra.names import CDK_JSON, Names, cdk_context
from infra.stacks.ci import CiStack
from infra.stacks.data import DataStack
from infra.stacks.ml_platform import MlPlatformStack
from infra.stacks.ranking_service import RankingServiceStack
from infra.stacks.serving import ServingStack

STACK_IDS = ("Data", "MlPlatform", "Serving", "RankingService", "Ci")


def pipeline_definition(stage: StageConfig) -> str:
    from pipelines.definition import definition_json

    return definition_json(Names(stage).pipeline_config())


def build_app(app: cdk.App | None = None) -> cdk.App:
    """Add the stage's stacks (and the cdk-nag checks) to ``app``; the stage is read from its context."""
    app = app or cdk.App()
    context = {key: app.node.try_get_context(key) for key in (STAGES_KEY, STAGE_KEY)}
    stage = stage_config(context)
    env = cdk.Environment(account=stage.account, region=stage.region)
    prefix = Names(stage).base

    def props(concern: str) -> dict[str, Any]:
        return {"env": env, "stack_name": f"{prefix}-{concern}",
                "description": f"marketrank {stage.name}: {concern} (infra/stacks)"}

    data = DataStack(app, "Data", stage=stage, **props("data"))
    sagemaker_images = images(stage.region)
    platform = MlPlatformStack(app, "MlPlatform", stage=stage, key=data.key, images=sagemaker_images,
                               pipeline_definition=pipeline_definition(stage), **props("ml-platform"))
    platform.add_stack_dependency(data, "the pipeline's, Lambda's and MLflow's buckets are named, not referenced")
    serving = ServingStack(app, "Serving", stage=stage, key=data.key, inference_image=sagemaker_images.tf_inference,
                           data_capture_uri=platform.data_capture_uri, alarm_topic=data.alarm_topic,
                           **props("serving"))
    serving.add_stack_dependency(platform, "the champion parameters and the model execution role")
    RankingServiceStack(app, "RankingService", stage=stage, key=data.key, alb_logs=data.alb_logs,
                        alarm_topic=data.alarm_topic,
                        image_uri=app.node.try_get_context(API_IMAGE_KEY) or None, **props("ranking-service"))
    CiStack(app, "Ci", stage=stage, key=data.key, **props("ci"))

    # Every resource but the champion parameters, whose Value CloudFormation would reset on a tag change.
    cdk.Tags.of(app).add("marketrank:stage", stage.name, exclude_resource_types=["AWS::SSM::Parameter"])
    nag.add_checks(app)
    return app


def offline_app(outdir: str = "cdk.out", context: dict[str, Any] | None = None) -> cdk.App:
    """The app as the CLI would run it, without the CLI: ``cdk.json`` context, then ``context`` overrides."""
    return cdk.App(outdir=outdir, context={**cdk_context(CDK_JSON), **(context or {})})


def main() -> None:
    if "CDK_OUTDIR" in os.environ:  # run by the cdk CLI, which passes the context and the output directory
        app = cdk.App()
    else:  # make synth: MARKETRANK_CDK_CONTEXT='{"marketrank:stage": "prod"}' picks another stage
        app = offline_app(os.environ.get("MARKETRANK_CDK_OUT", "cdk.out"),
                          json.loads(os.environ.get("MARKETRANK_CDK_CONTEXT") or "{}"))
    build_app(app).synth()


if __name__ == "__main__":
    main()
