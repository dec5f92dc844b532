"""Tests for training/letor.py, the streaming LETOR / SVMlight reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from training import letor
from training.letor import LetorStats, iter_letor_batches, iter_letor_lists, scan_letor

SAMPLE_DIR = Path(__file__).parent / "data" / "letor-sample"
TRAIN = SAMPLE_DIR / "train.txt"
VALI = SAMPLE_DIR / "vali.txt"
TEST = SAMPLE_DIR / "test.txt"
# qids of the sample train file in file order (16 and 20 are absent), counted independently of the reader.
TRAIN_QIDS = [str(q) for q in range(1, 30) if q not in (16, 20)]


def write(tmp_path: Path, text: str, name: str = "data.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


# ---------------------------------------------------------------- sample files


def test_scan_sample_train() -> None:
    stats = scan_letor(TRAIN)
    assert isinstance(stats, LetorStats)
    assert stats.path == str(TRAIN)
    assert stats.num_features == 136  # max id in the file is 136 (columns 0..135)
    assert stats.num_queries == 27
    assert stats.num_docs == 119
    assert stats.max_list_size == 9
    assert stats.label_max == 2.0
    assert len(stats.mean) == len(stats.std) == 136
    assert all(s >= 1e-6 for s in stats.std)


@pytest.mark.parametrize("path", [VALI, TEST])
def test_scan_sample_vali_and_test(path: Path) -> None:
    stats = scan_letor(path)
    assert (stats.num_features, stats.num_queries, stats.num_docs, stats.max_list_size) == (136, 9, 36, 9)
    assert stats.label_max == 2.0


def test_vali_and_test_are_identical_so_stats_match() -> None:
    vali, test = scan_letor(VALI), scan_letor(TEST)
    assert vali.mean == test.mean and vali.std == test.std
    assert scan_letor(TRAIN).mean != vali.mean


def test_sample_lists() -> None:
    lists = list(iter_letor_lists(TRAIN))
    assert [qid for qid, _, _ in lists] == TRAIN_QIDS
    assert sum(len(docs) for _, _, docs in lists) == 119
    qid, labels, docs = lists[0]
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 2, 2, 1])
    # Line 1 is "0 qid:1 115:-0.617277 5:-0.109573 17:-0.763873 17:0.369905 ...": unsorted, 17 repeated.
    assert docs[0][17] == pytest.approx(0.369905)
    assert docs[0][115] == pytest.approx(-0.617277)
    assert docs[0][42] == pytest.approx(-0.983709)  # last token of the line
    assert docs[1][39] == pytest.approx(0.857645)  # line 2 has 39:-0.775587 then 39:0.857645
    assert 1 not in docs[0]


def test_sample_batches_cross_the_end_of_file() -> None:
    batches = list(iter_letor_batches(TRAIN, num_features=136, list_size=9, batch_size=10))
    assert [len(b["qid"]) for b in batches] == [10, 10, 7]  # 27 queries, last batch smaller
    assert [q for b in batches for q in b["qid"]] == TRAIN_QIDS
    assert int(sum(b["mask"].sum() for b in batches)) == 119
    dropped = list(iter_letor_batches(TRAIN, 136, 9, 10, drop_remainder=True))
    assert [len(b["qid"]) for b in dropped] == [10, 10]
    for got, want in zip(dropped, batches[:2], strict=True):
        np.testing.assert_array_equal(got["features"], want["features"])

    # Batch contents agree with the per-query lists.
    first = batches[0]
    assert first["features"].shape == (10, 9, 136) and first["features"].dtype == np.float32
    assert first["label"].dtype == np.float32 and first["mask"].dtype == bool
    assert first["qid"].dtype == object
    _, labels, docs = next(iter_letor_lists(TRAIN))
    np.testing.assert_array_equal(first["label"][0, :4], labels)
    assert first["features"][0, 0, 16] == pytest.approx(np.log1p(0.369905), rel=1e-6)
    assert first["features"][0, 0, 114] == pytest.approx(-np.log1p(0.617277), rel=1e-6)


# ---------------------------------------------------------------- parsing rules


def test_duplicate_feature_id_last_value_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "1 qid:7 3:1.0 1:0.5 3:2.0 3:4.0\n0 qid:7 2:9 2:-1\n")
    (qid, labels, docs), *rest = list(iter_letor_lists(path))
    assert rest == [] and qid == "7"
    assert docs == [{3: 4.0, 1: 0.5}, {2: -1.0}]
    (batch,) = iter_letor_batches(path, num_features=3, list_size=2, batch_size=4, transform="none")
    np.testing.assert_array_equal(batch["features"][0], [[0.5, 0.0, 4.0], [0.0, -1.0, 0.0]])
    stats = scan_letor(path, transform="none")
    assert stats.mean == pytest.approx([0.25, -0.5, 2.0])  # the overwritten 1.0, 2.0 and 9 never count


def test_unsorted_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "2 qid:a 9:1.5 2:0.25 5:-3\n")
    ((_, _, docs),) = iter_letor_lists(path)
    assert docs == [{9: 1.5, 2: 0.25, 5: -3.0}]
    (batch,) = iter_letor_batches(path, num_features=9, list_size=1, batch_size=1, transform="none")
    expected = np.zeros(9, dtype=np.float32)
    expected[[8, 1, 4]] = [1.5, 0.25, -3.0]
    np.testing.assert_array_equal(batch["features"][0, 0], expected)


def test_comments_blank_lines_and_whitespace(tmp_path: Path) -> None:
    text = (
        "# header comment\n"
        "\n"
        "2 qid:10 1:0.5 2:1.5 # docid = GX000-00 inc = 1 prob = 0.5\n"
        "   \t \n"
        "1 qid:10 1:0.25#glued comment 2:99\r\n"
        "0\tqid:11\t3:7   # 3:100\n"
        "#1 qid:12 1:1\n"
    )
    path = write(tmp_path, text)
    lists = list(iter_letor_lists(path))
    assert [qid for qid, _, _ in lists] == ["10", "11"]
    np.testing.assert_array_equal(lists[0][1], [2.0, 1.0])
    assert lists[0][2] == [{1: 0.5, 2: 1.5}, {1: 0.25}]  # "2:99" is inside the comment
    assert lists[1][2] == [{3: 7.0}]
    stats = scan_letor(path, transform="none")
    assert (stats.num_docs, stats.num_queries, stats.num_features, stats.max_list_size) == (3, 2, 3, 2)


def test_missing_feature_ids_in_a_query_are_zero(tmp_path: Path) -> None:
    path = write(tmp_path, "1 qid:1\n0 qid:1 2:3\n")
    (batch,) = iter_letor_batches(path, num_features=2, list_size=3, batch_size=1, transform="none")
    np.testing.assert_array_equal(batch["features"][0], [[0, 0], [0, 3], [0, 0]])
    np.testing.assert_array_equal(batch["mask"][0], [True, True, False])


@pytest.mark.parametrize(
    ("line", "token"),
    [
        ("1 qid:1 abc:1.0", "abc"),
        ("1 qid:1 0:1.0", "0"),
        ("1 qid:1 -2:1.0", "-2"),
        ("1 qid:1 +2:1.0", "+2"),
        ("1 qid:1 1.5:1.0", "1.5"),
        ("1 qid:1 3:xyz", "xyz"),
        ("1 qid:1 3:nan", "nan"),
        ("1 qid:1 3:1:2", "3:1:2"),
        ("1 qid:1 3", "'3'"),
        ("1 qid:1 3:", "'3:'"),
        ("1 qid:1 :4", "':4'"),
        ("high qid:1 1:1.0", "high"),
        ("inf qid:1 1:1.0", "inf"),
        ("1 qid: 1:1.0", "qid:"),
    ],
)
def test_bad_tokens_name_path_line_and_token(tmp_path: Path, line: str, token: str) -> None:
    path = write(tmp_path, f"1 qid:1 1:0.5\n\n{line}\n")
    with pytest.raises(ValueError) as excinfo:
        list(iter_letor_lists(path))
    message = str(excinfo.value)
    assert str(path) in message
    assert "line 3" in message
    assert token in message
    with pytest.raises(ValueError, match="line 3"):
        scan_letor(path)


@pytest.mark.parametrize("line", ["1 1:0.5 2:0.3", "1", "qid:1 1:0.5", "1 2:0.5 qid:1"])
def test_missing_qid_is_an_error(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, f"0 qid:1 1:1\n{line}\n")
    with pytest.raises(ValueError) as excinfo:
        list(iter_letor_batches(path, num_features=2, list_size=2, batch_size=1))
    message = str(excinfo.value)
    assert str(path) in message and "line 2" in message
    assert "qid" in message or "label" in message


def test_non_contiguous_qid_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "1 qid:1 1:1\n0 qid:1 1:2\n1 qid:2 1:3\n\n2 qid:1 1:4\n")
    lists = iter_letor_lists(path)
    assert next(lists)[0] == "1"  # streaming: earlier queries are yielded before the error
    with pytest.raises(ValueError) as excinfo:
        list(lists)
    message = str(excinfo.value)
    assert str(path) in message
    assert "line 5" in message
    assert "'1'" in message and "line 1" in message and "contiguous" in message
    with pytest.raises(ValueError, match="line 5"):
        scan_letor(path)
    with pytest.raises(ValueError, match="line 5"):
        list(iter_letor_batches(path, 1, 2, 8))


def test_invalid_arguments(tmp_path: Path) -> None:
    path = write(tmp_path, "1 qid:1 1:1\n")
    with pytest.raises(ValueError, match="transform"):
        scan_letor(path, transform="zscore")
    with pytest.raises(ValueError, match="transform"):
        list(iter_letor_batches(path, 1, 1, 1, transform="log"))
    with pytest.raises(ValueError, match="list_size"):
        list(iter_letor_batches(path, 1, 0, 1))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_letor_batches(path, 1, 1, 0))


# ---------------------------------------------------------------- batches


def test_padding_mask_and_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "3 qid:q1 1:1 2:-2\n0 qid:q1 2:5\n4 qid:q2 1:8\n")
    (batch,) = iter_letor_batches(path, num_features=2, list_size=4, batch_size=8)
    np.testing.assert_array_equal(batch["label"], [[3, 0, -1, -1], [4, -1, -1, -1]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 0, 0], [1, 0, 0, 0]])
    assert list(batch["qid"]) == ["q1", "q2"]
    expected = np.zeros((2, 4, 2))
    expected[0, 0] = [np.log1p(1), -np.log1p(2)]
    expected[0, 1] = [0, np.log1p(5)]
    expected[1, 0] = [np.log1p(8), 0]
    np.testing.assert_allclose(batch["features"], expected, rtol=1e-6)
    assert not batch["features"][~batch["mask"]].any()  # padding rows are all zero


def test_feature_ids_beyond_num_features_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "1 qid:1 1:1 4:2 137:5\n")
    (batch,) = iter_letor_batches(path, num_features=3, list_size=1, batch_size=1, transform="none")
    np.testing.assert_array_equal(batch["features"], [[[1, 0, 0]]])


def _long_list_file(tmp_path: Path, n: int = 12) -> Path:
    # Doc i has label i % 5 and feature 1 == i, so a row of the batch identifies the doc it came from.
    lines = [f"{i % 5} qid:big 1:{i} 2:{100 + i}" for i in range(n)] + ["1 qid:small 1:0.5"]
    return write(tmp_path, "\n".join(lines) + "\n", name="long.txt")


def test_truncation_keeps_first_docs_without_seed(tmp_path: Path) -> None:
    path = _long_list_file(tmp_path)
    (batch,) = iter_letor_batches(path, num_features=2, list_size=4, batch_size=2, transform="none")
    np.testing.assert_array_equal(batch["features"][0, :, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch["label"][0], [0, 1, 2, 3])
    assert batch["mask"][0].all()
    np.testing.assert_array_equal(batch["features"][1, :, 0], [0.5, 0, 0, 0])


def _sampled_docs(path: Path, seed: int) -> list[int]:
    (batch,) = iter_letor_batches(
        path, num_features=2, list_size=4, batch_size=2, transform="none", shuffle_docs_seed=seed
    )
    ids = batch["features"][0, :, 0].astype(int)
    np.testing.assert_array_equal(batch["features"][0, :, 1], 100 + ids)  # features stay aligned
    np.testing.assert_array_equal(batch["label"][0], ids % 5)  # labels stay aligned with their doc
    np.testing.assert_array_equal(batch["features"][1, 0, 0], 0.5)  # short list untouched
    return ids.tolist()


def test_seeded_sampling_is_deterministic(tmp_path: Path) -> None:
    path = _long_list_file(tmp_path)
    first = _sampled_docs(path, seed=123)
    assert _sampled_docs(path, seed=123) == first
    assert len(set(first)) == 4 and first == sorted(first) and set(first) <= set(range(12))
    samples = {tuple(_sampled_docs(path, seed)) for seed in range(8)}
    assert len(samples) > 1  # the seed matters
    assert samples != {(0, 1, 2, 3)}  # and it is not just truncation


# ---------------------------------------------------------------- statistics


def _random_file(tmp_path: Path, seed: int, offset: float = 0.0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small LETOR file and the dense matrix it encodes (missing entries = 0, decoy duplicates)."""
    rng = np.random.default_rng(seed)
    num_docs, num_features = 41, 7
    dense = offset + rng.normal(0.0, 3.0, size=(num_docs, num_features)) ** 3
    dense[rng.random(dense.shape) < 0.3] = 0.0
    dense[:, 5] = 0.0  # a feature that never appears (but a higher id does)
    labels = rng.integers(0, 5, size=num_docs).astype(float)
    lines = []
    for i in range(num_docs):
        present = [j for j in rng.permutation(num_features) if dense[i, j] != 0.0]
        tokens = [f"{j + 1}:{dense[i, j]!r}" for j in present]
        if present:
            tokens.insert(0, f"{present[-1] + 1}:12345.0")  # decoy overwritten by the later token
        lines.append(f"{labels[i]:g} qid:{i // 5} " + " ".join(tokens) + f" # doc {i}")
    path = write(tmp_path, "\n".join(lines) + "\n", name=f"random{seed}.txt")
    return path, dense, labels


@pytest.mark.parametrize("chunk_docs", [3, 16384])
@pytest.mark.parametrize("transform", ["none", "log1p"])
def test_stats_match_numpy_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transform: str, chunk_docs: int
) -> None:
    monkeypatch.setattr(letor, "_SCAN_CHUNK_DOCS", chunk_docs)
    path, dense, labels = _random_file(tmp_path, seed=5)
    stats = scan_letor(path, transform=transform)
    x = signed_log1p(dense) if transform == "log1p" else dense
    assert stats.num_docs == 41 and stats.num_queries == 9 and stats.max_list_size == 5
    assert stats.num_features == 7
    assert stats.label_max == labels.max()
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.std, np.maximum(x.std(axis=0), 1e-6), rtol=1e-10, atol=1e-12)
    assert stats.mean[5] == 0.0 and stats.std[5] == 1e-6  # all-zero feature: std floored


def test_stats_are_numerically_stable_with_a_large_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Values around 1e8 with spread ~1: a naive E[x^2] - E[x]^2 loses every significant digit.
    monkeypatch.setattr(letor, "_SCAN_CHUNK_DOCS", 4)
    rng = np.random.default_rng(0)
    values = 1e8 + rng.normal(0.0, 1.0, size=50)
    path = write(tmp_path, "".join(f"0 qid:{i // 10} 1:{v!r}\n" for i, v in enumerate(values)))
    stats = scan_letor(path, transform="none")
    assert stats.mean[0] == pytest.approx(values.mean(), rel=1e-14)
    assert stats.std[0] == pytest.approx(values.std(), rel=1e-6)


def test_stats_of_an_empty_file(tmp_path: Path) -> None:
    stats = scan_letor(write(tmp_path, "# nothing here\n\n"))
    assert (stats.num_docs, stats.num_queries, stats.num_features) == (0, 0, 0)
    assert stats.mean == [] and stats.std == []


def test_progress_reports_bytes_read(tmp_path: Path) -> None:
    seen: list[int] = []
    scan_letor(TRAIN, progress=seen.append)
    assert seen and seen[-1] == TRAIN.stat().st_size
    assert seen == sorted(seen)


def test_empty_split_is_an_error_naming_it(tmp_path):
    from typer.testing import CliRunner

    from marketrank.cli import app

    for name in ("train", "vali", "test"):
        shutil.copy(TRAIN, tmp_path / f"{name}.txt")
    (tmp_path / "vali.txt").write_text("# only a comment\n\n")
    result = CliRunner().invoke(app, ["train", "--letor", str(tmp_path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "vali split" in result.output and "holds no ranking lists" in result.output
