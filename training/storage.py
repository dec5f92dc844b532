"""Local paths and ``s3://`` URIs behind one interface, so every entry point accepts either.

On SageMaker the containers see channels as local directories; locally and in tests an ``s3://`` URI is staged
with boto3 (which honours ``AWS_ENDPOINT_URL``, so moto and LocalStack work unchanged).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """An S3 transfer failed (no credentials, access denied, no such bucket...): the message names the URI."""


@contextlib.contextmanager
def _s3_errors(doing: str, uri: str) -> Iterator[None]:
    from boto3.exceptions import Boto3Error  # upload_file's S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise StorageError(f"{doing} {uri} failed: {err}") from err


def json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ValueError naming ``what`` (a file, a URI) when it is not JSON or not an
    object, so a hand-edited or truncated document is one readable error wherever it is read."""
    try:
        document = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{what} is not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{what} is not a JSON object")
    return document


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"not an s3 URI: {uri!r}")
    return bucket, key.strip("/")


def stage_in(uri: str | Path, workdir: str | Path | None = None, keep: Callable[[str], bool] | None = None,
             start_after: str | None = None) -> Path:
    """Return a local directory holding ``uri`` (downloaded first when it is an s3:// prefix; with ``keep``, only
    the objects whose key relative to the prefix it accepts, and with ``start_after`` only those listed after that
    relative key)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        return path
    import boto3

    bucket, prefix = split_s3(str(uri))
    target = Path(workdir or tempfile.mkdtemp(prefix="marketrank-stage-"))
    found = 0
    listing = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else ""}
    if start_after:
        listing["StartAfter"] = f"{listing['Prefix']}{start_after}"
    with _s3_errors("reading", str(uri)):
        s3 = boto3.client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(**listing):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):].lstrip("/")
                if not relative or relative.endswith("/") or (keep is not None and not keep(relative)):
                    continue
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(destination))
                found += 1
    if not found:
        raise FileNotFoundError(f"input not found: no objects under {uri}")
    return target


def fetch_object(uri: str, path: str | Path) -> Path:
    """Download the one object ``uri`` (s3://bucket/key) to ``path``."""
    import boto3

    bucket, key = split_s3(uri)
    with _s3_errors("reading", uri):
        boto3.client("s3").download_file(bucket, key, str(path))
    return Path(path)


def newest_with(uri: str, name: str) -> str | None:
    """The s3:// prefix under ``uri`` whose object ``name`` was written last (e.g. the latest feature job output by
    its ``stats.json``); None when there is none."""
    import boto3

    bucket, prefix = split_s3(uri)
    newest = None
    with _s3_errors("listing", uri):
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                # LastModified has one-second resolution: ties go to the later key
                if obj["Key"].endswith(f"/{name}") and (
                        newest is None or (obj["LastModified"], obj["Key"]) > (newest["LastModified"], newest["Key"])):
                    newest = obj
    return f"s3://{bucket}/{newest['Key'][:-len(name) - 1]}" if newest else None


def stage_out(local_dir: str | Path, uri: str) -> int:
    """Upload every file under ``local_dir`` to the s3:// prefix ``uri``; returns the number of files."""
    import boto3

    bucket, prefix = split_s3(uri)
    count = 0
    with _s3_errors("writing", uri):
        s3 = boto3.client("s3")
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, [prefix, path.relative_to(local_dir).as_posix()]))
                s3.upload_file(str(path), bucket, key)
                count += 1
    return count
