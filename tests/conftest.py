"""Shared fixtures: the session's real tiny run (see ml_fixtures.py) and moto's fake credentials."""

import pytest
from ml_fixtures import tiny_run  # noqa: F401


@pytest.fixture
def aws_env(monkeypatch):
    """Dummy credentials for moto in eu-west-1; no profile, token or endpoint override leaks in from the machine."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # moto has no SimulatePrincipalPolicy
