"""The data a benchmark runs on: the simulated marketplace at a size (generated once, cached) or a LETOR dir.

A :class:`Dataset` gives every ranker the same splits and features: TF-Ranking trains on the project's own
input (Parquet shards streamed by ``training.data``, or the LETOR reader), LightGBM on the same batches flattened
to one row per item, and every ranker is scored on the same whole test lists.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.feature_spec import MASK, STRING, FeatureSpec

Batches = Callable[[], Iterator[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    spec: FeatureSpec
    #: What ``training.train.train`` takes: split dirs (the real pipeline) or batch callables (LETOR).
    train_source: Any
    valid_source: Any
    #: Split name -> batches padded per chunk: features, mask, logged label, position and the evaluation label;
    #: valid and test also carry the oracle score (when the data has them).
    batches: Callable[[str], Batches]
    #: Lists / items per split, and where the data came from.
    sizes: dict[str, Any]
    #: Simulator settings (marketplace only): users, items, requests, position bias.
    simulator: dict[str, Any] | None = None
    #: ``training.features.features_fingerprint()`` of the feature job that built the data (None: LETOR).
    features_fingerprint: str | None = None

    @property
    def train_lists(self) -> int:
        return int(self.sizes["train"]["lists"])


def marketplace(size: str, seed: int = 7, cache: Path | None = None) -> Dataset:
    """Simulate ``size`` and run the Spark feature job once; later calls reuse ``<cache>/<size>-seed<seed>``.

    The cache defaults to the workspace's dataset dir, the one ``marketrank run`` uses, so both share the data.
    """
    from marketrank import workspace
    from pipelines.local import ensure_simulated

    root = (cache / f"{size}-seed{seed}") if cache else workspace.dataset_dir(f"{size}-seed{seed}")
    config = ensure_simulated(root, size, seed)
    return from_features(root / "features", size, simulator=config)


def from_features(features: Path, name: str, simulator: dict[str, Any] | None = None) -> Dataset:
    """A feature job's output (train/, valid/, test/, stats.json) as a dataset."""
    from training import data, evaluate

    spec = FeatureSpec.load(features / "train")
    stats = json.loads((features / "stats.json").read_text())
    available = data.available_columns(features / "train")
    extra = ("position",) if spec.position else ()
    if spec.eval_label != spec.label and spec.eval_label in available:
        extra += (spec.eval_label,)  # the feature ceiling's training label
    # Simulated data: item and user ids, which the taste-informed reference looks the simulator's latents up by.
    ids = tuple(c for c in ("item_id",) if simulator is not None and c in available)
    users = tuple(c for c in (evaluate.CLUSTER_COLUMN,) if simulator is not None and c in available)

    def batches(split: str) -> Batches:
        if split == "train":
            return lambda: data.iter_batches(features / split, spec, 1024, list_size=None,
                                             columns_extra=extra + ids, keep_columns=users)
        # whole lists with the logged label, the evaluation label, position and oracle score (and user ids)
        return evaluate.parquet_batches(features / split, spec, extra_labels=(spec.eval_label, *ids))

    return Dataset(name=name, spec=spec, train_source=features / "train", valid_source=features / "valid",
                   batches=batches, sizes={**stats["splits"], "path": str(features)}, simulator=simulator,
                   features_fingerprint=stats.get("features_fingerprint"))


def letor(directory: Path, batch_size: int = 64, seed: int = 42) -> Dataset:
    """A LETOR/SVMlight dir (train.txt, vali.txt, test.txt); the logged label is also the evaluation label."""
    from training import letor as reader
    from training.train import LETOR_TRAIN_LIST_SIZE, letor_batches, letor_spec

    paths = {name: Path(directory) / f"{name}.txt" for name in ("train", "vali", "test")}
    for name, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"LETOR {name} split not found: {path}")
    stats = {name: reader.scan_letor(path) for name, path in paths.items()}
    for name, found in stats.items():
        if not found.num_queries:
            raise ValueError(f"LETOR {name} split {paths[name]} holds no ranking lists (empty, or comments only)")
    spec = letor_spec(stats["train"], list_size=min(stats["train"].max_list_size, LETOR_TRAIN_LIST_SIZE))
    split_path = {"train": paths["train"], "valid": paths["vali"], "test": paths["test"]}

    def batches(split: str) -> Batches:
        return letor_batches(split_path[split], spec, 1024, None)

    sizes = {split: {"lists": stats[name].num_queries, "items": stats[name].num_docs}
             for split, name in (("train", "train"), ("valid", "vali"), ("test", "test"))}
    name = Path(directory).name
    return Dataset(name=name if name.startswith("letor") else f"letor-{name}", spec=spec,
                   train_source=letor_batches(paths["train"], spec, batch_size, spec.list_size, seed=seed),
                   valid_source=letor_batches(paths["vali"], spec, batch_size, None),
                   batches=batches, sizes={**sizes, "path": str(directory)})


def item_matrix(batch: dict[str, Any], spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """One row per real item: context features broadcast to the list, strings as vocabulary codes (0 = unseen).

    Returns ``(X [items, columns], group sizes [lists])``; lists without items are dropped from ``group``.
    """
    mask = batch[MASK]
    columns = []
    for feature in spec.features:
        values = np.asarray(batch[feature.name])
        if feature.dtype == STRING:
            codes = pd.Categorical(values.ravel(), categories=list(feature.vocabulary or ())).codes + 1
            values = codes.reshape(values.shape)
        values = values.astype(np.float32)
        if values.ndim == 1:  # a context feature: the same value for every item of the list
            values = np.broadcast_to(values[:, None], mask.shape)
        columns.append(values[mask] if values.ndim == 2 else values[mask].reshape(int(mask.sum()), -1))
    x = np.column_stack([c if c.ndim == 2 else c[:, None] for c in columns])
    group = mask.sum(axis=1)
    return x, group[group > 0]


def feature_columns(spec: FeatureSpec) -> tuple[list[str], list[int]]:
    """Column names of :func:`item_matrix` and the indices of the categorical (string) ones."""
    names, categorical = [], []
    for feature in spec.features:
        width = int(np.prod(feature.shape)) if feature.shape else 1
        if feature.dtype == STRING:
            categorical.append(len(names))
        names += [feature.name] if width == 1 else [f"{feature.name}_{i}" for i in range(width)]
    return names, categorical
