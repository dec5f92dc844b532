"""The evaluation report (``evaluation.json``): its shape and the JSON paths other steps read.

``evaluate.py`` writes it; the SageMaker ConditionStep (JsonGet on a PropertyFile) and the local gate read the
same paths from here. ``ranking_metrics`` follows SageMaker's ModelMetrics statistics shape
(``{"metric": {"value": v, "standard_deviation": s}}``) so the file registers as the package's model quality.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

EVALUATION_FILE = "evaluation.json"
PRIMARY_METRIC = "ndcg@10"


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: One step of a path: ``.name``, or ``['key']`` for keys that are not plain identifiers.
_STEP = re.compile(r"\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\['(?P<key>[^'\]]+)'\]")


def _step(key: str) -> str:
    """One key as a JsonPath step: ``.name``, or ``['ndcg@10']`` (a bare ``ndcg@10`` means nothing certain)."""
    if _IDENTIFIER.fullmatch(key):
        return f".{key}"
    if any(c in key for c in "'].") or not key:  # SageMaker's JsonGet splits on "." before it reads brackets
        raise ValueError(f"metric {key!r} cannot be a JsonGet path step: no quotes, brackets or dots")
    return f"['{key}']"


def metric_path(metric: str = PRIMARY_METRIC) -> str:
    """JsonPath (what SageMaker's JsonGet takes) of the challenger's overall value of ``metric``:
    ``ranking_metrics['ndcg@10'].value``."""
    return f"ranking_metrics{_step(metric)}.value"


#: JsonPath of the lower bound of the bootstrap CI of (challenger - champion) on the primary metric.
LIFT_LOWER_BOUND_PATH = "comparison.ci_low"
#: Value written at LIFT_LOWER_BOUND_PATH when there is no champion yet (the first model always passes lift).
NO_CHAMPION_LIFT = 1.0
#: The same for (challenger - the logged order): the ranking users were shown, i.e. what production served.
LOGGED_ORDER_LIFT_PATH = "logged_order_comparison.ci_low"
#: Value written at LOGGED_ORDER_LIFT_PATH when the data has no logged positions (LETOR).
NO_LOGGED_ORDER_LIFT = 1.0


def build_report(challenger: dict[str, Any], per_segment: dict[str, Any], baselines: dict[str, Any],
                 champion: dict[str, Any] | None, comparison: dict[str, Any] | None,
                 info: dict[str, Any], logged_order_comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble ``evaluation.json``; the comparison blocks are always present so the gate's paths always resolve."""
    comparison = comparison or {"metric": PRIMARY_METRIC, "mean_diff": None, "ci_low": NO_CHAMPION_LIFT,
                                "ci_high": None, "note": "no champion: nothing to compare against"}
    logged = logged_order_comparison or {"metric": PRIMARY_METRIC, "mean_diff": None, "ci_low": NO_LOGGED_ORDER_LIFT,
                                         "ci_high": None, "note": "no logged positions: no logged order to compare"}
    return {"ranking_metrics": challenger, "per_segment": per_segment, "baselines": baselines,
            "champion": champion, "comparison": comparison, "logged_order_comparison": logged, **info}


def get_path(report: dict[str, Any], path: str) -> Any:
    """Resolve one of this module's paths (dotted names, ``['key']`` for other keys) as SageMaker's JsonGet does."""
    value: Any = report
    for part in _split(path):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{path!r}: no key {part!r} in the evaluation report")
        value = value[part]
    return value


def _split(path: str) -> list[str]:
    first = _IDENTIFIER.match(path)
    parts, at = ([first.group()], first.end()) if first else ([], 0)
    while first and at < len(path):
        step = _STEP.match(path, at)
        if step is None:
            break
        parts.append(step["name"] or step["key"])
        at = step.end()
    if not first or at < len(path):
        raise ValueError(f"{path!r}: not a path of dotted names and ['key'] steps (at {path[at:]!r})")
    return parts


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):  # numpy floats are floats too
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(report: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / EVALUATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=True, allow_nan=False))
    return path


def read_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / EVALUATION_FILE
    return json.loads(path.read_text())
