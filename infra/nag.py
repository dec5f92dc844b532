"""cdk-nag (AwsSolutions pack) through CDK's native validation plugins, and acknowledgements with their reasons.

cdk-nag 3 drops ``NagSuppressions``: a finding is acknowledged on the construct with
``Validations.of(construct).acknowledge``; an unacknowledged finding fails synthesis (``cdk synth``, ``cdk deploy``,
``make synth``) and the report lands in ``<outdir>/validation-report.json``.
"""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

REPORT_FILE = "validation-report.json"


def add_checks(app: cdk.App) -> None:
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, write_suppressions_to_cloud_formation=True))


def acknowledge(construct: IConstruct, reason: str, *rules: str) -> None:
    """Acknowledge each finding id (``AwsSolutions-IAM5[Resource::*]`` for one finding of a rule) with ``reason``."""
    if not reason.strip():
        raise ValueError("an acknowledgement needs a reason")
    cdk.Validations.of(construct).acknowledge(*(cdk.Acknowledgment(id=rule, reason=reason) for rule in rules))
