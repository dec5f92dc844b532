"""TF Serving's REST wire format (https://www.tensorflow.org/tfx/serving/api_rest), in one place.

The ranking API's backends (a TF Serving URL, or SageMaker's InvokeEndpoint on the TF Serving inference
image, which proxies ``/invocations`` to the same predict API) and the local endpoint all speak it through this
module, so the client code is the same for both.

* Predict request, columnar: ``{"signature_name": "serving_default", "inputs": {"<name>": <nested lists>}}``;
  row format ``{"instances": [...]}`` is accepted by the local endpoint too.
* Predict response: ``{"outputs": <value>}`` when the signature has one output (ours: ``scores``), else
  ``{"outputs": {"<name>": <value>}}``; the row format answers ``{"predictions": ...}``.
* Errors: ``{"error": "<message>"}`` with a 4xx/5xx status.
* Model status ``GET /v1/models/<name>[/versions/<v>]``: ``{"model_version_status": [{"version": "<v>",
  "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}``.
* Metadata ``GET /v1/models/<name>[/versions/<v>]/metadata``: ``{"model_spec": {...}, "metadata":
  {"signature_def": {"signature_def": {"serving_default": {"inputs": {...}, "outputs": {...},
  "method_name": "tensorflow/serving/predict"}}}}}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

SIGNATURE = "serving_default"
OUTPUT = "scores"
CONTENT_TYPE = "application/json"
#: SageMaker runtime headers both sides of the wire use: the caller's inference id (pairs data-capture records)
#: and the variant that answered.
INFERENCE_ID_HEADER = "X-Amzn-SageMaker-Inference-Id"
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"
PREDICT_METHOD = "tensorflow/serving/predict"
#: The SageMaker TF Serving container's thread settings for the model's session (unset or 0: TensorFlow picks).
INTRA_OP_THREADS, INTER_OP_THREADS = "SAGEMAKER_TFS_INTRA_OP_PARALLELISM", "SAGEMAKER_TFS_INTER_OP_PARALLELISM"
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<verb>:predict|/metadata)?$")
DTYPES = {np.dtype(np.float32): "DT_FLOAT", np.dtype(np.float64): "DT_DOUBLE", np.dtype(np.int64): "DT_INT64",
          np.dtype(np.int32): "DT_INT32", np.dtype(np.bool_): "DT_BOOL", np.dtype(object): "DT_STRING"}


class WireError(ValueError):
    """A body that does not follow the TF Serving REST contract."""


def predict_request(inputs: Mapping[str, Any], signature_name: str = SIGNATURE) -> dict[str, Any]:
    """Columnar predict body from named arrays (numpy or nested lists), for ``encode``.

    Numeric and bool arrays stay NumPy: orjson writes a float32 as the shortest text that reads back as the same
    float32 (``0.12345679``), where ``tolist()`` would widen it to a 17-digit float64: a third of the body at
    300 candidates. Text arrays become lists (orjson writes no object arrays)."""
    def value(array: Any) -> Any:
        if not isinstance(array, np.ndarray):
            return array
        return np.ascontiguousarray(array) if array.dtype.kind in "biuf" else array.tolist()

    return {"signature_name": signature_name, "inputs": {name: value(a) for name, a in inputs.items()}}


def encode(body: Mapping[str, Any]) -> bytes:
    """Compact JSON (orjson: a 300-candidate predict body is ~60 kB, and the stdlib takes ~1 ms to write it)."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(raw: bytes | str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise WireError(f"body is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise WireError("body must be a JSON object")
    return body


def request_inputs(body: Mapping[str, Any]) -> tuple[dict[str, Any], str, bool]:
    """(named inputs, signature name, row format?) from a predict request body."""
    signature = body.get("signature_name") or SIGNATURE
    if "inputs" in body and "instances" in body:
        raise WireError("request has both 'inputs' and 'instances'; use one")
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            raise WireError("'inputs' must be an object of named tensors")
        return dict(inputs), signature, False
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
            raise WireError("'instances' must be a non-empty list of objects of named tensors")
        names = set(instances[0])
        if any(set(i) != names for i in instances):
            raise WireError("every instance must have the same named inputs")
        return {name: [i[name] for i in instances] for name in names}, signature, True
    raise WireError("request must have 'inputs' (columnar) or 'instances' (row) format")


def predict_response(outputs: Mapping[str, np.ndarray], row_format: bool = False) -> dict[str, Any]:
    """TF Serving's response for a signature's outputs (one output -> the bare value)."""
    values = {name: np.asarray(value).tolist() for name, value in outputs.items()}
    if row_format:
        if len(values) == 1:
            return {"predictions": next(iter(values.values()))}
        batch = len(next(iter(values.values())))
        return {"predictions": [{name: value[i] for name, value in values.items()} for i in range(batch)]}
    return {"outputs": next(iter(values.values())) if len(values) == 1 else values}


def parse_scores(body: Mapping[str, Any], output: str = OUTPUT) -> np.ndarray:
    """The ``scores`` array from a predict response, whichever of TF Serving's shapes it has."""
    if "error" in body:
        raise WireError(f"model server error: {body['error']}")
    value = body.get("outputs", body.get("predictions"))
    if value is None:
        raise WireError("response has neither 'outputs' nor 'predictions'")
    if isinstance(value, dict):
        if output not in value:
            raise WireError(f"response has no output {output!r} (has {sorted(value)})")
        value = value[output]
    if isinstance(value, list) and value and isinstance(value[0], dict):  # row format, several outputs
        if not all(isinstance(row, dict) and output in row for row in value):
            raise WireError(f"response rows lack output {output!r} (first row has {sorted(value[0])})")
        value = [row[output] for row in value]
    numbers = np.asarray(value)
    if numbers.dtype.kind not in "iuf":  # text or booleans are not scores, even where float() would take them
        raise WireError(f"scores must be numbers, got {numbers.dtype.name} values")
    scores = np.asarray(numbers, dtype=np.float64)  # no copy when the JSON numbers were floats already
    if scores.ndim != 2:
        raise WireError(f"scores must be [batch, list] shaped, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise WireError("scores contain NaN or infinity")
    return scores


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def parse_path(path: str) -> dict[str, str | None]:
    """Split ``/v1/models/<name>[/versions/<v>|/labels/<l>][:predict|/metadata]``; WireError if it is not one."""
    match = _PATH.match(path)
    if not match:
        raise WireError(f"not a TF Serving REST path: {path}")
    return match.groupdict()


def predict_path(model_name: str, version: int | str | None = None) -> str:
    return f"/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "") + ":predict"


def model_status(versions: list[tuple[int | str, str]]) -> dict[str, Any]:
    return {"model_version_status": [
        {"version": str(version), "state": state, "status": {"error_code": "OK", "error_message": ""}}
        for version, state in versions]}


def tensor_info(name: str, dtype: str, shape: list[int] | None) -> dict[str, Any]:
    """A TensorInfo as TF Serving's metadata shows it (``shape`` None: unknown rank)."""
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in shape or []],
                                             "unknown_rank": shape is None}, "name": name}


def metadata(model_name: str, version: int | str, inputs: dict[str, dict], outputs: dict[str, dict]) -> dict:
    return {"model_spec": {"name": model_name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": {
                SIGNATURE: {"inputs": inputs, "outputs": outputs, "method_name": PREDICT_METHOD}}}}}
