"""Stage settings for the CDK app, read from ``cdk.json`` context: data, never hard-coded in stacks.

``cdk deploy -c marketrank:stage=prod`` picks a stage; an unknown stage or a missing setting is an error that
names it, never a silent default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

STAGE_KEY = "marketrank:stage"
STAGES_KEY = "marketrank:stages"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str
    account: str
    region: str
    endpoint_instance_type: str
    endpoint_instance_count: int
    training_instance_type: str
    processing_instance_type: str
    shadow_sampling_percentage: float
    api_desired_count: int

    def __post_init__(self) -> None:
        if not (self.account.isdigit() and len(self.account) == 12):
            raise ValueError(f"stage {self.name!r}: account must be 12 digits, got {self.account!r}")
        if not 0 < self.shadow_sampling_percentage <= 100:
            raise ValueError(f"stage {self.name!r}: shadow_sampling_percentage must be in (0, 100]")
        if self.endpoint_instance_count < 1 or self.api_desired_count < 1:
            raise ValueError(f"stage {self.name!r}: instance and task counts must be >= 1")


def stage_config(context: Mapping[str, Any], stage: str | None = None) -> StageConfig:
    """The named stage (default: the ``marketrank:stage`` context value) from ``marketrank:stages``."""
    stages = context.get(STAGES_KEY)
    if not isinstance(stages, Mapping) or not stages:
        raise ValueError(f"cdk.json context has no {STAGES_KEY!r} mapping")
    name = stage or context.get(STAGE_KEY)
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; cdk.json defines {sorted(stages)}")
    settings = dict(stages[name])
    fields = {f.name for f in dataclasses.fields(StageConfig)} - {"name"}
    missing, unknown = sorted(fields - set(settings)), sorted(set(settings) - fields)
    if missing or unknown:
        raise ValueError(f"stage {name!r}: missing settings {missing}, unknown settings {unknown}")
    return StageConfig(name=name, **settings)
