"""Quality benchmark: the legacy policy, LightGBM LambdaMART, the TF-Ranking models and the oracle, trained on
the same splits and features and scored on the same whole test lists.

Metrics are NDCG@5/10 and MRR on the evaluation label (the simulator's true relevance; the logged label on LETOR)
with percentile-bootstrap 95% CIs, overall and per surface. The TF-Ranking model that the goals compare is the
one with the best *validation* NDCG@10: picking it on the test split would flatter it.

On simulated data every ranker is also scored on the logged clicks, raw and inverse-propensity weighted (the
evaluation's metric on real logs), and ``click_metric_agreement`` says how well each orders the rankers as the
true relevance does (Kendall's tau): the evidence for scoring real logs, and gating on them, the weighted way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, rankers
from benchmarks.datasets import Dataset
from training import metrics
from training.feature_spec import MASK
from training.hparams import HParams

METRICS = ("ndcg@5", "ndcg@10", "mrr")
PRIMARY = "ndcg@10"
#: The TF-Ranking models compared: each scorer with each loss, and the default model as a seed ensemble of 3
#: (``HParams.ensemble``): ``(scorer, loss)`` or ``(scorer, loss, members)``.
TFR_MODELS: tuple[tuple, ...] = (*((scorer, loss) for scorer in ("dnn", "din")
                                   for loss in ("softmax", "approx_ndcg", "pairwise_logistic")),
                                 ("dnn", "softmax", 3))
ORACLE_SHARE_GOAL = 0.95
#: The feature-ceiling reference (``rankers.train_feature_ceiling``): trained on true relevance, not a contender.
CEILING = "reference-ceiling"
#: The same with the simulator's latent taste added to the features (``rankers.taste_columns``): how much of the
#: oracle the logged features miss of the users' taste and the items' quality.
TASTE_CEILING = "reference-taste"
Progress = Callable[[str], None]


def tfr_name(scorer: str, loss: str, members: int = 1) -> str:
    return f"tfr-{scorer}-{loss}" + (f"-x{members}" if members > 1 else "")


def evaluate_rankers(dataset: Dataset, scorers: dict[str, rankers.Scorer], split: str) -> dict[str, Any]:
    """Per-list metrics of every scorer on ``split`` against the spec's evaluation label, and the segments. When
    the logged label is another one and the spec has a position-bias estimate, also ``clicks``: each scorer's
    NDCG@10 on the logged clicks, raw and inverse-propensity weighted (pooled, as ``training.evaluate``)."""
    from training.propensity import propensity_weights

    spec = dataset.spec
    eta = spec.propensity_eta if spec.position and spec.eval_label != spec.label else None
    per_list: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in scorers}
    clicks: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in scorers}
    segments: list[np.ndarray] = []
    for batch in dataset.batches(split)():
        labels = np.where(batch[MASK], batch[spec.eval_label], -1.0)
        logged = np.where(batch[MASK], batch[spec.label], -1.0) if eta else None
        weights = propensity_weights(batch[spec.position], eta, batch[MASK]) if eta else None
        for name, scorer in scorers.items():
            scores = scorer(batch)
            for metric, values in metrics.per_list_metrics(scores, labels).items():
                per_list[name].setdefault(metric, []).append(values)
            if eta:
                dcg, ideal = metrics.dcg(scores, logged, 10, weights)
                for key, values in (("raw", metrics.ndcg(scores, logged, 10)), ("dcg", dcg), ("ideal", ideal)):
                    clicks[name].setdefault(key, []).append(values)
        if spec.segment:
            segments.append(np.asarray(batch[spec.segment]).astype(str))
    out = {"per_list": {name: {m: np.concatenate(v) for m, v in by.items()} for name, by in per_list.items()},
           "segments": np.concatenate(segments) if segments else None}
    if eta:
        out["clicks"] = {name: {"raw": float(np.nanmean(np.concatenate(c["raw"]))),
                                "weighted": float(np.concatenate(c["dcg"]).sum() / np.concatenate(c["ideal"]).sum())}
                         for name, c in clicks.items()}
    return out


def click_metric_agreement(result: dict[str, Any], clicks: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Kendall's tau between the rankers' test NDCG@10 on the evaluation label and on the logged clicks, raw and
    weighted: which click metric orders rankers as the truth does."""
    names = sorted(clicks)
    truth = [result["rankers"][n]["overall"][PRIMARY]["value"] for n in names]
    return {"metric": PRIMARY, "eta": result["propensity_eta"], "rankers": len(names),
            **{f"kendall_tau_{kind}": common.kendall_tau(truth, [clicks[n][kind] for n in names])
               for kind in ("raw", "weighted")}}


def summarize(per_list: dict[str, np.ndarray], segments: np.ndarray | None, resamples: int = 1000) -> dict:
    """Bootstrap CI of each metric, overall and per segment."""
    out: dict[str, Any] = {"overall": {m: common.bootstrap_ci(per_list[m], resamples) for m in METRICS}}
    if segments is not None:
        out["per_segment"] = {str(s): {m: common.bootstrap_ci(per_list[m][segments == s], resamples)
                                       for m in METRICS} for s in np.unique(segments)}
    return out


def baselines(dataset: Dataset) -> dict[str, rankers.Scorer]:
    """The logging order (by logged position) and the oracle (by the simulator's true utility), when present."""
    spec, out = dataset.spec, {}
    if spec.position:
        out["legacy"] = lambda b: -np.asarray(b[spec.position], dtype=np.float64)
    if spec.oracle_score:
        out["oracle"] = lambda b: np.asarray(b[spec.oracle_score], dtype=np.float64)
    return out


def run_quality(dataset: Dataset, work_dir: Path, *, models: tuple[tuple, ...] = TFR_MODELS,
                hparams: HParams = HParams(), lambdamart: rankers.LambdaMartParams = rankers.LambdaMartParams(),
                lambdamart_ipw: bool = True, resamples: int = 1000, progress: Progress | None = None,
                trained_out: dict[str, tuple[rankers.Scorer, dict]] | None = None) -> dict[str, Any]:
    """Train every ranker, score valid and test, and return the result (JSON-ready). ``trained_out`` receives
    the trained TF-Ranking scorers, so a later benchmark on the same data need not train them again."""
    note = progress or (lambda _: None)
    started, machine = time.perf_counter(), common.machine()  # the load before the run: the machine is shared
    scorers = baselines(dataset)
    trained: dict[str, dict[str, Any]] = {}
    note("LambdaMART (LightGBM)")
    scorers["lambdamart"], trained["lambdamart"] = rankers.train_lambdamart(dataset, lambdamart)
    if lambdamart_ipw and dataset.spec.propensity_eta and dataset.spec.position:
        note("LambdaMART with IPW weights")
        scorers["lambdamart-ipw"], trained["lambdamart-ipw"] = rankers.train_lambdamart(
            dataset, dataclasses.replace(lambdamart, ipw=True))
    if lambdamart_ipw and dataset.spec.position:
        note("LambdaMART with LightGBM's position debiasing")
        scorers["lambdamart-position"], trained["lambdamart-position"] = rankers.train_lambdamart(
            dataset, dataclasses.replace(lambdamart, position_debiasing=True))
    for scorer, loss, *members in models:
        ensemble = members[0] if members else 1
        name = tfr_name(scorer, loss, ensemble)
        note(f"TF-Ranking {scorer}/{loss}" + (f", an ensemble of {ensemble}" if ensemble > 1 else ""))
        scorers[name], trained[name] = rankers.train_tfranking(
            dataset, dataclasses.replace(hparams, scorer=scorer, loss=loss, ensemble=ensemble), work_dir / name,
            progress=lambda epoch, logs, n=name: note(f"TF-Ranking {n}: epoch {epoch}, val ndcg@10 (logged) "
                                                      f"{logs.get('val_ndcg_10', float('nan')):.4f}"))
    if dataset.spec.oracle_score and dataset.spec.eval_label and dataset.spec.eval_label != dataset.spec.label:
        note("feature ceiling: LambdaMART on the training split's true relevance (a reference)")
        scorers[CEILING], trained[CEILING] = rankers.train_feature_ceiling(dataset, lambdamart)
        if dataset.simulator:
            note("taste ceiling: the same with the simulator's latent taste as features (a reference)")
            scorers[TASTE_CEILING], trained[TASTE_CEILING] = rankers.train_feature_ceiling(
                dataset, lambdamart, extra=rankers.taste_columns(dataset))
    if trained_out is not None:
        trained_out.update({name: (scorers[name], trained[name]) for name in trained if name.startswith("tfr-")})
    note("scoring the validation and test splits")
    valid = evaluate_rankers(dataset, scorers, "valid")
    test = evaluate_rankers(dataset, scorers, "test")
    valid_primary = {name: float(np.nanmean(valid["per_list"][name][PRIMARY])) for name in scorers}
    result = {
        "benchmark": "quality", "created": common.now(), "dataset": dataset.name, "sizes": dataset.sizes,
        "features_fingerprint": dataset.features_fingerprint,
        "simulator": dataset.simulator, "eval_label": dataset.spec.eval_label, "label": dataset.spec.label,
        "propensity_eta": dataset.spec.propensity_eta, "machine": machine,
        "rankers": {name: {"kind": _kind(name), "valid_ndcg@10": valid_primary[name], **trained.get(name, {}),
                           **summarize(test["per_list"][name], test["segments"], resamples)}
                    for name in scorers},
    }
    if "clicks" in test:
        for name, values in test["clicks"].items():
            result["rankers"][name]["test_click_ndcg@10"] = values
        result["click_metric_agreement"] = click_metric_agreement(result, test["clicks"])
    result["goals"] = goals(result, test["per_list"], resamples)
    result["seconds"] = time.perf_counter() - started
    return result


def _kind(name: str) -> str:
    return "tf-ranking" if name.startswith("tfr-") else name.split("-")[0]


def best_by_validation(result: dict[str, Any], kind: str) -> str | None:
    candidates = [n for n, r in result["rankers"].items() if r["kind"] == kind]
    return max(candidates, key=lambda n: result["rankers"][n]["valid_ndcg@10"]) if candidates else None


def goals(result: dict[str, Any], per_list: dict[str, dict[str, np.ndarray]], resamples: int = 1000) -> dict:
    """The issue's goals on test NDCG@10: best TF-Ranking (chosen on validation) >= LambdaMART (also chosen on
    validation among its variants), and >= 95% of the oracle."""
    rank = result["rankers"]
    best_tfr, best_lgbm = best_by_validation(result, "tf-ranking"), best_by_validation(result, "lambdamart")
    out: dict[str, Any] = {"best_tf_ranking": best_tfr, "best_lambdamart": best_lgbm}
    if best_tfr is None:
        return out
    value = rank[best_tfr]["overall"][PRIMARY]["value"]
    if best_lgbm is not None:
        diff = metrics.paired_bootstrap(per_list[best_tfr][PRIMARY], per_list[best_lgbm][PRIMARY],
                                        resamples=resamples)
        out["tfr_vs_lambdamart"] = {"met": value >= rank[best_lgbm]["overall"][PRIMARY]["value"], **diff}
    if "oracle" in rank:
        oracle = rank["oracle"]["overall"][PRIMARY]["value"]
        out["oracle_share"] = {"value": value / oracle, "goal": ORACLE_SHARE_GOAL,
                               "met": value / oracle >= ORACLE_SHARE_GOAL}
        if CEILING in rank:
            ceiling = rank[CEILING]["overall"][PRIMARY]["value"]
            out["feature_ceiling"] = {"value": ceiling, "oracle_share": ceiling / oracle,
                                      "best_tf_ranking_share": value / ceiling}
        if TASTE_CEILING in rank:
            taste = rank[TASTE_CEILING]["overall"][PRIMARY]["value"]
            out["taste_ceiling"] = {"value": taste, "oracle_share": taste / oracle,
                                    "features": rank[TASTE_CEILING].get("extra_features", [])}
    return out
