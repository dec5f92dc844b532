"""The local endpoint's servable runs a SavedModel the way TF Serving does (a session, feeds bound once): the same
outputs as the eager signature, TF Serving's JSON rules for each input dtype, and the container's thread settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from serving import local_endpoint, wire


class Mixed(tf.Module):
    """Two outputs from an int64, a float32, a string and a bool input (every kind the checks tell apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = tf.Variable(1.5)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(["a", "b"]), tf.constant([10.0, 20.0])), 0.0)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="count"),
                                  tf.TensorSpec([None, None], tf.float32, name="price"),
                                  tf.TensorSpec([None, None], tf.string, name="tag"),
                                  tf.TensorSpec([None, None], tf.bool, name="mask"),
                                  tf.TensorSpec([None], tf.int32, name="small")])
    def serve(self, count, price, tag, mask, small):
        base = (tf.cast(count, tf.float32) + self.weight * price + self.table.lookup(tag)
                + tf.cast(small, tf.float32)[:, None])
        return {"scores": tf.where(mask, base, -1.0), "doubled": 2.0 * base}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    module = Mixed()
    path = tmp_path_factory.mktemp("mixed") / "3"
    tf.saved_model.save(module, str(path), signatures={wire.SIGNATURE: module.serve})
    return path


INPUTS = {"count": [[1, 2, 3]], "price": [[0.5, 1, 2.0]], "tag": [["a", "b", "zz"]], "mask": [[True, True, False]],
          "small": [4]}


def test_session_outputs_match_the_eager_signature(saved) -> None:
    servable = local_endpoint.Servable.load("mixed", 3, saved)
    body = servable.predict({"inputs": INPUTS})
    eager = tf.saved_model.load(str(saved)).signatures[wire.SIGNATURE]
    expected = eager(**{name: tf.constant(value, dtype=servable.inputs[name].dtype) for name, value in INPUTS.items()})
    assert set(body["outputs"]) == {"scores", "doubled"}
    for name, value in expected.items():
        assert np.allclose(body["outputs"][name], value.numpy()), name
    assert body["outputs"]["scores"] == [[15.75, 27.5, -1.0]]  # 1 + 1.5*0.5 + 10 + 4, 2 + 1.5 + 20 + 4, masked
    assert servable.signature_def["inputs"]["count"]["dtype"] == "DT_INT64"
    assert servable.signature_def["outputs"]["scores"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}] * 2


@pytest.mark.parametrize("name, value, message", [
    ("count", [[1.5, 2, 3]], "input 'count' must be a rectangular array of DT_INT64"),
    ("count", [[1.0, 2.0, 3.0]], "input 'count' must be a rectangular array of DT_INT64"),  # TF Serving: ints only
    ("small", [2 ** 40], "input 'small' must be a rectangular array of DT_INT32"),  # out of range, not wrapped
    ("price", [["1", "2", "3"]], "input 'price' must be a rectangular array of DT_FLOAT"),
    ("tag", [[1, 2, 3]], "input 'tag' must be a rectangular array of DT_STRING"),
    ("mask", [[1, 0, 1]], "input 'mask' must be a rectangular array of DT_BOOL"),
    ("price", [[1e300, 1, 2]], "input 'price' must be a rectangular array of DT_FLOAT"),  # past float32's range
    ("price", [0.5, 1, 2], r"input 'price' must have shape \[-1, -1\] \(-1: any size\), got \[3\]"),
    ("price", [[0.5, 1]], "the model rejected the inputs"),  # rows of another length than the other inputs'
])
def test_bad_inputs_are_wire_errors_naming_the_input(saved, name, value, message) -> None:
    servable = local_endpoint.Servable.load("mixed", 3, saved)
    with pytest.raises(wire.WireError, match=message):
        servable.predict({"inputs": {**INPUTS, name: value}})


def test_ints_for_a_float_input_are_accepted(saved) -> None:
    servable = local_endpoint.Servable.load("mixed", 3, saved)
    body = servable.predict({"inputs": {**INPUTS, "price": [[0, 1, 2]]}})
    assert body["outputs"]["scores"] == [[15.0, 27.5, -1.0]]


def test_empty_lists_fit_every_dtype(saved) -> None:
    servable = local_endpoint.Servable.load("mixed", 3, saved)
    empty = {name: [[]] for name in ("count", "price", "tag", "mask")}
    assert servable.predict({"inputs": {**INPUTS, **empty}})["outputs"]["scores"] == [[]]


class AnyShape(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def serve(self, x):
        return {"scores": 2.0 * x}


def test_an_unknown_rank_input_loads_and_takes_any_shape(tmp_path) -> None:
    module = AnyShape()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={wire.SIGNATURE: module.serve})
    servable = local_endpoint.Servable.load("any", 1, tmp_path / "1")
    assert servable.predict({"inputs": {"x": [[1.0, 2.0]]}})["outputs"] == [[2.0, 4.0]]
    assert servable.predict({"inputs": {"x": 3}})["outputs"] == 6.0
    shape = servable.signature_def["inputs"]["x"]["tensor_shape"]
    assert shape == {"dim": [], "unknown_rank": True}


def test_thread_settings_come_from_the_container_variables() -> None:
    config = local_endpoint.session_config({local_endpoint.INTRA_OP_THREADS: "1",
                                            local_endpoint.INTER_OP_THREADS: " 2 "})
    assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (1, 2)
    assert local_endpoint.thread_settings({}) == {}
    with pytest.raises(ValueError, match="SAGEMAKER_TFS_INTRA_OP_PARALLELISM must be a whole number"):
        local_endpoint.thread_settings({local_endpoint.INTRA_OP_THREADS: "two"})
