"""Listwise input: Parquet shards of the feature job (or LETOR files) streamed into ``tf.data``.

Each Parquet row is one request; item features are list columns. Shards are read one record batch at a time
with pyarrow and padded to ``list_size`` in NumPy, so memory is bounded by the chunk size, whatever the data size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.feature_spec import LABEL_PAD, MASK, STRING, FeatureSpec

#: Rows read per chunk; a chunk is shuffled in memory before it is cut into batches.
CHUNK_ROWS = 4096


def shard_paths(split_dir: str | Path) -> list[Path]:
    split_dir = Path(split_dir)
    if split_dir.is_file():
        return [split_dir]
    paths = sorted(p for p in split_dir.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not paths:
        raise FileNotFoundError(f"no Parquet shards under {split_dir}")
    return paths


def _pad(column: pa.ChunkedArray | pa.Array, list_size: int, pad_value, dtype) -> np.ndarray:
    """[n] list column -> [n, list_size] array, truncated to the first ``list_size`` items, padded."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    if dtype is not object:
        values = values.astype(dtype, copy=False)
    lengths = np.minimum(np.diff(offsets), list_size)
    out = np.full((len(lengths), list_size), pad_value, dtype=dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values[np.repeat(offsets[:-1], lengths) + cols]
    return out


def available_columns(split_dir: str | Path) -> set[str]:
    """Column names of a split (from its first shard's schema)."""
    return set(pq.ParquetFile(shard_paths(split_dir)[0]).schema_arrow.names)


def batch_to_arrays(table: pa.Table, spec: FeatureSpec, list_size: int | None,
                    extra_item_columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Padded model inputs (+ label and extra per-item columns) from a table of listwise rows.

    ``list_size=None`` pads to the longest list of the table instead of truncating (what evaluation needs).
    """
    if list_size is None:
        list_size = max(int(pc.max(pc.list_value_length(table.column(spec.label))).as_py() or 1), 1)
    out: dict[str, np.ndarray] = {}
    for feature in spec.context:
        values = table.column(feature.name).to_numpy(zero_copy_only=False)
        out[feature.name] = values.astype(object if feature.dtype == STRING else np.float32)
    for feature in spec.item:
        if feature.dtype == STRING:
            out[feature.name] = _pad(table.column(feature.name), list_size, "", object)
        else:
            out[feature.name] = _pad(table.column(feature.name), list_size, 0.0, np.float32)
    label = _pad(table.column(spec.label), list_size, LABEL_PAD, np.float32)
    out[MASK] = label >= 0
    out[spec.label] = label
    for name in extra_item_columns:
        if name != spec.label and name in table.column_names:
            out[name] = _pad(table.column(name), list_size, LABEL_PAD if name != "position" else -1, np.float32)
    return out


def iter_batches(split_dir: str | Path, spec: FeatureSpec, batch_size: int, *, list_size: int | None,
                 shuffle: bool = False, seed: int = 0, columns_extra: tuple[str, ...] = (),
                 keep_columns: tuple[str, ...] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Stream padded batches from the shards of one split (``list_size=None``: pad, never truncate).

    ``columns_extra`` adds per-item columns (e.g. ``position``); ``keep_columns`` adds per-list columns as-is
    (e.g. ``request_id``).
    """
    paths = shard_paths(split_dir)
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(paths)
    names = [*spec.names, spec.label, *columns_extra, *keep_columns]
    for path in paths:
        parquet = pq.ParquetFile(path)
        missing = [n for n in dict.fromkeys(names) if n not in parquet.schema_arrow.names]
        if missing:
            raise KeyError(f"{path}: columns {missing} are in the feature spec but not in the data")
        for record_batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(dict.fromkeys(names))):
            table = pa.Table.from_batches([record_batch])
            if shuffle:
                table = table.take(np.random.default_rng(rng.randrange(2**31)).permutation(table.num_rows))
            arrays = batch_to_arrays(table, spec, list_size, columns_extra)
            for name in keep_columns:
                arrays[name] = table.column(name).to_numpy(zero_copy_only=False)
            for start in range(0, table.num_rows, batch_size):
                yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def _signature(spec: FeatureSpec, weights: bool):
    import tensorflow as tf

    def dtype(feature):
        return tf.string if feature.dtype == STRING else tf.float32

    features = {f.name: tf.TensorSpec([None, *f.shape], dtype(f)) for f in spec.context}
    features.update({f.name: tf.TensorSpec([None, None, *f.shape], dtype(f)) for f in spec.item})
    features[MASK] = tf.TensorSpec([None, None], tf.bool)
    label = tf.TensorSpec([None, None], tf.float32)
    return (features, label, label) if weights else (features, label)


def shuffle_within_lists(labels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted among the real items of each list (padding stays in place)."""
    keys = np.where(mask, rng.random(labels.shape), np.inf)
    order = np.argsort(keys, axis=1)
    shuffled = labels.copy()
    for row in range(labels.shape[0]):
        real = np.flatnonzero(mask[row])
        shuffled[row, real] = labels[row, order[row, : real.size]]
    return shuffled


def make_dataset(batches, spec: FeatureSpec, *, ipw_eta: float = 0.0, position: str | None = None,
                 shuffle_labels_seed: int | None = None):
    """tf.data.Dataset of (features, labels[, weights]) from a zero-argument callable returning batches.

    With ``ipw_eta > 0`` each item gets the inverse-propensity weight ``(1 + position) ** eta`` (examination
    probability modelled as ``(1 + position) ** -eta``), clipped and normalised to mean 1 over a batch's items.
    ``shuffle_labels_seed`` permutes labels within each list (the deliberately bad model of the gate tests).
    """
    import tensorflow as tf

    from training.propensity import ipw_weights

    feature_names = [*spec.names, MASK]

    def generate():
        rng = np.random.default_rng(shuffle_labels_seed)
        for batch in batches():
            features = {n: batch[n] for n in feature_names}
            if shuffle_labels_seed is not None:
                batch = {**batch, spec.label: shuffle_within_lists(batch[spec.label], batch[MASK], rng)}
            if ipw_eta > 0:
                yield features, batch[spec.label], ipw_weights(batch[position], ipw_eta, batch[MASK])
            else:
                yield features, batch[spec.label]

    dataset = tf.data.Dataset.from_generator(generate, output_signature=_signature(spec, ipw_eta > 0))
    return dataset.prefetch(tf.data.AUTOTUNE)
