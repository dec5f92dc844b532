"""TF-Ranking Keras ranker built from the feature spec: preprocessing, scorer, loss and metrics.

Two parts, as Keras recommends for preprocessing layers:

* :class:`Preprocessor` turns raw named features (strings and unnormalised floats, what the feature store holds
  and the exported signature takes) into a few packed tensors: normalised floats and vocabulary ids per scope. It
  has no weights, only the spec's vocabularies and statistics. Training applies it in ``tf.data`` (once, at load,
  for data held in memory), so a training step never hashes a string; the export puts it in front of the model.
* :func:`build_model` is the trained part: packed tensors -> scores.

The exported SavedModel owns both, so serving sends raw features and nothing is computed twice.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_ranking as tfr

from training.feature_spec import CONTEXT, ITEM, MASK, STRING, Feature, FeatureSpec
from training.hparams import HParams

LOSSES = {
    "softmax": tfr.keras.losses.SoftmaxLoss,
    "approx_ndcg": tfr.keras.losses.ApproxNDCGLoss,
    "pairwise_logistic": tfr.keras.losses.PairwiseLogisticLoss,
}
#: Normalised floats are clipped to +-CLIP standard deviations.
CLIP = 8.0


def _width(feature: Feature) -> int:
    return int(np.prod(feature.shape)) if feature.shape else 1


def _vector(feature: Feature, value, default: float) -> np.ndarray:
    return np.broadcast_to(np.asarray(default if value is None else value, np.float32), (_width(feature),))


class Preprocessor(tf.keras.layers.Layer):
    """Raw named features -> ``{<scope>_dense, <scope>_ids, mask}``.

    Floats: ``sign(x) log1p(|x|)`` where the spec says ``log1p``, then ``(x - mean) / std`` clipped to +-CLIP, one
    column per value (a feature of shape (d,) gives d). Strings: the index in the feature's vocabulary, 0 for
    values outside it. A string feature may also arrive as integer ids already (data held in memory is
    converted once, see :meth:`string_ids`).
    """

    def __init__(self, spec: FeatureSpec, **kwargs):
        super().__init__(name="preprocess", trainable=False, **kwargs)
        self.spec = spec
        self.lookups = {f.name: tf.keras.layers.StringLookup(vocabulary=list(f.vocabulary or ()), num_oov_indices=1,
                                                             name=f"lookup_{f.name}")
                        for f in spec.features if f.dtype == STRING}
        self.stats = {}
        for scope, features in ((CONTEXT, spec.context), (ITEM, spec.item)):
            floats = [f for f in features if f.dtype != STRING]
            if floats:
                self.stats[scope] = tuple(tf.constant(np.concatenate(v)) for v in (
                    [np.full(_width(f), f.transform == "log1p") for f in floats],
                    [_vector(f, f.mean, 0.0) for f in floats], [_vector(f, f.std, 1.0) for f in floats]))

    def string_ids(self, name: str, values) -> tf.Tensor:
        """Vocabulary ids (int32) of string feature ``name``'s ``values``."""
        return tf.cast(self.lookups[name](values), tf.int32)

    def call(self, features):
        packed = {MASK: features[MASK]}
        for scope, features_of_scope in ((CONTEXT, self.spec.context), (ITEM, self.spec.item)):
            rank = 1 if scope == CONTEXT else 2  # [B] or [B, L] before the feature's own shape
            floats = [f for f in features_of_scope if f.dtype != STRING]
            if floats:
                columns = []
                for f in floats:
                    x = tf.cast(features[f.name], tf.float32)
                    columns.append(x[..., tf.newaxis] if not f.shape else
                                   tf.reshape(x, tf.concat([tf.shape(x)[:rank], [_width(f)]], axis=0)))
                x = tf.concat(columns, axis=-1)
                log1p, mean, std = self.stats[scope]
                x = tf.where(log1p, tf.sign(x) * tf.math.log1p(tf.abs(x)), x)
                packed[f"{scope}_dense"] = tf.clip_by_value((x - mean) / std, -CLIP, CLIP)
            strings = [f for f in features_of_scope if f.dtype == STRING]
            if strings:
                packed[f"{scope}_ids"] = tf.stack(
                    [self.string_ids(f.name, features[f.name]) if features[f.name].dtype == tf.string
                     else tf.cast(features[f.name], tf.int32) for f in strings], axis=-1)
        return packed


class _Embed(tf.keras.layers.Layer):
    """``[..., S]`` vocabulary ids of S string features -> ``[..., S * dim]``: one table, each feature its own rows
    (an offset per feature), so S embeddings are one gather."""

    def __init__(self, features: list[Feature], dim: int, **kwargs):
        super().__init__(**kwargs)
        sizes = [len(f.vocabulary or ()) + 1 for f in features]  # + the out-of-vocabulary id 0
        self.offsets = tf.constant(np.cumsum([0, *sizes[:-1]]), tf.int32)
        self.embed = tf.keras.layers.Embedding(sum(sizes), dim)
        self.width = len(features) * dim

    def call(self, ids):
        vectors = self.embed(ids + self.offsets)
        return tf.reshape(vectors, tf.concat([tf.shape(ids)[:-1], [self.width]], axis=0))


def build_model(spec: FeatureSpec, hparams: HParams, name: str | None = None) -> tf.keras.Model:
    """Inputs: the :class:`Preprocessor`'s packed tensors (context ``[B, ...]``, item ``[B, L, ...]``, mask
    ``[B, L]``); output: scores ``[B, L]``. ``name``: the model's (default ``marketrank_<scorer>``)."""
    inputs, parts = {}, {}
    for scope, features in ((CONTEXT, spec.context), (ITEM, spec.item)):
        lead = () if scope == CONTEXT else (None,)
        floats = [f for f in features if f.dtype != STRING]
        strings = [f for f in features if f.dtype == STRING]
        parts[scope] = []
        if floats:
            name = f"{scope}_dense"
            inputs[name] = tf.keras.Input(shape=(*lead, sum(map(_width, floats))), dtype=tf.float32, name=name)
            parts[scope].append(inputs[name])
        if strings:
            name = f"{scope}_ids"
            inputs[name] = tf.keras.Input(shape=(*lead, len(strings)), dtype=tf.int32, name=name)
            parts[scope].append(_Embed(strings, hparams.embedding_dim, name=f"embed_{scope}")(inputs[name]))
    inputs[MASK] = mask = tf.keras.Input(shape=(None,), dtype=tf.bool, name=MASK)

    x = tf.concat(parts[ITEM], axis=-1) if len(parts[ITEM]) > 1 else parts[ITEM][0]
    if parts[CONTEXT]:
        context = tf.concat(parts[CONTEXT], axis=-1) if len(parts[CONTEXT]) > 1 else parts[CONTEXT][0]
        context = tf.tile(context[:, tf.newaxis, :], tf.stack([1, tf.shape(mask)[1], 1]))
        x = tf.concat([context, x], axis=-1)
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
    return tf.keras.Model(inputs=inputs, outputs=scores, name=name or f"marketrank_{hparams.scorer}")


class _Average(tf.keras.Model):
    """The mean of its members' scores. Subclassed: a functional model over the members would hold each
    member's input layers, and Keras rejects their shared names (the packed inputs')."""

    def __init__(self, members: list[tf.keras.Model], **kwargs):
        super().__init__(**kwargs)
        self.members = members

    def call(self, inputs, training=None):
        return tf.add_n([member(inputs, training=training) for member in self.members]) / len(self.members)

    def get_config(self):
        return {"name": self.name}


def average_scores(members: list[tf.keras.Model]) -> tf.keras.Model:
    """One model whose scores are the mean of ``members``' (same packed inputs; ``build_model`` each).

    The raw scores are averaged: members share the architecture and the loss, so their scales match (three
    members on ``default``: standardising each member's scores per list first gave test NDCG@10 0.9272, the raw
    mean 0.9274; a side experiment)."""
    return members[0] if len(members) == 1 else _Average(members, name=f"marketrank_x{len(members)}")


class InversePropensityNDCG(tf.keras.metrics.Metric):
    """NDCG@topn on logged clicks with each item's gain weighted by its sample weight (the inverse examination
    propensity) and pooled over lists: sum of DCG over sum of ideal DCG, as ``training.metrics`` computes the
    evaluation's number on logged clicks. ``tfr.keras.metrics.NDCGMetric`` averages per-list ratios of the raw
    clicks, which reward the logging order. Close to, not the same as, the evaluation's number: training scales
    the weights to mean 1 per batch (a batch's DCG and ideal alike, so batches weigh a little differently) and
    cuts lists to the spec's list size."""

    def __init__(self, topn: int = 10, name: str = "ipw_ndcg_10", **kwargs):
        super().__init__(name=name, **kwargs)
        self.topn = topn
        self.gained = self.add_weight(name="dcg", initializer="zeros", dtype=tf.float64)
        self.ideal = self.add_weight(name="ideal_dcg", initializer="zeros", dtype=tf.float64)

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = tf.cast(y_true, tf.float64)
        valid = labels >= 0  # padding is labelled -1
        weights = tf.ones_like(labels) if sample_weight is None else tf.cast(sample_weight, tf.float64)
        zeros = tf.zeros_like(labels)
        gains = tf.where(valid, (tf.pow(tf.constant(2.0, tf.float64), tf.maximum(labels, zeros)) - 1.0) * weights,
                         zeros)
        scores = tf.where(valid, tf.cast(y_pred, tf.float64), zeros + tf.constant(-np.inf, tf.float64))
        order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)[:, : self.topn]
        ranked = tf.gather(gains, order, batch_dims=1)
        best = tf.sort(gains, axis=1, direction="DESCENDING")[:, : self.topn]
        ranks = tf.range(2, tf.shape(ranked)[1] + 2)
        discount = tf.constant(np.log(2.0), tf.float64) / tf.math.log(tf.cast(ranks, tf.float64))
        self.gained.assign_add(tf.reduce_sum(ranked * discount))
        self.ideal.assign_add(tf.reduce_sum(best * discount))

    def result(self):
        return tf.math.divide_no_nan(self.gained, self.ideal)

    def reset_state(self):
        self.gained.assign(0.0)
        self.ideal.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "topn": self.topn}


def compile_model(model: tf.keras.Model, hparams: HParams, ipw: bool = False) -> tf.keras.Model:
    """``ipw``: the labels come with inverse-propensity sample weights; the loss takes them, and so does
    ``ipw_ndcg_10`` (``InversePropensityNDCG``), the training and validation curve that does not reward the
    logging order. The other metrics score the raw clicks."""
    model.compile(
        optimizer=tf.keras.optimizers.Adam(hparams.learning_rate),
        loss=LOSSES[hparams.loss](),
        metrics=[tfr.keras.metrics.NDCGMetric(topn=10, name="ndcg_10"),
                 tfr.keras.metrics.NDCGMetric(topn=5, name="ndcg_5"),
                 tfr.keras.metrics.MRRMetric(name="mrr")],
        weighted_metrics=[InversePropensityNDCG()] if ipw else [],
    )
    return model
