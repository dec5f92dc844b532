"""Training entry point, SageMaker script mode: ``python train.py --scorer dnn --loss softmax ...``.

Channels come from ``SM_CHANNEL_TRAIN`` / ``SM_CHANNEL_VALIDATION`` (feature-job splits, each carrying
``feature_spec.json``), the export goes to ``SM_MODEL_DIR`` in TF Serving's layout, and ``training.json``
(history, MLflow run) to ``SM_OUTPUT_DATA_DIR``. Locally the same script runs with those variables (or flags)
pointed at local directories. ``--letor DIR`` trains on a LETOR/SVMlight dataset instead (``train.txt``,
``vali.txt``, ``test.txt``) and also evaluates the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by SageMaker: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import letor
from training.feature_spec import ITEM, MASK, Feature, FeatureSpec
from training.tracking import Tracker

log = logging.getLogger("marketrank.train")
LETOR_FEATURE = "features"
#: Early-stopping signal -> (Keras log key, mode). The validation loss is weighted like training (IPW), so on
#: position-biased clicks it tracks true relevance more smoothly than NDCG@10 of the sparse clicks does.
EARLY_STOPPING = {"val_loss": ("val_loss", "min"), "val_ndcg_10": ("val_ndcg_10", "max"),
                  "val_ipw_ndcg_10": ("val_ipw_ndcg_10", "max")}
#: Lists longer than this are sampled down for LETOR training (evaluation always uses whole lists).
LETOR_TRAIN_LIST_SIZE = 200
#: What a SageMaker training job reads from this script's log (its MetricDefinitions): the Keras log key of
#: each metric shown in Studio and Experiments, per epoch. ``epoch_line`` writes the lines they match.
LOGGED_METRICS = ("loss", "ndcg_10", "mrr", "val_loss", "val_ndcg_10", "val_mrr", "ipw_ndcg_10", "val_ipw_ndcg_10")


def epoch_line(epoch: int, logs: dict[str, float]) -> str:
    """The per-epoch log line: ``epoch 3 loss=0.1234 ... val_ndcg_10=0.8123`` (keys sorted, 4 decimals)."""
    return f"epoch {epoch} " + " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()))


def metric_patterns() -> dict[str, str]:
    """``LOGGED_METRICS`` as SageMaker metric regexes over ``epoch_line``: a key is preceded by a space, so
    ``ndcg_10`` does not match inside ``val_ndcg_10``."""
    return {key: rf"epoch \d+ (?:.* )?{key}=(-?[0-9]+\.[0-9]+)" for key in LOGGED_METRICS}


@dataclasses.dataclass
class TrainResult:
    export_dir: Path
    #: Keras' per-epoch logs; an ensemble's members one after the other.
    history: dict[str, list[float]]
    #: The (first member's) epoch whose weights were kept, from 1.
    best_epoch: int
    seconds: float
    examples_per_second: float
    mlflow_run_id: str | None
    #: The exported model's validation metrics (``val_ndcg_10``, ...): the best epoch's, or the ensemble's.
    validation: dict[str, float] = dataclasses.field(default_factory=dict)
    member_best_epochs: list[int] = dataclasses.field(default_factory=list)
    #: Each member's epochs run and seconds of ``fit`` (they add up to ``seconds``).
    member_epochs: list[int] = dataclasses.field(default_factory=list)
    member_seconds: list[float] = dataclasses.field(default_factory=list)


def _best_epoch(history: dict[str, list[float]], hparams) -> int:
    key, mode = EARLY_STOPPING[hparams.early_stopping]
    pick = max if mode == "max" else min
    return int(pick(range(len(history[key])), key=history[key].__getitem__)) + 1


def _fit(model, train_ds, valid_ds, hparams, callbacks: list) -> tuple[dict[str, list[float]], float]:
    """``model.fit`` with early stopping on ``hparams.early_stopping``, the best epoch's weights restored;
    (history, seconds of fit)."""
    import tensorflow as tf

    monitor, mode = EARLY_STOPPING[hparams.early_stopping]
    stopper = tf.keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=hparams.patience,
                                               restore_best_weights=True)
    start = time.perf_counter()
    fit = model.fit(train_ds, validation_data=valid_ds, epochs=hparams.epochs, verbose=0,
                    callbacks=[*callbacks, stopper, tf.keras.callbacks.TerminateOnNaN()])
    if stopper.stopped_epoch == 0 and stopper.best_weights is not None:
        model.set_weights(stopper.best_weights)  # Keras restores them only when it stopped early
    seconds = time.perf_counter() - start
    history = {k: [float(x) for x in v] for k, v in fit.history.items()}
    if not history.get("val_ndcg_10"):
        raise RuntimeError("training produced no epoch: is the training split empty?")
    return history, seconds


def choose_strategy():
    """One device, all local GPUs (MirroredStrategy), or several hosts (MultiWorkerMirroredStrategy) when the
    launcher describes the cluster in ``TF_CONFIG``. SageMaker's ModelTrainer lists the hosts in ``SM_HOSTS`` but
    sets no ``TF_CONFIG``: each host would then train its own copy on all the data, so that fails here."""
    import tensorflow as tf

    hosts = json.loads(os.environ.get("SM_HOSTS", "[]") or "[]")
    if len(hosts) > 1:
        if not os.environ.get("TF_CONFIG"):
            raise RuntimeError(f"SM_HOSTS lists {len(hosts)} hosts but TF_CONFIG is not set, so each host would "
                               "train its own copy: run the training job on one instance (as the pipeline's Train "
                               "step does) or launch it with a TF_CONFIG")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def letor_spec(stats: letor.LetorStats, list_size: int) -> FeatureSpec:
    feature = Feature(LETOR_FEATURE, ITEM, shape=(stats.num_features,), transform="log1p",
                      mean=tuple(stats.mean), std=tuple(stats.std), description=f"LETOR features of {stats.path}")
    return FeatureSpec(features=(feature,), list_size=list_size, label="label", eval_label="label",
                       source="letor")


def letor_batches(path: Path, spec: FeatureSpec, batch_size: int, list_size: int | None,
                  seed: int | None = None) -> Callable[[], Iterator[dict[str, Any]]]:
    """A re-iterable batch source over a LETOR file, keyed like the Parquet batches."""
    num_features = spec[LETOR_FEATURE].shape[0]

    sizes: list[int] = []

    def batches():
        if list_size is None and not sizes:
            sizes.append(letor.scan_letor(path).max_list_size)
        size = list_size or sizes[0]
        for batch in letor.iter_letor_batches(path, num_features, size, batch_size, transform="none",
                                              shuffle_docs_seed=seed):
            yield {LETOR_FEATURE: batch["features"], "label": batch["label"], MASK: batch["mask"],
                   "qid": batch["qid"]}

    return batches


class _EpochLogger:
    """Keras callback body: per-epoch metrics to the log, MLflow and an optional progress hook. An ensemble's
    members count their epochs on from the previous member's last (``offset``), so the log, MLflow's steps and
    SageMaker's metric series stay one increasing sequence."""

    def __init__(self, tracker, progress: Callable[[int, dict], None] | None):
        import tensorflow as tf

        outer = self

        class Callback(tf.keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = {k: float(v) for k, v in (logs or {}).items()}
                step = outer.offset + epoch + 1
                log.info("%s", epoch_line(step, logs))
                if outer.tracker is not None:
                    outer.tracker.metrics(logs, step=step)
                if outer.progress is not None:
                    outer.progress(step, logs)

        self.tracker, self.progress, self.callback, self.offset = tracker, progress, Callback(), 0


def in_memory(hparams, spec: FeatureSpec, *sources) -> bool:
    """Whether the data goes in memory: every source is a split dir (batch callables, e.g. LETOR files, have no
    size to check and stream) and their estimated size fits ``hparams.data_cache_mb``."""
    from training import data

    budget = data_budget_mb(hparams)
    if budget <= 0 or any(callable(s) for s in sources):
        return False
    needed = sum(data.estimated_bytes(s, spec) for s in sources)
    if needed > budget * 2**20:
        log.info("data ~%.0f MiB > data_cache_mb=%d: streamed from Parquet every epoch", needed / 2**20, budget)
        return False
    return True


def data_budget_mb(hparams) -> int:
    """``hparams.data_cache_mb``, or the default budget when it is None (``memory_budget_mb``)."""
    return memory_budget_mb() if hparams.data_cache_mb is None else hparams.data_cache_mb


#: cgroup v2 / v1 files holding a container's memory limit ("max" or a huge number: none).
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_budget_mb(share: float = 0.2) -> int:
    """``share`` of the memory this process may use: the machine's RAM, or a container's cgroup limit when lower
    (a SageMaker training container sees its instance's memory; a laptop's Docker may see less)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(share * total / 2**20)


def batch_source(src, spec: FeatureSpec, hparams, *, shuffle: bool, columns_extra: tuple[str, ...] = (),
                 whole: bool = False) -> Callable[[], Iterator[dict[str, Any]]]:
    """What ``data.make_dataset`` takes for one split: a batch callable as it is; a split dir read whole (``whole``:
    the in-memory path, which reshuffles in TensorFlow) or streamed, in a new order on every call when ``shuffle``
    (tf.data calls the generator once per epoch, and each call takes the next seed: seed, seed + 1, ..., so a
    re-run repeats the same orders)."""
    from training import data

    if callable(src):
        return src
    if whole:
        return data.loading_batches(src, spec, columns_extra=columns_extra)
    epochs = itertools.count()
    return lambda: data.iter_batches(src, spec, hparams.batch_size, list_size=spec.list_size, shuffle=shuffle,
                                     seed=hparams.seed + next(epochs), columns_extra=columns_extra)


def train(train_source, valid_source, spec: FeatureSpec, hparams, model_dir: str | Path,
          output_dir: str | Path | None = None, *, model_name: str = "marketrank", version: int | None = None,
          tracking_uri: str | None = None, experiment: str = "marketrank", run_name: str | None = None,
          progress: Callable[[int, dict], None] | None = None, train_lists: int | None = None,
          artifact_location: str | None = None, callbacks: tuple = ()) -> TrainResult:
    """Fit, early-stop on the validation signal of ``hparams.early_stopping``, export the best epoch. Sources are
    split dirs or zero-argument batch callables; ``callbacks`` are extra Keras callbacks (benchmarks)."""
    import tensorflow as tf

    from training import data, export
    from training.model import Preprocessor, average_scores, build_model, compile_model

    tf.keras.utils.set_random_seed(hparams.seed)
    preprocessor = Preprocessor(spec)
    eta = resolve_ipw_eta(hparams, spec)
    if hparams.early_stopping == "val_ipw_ndcg_10" and eta <= 0:
        raise ValueError("early_stopping val_ipw_ndcg_10 needs inverse-propensity weights: the feature spec has no "
                         "position-bias estimate and --ipw-eta is not set (or is 0)")
    extra = ("position",) if eta > 0 else ()

    batch_size = hparams.batch_size if in_memory(hparams, spec, train_source, valid_source) else None

    def source(src, shuffle: bool):
        return batch_source(src, spec, hparams, shuffle=shuffle, columns_extra=extra, whole=bool(batch_size))

    train_ds = data.make_dataset(source(train_source, True), spec, preprocessor, ipw_eta=eta, position="position",
                                 shuffle_labels_seed=hparams.seed if hparams.shuffle_labels else None,
                                 in_memory_batch_size=batch_size, shuffle_seed=hparams.seed)
    # Validation is weighted like training, so early stopping follows the debiased metric, not raw clicks.
    valid_ds = data.make_dataset(source(valid_source, False), spec, preprocessor, ipw_eta=eta, position="position",
                                 in_memory_batch_size=batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds, valid_ds = train_ds.with_options(options), valid_ds.with_options(options)

    strategy = choose_strategy()
    tracker = Tracker.start(tracking_uri, experiment, run_name, artifact_location)
    if tracker is not None:
        tracker.params({**dataclasses.asdict(hparams), "features": len(spec.features), "list_size": spec.list_size,
                        "source": spec.source, "ipw_eta_used": eta, "data_cache_mb_used": data_budget_mb(hparams),
                        "data_in_memory": bool(batch_size)})
    status = "FAILED"
    try:
        epoch_logger = _EpochLogger(tracker, progress)
        members: list[tf.keras.Model] = []
        history: dict[str, list[float]] = {}
        best_epochs: list[int] = []
        member_seconds: list[float] = []
        member_epochs: list[int] = []
        for member in range(hparams.ensemble):
            if member:  # member 0 keeps the seed set above, so a single model trains as it always has
                tf.keras.utils.set_random_seed(hparams.seed + member)
                log.info("ensemble member %d of %d (seed %d)", member + 1, hparams.ensemble, hparams.seed + member)
            with strategy.scope():
                # Members need names of their own inside the ensemble; a single model keeps build_model's.
                name = f"marketrank_{hparams.scorer}_{member + 1}" if hparams.ensemble > 1 else None
                model = compile_model(build_model(spec, hparams, name), hparams, ipw=eta > 0)
            epoch_logger.offset = len(history.get("loss", ()))
            fitted, took = _fit(model, train_ds, valid_ds, hparams, [*callbacks, epoch_logger.callback])
            member_seconds.append(took)
            member_epochs.append(len(fitted["loss"]))
            best_epochs.append(_best_epoch(fitted, hparams))
            for key, values in fitted.items():
                history.setdefault(key, []).extend(values)
            members.append(model)
        if len(members) == 1:
            validation = {k: v[best_epochs[0] - 1] for k, v in history.items() if k.startswith("val_")}
        else:
            with strategy.scope():
                model = compile_model(average_scores(members), hparams, ipw=eta > 0)
            scores = model.evaluate(valid_ds, verbose=0, return_dict=True)
            validation = {f"val_{k}": float(v) for k, v in scores.items()}
            log.info("ensemble of %d: %s", len(members), " ".join(f"{k}={v:.4f}" for k, v in
                                                                  sorted(validation.items())))
        best_epoch, seconds = best_epochs[0], sum(member_seconds)
        lists_seen = (train_lists or _count_lists(train_source)) * len(history["loss"])
        export_dir = export.export_saved_model(model, spec, model_dir, model_name=model_name, version=version)
        result = TrainResult(export_dir=export_dir, history=history, best_epoch=best_epoch, seconds=seconds,
                             examples_per_second=lists_seen / seconds if seconds else 0.0,
                             mlflow_run_id=tracker.run_id if tracker else None, validation=validation,
                             member_best_epochs=best_epochs, member_epochs=member_epochs,
                             member_seconds=member_seconds)
        if tracker is not None:
            tracker.metrics({"best_epoch": best_epoch, "train_seconds": seconds,
                             "best_val_ndcg_10": max(history["val_ndcg_10"]),
                             "exported_val_ndcg_10": validation["val_ndcg_10"],
                             "lists_per_second": result.examples_per_second})
            tracker.artifacts(export_dir, "model")
            tracker.json(spec.to_dict(), "feature_spec.json")
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            summary = {**dataclasses.asdict(result), "export_dir": str(export_dir),
                       "hparams": dataclasses.asdict(hparams)}
            (Path(output_dir) / "training.json").write_text(json.dumps(summary, indent=2))
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.end(status)


def resolve_ipw_eta(hparams, spec: FeatureSpec) -> float:
    """The position-bias exponent to weight with: the explicit hyperparameter, else the spec's estimate."""
    if hparams.ipw_eta is not None:
        return float(hparams.ipw_eta)
    return float(spec.propensity_eta or 0.0) if spec.position else 0.0


def _count_lists(source) -> int:
    if callable(source):
        return sum(len(batch[MASK]) for batch in source())
    import pyarrow.parquet as pq

    from training.data import shard_paths

    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(source))


def _int_tuple(text: str) -> tuple[int, ...]:
    text = text.strip().strip("[]()")
    return tuple(int(x) for x in text.replace(",", " ").split())


def _bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes"):
        return True
    if text.strip().lower() in ("0", "false", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none", "auto", "null") else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "auto", "null") else int(text)


def hparams_parser(parser: argparse.ArgumentParser) -> None:
    """One flag per HParams field (SageMaker passes hyperparameters as ``--name value``)."""
    from training.hparams import HParams

    for field in dataclasses.fields(HParams):
        flag = "--" + field.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(str(field.type))
        if field.name == "ipw_eta":
            parser.add_argument(flag, type=_optional_float, default=field.default,
                                help="position-bias exponent for IPW; 'auto' = the feature job's estimate")
        elif field.name == "data_cache_mb":
            parser.add_argument(flag, type=_optional_int, default=field.default,
                                help="MiB of data held in memory (0: stream); 'auto' = a fifth of the memory")
        elif field.name == "hidden":
            parser.add_argument(flag, type=_int_tuple, default=field.default, help="hidden layer widths, e.g. 128,64")
        else:
            parser.add_argument(flag, type=kind or str, default=field.default)


def hparams_from_args(args: argparse.Namespace):
    from training.hparams import HParams

    return HParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HParams)})


def train_letor(letor_dir: str | Path, output_dir: str | Path, hparams, *, tracking_uri: str | None = None,
                progress: Callable[[int, dict], None] | None = None,
                artifact_location: str | None = None) -> dict[str, Any]:
    """LETOR path: stream train/vali/test files, early-stop on vali, export, evaluate test into evaluation.json."""
    from training import evaluate

    letor_dir, output_dir = Path(letor_dir), Path(output_dir)
    paths = {name: letor_dir / f"{name}.txt" for name in ("train", "vali", "test")}
    for name, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"LETOR {name} split not found: {path}")
        with path.open("rb") as lines:  # up to the first list only: a split can be gigabytes
            if not any(line.strip() and not line.lstrip().startswith(b"#") for line in lines):
                raise ValueError(f"LETOR {name} split {path} holds no ranking lists (empty, or comments only)")
    stats = letor.scan_letor(paths["train"])
    spec = letor_spec(stats, list_size=min(stats.max_list_size, LETOR_TRAIN_LIST_SIZE))
    result = train(letor_batches(paths["train"], spec, hparams.batch_size, spec.list_size, seed=hparams.seed),
                   letor_batches(paths["vali"], spec, hparams.batch_size, None), spec, hparams,
                   output_dir / "model", output_dir, tracking_uri=tracking_uri, progress=progress,
                   run_name=f"letor-{letor_dir.name}", train_lists=stats.num_queries,
                   artifact_location=artifact_location)
    report = evaluate.evaluate(result.export_dir, letor_batches(paths["test"], spec, 256, None), output_dir)
    return {"export_dir": str(result.export_dir), "evaluation": report, "train_seconds": result.seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the marketrank TF-Ranking model.")
    parser.add_argument("--train", default=os.environ.get("SM_CHANNEL_TRAIN"))
    parser.add_argument("--validation", default=os.environ.get("SM_CHANNEL_VALIDATION"))
    parser.add_argument("--model-dir", default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    parser.add_argument("--output-data-dir", default=os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    parser.add_argument("--model-name", default="marketrank")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--letor", default=None, help="LETOR dir with train.txt, vali.txt, test.txt")
    parser.add_argument("--mlflow-tracking-uri", default=None)
    hparams_parser(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log.warning("ignoring unknown arguments: %s", unknown)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from importlib import metadata

    import tensorflow as tf

    # The job's log says which runtime trained the model: the serving image is TensorFlow 2.14.1 (requirements.txt).
    log.info("TensorFlow %s, TF-Ranking %s", tf.__version__, metadata.version("tensorflow-ranking"))
    hparams = hparams_from_args(args)
    if args.letor:
        summary = train_letor(args.letor, args.output_data_dir, hparams, tracking_uri=args.mlflow_tracking_uri)
        log.info("LETOR test ndcg@10=%s", summary["evaluation"]["ranking_metrics"]["ndcg@10"]["value"])
        return
    if not args.train or not args.validation:
        parser.error("--train and --validation (or SM_CHANNEL_TRAIN / SM_CHANNEL_VALIDATION) are required")
    spec = FeatureSpec.load(args.train)
    result = train(args.train, args.validation, spec, hparams, args.model_dir, args.output_data_dir,
                   model_name=args.model_name, version=args.version, tracking_uri=args.mlflow_tracking_uri)
    log.info("exported %s (best epoch%s %s; %.1f s)", result.export_dir, "s" if len(result.member_best_epochs) > 1
             else "", ", ".join(map(str, result.member_best_epochs)), result.seconds)


if __name__ == "__main__":
    main()
