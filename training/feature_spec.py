"""The feature spec: the one contract between the feature job, training, the exported model and serving.

The feature job writes it as ``feature_spec.json`` beside the data; training reads it to build the tf.data input
and the model's preprocessing; export embeds it in the SavedModel's assets; serving reads it from there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SPEC_FILE = "feature_spec.json"
SPEC_VERSION = 1
CONTEXT, ITEM = "context", "item"
FLOAT, STRING = "float32", "string"
#: Name of the list mask input of the exported signature ([B, L] bool, true for real items).
MASK = "mask"
#: Padding value of labels in a list (TF-Ranking ignores labels < 0).
LABEL_PAD = -1.0


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    scope: str  # CONTEXT or ITEM
    dtype: str = FLOAT  # FLOAT or STRING
    #: Per-example shape: () for a scalar, (d,) for a dense vector (LETOR's feature vectors).
    shape: tuple[int, ...] = ()
    #: String features: the values seen in training; others map to one out-of-vocabulary bucket.
    vocabulary: tuple[str, ...] | None = None
    #: "none" or "log1p" (sign(x) * log1p(|x|)), applied before normalisation, in the model.
    transform: str = "none"
    #: Float features: normalisation statistics from the training split (scalars or per-dimension lists).
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.scope not in (CONTEXT, ITEM):
            raise ValueError(f"feature {self.name!r}: scope must be {CONTEXT!r} or {ITEM!r}, got {self.scope!r}")
        if self.dtype not in (FLOAT, STRING):
            raise ValueError(f"feature {self.name!r}: dtype must be {FLOAT!r} or {STRING!r}, got {self.dtype!r}")
        if self.transform not in ("none", "log1p"):
            raise ValueError(f"feature {self.name!r}: unknown transform {self.transform!r}")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    features: tuple[Feature, ...]
    #: Padded list length of the training input and of the exported signature's item axis.
    list_size: int
    #: Graded training label (purchase 4 > bag 3 > like 2 > click 1 > none 0 for marketplace logs).
    label: str = "label"
    #: Label used for offline evaluation: the simulator's true relevance when present, else ``label``.
    eval_label: str = "label"
    #: Optional per-list columns the evaluator uses for baselines: logged position and oracle score.
    position: str | None = None
    oracle_score: str | None = None
    #: Per-list column used to slice metrics (e.g. surface), if any.
    segment: str | None = None
    #: Position-bias exponent estimated from the logs (examination ~ (1 + position) ** -eta), if known.
    propensity_eta: float | None = None
    source: str = "marketplace"
    version: int = SPEC_VERSION

    @property
    def context(self) -> list[Feature]:
        return [f for f in self.features if f.scope == CONTEXT]

    @property
    def item(self) -> list[Feature]:
        return [f for f in self.features if f.scope == ITEM]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature {name!r} is not in the feature spec (known: {', '.join(self.names)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        if data.get("version") != SPEC_VERSION:
            raise ValueError(f"feature spec version {data.get('version')!r} is not supported (want {SPEC_VERSION})")
        features = []
        for raw in data["features"]:
            raw = dict(raw)
            raw["shape"] = tuple(raw.get("shape") or ())
            for key in ("vocabulary", "mean", "std"):
                if isinstance(raw.get(key), list):
                    raw[key] = tuple(raw[key])
            features.append(Feature(**raw))
        return cls(**{**data, "features": tuple(features)})

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        if not path.exists():
            raise FileNotFoundError(f"feature spec not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid feature spec: {err}") from err
