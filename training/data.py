"""Listwise input: Parquet shards of the feature job (or LETOR files) streamed into ``tf.data``.

Each Parquet row is one request; item features are list columns. Shards are read one record batch at a time
with pyarrow and padded to ``list_size`` in NumPy, so memory is bounded by the chunk size, whatever the data size.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.feature_spec import LABEL_PAD, MASK, STRING, FeatureSpec

log = logging.getLogger(__name__)

#: Rows read per chunk; a chunk is shuffled in memory before it is cut into batches.
CHUNK_ROWS = 4096
#: Batches made ahead of the training step, and batches cut in parallel from in-memory data (fixed: see
#: ``_without_autotune``). Two of each keep a 2-core machine's step fed without taking its cores.
PREFETCH_BATCHES = 2
PARALLEL_BATCHES = 2
#: Lists beyond which an epoch's order is one stateless shuffle of the index tensor, not a ``Dataset.shuffle``
#: buffer. Time to an epoch's first batch on 2 cores: the buffer 0.65 ms at 419 lists, 56 ms at 100k, 136 ms at
#: 455k (about 0.3 us a list); the shuffle a fixed ~4 to 6 ms (a function per iteration), 15 ms at 100k, 20 ms
#: at 455k. Both orders are the same for the same seed on every run.
PERMUTE_ABOVE_ROWS = 50_000
READ_AHEAD_JOIN_S = 30.0  # how long an early stop waits for the reading thread


def shard_paths(split_dir: str | Path) -> list[Path]:
    split_dir = Path(split_dir)
    if split_dir.is_file():
        return [split_dir]
    paths = sorted(p for p in split_dir.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not paths:
        raise FileNotFoundError(f"no Parquet shards under {split_dir}")
    return paths


def _layout(offsets: np.ndarray, list_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, source index) placing a list column's values into ``[n, list_size]``, truncating."""
    lengths = np.minimum(np.diff(offsets), list_size)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, cols, np.repeat(offsets[:-1], lengths) + cols


@dataclasses.dataclass(frozen=True, eq=False)
class Coded:
    """A padded string column as codes into its distinct ``values``; code ``len(values)`` is the padding (and a
    missing value): both read as ``""``. Held-in-memory data takes it instead of millions of Python strings."""

    codes: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, strings: np.ndarray) -> Coded:
        codes, values = pd.factorize(strings.ravel(), use_na_sentinel=False)
        values = np.array(["" if pd.isna(v) else v for v in values], dtype=object)  # missing: out of vocabulary
        return cls(codes.reshape(strings.shape).astype(np.int32), values)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def __getitem__(self, rows) -> Coded:
        return Coded(self.codes[rows], self.values)

    def map(self, convert) -> np.ndarray:
        """``convert`` (distinct strings -> array) applied once per distinct value, placed at every code."""
        return np.asarray(convert(np.append(self.values, "").astype(object)))[self.codes]

    def strings(self) -> np.ndarray:
        return self.map(lambda values: values)


def _pad(column: pa.ChunkedArray | pa.Array, list_size: int, pad_value, dtype,
         layouts: dict[bytes, tuple] | None = None) -> np.ndarray:
    """[n] list column -> [n, list_size] array, truncated to the first ``list_size`` items, padded.
    ``layouts`` caches the placement per offsets: a table's item columns share theirs."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    if dtype is object:  # distinct values once, then shared references; a missing one is "" (out of vocabulary)
        encoded = column.values.fill_null("").dictionary_encode()
        values = encoded.dictionary.to_numpy(zero_copy_only=False)[encoded.indices.to_numpy()]
    else:
        values = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if layouts is None:
        layouts = {}
    key = offsets.tobytes()
    if key not in layouts:
        layouts[key] = _layout(offsets, list_size)
    rows, cols, source = layouts[key]
    out = np.full((len(offsets) - 1, list_size), pad_value, dtype=dtype)
    out[rows, cols] = values[source]
    return out


def _pad_codes(column: pa.ChunkedArray | pa.Array, list_size: int, layouts: dict[bytes, tuple]) -> Coded:
    """A list-of-strings column as :class:`Coded` ``[n, list_size]``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    encoded = column.values.dictionary_encode()
    pad = len(encoded.dictionary)
    codes = encoded.indices.fill_null(pad).to_numpy().astype(np.int32, copy=False)
    key = offsets.tobytes()
    if key not in layouts:
        layouts[key] = _layout(offsets, list_size)
    rows, cols, source = layouts[key]
    out = np.full((len(offsets) - 1, list_size), pad, dtype=np.int32)
    out[rows, cols] = codes[source]
    return Coded(out, encoded.dictionary.to_numpy(zero_copy_only=False))


def available_columns(split_dir: str | Path) -> set[str]:
    """Column names of a split (from its first shard's schema)."""
    return set(pq.ParquetFile(shard_paths(split_dir)[0]).schema_arrow.names)


def batch_to_arrays(table: pa.Table, spec: FeatureSpec, list_size: int | None,
                    extra_item_columns: tuple[str, ...] = (),
                    string_codes: bool = False) -> dict[str, np.ndarray | Coded]:
    """Padded model inputs (+ label and extra per-item columns) from a table of listwise rows.

    ``list_size=None`` pads to the longest list of the table instead of truncating (what evaluation needs).
    ``string_codes``: item string features as :class:`Coded` instead of arrays of Python strings.
    """
    if list_size is None:
        list_size = max(int(pc.max(pc.list_value_length(table.column(spec.label))).as_py() or 1), 1)
    out: dict[str, np.ndarray] = {}
    layouts: dict[bytes, tuple] = {}
    for feature in spec.context:
        column = table.column(feature.name)
        if feature.dtype == STRING:
            out[feature.name] = column.fill_null("").to_numpy(zero_copy_only=False).astype(object)
        else:
            out[feature.name] = column.to_numpy(zero_copy_only=False).astype(np.float32)
    for feature in spec.item:
        if feature.dtype == STRING and string_codes:
            out[feature.name] = _pad_codes(table.column(feature.name), list_size, layouts)
        elif feature.dtype == STRING:
            out[feature.name] = _pad(table.column(feature.name), list_size, "", object, layouts)
        else:
            out[feature.name] = _pad(table.column(feature.name), list_size, 0.0, np.float32, layouts)
    label = _pad(table.column(spec.label), list_size, LABEL_PAD, np.float32, layouts)
    out[MASK] = label >= 0
    out[spec.label] = label
    for name in extra_item_columns:
        if name != spec.label and name in table.column_names:
            column = table.column(name)
            value_type = column.type.value_type
            if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):  # e.g. item ids
                out[name] = _pad(column, list_size, "", object, layouts)
            else:
                out[name] = _pad(column, list_size, LABEL_PAD if name != "position" else -1, np.float32, layouts)
    return out


def iter_batches(split_dir: str | Path, spec: FeatureSpec, batch_size: int, *, list_size: int | None,
                 shuffle: bool = False, seed: int = 0, columns_extra: tuple[str, ...] = (),
                 keep_columns: tuple[str, ...] = (),
                 string_codes: bool = False) -> Iterator[dict[str, np.ndarray | Coded]]:
    """Stream padded batches from the shards of one split (``list_size=None``: pad, never truncate).

    ``columns_extra`` adds per-item columns (e.g. ``position``); ``keep_columns`` adds per-list columns as-is
    (e.g. ``request_id``); ``string_codes``: item strings as :class:`Coded`.
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
            arrays = batch_to_arrays(table, spec, list_size, columns_extra, string_codes)
            for name in keep_columns:
                arrays[name] = table.column(name).to_numpy(zero_copy_only=False)
            for start in range(0, table.num_rows, batch_size):
                yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def _signature(spec: FeatureSpec, weights: bool):
    """The generator's (raw features, labels[, weights]): the features are the exported signature's inputs."""
    import tensorflow as tf

    from training.export import input_signature

    label = tf.TensorSpec([None, None], tf.float32)
    return (input_signature(spec), label, label) if weights else (input_signature(spec), label)


def shuffle_within_lists(labels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels permuted among the real items of each list (padding stays in place)."""
    keys = np.where(mask, rng.random(labels.shape), np.inf)
    order = np.argsort(keys, axis=1)
    shuffled = labels.copy()
    for row in range(labels.shape[0]):
        real = np.flatnonzero(mask[row])
        shuffled[row, real] = labels[row, order[row, : real.size]]
    return shuffled


def loading_batches(split_dir: str | Path, spec: FeatureSpec, columns_extra: tuple[str, ...] = ()):
    """The batches callable that loads a split into memory: whole chunks with their item strings :class:`Coded`,
    in file order (``tf.data`` reshuffles every epoch)."""
    return lambda: iter_batches(split_dir, spec, CHUNK_ROWS, list_size=spec.list_size, columns_extra=columns_extra,
                                string_codes=True)


def estimated_bytes(split_dir: str | Path, spec: FeatureSpec) -> int:
    """Rough in-memory size of a split's padded tensors (from the Parquet footers: nothing is read)."""
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(split_dir))
    # packed float32 features and int32 string ids, label, position, mask
    per_item = 4 * (sum(int(np.prod(f.shape)) if f.shape else 1 for f in spec.item) + 3)
    return rows * (spec.list_size or 1) * per_item


def make_dataset(batches, spec: FeatureSpec, preprocessor, *, ipw_eta: float = 0.0, position: str | None = None,
                 shuffle_labels_seed: int | None = None, in_memory_batch_size: int | None = None,
                 shuffle_seed: int | None = None):
    """tf.data.Dataset of (packed features, labels[, weights]) from a zero-argument callable returning batches of
    raw named features; ``preprocessor`` (``training.model.Preprocessor``) packs them for the model.

    With ``ipw_eta > 0`` each item gets the inverse-propensity weight ``(1 + position) ** eta`` (examination
    probability modelled as ``(1 + position) ** -eta``), clipped and normalised to mean 1 over a batch's items.
    ``shuffle_labels_seed`` permutes labels within each list (the deliberately bad model of the gate tests).

    ``in_memory_batch_size``: read the batches once, preprocess them once into a few tensors and cut batches of
    that size from them every epoch, in TensorFlow's own threads (the streaming path parses Parquet in Python and
    preprocesses every batch on every epoch and, on a few cores, slows every training step; see BENCHMARKS.md).
    ``shuffle_seed`` then reshuffles the lists each epoch. Falls back to streaming when the batches do not share
    one list size.
    """
    import tensorflow as tf

    from training.propensity import ipw_weights

    feature_names = [*spec.names, MASK]
    signature = _signature(spec, ipw_eta > 0)
    if in_memory_batch_size:
        loaded = load_packed(batches, spec, preprocessor, [spec.label, *([position] if ipw_eta > 0 else [])])
        if loaded is not None:
            return _in_memory(*loaded, spec, in_memory_batch_size, shuffle_seed, ipw_eta, position,
                              shuffle_labels_seed)

    def generate():
        rng = np.random.default_rng(shuffle_labels_seed)
        for batch in batches():
            features = {n: batch[n].strings() if isinstance(batch[n], Coded) else batch[n] for n in feature_names}
            if shuffle_labels_seed is not None:
                batch = {**batch, spec.label: shuffle_within_lists(batch[spec.label], batch[MASK], rng)}
            if ipw_eta > 0:
                yield features, batch[spec.label], ipw_weights(batch[position], ipw_eta, batch[MASK])
            else:
                yield features, batch[spec.label]

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.map(lambda features, *labels: (preprocessor(features), *labels))
    return _without_autotune(dataset.prefetch(PREFETCH_BATCHES))


def load_packed(batches, spec: FeatureSpec, preprocessor, columns: list[str]):
    """Every batch of ``batches()`` preprocessed and joined: (packed features as tensors, ``columns`` and the mask
    as NumPy). None when the batches' list sizes differ (each padded to its own longest list), which only
    streaming can feed.

    Batches are preprocessed one at a time (a string feature's distinct values looked up once per batch) and
    only the packed result is joined: a few large tensors, not one per raw feature."""
    import tensorflow as tf

    with tf.device("/CPU:0"):  # tf.data reads it on the host; on a GPU machine eager ops would land on the GPU
        return _load_packed(batches, spec, preprocessor, columns)


def _load_packed(batches, spec: FeatureSpec, preprocessor, columns: list[str]):
    import tensorflow as tf

    packed: dict[str, list] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in dict.fromkeys([*columns, MASK])}
    for batch in read_ahead(batches()):
        if kept[MASK] and batch[MASK].shape[1] != kept[MASK][0].shape[1]:
            return None
        raw = {MASK: batch[MASK]}
        for feature in spec.features:
            values = batch[feature.name]
            if feature.dtype == STRING:
                coded = values if isinstance(values, Coded) else Coded.of(np.asarray(values, dtype=object))
                raw[feature.name] = coded.map(lambda distinct, name=feature.name: preprocessor.string_ids(
                    name, tf.constant(distinct, tf.string)))
            else:
                raw[feature.name] = values
        for name, tensor in preprocessor(raw).items():
            packed.setdefault(name, []).append(tensor)
        for name, values in kept.items():
            values.append(batch[name])
    if not kept[MASK]:
        raise ValueError("no batches: is the split empty?")
    return ({name: parts[0] if len(parts) == 1 else tf.concat(parts, axis=0) for name, parts in packed.items()},
            {name: np.concatenate(parts) for name, parts in kept.items()})


def read_ahead(batches: Iterator, depth: int = 2) -> Iterator:
    """``batches`` produced by a background thread: ``depth`` queued, plus the one the thread holds. Reading and
    padding a chunk is Parquet and NumPy work, mostly outside the GIL, so it overlaps the consumer's TensorFlow
    preprocessing of the previous one: loading ``large``'s training split (455k lists) on the 2-core dev VM took
    12.5 s in one thread (7.0 s of it reading and padding) and 10.2 s this way. The producer's exception is raised
    here; closing this generator early (the consumer stopped) stops the producer and closes ``batches``."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    handoff: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(err))

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            try:
                item = handoff.get(timeout=1.0)
            except queue.Empty:
                if not producer.is_alive() and handoff.empty():  # died before it could hand anything over
                    raise RuntimeError("the read-ahead thread ended without a result") from None
                continue
            if item is done:
                return
            if isinstance(item, _Failed):
                error = item.error
                del item  # no cycle through this frame keeping the batches alive
                raise error
            yield item
    finally:
        stop.set()
        producer.join(timeout=READ_AHEAD_JOIN_S)
        if producer.is_alive():  # stuck inside the source (a stalled read): it exits after it, as a daemon
            log.warning("the read-ahead thread is still reading after %.0f s; left to finish", READ_AHEAD_JOIN_S)
        elif hasattr(batches, "close"):
            batches.close()  # an early stop: release the Parquet reader now, not at garbage collection


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


def _in_memory(tensors: dict, arrays: dict[str, np.ndarray], spec: FeatureSpec, batch_size: int,
               shuffle_seed: int | None, ipw_eta: float, position: str | None, shuffle_labels_seed: int | None):
    import tensorflow as tf

    from training.propensity import propensity_weights

    if shuffle_labels_seed is not None:
        rng = np.random.default_rng(shuffle_labels_seed)
        arrays[spec.label] = shuffle_within_lists(arrays[spec.label], arrays[MASK], rng)
    label = tf.constant(arrays[spec.label], dtype=tf.float32)
    # Unscaled weights once; each batch scales its own to mean 1, as ipw_weights does, without the GIL.
    propensity = tf.constant(propensity_weights(arrays[position], ipw_eta, arrays[MASK])) if ipw_eta > 0 else None
    rows = len(arrays[MASK])
    del arrays

    def take(index):
        features = {name: tf.gather(tensor, index) for name, tensor in tensors.items()}
        labels = tf.gather(label, index)
        if propensity is None:
            return features, labels
        weights = tf.gather(propensity, index)
        total = tf.reduce_sum(weights)
        valid = tf.reduce_sum(tf.cast(features[MASK], tf.float32))
        return features, labels, tf.where(total > 0, weights * (valid / total), weights)

    if shuffle_seed is None:
        dataset = tf.data.Dataset.range(rows)
    elif rows > PERMUTE_ABOVE_ROWS:  # a new order every epoch, in either case
        dataset = _permutations(rows, shuffle_seed)
    else:
        dataset = tf.data.Dataset.range(rows).shuffle(rows, seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(take, num_parallel_calls=PARALLEL_BATCHES)
    return _without_autotune(dataset.prefetch(PREFETCH_BATCHES))


def _permutations(rows: int, seed: int):
    """The indices ``0..rows-1`` in a new order on every iteration (epoch), the same sequence of orders for the
    same seed. One stateless shuffle of the index tensor per epoch instead of ``Dataset.shuffle(rows)``, whose
    buffer fills element by element before the first batch (see ``PERMUTE_ABOVE_ROWS``)."""
    import tensorflow as tf

    def permutation(draw):
        key = tf.stack([draw, tf.constant(0, tf.int64)])
        return tf.data.Dataset.from_tensor_slices(
            tf.random.experimental.stateless_shuffle(tf.range(rows, dtype=tf.int64), seed=key))

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    return draws.flat_map(permutation)


def _without_autotune(dataset):
    """``dataset`` with tf.data's autotuner off. In TensorFlow 2.14 its model thread sleeps in doubling periods
    (10 ms up to seconds), and deleting an iterator, as Keras does after every epoch and every evaluation, waits
    for the current sleep to end: an iterator used for 2.7 s took 5.1 s to be done with (measured on 2 cores).
    Fixed parallelism and buffers (``PARALLEL_BATCHES``, ``PREFETCH_BATCHES``) do not have that stall."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
