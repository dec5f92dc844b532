"""Tests for training/feature_spec.py: validation, JSON round trip and error messages."""

from __future__ import annotations

import json

import pytest

from training.feature_spec import (
    CONTEXT,
    FLOAT,
    ITEM,
    SPEC_FILE,
    SPEC_VERSION,
    STRING,
    Feature,
    FeatureSpec,
)


def make_spec() -> FeatureSpec:
    return FeatureSpec(
        features=(
            Feature("surface", CONTEXT, STRING, vocabulary=("feed", "search"), description="request surface"),
            Feature("user_age_days", CONTEXT, FLOAT, transform="log1p", mean=3.5, std=1.25),
            Feature("price", ITEM, FLOAT, transform="log1p", mean=2.0, std=0.5),
            Feature("letor", ITEM, FLOAT, shape=(3,), mean=(0.0, 1.0, 2.0), std=(1.0, 0.5, 0.25)),
            Feature("category", ITEM, STRING, vocabulary=("bags", "coats", "dresses")),
            Feature("empty_vocab", ITEM, STRING, vocabulary=()),
        ),
        list_size=60,
        label="label",
        eval_label="relevance",
        position="position",
        oracle_score="true_score",
        segment="surface",
        propensity_eta=0.8,
    )


def test_properties_and_getitem() -> None:
    spec = make_spec()
    assert spec.names == ["surface", "user_age_days", "price", "letor", "category", "empty_vocab"]
    assert [f.name for f in spec.context] == ["surface", "user_age_days"]
    assert [f.name for f in spec.item] == ["price", "letor", "category", "empty_vocab"]
    assert spec["letor"].shape == (3,)
    assert spec.version == SPEC_VERSION


def test_getitem_unknown_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        make_spec()["nope"]
    message = str(info.value)
    assert "'nope'" in message
    for name in make_spec().names:
        assert name in message


def test_save_load_round_trip(tmp_path) -> None:
    spec = make_spec()
    path = spec.save(tmp_path)
    assert path == tmp_path / SPEC_FILE
    for source in (tmp_path, path, str(path)):  # directory, file path, string
        loaded = FeatureSpec.load(source)
        assert loaded == spec
    loaded = FeatureSpec.load(tmp_path)
    # JSON lists come back as tuples (so the frozen dataclasses stay hashable and compare equal).
    assert isinstance(loaded.features, tuple)
    assert loaded["letor"].shape == (3,) and isinstance(loaded["letor"].shape, tuple)
    assert loaded["letor"].mean == (0.0, 1.0, 2.0) and isinstance(loaded["letor"].mean, tuple)
    assert isinstance(loaded["letor"].std, tuple)
    assert loaded["category"].vocabulary == ("bags", "coats", "dresses")
    assert isinstance(loaded["category"].vocabulary, tuple)
    assert loaded["empty_vocab"].vocabulary == ()
    assert loaded["price"].shape == ()
    assert loaded["price"].vocabulary is None
    assert loaded["user_age_days"].mean == 3.5
    assert loaded.propensity_eta == 0.8
    hash(loaded)  # every field hashable again


def test_to_json_is_stable_and_plain(tmp_path) -> None:
    spec = make_spec()
    data = json.loads(spec.to_json())
    assert data["version"] == SPEC_VERSION
    assert data["features"][3]["shape"] == [3]
    assert FeatureSpec.from_dict(data) == spec
    assert spec.to_json() == FeatureSpec.from_dict(json.loads(spec.to_json())).to_json()


def test_unknown_version_rejected(tmp_path) -> None:
    data = json.loads(make_spec().to_json())
    data["version"] = SPEC_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        FeatureSpec.from_dict(data)
    (tmp_path / SPEC_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not supported") as info:
        FeatureSpec.load(tmp_path)
    assert str(tmp_path / SPEC_FILE) in str(info.value)
    del data["version"]
    with pytest.raises(ValueError, match="version None"):
        FeatureSpec.from_dict(data)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scope": "global"}, "scope"),
    ({"dtype": "int64"}, "dtype"),
    ({"transform": "sqrt"}, "transform"),
])
def test_bad_feature_fields(kwargs: dict, match: str) -> None:
    fields = {"name": "x", "scope": ITEM, "dtype": FLOAT, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        Feature(**fields)
    assert "'x'" in str(info.value)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_bad_feature_in_file_names_the_file(tmp_path) -> None:
    data = json.loads(make_spec().to_json())
    data["features"][0]["scope"] = "global"
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="invalid feature spec") as info:
        FeatureSpec.load(path)
    assert str(path) in str(info.value)
    assert "scope" in str(info.value)


def test_malformed_file_is_a_value_error(tmp_path) -> None:
    path = tmp_path / SPEC_FILE
    path.write_text(json.dumps({"version": SPEC_VERSION, "list_size": 5}))  # no "features"
    with pytest.raises(ValueError, match="invalid feature spec"):
        FeatureSpec.load(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid feature spec"):
        FeatureSpec.load(tmp_path)


def test_load_missing_path_names_it(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "spec.json"
    with pytest.raises(FileNotFoundError) as info:
        FeatureSpec.load(missing)
    assert str(missing) in str(info.value)
    # A directory without the spec file: the message names the file it looked for.
    with pytest.raises(FileNotFoundError) as info:
        FeatureSpec.load(tmp_path)
    assert str(tmp_path / SPEC_FILE) in str(info.value)
