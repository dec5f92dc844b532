"""PNG plots of the benchmark results, drawn from the result JSON only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.charts import pyplot, save_figure


def quality(result: dict[str, Any], path: Path, metric: str = "ndcg@10") -> Path:
    """Test NDCG@10 per ranker with its bootstrap 95% CI, best first."""
    plt = pyplot()
    rows = sorted(result["rankers"].items(), key=lambda kv: kv[1]["overall"][metric]["value"])
    values = [r["overall"][metric]["value"] for _, r in rows]
    errors = [[max(0.0, v - r["overall"][metric]["ci_low"]) for v, (_, r) in zip(values, rows, strict=True)],
              [max(0.0, r["overall"][metric]["ci_high"] - v) for v, (_, r) in zip(values, rows, strict=True)]]
    colours = {"tf-ranking": "tab:blue", "lambdamart": "tab:orange", "legacy": "tab:gray", "oracle": "tab:green"}
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    axis.barh([name for name, _ in rows], values, xerr=errors, capsize=3,
              color=[colours.get(r["kind"], "tab:purple") for _, r in rows])
    axis.set_xlabel(f"test {metric.upper()} on {result['eval_label']} (95% bootstrap CI)")
    axis.set_title(f"Ranking quality: {result['dataset']}")
    axis.set_xlim(0, 1.02)
    figure.tight_layout()
    return save_figure(figure, path)


def unbiased(result: dict[str, Any], path: Path, metric: str = "ndcg@10") -> Path:
    plt = pyplot()
    names = [n for n in ("legacy", "naive", "ipw", "oracle") if n in result["rankers"]]
    overall = [result["rankers"][n]["overall"][metric] for n in names]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(names, [o["value"] for o in overall], yerr=[[max(0.0, o["value"] - o["ci_low"]) for o in overall],
                                                         [max(0.0, o["ci_high"] - o["value"]) for o in overall]],
             capsize=4,
             color=["tab:gray", "tab:red", "tab:blue", "tab:green"][: len(names)])
    axis.set_ylabel(f"test {metric.upper()} on {result['eval_label']}")
    axis.set_title(f"Biased clicks: IPW closes {result['gap_closed']['value']:.0%} of the gap to the oracle")
    figure.tight_layout()
    return save_figure(figure, path)


def scaling(result: dict[str, Any], path: Path) -> Path:
    """Training time and time per epoch against the number of training lists (log-log)."""
    plt = pyplot()
    sizes = result["sizes"]
    lists = [s["train_lists"] for s in sizes]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.loglog(lists, [s["train_seconds"] for s in sizes], "o-", label="training (early-stopped)")
    axis.loglog(lists, [s["seconds_per_epoch"] for s in sizes], "s--", label="one epoch (incl. validation)")
    ttq = [(n, s["time_to_quality"]["seconds"]) for n, s in zip(lists, sizes, strict=True)
           if s["time_to_quality"]["seconds"] is not None]
    if ttq:
        axis.loglog(*zip(*ttq, strict=True), "^:", label="time to 99% of final val NDCG@10")
    for n, s in zip(lists, sizes, strict=True):
        axis.annotate(s["dataset"], (n, s["train_seconds"]), textcoords="offset points", xytext=(4, 4))
    axis.set_xlabel("training lists (requests)")
    axis.set_ylabel("seconds (CPU)")
    axis.set_title("Training time against data size")
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def time_to_quality(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for size in result["sizes"]:
        axis.plot(size["curve"]["seconds"], size["curve"]["val_ndcg_10"], "o-", label=size["dataset"])
        if size["time_to_quality"]["seconds"] is not None:
            axis.axvline(size["time_to_quality"]["seconds"], linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("seconds since training started")
    axis.set_ylabel(f"validation NDCG@10 on {result['sizes'][0]['curve'].get('label', 'the logged label')}")
    axis.set_title("Validation NDCG@10 during training (dotted: time-to-quality)")
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path)
