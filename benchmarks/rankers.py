"""The rankers a benchmark compares, each trained on a :class:`~benchmarks.datasets.Dataset` and returning a
scorer: padded test batch -> scores [B, L]. TF-Ranking goes through ``training.train`` (the shipped code path);
LambdaMART is LightGBM's ``lambdarank`` on the same features, one row per item.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.datasets import Dataset, feature_columns, item_matrix
from training.evaluate import CLUSTER_COLUMN
from training.feature_spec import MASK

Scorer = Callable[[dict[str, Any]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LambdaMartParams:
    """Common LightGBM ranking settings. A small grid (leaves 15-255, min_data_in_leaf 20-200, learning rate
    0.03-0.1) scored on the validation split's true relevance changed validation NDCG@10 by less than 0.02 on
    the default data, so none is singled out; early stopping watches the validation split only."""

    #: "lambdarank" (LambdaMART) or "rank_xendcg" (LightGBM's cross-entropy NDCG surrogate).
    objective: str = "lambdarank"
    num_leaves: int = 31
    learning_rate: float = 0.05
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_rounds: int = 2000
    early_stopping_rounds: int = 50
    #: Weight each clicked item by its inverse examination propensity (the spec's eta), as the TF models' listwise
    #: softmax does (it weights the labels, so an unclicked item's weight has no effect there either).
    ipw: bool = False
    #: LightGBM's own position debiasing (``Dataset(position=...)``: Unbiased LambdaMART learns a bias factor per
    #: logged position alongside the trees), instead of weights from the randomised bucket's estimate.
    position_debiasing: bool = False
    seed: int = 42


#: Columns appended to a batch's ``item_matrix`` rows (one row per real item), e.g. the simulator's latents.
ExtraColumns = Callable[[dict[str, Any]], np.ndarray]


def _rows(batch: dict[str, Any], spec, extra: ExtraColumns | None) -> tuple[np.ndarray, np.ndarray]:
    x, group = item_matrix(batch, spec)
    return (np.column_stack([x, extra(batch).astype(np.float32)]) if extra else x), group  # float32 as x


def _matrices(dataset: Dataset, split: str, eta: float, label: str | None = None, extra: ExtraColumns | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows, group sizes, labels, IPW weights (``eta`` > 0) and logged positions (None without them).

    LightGBM multiplies each item's lambda gradient by its weight, so the inverse propensity goes on the clicked
    items only (unclicked ones weigh 1): weighting every item, as before, scaled the push-down of unclicked items
    deep in the list by up to the clip (20x), which is not what IPW corrects."""
    from training.propensity import propensity_weights

    xs, groups, labels, positions = [], [], [], []
    for batch in dataset.batches(split)():
        x, group = _rows(batch, dataset.spec, extra)
        mask = batch[MASK]
        xs.append(x)
        groups.append(group)
        labels.append(batch[label or dataset.spec.label][mask])
        if dataset.spec.position:
            positions.append(np.asarray(batch[dataset.spec.position])[mask].astype(np.int32))
    labels_all = np.concatenate(labels)
    position = np.concatenate(positions) if positions else None
    weight = None
    if eta > 0 and position is not None:
        weight = np.where(labels_all > 0, propensity_weights(position, eta, np.ones(position.shape, bool)), 1.0)
    return np.concatenate(xs), np.concatenate(groups), labels_all, weight, position


def _lightgbm_config(params: LambdaMartParams, threads: int, max_label: float) -> dict[str, Any]:
    # label_gain: LightGBM's default 2**i - 1 is the gain the NDCG here uses; it must cover the largest grade.
    return {"objective": params.objective, "metric": "ndcg", "eval_at": [10], "num_leaves": params.num_leaves,
            "learning_rate": params.learning_rate, "min_data_in_leaf": params.min_data_in_leaf,
            "feature_fraction": params.feature_fraction, "bagging_fraction": params.bagging_fraction,
            "bagging_freq": 1, "lambda_l2": params.lambda_l2, "seed": params.seed, "verbosity": -1,
            "num_threads": threads, "deterministic": True, "force_row_wise": True,
            "label_gain": [2.0**i - 1 for i in range(int(max_label) + 1)]}


def ipw_ndcg_at_10(group: np.ndarray, label: np.ndarray, position: np.ndarray, eta: float):
    """A LightGBM ``feval``: the validation split's inverse-propensity NDCG@10 on the logged label, pooled over
    lists (``training.metrics``, what the evaluation reports on logged clicks), for early stopping without
    rewarding the logging order. LightGBM's own NDCG would take the raw clicks (or one weight per list)."""
    from training import metrics
    from training.propensity import propensity_weights

    lists, width = len(group), int(group.max())
    rows = np.repeat(np.arange(lists), group)
    slots = np.arange(len(label)) - np.repeat(np.cumsum(group) - group, group)
    labels = np.full((lists, width), -1.0)
    labels[rows, slots] = label
    slot_position = np.zeros((lists, width))
    slot_position[rows, slots] = position
    weights = propensity_weights(slot_position, eta, labels >= 0)

    def feval(predictions: np.ndarray, _data) -> tuple[str, float, bool]:
        scores = np.full((lists, width), -np.inf)
        scores[rows, slots] = predictions
        gained, ideal = metrics.dcg(scores, labels, 10, weights)
        return "ipw_ndcg@10", float(gained.sum() / ideal.sum()) if ideal.sum() > 0 else 0.0, True

    return feval


def _scorer(booster, spec, extra: ExtraColumns | None = None) -> Scorer:
    """Scores [B, L] for a padded batch: the booster's prediction per real item, -1e9 on padding."""
    def score(batch: dict[str, Any]) -> np.ndarray:
        mask = batch[MASK]
        out = np.full(mask.shape, -1e9, dtype=np.float64)
        out[mask] = booster.predict(_rows(batch, spec, extra)[0], num_iteration=booster.best_iteration)
        return out

    return score


def train_lambdamart(dataset: Dataset, params: LambdaMartParams = LambdaMartParams(),
                     threads: int = 0) -> tuple[Scorer, dict[str, Any]]:
    """LightGBM LambdaMART on the logged labels, early-stopped on NDCG@10 of the validation split's labels: the
    inverse-propensity NDCG (``ipw_ndcg_at_10``) for the de-biased variants when the spec has an estimate, as the
    evaluation scores logged clicks; the raw clicks' NDCG for the naive one."""
    import lightgbm as lgb

    eta = float(dataset.spec.propensity_eta or 0.0) if params.ipw and dataset.spec.position else 0.0
    if params.ipw and eta <= 0:
        raise ValueError(f"{dataset.name}: no position-bias estimate in the feature spec, so no IPW LambdaMART")
    if params.position_debiasing and not dataset.spec.position:
        raise ValueError(f"{dataset.name}: no logged positions, so no position-debiased LambdaMART")
    names, categorical = feature_columns(dataset.spec)
    x, group, label, weight, position = _matrices(dataset, "train", eta)
    vx, vgroup, vlabel, _, vposition = _matrices(dataset, "valid", 0.0)
    train_set = lgb.Dataset(x, label, group=group, weight=weight, feature_name=names,
                            categorical_feature=categorical, free_raw_data=True,
                            position=position if params.position_debiasing else None)
    valid_set = lgb.Dataset(vx, vlabel, group=vgroup, reference=train_set)
    config = _lightgbm_config(params, threads, max(label.max(), vlabel.max()))
    stop_eta = float(dataset.spec.propensity_eta or 0.0) if (params.ipw or params.position_debiasing) else 0.0
    feval = None
    if stop_eta > 0 and vposition is not None:
        config["metric"], feval = "None", ipw_ndcg_at_10(vgroup, vlabel, vposition, stop_eta)
    start = time.perf_counter()
    booster = lgb.train(config, train_set, num_boost_round=params.max_rounds, valid_sets=[valid_set],
                        valid_names=["valid"], feval=feval,
                        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)])
    seconds = time.perf_counter() - start
    stopped_on = "ipw_ndcg@10" if feval else "ndcg@10"
    info = {"params": dataclasses.asdict(params), "ipw_eta": eta, "ipw_on": "clicked items" if eta else None,
            "best_iteration": booster.best_iteration, "early_stopping": f"validation {stopped_on} of the logged label",
            "valid_ndcg@10_logged": booster.best_score["valid"][stopped_on], "train_seconds": seconds,
            "train_items": int(label.size)}
    return _scorer(booster, dataset.spec), info


def train_feature_ceiling(dataset: Dataset, params: LambdaMartParams = LambdaMartParams(),
                          threads: int = 0, extra: tuple[list[str], ExtraColumns] | None = None
                          ) -> tuple[Scorer, dict[str, Any]]:
    """A reference, not a contender: LambdaMART trained on the training split's *evaluation label* (the
    simulator's true relevance), early-stopped on the validation split's. No production model sees that label,
    so its test NDCG@10 estimates how much of the oracle the features can carry at all, whatever the learner and
    however clean the clicks. ``extra``: (names, columns) added to the features (``taste_columns``)."""
    import lightgbm as lgb

    spec = dataset.spec
    if not spec.eval_label or spec.eval_label == spec.label:
        raise ValueError(f"{dataset.name}: the feature ceiling needs an evaluation label apart from the logged one")
    names, categorical = feature_columns(spec)
    extra_names, columns = extra if extra else ([], None)
    names = [*names, *extra_names]
    x, group, label, _, _ = _matrices(dataset, "train", 0.0, label=spec.eval_label, extra=columns)
    vx, vgroup, vlabel, _, _ = _matrices(dataset, "valid", 0.0, label=spec.eval_label, extra=columns)
    train_set = lgb.Dataset(x, label, group=group, feature_name=names, categorical_feature=categorical,
                            free_raw_data=True)
    stop_set = lgb.Dataset(vx, vlabel, group=vgroup, reference=train_set)
    config = _lightgbm_config(params, threads, max(label.max(), vlabel.max()))
    start = time.perf_counter()
    booster = lgb.train(config, train_set, num_boost_round=params.max_rounds, valid_sets=[stop_set],
                        valid_names=["valid"], callbacks=[lgb.early_stopping(params.early_stopping_rounds,
                                                                             verbose=False)])
    info = {"trained_on": f"train split's {spec.eval_label} ({len(group)} lists; early-stopped on the valid "
                          f"split's)", "best_iteration": booster.best_iteration,
            "train_seconds": time.perf_counter() - start, "train_items": int(label.size)}
    if extra_names:
        info["extra_features"] = list(extra_names)
    return _scorer(booster, spec, columns), info


def taste_columns(dataset: Dataset) -> tuple[list[str], ExtraColumns]:
    """The simulator's latent terms of each item's utility for its list's user (``marketrank.simulator.Taste``:
    style preference, preferred brand, price miss, item quality), drawn again from the dataset's simulator
    config, as (names, columns) for ``train_feature_ceiling``. Needs the batches' item and user ids."""
    from marketrank.simulator import STYLES, SimConfig, Taste, taste

    if not dataset.simulator:
        raise ValueError(f"{dataset.name}: not simulated, so there is no latent taste to read")
    latent = taste(SimConfig(**dataset.simulator))

    def columns(batch: dict[str, Any]) -> np.ndarray:
        mask = batch[MASK]
        users = np.broadcast_to(np.asarray(batch[CLUSTER_COLUMN])[:, None], mask.shape)[mask]
        items = Taste.index(np.asarray(batch["item_id"])[mask])
        # The replay must be the simulation that wrote these logs (same config, same simulator code).
        if "item_style" in batch and not np.array_equal(np.array(STYLES)[latent.item_style[items]],
                                                        np.asarray(batch["item_style"])[mask].astype(str)):
            raise ValueError(f"{dataset.name}: the simulator's replayed items differ from the logged ones (logs "
                             f"simulated by other simulator code?): simulate the data again")
        return latent.parts(Taste.index(users), items)

    return list(Taste.PARTS), columns


def eval_label_callback(dataset: Dataset):
    """A Keras callback that adds ``val_true_ndcg_10`` (validation NDCG@10 on the evaluation label, e.g. the
    simulator's true relevance) to each epoch's logs, and ``eval_seconds``: its own time so far, which the
    timings leave out. Validation batches are loaded once, before training."""
    import tensorflow as tf

    from training import metrics
    from training.model import Preprocessor

    spec = dataset.spec
    preprocess = Preprocessor(spec)  # the Keras model takes the packed inputs the training pipeline feeds it
    batches = [(preprocess({n: tf.constant(b[n].astype(str) if b[n].dtype == object else b[n])
                            for n in [*spec.names, MASK]}), np.where(b[MASK], b[spec.eval_label], -1.0))
               for b in dataset.batches("valid")()]

    class EvalLabelNdcg(tf.keras.callbacks.Callback):
        seconds = 0.0

        def on_epoch_end(self, epoch, logs=None):
            begin = time.perf_counter()
            values = [metrics.ndcg(self.model(feed, training=False).numpy(), labels, 10) for feed, labels in batches]
            self.seconds += time.perf_counter() - begin
            if logs is not None:
                logs.update(val_true_ndcg_10=float(np.nanmean(np.concatenate(values))), eval_seconds=self.seconds)

    return EvalLabelNdcg()


def train_tfranking(dataset: Dataset, hparams, out_dir: Path, progress: Callable[[int, dict], None] | None = None,
                    eval_label_curve: bool = False) -> tuple[Scorer, dict[str, Any]]:
    """``training.train.train`` (no MLflow), then the exported SavedModel as the scorer, as serving runs it.

    ``info["epochs"]`` records each epoch's end (seconds of fit since it started) and validation metrics; with
    ``eval_label_curve`` also validation NDCG@10 on the evaluation label, whose time is left out of the seconds.
    """
    from training.evaluate import SavedModelScorer
    from training.train import resolve_ipw_eta, train

    epochs: list[dict[str, float]] = []

    def on_epoch(epoch: int, logs: dict) -> None:
        epochs.append({"epoch": epoch, "at": time.perf_counter(), **logs})
        if progress is not None:
            progress(epoch, logs)

    callbacks = (eval_label_callback(dataset),) if eval_label_curve else ()
    result = train(dataset.train_source, dataset.valid_source, dataset.spec, hparams, out_dir / "model", None,
                   tracking_uri=None, progress=on_epoch, train_lists=dataset.train_lists, callbacks=callbacks)
    # Seconds in model.fit so far (TensorFlow's import and the model builds are left out, as is an ensemble's
    # time between its members' fits): each fit started its own seconds before its last epoch ended.
    first, done = 0, 0.0
    for count, fit_seconds in zip(result.member_epochs, result.member_seconds, strict=True):
        fit_start = epochs[first + count - 1]["at"] - fit_seconds
        for epoch in epochs[first:first + count]:
            epoch["seconds"] = done + epoch.pop("at") - fit_start - epoch.get("eval_seconds", 0.0)
        first, done = first + count, done + fit_seconds
    seconds = result.seconds - epochs[-1].get("eval_seconds", 0.0)
    info = {"hparams": dataclasses.asdict(hparams), "ipw_eta": resolve_ipw_eta(hparams, dataset.spec),
            "best_epoch": result.best_epoch, "member_best_epochs": result.member_best_epochs,
            "epochs_run": len(result.history["loss"]), "validation": result.validation,
            "train_seconds": seconds, "lists_per_second": dataset.train_lists * len(epochs) / seconds,
            "epochs": epochs, "export_dir": str(result.export_dir)}
    return SavedModelScorer(result.export_dir), info
