"""Evaluation entry point (a SageMaker processing step): SavedModel + test split -> ``evaluation.json``.

Scores the test lists with the exported signature (plain TensorFlow, exactly what TF Serving runs), computes
NDCG@5/10/20, MRR and MAP overall and per segment (surface) against the spec's ``eval_label`` (the simulator's
true relevance when present), the same for the legacy logging order and the oracle, and, given a champion
model, a paired bootstrap 95% CI of the NDCG@10 difference; the same against the logged order (what users were
shown), which the gate also checks.

Logged feedback is position-biased: a click needs the slot to be examined, and the ranking that produced the
logs put its own favourites in the examined slots, so click NDCG favours it. When the spec carries the logged
position and the examination exponent the feature job estimated from randomised traffic, NDCG on the logged
label weights each item's gain by its inverse propensity (``training.propensity``, as training does) and pools
DCG over lists (``training.metrics``): on real logs that is the gate's metric.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script by SageMaker: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import metrics, propensity, report
from training.feature_spec import MASK, FeatureSpec

log = logging.getLogger("marketrank.evaluate")
#: Lists of one user are alike: the champion comparison's bootstrap resamples users, not lists (when the data
#: has the column; LETOR has none).
CLUSTER_COLUMN = "user_id"
Batches = Callable[[], Iterator[dict[str, Any]]]


class SavedModelScorer:
    """Scores padded batches with an exported model's ``serving_default`` signature."""

    def __init__(self, model_dir: str | Path):
        import tensorflow as tf

        from training import export

        self.path = export.find_saved_model(_untar(Path(model_dir)))
        self.spec = export.load_spec(self.path)
        self._fn = tf.saved_model.load(str(self.path)).signatures[export.SIGNATURE]
        self._inputs = list(self._fn.structured_input_signature[1])
        self._output = export.OUTPUT

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        import tensorflow as tf

        missing = [name for name in self._inputs if name not in batch]
        if missing:
            raise KeyError(f"model {self.path} needs features {missing} that the evaluation data lacks")
        feed = {}
        for name in self._inputs:
            value = batch[name]
            feed[name] = tf.constant(value.astype(str) if value.dtype == object else value)
        return self._fn(**feed)[self._output].numpy()


def _untar(model_dir: Path) -> Path:
    """SageMaker hands processing steps ``model.tar.gz``; unpack it next to a temp dir if that is what we got."""
    archives = list(model_dir.glob("*.tar.gz")) if model_dir.is_dir() else []
    if not archives:
        return model_dir
    target = Path(tempfile.mkdtemp(prefix="marketrank-model-"))
    with tarfile.open(archives[0]) as archive:
        archive.extractall(target, filter="data") if sys.version_info >= (3, 12) else archive.extractall(target)
    return target


def has_model(path: str | Path | None) -> bool:
    """True when ``path`` holds a model (a SavedModel or SageMaker's model.tar.gz), not just a ``no-champion``
    marker or nothing: the pipeline always mounts the champion prefix, and the first run has no champion."""
    if not path or not Path(path).is_dir():
        return False
    root = Path(path)
    return any(root.glob("*.tar.gz")) or any(root.rglob("saved_model.pb"))


def parquet_batches(test_dir: str | Path, spec: FeatureSpec, batch_size: int = 256,
                    extra_specs: tuple[FeatureSpec, ...] = (), extra_labels: tuple[str, ...] = ()) -> Batches:
    """Whole (untruncated) test lists with the eval label, baselines' columns and any other model's features."""
    from training import data
    from training.feature_spec import FeatureSpec as Spec

    names = set(spec.names)
    features = list(spec.features) + [f for s in extra_specs for f in s.features
                                      if f.name not in names and not names.add(f.name)]
    merged = Spec(**{**spec.__dict__, "features": tuple(features)})
    wanted = (spec.eval_label, *extra_labels, spec.position, spec.oracle_score)
    available = data.available_columns(test_dir)
    extra = tuple(dict.fromkeys(c for c in wanted if c and c != spec.label and c in available))
    per_list = tuple(c for c in (CLUSTER_COLUMN,) if c in available)  # the comparison resamples users
    return lambda: data.iter_batches(test_dir, merged, batch_size, list_size=None, columns_extra=extra,
                                     keep_columns=per_list)


def gain_weighting(spec: FeatureSpec, eta: float | None = None) -> dict[str, Any] | None:
    """How NDCG on the logged label is de-biased, with ``eta`` or else the spec's estimate (None: it cannot be:
    no logged position, or no exponent, e.g. logs without a randomised bucket to estimate it from)."""
    eta = spec.propensity_eta if eta is None else eta
    if not spec.position or not eta:
        return None
    return {"method": "inverse_propensity", "position": spec.position, "eta": float(eta),
            "clip": propensity.CLIP, "metrics": [f"ndcg@{k}" for k in metrics.CUTOFFS]}


def evaluate(model_dir: str | Path, batches: Batches | str | Path, output_dir: str | Path | None = None,
             champion_dir: str | Path | None = None, *, eval_label: str | None = None,
             propensity_eta: float | None = None, bootstrap_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Evaluate a challenger (and optionally a champion) and write ``evaluation.json`` to ``output_dir``.

    Metrics use ``eval_label`` (default: the spec's: the simulator's true relevance when the data has it); on
    the logged label, NDCG is inverse-propensity weighted when it can be (``gain_weighting``; ``propensity_eta``
    overrides the spec's estimate). The other ways of scoring the logged label are reported beside it:
    ``secondary`` (raw, where the logging policy looks better than it is) and ``secondary_ipw`` (weighted).
    """
    challenger = SavedModelScorer(model_dir)
    spec = challenger.spec
    champion = SavedModelScorer(champion_dir) if champion_dir else None
    label_name = eval_label or spec.eval_label
    if propensity_eta is not None and not spec.position:
        raise ValueError(f"propensity_eta {propensity_eta}: the model's feature spec names no logged position column")
    weighting = gain_weighting(spec, propensity_eta)
    views = {"primary": (label_name, weighting if label_name == spec.label else None)}
    if label_name == spec.label and spec.position and propensity_eta is None and not weighting:
        log.warning("no position-bias estimate (the logs have no randomised bucket to fit it on): NDCG is scored on "
                    "raw logged feedback, which favours the ranking that produced the logs; pass propensity_eta")
    if views["primary"] != (spec.label, None):
        views["secondary"] = (spec.label, None)
    if weighting and views["primary"] != (spec.label, weighting):
        views["secondary_ipw"] = (spec.label, weighting)
    if not callable(batches):
        batches = parquet_batches(batches, spec, extra_specs=(champion.spec,) if champion else (),
                                  extra_labels=(label_name,))
    scorers: dict[str, Callable[[dict], np.ndarray]] = {"challenger": challenger}
    if champion:
        scorers["champion"] = champion
    per_list: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
    segments: list[np.ndarray] = []
    clusters: list[np.ndarray] = []
    n_lists = 0
    for batch in batches():
        if label_name not in batch:
            raise KeyError(f"evaluation label {label_name!r} is not in the evaluation data")
        candidates = dict(scorers)
        if spec.position and spec.position not in batch:  # the gate compares against the logged order
            raise KeyError(f"the logged position {spec.position!r} is not in the evaluation data")
        if spec.position:
            candidates["legacy"] = lambda b: -b[spec.position]
        if spec.oracle_score and spec.oracle_score in batch:
            candidates["oracle"] = lambda b: b[spec.oracle_score]
        scored = {}  # view -> (labels, gain weights)
        for view, (label, weighted) in views.items():
            if label not in batch:
                continue
            scored[view] = (np.where(batch[MASK], batch[label], -1.0),
                            propensity.propensity_weights(batch[spec.position], weighted["eta"], batch[MASK],
                                                          weighted["clip"]) if weighted else None)
        for name, scorer in candidates.items():
            scores = scorer(batch)
            for view, (values, weights) in scored.items():
                bucket = per_list.setdefault(view, {}).setdefault(name, {})
                for metric, array in metrics.per_list_metrics(scores, values, weights).items():
                    bucket.setdefault(metric, []).append(array)
        if spec.segment and spec.segment in batch:
            segments.append(np.asarray(batch[spec.segment]).astype(str))
        if CLUSTER_COLUMN in batch:
            clusters.append(np.asarray(batch[CLUSTER_COLUMN]).astype(str))
        n_lists += len(batch[MASK])
    if n_lists == 0:
        raise ValueError("evaluation data is empty: no test lists")
    joined = {view: {name: {m: np.concatenate(v) for m, v in values.items()} for name, values in by_name.items()}
              for view, by_name in per_list.items()}
    segment_values = np.concatenate(segments) if segments else None

    def summary(name: str, view: str = "primary") -> dict[str, Any]:
        def of(lists: np.ndarray | None = None) -> dict[str, dict[str, float]]:  # weighted NDCG pools per set
            values = joined[view][name]
            return metrics.summarize(metrics.pooled(values if lists is None else
                                                    {m: v[lists] for m, v in values.items()}))

        by_segment = ({str(s): of(segment_values == s) for s in np.unique(segment_values)}
                      if segment_values is not None else {})
        return {"overall": of(), "per_segment": by_segment}

    primary = {name: metrics.pooled(values) for name, values in joined["primary"].items()}
    challenger_summary = summary("challenger")
    groups = np.concatenate(clusters) if len(clusters) and sum(map(len, clusters)) == n_lists else None

    def lift_over(other: str) -> dict[str, Any]:  # paired bootstrap of (challenger - other), by user
        try:
            return {"metric": report.PRIMARY_METRIC, **metrics.paired_bootstrap(
                primary["challenger"][report.PRIMARY_METRIC], primary[other][report.PRIMARY_METRIC],
                resamples=bootstrap_resamples, seed=seed, groups=groups),
                "resampled_by": CLUSTER_COLUMN if groups is not None else "list"}
        except ValueError as err:  # no list with a relevant item: the gate's check fails on the missing bound
            return {"metric": report.PRIMARY_METRIC, "mean_diff": None, "ci_low": None, "ci_high": None,
                    "note": str(err)}

    logged_order = None  # no positions (LETOR): report.build_report's passing placeholder
    if "legacy" in primary and views["primary"] == (spec.label, None):
        # Raw logged feedback: the logging order wins by construction, so the comparison would fail any model.
        log.warning("no comparison with the logged order on raw logged feedback (no position-bias estimate)")
        logged_order = {"metric": report.PRIMARY_METRIC, "mean_diff": None, "ci_low": report.NO_LOGGED_ORDER_LIFT,
                        "ci_high": None, "note": "raw logged feedback favours the logging order: no fair "
                                                 "comparison without a position-bias estimate (propensity_eta)"}
    elif "legacy" in primary:
        logged_order = lift_over("legacy")

    info: dict[str, Any] = {"eval_label": label_name, "eval_gain_weights": views["primary"][1], "lists": n_lists,
                            "model": str(challenger.path),
                            "champion_model": str(champion.path) if champion else None, "source": spec.source}
    for view in ("secondary", "secondary_ipw"):
        if view in joined:
            label, weighted = views[view]
            info[view] = {"label": label, "gain_weights": weighted,
                          "rankers": {name: summary(name, view) for name in joined[view]}}
    result = report.build_report(
        challenger=challenger_summary["overall"], per_segment=challenger_summary["per_segment"],
        baselines={name: summary(name) for name in ("legacy", "oracle") if name in primary},
        champion=summary("champion") if champion else None, comparison=lift_over("champion") if champion else None,
        info=info, logged_order_comparison=logged_order)
    if output_dir is not None:
        path = report.write_report(result, output_dir)
        log.info("wrote %s", path)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a marketrank SavedModel on the test split.")
    parser.add_argument("--model", default="/opt/ml/processing/model")
    parser.add_argument("--test", default="/opt/ml/processing/test")
    parser.add_argument("--champion", default="/opt/ml/processing/champion",
                        help="champion model dir; ignored when it holds no model (first run)")
    parser.add_argument("--output", default="/opt/ml/processing/evaluation")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000)
    parser.add_argument("--eval-label", default=None, help="label column to evaluate on (default: the spec's)")
    parser.add_argument("--propensity-eta", type=float, default=None,
                        help="position-bias exponent for inverse-propensity NDCG on logged feedback "
                             "(default: the feature spec's estimate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    champion = args.champion if has_model(args.champion) else None
    result = evaluate(args.model, args.test, args.output, champion, eval_label=args.eval_label,
                      propensity_eta=args.propensity_eta, bootstrap_resamples=args.bootstrap_resamples)
    log.info("ndcg@10=%.4f", result["ranking_metrics"][report.PRIMARY_METRIC]["value"])


if __name__ == "__main__":
    main()
