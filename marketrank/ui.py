"""Terminal output: rich progress for long steps and the quality table. Kept out of the step code."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


def error(message: str) -> None:
    """``error: <message>`` on one line: the message as plain text (a path or an AWS message may hold "[...]",
    which rich would read as markup), never wrapped (CI logs and pipes are 80 columns to rich)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


class Step:
    def __init__(self, progress: Progress, task: int):
        self._progress, self._task = progress, task

    def total(self, total: float | None) -> None:
        self._progress.update(self._task, total=total)

    def advance(self, completed: float, description: str | None = None) -> None:
        self._progress.update(self._task, completed=completed,
                              **({"description": description} if description else {}))

    def note(self, description: str) -> None:
        self._progress.update(self._task, description=description)


@contextlib.contextmanager
def step(title: str, total: float | None = None) -> Iterator[Step]:
    """A progress bar (or spinner when ``total`` is None) for one step; prints the elapsed time at the end."""
    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(title, total=total)
        yield Step(progress, task)
    console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def quality_table(report: dict[str, Any], metrics: tuple[str, ...] = ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "map"),
                  ) -> Table:
    """Rankers (rows) x metrics (columns) of a run report, with the per-surface NDCG@10 ("<surface> @10")."""
    rankers = [name for name in ("challenger", "champion", "legacy", "oracle") if report.get(name)]
    segments = sorted({s for name in rankers for s in report[name].get("per_segment", {})})
    label = report.get("eval_label", "label")
    weights = report.get("eval_gain_weights")
    if weights:  # logged clicks, de-biased (training.evaluate)
        label += f"; NDCG inverse-propensity weighted, eta {weights['eta']:.3f}"
    table = Table(title=f"Offline quality on the test split (label: {label}, lists: {report.get('lists', '?')})")
    table.add_column("ranker", no_wrap=True)
    for metric in metrics:
        table.add_column(metric, justify="right")
    for segment in segments:
        table.add_column(f"{segment} @10", justify="right")
    for name in rankers:
        overall = report[name]["overall"]
        row = [name] + [_fmt(overall.get(m)) for m in metrics]
        row += [_fmt(report[name].get("per_segment", {}).get(s, {}).get("ndcg@10")) for s in segments]
        table.add_row(*row, style="bold" if name == "challenger" else None)
    return table


def print_run(report: dict[str, Any]) -> None:
    """The run report as the CLI shows it: quality table, gate decision, deployment."""
    console.print(quality_table(report))
    for key, against in (("comparison", f"champion ({report.get('champion_model')})"),
                         ("logged_order_comparison", "the logged order")):
        c = report.get(key)
        if not c or c.get("mean_diff") is None:
            continue
        by_user = f", resampling {c['clusters']} users" if c.get("resampled_by") == "user_id" else ""
        console.print(f"challenger - {against} ndcg@10: {c['mean_diff']:+.4f} "
                      f"[95% CI {c['ci_low']:+.4f}, {c['ci_high']:+.4f}] over {c['lists']} lists{by_user}")
    if report.get("gate"):
        colour = "green" if report["gate"]["passed"] else "red"
        console.print(f"[{colour}]{report['gate']['message']}[/{colour}]")
    deployment = report.get("deployment") or {}
    state = deployment.get("state") or {}
    if deployment:
        roles = ", ".join(f"{role}: {(state.get(role) or {}).get('model_name')}" for role in ("production", "shadow")
                          if state.get(role))
        console.print(f"endpoint {deployment.get('endpoint')}: {deployment.get('action')} ({roles or 'empty'})")
    ratio = report.get("oracle_ratio")
    console.print(f"run {report['run_id']}: {workspace_report_path(report)}"
                  + (f"; challenger reaches {ratio:.1%} of the oracle's NDCG@10" if ratio else ""),
                  soft_wrap=True)  # a path is not broken across lines, in a log or a pipe


def workspace_report_path(report: dict[str, Any]) -> str:
    from marketrank import workspace

    return str(workspace.runs_dir() / report["run_id"] / workspace.REPORT_FILE)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("value")
    return "-" if value is None else f"{value:.4f}"
