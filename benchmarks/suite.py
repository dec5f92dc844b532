"""What ``marketrank bench quality|unbiased|train|report`` run: data, benchmark, result file, with progress."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from benchmarks import common, datasets, quality, rankers, throughput, unbiased
from marketrank import simulator, ui, workspace
from training.hparams import HParams


def work_dir(name: str) -> Path:
    """Scratch space for a benchmark's models (emptied first: results never mix runs)."""
    path = workspace.home() / "bench" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def load_dataset(size: str, seed: int = 7, cache: Path | None = None, letor: Path | None = None
                 ) -> datasets.Dataset:
    if letor is not None:
        return datasets.letor(letor)
    return datasets.marketplace(size, seed, cache)


def parse_models(text: str) -> tuple[tuple, ...]:
    """``all`` or a comma list of ``scorer/loss`` or ``scorer/loss/members`` (a seed ensemble), e.g.
    ``dnn/softmax,dnn/softmax/3``, validated by HParams."""
    if text.strip() == "all":
        return quality.TFR_MODELS
    models: list[tuple] = []
    for item in text.split(","):
        scorer, sep, rest = item.strip().partition("/")
        loss, _, members = rest.partition("/")
        if not sep or not loss:
            raise ValueError(f"--models {item!r}: expected scorer/loss or scorer/loss/members, e.g. dnn/softmax")
        try:
            count = int(members) if rest.count("/") else 1
        except ValueError:
            raise ValueError(f"--models {item!r}: members must be a whole number, got {members!r}") from None
        HParams(scorer=scorer, loss=loss, ensemble=count)
        models.append((scorer, loss, count) if count > 1 else (scorer, loss))
    return tuple(models)


def run_quality(dataset: datasets.Dataset, out: Path, *, models: Sequence[tuple] = quality.TFR_MODELS,
                hparams: HParams = HParams(), lambdamart: rankers.LambdaMartParams = rankers.LambdaMartParams(),
                trained_out: dict | None = None) -> tuple[Path, dict[str, Any]]:
    with ui.step(f"quality benchmark on {dataset.name}") as s:
        result = quality.run_quality(dataset, work_dir(f"quality-{dataset.name}"), models=tuple(models),
                                     hparams=hparams, lambdamart=lambdamart, progress=s.note,
                                     trained_out=trained_out)
    return common.write_result(result, out, f"quality-{dataset.name}"), result


def run_unbiased(dataset: datasets.Dataset, out: Path, *, hparams: HParams = HParams(),
                 reuse: dict | None = None) -> tuple[Path, dict[str, Any]]:
    with ui.step(f"unbiased-learning benchmark on {dataset.name}") as s:
        result = unbiased.run_unbiased(dataset, work_dir("unbiased"), hparams=hparams, reuse=reuse,
                                       progress=s.note)
    return common.write_result(result, out, "unbiased"), result


def run_throughput(sizes: Sequence[str], out: Path, *, seed: int = 7, cache: Path | None = None,
                   hparams: HParams = HParams()) -> tuple[Path, dict[str, Any]]:
    for size in sizes:  # every size is known before the first one is built
        simulator.preset(size, seed)
    data = [datasets.marketplace(size, seed, cache) for size in sizes]
    with ui.step(f"training throughput on {', '.join(sizes)}") as s:
        result = throughput.run_throughput(data, work_dir("throughput"), hparams=hparams, progress=s.note)
    result = throughput.keep_other_sizes(result, _published(Path(out) / "throughput.json"))
    return common.write_result(result, out, "throughput"), result


def _published(path: Path) -> dict[str, Any] | None:
    """The result already at ``path``; None (and a warning) when there is none or it is unreadable: a new run's
    result is never lost to an old file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        ui.console.print(f"[yellow]{escape(f'{path} is unreadable ({err}): its sizes are not kept')}[/yellow]")
        return None


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per ranker / size for the terminal (the full tables are in BENCHMARKS.md)."""
    if result["benchmark"] in ("quality", "unbiased"):
        lines = [f"{name:28s} test ndcg@10 {r['overall']['ndcg@10']['value']:.4f} "
                 f"[{r['overall']['ndcg@10']['ci_low']:.4f}, {r['overall']['ndcg@10']['ci_high']:.4f}]"
                 + (f"  valid {r['valid_ndcg@10']:.4f}" if "valid_ndcg@10" in r else "")
                 for name, r in result["rankers"].items()]
        if result["benchmark"] == "unbiased":
            lines.append(f"IPW closes {result['gap_closed']['value']:.1%} of the naive model's gap to the oracle")
        for name, goal in result.get("goals", {}).items():
            if isinstance(goal, dict) and "met" in goal:
                lines.append(f"goal {name}: {'met' if goal['met'] else 'NOT met'}")
        ceiling = result.get("goals", {}).get("feature_ceiling")
        if ceiling:
            lines.append(f"feature ceiling (LambdaMART on true relevance) {ceiling['value']:.4f} = "
                         f"{ceiling['oracle_share']:.1%} of the oracle; best TF-Ranking reaches "
                         f"{ceiling['best_tf_ranking_share']:.1%} of it")
        taste = result.get("goals", {}).get("taste_ceiling")
        if taste:
            lines.append(f"taste ceiling (the same with the simulator's latent taste) {taste['value']:.4f} = "
                         f"{taste['oracle_share']:.1%} of the oracle")
        return lines
    return [f"{s['dataset']:8s} {s['train_lists']:>7,} lists {s['train_seconds']:7.1f}s "
            f"{s['lists_per_second']:7.0f} lists/s, time-to-quality {s['time_to_quality']['seconds']}s, "
            f"input pipeline {throughput.describe_ratio(s['input_pipeline'])}" for s in result["sizes"]]


def with_epochs(hparams: HParams, epochs: int | None) -> HParams:
    return hparams if epochs is None else dataclasses.replace(hparams, epochs=epochs)
