"""Stage settings from cdk.json context: the real file parses, and bad stages are errors naming the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.config import STAGE_KEY, STAGES_KEY, stage_config

CONTEXT = json.loads((Path(__file__).parent.parent / "cdk.json").read_text())["context"]


def test_cdk_json_stages_parse():
    dev = stage_config(CONTEXT)
    assert dev.name == CONTEXT[STAGE_KEY] == "dev"
    prod = stage_config(CONTEXT, "prod")
    assert prod.endpoint_instance_count >= 2 and prod.region == CONTEXT[STAGES_KEY]["prod"]["region"]


def test_unknown_stage_is_an_error_not_a_default():
    with pytest.raises(ValueError, match="unknown stage 'staging'.*dev.*prod"):
        stage_config(CONTEXT, "staging")


def test_missing_or_unknown_setting_names_it():
    broken = {STAGES_KEY: {"dev": {k: v for k, v in CONTEXT[STAGES_KEY]["dev"].items() if k != "region"}},
              STAGE_KEY: "dev"}
    with pytest.raises(ValueError, match="missing settings \\['region'\\]"):
        stage_config(broken)
    extra = {STAGES_KEY: {"dev": {**CONTEXT[STAGES_KEY]["dev"], "colour": "blue"}}, STAGE_KEY: "dev"}
    with pytest.raises(ValueError, match="unknown settings \\['colour'\\]"):
        stage_config(extra)


def test_bad_values_are_rejected():
    bad = {STAGES_KEY: {"dev": {**CONTEXT[STAGES_KEY]["dev"], "account": "123"}}, STAGE_KEY: "dev"}
    with pytest.raises(ValueError, match="12 digits"):
        stage_config(bad)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("region", "Ireland", "region must look like"),
    ("redis_nodes", 1, "redis_nodes must be >= 2"),
    ("log_retention_days", 10, "log_retention_days must be one of"),
    ("endpoint_max_instance_count", 0, "endpoint_max_instance_count must be >="),
    ("github_repo", "marketrank", "github_repo must be owner/name"),
    ("vpc_cidr", "10.0.0.0/8", "vpc_cidr must be"),
    ("alarm_emails", ["oncall"], "alarm_emails must be a list of e-mail addresses"),
    ("alarm_emails", "oncall@example.com", "alarm_emails must be a list"),
    ("alarm_emails", None, "alarm_emails must be a list"),
])
def test_infra_settings_are_validated(setting, value, message):
    bad = {STAGES_KEY: {"dev": {**CONTEXT[STAGES_KEY]["dev"], setting: value}}, STAGE_KEY: "dev"}
    with pytest.raises(ValueError, match=f"stage 'dev': {message}"):
        stage_config(bad)


def test_optional_spark_image_reaches_the_pipeline_config():
    # A VPC without PyPI egress needs its own Spark image: the stage setting is what the deployed pipeline uses.
    from infra.names import Names

    assert stage_config(CONTEXT).spark_image_uri == ""  # optional: the committed stages leave it out
    image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/spark-with-pyarrow:3.5"
    context = {STAGES_KEY: {"dev": {**CONTEXT[STAGES_KEY]["dev"], "spark_image_uri": image}}, STAGE_KEY: "dev"}
    assert Names(stage_config(context)).pipeline_config().spark_image_uri == image
    untagged = {STAGES_KEY: {"dev": {**CONTEXT[STAGES_KEY]["dev"], "spark_image_uri": image.split(":")[0]}},
                STAGE_KEY: "dev"}
    with pytest.raises(ValueError, match="spark_image_uri must be an ECR image URI with a tag or digest"):
        stage_config(untagged)
