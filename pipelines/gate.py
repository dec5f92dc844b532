"""The quality gate: thresholds and decision, in one place for the SageMaker ConditionStep and the local run.

A challenger passes when ALL checks hold:
  * its NDCG@10 on the test split is at least the floor,
  * the lower bound of the paired-bootstrap 95% CI of (challenger - champion) NDCG@10 is at least the minimum lift
    (with no champion yet, ``evaluation.json`` carries ``NO_CHAMPION_LIFT`` there, so the first model passes), and
  * the same lower bound against the logged order, the ranking the test lists were shown in (what production
    served), is at least its minimum: on real logs, where the floor's scale is the weighted clicks', this is
    what keeps a first model worse than production out (no logged positions, e.g. LETOR: it passes).

``CHECKS`` names each check's JSON path in ``evaluation.json`` (from ``training.report``) and its threshold;
``decide`` evaluates them on a report, ``conditions`` turns them into SageMaker conditions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from training import report


@dataclasses.dataclass(frozen=True)
class Check:
    metric: str  # human name, used in messages
    path: str  # JsonPath in evaluation.json, as SageMaker's JsonGet reads it (training.report)
    threshold: str  # key in GateThresholds (and the pipeline parameter it maps to)


CHECKS: tuple[Check, ...] = (
    Check("ndcg@10", report.metric_path(report.PRIMARY_METRIC), "ndcg_floor"),
    Check("ndcg@10 lift over champion (95% CI lower bound)", report.LIFT_LOWER_BOUND_PATH, "min_lift"),
    Check("ndcg@10 lift over the logged order (95% CI lower bound)", report.LOGGED_ORDER_LIFT_PATH,
          "min_lift_over_logged"),
)


@dataclasses.dataclass(frozen=True)
class GateThresholds:
    #: Absolute floor on the challenger's NDCG@10: a sanity check on both of the metric's scales (true relevance;
    #: inverse-propensity weighted clicks on real logs, which read about half as high). Random order scores 0.27
    #: and 0.14 on the default data; where there is a champion or a logged order, the lift checks carry the bar.
    ndcg_floor: float = 0.3
    #: Minimum lower bound of the bootstrap CI of (challenger - champion) NDCG@10. 0 means "not worse, with 95%
    #: confidence"; a small negative value tolerates noise-level regressions.
    min_lift: float = -0.005
    #: Minimum lower bound of the same CI against the logged order: 0 means "better than what was shown".
    min_lift_over_logged: float = 0.0


@dataclasses.dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: tuple[dict[str, Any], ...]

    @property
    def message(self) -> str:
        failed = [c for c in self.checks if not c["passed"]]
        if not failed:
            return "quality gate passed: " + "; ".join(f"{c['metric']} = {c['value']:.4f} >= {c['threshold']:.4f}"
                                                       for c in self.checks)
        return "quality gate failed: " + "; ".join(f"{c['metric']} = {_fmt(c['value'])} < {c['threshold']:.4f}"
                                                   for c in failed)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": list(self.checks), "message": self.message}


def _fmt(value: Any) -> str:
    return "missing" if value is None else f"{value:.4f}"


def decide(evaluation: Mapping[str, Any], thresholds: GateThresholds) -> GateDecision:
    """Apply every check to an ``evaluation.json`` document. A missing value fails its check."""
    checks = []
    for check in CHECKS:
        try:
            value = report.get_path(dict(evaluation), check.path)
        except KeyError:
            value = None
        limit = getattr(thresholds, check.threshold)
        ok = value is not None and float(value) >= limit
        checks.append({"metric": check.metric, "path": check.path, "value": None if value is None else float(value),
                       "threshold": limit, "threshold_name": check.threshold, "passed": ok})
    return GateDecision(passed=all(c["passed"] for c in checks), checks=tuple(checks))


def conditions(json_get: Callable[[str], Any], thresholds: Mapping[str, Any], condition: Callable[..., Any]) -> list:
    """The same checks as SageMaker conditions: ``condition(left=json_get(path), right=thresholds[name])``.

    ``condition`` is ``ConditionGreaterThanOrEqualTo``; the step builder passes it in so this module needs no SDK.
    """
    return [condition(left=json_get(check.path), right=thresholds[check.threshold]) for check in CHECKS]
