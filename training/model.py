"""TF-Ranking Keras ranker built from the feature spec: preprocessing, scorer, loss and metrics.

The model takes raw features (strings and unnormalised floats) so the exported SavedModel owns vocabularies and
normalisation; serving sends what the feature store holds and nothing is computed twice.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_ranking as tfr

from training.feature_spec import MASK, STRING, Feature, FeatureSpec
from training.hparams import HParams

LOSSES = {
    "softmax": tfr.keras.losses.SoftmaxLoss,
    "approx_ndcg": tfr.keras.losses.ApproxNDCGLoss,
    "pairwise_logistic": tfr.keras.losses.PairwiseLogisticLoss,
}


def _transform(x: tf.Tensor, feature: Feature) -> tf.Tensor:
    if feature.transform == "log1p":
        x = tf.sign(x) * tf.math.log1p(tf.abs(x))
    mean = tf.constant(feature.mean if feature.mean is not None else 0.0, tf.float32)
    std = tf.constant(feature.std if feature.std is not None else 1.0, tf.float32)
    x = tf.clip_by_value((x - mean) / std, -8.0, 8.0)
    return x if feature.shape else x[..., tf.newaxis]


class _Encoder(tf.keras.layers.Layer):
    """Raw feature -> dense vector: normalised floats, embedded strings (out-of-vocabulary bucket 0)."""

    def __init__(self, feature: Feature, embedding_dim: int, **kwargs):
        super().__init__(name=f"encode_{feature.name}", **kwargs)
        self.feature = feature
        if feature.dtype == STRING:
            self.lookup = tf.keras.layers.StringLookup(vocabulary=list(feature.vocabulary or ()), num_oov_indices=1)
            self.embed = tf.keras.layers.Embedding(len(feature.vocabulary or ()) + 1, embedding_dim)

    def call(self, x):
        if self.feature.dtype == STRING:
            return self.embed(self.lookup(x))
        return _transform(tf.cast(x, tf.float32), self.feature)


def build_model(spec: FeatureSpec, hparams: HParams) -> tf.keras.Model:
    """Inputs: context [B], item [B, L], mask [B, L]; output: scores [B, L]."""
    def dtype(f: Feature):
        return tf.string if f.dtype == STRING else tf.float32

    inputs = {f.name: tf.keras.Input(shape=f.shape, dtype=dtype(f), name=f.name) for f in spec.context}
    inputs.update({f.name: tf.keras.Input(shape=(None, *f.shape), dtype=dtype(f), name=f.name) for f in spec.item})
    inputs[MASK] = tf.keras.Input(shape=(None,), dtype=tf.bool, name=MASK)
    mask = inputs[MASK]

    item = tf.concat([_Encoder(f, hparams.embedding_dim)(inputs[f.name]) for f in spec.item], axis=-1)
    if spec.context:
        context = tf.concat([_Encoder(f, hparams.embedding_dim)(inputs[f.name]) for f in spec.context], axis=-1)
        list_len = tf.shape(mask)[1]
        context = tf.tile(context[:, tf.newaxis, :], tf.stack([1, list_len, 1]))
        x = tf.concat([context, item], axis=-1)
    else:
        x = item
    if hparams.scorer == "din":
        attention = tfr.keras.layers.DocumentInteractionAttention(
            num_heads=hparams.attention_heads, head_size=hparams.attention_head_size,
            num_layers=hparams.attention_layers, dropout=hparams.dropout)
        x = tf.concat([x, attention((x, mask))], axis=-1)
    for width in hparams.hidden:
        x = tf.keras.layers.Dense(width, activation="relu")(x)
        if hparams.dropout:
            x = tf.keras.layers.Dropout(hparams.dropout)(x)
    scores = tf.squeeze(tf.keras.layers.Dense(1)(x), axis=-1)
    return tf.keras.Model(inputs=inputs, outputs=scores, name=f"marketrank_{hparams.scorer}")


def compile_model(model: tf.keras.Model, hparams: HParams) -> tf.keras.Model:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(hparams.learning_rate),
        loss=LOSSES[hparams.loss](),
        metrics=[tfr.keras.metrics.NDCGMetric(topn=10, name="ndcg_10"),
                 tfr.keras.metrics.NDCGMetric(topn=5, name="ndcg_5"),
                 tfr.keras.metrics.MRRMetric(name="mrr")],
        weighted_metrics=[],
    )
    return model
