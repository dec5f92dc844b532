"""TF Serving's REST contract (https://www.tensorflow.org/tfx/serving/api_rest), checked on both sides.

First ``serving.wire`` against the bodies the TF Serving documentation gives; then the live local endpoint (a
real uvicorn server over the session's exported model) against the same shapes, through the client functions
(``wire.predict_request`` / ``wire.parse_scores``) that the ranking API uses. The endpoint's scores must be the
scores of the SavedModel loaded directly with ``tf.saved_model.load``.
"""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from pipelines import deploy
from serving import local_endpoint, servers, wire

MODEL, ENDPOINT = "ranker-v1", "shop"
slow = pytest.mark.slow

# ---------------------------------------------------------------------------------------------- wire module


def test_predict_request_is_the_columnar_format() -> None:
    body = wire.predict_request({"x": np.array([[1.0, 2.5]], np.float32), "s": np.array(["a"], dtype=object),
                                 "mask": np.array([[True, False]]), "raw": [[0.5]]})
    assert json.loads(wire.encode(body)) == {
        "signature_name": "serving_default",
        "inputs": {"x": [[1.0, 2.5]], "s": ["a"], "mask": [[True, False]], "raw": [[0.5]]}}


def test_float32_inputs_are_written_short_and_read_back_exactly() -> None:
    x = (np.random.default_rng(0).random((1, 300)) * 3).astype(np.float32)
    x[0, :2] = [0.1, np.float32(1) / 3]
    text = wire.encode(wire.predict_request({"x": x}))
    assert b'[[0.1,0.33333334,' in text  # float32's shortest repr, not the float64 0.10000000149011612
    back = np.asarray(json.loads(text)["inputs"]["x"], dtype=np.float32)
    assert back.tobytes() == x.tobytes()
    assert len(text) < len(json.dumps({"inputs": {"x": x.tolist()}}).replace(" ", "")) * 0.7


def test_request_inputs_reads_the_columnar_and_the_row_format() -> None:
    columnar = {"inputs": {"a": [1.0, 2.0], "b": [[1], [2]]}}
    rows = {"signature_name": "serving_default", "instances": [{"a": 1.0, "b": [1]}, {"a": 2.0, "b": [2]}]}
    assert wire.request_inputs(columnar) == ({"a": [1.0, 2.0], "b": [[1], [2]]}, "serving_default", False)
    assert wire.request_inputs(rows) == ({"a": [1.0, 2.0], "b": [[1], [2]]}, "serving_default", True)


@pytest.mark.parametrize("body", [
    {"inputs": {"a": [1]}, "instances": [{"a": 1}]},  # both formats
    {"signature_name": "serving_default"},  # neither
    {"inputs": [[1.0]]},  # unnamed columnar inputs
    {"instances": []},
    {"instances": [{"a": 1}, {"b": 2}]},  # instances disagree on their inputs
])
def test_request_inputs_rejects_what_tf_serving_rejects(body) -> None:
    with pytest.raises(wire.WireError):
        wire.request_inputs(body)


def test_predict_response_follows_the_documented_shapes() -> None:
    scores = np.array([[0.5, -1.0]], np.float32)
    # one output: the bare value ("outputs": <value>|<(nested)list>), else an object of named outputs
    assert wire.predict_response({"scores": scores}) == {"outputs": [[0.5, -1.0]]}
    assert wire.predict_response({"scores": scores}, row_format=True) == {"predictions": [[0.5, -1.0]]}
    two = {"scores": scores, "ids": np.array([[1, 2]])}
    assert wire.predict_response(two) == {"outputs": {"scores": [[0.5, -1.0]], "ids": [[1, 2]]}}
    assert wire.predict_response(two, row_format=True) == {"predictions": [{"scores": [0.5, -1.0], "ids": [1, 2]}]}


@pytest.mark.parametrize("body", [
    {"outputs": [[0.5, -1.0]]},
    {"outputs": {"scores": [[0.5, -1.0]], "other": [1]}},
    {"predictions": [[0.5, -1.0]]},
    {"predictions": [{"scores": [0.5, -1.0], "other": 1}]},
])
def test_parse_scores_reads_every_response_shape(body) -> None:
    np.testing.assert_array_equal(wire.parse_scores(body), [[0.5, -1.0]])


@pytest.mark.parametrize("body", [{"error": "boom"}, {"result": []}, {"outputs": [0.5]},
                                  {"outputs": {"other": [[1.0]]}}, {"outputs": [[float("nan")]]}])
def test_parse_scores_rejects_errors_and_malformed_responses(body) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_scores(body)


def test_status_metadata_and_error_bodies_follow_the_documentation() -> None:
    assert wire.model_status([(1, "AVAILABLE")]) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    info = wire.tensor_info("serving_default_x:0", "DT_FLOAT", [-1, 3])
    assert info == {"dtype": "DT_FLOAT", "name": "serving_default_x:0", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}], "unknown_rank": False}}
    body = wire.metadata("m", 7, {"x": info}, {"scores": info})
    assert body["model_spec"] == {"name": "m", "signature_name": "", "version": "7"}
    assert body["metadata"]["signature_def"]["signature_def"] == {"serving_default": {
        "inputs": {"x": info}, "outputs": {"scores": info}, "method_name": "tensorflow/serving/predict"}}
    assert wire.error_body("bad") == {"error": "bad"}


@pytest.mark.parametrize(("path", "parts"), [
    ("/v1/models/m", {"name": "m", "version": None, "label": None, "verb": None}),
    ("/v1/models/m/versions/12:predict", {"name": "m", "version": "12", "label": None, "verb": ":predict"}),
    ("/v1/models/m/labels/stable/metadata", {"name": "m", "version": None, "label": "stable", "verb": "/metadata"}),
])
def test_parse_path_splits_rest_paths(path, parts) -> None:
    assert wire.parse_path(path) == parts
    assert wire.predict_path("m", 12) == "/v1/models/m/versions/12:predict"


def test_parse_path_rejects_other_paths() -> None:
    for path in ("/v1/models", "/v1/models/m:classify", "/v2/models/m:predict", "/v1/models/m/versions/x"):
        with pytest.raises(wire.WireError):
            wire.parse_path(path)


# ---------------------------------------------------------------------------------------------- live endpoint


@pytest.fixture(scope="module")
def model(tiny_run) -> dict:
    """The exported model, a test batch of its signature's inputs and its scores from the SavedModel itself."""
    import tensorflow as tf

    from training import export
    from training.data import iter_batches
    from training.feature_spec import MASK

    export_dir = tiny_run["export_dir"]
    spec = export.load_spec(export_dir)
    batch = next(iter_batches(tiny_run["features"] / "test", spec, 3, list_size=None))
    inputs = {name: batch[name] for name in [*spec.names, MASK]}
    signature = tf.saved_model.load(str(export_dir)).signatures[wire.SIGNATURE]
    scores = signature(**{name: tf.constant(value) for name, value in inputs.items()})[wire.OUTPUT].numpy()
    return {"export_dir": export_dir, "version": export_dir.name, "spec": spec, "inputs": inputs, "scores": scores}


@pytest.fixture(scope="module")
def client(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    shutil.copytree(model["export_dir"], root / "models" / MODEL / model["version"])
    backend = deploy.LocalBackend(root / "endpoints", ENDPOINT)
    backend.apply(deploy.EndpointState(production=deploy.Variant(MODEL)))
    app = local_endpoint.create_app(root / "models", backend.path, None, poll_seconds=30)
    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def _json(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()


@slow
def test_columnar_predict_answers_outputs_equal_to_the_saved_model(client, model) -> None:
    response = client.post(wire.predict_path(MODEL), content=wire.encode(wire.predict_request(model["inputs"])),
                           headers={"content-type": wire.CONTENT_TYPE})
    assert response.status_code == 200, response.text
    body = _json(response)
    assert set(body) == {"outputs"}  # one output: the bare [batch, list] value, not {"scores": ...}
    batch, items = model["scores"].shape
    assert len(body["outputs"]) == batch and all(len(row) == items for row in body["outputs"])
    np.testing.assert_allclose(wire.parse_scores(body), model["scores"], rtol=0, atol=1e-5)


@slow
def test_row_predict_answers_predictions(client, model) -> None:
    rows = [{name: np.asarray(value[i]).tolist() for name, value in model["inputs"].items()}
            for i in range(len(model["scores"]))]
    body = _json(client.post(wire.predict_path(MODEL, model["version"]), json={"instances": rows}))
    assert set(body) == {"predictions"}
    np.testing.assert_allclose(wire.parse_scores(body), model["scores"], rtol=0, atol=1e-5)


@slow
def test_sagemaker_invocations_and_the_endpoint_alias_speak_the_same_contract(client, model) -> None:
    request = wire.encode(wire.predict_request(model["inputs"]))
    for path in ("/invocations", wire.predict_path(ENDPOINT)):
        response = client.post(path, content=request, headers={"content-type": wire.CONTENT_TYPE})
        assert response.status_code == 200, response.text
        assert response.headers[local_endpoint.VARIANT_HEADER] == deploy.PRODUCTION
        np.testing.assert_allclose(wire.parse_scores(_json(response)), model["scores"], rtol=0, atol=1e-5)


@slow
def test_model_status_is_the_documented_shape(client, model) -> None:
    expected = {"model_version_status": [{"version": model["version"], "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    assert _json(client.get(f"/v1/models/{MODEL}")) == expected
    assert _json(client.get(f"/v1/models/{MODEL}/versions/{model['version']}")) == expected


@slow
def test_metadata_describes_the_loaded_signature(client, model) -> None:
    from training.feature_spec import MASK, STRING

    body = _json(client.get(f"/v1/models/{MODEL}/metadata"))
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": model["version"]}
    signature = body["metadata"]["signature_def"]["signature_def"][wire.SIGNATURE]
    assert signature["method_name"] == "tensorflow/serving/predict"

    def dims(info: dict) -> list[int]:
        assert info["tensor_shape"]["unknown_rank"] is False and isinstance(info["name"], str)
        return [int(d["size"]) for d in info["tensor_shape"]["dim"]]

    spec = model["spec"]
    assert set(signature["inputs"]) == {*spec.names, MASK}
    for feature in spec.features:
        info = signature["inputs"][feature.name]
        assert info["dtype"] == ("DT_STRING" if feature.dtype == STRING else "DT_FLOAT"), feature.name
        batch_dims = [-1] if feature in spec.context else [-1, -1]
        assert dims(info) == [*batch_dims, *feature.shape], feature.name
    assert signature["inputs"][MASK]["dtype"] == "DT_BOOL" and dims(signature["inputs"][MASK]) == [-1, -1]
    assert set(signature["outputs"]) == {wire.OUTPUT}
    assert signature["outputs"][wire.OUTPUT]["dtype"] == "DT_FLOAT"
    assert dims(signature["outputs"][wire.OUTPUT]) == [-1, -1]
    assert _json(client.get(f"/v1/models/{MODEL}/versions/{model['version']}/metadata")) == body


@slow
def test_errors_are_error_objects_with_4xx_statuses(client, model) -> None:
    body = wire.encode(wire.predict_request({**model["inputs"], "bogus": [1.0]}))
    cases = [(client.post(wire.predict_path(MODEL), content=body), 400),
             (client.post(wire.predict_path(MODEL), content=b"{not json"), 400),
             (client.post(wire.predict_path("no-such-model"), content=body), 404),
             (client.get(f"/v1/models/{MODEL}/versions/1"), 404)]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = _json(response)
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]
        with pytest.raises(wire.WireError, match="model server error"):
            wire.parse_scores(error)
