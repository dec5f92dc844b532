"""Shared fixtures: the session's real tiny run (see ml_fixtures.py)."""

from ml_fixtures import tiny_run  # noqa: F401
