"""What every benchmark shares: the machine and versions it ran on, result files, bootstrap intervals."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("tensorflow", "tensorflow-ranking", "lightgbm", "numpy", "pyspark", "pyarrow")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Where a result was measured: cores, CPU, memory, load (the machine may be shared), package versions."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        ram_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        ram_gib = None
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "cpu_model": _cpu_model(), "ram_gib": ram_gib, "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "versions": versions}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_result(result: dict[str, Any], out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>.json`` (written whole, then renamed: a crash never leaves half a result)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable))
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Mean and percentile-bootstrap CI over the defined (non-NaN) per-list values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "lists": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return {"value": float(values.mean()), "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1.0 - alpha)), "lists": int(values.size)}


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two score lists over the same items (pairs tied in either count as neither)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size != b.size or a.size < 2:
        raise ValueError(f"kendall_tau needs two equal-length lists of >= 2 values, got {a.size} and {b.size}")
    upper = np.triu_indices(a.size, 1)
    signs = np.sign(a[:, None] - a[None, :])[upper] * np.sign(b[:, None] - b[None, :])[upper]
    return float(signs.sum() / signs.size)


def gap_closed(naive: float, debiased: float, oracle: float) -> float:
    """Share of the naive model's gap to the oracle that the debiased model closes (1 = reaches the oracle)."""
    gap = oracle - naive
    if gap <= 0:
        raise ValueError(f"no gap to close: oracle {oracle} <= naive {naive}")
    return (debiased - naive) / gap
