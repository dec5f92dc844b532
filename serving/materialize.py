"""Fill the online feature store in AWS: ``python -m serving.materialize`` (the API's image, no TensorFlow).

``marketrank features materialize`` does this on a laptop. In AWS the Redis store is reachable from the ranking
service's network only, so the API's own image runs it as an ECS task (README, "Filling the feature store in AWS"):
EventBridge starts it after each successful pipeline execution (fresh counters); run it by hand after a promotion
that changed the champion's features.

* ``--features``: a feature job's output (its ``online/`` state and ``stats.json``), a directory or an s3:// prefix
  (the pipeline writes it to ``<base>/executions/<execution-id>/features``); only those objects are downloaded.
  Or ``--executions s3://<base>/executions`` with ``--execution <id or ARN>``: that pipeline execution's output
  (what the task run after each successful execution is given, from the event); without ``--execution``, the
  newest output there (by its ``stats.json``).
* ``--model``: the model whose feature spec the API must build inputs with: a SavedModel directory, a
  ``model.tar.gz`` (what SageMaker trains and serves), or either on S3. Default ``MARKETRANK_CHAMPION_URI`` (the
  object the deploy Lambda keeps pointing at the live champion).
* ``--store``: ``redis://`` or ``rediss://`` URL; default ``MARKETRANK_FEATURE_STORE`` (the API's setting).

Prints ``{"items": n, "users": n}``; any failure is one ``error:`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from serving.errors import StoreUnavailable
from serving.feature_store import ONLINE_DIR, materialize, open_store
from training import storage
from training.feature_job import STATS_FILE
from training.feature_spec import SPEC_FILE, FeatureSpec


def stage_features(features: str, workdir: Path) -> Path:
    """The feature job's output as a local directory: on S3, only its online state and stats are downloaded."""
    if not storage.is_s3(features):
        return storage.stage_in(features)
    return storage.stage_in(features, workdir / "features",
                            keep=lambda key: key.startswith(f"{ONLINE_DIR}/") or key == STATS_FILE)


def model_spec(model: str, workdir: Path) -> FeatureSpec:
    """The feature spec a model carries (``<version>/assets/feature_spec.json``; the highest version if several)."""
    if model.endswith(".tar.gz"):
        archive = storage.fetch_object(model, workdir / "model.tar.gz") if storage.is_s3(model) else Path(model)
        root = workdir / "model"
        with tarfile.open(archive) as tar:  # the spec only: the weights are not needed here
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(f"assets/{SPEC_FILE}")]
            tar.extractall(root, members=members, filter="data")
    else:
        root = storage.stage_in(model, workdir / "model") if storage.is_s3(model) else Path(model)
    # Not training.export.find_saved_model: that module imports TensorFlow, which this image has not.
    found = sorted(root.rglob(f"assets/{SPEC_FILE}"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else -1)
    if not found:
        raise FileNotFoundError(f"no {SPEC_FILE} in the model at {model} (expected <version>/assets/{SPEC_FILE})")
    return FeatureSpec.load(found[-1])


def execution_features(executions: str, execution: str | None) -> str:
    """A pipeline execution's feature job output under ``executions``: the one named (an id, or an execution ARN,
    whose last segment is the id), else the newest (by its ``stats.json``)."""
    if not storage.is_s3(executions):
        raise ValueError(f"--executions: expected an s3:// prefix, got {executions!r}")
    if execution:
        return f"{executions.rstrip('/')}/{execution.rsplit('/', 1)[-1]}/features"
    features = storage.newest_with(executions, STATS_FILE)
    if features is None:
        raise FileNotFoundError(f"no feature job output (no {STATS_FILE}) under {executions}")
    print(f"newest feature job output: {features}", file=sys.stderr)
    return features


def run(features: str, model: str, store_location: str) -> dict[str, int]:
    if not store_location.startswith(("redis://", "rediss://")):
        raise ValueError(f"--store: expected a redis:// or rediss:// URL, got {store_location!r}")
    with tempfile.TemporaryDirectory(prefix="marketrank-materialize-") as tmp:
        spec = model_spec(model, Path(tmp))
        features_dir = stage_features(features, Path(tmp))
        store = open_store(store_location, socket_timeout_s=30.0, connect_timeout_s=10.0)
        try:
            return materialize(features_dir, store, spec, source=features)  # the S3 URI, not the staging dir
        finally:
            store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.materialize", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="feature job output: directory or s3:// prefix")
    source.add_argument("--executions", help="s3:// prefix of pipeline executions (<prefix>/<id>/features)")
    parser.add_argument("--execution", help="with --executions: a pipeline execution's id or ARN (default: the "
                                            "newest feature job output there)")
    parser.add_argument("--model", default=os.environ.get("MARKETRANK_CHAMPION_URI"),
                        help="SavedModel dir or model.tar.gz, local or s3:// (default $MARKETRANK_CHAMPION_URI)")
    parser.add_argument("--store", default=os.environ.get("MARKETRANK_FEATURE_STORE"),
                        help="redis:// or rediss:// URL (default $MARKETRANK_FEATURE_STORE)")
    args = parser.parse_args(argv)
    try:
        if not args.model or not args.store:
            raise ValueError("--model and --store are required (or MARKETRANK_CHAMPION_URI, MARKETRANK_FEATURE_STORE)")
        features = args.features or execution_features(args.executions, args.execution)
        counts = run(features, args.model, args.store)
    except (OSError, ValueError, KeyError, tarfile.TarError, StoreUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
