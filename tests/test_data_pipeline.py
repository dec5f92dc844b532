"""The training input pipelines on a real feature-job output: streaming from Parquet every epoch, or the split
held in memory as preprocessed tensors (what ``training.train`` picks when it fits ``HParams.data_cache_mb``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from training import data
from training.feature_spec import MASK, FeatureSpec
from training.hparams import HParams
from training.model import Preprocessor
from training.propensity import ipw_weights
from training.train import in_memory

pytestmark = pytest.mark.slow
BATCH = 16


@pytest.fixture(scope="module")
def split(tiny_run):
    spec = FeatureSpec.load(tiny_run["features"])
    train_dir = tiny_run["features"] / "train"

    def batches():
        return data.iter_batches(train_dir, spec, BATCH, list_size=spec.list_size, columns_extra=("position",))

    return spec, train_dir, batches


@pytest.fixture(scope="module")
def preprocessor(split):
    return Preprocessor(split[0])


def _rows(dataset) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The dataset's batches (as NumPy) and all its rows concatenated."""
    batches = [{**{k: v.numpy() for k, v in features.items()}, "label": label.numpy(),
                **({"weights": rest[0].numpy()} if rest else {})} for features, label, *rest in dataset]
    return batches, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _sorted(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in a canonical order (by their label and float features), to compare datasets that shuffle."""
    keys = [rows["label"], *np.moveaxis(rows["item_dense"], -1, 0)]
    order = np.lexsort([column[:, i] for column in keys for i in range(column.shape[1])][::-1])
    return {k: v[order] for k, v in rows.items()}


@pytest.mark.parametrize("load", ["loading_batches", "batches"])
@pytest.mark.parametrize("permute_above", [data.PERMUTE_ABOVE_ROWS, 0], ids=["buffer", "permutation"])
def test_in_memory_holds_the_same_lists_as_streaming_and_reshuffles_each_epoch(split, preprocessor, load,
                                                                               permute_above, monkeypatch):
    """The same packed inputs whether strings are looked up per batch (streaming) or per distinct value of a chunk
    read with string codes (``loading_batches``, what training uses) or of plain string batches."""
    monkeypatch.setattr(data, "PERMUTE_ABOVE_ROWS", permute_above)
    spec, train_dir, batches = split
    streamed = _sorted(_rows(data.make_dataset(batches, spec, preprocessor))[1])
    source = data.loading_batches(train_dir, spec) if load == "loading_batches" else batches
    memory = data.make_dataset(source, spec, preprocessor, in_memory_batch_size=BATCH, shuffle_seed=3)
    first_batches, first = _rows(memory)
    second = _rows(memory)[1]
    assert all(len(b["label"]) <= BATCH for b in first_batches)
    assert not np.array_equal(first["label"], second["label"])  # a new order every epoch
    rebuilt = data.make_dataset(source, spec, preprocessor, in_memory_batch_size=BATCH, shuffle_seed=3)
    np.testing.assert_array_equal(_rows(rebuilt)[1]["label"], first["label"])  # a re-run repeats the orders
    np.testing.assert_array_equal(_rows(rebuilt)[1]["label"], second["label"])
    for rows in (first, second):
        rows = _sorted(rows)
        assert rows.keys() == streamed.keys() == {"context_dense", "context_ids", "item_dense", "item_ids", MASK,
                                                  "label"}
        for name, values in streamed.items():
            assert rows[name].dtype == values.dtype, name
            np.testing.assert_array_equal(rows[name], values, err_msg=name)
    # every training value is in the vocabulary (id 0 is out of vocabulary); padding is not
    assert (first["item_ids"][first[MASK]] > 0).all() and (first["item_ids"][~first[MASK]] == 0).all()


def test_in_memory_weights_are_ipw_weights_of_each_batch(split, preprocessor):
    spec, _, batches = split
    eta = 0.9
    memory = data.make_dataset(batches, spec, preprocessor, ipw_eta=eta, position="position",
                               in_memory_batch_size=BATCH)
    arrays = {name: np.concatenate([b[name] for b in batches()]) for name in ("position", MASK)}
    produced = _rows(memory)[0]
    assert len(produced) == -(-len(arrays[MASK]) // BATCH)
    for i, batch in enumerate(produced):  # no shuffle seed: the split's order, cut every BATCH lists
        rows = slice(i * BATCH, (i + 1) * BATCH)
        expected = ipw_weights(arrays["position"][rows], eta, arrays[MASK][rows])
        np.testing.assert_allclose(batch["weights"], expected, rtol=1e-6)
        assert batch["weights"][batch[MASK]].mean() == pytest.approx(1.0, rel=1e-5)


def test_batches_of_different_list_sizes_are_streamed(split, preprocessor):
    spec, _, batches = split
    ragged = [{k: v[:, : 30 + 5 * (i % 2)] if v.ndim == 2 else v for k, v in batch.items()}  # as LETOR's
              for i, batch in enumerate(batches())]  # evaluation batches: each padded to its own longest list
    assert len({b[MASK].shape[1] for b in ragged}) == 2
    assert data.load_packed(lambda: iter(ragged), spec, preprocessor, []) is None
    produced = data.make_dataset(lambda: iter(ragged), spec, preprocessor, in_memory_batch_size=BATCH)
    assert [tuple(features[MASK].shape) for features, _ in produced] == [b[MASK].shape for b in ragged]


def test_training_keeps_data_in_memory_only_within_the_budget(split):
    spec, train_dir, batches = split
    estimated = data.estimated_bytes(train_dir, spec)
    assert 0 < estimated < 2048 * 2**20
    assert in_memory(HParams(), spec, train_dir, train_dir)
    assert not in_memory(HParams(), spec, train_dir, batches)  # a batch callable has no size to check: streamed
    assert not in_memory(HParams(data_cache_mb=0), spec, train_dir)
    too_small = max(1, estimated // 2**20 // 2)
    assert estimated > too_small * 2**20 and not in_memory(HParams(data_cache_mb=too_small), spec, train_dir)


def test_default_data_budget_is_a_fifth_of_the_memory_a_container_allows(tmp_path, monkeypatch) -> None:
    from training import train

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(train, "CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    limit.write_text("max\n")  # cgroup v2 without a limit: the machine's memory
    assert train.memory_budget_mb() == int(physical / 5 / 2**20)
    limit.write_text(f"{512 * 2**20}\n")  # a container allowed 512 MiB
    assert train.memory_budget_mb() == int(512 / 5)


def test_default_budget_streams_data_beyond_it(split, monkeypatch) -> None:
    from training import train

    spec, train_dir, _ = split
    estimated_mb = data.estimated_bytes(train_dir, spec) / 2**20
    monkeypatch.setattr(train, "memory_budget_mb", lambda: int(estimated_mb) + 1)
    assert HParams().data_cache_mb is None and in_memory(HParams(), spec, train_dir)
    monkeypatch.setattr(train, "memory_budget_mb", lambda: int(estimated_mb / 2))
    assert not in_memory(HParams(), spec, train_dir)


def test_streaming_source_reshuffles_every_epoch_reproducibly(split) -> None:
    """Data beyond ``data_cache_mb`` streams: each call (an epoch) gives the same lists in a new order, and a new
    source (a re-run) repeats the sequence of orders."""
    from training.train import batch_source

    spec, train_dir, _ = split
    hparams = HParams(batch_size=BATCH, data_cache_mb=0, seed=3)

    def epochs(source, n=3) -> list[np.ndarray]:
        return [np.concatenate([b["label"].sum(axis=1) * 1000 + b["age_days"][:, 0] for b in source()])
                for _ in range(n)]

    first = epochs(batch_source(train_dir, spec, hparams, shuffle=True))
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    assert all(np.array_equal(np.sort(e), np.sort(first[0])) for e in first)  # the same lists every epoch
    again = epochs(batch_source(train_dir, spec, hparams, shuffle=True))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    valid = epochs(batch_source(train_dir, spec, hparams, shuffle=False), n=2)
    assert np.array_equal(valid[0], valid[1])  # no shuffle: the file order every time


def test_both_pipelines_run_without_the_autotuner_whose_iterators_stall_on_delete(split, preprocessor):
    """TF 2.14's autotune thread made a finished iterator wait out its current (doubling) sleep: a Keras epoch
    or evaluation could end seconds late. Both pipelines run with fixed buffers and parallelism instead."""
    spec, _, batches = split
    for dataset in (data.make_dataset(batches, spec, preprocessor),
                    data.make_dataset(batches, spec, preprocessor, in_memory_batch_size=BATCH, shuffle_seed=3),
                    data.make_dataset(batches, spec, preprocessor, ipw_eta=0.8, position="position",
                                      in_memory_batch_size=BATCH)):
        assert dataset.options().autotune.enabled is False
        assert len(list(dataset.take(2))) == 2


def test_read_ahead_keeps_order_raises_the_readers_error_and_stops_when_closed() -> None:
    import threading

    assert list(data.read_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise KeyError("part-0.parquet: columns ['brand_ctr'] are in the feature spec but not in the data")

    with pytest.raises(KeyError, match="brand_ctr"):
        list(data.read_ahead(failing()))

    produced, closed = [], []

    def endless():
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
        finally:
            closed.append(True)

    ahead = data.read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # the consumer stopped early (e.g. list sizes differ): the producer must stop too
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # consumed, queued, and the one in hand
    assert closed == [True]  # the source (a Parquet reader) is released at once

    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(data.read_ahead(iter(range(3)), depth=0))
