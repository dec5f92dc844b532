"""Shadow evaluation: pair the champion's and the challenger's captured responses and recommend an action.

Input is SageMaker data capture (the real endpoint's S3 prefix or the local endpoint's directory, same layout:
``<capture>/<endpoint>/<variant>/yyyy/mm/dd/hh/*.jsonl``), read from a start time on (``since``: by default when
the endpoint last changed, i.e. when the current challenger went live; the variant names are reused by every
deployment, so older records belong to other models). Records of the two variants are paired one to one by
``eventMetadata.inferenceId`` (the ranking API sends its request id as the inference id; a reused id pairs its
records in order), and a pair whose two requests differ is skipped and counted, never compared. For every pair
the report measures how far the challenger's ranking departs from the champion's (top-k overlap, Spearman rank
correlation, score drift of within-list standardised scores) and both variants' latency: from the records where
they carry it (``eventMetadata.latencyMs``: the local endpoint's), else from CloudWatch's ``ModelLatency`` per
variant over the same window (``cloudwatch_latency``: SageMaker's records have none); with neither, the report
says the latency was not compared rather than passing it.

Shadow traffic has no feedback on the challenger's ranking (users only saw the champion's), so the offline gate
judges quality; the shadow phase checks that the challenger behaves in production: it answers, it is not slower
than allowed, and it agrees with the champion as much as offline evaluation said it would. The recommendation:

* ``rollback`` (of the shadow deployment: ``marketrank endpoint reject`` drops the challenger, the champion
  stays) when the challenger failed on requests, is too slow, or its rankings look unrelated to the champion's
  (mean top-k overlap below ``min_overlap``: a broken model or a feature mismatch);
* ``keep-watching`` while fewer than ``min_pairs`` requests are paired;
* ``promote`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.deploy import PRODUCTION, SHADOW  # variant names: one definition
from serving import wire

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShadowThresholds:
    min_pairs: int = 200
    #: Challenger p95 latency may be at most this multiple of the champion's, or the champion's plus the slack,
    #: whichever is larger (a few ms either way are noise, not a regression).
    max_latency_ratio: float = 1.5
    latency_slack_ms: float = 10.0
    #: Below this mean top-k overlap the challenger's rankings look unrelated to the champion's.
    min_overlap: float = 0.2
    #: Share of shadow copies without a capture record (failed) that triggers a rollback.
    max_missing_share: float = 0.05


#: What the ranking API exports from a report (``marketrank_shadow_agreement{measure}``): mean per-request values.
AGREEMENT_MEASURES = ("overlap", "spearman")


#: What ``save_report`` writes: the report (JSON) and its chart (PNG).
REPORT_FILE, CHART_FILE = "latest.json", "shadow.png"


def load_report(location: str | Path) -> dict[str, Any]:
    """A saved report: a ``latest.json`` path or s3:// URI (short timeouts, one attempt: the API calls this)."""
    from training import storage

    if storage.is_s3(location):
        import boto3
        from botocore.config import Config

        bucket, key = storage.split_s3(str(location))
        client = boto3.client("s3", config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        try:
            text = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(f"no shadow report at {location}") from err
    else:
        text = Path(location).read_text()
    return storage.json_object(text, f"shadow report {location}")


def save_report(report: dict[str, Any], analysis: Analysis, out: str | Path) -> str:
    """Write ``latest.json`` and ``shadow.png`` under ``out``, a directory or an s3:// prefix (where the ranking
    API on ECS reads the agreement from, ``MARKETRANK_SHADOW_REPORT``); returns the report's location."""
    from training import storage

    if storage.is_s3(out):
        with tempfile.TemporaryDirectory(prefix="shadow-report-") as tmp:
            save_report(report, analysis, tmp)
            storage.stage_out(tmp, str(out))
        return f"{str(out).rstrip('/')}/{REPORT_FILE}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    plot(report, analysis, out / CHART_FILE)
    return str(out / REPORT_FILE)


def agreement_summary(location: str | Path) -> dict[str, float]:
    """Mean agreement measures of a saved report (``load_report``); {} without pairs."""
    agreement = load_report(location).get("agreement") or {}
    return {m: float(agreement[m]["mean"]) for m in AGREEMENT_MEASURES
            if (agreement.get(m) or {}).get("mean") is not None}


def _file_hour(relative: str) -> datetime | None:
    """The UTC hour of a capture file from its ``yyyy/mm/dd/hh/<file>.jsonl`` path (None: not that layout)."""
    parts = relative.split("/")
    try:
        return datetime(*map(int, parts[-5:-1]), tzinfo=timezone.utc) if len(parts) >= 5 else None
    except ValueError:
        return None


def event_time(record: dict[str, Any]) -> datetime | None:
    """A record's ``eventMetadata.inferenceTime`` (UTC), None when it has none that parses."""
    value = (record.get("eventMetadata") or {}).get("inferenceTime")
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def read_capture(capture: str | Path, endpoint: str, variant: str,
                 since: datetime | None = None) -> list[dict[str, Any]]:
    """The capture records of one variant, oldest hour first; ``capture`` may be an s3:// prefix. With ``since``
    (aware), only the hour files that can hold later records are read (listed, on S3), and only records whose
    ``inferenceTime`` is at or after it (to the second, the field's resolution) are kept. No records: []."""
    from training import storage

    def recent(relative: str) -> bool:  # an hour's margin: a record's time is not its file's hour by contract
        hour = _file_hour(relative)
        return since is None or hour is None or hour + timedelta(hours=2) > since

    location = f"{str(capture).rstrip('/')}/{endpoint}/{variant}"
    if not storage.is_s3(capture):
        return _read_records(Path(location), location, recent, since)
    # keys sort by yyyy/mm/dd/hh: the listing starts just before the first hour that can hold later records
    start_after = f"{since - timedelta(hours=1):%Y/%m/%d/%H}" if since is not None else None
    with tempfile.TemporaryDirectory(prefix="marketrank-capture-") as staging:  # removed once read
        try:
            root = storage.stage_in(location, staging, keep=recent, start_after=start_after)
        except FileNotFoundError:  # no shadow copies at all is a finding for the report, not an error
            return []
        return _read_records(root, location, recent, since)


def _read_records(root: Path, location: str, recent: Callable[[str], bool],
                  since: datetime | None) -> list[dict[str, Any]]:
    first = since.replace(microsecond=0) if since is not None else None
    records, older = [], 0
    for path in sorted(Path(root).glob("*/*/*/*/*.jsonl")):
        if not recent(path.relative_to(root).as_posix()):
            continue
        # Only whole lines: an endpoint may be appending the last one right now.
        lines = path.read_text().split("\n")[:-1]
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                log.warning("capture %s line %d is not a JSON record, skipped: %s", path, number, err)
                continue
            if not (isinstance(record, dict) and isinstance(record.get("eventMetadata"), dict)):
                log.warning("capture %s line %d is not a data-capture record (no eventMetadata object), skipped",
                            path, number)
                continue
            at = event_time(record) if first is not None else None
            if at is not None and at < first:
                older += 1
                continue
            records.append(record)
    if older:
        log.info("capture %s: %d records from before %s left out", location, older, since.isoformat())
    return records


def _decode(section: dict[str, Any]) -> dict[str, Any]:
    data = section["data"]
    if section.get("encoding") == "BASE64":
        import base64

        data = base64.b64decode(data)
    return wire.decode(data)


def _scores(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scores of the real items, their mask) of every list in one captured request/response."""
    request = _decode(record["captureData"]["endpointInput"])
    inputs, _, _ = wire.request_inputs(request)
    scores = wire.parse_scores(_decode(record["captureData"]["endpointOutput"]))
    mask = np.asarray(inputs.get("mask", np.ones_like(scores, dtype=bool)), dtype=bool)
    return scores, mask


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(values.size)
    ranks[np.argsort(-values, kind="stable")] = np.arange(values.size)
    return ranks


def compare_lists(champion: np.ndarray, challenger: np.ndarray, k: int) -> dict[str, float]:
    """Agreement of two score vectors over the same items."""
    top = min(k, champion.size)
    overlap = len(set(np.argsort(-champion)[:top]) & set(np.argsort(-challenger)[:top])) / top
    spearman = float(np.corrcoef(_ranks(champion), _ranks(challenger))[0, 1]) if champion.size > 1 else 1.0

    def standardise(x: np.ndarray) -> np.ndarray:
        return (x - x.mean()) / (x.std() or 1.0)

    drift = float(np.mean(np.abs(standardise(challenger) - standardise(champion))))
    return {"overlap": overlap, "spearman": spearman, "drift": drift}


def _pair_key(record: dict[str, Any]) -> tuple[Any, ...] | None:
    inference_id = record["eventMetadata"].get("inferenceId")
    return (inference_id, *_request_data(record)) if inference_id else None


def pair(production: list[dict], shadow: list[dict]) -> list[tuple[dict, dict]]:
    """One to one by ``inferenceId`` and request, in capture order: a caller that reused an id on other requests
    (only some of which were copied to the shadow) never gets one request compared with another, and a retried
    request pairs each of its records once."""
    waiting: dict[tuple, deque] = defaultdict(deque)
    for record in shadow:
        if (key := _pair_key(record)) is not None:
            waiting[key].append(record)
    pairs = []
    for record in production:
        queue = waiting.get(_pair_key(record))
        if queue:
            pairs.append((record, queue.popleft()))
    return pairs


@dataclasses.dataclass
class Analysis:
    pairs: int  # pairs compared
    per_list: dict[str, list[float]]  # overlap, spearman, drift: one value per paired list
    latency: dict[str, list[float]]  # per variant, ms
    #: Paired but not comparable (unparseable records, or answers of different shapes): skipped.
    skipped: int = 0


def _request_data(record: dict[str, Any]) -> tuple[Any, Any]:
    section = record["captureData"]["endpointInput"]
    return section.get("encoding"), section.get("data")


def analyse(production: list[dict], shadow: list[dict], k: int = 10) -> Analysis:
    per_list: dict[str, list[float]] = {"overlap": [], "spearman": [], "drift": []}
    latency: dict[str, list[float]] = {PRODUCTION: [], SHADOW: []}
    compared = skipped = 0
    for champion_record, challenger_record in pair(production, shadow):
        try:
            champion_scores, mask = _scores(champion_record)
            challenger_scores, _ = _scores(challenger_record)
        except (wire.WireError, KeyError, TypeError, ValueError) as err:
            skipped += 1
            log.warning("inference %s: a capture record is not a predict request/response, skipped: %s",
                        champion_record["eventMetadata"].get("inferenceId"), err)
            continue
        if champion_scores.shape != challenger_scores.shape or mask.shape != champion_scores.shape:
            skipped += 1
            log.warning("inference %s: champion scores %s and challenger scores %s (mask %s) do not line up, "
                        "skipped", champion_record["eventMetadata"].get("inferenceId"),
                        list(champion_scores.shape), list(challenger_scores.shape), list(mask.shape))
            continue
        compared += 1
        for row in range(champion_scores.shape[0]):
            real = mask[row]
            for name, value in compare_lists(champion_scores[row][real], challenger_scores[row][real], k).items():
                per_list[name].append(value)
        for variant, record in ((PRODUCTION, champion_record), (SHADOW, challenger_record)):
            if "latencyMs" in record["eventMetadata"]:
                latency[variant].append(float(record["eventMetadata"]["latencyMs"]))
    if skipped:
        log.warning("%d paired records were not comparable (unparseable, or answers of different shapes)", skipped)
    return Analysis(compared, per_list, latency, skipped)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    array = np.asarray(values)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "p99": float(np.percentile(array, 99))}


#: SageMaker's ModelLatency metric (microseconds), per endpoint and variant.
LATENCY_METRIC = {"Namespace": "AWS/SageMaker", "MetricName": "ModelLatency"}
MAX_DATAPOINTS = 1440  # GetMetricStatistics answers at most this many per call


def metric_window(since: datetime, until: datetime, now: datetime) -> tuple[datetime, int]:
    """(StartTime, Period) for GetMetricStatistics over ``[since, until)``: the period a multiple of what
    CloudWatch keeps for data that old (60 s up to 15 days, 300 s up to 63, 3600 s beyond; other periods return
    nothing there), large enough for one call's ``MAX_DATAPOINTS``, counted from the start rounded down to it."""
    age = now - since
    unit = 3600 if age > timedelta(days=63) else 300 if age > timedelta(days=15) else 60
    start = datetime.fromtimestamp(since.timestamp() // unit * unit, timezone.utc)
    span = max((until - start).total_seconds(), unit)
    return start, unit * int(-(-span // (unit * MAX_DATAPOINTS)))


def cloudwatch_latency(cloudwatch, endpoint: str, since: datetime, until: datetime,
                       now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Both variants' ``ModelLatency`` over ``[since, until)`` from CloudWatch, in ms: the sample-weighted mean of
    the period averages, and ``p95``: the sample-weighted mean of the period p95s (an approximation of the
    window's p95, the periods' lengths in ``period_s``; None where CloudWatch has none). A variant without samples
    is left out. Two calls per variant: CloudWatch takes Statistics or ExtendedStatistics in a call, not both."""
    start, period = metric_window(since, until, now or datetime.now(timezone.utc))
    out = {}
    for variant in (PRODUCTION, SHADOW):
        query = {**LATENCY_METRIC, "Dimensions": [{"Name": "EndpointName", "Value": endpoint},
                                                  {"Name": "VariantName", "Value": variant}],
                 "StartTime": start, "EndTime": until, "Period": period}
        points = [p for p in cloudwatch.get_metric_statistics(**query, Statistics=["Average", "SampleCount"])
                  ["Datapoints"] if p.get("SampleCount")]
        samples = sum(p["SampleCount"] for p in points)
        if not samples:
            continue
        counts = {p["Timestamp"]: p["SampleCount"] for p in points}
        p95s = [(p["ExtendedStatistics"]["p95"], counts[p["Timestamp"]])
                for p in cloudwatch.get_metric_statistics(**query, ExtendedStatistics=["p95"])["Datapoints"]
                if "p95" in (p.get("ExtendedStatistics") or {}) and p["Timestamp"] in counts]
        out[variant] = {"mean": sum(p["Average"] * p["SampleCount"] for p in points) / samples / 1000,
                        "p95": sum(v * n for v, n in p95s) / sum(n for _, n in p95s) / 1000 if p95s else None,
                        "p50": None, "p99": None, "samples": int(samples), "period_s": period}
    return out


def build_report(production: list[dict], shadow: list[dict], k: int = 10,
                 thresholds: ShadowThresholds = ShadowThresholds(), shadow_share: float = 1.0,
                 analysis: Analysis | None = None,
                 latency: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The comparison and the recommendation (see the module docstring). ``latency``: the variants' latency
    from elsewhere (``cloudwatch_latency``), used when the records carry none."""
    analysis = analysis or analyse(production, shadow, k)
    # Copies are expected from the shadow's first record on: between a config's creation and the end of the update
    # that puts the shadow live, production answers alone (minutes that must not read as failed copies).
    started = min(filter(None, map(event_time, shadow)), default=None)
    # Only requests with an inference id can be paired: on SageMaker a call without one (a smoke test, the AWS CLI)
    # is captured without it, and is neither expected to pair nor counted as a missing shadow copy.
    identified = [p for p in production if p["eventMetadata"].get("inferenceId")]
    copied = [p for p in identified if started is None or (at := event_time(p)) is None or at >= started]
    expected = len(copied) * shadow_share
    missing_share = max(0.0, 1.0 - (analysis.pairs + analysis.skipped) / expected) if expected else 0.0
    result = {
        "pairs": analysis.pairs, "skipped_pairs": analysis.skipped, "production_records": len(production),
        "production_records_without_id": len(production) - len(identified),
        "shadow_records": len(shadow), "shadow_share": shadow_share, "k": k,
        "agreement": {name: _stats(values) for name, values in analysis.per_list.items()},
        "latency_ms": {variant: _stats(values) for variant, values in analysis.latency.items()},
        "latency_source": "capture",
        "missing_shadow_share": missing_share,
        "thresholds": dataclasses.asdict(thresholds),
    }
    if latency and not any(analysis.latency.values()):
        result["latency_ms"] = {v: latency.get(v) or _stats([]) for v in (PRODUCTION, SHADOW)}
        result["latency_source"] = "cloudwatch"
    result["recommendation"], result["reasons"] = recommend(result, thresholds)
    return result


def shadow_share(state: Any) -> float:
    """The share of requests an endpoint state copies to its shadow variant: the shadow's weight relative to the
    production variant's (SageMaker's ShadowProductionVariants sampling), at most 1; 0 without a shadow."""
    if state is None or state.shadow is None or state.production is None:
        return 0.0
    return min(1.0, state.shadow.weight / state.production.weight) if state.production.weight > 0 else 1.0


def recommend(report: dict[str, Any], thresholds: ShadowThresholds) -> tuple[str, list[str]]:
    reasons = []
    overlap = report["agreement"]["overlap"]["mean"]
    # p95 where both variants have it; CloudWatch without percentiles gives means, compared the same way
    statistic = next((s for s in ("p95", "mean") if all((report["latency_ms"][v] or {}).get(s)
                                                        for v in (PRODUCTION, SHADOW))), None)
    if report["missing_shadow_share"] > thresholds.max_missing_share and report["production_records"] >= 20:
        reasons.append(f"{report['missing_shadow_share']:.0%} of shadow copies have no response "
                       f"(> {thresholds.max_missing_share:.0%})")
    source = report.get("latency_source", "capture")
    cloudwatch_p95 = source == "cloudwatch" and statistic == "p95"
    statistic_label = "p95 (mean of per-period p95s)" if cloudwatch_p95 else statistic
    if statistic is not None:
        champion, challenger = (report["latency_ms"][v][statistic] for v in (PRODUCTION, SHADOW))
        allowed = max(thresholds.max_latency_ratio * champion, champion + thresholds.latency_slack_ms)
        if challenger > allowed:
            reasons.append(f"challenger {statistic_label} latency {challenger:.1f} ms ({source}) > {allowed:.1f} ms "
                           f"allowed ({thresholds.max_latency_ratio}x or +{thresholds.latency_slack_ms:g} ms over "
                           f"the champion's {champion:.1f} ms)")
    if overlap is not None and report["pairs"] >= 20 and overlap < thresholds.min_overlap:
        reasons.append(f"mean top-{report['k']} overlap {overlap:.2f} < {thresholds.min_overlap}: rankings look "
                       f"unrelated to the champion's")
    if reasons:
        return "rollback", reasons
    if report["pairs"] < thresholds.min_pairs:
        return "keep-watching", [f"{report['pairs']} paired requests < {thresholds.min_pairs}"]
    latency = (f"{statistic_label} latency within {thresholds.max_latency_ratio}x ({source})" if statistic else
               "latency not compared (neither the capture records nor CloudWatch had both variants': compare "
               "their ModelLatency by hand)")
    return "promote", [f"{report['pairs']} paired requests, overlap {overlap:.2f}, {latency}"]


def plot(report: dict[str, Any], analysis: Analysis, path: str | Path) -> Path:
    """A PNG for people who prefer to look: agreement histograms and latency of both variants."""
    from serving.charts import pyplot, save_figure

    figure, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    axes[0].hist(analysis.per_list["overlap"], bins=np.linspace(0, 1, 11), color="#4477aa")
    axes[0].set_title(f"top-{report['k']} overlap per list")
    axes[1].hist(analysis.per_list["spearman"], bins=np.linspace(-1, 1, 21), color="#228833")
    axes[1].set_title("Spearman rank correlation per list")
    if analysis.latency[PRODUCTION] and analysis.latency[SHADOW]:
        axes[2].boxplot([analysis.latency[PRODUCTION], analysis.latency[SHADOW]], showfliers=False)
        axes[2].set_xticks([1, 2], [PRODUCTION, SHADOW])
    else:
        cells = {v: report["latency_ms"].get(v) or {} for v in (PRODUCTION, SHADOW)}
        text = "\n".join(f"{v}: mean {c['mean']:.1f} ms" + (f", p95 {c['p95']:.1f} ms" if c.get("p95") else "")
                         for v, c in cells.items() if c.get("mean") is not None)
        axes[2].text(0.5, 0.5, f"{report.get('latency_source')}:\n{text}" if text else "no latency measured",
                     ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_title("model latency (ms)")
    figure.suptitle(f"shadow report: {report['pairs']} paired requests -> {report['recommendation']}")
    figure.tight_layout()
    return save_figure(figure, path)
