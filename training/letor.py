"""Streaming reader for LETOR / SVMlight ranking files (MSLR-WEB10K/30K, Yahoo LTR, Istella).

Each non-blank line is one query-document pair::

    <label> qid:<qid> <id>:<value> <id>:<value> ... [# comment]

Parsing rules (every violation raises ``ValueError`` whose message names the file, the 1-based
line number and the offending token or value):

* Everything from the first ``#`` to the end of the line is a comment and is ignored. Lines that are
  blank (after stripping the comment) are skipped.
* The first token is the relevance label, parsed as a float (graded 0..4 in the public sets). It must
  be finite.
* The second token must be ``qid:<id>`` with a non-empty id; the qid is kept as a string. A line
  without it is an error.
* The remaining tokens are ``<id>:<value>`` pairs. Feature ids are positive integers written with
  ASCII digits (``0``, negative or non-numeric ids are errors); feature ``j`` goes to column ``j-1``.
  Values are finite floats. Ids may appear in any order.
* A feature id repeated on one line: the LAST value wins (silently). This is what TF-Ranking's LibSVM
  parser does (``tfr.data._libsvm_parse_line`` builds a dict, so later pairs overwrite earlier ones),
  and it is Python ``dict`` semantics. scikit-learn's ``load_svmlight_file`` is stricter and rejects
  any line whose ids are not strictly increasing, i.e. it refuses both unsorted and repeated ids;
  that would reject the sample files shipped with this repo, so it is not followed.
* A feature that is absent from a line has value 0.0 (sparse format); so does an explicit ``id:0``.
* Documents of one query must be contiguous, as in all public LTR sets. A qid that reappears after
  another qid is an error. Detecting this keeps the set of qids seen so far (a few MB for millions
  of queries); everything else streams, with memory bounded by the largest query and the batch.

Feature transforms (``transform`` argument): ``"none"`` or ``"log1p"``, the latter being
``sign(x) * log1p(|x|)``, which tames the heavy-tailed count features of MSLR. Both map 0 to 0, so
missing features stay 0 after the transform.

The module depends only on numpy and the standard library and runs on Python 3.10 and 3.11.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from itertools import chain

import numpy as np

__all__ = [
    "TRANSFORMS",
    "LetorStats",
    "apply_transform",
    "iter_letor_batches",
    "iter_letor_lists",
    "scan_letor",
]

TRANSFORMS = ("none", "log1p")
PADDING_LABEL = -1.0
STD_FLOOR = 1e-6

# Documents per numpy chunk in scan_letor; the tests lower it to exercise the chunk merge.
_SCAN_CHUNK_DOCS = 4096
# scan_letor reports progress at least every this many bytes (and once at the end).
_PROGRESS_EVERY_BYTES = 16 << 20

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class LetorStats:
    """Summary of one LETOR file, as computed by :func:`scan_letor`."""

    path: str
    num_features: int  # max feature id seen (ids are 1-based; feature j goes to column j-1)
    num_queries: int
    num_docs: int
    max_list_size: int
    mean: list[float]  # per-feature mean over all docs after the transform (missing feature = 0.0)
    std: list[float]  # per-feature population std after the transform, floored at 1e-6
    label_max: float


def _check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def apply_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """Apply ``transform`` ("none" or "log1p" = sign(x)*log1p(|x|)) elementwise; returns float64."""
    _check_transform(transform)
    values = np.asarray(values, dtype=np.float64)
    if transform == "log1p":
        return np.sign(values) * np.log1p(np.abs(values))
    return values


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", "replace"))


def _error(path: str, lineno: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {message}")


def _parse_float(token: bytes, what: str, path: str, lineno: int) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _error(path, lineno, f"{what} {_show(token)} is not a number") from None
    if not math.isfinite(value):
        raise _error(path, lineno, f"{what} {_show(token)} is not finite")
    return value


def _raise_feature_error(tokens: list[bytes], path: str, lineno: int) -> None:
    """Slow path: find the first bad ``id:value`` token and raise; return if all are fine."""
    for token in tokens:
        key, sep, value = token.partition(b":")
        if not sep or b":" in value or not value:
            raise _error(path, lineno, f"bad feature token {_show(token)} (expected <id>:<value>)")
        if not (key.isdigit() and int(key) > 0):
            raise _error(
                path,
                lineno,
                f"bad feature id {_show(key)} in token {_show(token)} (feature ids are positive integers)",
            )
        _parse_float(value, f"feature value in token {_show(token)}:", path, lineno)


def _parse_line(raw: bytes, path: str, lineno: int) -> tuple[float, str, dict[int, float]] | None:
    """Parse one line; None for a blank/comment-only line."""
    hash_pos = raw.find(b"#")
    if hash_pos >= 0:
        raw = raw[:hash_pos]
    tokens = raw.split()
    if not tokens:
        return None
    if tokens[0].startswith(b"qid:"):
        raise _error(path, lineno, f"missing label before {_show(tokens[0])}")
    if len(tokens) < 2 or not tokens[1].startswith(b"qid:"):
        got = _show(tokens[1]) if len(tokens) > 1 else "end of line"
        raise _error(path, lineno, f"missing 'qid:' token after the label (got {got})")
    label = _parse_float(tokens[0], "label", path, lineno)
    qid_bytes = tokens[1][4:]
    if not qid_bytes:
        raise _error(path, lineno, f"empty qid in token {_show(tokens[1])}")
    qid = qid_bytes.decode("utf-8", "replace")

    feats = tokens[2:]
    if not feats:
        return label, qid, {}
    # Fast path: bulk conversion; any problem falls back to the token-by-token checker for a precise error.
    try:
        pairs = [token.split(b":") for token in feats]
        keys = [key for key, _ in pairs]  # ValueError unless every token has exactly one ':'
        ids = [int(key) for key in keys]
        values = [float(value) for _, value in pairs]
        ok = b"".join(keys).isdigit() and min(ids) > 0 and math.isfinite(sum(values))
    except ValueError:
        ok = False
    if not ok:
        _raise_feature_error(feats, path, lineno)
        # Only reached when the fast path's finiteness check overflowed on large finite values.
    return label, qid, dict(zip(ids, values, strict=True))  # dict: a repeated id keeps its LAST value


def _iter_records(
    path: str, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, float, str, dict[int, float]]]:
    """Yield (line number, label, qid, features) per document, streaming the file in binary mode."""
    bytes_read = 0
    next_report = _PROGRESS_EVERY_BYTES
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            bytes_read += len(raw)
            if progress is not None and bytes_read >= next_report:
                progress(bytes_read)
                next_report = bytes_read + _PROGRESS_EVERY_BYTES
            record = _parse_line(raw, path, lineno)
            if record is not None:
                yield (lineno, *record)
    if progress is not None:
        progress(bytes_read)


def _iter_groups(
    path: str, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[str, list[float], list[dict[int, float]]]]:
    """Group contiguous documents by qid; a qid reappearing later is a ValueError."""
    seen: dict[str, int] = {}  # qid -> line where its block started
    qid: str | None = None
    labels: list[float] = []
    docs: list[dict[int, float]] = []
    for lineno, label, doc_qid, doc in _iter_records(path, progress):
        if doc_qid != qid:
            if qid is not None:
                yield qid, labels, docs
            if doc_qid in seen:
                raise _error(
                    path,
                    lineno,
                    f"qid {doc_qid!r} reappears after other queries (its block started at line "
                    f"{seen[doc_qid]}); documents of a query must be contiguous",
                )
            seen[doc_qid] = lineno
            qid, labels, docs = doc_qid, [], []
        labels.append(label)
        docs.append(doc)
    if qid is not None:
        yield qid, labels, docs


def _flatten(docs: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts per doc, 0-based columns, raw values) of a list of sparse docs."""
    counts = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    total = int(counts.sum())
    cols = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=total) - 1
    values = np.fromiter(chain.from_iterable(doc.values() for doc in docs), dtype=np.float64, count=total)
    return counts, cols, values


class _StreamingMoments:
    """Per-column mean / M2 over a dense matrix given in sparse chunks (Chan et al. pairwise merge)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)

    def _grow(self, width: int) -> None:
        if width > self.mean.size:
            # Earlier docs had 0.0 in the new columns: mean 0 and M2 0 over them is exact.
            pad = width - self.mean.size
            self.mean = np.concatenate([self.mean, np.zeros(pad)])
            self.m2 = np.concatenate([self.m2, np.zeros(pad)])

    def add_chunk(self, num_docs: int, cols: np.ndarray, values: np.ndarray) -> None:
        """Merge ``num_docs`` docs whose nonzero entries are (cols, values); no repeated col per doc."""
        if num_docs == 0:
            return
        width = max(self.mean.size, int(cols.max()) + 1 if cols.size else 0)
        self._grow(width)
        nnz = np.bincount(cols, minlength=width)
        chunk_mean = np.bincount(cols, weights=values, minlength=width) / num_docs
        # Two-pass within the chunk: present entries plus the (num_docs - nnz) implicit zeros.
        chunk_m2 = np.bincount(cols, weights=(values - chunk_mean[cols]) ** 2, minlength=width)
        chunk_m2 += (num_docs - nnz) * chunk_mean**2
        total = self.count + num_docs
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (num_docs / total)
        self.m2 = self.m2 + chunk_m2 + delta**2 * (self.count * num_docs / total)
        self.count = total


def scan_letor(
    path: PathLike, transform: str = "log1p", progress: Callable[[int], None] | None = None
) -> LetorStats:
    """One streaming pass over ``path``: sizes, label max and per-feature mean/std after ``transform``.

    Statistics treat the file as a dense [num_docs, num_features] matrix with 0.0 for missing features
    and use a numerically stable chunked algorithm (two-pass within a numpy chunk, Chan merge across
    chunks). ``progress(bytes_read)`` is called every few MB and once at the end. A file without
    documents gives zero counts and empty mean/std.
    """
    _check_transform(transform)
    path = os.fspath(path)
    moments = _StreamingMoments()
    num_queries = num_docs = max_list_size = 0
    label_max = -math.inf
    pending: list[dict[int, float]] = []

    def flush() -> None:
        _, cols, values = _flatten(pending)
        moments.add_chunk(len(pending), cols, apply_transform(values, transform))
        pending.clear()

    for _, labels, docs in _iter_groups(path, progress):
        num_queries += 1
        num_docs += len(docs)
        max_list_size = max(max_list_size, len(docs))
        label_max = max(label_max, max(labels))
        pending.extend(docs)
        if len(pending) >= _SCAN_CHUNK_DOCS:
            flush()
    if pending:
        flush()

    num_features = moments.mean.size
    std = np.maximum(np.sqrt(moments.m2 / max(num_docs, 1)), STD_FLOOR) if num_features else np.zeros(0)
    return LetorStats(
        path=path,
        num_features=num_features,
        num_queries=num_queries,
        num_docs=num_docs,
        max_list_size=max_list_size,
        mean=[float(x) for x in moments.mean],
        std=[float(x) for x in std],
        label_max=float(label_max) if num_docs else 0.0,
    )


def iter_letor_lists(path: PathLike) -> Iterator[tuple[str, np.ndarray, list[dict[int, float]]]]:
    """Yield ``(qid, labels float32 [n], docs)`` per query, streaming.

    ``docs[i]`` maps 1-based feature id to raw (untransformed) value, duplicates resolved last-wins.
    Queries must be contiguous: a qid reappearing after another qid raises ValueError naming the file,
    the line and the qid (only after the earlier queries have been yielded).
    """
    for qid, labels, docs in _iter_groups(os.fspath(path)):
        yield qid, np.asarray(labels, dtype=np.float32), docs


def _make_batch(
    group: list[tuple[str, list[float], list[dict[int, float]]]],
    num_features: int,
    list_size: int,
    transform: str,
) -> dict[str, np.ndarray]:
    size = len(group)
    features = np.zeros((size, list_size, num_features), dtype=np.float32)
    label = np.full((size, list_size), PADDING_LABEL, dtype=np.float32)
    mask = np.zeros((size, list_size), dtype=bool)
    qids = np.empty(size, dtype=object)
    all_docs: list[dict[int, float]] = []
    list_index: list[int] = []
    positions: list[int] = []
    for b, (qid, labels, docs) in enumerate(group):
        qids[b] = qid
        label[b, : len(labels)] = labels
        mask[b, : len(labels)] = True
        all_docs.extend(docs)
        list_index.extend([b] * len(docs))
        positions.extend(range(len(docs)))
    counts, cols, values = _flatten(all_docs)
    rows_b = np.repeat(np.asarray(list_index, dtype=np.int64), counts)
    rows_p = np.repeat(np.asarray(positions, dtype=np.int64), counts)
    keep = cols < num_features  # ids beyond num_features are ignored
    features[rows_b[keep], rows_p[keep], cols[keep]] = apply_transform(values[keep], transform)
    return {"features": features, "label": label, "mask": mask, "qid": qids}


def iter_letor_batches(
    path: PathLike,
    num_features: int,
    list_size: int,
    batch_size: int,
    transform: str = "log1p",
    shuffle_docs_seed: int | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield padded listwise batches, one query per row, streaming.

    Each batch is a dict with "features" float32 [B, list_size, num_features] (transformed, NOT
    normalised; 0.0 for missing features and padding), "label" float32 [B, list_size] (-1.0 for
    padding), "mask" bool [B, list_size] (True for real docs) and "qid" object [B] (str).

    Feature ids greater than ``num_features`` are ignored. A query with more than ``list_size`` docs
    keeps its first ``list_size`` docs when ``shuffle_docs_seed`` is None, else a uniformly random
    subset of ``list_size`` docs drawn from ``np.random.default_rng(shuffle_docs_seed)`` (same seed,
    same batches), kept in file order. Shorter queries keep all docs in file order. The last batch
    may hold fewer than ``batch_size`` queries unless ``drop_remainder`` is True.
    """
    _check_transform(transform)
    for name, value in (("num_features", num_features), ("list_size", list_size), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rng = None if shuffle_docs_seed is None else np.random.default_rng(shuffle_docs_seed)
    pending: list[tuple[str, list[float], list[dict[int, float]]]] = []
    for qid, labels, docs in _iter_groups(os.fspath(path)):
        if len(docs) > list_size:
            if rng is None:
                keep = range(list_size)
            else:
                keep = np.sort(rng.choice(len(docs), size=list_size, replace=False)).tolist()
            labels = [labels[i] for i in keep]
            docs = [docs[i] for i in keep]
        pending.append((qid, labels, docs))
        if len(pending) == batch_size:
            yield _make_batch(pending, num_features, list_size, transform)
            pending = []
    if pending and not drop_remainder:
        yield _make_batch(pending, num_features, list_size, transform)
