"""The model's two parts: the spec's preprocessing (vocabularies, log1p, normalisation) and the trained scorer,
and the export that puts them back together behind the raw-feature signature."""

from __future__ import annotations

import numpy as np
import pytest

from training.feature_spec import CONTEXT, ITEM, MASK, STRING, Feature, FeatureSpec
from training.hparams import HParams

pytestmark = pytest.mark.slow

SPEC = FeatureSpec(features=(
    Feature("surface", CONTEXT, STRING, vocabulary=("feed", "search")),
    Feature("history", CONTEXT, transform="log1p", mean=1.0, std=2.0),
    Feature("price", ITEM, transform="log1p", mean=3.0, std=0.5),
    Feature("rating", ITEM, mean=4.0, std=0.25),
    Feature("embedding", ITEM, shape=(2,), mean=(0.0, 1.0), std=(1.0, 0.1)),
    Feature("brand", ITEM, STRING, vocabulary=("acme", "zeta")),
    Feature("style", ITEM, STRING, vocabulary=("boho",)),
), list_size=3)


def _raw() -> dict[str, np.ndarray]:
    return {
        "surface": np.array([b"search", b"home"], dtype=object),
        "history": np.array([0.0, 10.0], np.float32),
        "price": np.array([[20.0, 5.0, 0.0], [-1.0, 1e6, 0.0]], np.float32),
        "rating": np.array([[4.5, 3.0, 0.0], [4.0, 5.0, 0.0]], np.float32),
        "embedding": np.arange(12, dtype=np.float32).reshape(2, 3, 2),
        "brand": np.array([[b"zeta", b"acme", b""], [b"nope", b"zeta", b""]], dtype=object),
        "style": np.array([[b"boho", b"boho", b""], [b"x", b"boho", b""]], dtype=object),
        MASK: np.array([[True, True, False], [True, True, False]]),
    }


def _log1p(x):
    return np.sign(x) * np.log1p(np.abs(x))


def test_preprocessor_applies_the_specs_vocabularies_and_statistics():
    import tensorflow as tf

    from training.model import CLIP, Preprocessor

    raw = _raw()
    packed = {k: v.numpy() for k, v in Preprocessor(SPEC)({k: tf.constant(v) for k, v in raw.items()}).items()}
    assert set(packed) == {"context_dense", "context_ids", "item_dense", "item_ids", MASK}
    np.testing.assert_array_equal(packed["context_ids"], [[2], [0]])  # "home" is out of vocabulary: 0
    np.testing.assert_allclose(packed["context_dense"][:, 0], (_log1p(raw["history"]) - 1.0) / 2.0, rtol=1e-6)
    dense = packed["item_dense"]
    assert dense.shape == (2, 3, 4)  # price, rating, the two embedding values
    np.testing.assert_allclose(dense[..., 0], np.clip((_log1p(raw["price"]) - 3.0) / 0.5, -CLIP, CLIP), rtol=1e-5)
    assert dense[1, 1, 0] == CLIP  # a million is clipped
    np.testing.assert_allclose(dense[..., 1], np.clip((raw["rating"] - 4.0) / 0.25, -CLIP, CLIP), rtol=1e-6)
    np.testing.assert_allclose(dense[..., 2:], np.clip((raw["embedding"] - [0.0, 1.0]) / [1.0, 0.1], -CLIP, CLIP),
                               rtol=1e-5)
    np.testing.assert_array_equal(packed["item_ids"], [[[2, 1], [1, 1], [0, 0]], [[0, 0], [2, 1], [0, 0]]])


def test_string_ids_may_arrive_looked_up_already():
    """Data held in memory converts each distinct string once (``data.Coded``); the result is the same."""
    import tensorflow as tf

    from training.data import Coded
    from training.model import Preprocessor

    preprocessor, raw = Preprocessor(SPEC), _raw()
    looked_up = dict(raw)
    for name in ("surface", "brand", "style"):
        looked_up[name] = Coded.of(raw[name]).map(lambda v, n=name: preprocessor.string_ids(n, tf.constant(v)))
    expected, got = (preprocessor({k: tf.constant(v) for k, v in r.items()}) for r in (raw, looked_up))
    for name in expected:
        np.testing.assert_array_equal(got[name].numpy(), expected[name].numpy(), err_msg=name)


def test_missing_strings_are_out_of_vocabulary():
    from training.data import Coded

    coded = Coded.of(np.array([["acme", None], [float("nan"), "acme"]], dtype=object))
    strings = coded.map(lambda values: values)
    np.testing.assert_array_equal(strings, [["acme", ""], ["", "acme"]])
    assert coded[1:].shape == (1, 2)


@pytest.mark.parametrize("scorer", ["dnn", "din"])
def test_export_scores_raw_features_as_the_trained_model_does(tmp_path, scorer):
    """The SavedModel's signature takes raw features; its scores are the Keras model's on the preprocessed ones,
    with padding at PAD_SCORE."""
    import tensorflow as tf

    from training import export
    from training.model import Preprocessor, build_model

    model = build_model(SPEC, HParams(scorer=scorer, hidden=(8,), attention_head_size=4))
    raw = {k: tf.constant(v) for k, v in _raw().items()}
    expected = model(Preprocessor(SPEC)(raw), training=False).numpy()
    loaded = tf.saved_model.load(str(export.export_saved_model(model, SPEC, tmp_path, version=1)))
    scores = loaded.signatures[export.SIGNATURE](**raw)[export.OUTPUT].numpy()
    mask = _raw()[MASK]
    np.testing.assert_allclose(scores[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert (scores[~mask] == export.PAD_SCORE).all()
    assert len(set(np.round(scores[mask], 5))) > 1  # a real model, not a constant


def test_each_string_feature_has_its_own_embedding_rows():
    import tensorflow as tf

    from training.model import _Embed

    features = [f for f in SPEC.item if f.dtype == STRING]  # brand (2 values + OOV), style (1 value + OOV)
    embed = _Embed(features, 4)
    vectors = embed(tf.constant([[[1, 1], [0, 0]]])).numpy()
    assert vectors.shape == (1, 2, 8) and embed.embed.input_dim == 3 + 2
    table = embed.embed.embeddings.numpy()
    np.testing.assert_array_equal(vectors[0, 0], np.concatenate([table[1], table[3 + 1]]))
    np.testing.assert_array_equal(vectors[0, 1], np.concatenate([table[0], table[3]]))


@pytest.mark.parametrize("string_codes", [False, True])
def test_missing_strings_in_the_data_read_as_empty(string_codes):
    """A null string in the Parquet data is "" (out of vocabulary) on both paths, not None (which tf.data
    cannot take)."""
    import pyarrow as pa

    from training.data import Coded, batch_to_arrays

    spec = FeatureSpec(features=(Feature("surface", CONTEXT, STRING, vocabulary=("feed",)),
                                 Feature("brand", ITEM, STRING, vocabulary=("acme",))), list_size=3)
    table = pa.table({"surface": ["feed", None], "brand": [["acme", None], [None]], "label": [[1.0, 0.0], [0.0]]})
    arrays = batch_to_arrays(table, spec, list_size=3, string_codes=string_codes)
    brand = arrays["brand"].strings() if string_codes else arrays["brand"]
    assert isinstance(arrays["brand"], Coded) == string_codes
    np.testing.assert_array_equal(brand, [["acme", "", ""], ["", "", ""]])
    np.testing.assert_array_equal(arrays["surface"], ["feed", ""])
    np.testing.assert_array_equal(arrays[MASK], [[True, True, False], [True, False, False]])


def test_inverse_propensity_ndcg_metric_is_the_evaluations_pooled_ndcg():
    """The Keras curve (``val_ipw_ndcg_10``) must be the number ``training.evaluate`` reports on logged clicks,
    summed over batches: weighted DCG over weighted ideal DCG, padding (-1) and clickless lists ignored."""
    from training import metrics
    from training.model import InversePropensityNDCG

    rng = np.random.default_rng(1)
    labels = np.where(rng.random((8, 15)) < 0.2, rng.integers(1, 5, (8, 15)), 0).astype(np.float32)
    labels[:, 12:] = -1.0
    labels[3] = np.where(labels[3] >= 0, 0.0, -1.0)  # a list without a click
    scores = rng.normal(size=(8, 15)).astype(np.float32)
    weights = rng.uniform(1.0, 5.0, (8, 15)).astype(np.float32)
    metric = InversePropensityNDCG()
    metric.update_state(labels[:4], scores[:4], weights[:4])
    metric.update_state(labels[4:], scores[4:], weights[4:])
    per_list = metrics.per_list_metrics(scores.astype(np.float64), labels.astype(np.float64), weights)
    expected = np.nanmean(metrics.pooled(per_list)["ndcg@10"])
    assert float(metric.result()) == pytest.approx(expected, rel=1e-9)
    raw = float(np.nanmean(metrics.ndcg(scores, labels, 10)))
    assert abs(float(metric.result()) - raw) > 0.01  # the weights matter: this is not tfr's per-list NDCG
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_inverse_propensity_ndcg_gets_the_sample_weights_through_keras():
    """Through ``compile(weighted_metrics=...)`` and ``evaluate``, with ties and lists shorter than the cut-off:
    the same number as ``metrics.pooled``; the same metric compiled unweighted reads differently."""
    import tensorflow as tf
    import tensorflow_ranking as tfr

    from training import metrics
    from training.model import InversePropensityNDCG

    rng = np.random.default_rng(4)
    labels = np.where(rng.random((6, 7)) < 0.3, rng.integers(1, 3, (6, 7)), 0).astype(np.float32)
    labels[:, 5:] = -1.0
    scores = rng.integers(0, 3, (6, 7)).astype(np.float32)  # many ties
    weights = np.where(labels >= 0, rng.uniform(1.0, 6.0, (6, 7)), 0.0).astype(np.float32)
    inputs = tf.keras.Input(shape=(7,))
    model = tf.keras.Model(inputs, tf.keras.layers.Lambda(lambda x: x)(inputs))
    model.compile(loss=tfr.keras.losses.SoftmaxLoss(), weighted_metrics=[InversePropensityNDCG()],
                  metrics=[InversePropensityNDCG(name="raw")])
    got = model.evaluate(scores, labels, sample_weight=weights, batch_size=6, verbose=0, return_dict=True)
    per_list = metrics.per_list_metrics(scores.astype(np.float64), labels.astype(np.float64), weights)
    assert got["ipw_ndcg_10"] == pytest.approx(np.nanmean(metrics.pooled(per_list)["ndcg@10"]), rel=1e-6)
    assert abs(got["raw"] - got["ipw_ndcg_10"]) > 1e-3
