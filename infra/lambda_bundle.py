"""The deploy Lambda's code: only the modules its handler imports, no TensorFlow, no SageMaker SDK.

``pipelines.deploy_lambda`` imports ``pipelines.deploy`` (stdlib only) and, lazily, ``training.storage`` (stdlib;
boto3 comes with the Lambda runtime). The files are staged in a directory named after their content, so the asset
hash (and the function) changes exactly when the code does.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("pipelines/__init__.py", "pipelines/deploy.py", "pipelines/deploy_lambda.py",
         "training/__init__.py", "training/storage.py")
HANDLER = "pipelines.deploy_lambda.handler"


def deploy_lambda_code() -> Path:
    """A directory holding ``FILES`` (staged once per content under the temp directory)."""
    contents = [(name, (ROOT / name).read_bytes()) for name in FILES]
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data + b"\0" for name, data in contents)).hexdigest()
    target = Path(tempfile.gettempdir()) / "marketrank-deploy-lambda" / digest[:24]
    if all((target / name).is_file() for name in FILES):
        return target
    staging = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}")
    try:
        for name, data in contents:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another process staged the same content first
            if not all((target / name).is_file() for name in FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
