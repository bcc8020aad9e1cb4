"""Integrity records written with every part, checked on read and by `opdcache verify`."""

import json

import pytest

from opdcache.cache import shards
from opdcache.cache.shards import manifest_path, read_cache_shard
from opdcache.cli import main
from opdcache.errors import CacheFormatError
from opdcache.score.stage import score_run
from opdcache.variant import VariantSpec
from opdcache.verify import verify_run


def test_clean_run_verifies(synth_run):
    score_run(synth_run, "prune", VariantSpec(), progress=False)
    n, findings = verify_run(synth_run, progress=False)
    assert n == 8 and findings == []
    part = synth_run.shards(synth_run.cache_round(0))[0]
    record = json.loads(manifest_path(part).read_text())
    assert record["rows"] == 12 and record["bytes"] == part.stat().st_size and len(record["sha256"]) == 64


def test_a_flipped_bit_is_found_and_named(synth_run, capsys):
    part = synth_run.shards(synth_run.cache_round(1))[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01
    part.write_bytes(bytes(data))
    _, findings = verify_run(synth_run, progress=False)
    assert [f.path for f in findings] == [str(part)] and "sha256 differs" in findings[0].problem
    assert main(["verify", str(synth_run.root), "--quiet"]) == 2
    assert "1 of 4 parts failed" in capsys.readouterr().err


def test_replaced_part_is_refused_on_read(synth_run):
    a, b = synth_run.shards(synth_run.cache_round(0))
    a.write_bytes(b.read_bytes())  # a valid Parquet file, but not the one written here
    with pytest.raises(CacheFormatError, match="bytes, but .* were written|rows, but"):
        read_cache_shard(a)
    manifest_path(b).unlink()
    with pytest.raises(CacheFormatError, match="no integrity record"):
        read_cache_shard(b)


def test_interrupted_write_leftovers_are_notes(synth_run):
    part = synth_run.shards(synth_run.cache_round(0))[0]
    rollouts = synth_run.rollout_round(0)
    rollouts.mkdir(parents=True)
    orphan = rollouts / "part-00077.parquet"  # a rollout write killed between its record and its part
    manifest_path(orphan).write_text(manifest_path(part).read_text())
    (part.parent / ".part-00078.parquet.123.tmp").write_bytes(b"PAR1")
    _, findings = verify_run(synth_run, progress=False)
    assert {f.severity for f in findings} == {"note"} and len(findings) == 2


def test_a_cache_record_without_its_part_is_a_lost_part(synth_run):
    """In cache/ a record lands just before its part, and the rollout part goes only after: a record
    with neither part is a part lost (issue 44), an error, not a note."""
    part = synth_run.shards(synth_run.cache_round(0))[0]
    part.unlink()
    _, findings = verify_run(synth_run, progress=False)
    assert [(f.severity, f.path) for f in findings] == [("error", str(part))]


def test_a_partly_scored_round_is_a_note(synth_run):
    score_run(synth_run, "prune", VariantSpec(), progress=False)
    gone = synth_run.shards(synth_run.score_round("prune", 1))[0]
    gone.unlink()
    manifest_path(gone).unlink()
    _, findings = verify_run(synth_run, progress=False)
    assert [(f.path, f.severity) for f in findings] == [(str(synth_run.score_round("prune", 1)), "note")]
    assert "1 of 2 cache parts scored" in findings[0].problem


def test_disk_full_while_writing_the_record_leaves_nothing(tmp_path, monkeypatch):
    from opdcache.cache.schema import CacheMeta
    from opdcache.cache.synthetic import synthetic_columns

    def enospc(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "atomic_write_bytes", enospc)
    with pytest.raises(OSError, match="No space"):
        shards.write_cache_shard(
            tmp_path / "p.parquet",
            synthetic_columns(2, mean_len=10, max_tokens=20, vocab=100, k=4),
            CacheMeta(k=4),
        )
    assert list(tmp_path.iterdir()) == []
