"""One stack per concern (Data, MlPlatform, Serving, RankingService, Ci), composed in ``infra/app.py``."""

from __future__ import annotations

from aws_cdk import aws_logs as logs

from infra.config import LOG_RETENTION_DAYS


def retention(days: int) -> logs.RetentionDays:
    """CloudWatch Logs retention for a validated number of days (the enum lists them in the same order)."""
    finite = [member for member in logs.RetentionDays if member is not logs.RetentionDays.INFINITE]
    return dict(zip(LOG_RETENTION_DAYS, finite, strict=True))[days]
