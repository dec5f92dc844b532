"""Online features: the feature store (embedded or Redis), materialisation, and model inputs for one request.

The store holds, per id, the state the feature job wrote under ``<features>/online/`` (``ITEM_STATE_COLUMNS``
per item, ``USER_STATE_COLUMNS`` per user: counters as of the end of the logs) plus the model's feature spec.
``build_inputs`` turns a request's state into the exported signature's inputs with the training code
(``training.features.online_raw_columns`` + ``feature_columns``): the feature logic exists once.

Two stores, one interface (``FeatureStore``):

* ``EmbeddedStore``: an in-process dict (the default), optionally persisted to one JSON file, so ``marketrank
  serve`` loads what ``marketrank features materialize`` wrote.
* ``RedisStore(url)``: redis-py with a connection pool; values are compact JSON strings under ``mr:item:<id>`` and
  ``mr:user:<id>``, the spec under ``mr:spec`` and materialisation metadata under ``mr:meta``.

A request's fetch is ONE round trip (``MGET`` of the user key and every candidate key). State values are plain
JSON (numbers, strings, lists, objects: the per-key maps such as ``brand_clicks`` or ``search_terms`` are
``{key: count}``), so both stores return
identical states. Unknown ids come back as ``None``: an unknown user is a cold start, an unknown item cannot be
scored (the API ranks it last, see ``serving.app``). Redis calls never retry inside redis-py: the API owns the
time budget.

Nothing here imports TensorFlow: the API runs without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from serving.errors import StoreUnavailable
from training.feature_job import ONLINE_DIR
from training.feature_spec import CONTEXT, MASK, STRING, FeatureSpec
from training.features import (
    DAY_MS,
    ITEM_STATE_COLUMNS,
    USER_STATE_COLUMNS,
    feature_columns,
    item_state_columns,
    online_raw_columns,
    popularity_recency,
)

ITEM_PREFIX, USER_PREFIX = "mr:item:", "mr:user:"
SPEC_KEY, META_KEY = "mr:spec", "mr:meta"
#: The embedded store's file name under the workspace (``$MARKETRANK_HOME``), unless a path is given.
DEFAULT_STORE_FILE = "feature_store.json"
ITEMS, USERS = "items", "users"
STORE_FORMAT = 1
WRITE_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What the features need from a request besides state: surface, query (None on the feed), time (epoch ms)."""

    surface: str
    query: str | None
    ts_ms: int


class HasContext(Protocol):
    surface: str
    query: str | None
    ts_ms: int


@dataclasses.dataclass
class Fetched:
    """One request's state: the user's (None = unknown, a cold start) and each item's, aligned with the ids."""

    user: dict[str, Any] | None
    items: list[dict[str, Any] | None]
    #: The known items' states as columns (``item_state_columns`` of the non-None ``items``, in order), where the
    #: store keeps them that way; None otherwise.
    known_columns: dict[str, np.ndarray] | None = dataclasses.field(default=None, compare=False, repr=False)
    #: Keys whose stored value is corrupt ("key: why"): read as unknown (a cold-start user, an unscorable item),
    #: so one bad value costs its own id only, never the request's model ranking.
    corrupt: list[str] = dataclasses.field(default_factory=list)

    def known_items(self) -> Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray]:
        """What ``build_inputs`` takes for the known items: the columns if there are, else the states."""
        if self.known_columns is not None:
            return self.known_columns
        return [s for s in self.items if s is not None]


def _json_value(value: Any) -> Any:
    """Plain JSON from what pyarrow/pandas/numpy hand out (NaN -> None, numpy scalars -> Python)."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def _map_value(value: Any) -> dict[str, Any] | None:
    """A Parquet map column comes back as a list of (key, value) pairs: make it an object."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return {str(k): _json_value(v) for k, v in value}


def encode_state(state: Mapping[str, Any]) -> str:
    return json.dumps(state, separators=(",", ":"), allow_nan=False)


class CorruptState(ValueError):
    """A stored value that is not a JSON object (strict JSON: no NaN or Infinity)."""


def decode_state(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise CorruptState(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise CorruptState(f"not a JSON object but {type(value).__name__}")
    return value


class FeatureStore(ABC):
    """Online state by id, and the feature spec the model was trained with."""

    #: True when calls block on I/O (the API then runs them in a thread pool, off the event loop).
    blocking = False

    @abstractmethod
    def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        """The user's and the items' state in one round trip; StoreUnavailable if the store cannot answer."""

    @abstractmethod
    def write(self, kind: str, records: Iterable[tuple[str, Mapping[str, Any]]], batch_size: int = WRITE_BATCH
              ) -> int:
        """Upsert ``(id, state)`` records of ``kind`` (ITEMS or USERS) in batches; returns how many."""

    @abstractmethod
    def put_spec(self, spec: FeatureSpec, meta: Mapping[str, Any] | None = None) -> None: ...

    @abstractmethod
    def get_spec(self) -> FeatureSpec | None:
        """The stored spec, None if nothing was materialised; StoreUnavailable if the store cannot answer."""

    @abstractmethod
    def meta(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    def flush(self) -> None:
        """Make writes durable where the store needs it (the embedded store's file)."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None

    def describe(self) -> str:
        return type(self).__name__


class EmbeddedStore(FeatureStore):
    """In-process dicts; with ``path``, loaded from and flushed to one JSON file (written atomically).

    The items are also kept as columns (``item_state_columns`` of the whole catalogue, rebuilt after a write), so
    a fetch hands out the candidates' rows with ``np.take`` instead of gathering 17 fields from 300 dicts.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._data: dict[str, dict[str, dict[str, Any]]] = {ITEMS: {}, USERS: {}}
        self._table: tuple[dict[str, int], dict[str, np.ndarray]] | None = None
        self._spec: dict[str, Any] | None = None
        self._meta: dict[str, Any] | None = None
        if self.path is not None and self.path.exists():
            self.load()

    def load(self) -> None:
        assert self.path is not None
        try:
            content = json.loads(self.path.read_text())
            if content.get("format") != STORE_FORMAT:
                raise ValueError(f"format {content.get('format')!r} is not {STORE_FORMAT}")
            self._data = {ITEMS: dict(content[ITEMS]), USERS: dict(content[USERS])}
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise StoreUnavailable(f"embedded feature store {self.path} is unreadable: {err}") from err
        self._spec, self._meta = content.get("spec"), content.get("meta")
        self._table = None
        self._item_table()

    def _item_table(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        table = self._table
        if table is None:
            items = self._data[ITEMS]
            table = self._table = ({item_id: row for row, item_id in enumerate(items)},
                                   item_state_columns(list(items.values())))
        return table

    def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        items = self._data[ITEMS]
        states = [items.get(i) for i in item_ids]
        rows, columns = self._item_table()
        known = np.fromiter((rows[i] for i, s in zip(item_ids, states, strict=True) if s is not None), np.intp)
        return Fetched(self._data[USERS].get(user_id), states, {c: v.take(known) for c, v in columns.items()})

    def write(self, kind: str, records: Iterable[tuple[str, Mapping[str, Any]]], batch_size: int = WRITE_BATCH
              ) -> int:
        target = self._data[_kind(kind)]
        self._table = None
        n = 0
        for key, state in records:
            target[str(key)] = json.loads(encode_state(state))  # the same JSON round trip as Redis
            n += 1
        return n

    def put_spec(self, spec: FeatureSpec, meta: Mapping[str, Any] | None = None) -> None:
        self._spec = json.loads(spec.to_json())
        self._meta = dict(meta) if meta is not None else self._meta

    def get_spec(self) -> FeatureSpec | None:
        return FeatureSpec.from_dict(self._spec) if self._spec is not None else None

    def meta(self) -> dict[str, Any] | None:
        return self._meta

    def ping(self) -> None:
        return None

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = {"format": STORE_FORMAT, "spec": self._spec, "meta": self._meta, **self._data}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(content, handle, separators=(",", ":"))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def describe(self) -> str:
        return f"embedded:{self.path}" if self.path else "embedded"


class RedisStore(FeatureStore):
    """Redis (or ElastiCache/MemoryDB) through one pooled redis-py client; no retries inside redis-py."""

    blocking = True

    def __init__(self, url: str, *, socket_timeout_s: float = 0.25, connect_timeout_s: float = 0.25,
                 max_connections: int = 64):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self._errors = (redis.RedisError, OSError)
        self.pool = redis.ConnectionPool.from_url(
            url, max_connections=max_connections, socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 0), health_check_interval=30)
        self.client = redis.Redis(connection_pool=self.pool)

    def _call(self, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as err:
            raise StoreUnavailable(f"redis {doing} failed ({self.describe()}): {type(err).__name__}: {err}") from err

    def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        keys = [USER_PREFIX + user_id, *(ITEM_PREFIX + i for i in item_ids)]
        values = self._call("MGET", self.client.mget, keys)
        corrupt: list[str] = []

        def state(key: str, raw: bytes | None) -> dict[str, Any] | None:
            try:
                return decode_state(raw)
            except CorruptState as err:
                corrupt.append(f"{key}: {err}")
                return None

        user = state(keys[0], values[0])
        return Fetched(user, [state(k, v) for k, v in zip(keys[1:], values[1:], strict=True)], corrupt=corrupt)

    def write(self, kind: str, records: Iterable[tuple[str, Mapping[str, Any]]], batch_size: int = WRITE_BATCH
              ) -> int:
        prefix = {ITEMS: ITEM_PREFIX, USERS: USER_PREFIX}[_kind(kind)]
        n = 0
        for batch in _batches(records, batch_size):
            pipe = self.client.pipeline(transaction=False)
            pipe.mset({prefix + str(key): encode_state(state) for key, state in batch})
            self._call("pipelined MSET", pipe.execute)
            n += len(batch)
        return n

    def put_spec(self, spec: FeatureSpec, meta: Mapping[str, Any] | None = None) -> None:
        values = {SPEC_KEY: spec.to_json()}
        if meta is not None:
            values[META_KEY] = json.dumps(dict(meta))
        self._call("MSET spec", self.client.mset, values)

    def get_spec(self) -> FeatureSpec | None:
        raw = self._call("GET spec", self.client.get, SPEC_KEY)
        if raw is None:
            return None
        try:
            return FeatureSpec.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as err:
            raise StoreUnavailable(f"{SPEC_KEY} in {self.describe()} is not a valid feature spec: {err}") from err

    def meta(self) -> dict[str, Any] | None:
        raw = self._call("GET meta", self.client.get, META_KEY)
        if raw is None:
            return None
        try:
            return decode_state(raw)
        except CorruptState as err:
            raise StoreUnavailable(f"{META_KEY} in {self.describe()} is {err}") from err

    def ping(self) -> None:
        self._call("PING", self.client.ping)

    def close(self) -> None:
        self.pool.disconnect()

    def describe(self) -> str:
        return f"redis:{self.pool.connection_kwargs.get('host')}:{self.pool.connection_kwargs.get('port')}"


def _kind(kind: str) -> str:
    if kind not in (ITEMS, USERS):
        raise ValueError(f"unknown state kind {kind!r} (expected {ITEMS!r} or {USERS!r})")
    return kind


def _batches(records: Iterable[tuple[str, Mapping[str, Any]]], size: int) -> Iterator[list]:
    batch: list = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_store(location: str | None, path: str | Path | None = None, **redis_options: Any) -> FeatureStore:
    """``"embedded"`` (or None) -> EmbeddedStore(path); ``redis://`` / ``rediss://`` URL -> RedisStore."""
    if location in (None, "", "embedded"):
        return EmbeddedStore(path)
    if location.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(location, **redis_options)
    raise ValueError(f"feature store {location!r}: expected 'embedded' or a redis:// URL")


# --- materialisation --------------------------------------------------------------------------------------------

def _parquet_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {directory} (run the feature job first)")
    return files


def read_state(directory: str | Path, id_column: str, columns: Sequence[str], batch_size: int = WRITE_BATCH
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, state)`` from the feature job's online Parquet, as plain JSON values (maps -> objects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in _parquet_files(Path(directory)):
        parquet = pq.ParquetFile(path)
        missing = [c for c in (id_column, *columns) if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: online state lacks columns {missing}")
        maps = {c for c in columns if pa.types.is_map(parquet.schema_arrow.field(c).type)}
        for batch in parquet.iter_batches(batch_size=batch_size, columns=[id_column, *columns]):
            for row in batch.to_pylist():
                state = {c: _map_value(row[c]) if c in maps else _json_value(row[c]) for c in columns}
                yield str(row[id_column]), state


def materialize(features_dir: str | Path, store: FeatureStore, spec: FeatureSpec,
                batch_size: int = WRITE_BATCH, source: str | None = None) -> dict[str, int]:
    """Load ``<features_dir>/online/{items,users}`` into ``store`` (pipelined batches) with ``spec``.

    ``spec`` should be the model's (``training.export.load_spec(version_dir)``): the API builds its inputs from
    it. Returns ``{"items": n, "users": n}``. Ids no longer in the online state are not deleted. ``source`` (default:
    ``features_dir``) is recorded in the store's metadata: where the state came from, e.g. the S3 URI staged here.
    """
    online = Path(features_dir) / ONLINE_DIR
    counts = {
        ITEMS: store.write(ITEMS, read_state(online / ITEMS, "item_id", ITEM_STATE_COLUMNS, batch_size), batch_size),
        USERS: store.write(USERS, read_state(online / USERS, "user_id", USER_STATE_COLUMNS, batch_size), batch_size),
    }
    stats_path = Path(features_dir) / "stats.json"
    as_of = json.loads(stats_path.read_text()).get("online_as_of_ms") if stats_path.exists() else None
    store.put_spec(spec, meta={"source": source or str(features_dir), "materialized_ms": int(time.time() * 1000),
                               "as_of_ms": as_of, **counts})
    store.flush()
    return counts


# --- model inputs -----------------------------------------------------------------------------------------------

def build_inputs(spec: FeatureSpec, request: HasContext, user_state: Mapping[str, Any] | None,
                 item_states: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The signature's inputs for one request: context ``[1]``, item ``[1, L]``, ``mask [1, L]`` (all true).

    ``item_states`` are the known candidates in order (states, or their columns: ``Fetched.known_items``);
    strings are object arrays, floats float32.
    """
    raw = online_raw_columns(request.surface, request.query, int(request.ts_ms), user_state, item_states)
    n = len(raw["ts_ms"])
    if not n:
        raise ValueError("build_inputs needs at least one item")
    features = feature_columns(raw)
    inputs: dict[str, np.ndarray] = {}
    for feature in spec.features:
        if feature.shape:
            raise ValueError(f"feature {feature.name!r}: the online path builds scalar features only")
        if feature.name not in features:
            raise KeyError(f"feature {feature.name!r} of the spec is not computed by feature_columns")
        dtype = object if feature.dtype == STRING else np.float32
        values = features[feature.name]
        if feature.scope == CONTEXT:
            inputs[feature.name] = np.asarray(values[:1], dtype=dtype)
        else:
            inputs[feature.name] = np.asarray(values, dtype=dtype).reshape(1, n)
    inputs[MASK] = np.ones((1, n), dtype=bool)
    return inputs


def fallback_scores(item_states: Sequence[Mapping[str, Any]], now_ms: int) -> np.ndarray:
    """Popularity + recency, the legacy policy (``training.features.popularity_recency``)."""

    def number(state: Mapping[str, Any], key: str) -> float:
        value = state.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else 0.0

    views = np.array([number(s, "views") for s in item_states], dtype=np.float64)
    likes = np.array([number(s, "likes") for s in item_states], dtype=np.float64)
    bags = np.array([number(s, "bags") for s in item_states], dtype=np.float64)
    # An item with no listing time gets no recency boost (as the model sees it: listed at 0, very old).
    listed = np.array([number(s, "listed_ms") for s in item_states], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        scores = popularity_recency(views, likes, bags, np.maximum(now_ms - listed, 0.0) / DAY_MS)
    # Counters near float64's limit overflow the sum: such an item still ranks (first), with a score JSON can carry.
    limit = np.finfo(np.float64).max
    return np.nan_to_num(scores, nan=0.0, posinf=limit, neginf=-limit)
