"""BENCHMARKS.md and the PNG plots, rendered from the result JSON files only (no number is typed here)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from benchmarks import common, plots, throughput
from marketrank.simulator import SIZE_PRESETS
from training.features import features_fingerprint

REPORT = common.RESULTS_DIR.parent.parent / "BENCHMARKS.md"
SERVING_PLOT = "serving_latency.png"
METRICS = ("ndcg@5", "ndcg@10", "mrr")
#: "Large enough to take ~10 minutes of training on 2 cores": the band read as about 10 minutes.
LARGE_TRAIN_MINUTES = (7.5, 15.0)


def load_results(results_dir: Path) -> dict[str, Any]:
    """Every ``*.json`` of the results dir by file stem (quality results are ``quality-<dataset>``)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))}


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ci(stat: dict[str, Any]) -> str:
    return f"{_f(stat['value'])} [{_f(stat['ci_low'])}, {_f(stat['ci_high'])}]"


def _yes(met: bool | None) -> str:
    return {True: "**met**", False: "**NOT met**", None: "n/a"}[met]


def _machine(machine: dict[str, Any], created: str) -> str:
    versions = machine.get("versions") or {}
    listed = ", ".join(f"{name} {v}" for name, v in versions.items() if v and not isinstance(v, bool))
    load = machine.get("loadavg") or machine.get("loadavg_before")
    return (f"Measured {created} on {machine.get('cores')} cores ({machine.get('cpu_model')}), "
            f"{machine.get('ram_gib')} GiB RAM, {machine.get('platform')}; load average (1, 5, 15 min) {load}. "
            f"Versions: {listed}.")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def _sizes(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    splits = ", ".join(f"{s} {sizes[s]['lists']:,} lists / {sizes[s]['items']:,} items" for s in
                       ("train", "valid", "test") if s in sizes)
    sim = result.get("simulator")
    origin = (f"simulated: {sim['users']:,} users, {sim['items']:,} items, {sim['requests']:,} requests, seed "
              f"{sim['seed']}" if sim else f"from {sizes.get('path')}")
    return f"Data `{result['dataset']}` ({origin}); {splits}." + _stale(result)


def _stale(result: dict[str, Any]) -> str:
    """A warning when a result on simulated data ran on a preset that has changed since
    (``marketrank.simulator.SIZE_PRESETS``), or on features another feature code built
    (``training.features.features_fingerprint``; a result from before that was recorded: possibly stale)."""
    sim = result.get("simulator")
    if not sim:
        return ""
    preset = _preset_change(result, sim)
    reasons = [r for r in (preset, _feature_change(result)) if r]
    if not reasons:
        return ""
    known = preset or result.get("features_fingerprint") is not None
    return f" **{'Stale' if known else 'Possibly stale'}:** {'; '.join(reasons)}. Re-run its benchmark to refresh."


def _feature_change(result: dict[str, Any]) -> str:
    built, now = result.get("features_fingerprint"), features_fingerprint()
    if built == now:
        return ""
    if built is None:
        return "the feature code it ran on was not recorded (the result predates the record)"
    return f"measured on features from other feature code (fingerprint {built}, now {now})"


def _preset_change(result: dict[str, Any], sim: dict[str, Any]) -> str:
    preset = SIZE_PRESETS.get(result.get("dataset", ""))
    if preset is None:
        return ""

    def text(value: Any) -> str:
        return "unrecorded" if value is None else f"{value:,}"

    changed = [f"{k} {text(sim.get(k))} (now {text(v)})" for k, v in dataclasses.asdict(preset).items()
               if k != "seed" and sim.get(k) != v]
    return f"measured on an earlier `{result['dataset']}` preset: {', '.join(changed)}" if changed else ""


def quality_section(name: str, result: dict[str, Any], out_dir: Path) -> list[str]:
    plot = plots.quality(result, out_dir / f"{name}.png")
    rankers = sorted(result["rankers"].items(), key=lambda kv: -kv[1]["overall"]["ndcg@10"]["value"])
    segments = sorted({s for _, r in rankers for s in r.get("per_segment", {})})
    header = ["ranker", *(f"{m.upper()} [95% CI]" for m in METRICS), *(f"{s} NDCG@10" for s in segments),
              "valid NDCG@10", "train s"]
    rows = [[f"`{n}`", *(_ci(r["overall"][m]) for m in METRICS),
             *(_ci(r["per_segment"][s]["ndcg@10"]) if s in r.get("per_segment", {}) else "-" for s in segments),
             _f(r.get("valid_ndcg@10")), _f(r.get("train_seconds"), 1)] for n, r in rankers]
    lines = [f"## Quality: `{result['dataset']}`", "", _machine(result["machine"], result["created"]), "",
             _sizes(result) + f" Trained on the logged label `{result['label']}`; scored on `{result['eval_label']}` "
             f"(whole test lists; lists without a relevant item are left out). Position-bias estimate "
             f"eta = {_f(result.get('propensity_eta'), 3)}.", ""]
    lines += _table(header, rows) + ["", f"![quality]({plot.name})", ""]
    goals = result.get("goals", {})
    best, lgbm = goals.get("best_tf_ranking"), goals.get("best_lambdamart")
    if best and "tfr_vs_lambdamart" in goals:
        g = goals["tfr_vs_lambdamart"]
        lines.append(f"- Best TF-Ranking model by validation NDCG@10: `{best}`; against `{lgbm}` (best LambdaMART "
                     f"by validation) its test NDCG@10 differs by {g['mean_diff']:+.4f} (paired bootstrap 95% CI "
                     f"{g['ci_low']:+.4f} to {g['ci_high']:+.4f}, {g['lists']} lists): goal TF-Ranking >= "
                     f"LambdaMART {_yes(g['met'])}.")
    if best and "oracle_share" in goals:
        g = goals["oracle_share"]
        lines.append(f"- `{best}` reaches {g['value']:.1%} of the oracle's test NDCG@10: goal >= {g['goal']:.0%} "
                     f"{_yes(g['met'])}.")
    agreement = result.get("click_metric_agreement")
    if agreement:
        lines.append(f"- Scored on the logged clicks instead (`test_click_ndcg@10` per ranker), the "
                     f"inverse-propensity weighted NDCG@10 (eta {_f(agreement['eta'], 3)}; what real logs are "
                     f"evaluated and gated on) orders the {agreement['rankers']} rankers as `{result['eval_label']}` "
                     f"does with Kendall's tau {agreement['kendall_tau_weighted']:+.3f}; raw click NDCG@10 with "
                     f"{agreement['kendall_tau_raw']:+.3f}.")
    stops = {n: r.get("early_stopping") for n, r in rankers if r.get("kind") == "lambdamart"}
    if stops:  # results from before the record stopped every LambdaMART on raw click NDCG
        lines.append("- LambdaMART early stopping: " + "; ".join(
            f"`{n}` on {stops[n] or 'validation ndcg@10 of the logged label (not recorded)'}" for n in stops) + ".")
    if best and "feature_ceiling" in goals:
        g = goals["feature_ceiling"]
        lines.append(f"- Feature ceiling: `reference-ceiling` is LambdaMART trained on the training split's "
                     f"true relevance (early-stopped on the validation split's), which no production model sees. "
                     f"On test it reaches {_f(g['value'])} = {g['oracle_share']:.1%} of the oracle: "
                     f"roughly what these features can carry with clean labels. `{best}`, learning from clicks, "
                     f"reaches {g['best_tf_ranking_share']:.1%} of that.")
    if "taste_ceiling" in goals:
        g = goals["taste_ceiling"]
        parts = ", ".join(f"`{n}`" for n in g["features"])
        lines.append(f"- Taste ceiling: `reference-taste` is the same LambdaMART given, besides the features, the "
                     f"simulator's latent terms of each item's utility for its user ({parts}; no log holds them). "
                     f"It reaches {_f(g['value'])} = {g['oracle_share']:.1%} of the oracle; the rest is the "
                     f"utility's noise and what the learner does not fit. The distance from the feature ceiling to "
                     f"it is what the logged features do not reveal of these terms (the user's taste and the "
                     f"item's quality).")
    return [*lines, ""]


def unbiased_section(result: dict[str, Any], out_dir: Path) -> list[str]:
    plot = plots.unbiased(result, out_dir / "unbiased.png")
    order = [n for n in ("oracle", "ipw", "naive", "legacy") if n in result["rankers"]]
    rows = [[f"`{n}`", *(_ci(result["rankers"][n]["overall"][m]) for m in METRICS),
             _f(result["rankers"][n].get("ipw_eta"), 3) if n in ("naive", "ipw") else "-"] for n in order]
    p, gap, diff = result["propensity"], result["gap_closed"], result["ipw_minus_naive"]
    lines = ["## Learning from position-biased clicks", "", _machine(result["machine"], result["created"]), "",
             _sizes(result) + f" Both models learn from the logged graded clicks and are scored on "
             f"`{result['eval_label']}`. Propensities: examination ~ (1 + position)^-eta with eta = "
             f"{_f(p['eta_estimated'], 3)} estimated from the {p['source']} (the simulator's true value, used "
             f"only for this check: {p['eta_simulator_truth']}).", ""]
    lines += _table(["model", *(f"{m.upper()} [95% CI]" for m in METRICS), "eta used"], rows)
    lines += ["", f"IPW minus naive test NDCG@10: {diff['mean_diff']:+.4f} (paired bootstrap 95% CI "
              f"{diff['ci_low']:+.4f} to {diff['ci_high']:+.4f}). The naive model's gap to the oracle is "
              f"{gap['naive_gap']:.4f}; IPW closes **{gap['value']:.1%}** of it (CI {gap['ci_low']:.1%} to "
              f"{gap['ci_high']:.1%}).", "", f"![unbiased]({plot.name})", ""]
    return lines


def _pipeline_status(pipe: dict[str, Any]) -> str:
    """met / NOT met, or not resolved when the ratio's interval spans the goal (``met`` is None)."""
    return "**not resolved: the interval spans the goal**" if pipe["met"] is None else _yes(pipe["met"])


def _pipeline_verdict(pipe: dict[str, Any]) -> str:
    """The training pipeline's ratio to cached batches, its interval, and met / NOT met / not resolved."""
    return f"{throughput.describe_ratio(pipe)} {_pipeline_status(pipe)}"


def throughput_section(result: dict[str, Any], out_dir: Path) -> list[str]:
    scaling = plots.scaling(result, out_dir / "throughput_scaling.png")
    curves = plots.time_to_quality(result, out_dir / "time_to_quality.png")
    hp = result["hparams"]
    rows = []
    for s in result["sizes"]:
        ttq, pipe = s["time_to_quality"], s["input_pipeline"]
        rows.append([f"`{s['dataset']}`", f"{s['train_lists']:,}", f"{s['train_items']:,}",
                     f"{s['epochs_run']} (best {s['best_epoch']})", _f(s["seconds_per_epoch"], 1),
                     _f(s["train_seconds"], 1), f"{s['lists_per_second']:,.0f}", f"{s['items_per_second']:,.0f}",
                     f"{_f(ttq['seconds'], 1)} (epoch {ttq['epoch']})", _f(pipe["cached_step_ms"], 1),
                     f"{_f(pipe['streaming']['step_ms'], 1)} ({pipe['streaming']['ratio']:.2f}x)",
                     f"{_f(pipe['in_memory']['step_ms'], 1)} ({pipe['in_memory']['ratio']:.2f}x)",
                     _f(pipe["in_memory"]["load_seconds"], 1),
                     f"{pipe['train_uses'].replace('_', '-')}: {_pipeline_verdict(pipe)}"])
    header = ["data", "train lists", "train items", "epochs", "s / epoch", "train s", "lists/s", "items/s",
              "time-to-quality s", "step ms (cached)", "step ms streaming", "step ms in-memory", "load s",
              "training's pipeline vs cached, median (~95% interval) (goal <= 1.1x)"]
    lines = ["## Training throughput (CPU)", "", _machine(result["machine"], result["created"]), "",
             f"`{hp['scorer']}/{hp['loss']}`, batch {hp['batch_size']}, up to {hp['epochs']} epochs, early "
             f"stopping on `{hp['early_stopping']}` (patience {hp['patience']}). Seconds are wall time of "
             "`training.train.train` including validation; lists/s counts training lists of every epoch run. "
             "Time-to-quality: until validation NDCG@10 on the evaluation label first reaches 99% of the exported "
             "epoch's value (computing that curve is left out of the seconds). Input "
             "pipeline: the same model and steps fed by each pipeline versus the batches cached in memory by "
             f"tf.data, run back to back in each of {result['sizes'][0]['input_pipeline']['rounds']} rounds; a ratio "
             "is the median over rounds of the "
             "pipeline's time / the same round's cached time (a paired comparison: a shared machine that slows "
             "down slows both sides of a pair), with a distribution-free ~95% interval of that median. Step ms "
             "are the fastest round's. *Streaming* parses Parquet into padded NumPy on every epoch "
             "and preprocesses every batch (data beyond `data_cache_mb`); *in-memory* reads and preprocesses the "
             "split once (*load s*) and cuts reshuffled batches in TensorFlow's threads. The goal column rates "
             "the pipeline training picks for that data, in-memory with its load spread over the epochs run.", ""]
    largest = max(result["sizes"], key=lambda s: s["train_lists"])
    lines += _table(header, rows) + [
        "", f"The largest size, `{largest['dataset']}`, trains for {largest['train_seconds'] / 60:.1f} minutes "
        f"({largest['train_lists'] / min(s['train_lists'] for s in result['sizes']):.0f}x the lists of the "
        "smallest). On 2 cores the input work cannot run beside the model's for free: both compete for the "
        "same CPU, so what counts is how little of it is left per step.", ""]
    for size in result["sizes"]:
        if size.get("kept"):
            lines += [f"`{size['dataset']}` is from an earlier run (measured {size['created']}; load average "
                      f"{(size.get('machine') or {}).get('loadavg')}), kept because this run did not include it.", ""]
    spreads = ", ".join(f"`{s['dataset']}` {s['input_pipeline']['cached_spread']:.0%}" for s in result["sizes"])
    lines += [f"Machine noise: the cached step time varied across rounds by {spreads} ((max - min) / median).", ""]
    by_warning: dict[str, list[str]] = {}
    for size in result["sizes"]:
        if _stale(size):
            by_warning.setdefault(_stale(size), []).append(f"`{size['dataset']}`")
    lines += [f"{', '.join(names)}:{warning}" for warning, names in by_warning.items()] + (
        [""] if by_warning else [])
    lines += [f"![scaling]({scaling.name}) ![time to quality]({curves.name})", ""]
    return lines


def _paced_cells(r: dict[str, Any]) -> list[str]:
    """The paced floor and the API's ratio to it (results from before it was measured: n/a)."""
    paced, ratio = (r["floor"].get("paced") or {}).get("signature_ms"), r.get("ratio_to_paced_floor")
    if not paced or not ratio:
        return ["n/a", "n/a"]
    return [f"{_f(paced['p50'], 2)} / {_f(paced['p99'], 2)}", f"{_f(ratio['p50'], 1)}x / {_f(ratio['p99'], 1)}x"]


def _phase_cell(r: dict[str, Any], phase: str) -> str:
    """p50 / p99 of a phase driven at the same arrivals (``endpoint_alone``, ``transport_floor``); n/a for results
    from before it was measured."""
    latency = (r.get(phase) or {}).get("latency_ms") or {}
    if latency.get("p99") is None:
        return "n/a"
    errors = r[phase]["errors"]
    return f"{_f(latency['p50'], 1)} / {_f(latency['p99'], 1)}" + (f" ({errors} errors)" if errors else "")


def serving_section(result: dict[str, Any], out_dir: Path) -> list[str]:
    rows = []
    for r in result["results"]:
        lat, floor, ratio = r["latency_ms"], r["floor"]["signature_ms"], r["ratio_to_floor"]
        rows.append([str(r["candidates"]), _f(lat["p50"], 1), _f(lat["p95"], 1), _f(lat["p99"], 1),
                     _f(r["throughput_rps"], 1), f"{r['errors']} ({_pct(r.get('error_rate'))})",
                     f"{r['fallbacks']} ({_pct(r.get('fallback_rate'))})", _f(floor["p50"], 2), _f(floor["p99"], 2),
                     f"{_f(ratio['p50'], 1)}x / {_f(ratio['p99'], 1)}x", *_paced_cells(r),
                     _phase_cell(r, "endpoint_alone"), _phase_cell(r, "transport_floor")])
    header = ["candidates", "p50 ms", "p95 ms", "p99 ms", "throughput req/s", "errors", "fallbacks",
              "raw model p50 ms", "raw model p99 ms", "overhead vs raw model p50 / p99",
              "raw model paced p50 / p99 ms", "overhead vs paced p50 / p99", "endpoint alone p50 / p99 ms",
              "transport floor p50 / p99 ms"]
    settings, target = result.get("settings", {}), result.get("target", {})
    machine = {**result.get("machine", {}), "versions": result.get("versions", {}),
               "loadavg": (result.get("machine") or {}).get("loadavg_before")}
    lines = ["## Serving", "", _machine(machine, result["created"]), "",
             f"`marketrank bench serve`: ranking API + local model endpoint on loopback, open-loop "
             f"{settings.get('arrivals', '')} arrivals at {settings.get('rate_rps')} req/s for "
             f"{settings.get('seconds')} s per candidate count. Raw model floor: the SavedModel signature run in "
             "process on the same inputs, in a session as the local endpoint (and TF Serving) runs it, back to "
             "back, and *paced* (each call after an idle pause drawn like "
             "the load's arrival gaps, as every request under the load finds the cores idle). Endpoint alone: "
             "the same arrivals sent straight to the model endpoint with the API's predict bodies, a lower bound "
             "for the API's latency up to run-to-run noise. Transport floor: the same arrivals and rank bodies "
             "through an API and an endpoint that do no ranking work on the same stacks (canned answers of the "
             "same sizes): what the HTTP servers, the model client and the machine cost at this rate.", ""]
    lines += _table(header, rows)
    feature_change = _feature_change(result.get("workspace") or {})
    if feature_change:
        lines += ["", f"Features served: {feature_change}. Re-run `marketrank bench serve` to refresh."]
    if target:
        lines += ["", f"Target: p99 <= {target['p99_ms']:g} ms at {target['rate_rps']:g} req/s with "
                      f"{target['candidates']} candidates, no errors or fallbacks: {_yes(target.get('met'))} "
                      f"({target.get('detail')})."]
    if (out_dir / SERVING_PLOT).exists():
        lines += ["", f"![serving latency]({SERVING_PLOT})"]
    return [*lines, ""]


def goals_section(results: dict[str, Any]) -> list[str]:
    """The issue's goals, each with the measured value, from whichever results exist."""
    rows = []
    main = results.get("quality-default") or next((r for n, r in results.items() if n.startswith("quality")), None)
    goals = (main or {}).get("goals", {})
    if "tfr_vs_lambdamart" in goals:
        best, lgbm = goals["best_tf_ranking"], goals["best_lambdamart"]
        value = {n: main["rankers"][n]["overall"]["ndcg@10"]["value"] for n in (best, lgbm)}
        rows.append([f"best TF-Ranking >= LambdaMART on test NDCG@10 (`{main['dataset']}`)",
                     f"`{best}` {_f(value[best])} vs `{lgbm}` {_f(value[lgbm])}",
                     _yes(goals["tfr_vs_lambdamart"]["met"])])
    if "oracle_share" in goals:
        ceilings = [f"{name} ceiling {goals[key]['oracle_share']:.1%}"
                    for name, key in (("feature", "feature_ceiling"), ("taste", "taste_ceiling")) if key in goals]
        rows.append([f"best TF-Ranking >= 95% of the oracle's NDCG@10 (`{main['dataset']}`)",
                     f"{goals['oracle_share']['value']:.1%}" + (f" ({', '.join(ceilings)})" if ceilings else ""),
                     _yes(goals["oracle_share"]["met"])])
    if "unbiased" in results:
        gap = results["unbiased"]["gap_closed"]
        rows.append(["IPW closes the naive model's gap to the oracle (no threshold set)",
                     f"{gap['value']:.1%} (95% CI {gap['ci_low']:.1%} to {gap['ci_high']:.1%})", "n/a"])
    if "throughput" in results:
        largest = max(results["throughput"]["sizes"], key=lambda s: s["train_lists"])
        pipe = largest["input_pipeline"]
        rows.append([f"input pipeline step time <= 1.1x cached batches (`{largest['dataset']}`)",
                     throughput.describe_ratio(pipe), _pipeline_status(pipe)])
        large = next((s for s in results["throughput"]["sizes"] if s["dataset"] == "large"), None)
        low, high = LARGE_TRAIN_MINUTES
        goal = f"`large` trains in ~10 min on this machine ({low:g} to {high:g} min)"
        if large is None:
            rows.append([goal, "not measured (`marketrank bench train --sizes ...,large`)", _yes(None)])
        else:
            minutes = large["train_seconds"] / 60
            rows.append([goal, f"{minutes:.1f} min ({large['train_lists']:,} training lists)" + _stale(large),
                         _yes(low <= minutes <= high)])
    if "serving" in results and results["serving"].get("target"):
        target = results["serving"]["target"]
        bounds = [f"{name} p99 {_f(target[key], 1)} ms" for name, key in (
            ("endpoint alone", "endpoint_alone_p99_ms"), ("transport floor", "transport_floor_p99_ms"))
            if target.get(key) is not None]
        rows.append([f"serving p99 <= {target['p99_ms']:g} ms at {target['rate_rps']:g} req/s, "
                     f"{target['candidates']} candidates",
                     target.get("detail", "") + (f" ({', '.join(bounds)})" if bounds else ""),
                     _yes(target.get("met"))])
    return ["## Goals", "", *_table(["goal", "measured", "status"], rows), ""] if rows else []


def write_report(results_dir: Path = common.RESULTS_DIR, out: Path = REPORT) -> Path:
    """Render ``out`` (Markdown) and the plots beside the results; links are relative to ``out``."""
    results_dir, out = Path(results_dir), Path(out)
    results = load_results(results_dir)
    if not results:
        raise FileNotFoundError(f"no benchmark results (*.json) in {results_dir}: run `marketrank bench all`")
    prefix = os.path.relpath(results_dir.resolve(), out.parent.resolve())
    body: list[str] = goals_section(results)
    for name in sorted(n for n in results if n.startswith("quality")):
        body += quality_section(name, results[name], results_dir)
    if "unbiased" in results:
        body += unbiased_section(results["unbiased"], results_dir)
    if "throughput" in results:
        body += throughput_section(results["throughput"], results_dir)
    if "serving" in results:
        body += serving_section(results["serving"], results_dir)
    body = [line.replace("](", f"]({prefix}/") if line.startswith("![") else line for line in body]
    header = ["# Benchmarks", "", "Generated by `marketrank bench report` from the JSON results in "
              f"`{prefix}/`; every number below comes from a run. `make bench` re-runs quality and unbiased "
              "learning on `default`, throughput on `tiny,small,default` and serving; results of other sizes "
              "(`bench quality --size large`, `bench train --sizes ...,large`) stay as their own runs left them, "
              "each with its date. Do not edit by hand.", ""]
    out.write_text("\n".join(header + body).rstrip() + "\n")
    return out
