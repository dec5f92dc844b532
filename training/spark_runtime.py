"""What the feature job needs from Python beyond the SageMaker Spark processing image, installed at job start.

The image (``sagemaker-spark-processing:3.5-cpu-py312``) ships pandas 3 and no pyarrow (its Pipfile has neither
pin: aws/sagemaker-spark-container issues #53, #104, #136), and the feature job's pandas UDFs and
``mapInPandas`` need pyarrow, its feature code the pandas 2 it is tested with. ``ensure`` installs the pins
into the job's interpreter, which is also Spark's Python (``PYSPARK_PYTHON``), before pandas is imported, so
the Python workers Spark starts later load them too. That needs the job to reach PyPI (SageMaker's default
networking does); without it the job stops at once, saying so, and the fix is an image with these packages
(``PipelineConfig.spark_image_uri``). Locally nothing is missing and nothing runs.

Standard library only: it runs before anything else is importable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("marketrank.features")

#: Tested with Spark 3.5 and the image's numpy 1.26 on Python 3.12 (binary wheels for both).
REQUIREMENTS = ("pyarrow==16.1.0", "pandas==2.2.3")


class MissingPackages(RuntimeError):
    """The interpreter lacks what the feature job needs and pip could not install it."""


def missing() -> list[str]:
    """Which of ``REQUIREMENTS`` this interpreter lacks: no pyarrow at all, or pandas 3 or newer."""
    lacking = []
    if importlib.util.find_spec("pyarrow") is None:
        lacking.append("pyarrow")
    try:
        if int(importlib.metadata.version("pandas").split(".")[0]) >= 3:
            lacking.append("pandas<3")
    except importlib.metadata.PackageNotFoundError:
        lacking.append("pandas")
    return lacking


def ensure(requirements: Sequence[str] = REQUIREMENTS,
           run: Callable[[list[str]], object] = subprocess.check_call) -> list[str]:
    """Install ``requirements`` into this interpreter when ``missing()`` says so; returns what was lacking."""
    lacking = missing()
    if not lacking:
        return []
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "15", *requirements]  # no egress: fail in ~30 s, not minutes
    log.warning("this Spark image lacks %s: installing %s", ", ".join(lacking), " ".join(requirements))
    try:
        run(command)
    except (OSError, subprocess.CalledProcessError) as err:
        raise MissingPackages(
            f"the Spark image lacks {', '.join(lacking)} and `{' '.join(command)}` failed ({err}): give the job "
            f"internet egress to PyPI, or an image with {' '.join(requirements)} "
            f"(PipelineConfig.spark_image_uri)") from err
    importlib.invalidate_caches()
    return lacking
