"""Learning from position-biased clicks: naive training versus inverse-propensity weighting (IPW).

Both models learn from the logged graded clicks and are scored on the simulator's true relevance. The
propensities come from the logs (``training.propensity``: the randomised bucket's CTR by position, fitted by the
feature job into the spec), never from the simulator; its true position bias is reported beside the estimate
only as a check.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common, quality, rankers
from benchmarks.datasets import Dataset
from training import metrics
from training.hparams import HParams

NAIVE, IPW = "naive", "ipw"


def run_unbiased(dataset: Dataset, work_dir: Path, *, hparams: HParams = HParams(), resamples: int = 1000,
                 reuse: dict[str, tuple[rankers.Scorer, dict]] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the naive (eta = 0) and the IPW (eta from the spec) model with ``hparams`` and compare them.

    ``reuse`` may hold a quality run's scorers: its ``tfr-<scorer>-<loss>`` model is this IPW model when it was
    trained with the same hyperparameters.
    """
    note = progress or (lambda _: None)
    spec = dataset.spec
    if not spec.propensity_eta or not spec.position or not spec.oracle_score:
        raise ValueError(f"{dataset.name}: the unbiased benchmark needs simulated data with logged positions, an "
                         "oracle score and a position-bias estimate in the feature spec")
    started, machine = time.perf_counter(), common.machine()  # the load before the run: the machine is shared
    scorers, trained = quality.baselines(dataset), {}
    variants = {NAIVE: dataclasses.replace(hparams, ipw_eta=0.0), IPW: dataclasses.replace(hparams, ipw_eta=None)}
    for name, hp in variants.items():
        cached = (reuse or {}).get(quality.tfr_name(hp.scorer, hp.loss, hp.ensemble))
        if cached is not None and cached[1]["hparams"] == dataclasses.asdict(hp):
            scorers[name], trained[name] = cached
            continue
        note(f"train {name} ({hp.scorer}/{hp.loss}, eta {'estimated' if hp.ipw_eta is None else hp.ipw_eta})")
        scorers[name], trained[name] = rankers.train_tfranking(dataset, hp, work_dir / f"unbiased-{name}")
    note("scoring the test split on true relevance")
    test = quality.evaluate_rankers(dataset, scorers, "test")
    per_list = test["per_list"]
    summary = {name: {**trained.get(name, {}), **quality.summarize(per_list[name], test["segments"], resamples)}
               for name in scorers}
    value = {name: summary[name]["overall"][quality.PRIMARY]["value"] for name in scorers}
    diff = metrics.paired_bootstrap(per_list[IPW][quality.PRIMARY], per_list[NAIVE][quality.PRIMARY],
                                    resamples=resamples)
    gap = value["oracle"] - value[NAIVE]
    return {
        "benchmark": "unbiased", "created": common.now(), "dataset": dataset.name, "sizes": dataset.sizes,
        "features_fingerprint": dataset.features_fingerprint,
        "simulator": dataset.simulator, "eval_label": spec.eval_label, "label": spec.label,
        "machine": machine,
        "propensity": {"eta_estimated": spec.propensity_eta, "source": "randomised bucket of the training period",
                       "eta_simulator_truth": (dataset.simulator or {}).get("position_bias")},
        "rankers": summary,
        "ipw_minus_naive": diff,
        "gap_closed": {"value": common.gap_closed(value[NAIVE], value[IPW], value["oracle"]),
                       "ci_low": diff["ci_low"] / gap, "ci_high": diff["ci_high"] / gap,
                       "naive_gap": gap, "metric": quality.PRIMARY},
        "seconds": time.perf_counter() - started,
    }
