"""Shadow evaluation end to end: the local endpoint (real HTTP) captures champion and challenger responses,
`marketrank shadow report` pairs them and recommends, and `marketrank endpoint promote` acts on it."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import httpx
import numpy as np
import pytest
import tensorflow as tf
from moto import mock_aws
from typer.testing import CliRunner

from marketrank.cli import app
from pipelines import deploy
from serving import local_endpoint, servers, shadow_report, wire
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
    with servers.running(server) as url:
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
    # JSON that is not a capture record (a list, no eventMetadata) is skipped too, with and without a window
    capture.write_text("\n".join([json.dumps(good[0]), "[1, 2]", '{"captureData": {}}', json.dumps(good[1])]) + "\n")
    for since in (None, datetime(2026, 1, 1, tzinfo=timezone.utc)):
        assert shadow_report.read_capture(tmp_path, ENDPOINT, "challenger", since=since) == good
    assert f"{capture} line 2 is not a data-capture record" in caplog.text and "line 3 is not a data" in caplog.text


# ------------------------------------------------------------------- capture as SageMaker writes it, windowed

T0 = datetime(2026, 11, 25, 12, 30, tzinfo=timezone.utc)


def _record(inference_id: str, when: datetime, scores: list[float], request: dict | None = None,
            latency_ms: float | None = None) -> dict:
    """A capture record as SageMaker writes it (no latency in eventMetadata) or, with ``latency_ms``, as the local
    endpoint does."""
    request = request or {"inputs": {"x": [[float(i) for i in range(len(scores))]], "mask": [[True] * len(scores)]}}

    def data(payload: dict, mode: str) -> dict:
        return {"observedContentType": "application/json", "mode": mode, "data": json.dumps(payload),
                "encoding": "JSON"}

    meta = {"eventId": str(uuid.uuid4()), "inferenceId": inference_id,
            "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if latency_ms is not None:
        meta["latencyMs"] = latency_ms
    return {"captureData": {"endpointInput": data(request, "INPUT"),
                            "endpointOutput": data({"outputs": [scores]}, "OUTPUT")},
            "eventMetadata": meta, "eventVersion": "0"}


def _key(variant: str, when: datetime) -> str:
    return f"{ENDPOINT}/{variant}/{when:%Y/%m/%d/%H}/writer-{when:%H%M}.jsonl"


def _write(root, variant: str, records: list[dict], when: datetime, extra: str = "") -> None:
    path = root / _key(variant, when)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(extra + "".join(json.dumps(r) + "\n" for r in records))


def test_read_capture_reads_an_hour_before_since_and_no_earlier(tmp_path, caplog):
    since = datetime(2026, 11, 25, 13, 0, tzinfo=timezone.utc)  # exactly on an hour
    for hours, label in ((2, "h11"), (1, "h12"), (0, "h13")):
        when = since - timedelta(hours=hours) + timedelta(minutes=30 if hours == 1 else 10)
        _write(tmp_path, "champion", [_record(label, when, [1.0])], when, extra="{bad\n" if hours == 2 else "")
    late = since + timedelta(minutes=5) - timedelta(hours=1)  # a record later than its file's hour says
    _write(tmp_path, "champion", [_record("late", since + timedelta(minutes=5), [1.0])], late)
    ids = [r["eventMetadata"]["inferenceId"] for r in shadow_report.read_capture(tmp_path, ENDPOINT, "champion",
                                                                                 since)]
    assert ids == ["late", "h13"] and "not a JSON record" not in caplog.text  # hour 11 never opened


def test_read_capture_starts_at_since_and_skips_older_hours_unread(tmp_path, caplog):
    old, before, after = T0 - timedelta(hours=3), T0 - timedelta(minutes=10), T0 + timedelta(minutes=5)
    _write(tmp_path, "champion", [_record("old", old, [1.0])], old, extra="{not json\n")  # never opened
    _write(tmp_path, "champion", [_record("before", before, [1.0]), _record("after", after, [1.0])], before)
    _write(tmp_path, "champion", [_record("at", T0.replace(microsecond=0), [1.0])], after)
    ids = [r["eventMetadata"]["inferenceId"] for r in shadow_report.read_capture(tmp_path, ENDPOINT, "champion",
                                                                                 T0 + timedelta(microseconds=5))]
    assert ids == ["after", "at"]  # to the second: a record at T0 is T0's even if the deploy was T0 + 5 us
    assert "not a JSON record" not in caplog.text
    everything = shadow_report.read_capture(tmp_path, ENDPOINT, "champion")
    assert len(everything) == 4 and "not a JSON record" in caplog.text
    assert shadow_report.read_capture(tmp_path, ENDPOINT, "challenger", T0) == []  # no shadow copies yet: none


def test_reused_inference_ids_pair_one_to_one_with_the_same_request_only():
    def request(n: int) -> dict:
        return {"inputs": {"x": [[float(i) for i in range(n)]], "mask": [[True] * n]}}

    production = [_record("a", T0, [3.0, 2.0, 1.0]), _record("a", T0, [4.0, 3.0, 2.0, 1.0]),
                  _record("a", T0, [4.0, 3.0, 2.0, 1.0]), _record("b", T0, [1.0, 2.0, 3.0]),
                  _record("c", T0, [1.0, 2.0, 3.0])]
    # a: only the second request was copied (sampling), and once; b: the same id on another request (never
    # compared); c: a copy whose answer does not line up with its request (skipped, counted)
    shadow = [_record("a", T0, [4.0, 3.0, 2.0, 1.0]), _record("b", T0, [5.0, 4.0, 3.0, 2.0, 1.0]),
              _record("c", T0, [5.0, 4.0, 3.0, 2.0, 1.0], request=request(3))]
    pairs = shadow_report.pair(production, shadow)
    assert [(p["eventMetadata"]["inferenceId"], p is production[1], s is shadow[0]) for p, s in pairs][:1] \
        == [("a", True, True)]
    assert [p["eventMetadata"]["inferenceId"] for p, _ in pairs] == ["a", "c"]
    analysis = shadow_report.analyse(production, shadow, k=2)
    assert analysis.pairs == 1 and analysis.skipped == 1 and analysis.per_list["overlap"] == [1.0]
    report = shadow_report.build_report(production, shadow, 2, shadow_report.ShadowThresholds(min_pairs=1), 0.4,
                                        analysis)
    assert report["skipped_pairs"] == 1 and report["missing_shadow_share"] == 0.0  # 2 of the 40% of 5 answered


def test_copies_are_expected_from_the_shadows_first_record_on():
    """Production answers alone while the update that adds the shadow is under way: not missing copies."""
    production = [_record(f"early{i}", T0 - timedelta(minutes=5), [2.0, 1.0]) for i in range(30)]
    production += [_record(f"r{i}", T0 + timedelta(seconds=i), [2.0, 1.0]) for i in range(30)]
    shadow = [_record(f"r{i}", T0 + timedelta(seconds=i), [2.0, 1.0]) for i in range(30)]
    report = shadow_report.build_report(production, shadow, 2, shadow_report.ShadowThresholds(min_pairs=10), 1.0)
    assert report["missing_shadow_share"] == 0.0 and report["recommendation"] == "promote"
    none = shadow_report.build_report(production, [], 2, shadow_report.ShadowThresholds(min_pairs=10), 1.0)
    assert none["missing_shadow_share"] == 1.0 and none["recommendation"] == "rollback"
    # calls made without an inference id (smoke tests, the AWS CLI) are captured without one on SageMaker: they
    # cannot pair, and are not missing copies either
    anonymous = [_record("x", T0 + timedelta(seconds=i), [2.0, 1.0]) for i in range(30)]
    for record in anonymous:
        del record["eventMetadata"]["inferenceId"]
    mixed = shadow_report.build_report(production + anonymous, shadow, 2,
                                       shadow_report.ShadowThresholds(min_pairs=10), 1.0)
    assert mixed["missing_shadow_share"] == 0.0 and mixed["recommendation"] == "promote"
    assert mixed["production_records_without_id"] == 30 and mixed["production_records"] == 90


def test_without_latency_in_the_records_the_report_says_it_was_not_compared():
    production = [_record(f"r{i}", T0, [3.0, 2.0, 1.0]) for i in range(5)]
    thresholds = shadow_report.ShadowThresholds(min_pairs=5)
    report = shadow_report.build_report(production, production, 2, thresholds, 1.0)
    assert report["latency_ms"]["challenger"]["p95"] is None
    assert report["recommendation"] == "promote" and "latency not compared" in report["reasons"][0]
    timed = [_record(f"r{i}", T0, [3.0, 2.0, 1.0], latency_ms=2.0) for i in range(5)]
    report = shadow_report.build_report(timed, timed, 2, thresholds, 1.0)
    assert report["recommendation"] == "promote" and "latency within 1.5x" in report["reasons"][0]


def test_shadow_share_is_the_shadow_weight_relative_to_production():
    state = deploy.EndpointState(production=deploy.Variant("m1", weight=2.0), shadow=deploy.Variant("m2", weight=0.5))
    assert shadow_report.shadow_share(state) == 0.25
    assert shadow_report.shadow_share(deploy.EndpointState(production=deploy.Variant("m1"))) == 0.0
    assert shadow_report.shadow_share(deploy.EndpointState(production=deploy.Variant("m1"),
                                                           shadow=deploy.Variant("m2", weight=3.0))) == 1.0


def test_report_on_sagemaker_capture_reads_the_live_challenger_only(tmp_path, monkeypatch, aws_env, caplog):
    """S3 capture of a real endpoint (moto): its shadow share and start time come from the endpoint, records of an
    earlier challenger under the same variant names are not read, and a challenger without copies is a rollback."""
    from moto_sagemaker import sagemaker_extension

    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    scratch = tmp_path / "scratch"  # where the S3 capture is staged: nothing may be left there
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with mock_aws(), sagemaker_extension(transition_describes=0):
        sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
        s3.create_bucket(Bucket="capture", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        for name in ("m1", "m2"):
            sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/model",
                            PrimaryContainer={"Image": "rank:1", "ModelDataUrl": f"s3://capture/{name}.tar.gz"})
        backend = deploy.SageMakerBackend(sm, ENDPOINT)
        backend.apply(deploy.EndpointState(production=deploy.Variant("m1"), shadow=deploy.Variant("m2", weight=0.2)))
        since = backend.live_since()
        old, now = since - timedelta(hours=2), datetime.now(timezone.utc) + timedelta(seconds=1)

        def put(variant: str, records: list[dict], when: datetime) -> None:
            s3.put_object(Bucket="capture", Key=f"data-capture/{_key(variant, when)}",
                          Body="".join(json.dumps(r) + "\n" for r in records).encode())

        # an earlier, broken challenger under the same variant names, then the live one on 20% of requests
        put("champion", [_record(f"old{i}", old, [3.0, 2.0, 1.0]) for i in range(30)], old)
        put("challenger", [_record(f"old{i}", old, [1.0, 2.0, 3.0]) for i in range(30)], old)
        s3.put_object(Bucket="capture", Key=f"data-capture/{_key('champion', old - timedelta(hours=1))}",
                      Body=b"{not a record\n")  # listed from the start: its warning would show
        put("champion", [_record(f"new{i}", now, [3.0, 2.0, 1.0]) for i in range(20)], now)
        put("challenger", [_record(f"new{i}", now, [3.0, 2.0, 1.0]) for i in (0, 5, 10, 15)], now)
        out = tmp_path / "report"
        args = ["shadow", "report", "--capture", "s3://capture/data-capture", "--endpoint", ENDPOINT,
                "--min-pairs", "2", "--k", "2", "--out", str(out)]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "not a JSON record" not in caplog.text  # the old hours were not even listed
        report = json.loads((out / shadow_report.REPORT_FILE).read_text())
        assert report["pairs"] == 4 and report["production_records"] == 20 and report["shadow_share"] == 0.2
        assert report["missing_shadow_share"] == 0.0 and report["since"] == since.isoformat()
        assert report["recommendation"] == "promote" and "latency not compared" in report["reasons"][0]

        everything = runner.invoke(app, [*args, "--since", "all", "--shadow-sampling", "20"])
        assert everything.exit_code == 0 and json.loads((out / shadow_report.REPORT_FILE).read_text())["pairs"] == 34
        assert not [p for p in scratch.iterdir() if p.name.startswith("marketrank-")]  # staged capture removed

        s3.delete_object(Bucket="capture", Key=f"data-capture/{_key('challenger', now)}")
        s3.delete_object(Bucket="capture", Key=f"data-capture/{_key('challenger', old)}")
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "overlap n/a" in result.output
        report = json.loads((out / shadow_report.REPORT_FILE).read_text())
        assert report["missing_shadow_share"] == 1.0 and report["recommendation"] == "rollback"

        # SageMaker's records carry no latency: CloudWatch's ModelLatency per variant over the window (moto keeps
        # the data points but computes no percentiles: the means are compared)
        cloudwatch = boto3.client("cloudwatch")
        for variant, microseconds in (("champion", 2_000.0), ("challenger", 50_000.0)):
            cloudwatch.put_metric_data(Namespace="AWS/SageMaker", MetricData=[{
                "MetricName": "ModelLatency", "Value": microseconds, "Unit": "Microseconds",
                "Dimensions": [{"Name": "EndpointName", "Value": ENDPOINT},
                               {"Name": "VariantName", "Value": variant}]}])
        put("challenger", [_record(f"new{i}", now, [3.0, 2.0, 1.0]) for i in (0, 5, 10, 15)], now)
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads((out / shadow_report.REPORT_FILE).read_text())
        assert report["latency_source"] == "cloudwatch" and report["latency_ms"]["challenger"]["mean"] == 50.0
        assert report["recommendation"] == "rollback" and "challenger mean latency 50.0 ms" in report["reasons"][0]

        bad = runner.invoke(app, [*args, "--since", "yesterday"])
        assert bad.exit_code == 1 and "--since 'yesterday' is not an ISO 8601 time" in bad.output


def test_cloudwatch_latency_weights_period_statistics_by_their_samples(aws_env):
    """GetMetricStatistics as the service answers it (requests checked against the service model): Statistics and
    ExtendedStatistics in separate calls (CloudWatch takes one or the other), per-period averages and p95s in
    microseconds, combined over the window weighted by the periods' sample counts."""
    from botocore.stub import Stubber

    cloudwatch = boto3.client("cloudwatch")
    since, until = T0, T0 + timedelta(days=2)  # 2,880 minutes: 2-minute periods are exactly 1,440 points
    t1, t2 = T0, T0 + timedelta(minutes=2)
    answers = {"champion": ([{"Timestamp": t1, "Average": 2000.0, "SampleCount": 30.0},
                             {"Timestamp": t2, "Average": 4000.0, "SampleCount": 10.0}],
                            [{"Timestamp": t1, "ExtendedStatistics": {"p95": 3000.0}},
                             {"Timestamp": t2, "ExtendedStatistics": {"p95": 7000.0}}]),
               "challenger": ([], None)}
    with Stubber(cloudwatch) as stub:
        for variant, (basic, extended) in answers.items():
            query = {"Namespace": "AWS/SageMaker", "MetricName": "ModelLatency", "StartTime": since,
                     "EndTime": until, "Period": 120,
                     "Dimensions": [{"Name": "EndpointName", "Value": ENDPOINT},
                                    {"Name": "VariantName", "Value": variant}]}
            stub.add_response("get_metric_statistics", {"Datapoints": basic},
                              {**query, "Statistics": ["Average", "SampleCount"]})
            if extended is not None:  # no samples: no second call
                stub.add_response("get_metric_statistics", {"Datapoints": extended},
                                  {**query, "ExtendedStatistics": ["p95"]})
        latency = shadow_report.cloudwatch_latency(cloudwatch, ENDPOINT, since, until, now=until)
        stub.assert_no_pending_responses()
    assert set(latency) == {"champion"}  # no samples: left out, so the report says latency was not compared
    assert latency["champion"]["mean"] == pytest.approx(2.5) and latency["champion"]["p95"] == pytest.approx(4.0)
    assert latency["champion"]["samples"] == 40 and latency["champion"]["period_s"] == 120
    production = [_record(f"r{i}", T0, [2.0, 1.0]) for i in range(5)]
    report = shadow_report.build_report(production, production, 2, shadow_report.ShadowThresholds(min_pairs=5), 1.0,
                                        latency=latency)
    assert report["latency_source"] == "cloudwatch" and report["latency_ms"]["champion"]["p95"] == pytest.approx(4.0)
    assert "latency not compared" in report["reasons"][0]
    both = {**latency, "challenger": {**latency["champion"], "p95": 30.0}}
    slow = shadow_report.build_report(production, production, 2, shadow_report.ShadowThresholds(min_pairs=5), 1.0,
                                      latency=both)
    assert slow["recommendation"] == "rollback" and "p95 (mean of per-period p95s)" in slow["reasons"][0]


@pytest.mark.parametrize("age_days,unit", [(1, 60), (16, 300), (70, 3600)])
def test_metric_window_uses_the_periods_cloudwatch_keeps_for_data_that_old(age_days, unit):
    now = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    since = now - timedelta(days=age_days, seconds=59)  # not on a period boundary
    start, period = shadow_report.metric_window(since, now, now)
    assert period % unit == 0 and start <= since and start.timestamp() % unit == 0
    assert -(-(now - start).total_seconds() // period) <= shadow_report.MAX_DATAPOINTS  # one call's worth
    if period > unit:  # and the smallest such period: one unit less would need more than one call
        assert -(-(now - start).total_seconds() // (period - unit)) > shadow_report.MAX_DATAPOINTS
    exact = now - timedelta(seconds=1440 * 60)  # exactly 1,440 one-minute periods
    assert shadow_report.metric_window(exact, now, now) == (exact, 60)
    late = exact + timedelta(seconds=59)  # rounded down to the minute: still 1,440
    assert shadow_report.metric_window(late, now, now) == (exact, 60)


def test_on_sagemaker_the_stage_report_is_published_where_promote_reads_it(tmp_path, monkeypatch, aws_env):
    """`shadow report --target sagemaker` and `endpoint promote --target sagemaker` with no paths: the stage's
    endpoint and capture are read, the report lands at ``Names.shadow_report_uri``, and promote acts on it. (The
    stage's region, cdk.json's `dev`, is the one moto serves here: eu-west-1.)"""
    from moto_sagemaker import sagemaker_extension

    from marketrank.cli import _stage_names

    names = _stage_names(None)
    assert names.stage.region == "eu-west-1"
    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    scratch = tmp_path / "scratch"  # where the S3 capture is staged: nothing may be left there
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with mock_aws(), sagemaker_extension(transition_describes=0):
        sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
        bucket, prefix = names.data_capture_uri.removeprefix("s3://").split("/", 1)
        for kind in ("capture", "artifacts"):  # the champion's artifact is copied where the pipeline reads it
            s3.create_bucket(Bucket=names.bucket(kind), CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        for name in ("m1", "m2"):
            s3.put_object(Bucket=bucket, Key=f"{name}.tar.gz", Body=name.encode())
            sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/model",
                            PrimaryContainer={"Image": "rank:1", "ModelDataUrl": f"s3://{bucket}/{name}.tar.gz"})
        deploy.SageMakerBackend(sm, names.endpoint).apply(
            deploy.EndpointState(production=deploy.Variant("m1"), shadow=deploy.Variant("m2", weight=1.0)))
        now = datetime.now(timezone.utc) + timedelta(seconds=1)
        for variant in ("champion", "challenger"):
            key = f"{prefix}/{_key(variant, now).replace(ENDPOINT, names.endpoint, 1)}"
            records = [_record(f"r{i}", now, [3.0, 2.0, 1.0]) for i in range(5)]
            s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in records).encode())

        result = runner.invoke(app, ["shadow", "report", "--target", "sagemaker", "--min-pairs", "5"])
        assert result.exit_code == 0, result.output
        published = shadow_report.load_report(names.shadow_report_uri)
        assert published["pairs"] == 5 and published["recommendation"] == "promote", published["reasons"]
        assert not (tmp_path / "shadow").exists()  # not the workspace's

        result = runner.invoke(app, ["endpoint", "promote", "--target", "sagemaker"])
        assert result.exit_code == 0, result.output
        assert deploy.SageMakerBackend(sm, names.endpoint).current().production.model_name == "m2"
