"""CDK app entry point (``cdk.json``: ``python3 -m infra.app``).

It resolves the stage from the context. The stacks (Data, MlPlatform, Serving, RankingService, Ci) are the
infrastructure issue's work and are added here one per concern; until then the app synthesises no stack.
"""

from __future__ import annotations

import aws_cdk as cdk

from infra.config import STAGE_KEY, stage_config


def build_app(app: cdk.App | None = None) -> cdk.App:
    app = app or cdk.App()
    context = {key: app.node.try_get_context(key) for key in ("marketrank:stages", STAGE_KEY)}
    stage = stage_config(context)
    cdk.Tags.of(app).add("marketrank:stage", stage.name)
    return app


if __name__ == "__main__":
    build_app().synth()
