"""Shadow evaluation end to end: the local endpoint (real HTTP) captures champion and challenger responses,
`marketrank shadow report` pairs them and recommends, and `marketrank endpoint promote` acts on it."""

from __future__ import annotations

import json
import shutil
import time

import boto3
import httpx
import numpy as np
import pytest
import tensorflow as tf
from moto import mock_aws
from typer.testing import CliRunner

from marketrank.cli import app
from pipelines import deploy
from serving import local_endpoint, shadow_report, wire
from training import data, export
from training.feature_spec import FeatureSpec

pytestmark = pytest.mark.slow
runner = CliRunner()
ENDPOINT = "marketrank"


def _reversed_model(source, target) -> None:
    """A challenger with the champion's signature whose scores are the champion's, negated (a broken model)."""
    loaded = tf.saved_model.load(str(source))
    serve = loaded.signatures["serving_default"]
    spec = serve.structured_input_signature[1]

    class Reversed(tf.Module):
        def __init__(self):
            super().__init__()
            self.inner = loaded

        @tf.function(input_signature=[spec])
        def serve(self, features):
            scores = serve(**features)["scores"]
            return {"scores": tf.where(features["mask"], -scores, scores)}

    module = Reversed()
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})
    shutil.copytree(source / "assets", target / "assets", dirs_exist_ok=True)


def _workspace(tmp_path, tiny_run, challenger: str):
    models = tmp_path / "models"
    champion_dir = models / "marketrank-v1" / "1"
    shutil.copytree(tiny_run["export_dir"], champion_dir)
    if challenger == "same":
        shutil.copytree(tiny_run["export_dir"], models / "marketrank-v2" / "1")
    else:
        _reversed_model(champion_dir, models / "marketrank-v2" / "1")
    backend = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    deploy.deploy_shadow(backend, deploy.Variant("marketrank-v1", "local"))
    deploy.deploy_shadow(backend, deploy.Variant("marketrank-v2", "local", weight=1.0))
    return models


def _traffic(base_url: str, tiny_run, requests: int) -> None:
    spec = FeatureSpec.load(tiny_run["features"])
    sent = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for batch in data.iter_batches(tiny_run["features"] / "test", spec, 1, list_size=None):
            inputs = {name: batch[name] for name in [*spec.names, "mask"]}
            inputs = {k: v.astype(str) if v.dtype == object else v for k, v in inputs.items()}
            response = client.post("/invocations", content=wire.encode(wire.predict_request(inputs)),
                                   headers={"Content-Type": "application/json",
                                            local_endpoint.INFERENCE_ID_HEADER: f"req-{sent}"})
            assert response.status_code == 200, response.text
            sent += 1
            if sent == requests:
                return


def _wait_for_capture(capture, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(shadow_report.read_capture(capture, ENDPOINT, "challenger")) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("shadow capture did not arrive")


@pytest.mark.parametrize("challenger,expected", [("same", "promote"), ("reversed", "rollback")])
def test_shadow_report_recommends_and_promote_follows(tmp_path, tiny_run, monkeypatch, aws_env, challenger,
                                                      expected):
    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    models = _workspace(tmp_path, tiny_run, challenger)
    capture = tmp_path / "data-capture"
    server = local_endpoint.create_app(models, tmp_path / "endpoints" / f"{ENDPOINT}.json", capture, 0.5)
    with local_endpoint.running(server) as url:
        _traffic(url, tiny_run, 25)
        _wait_for_capture(capture, 25)

    result = runner.invoke(app, ["shadow", "report", "--min-pairs", "20"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "shadow" / ENDPOINT / "latest.json").read_text())
    assert report["pairs"] == 25 and report["recommendation"] == expected, report["reasons"]
    overlap = report["agreement"]["overlap"]["mean"]
    if challenger == "same":
        assert overlap == pytest.approx(1.0) and report["agreement"]["spearman"]["mean"] == pytest.approx(1.0)
    else:
        assert overlap < 0.2 and report["agreement"]["spearman"]["mean"] < -0.9
    assert report["latency_ms"]["champion"]["p95"] > 0 and report["latency_ms"]["challenger"]["p95"] > 0
    png = tmp_path / "shadow" / ENDPOINT / "shadow.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Published where the ranking API on ECS reads it (MARKETRANK_SHADOW_REPORT), and acted on from there.
    uri = f"s3://capture/shadow-reports/{ENDPOINT}/{shadow_report.REPORT_FILE}"
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(Bucket="capture", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        published = runner.invoke(app, ["shadow", "report", "--min-pairs", "20", "--out", uri.rsplit("/", 1)[0]],
                                  catch_exceptions=False)
        assert published.exit_code == 0 and uri in published.output, published.output
        assert shadow_report.load_report(uri) == report  # the same capture, the same report
        assert shadow_report.agreement_summary(uri)["overlap"] == pytest.approx(overlap)
        chart = s3.get_object(Bucket="capture", Key=f"shadow-reports/{ENDPOINT}/{shadow_report.CHART_FILE}")
        assert chart["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"
        missing = runner.invoke(app, ["endpoint", "promote", "--report", f"{uri}.missing"])
        assert missing.exit_code == 1 and "no shadow report" in missing.output
        # the S3 report decides one case, the workspace's (the default) the other: both say the same
        promoted = runner.invoke(app, ["endpoint", "promote", *(["--report", uri] if challenger == "same" else [])])
    state = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT).current()
    if expected == "promote":
        assert promoted.exit_code == 0, promoted.output
        assert state.production.model_name == "marketrank-v2" and state.previous.model_name == "marketrank-v1"
    else:
        assert promoted.exit_code == 1 and "rollback" in promoted.output
        assert state.production.model_name == "marketrank-v1"  # refused: nothing changed


def test_compare_lists_by_hand():
    champion = np.array([3.0, 2.0, 1.0, 0.0])
    assert shadow_report.compare_lists(champion, champion.copy(), 2) == {"overlap": 1.0, "spearman": 1.0,
                                                                         "drift": 0.0}
    swapped = np.array([2.0, 3.0, 0.0, 1.0])  # top-2 as a set unchanged, order inside pairs swapped
    values = shadow_report.compare_lists(champion, swapped, 2)
    assert values["overlap"] == 1.0
    assert values["spearman"] == pytest.approx(0.6)  # 1 - 6 * (1+1+1+1) / (4 * 15)
    assert shadow_report.compare_lists(champion, -champion, 2)["overlap"] == 0.0


def test_recommendation_rules():
    thresholds = shadow_report.ShadowThresholds(min_pairs=10)
    base = {"pairs": 50, "production_records": 50, "k": 10, "missing_shadow_share": 0.0,
            "agreement": {"overlap": {"mean": 0.8}},
            "latency_ms": {"champion": {"p95": 2.0}, "challenger": {"p95": 2.5}}}
    assert shadow_report.recommend(base, thresholds)[0] == "promote"
    noise = {**base, "latency_ms": {"champion": {"p95": 2.0}, "challenger": {"p95": 3.5}}}  # +1.5 ms: noise
    assert shadow_report.recommend(noise, thresholds)[0] == "promote"
    slow = {**base, "latency_ms": {"champion": {"p95": 40.0}, "challenger": {"p95": 70.0}}}  # 1.75x and +30 ms
    decision, reasons = shadow_report.recommend(slow, thresholds)
    assert decision == "rollback" and "latency" in reasons[0]
    few = {**base, "pairs": 5}
    assert shadow_report.recommend(few, thresholds)[0] == "keep-watching"
    missing = {**base, "missing_shadow_share": 0.5}
    assert shadow_report.recommend(missing, thresholds)[0] == "rollback"


def test_export_version_layout_is_what_the_endpoint_serves(tiny_run):
    assert export.find_saved_model(tiny_run["export_dir"].parent) == tiny_run["export_dir"]


def test_read_capture_takes_whole_lines_and_names_a_bad_one(tmp_path, caplog):
    hour = tmp_path / ENDPOINT / "challenger" / "2026" / "11" / "25" / "23"
    hour.mkdir(parents=True)
    capture = hour / "writer.jsonl"
    good = [{"eventMetadata": {"inferenceId": f"r{i}"}} for i in range(2)]
    # a whole record, a corrupt line, another record, then one still being appended by the endpoint
    capture.write_text(json.dumps(good[0]) + "\n" + '{"captureData": {"endpointIn\n' + json.dumps(good[1]) + "\n"
                       + '{"eventMetadata": {"infer')
    assert shadow_report.read_capture(tmp_path, ENDPOINT, "challenger") == good
    assert f"{capture} line 2 is not a JSON record" in caplog.text
    assert "line 4" not in caplog.text  # the unfinished last line is not an error
