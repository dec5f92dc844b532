"""Shared Spark fixtures and readers for tests that run the feature job.

Import the fixture into a test module (``from spark_fixtures import spark``): it is session-scoped, so every
test (and every module that imports it) shares one local SparkSession, started once (~10 s) and
stopped at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

#: Shuffle partitions for tests: the datasets are tiny, so fewer tasks is much faster.
SHUFFLE_PARTITIONS = 2


def _java_available() -> bool:
    return bool(os.environ.get("JAVA_HOME") or shutil.which("java"))


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for the whole test session (skips when PySpark or Java is missing)."""
    pytest.importorskip("pyspark")
    if not _java_available():
        pytest.skip("Spark needs a Java runtime (java on PATH or JAVA_HOME)")
    from training.feature_job import spark_session

    session = spark_session("marketrank-tests")
    session.sparkContext.setLogLevel("ERROR")
    session.conf.set("spark.sql.shuffle.partitions", str(SHUFFLE_PARTITIONS))
    yield session
    session.stop()


def shard_files(split_dir: str | Path) -> list[Path]:
    """The Parquet shards of one output split (hidden and marker files excluded)."""
    return sorted(p for p in Path(split_dir).glob("*.parquet") if not p.name.startswith((".", "_")))


def read_split(split_dir: str | Path) -> pd.DataFrame:
    """All listwise rows (one per request) of one output split of the feature job."""
    shards = shard_files(split_dir)
    if not shards:
        raise FileNotFoundError(f"no Parquet shards under {split_dir}")
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)


def explode_lists(lists: pd.DataFrame, list_columns: list[str]) -> pd.DataFrame:
    """One row per (request, item) from listwise rows: ``list_columns`` are exploded together."""
    out = lists.explode(list_columns, ignore_index=True)
    for column in list_columns:
        if out[column].map(lambda v: isinstance(v, str)).all():
            continue
        out[column] = pd.to_numeric(out[column])
    return out
