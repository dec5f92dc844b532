"""SavedModel export in TF Serving's layout and its ``serving_default`` signature (the endpoint contract).

Layout: ``<base>/<model_name>/<version>/saved_model.pb`` with ``assets/feature_spec.json``. The signature takes
dense batched tensors named after the feature spec (context ``[B]``, item ``[B, L]``, ``mask [B, L]`` bool) and
returns ``{"scores": [B, L]}`` with padded slots at ``PAD_SCORE``, so TF Serving's REST API serves it with JSON
``inputs`` and sorting the scores never promotes padding. The spec's preprocessing (``training.model.Preprocessor``)
runs inside the signature, in front of the trained model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from training.feature_spec import MASK, SPEC_FILE, STRING, FeatureSpec

SIGNATURE = "serving_default"
OUTPUT = "scores"
PAD_SCORE = -1e9
DEFAULT_MODEL_NAME = "marketrank"


def input_signature(spec: FeatureSpec) -> dict[str, tf.TensorSpec]:
    def dtype(f):
        return tf.string if f.dtype == STRING else tf.float32

    signature = {f.name: tf.TensorSpec([None, *f.shape], dtype(f), name=f.name) for f in spec.context}
    signature.update({f.name: tf.TensorSpec([None, None, *f.shape], dtype(f), name=f.name) for f in spec.item})
    signature[MASK] = tf.TensorSpec([None, None], tf.bool, name=MASK)
    return signature


class _Servable(tf.Module):
    """Raw named features -> the spec's preprocessing (vocabularies, normalisation) -> the trained model."""

    def __init__(self, model: tf.keras.Model, spec: FeatureSpec, spec_path: str):
        from training.model import Preprocessor

        super().__init__()
        self.preprocessor = Preprocessor(spec)
        self.model = model
        self.feature_spec = tf.saved_model.Asset(spec_path)
        self.serve = tf.function(self._serve, input_signature=[input_signature(spec)])

    def _serve(self, features):
        scores = self.model(self.preprocessor(features), training=False)
        return {OUTPUT: tf.where(features[MASK], scores, tf.constant(PAD_SCORE, scores.dtype))}


def export_saved_model(model: tf.keras.Model, spec: FeatureSpec, base_dir: str | Path,
                       model_name: str = DEFAULT_MODEL_NAME, version: int | None = None) -> Path:
    """Write ``<base_dir>/<model_name>/<version>/`` and return it. Versions are integers (epoch seconds)."""
    version = int(version if version is not None else time.time())
    target = Path(base_dir) / model_name / str(version)
    if target.exists():
        raise FileExistsError(f"model version already exists: {target}")
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = spec.save(tmp)
        servable = _Servable(model, spec, str(spec_path))
        staging = target.parent / f".{version}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        tf.saved_model.save(servable, str(staging), signatures={SIGNATURE: servable.serve})
        staging.rename(target)  # TF Serving never sees a half-written version
    return target


def latest_version(model_dir: str | Path) -> Path:
    """The highest numeric version directory under ``<base>/<model_name>``."""
    versions = [p for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"no SavedModel versions under {model_dir}")
    return max(versions, key=lambda p: int(p.name))


def find_saved_model(path: str | Path) -> Path:
    """Accept a version dir, a model dir (<name>/<version>) or a base dir with one model name."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    if any(p.name.isdigit() for p in path.iterdir() if p.is_dir()):
        return latest_version(path)
    names = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(names) == 1:
        return latest_version(names[0])
    raise FileNotFoundError(f"no SavedModel found under {path}")


def load_spec(saved_model_dir: str | Path) -> FeatureSpec:
    """The feature spec embedded in an exported model."""
    return FeatureSpec.load(Path(saved_model_dir) / "assets" / SPEC_FILE)
