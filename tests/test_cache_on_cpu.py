"""The cache contract: round trip, precision, and one clear error per kind of bad shard."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opdcache.cache import shards
from opdcache.cache.schema import CACHE_COLUMNS, CACHE_META_KEY, CacheMeta, cache_schema
from opdcache.cache.shards import flat, read_cache_shard, round_mantissa, write_cache_shard
from opdcache.cache.synthetic import synthetic_columns
from opdcache.errors import CacheFormatError

META = CacheMeta(k=4, student_model="s", teacher_model="t", tokenizer_fingerprint="abc")


def _cols(**kw):
    return synthetic_columns(3, n_samples=2, mean_len=20, max_tokens=40, vocab=1000, k=4, seed=1, **kw)


def test_round_trip_exact_ids_and_fp16_precision(tmp_path):
    cols = _cols()
    path = tmp_path / "round=0" / "part-00000.parquet"
    n = write_cache_shard(path, cols, META)
    table, meta = read_cache_shard(path)
    assert meta == META and n == sum(len(r) for r in cols["response_ids"])
    for c in CACHE_COLUMNS:
        got = table.column(c.name).to_pylist()
        if c.is_logprob:
            want = np.concatenate(cols[c.name])
            v = np.concatenate([np.asarray(x, np.float32) for x in got])
            assert np.all(np.abs(v - want) <= np.abs(want) * 2.0**-11)  # fp16 relative precision
        else:
            want = [list(x) if isinstance(x, np.ndarray) else x for x in cols[c.name]]
            assert got == [x.tolist() if isinstance(x, np.ndarray) else x for x in want], c.name
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, f"_{path.name}.json"]
    )  # no temporary


def test_round_mantissa():
    x = np.array([-0.1, -1e-7, -12.3456, -3e5, 0.0, -np.inf], dtype=np.float32)
    y = round_mantissa(x)
    assert np.all(np.abs(y[:4] - x[:4]) <= np.abs(x[:4]) * 2.0**-11)
    assert y[4] == 0 and y[5] == -np.inf
    np.testing.assert_array_equal(round_mantissa(y), y)  # idempotent
    assert np.unique(round_mantissa(np.linspace(-1, -0.5, 10000, dtype=np.float32))).size <= 1025


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("teacher_topk_ids"), "missing columns \\['teacher_topk_ids'\\]"),
        (lambda c: c.__setitem__("extra", [1] * 6), "unknown columns \\['extra'\\]"),
        (
            lambda c: c["student_logprob"].__setitem__(2, c["student_logprob"][2][:-1]),
            "'student_logprob' row 2 has .* values, expected",
        ),
        (lambda c: c["teacher_topk_ids"].__setitem__(1, c["teacher_topk_ids"][1][:-1]), "times k=4"),
        (lambda c: c["teacher_logprob"][0].__setitem__(0, np.nan), "'teacher_logprob' holds nan"),
        (lambda c: c["student_topk_logprobs"][0].__setitem__(3, np.inf), "holds inf"),
        (lambda c: c.__setitem__("sample", ["a"] * 6), "column 'sample': cannot convert"),
    ],
)
def test_write_rejects_bad_columns_and_writes_nothing(tmp_path, mutate, message):
    cols = _cols()
    mutate(cols)
    path = tmp_path / "p.parquet"
    with pytest.raises(CacheFormatError, match=message):
        write_cache_shard(path, cols, META)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(table, where, **kw):
        open(where, "wb").write(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.pq, "write_table", boom)
    with pytest.raises(OSError, match="No space"):
        write_cache_shard(tmp_path / "p.parquet", _cols(), META)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "p.parquet"
    write_cache_shard(path, _cols(), META)
    return path


def test_corrupt_shard(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFormatError, match=f"{shard}: not a readable Parquet file"):
        read_cache_shard(shard)


def test_flipped_bytes_in_data_pages_are_caught(shard):
    data = bytearray(shard.read_bytes())
    for i in range(200, 1200, 7):  # inside the first data pages, not the footer
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match=str(shard)):
        read_cache_shard(shard)


def _rewrite(path, table, meta_json):
    pq.write_table(table.replace_schema_metadata({CACHE_META_KEY: json.dumps(meta_json).encode()}), path)


def test_other_schema_version(shard):
    table = pq.read_table(shard)
    _rewrite(shard, table, {"k": 4, "schema_version": 99})
    with pytest.raises(CacheFormatError, match="schema version 99, but this opdcache reads version 1"):
        read_cache_shard(shard)


def test_missing_column_and_wrong_type(shard):
    table = pq.read_table(shard)
    _rewrite(shard, table.drop_columns(["teacher_topk_ids"]), {"k": 4, "schema_version": 1})
    with pytest.raises(CacheFormatError, match=f"{shard}: missing column 'teacher_topk_ids'"):
        read_cache_shard(shard)
    read_cache_shard(shard, ["student_topk_ids"], validate=False)  # columns not asked for are not required
    col = table.column("sample").cast(pa.int64())
    _rewrite(shard, table.set_column(1, "sample", col), {"k": 4, "schema_version": 1})
    with pytest.raises(CacheFormatError, match="column 'sample' has type int64, expected int32"):
        read_cache_shard(shard)


def test_not_an_opdcache_file(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    with pytest.raises(CacheFormatError, match="no 'opdcache.cache' metadata"):
        read_cache_shard(path)


def test_read_checks_list_lengths(shard):
    table = pq.read_table(shard)
    values, offsets = flat(table.column("teacher_logprob"))
    offsets = offsets.copy()
    offsets[1:] -= 1  # row 0 loses a value
    bad = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values[1:]))
    table = table.set_column(table.schema.get_field_index("teacher_logprob"), "teacher_logprob", bad)
    _rewrite(shard, table, {"k": 4, "schema_version": 1})
    with pytest.raises(CacheFormatError, match="'teacher_logprob' row 0 has"):
        read_cache_shard(shard)


def test_schema_carries_metadata():
    schema = cache_schema(META)
    assert json.loads(schema.metadata[CACHE_META_KEY])["tokenizer_fingerprint"] == "abc"
    assert [f.name for f in schema] == [c.name for c in CACHE_COLUMNS]
