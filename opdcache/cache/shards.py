"""Reading and writing cache and score shards: validated, zstd Parquet, never half-visible."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opdcache.cache.schema import (
    CACHE_COLUMNS,
    CACHE_META_KEY,
    LOGPROB_MANTISSA_BITS,
    ROLLOUT_COLUMNS,
    ROLLOUT_META_KEY,
    SCHEMA_VERSION,
    SCORE_META_KEY,
    VARIANT_META_KEY,
    CacheMeta,
    Column,
    cache_schema,
)
from opdcache.errors import CacheFormatError, OpdcacheError
from opdcache.rundir import RunDir, atomic_write_bytes, temp_path_for

ROW_GROUP_POSITIONS = 1 << 20  # ~1M positions per row group keeps decode buffers ~100 MB


def round_mantissa(x: np.ndarray, bits: int = LOGPROB_MANTISSA_BITS) -> np.ndarray:
    """Round float32 values to ``bits`` mantissa bits (round half to even); exponent range kept."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    drop = np.uint32(23 - bits)
    half = np.uint32((1 << (23 - bits - 1)) - 1)
    out = (u + half + ((u >> drop) & np.uint32(1))) & ~np.uint32((1 << (23 - bits)) - 1)
    out = np.where(np.isfinite(x), out, u)  # leave inf/nan bit patterns alone
    return out.view(np.float32)


def flat(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, int64 offsets starting at 0); zero-copy where possible."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def list_array(values: np.ndarray, offsets: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values, type=type_.value_type)
    )


def _as_column(value: Any, col: Column) -> pa.Array:
    try:
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        arr = value if isinstance(value, pa.Array) else pa.array(value)
        return arr.cast(col.type) if arr.type != col.type else arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise CacheFormatError(f"column {col.name!r}: cannot convert to {col.type} ({e})") from e


def _check_lengths(table: pa.Table, columns: Sequence[Column], k: int, where: str) -> None:
    """Per-position columns must have T values per row and top-k columns T*k."""
    ref = next((c for c in columns if c.extent == "position"), None)
    if ref is None:
        return
    t = np.diff(flat(table.column(ref.name))[1])
    for col in columns:
        if col.extent == "response" or col.name == ref.name:
            continue
        n = np.diff(flat(table.column(col.name))[1])
        want = t * (k if col.extent == "topk" else 1)
        if (bad := np.flatnonzero(n != want)).size:
            i = int(bad[0])
            raise CacheFormatError(
                f"{where}: column {col.name!r} row {i} has {n[i]} values, expected {want[i]} "
                f"({ref.name} has {t[i]} positions{f', times k={k}' if col.extent == 'topk' else ''})"
            )


def check_finite(table: pa.Table, columns: Sequence[Column], where: str) -> None:
    for col in columns:
        if col.is_logprob:
            v = flat(table.column(col.name))[0]
            if not np.isfinite(v).all():
                i = int(np.flatnonzero(~np.isfinite(v))[0])
                raise CacheFormatError(f"{where}: column {col.name!r} holds {v[i]} at value {i}")


def manifest_path(path: Path) -> Path:
    """The integrity record of a part: ``_<name>.json`` beside it (ignored by Parquet readers)."""
    return path.with_name(f"_{path.name}.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_manifest(path: Path, full: bool = False) -> dict[str, Any]:
    """Compare a part with the record written beside it: bytes and rows always, sha256 if ``full``."""
    mpath = manifest_path(path)
    try:
        record = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CacheFormatError(f"{path}: no integrity record {mpath.name}; not written by opdcache") from None
    except (OSError, ValueError) as e:
        raise CacheFormatError(f"{mpath}: unreadable integrity record ({e})") from e
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise CacheFormatError(
            f"{path}: {size} bytes, but {record.get('bytes')} were written (truncated or replaced)"
        )
    rows = open_parquet(path).metadata.num_rows  # a damaged footer is a CacheFormatError too
    if rows != record.get("rows"):
        raise CacheFormatError(f"{path}: {rows} rows, but {record.get('rows')} were written")
    if full and file_sha256(path) != record.get("sha256"):
        raise CacheFormatError(f"{path}: sha256 differs from the one recorded at write time (corrupted)")
    return record


def _lost(base: Path) -> list[tuple[Path, str]]:
    """(part, record name) of every integrity record under ``base`` whose part is gone."""
    out = []
    for m in sorted(base.glob("_*.parquet.json")):
        part = m.with_name(m.name[1:-5])
        if not part.exists():
            out.append((part, m.name))
    return out


def check_no_lost_part(run: RunDir, r: int) -> None:
    """Cache round ``r`` has no integrity record whose part is gone (a rollout part the teacher is still
    completing excepted: its record may land just before its part)."""
    for part, record in _lost(run.cache_round(r)):
        if not (run.rollout_round(r) / part.name).exists():
            raise CacheFormatError(
                f"{part}: missing, though its integrity record {record} remains; round {r} would be read without it"
            )


def check_no_lost_score_part(run: RunDir, variant: str, r: int) -> None:
    """Score round ``r`` of ``variant`` has no integrity record whose part is gone (lost, or a write
    killed between the two renames: either way the round is not whole)."""
    if lost := _lost(run.score_round(variant, r)):
        part, record = lost[0]
        raise CacheFormatError(
            f"{part}: missing, though its integrity record {record} remains; round {r} of {variant!r} "
            f"would be read without it (re-score: `opdcache score {run.root} --variant {variant} --rounds {r}`)"
        )


def check_run_parts(run: RunDir) -> None:
    """Every cache and score part of the run matches its record, and no part is lost: what a command
    that reads the whole run (the metrics files, the query views, a pack) checks before it reads."""
    for r in run.rounds():
        check_no_lost_part(run, r)
        for p in run.shards(run.cache_round(r)):
            check_manifest(p)
    for v in run.variants():
        for r in run.rounds(run.variant(v)):
            check_no_lost_score_part(run, v, r)
            for p in run.shards(run.score_round(v, r)):
                check_manifest(p)


def find_failing_page(parts: list[Path]) -> Path | None:
    """The first of ``parts`` with a page that fails its checksum (None if every page decodes)."""
    for p in parts:
        try:
            pq.ParquetFile(p, page_checksum_verification=True).read()
        except (OSError, ValueError, pa.ArrowException):
            return p
    return None


def whole_round(run: RunDir, r: int, variant: str | None = None) -> list[Path]:
    """A reader's inputs: the cache parts of round ``r`` (with ``variant``, that variant's score parts,
    one per cache part), each checked against its integrity record (bytes, rows). A round that is not
    whole is an error naming the file, never a smaller round: a rollout part the teacher has not
    completed, a part missing while its record remains, a ``.parquet`` with no record (not written by
    opdcache), a part that differs from its record, a cache part not scored."""
    base = run.cache_round(r)
    if pending := [p for p in run.shards(run.rollout_round(r)) if not (base / p.name).exists()]:
        raise OpdcacheError(
            f"{pending[0]}: round {r}'s rollout part is not yet completed by the teacher; run "
            f"`opdcache teacher {run.root} --round {r}` first"
        )
    check_no_lost_part(run, r)
    parts = run.shards(base)
    if not parts:
        raise OpdcacheError(f"{base}: no cache parts")
    for p in parts:
        check_manifest(p)
    if variant is None:
        return parts
    sbase = run.score_round(variant, r)
    scored = run.shards(sbase)
    if extra := sorted({p.name for p in scored} - {p.name for p in parts}):
        raise CacheFormatError(f"{sbase / extra[0]}: a score part with no cache part {base / extra[0]}")
    if missing := [p.name for p in parts if not (sbase / p.name).exists()]:
        raise OpdcacheError(
            f"{sbase / missing[0]}: missing ({len(scored)} of {len(parts)} cache parts scored); score round "
            f"{r} as {variant!r} first (`opdcache score {run.root} --variant {variant} --rounds {r}`)"
        )
    check_no_lost_score_part(run, variant, r)
    for p in scored:
        check_manifest(p)
    return scored


def write_parquet(path: Path, table: pa.Table, positions: int) -> None:
    """Write ``table`` as zstd Parquet to a hidden temporary name, fsync, then rename into place.

    Its integrity record (rows, positions, bytes, sha256) is renamed into place just before it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    numeric = [  # Parquet names a list's values "<name>.list.element"
        f"{f.name}.list.element"
        for f in table.schema
        if pa.types.is_list(f.type) and f.type.value_type in (pa.int32(), pa.float32())
    ]
    rows_per_group = max(1, int(table.num_rows * ROW_GROUP_POSITIONS / max(positions, 1)))
    try:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=rows_per_group,
            use_dictionary=[f.name for f in table.schema if f.type == pa.string()],
            use_byte_stream_split=numeric,
            write_page_checksum=True,
        )
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        record = {
            "rows": table.num_rows,
            "positions": positions,
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
        }
        atomic_write_bytes(manifest_path(path), json.dumps(record).encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_cache_shard(path: Path, columns: Mapping[str, Any], meta: CacheMeta, rollout: bool = False) -> int:
    """Validate and write one cache shard (or, with ``rollout``, a student-only rollout part).

    Returns the number of positions written.
    """
    where = str(path)
    spec = ROLLOUT_COLUMNS if rollout else CACHE_COLUMNS
    missing = [c.name for c in spec if c.name not in columns]
    extra = sorted(set(columns) - {c.name for c in spec})
    if missing or extra:
        raise CacheFormatError(f"{where}: missing columns {missing}, unknown columns {extra}")
    if meta.k < 1:
        raise CacheFormatError(f"{where}: k must be >= 1, got {meta.k}")
    arrays = {}
    for col in spec:
        arr = _as_column(columns[col.name], col)
        if arr.null_count:
            raise CacheFormatError(f"{where}: column {col.name!r} has {arr.null_count} nulls")
        if col.is_logprob:
            values, offsets = flat(arr)
            arr = list_array(round_mantissa(values), offsets, col.type)
        arrays[col.name] = arr
    key = ROLLOUT_META_KEY if rollout else CACHE_META_KEY
    table = pa.table(arrays, schema=cache_schema(meta, spec, key))
    _check_lengths(table, spec, meta.k, where)
    check_finite(table, spec, where)
    positions = len(flat(table.column("response_ids"))[0])
    if positions * meta.k >= 2**31:
        raise CacheFormatError(f"{where}: {positions} positions x k={meta.k} exceeds one shard")
    write_parquet(path, table, positions)
    return positions


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise CacheFormatError(f"{path}: not a readable Parquet file ({e})") from e


def _file_meta(pf: pq.ParquetFile, key: bytes, path: Path) -> dict[str, Any]:
    kv = pf.schema_arrow.metadata or {}
    if key not in kv:
        raise CacheFormatError(f"{path}: no {key.decode()!r} metadata; not an opdcache file of this kind")
    try:
        data = json.loads(kv[key])
    except ValueError as e:
        raise CacheFormatError(f"{path}: {key.decode()!r} metadata is not JSON ({e})") from e
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheFormatError(
            f"{path}: schema version {version}, but this opdcache reads version {SCHEMA_VERSION}; "
            "re-create the file with this version or use the opdcache release that wrote it"
        )
    return data


def _check_types(pf: pq.ParquetFile, wanted: Sequence[Column], path: Path) -> None:
    schema = pf.schema_arrow
    for col in wanted:
        idx = schema.get_field_index(col.name)
        if idx < 0:
            raise CacheFormatError(f"{path}: missing column {col.name!r} ({col.doc})")
        if schema.field(idx).type != col.type:
            raise CacheFormatError(
                f"{path}: column {col.name!r} has type {schema.field(idx).type}, expected {col.type}"
            )


def read_cache_meta(path: Path, rollout: bool = False) -> CacheMeta:
    pf = open_parquet(path)
    key = ROLLOUT_META_KEY if rollout else CACHE_META_KEY
    return CacheMeta.from_dict(_file_meta(pf, key, path))


def read_cache_shard(
    path: Path, columns: Sequence[str] | None = None, validate: bool = True, rollout: bool = False
) -> tuple[pa.Table, CacheMeta]:
    """Read (some columns of) a cache shard (or rollout part), checking version, columns, types and list lengths."""
    spec = ROLLOUT_COLUMNS if rollout else CACHE_COLUMNS
    by_name = {c.name: c for c in spec}
    names = list(columns) if columns is not None else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CacheFormatError(f"unknown {'rollout' if rollout else 'cache'} columns {unknown}")
    pf = open_parquet(path)
    key = ROLLOUT_META_KEY if rollout else CACHE_META_KEY
    meta = CacheMeta.from_dict(_file_meta(pf, key, path))
    wanted = [by_name[n] for n in names]
    _check_types(pf, wanted, path)
    try:
        table = pf.read(columns=names)
    except (OSError, pa.ArrowException) as e:
        raise CacheFormatError(f"{path}: corrupt data ({e})") from e
    if validate:
        _check_lengths(table, wanted, meta.k, str(path))
        check_manifest(path)
    return table, meta


def read_score_shard(
    path: Path, columns: Sequence[Column], validate: bool = True
) -> tuple[pa.Table, dict[str, Any]]:
    """Read a score shard; returns the table and its variant parameters."""
    pf = open_parquet(path)
    _file_meta(pf, SCORE_META_KEY, path)
    variant = json.loads((pf.schema_arrow.metadata or {}).get(VARIANT_META_KEY, b"{}"))
    _check_types(pf, columns, path)
    try:
        table = pf.read(columns=[c.name for c in columns])
    except (OSError, pa.ArrowException) as e:
        raise CacheFormatError(f"{path}: corrupt data ({e})") from e
    if validate:
        _check_lengths(table, columns, 1, str(path))
        check_manifest(path)
    return table, variant


def score_file_metadata(variant: Mapping[str, Any], source: str, rows: int) -> dict[bytes, bytes]:
    info = {"schema_version": SCHEMA_VERSION, "source": source, "rows": rows}
    return {
        SCORE_META_KEY: json.dumps(info).encode(),
        VARIANT_META_KEY: json.dumps(variant).encode(),
    }


def read_variant_params(path: Path) -> dict[str, Any]:
    """The ``opdcache.variant`` parameters stored in a score part."""
    return json.loads((open_parquet(path).schema_arrow.metadata or {}).get(VARIANT_META_KEY, b"{}"))
