"""training.storage: local paths and s3:// URIs behind one interface (S3 on moto)."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from training import storage


def test_s3_round_trip_and_errors_that_name_the_uri(tmp_path, aws_env):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "part-0.parquet").write_bytes(b"rows")
    (tmp_path / "out" / "stats.json").write_text("{}")
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="features",
                                         CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        assert storage.stage_out(tmp_path / "out", "s3://features/run-1") == 2
        staged = storage.stage_in("s3://features/run-1", tmp_path / "in")
        assert (staged / "train" / "part-0.parquet").read_bytes() == b"rows" and (staged / "stats.json").exists()
        with pytest.raises(FileNotFoundError, match="no objects under s3://features/run-2"):
            storage.stage_in("s3://features/run-2", tmp_path / "none")
        # a transfer AWS refuses is one error naming the URI, not a bare botocore message
        with pytest.raises(storage.StorageError, match="reading s3://no-such-bucket/raw failed: .*NoSuchBucket"):
            storage.stage_in("s3://no-such-bucket/raw", tmp_path / "x")
        with pytest.raises(storage.StorageError, match="writing s3://no-such-bucket/out failed"):
            storage.stage_out(tmp_path / "out", "s3://no-such-bucket/out")
