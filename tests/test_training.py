"""Training, export and evaluation on real artifacts (one tiny `marketrank run`, shared by the session)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from training import data, metrics
from training.feature_spec import MASK, FeatureSpec
from training.hparams import HParams
from training.train import resolve_ipw_eta

pytestmark = pytest.mark.slow


def test_run_report_has_every_ranker(tiny_run):
    report = tiny_run["report"]
    for ranker in ("challenger", "legacy", "oracle"):
        overall = report[ranker]["overall"]
        for metric in ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "map"):
            assert 0.0 <= overall[metric]["value"] <= 1.0, (ranker, metric)
        assert set(report[ranker]["per_segment"]) == {"feed", "search"}
    assert report["eval_label"] == "relevance"
    assert report["oracle"]["overall"]["ndcg@10"]["value"] == pytest.approx(1.0)
    assert (tiny_run["home"] / "runs" / "latest").resolve() == tiny_run["report_path"].parent.resolve()
    assert "Offline quality" in tiny_run["output"] or "ndcg@10" in tiny_run["output"]


def test_short_training_beats_random_and_legacy(tiny_run):
    features = tiny_run["features"]
    spec = FeatureSpec.load(features / "train")
    rng = np.random.default_rng(0)
    random_ndcg = []
    for batch in data.iter_batches(features / "test", spec, 256, list_size=None, columns_extra=("relevance",)):
        labels = np.where(batch[MASK], batch["relevance"], -1.0)
        random_ndcg.append(metrics.ndcg(rng.random(labels.shape), labels, 10))
    random_ndcg = float(np.nanmean(np.concatenate(random_ndcg)))
    challenger = tiny_run["report"]["challenger"]["overall"]["ndcg@10"]["value"]
    legacy = tiny_run["report"]["legacy"]["overall"]["ndcg@10"]["value"]
    assert challenger > random_ndcg + 0.1, (challenger, random_ndcg)
    assert challenger > legacy + 0.1, (challenger, legacy)


def test_export_is_tf_serving_layout(tiny_run):
    version_dir = tiny_run["export_dir"]
    assert version_dir.name.isdigit() and version_dir.parent.name == "marketrank"
    assert (version_dir / "saved_model.pb").exists()
    assert (version_dir / "variables").is_dir()
    spec = FeatureSpec.load(version_dir / "assets" / "feature_spec.json")
    assert spec == FeatureSpec.load(tiny_run["features"])


PLAIN_TF_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    path = sys.argv[1]
    spec = json.load(open(path + "/assets/feature_spec.json"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    items = 3
    feed = {}
    for f in spec["features"]:
        string = f["dtype"] == "string"
        value = (f["vocabulary"] or ["?"])[0] if string else 1.0
        shape = [1] if f["scope"] == "context" else [1, items + 1]
        feed[f["name"]] = tf.constant(np.full(shape, value, dtype=object if string else np.float32))
    feed["views"] = tf.constant([[500.0, 3.0, 50.0, 0.0]])
    feed["mask"] = tf.constant([[True, True, True, False]])
    out = serve(**feed)
    scores = out["scores"].numpy()
    swapped = dict(feed, views=tf.constant([[3.0, 500.0, 50.0, 0.0]]))
    swapped_scores = serve(**swapped)["scores"].numpy()
    print(json.dumps({"outputs": list(out), "scores": scores.tolist(), "swapped": swapped_scores.tolist(),
                      "inputs": sorted(serve.structured_input_signature[1]),
                      "project_imported": any(m.split(".")[0] in ("training", "serving", "marketrank")
                                              for m in sys.modules)}))
""")


def test_export_loads_and_scores_with_plain_tensorflow(tiny_run, tmp_path):
    script = tmp_path / "plain_tf.py"
    script.write_text(PLAIN_TF_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tiny_run["export_dir"])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    spec = FeatureSpec.load(tiny_run["features"])
    assert result["outputs"] == ["scores"]
    assert result["inputs"] == sorted([*spec.names, "mask"])
    assert not result["project_imported"]
    scores, swapped = np.array(result["scores"][0]), np.array(result["swapped"][0])
    assert np.isfinite(scores[:3]).all()
    assert abs(scores[0] - scores[1]) > 1e-4  # the two items score differently, so the swap below means something
    assert scores[3] == pytest.approx(-1e9)  # the padded slot can never be ranked first
    # Items are scored independently of their slot: swapping two items' features swaps their scores.
    assert scores[0] == pytest.approx(swapped[1], rel=1e-4, abs=1e-4)
    assert scores[1] == pytest.approx(swapped[0], rel=1e-4, abs=1e-4)


def test_evaluation_json_has_sagemaker_model_metrics_shape(tiny_run):
    evaluation = json.loads(Path(tiny_run["report"]["evaluation"]).read_text())
    assert set(evaluation["ranking_metrics"]["ndcg@10"]) >= {"value", "standard_deviation"}
    assert evaluation["comparison"]["ci_low"] == 1.0  # no champion: the lift condition passes by definition
    logged = evaluation["logged_order_comparison"]  # the gate's third check: better than what users were shown
    assert logged["resampled_by"] == "user_id" and logged["ci_low"] <= logged["mean_diff"] <= logged["ci_high"]
    assert logged["mean_diff"] == pytest.approx(evaluation["ranking_metrics"]["ndcg@10"]["value"]
                                                - evaluation["baselines"]["legacy"]["overall"]["ndcg@10"]["value"])
    assert logged["ci_low"] > 0.1  # four epochs already rank far better than popularity + recency
    assert evaluation["secondary"]["label"] == "label"  # also scored on logged feedback
    assert {"legacy", "oracle"} <= set(evaluation["baselines"])


def test_mlflow_has_params_metrics_and_model(tiny_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_run['home'] / 'mlflow.db'}")
    run = client.get_run(tiny_run["report"]["training"]["mlflow_run_id"])
    assert run.data.params["scorer"] == "dnn" and run.data.params["loss"] == "softmax"
    assert "val_ndcg_10" in run.data.metrics and "test_ndcg_at_10" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val_ndcg_10")
    assert 1 <= len(history) <= 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "feature_spec.json"} <= artifacts


def test_champion_comparison_is_a_paired_bootstrap(tiny_run, tmp_path):
    from training.evaluate import evaluate

    export_dir = tiny_run["export_dir"]
    result = evaluate(export_dir, tiny_run["features"] / "test", tmp_path, champion_dir=export_dir,
                      bootstrap_resamples=200)
    comparison = result["comparison"]
    assert comparison["mean_diff"] == pytest.approx(0.0, abs=1e-9)  # same model: no difference at all
    assert comparison["ci_low"] == pytest.approx(0.0, abs=1e-9)
    assert comparison["ci_high"] == pytest.approx(0.0, abs=1e-9)
    assert json.loads((tmp_path / "evaluation.json").read_text())["champion"]["overall"]["ndcg@10"]["value"] == (
        pytest.approx(result["ranking_metrics"]["ndcg@10"]["value"]))


def test_logged_clicks_are_scored_with_inverse_propensity_ndcg(tiny_run, tmp_path):
    """On clicks the logging order looks better than it is; the weighted view must take that advantage away, and
    on real logs (the logged label is the evaluation label) it is the gate's metric, with the raw view beside.
    The tiny logs have too little randomised traffic for an estimate of eta: the simulator's 0.8 is passed."""
    from training.evaluate import evaluate

    spec = FeatureSpec.load(tiny_run["features"])
    evaluation = json.loads(Path(tiny_run["report"]["evaluation"]).read_text())
    assert spec.propensity_eta is None and "secondary_ipw" not in evaluation  # nothing to weight with
    model, test = tiny_run["export_dir"], tiny_run["features"] / "test"
    result = evaluate(model, test, tmp_path / "truth", propensity_eta=0.8, bootstrap_resamples=50)
    assert result["eval_gain_weights"] is None  # true relevance needs no weights
    raw, weighted = result["secondary"], result["secondary_ipw"]
    assert raw["gain_weights"] is None and weighted["label"] == raw["label"] == spec.label
    assert weighted["gain_weights"]["eta"] == 0.8

    def gap(view: dict) -> float:  # oracle minus legacy on NDCG@10
        rankers = view["rankers"]
        return rankers["oracle"]["overall"]["ndcg@10"]["value"] - rankers["legacy"]["overall"]["ndcg@10"]["value"]

    assert gap(weighted) > gap(raw) + 0.1, (gap(weighted), gap(raw))

    on_clicks = evaluate(model, test, tmp_path / "clicks", eval_label=spec.label, propensity_eta=0.8,
                         champion_dir=model, bootstrap_resamples=50)
    assert on_clicks["eval_gain_weights"] == weighted["gain_weights"] and "secondary_ipw" not in on_clicks
    assert on_clicks["ranking_metrics"]["ndcg@10"]["value"] == pytest.approx(
        weighted["rankers"]["challenger"]["overall"]["ndcg@10"]["value"])
    assert on_clicks["secondary"]["rankers"]["challenger"]["overall"]["ndcg@10"]["value"] == pytest.approx(
        raw["rankers"]["challenger"]["overall"]["ndcg@10"]["value"])
    assert on_clicks["comparison"]["mean_diff"] == pytest.approx(0.0, abs=1e-12)  # one weighting for both
    assert on_clicks["logged_order_comparison"]["ci_low"] > 0  # weighted clicks: the model beats the logged order
    raw_clicks = evaluate(model, test, None, eval_label=spec.label, bootstrap_resamples=50)  # no estimate at all
    assert raw_clicks["eval_gain_weights"] is None and raw_clicks["comparison"]["mean_diff"] is None
    # On raw clicks the logged order wins by construction: no comparison is made, and the note says why.
    assert raw_clicks["logged_order_comparison"]["mean_diff"] is None
    assert "propensity_eta" in raw_clicks["logged_order_comparison"]["note"]


def test_training_with_ipw_tracks_and_can_stop_on_the_weighted_click_ndcg(tiny_run, tmp_path):
    from training.train import train

    features = tiny_run["features"]
    spec = FeatureSpec.load(features / "feature_spec.json")
    hparams = HParams(epochs=2, learning_rate=0.003, ipw_eta=0.8, early_stopping="val_ipw_ndcg_10")
    result = train(features / "train", features / "valid", spec, hparams, tmp_path / "model")
    curve = result.history["val_ipw_ndcg_10"]
    assert len(curve) == len(result.history["loss"]) and all(0.0 < v <= 1.0 for v in curve)
    assert result.best_epoch == 1 + int(np.argmax(curve))  # the epoch kept is the curve's best
    assert result.validation["val_ipw_ndcg_10"] == max(curve)
    with pytest.raises(ValueError, match="val_ipw_ndcg_10 needs inverse-propensity weights"):
        HParams(ipw_eta=0.0, early_stopping="val_ipw_ndcg_10")  # refused before any work
    assert spec.propensity_eta is None  # tiny logs: no estimate, so "auto" means no weights either
    with pytest.raises(ValueError, match="val_ipw_ndcg_10 needs inverse-propensity weights"):
        train(features / "train", features / "valid", spec, HParams(epochs=1, early_stopping="val_ipw_ndcg_10"),
              tmp_path / "m2")


def test_ipw_eta_comes_from_the_spec_unless_set():
    spec = FeatureSpec(features=(), list_size=8, position="position", propensity_eta=0.8)
    assert resolve_ipw_eta(HParams(), spec) == pytest.approx(0.8)
    assert resolve_ipw_eta(HParams(ipw_eta=0.0), spec) == 0.0
    assert resolve_ipw_eta(HParams(ipw_eta=1.1), spec) == pytest.approx(1.1)
    assert resolve_ipw_eta(HParams(), FeatureSpec(features=(), list_size=8)) == 0.0


def test_bad_hparams_name_the_field():
    with pytest.raises(ValueError, match="scorer"):
        HParams(scorer="gbdt")
    with pytest.raises(ValueError, match="loss"):
        HParams(loss="hinge")


def test_several_hosts_without_tf_config_fail_fast(monkeypatch):
    """A multi-instance SageMaker job (SM_HOSTS) without a cluster spec would train N independent copies."""
    from training.train import choose_strategy

    monkeypatch.setenv("SM_HOSTS", '["algo-1", "algo-2"]')
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="2 hosts.*one instance"):
        choose_strategy()
    monkeypatch.setenv("SM_HOSTS", '["algo-1"]')
    import tensorflow as tf

    assert choose_strategy() is tf.distribute.get_strategy()  # one host: the default strategy


def test_unreachable_tracking_server_leaves_training_untracked(caplog, monkeypatch):
    """A stopped SageMaker MLflow server (the pipeline's default) must not fail the training job."""
    from training.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's backoff would wait ~4 minutes
    with caplog.at_level("WARNING", logger="marketrank.tracking"):
        assert Tracker.start("http://127.0.0.1:9", "marketrank") is None  # nothing listens on port 9
    assert "training continues untracked" in caplog.text and "127.0.0.1:9" in caplog.text


def test_an_unwritable_artifact_store_costs_the_run_its_artifacts_not_the_model(tmp_path, caplog):
    """On SageMaker the MLflow client uploads artifacts to S3 itself: a store it cannot write (permissions) must
    leave the run without them, not fail the training job after the model is trained."""
    from training.tracking import Tracker

    (tmp_path / "blocker").write_text("a file where the artifact store's directory should be")
    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "marketrank",
                            artifact_location=f"file://{tmp_path / 'blocker' / 'artifacts'}")
    assert tracker is not None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"model")
    with caplog.at_level("WARNING", logger="marketrank.tracking"):
        tracker.artifacts(tmp_path / "model", "model")
        tracker.json({"features": []}, "feature_spec.json")
    assert caplog.text.count("not logged") == 2 and tracker.run_id in caplog.text
    tracker.metrics({"ndcg": 0.5})  # the run itself is still tracked
    assert tracker.client.get_run(tracker.run_id).data.metrics["ndcg"] == 0.5


def test_ensemble_scores_are_the_mean_of_its_members():
    import tensorflow as tf

    from training.feature_spec import ITEM, STRING, Feature
    from training.model import average_scores, build_model

    spec = FeatureSpec(features=(Feature("price", ITEM), Feature("style", ITEM, STRING, vocabulary=("a", "b"))),
                       list_size=4)
    hparams = HParams(hidden=(8,), dropout=0.0)
    members = []
    for seed in (1, 2):
        tf.keras.utils.set_random_seed(seed)
        members.append(build_model(spec, hparams, name=f"member_{seed}"))
    rng = np.random.default_rng(0)
    packed = {"item_dense": tf.constant(rng.normal(size=(3, 4, 1)), tf.float32),
              "item_ids": tf.constant(rng.integers(0, 3, size=(3, 4, 1)), tf.int32),
              MASK: tf.ones((3, 4), tf.bool)}
    scores = [member(packed).numpy() for member in members]
    assert not np.allclose(scores[0], scores[1])  # two initialisations: two different rankers
    np.testing.assert_allclose(average_scores(members)(packed).numpy(), (scores[0] + scores[1]) / 2, rtol=1e-6)
    assert average_scores(members[:1]) is members[0]
    with pytest.raises(ValueError, match="ensemble"):
        HParams(ensemble=0)


def test_ensemble_trains_each_member_and_exports_one_model(tiny_run, tmp_path, caplog):
    from training.evaluate import evaluate
    from training.train import train

    features = tiny_run["features"]
    spec = FeatureSpec.load(features / "feature_spec.json")
    hparams = HParams(ensemble=2, epochs=2, learning_rate=0.003)
    with caplog.at_level("INFO", logger="marketrank.train"):
        result = train(features / "train", features / "valid", spec, hparams, tmp_path / "model")
    assert len(result.member_best_epochs) == 2 and all(1 <= e <= 2 for e in result.member_best_epochs)
    assert 2 <= len(result.history["loss"]) <= 4  # both members' epochs, one after the other
    assert "ensemble member 2 of 2 (seed 43)" in caplog.text and "ensemble of 2:" in caplog.text
    # The epochs log as one sequence (what SageMaker's metric regexes and MLflow's steps read).
    assert f"epoch {len(result.history['loss'])} " in caplog.text
    assert 0.0 < result.validation["val_ndcg_10"] <= 1.0
    # the exported ensemble serves as one SavedModel; against another champion (the tiny run's single model) the
    # comparison is paired over the same lists: the mean difference is exactly the two models' NDCG gap
    report = evaluate(result.export_dir, features / "test", tmp_path / "eval", champion_dir=tiny_run["export_dir"],
                      bootstrap_resamples=200)
    ndcg = report["ranking_metrics"]["ndcg@10"]["value"]
    assert 0.0 < ndcg <= 1.0
    champion = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["champion"]["overall"]["ndcg@10"]
    comparison = report["comparison"]
    assert comparison["mean_diff"] == pytest.approx(ndcg - champion["value"], abs=1e-9)
    assert comparison["mean_diff"] != 0.0 and comparison["ci_low"] < comparison["ci_high"]
    assert comparison["ci_low"] <= comparison["mean_diff"] <= comparison["ci_high"]
    # users, not lists, are resampled: a user's lists are alike
    assert comparison["resampled_by"] == "user_id" and 1 < comparison["clusters"] < comparison["lists"]
    # ... and holds both members' weights: twice the weight matrices (embeddings, dense kernels) of the tiny run's
    # single model.
    assert len(_matrices(result.export_dir)) == 2 * len(_matrices(tiny_run["export_dir"])) > 0


def _matrices(export_dir: Path) -> list[str]:
    """The model's 2-D weights in a SavedModel's checkpoint (not the optimizer's slots or the metrics')."""
    import tensorflow as tf

    return [name for name, shape in tf.train.list_variables(str(Path(export_dir) / "variables" / "variables"))
            if len(shape) == 2 and not any(part in name.lower() for part in ("optimizer", "metrics"))]
