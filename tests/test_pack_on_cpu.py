"""`opdcache pack` / `unpack`: a run travels as one .tar.zst and arrives whole, checked, or not at all."""

import hashlib
import io
import os
import re
import shutil
import tarfile

import pytest
import zstandard

from opdcache.cache.shards import manifest_path
from opdcache.cache.synthetic import write_synthetic_run
from opdcache.cli import main
from opdcache.errors import OpdcacheError
from opdcache.lock import RunLock
from opdcache.pack import pack_run, unpack_run
from opdcache.rundir import RunDir

LOCAL_ONLY = {".staging", ".lock", ".lock.gate", "opdcache.duckdb", ".opdcache.duckdb.99999.tmp"}


def _tree(root, skip=LOCAL_ONLY):
    """relative path -> sha256 of a file, "link:<target>" or "dir", computed without opdcache."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [n for n in dirs if n not in skip]
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if name in skip:
                continue
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _members(archive):
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z:
        with tarfile.open(fileobj=z, mode="r|") as tar:
            return [m.name for m in tar]


def _no_staging(dest):
    return not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.unpacking")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small synthetic run with config, budget, a scored variant, a score-only replay (its cache a
    link), a checkpoint, an eval result and the local-only files that must stay behind."""
    root = tmp_path_factory.mktemp("pack") / "run"
    run = write_synthetic_run(
        root, rounds=2, parts_per_round=2, prompts_per_part=4, mean_len=200, max_tokens=512, k=8, vocab=5000
    )
    assert main(["init", str(root), "--set", "budget.initial=256", "--set", "budget.min=64"]) == 0
    assert main(["score", str(root), "--quiet"]) == 0
    assert main(["replay", str(root), "--variant", "g08", "--gamma", "0.8", "--no-train", "--quiet"]) == 0
    run.checkpoint(1).mkdir(parents=True)
    (run.checkpoint(1) / "model.safetensors").write_bytes(os.urandom(3000))
    run.eval_result(1).parent.mkdir()
    run.eval_result(1).write_text('{"accuracy": 0.5}\n')
    (run.staging / "work-1").mkdir(parents=True, exist_ok=True)
    (root / ".opdcache.duckdb.99999.tmp").write_bytes(b"a view refresh of a concurrent query")
    assert (root / "opdcache.duckdb").exists() and (root / "replays" / "g08" / "cache").is_symlink()
    return run


@pytest.fixture(scope="module")
def archive(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("archives") / "run.tar.zst"
    pack_run(run, out, progress=False)
    return out


def test_pack_unpack_verify_byte_identical(run, tmp_path, capsys):
    out, dest = tmp_path / "r.tar.zst", tmp_path / "copy"
    assert main(["pack", str(run.root), str(out), "--quiet"]) == 0
    assert "MB/s" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert main(["unpack", str(out), str(dest), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "12 Parquet parts checked" in said and "MB/s" in said  # 4 cache + 4 prune + 4 g08
    assert main(["verify", str(dest), "--quiet"]) == 0
    original = _tree(run.root)
    assert _tree(dest) == original
    assert (
        original["replays/g08/cache"] == "link:../../cache"
        and "checkpoints/round=1/model.safetensors" in original
    )
    assert {"config.yaml", "budget.json", "stage_times.jsonl", "eval/round=1.json"} <= set(original)
    names = _members(out)
    assert not [n for n in names if set(n.split("/")) & LOCAL_ONLY]
    assert (dest / "opdcache.duckdb").exists()  # views recreated for the new location
    assert main(["query", str(dest), "select count(*) from scores"]) == 0
    assert _no_staging(dest)


def test_only_selected_components_and_replay_matches(run, tmp_path):
    out, dest = tmp_path / "small.tar.zst", tmp_path / "small"
    res = pack_run(run, out, ["cache", "config", "budget"], progress=False)
    assert res.components == ["budget.json", "cache", "config.yaml"] and res.mb_per_s > 0
    names = _members(out)
    assert {n.split("/")[0] for n in names} == {"cache", "config.yaml", "budget.json"}
    want = {k for k in _tree(run.root) if k.split("/")[0] in ("cache", "config.yaml", "budget.json")}
    assert set(names) == want
    got = unpack_run(out, dest, progress=False)
    assert got.parts_checked == 4 and got.files == res.files and got.bytes == res.bytes
    assert _tree(dest) == {k: v for k, v in _tree(run.root).items() if k in want}

    # the same score-only replay on the original and on the unpacked copy: identical score parts
    original = tmp_path / "original"
    shutil.copytree(run.root, original, symlinks=True)
    for root in (original, dest):
        args = ["replay", str(root), "--variant", "g07", "--gamma", "0.7", "--no-train", "--quiet"]
        assert main(args) == 0
    a, b = (_tree(RunDir(r).replay("g07").scores) for r in (original, dest))
    assert a == b and sum(k.endswith(".parquet") for k in a) == 4


def test_unknown_component_lists_the_valid_ones(run, tmp_path, capsys):
    with pytest.raises(OpdcacheError, match=r"unknown components \['cash'\]; valid: cache, rollouts, scores"):
        pack_run(run, tmp_path / "x.tar.zst", ["cash"], progress=False)
    assert main(["pack", str(run.root), str(tmp_path / "x.tar.zst"), "--only", "cache,rollouts"]) == 2
    assert "no rollouts (rollouts)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _damage_flip(data):
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]


def _damage_header(data):
    """A tar header made unreadable, then compressed again (so zstd itself finds nothing wrong)."""
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    i = tar.index(b"cache/round=0/part-00000.parquet\0")  # its header's name field
    return zstandard.ZstdCompressor().compress(tar[:i] + b"X" + tar[i + 1 :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (_damage_flip, "member "),  # mostly a Parquet part: named by its record
        (lambda d: d[: len(d) * 2 // 3], "damaged .*truncated"),
        (lambda d: d[:-3], "damaged after member .*truncated"),  # only the frame checksum is cut
        (lambda d: d + b"\0junk", "data after the end"),
        (_damage_header, "unreadable tar header"),  # tarfile alone would just stop there
    ],
    ids=["flipped", "truncated", "truncated_tail", "trailing", "tar_header"],
)
def test_damaged_archive_is_refused_and_nothing_is_left(archive, tmp_path, damage, message):
    bad, dest = tmp_path / "bad.tar.zst", tmp_path / "dest"
    bad.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(OpdcacheError, match=f"{re.escape(str(bad))}: .*{message}"):
        unpack_run(bad, dest, progress=False)
    assert not dest.exists() and _no_staging(dest)


@pytest.mark.parametrize("what", ["part", "record"])
def test_part_damaged_before_packing_is_refused(run, tmp_path, what):
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, symlinks=True)
    part = copy.shards(copy.cache_round(1))[1]
    if what == "part":  # same size, record untouched: only the sha256 can tell
        data = bytearray(part.read_bytes())
        data[len(data) // 3] ^= 0x01
        part.write_bytes(bytes(data))
    else:
        manifest_path(part).unlink()
    out = tmp_path / "r.tar.zst"
    message = "sha256 differs" if what == "part" else "no integrity record"
    with pytest.raises(OpdcacheError, match=f"{re.escape(str(part))}: {message}"):
        pack_run(copy, out, progress=False)  # checked before a byte is written: no archive of damage
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pack_refuses_to_overwrite(run, archive, tmp_path, capsys):
    out = tmp_path / "r.tar.zst"
    out.write_bytes(b"keep me")
    assert main(["pack", str(run.root), str(out), "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["pack", str(run.root), str(out), "--quiet", "--force"]) == 0
    assert _members(out) == _members(archive)
    with pytest.raises(OpdcacheError, match="inside the run"):
        pack_run(run, run.root / "self.tar.zst", progress=False)


def test_unpack_refuses_a_non_empty_dest(archive, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("x")
    with pytest.raises(OpdcacheError, match="exists and is not empty"):
        unpack_run(archive, dest, progress=False)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"] and _no_staging(dest)
    (dest / "mine.txt").unlink()
    assert unpack_run(archive, dest, progress=False).parts_checked == 12  # an empty DEST is fine


def _archive(path, members):
    """A .tar.zst of (name, type, payload or link target) members, written without opdcache."""
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
        with tarfile.open(fileobj=z, mode="w|") as tar:
            for name, kind, value in members:
                info = tarfile.TarInfo(name)
                if kind == "file":
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))
                else:
                    info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[
                        kind
                    ]
                    info.linkname = value
                    tar.addfile(info)


@pytest.mark.parametrize(
    "members, bad",
    [
        ([("ok.txt", "file", b"1"), ("../evil", "file", b"x")], "../evil"),
        ([("/tmp/evil-abs", "file", b"x")], "/tmp/evil-abs"),
        ([("l", "sym", "../../evil")], "l"),
        ([("l", "sym", "/etc")], "l"),
        ([("h", "hard", "/etc/passwd")], "h"),
        ([("d", "sym", "."), ("d/../../evil", "file", b"x")], "d/../../evil"),
        ([("a", "dir", ""), ("a/b", "sym", ".."), ("l", "sym", "a/b/../..")], "l"),  # escapes via a link
        ([("a", "sym", "."), ("a/x", "file", b"x")], "a/x"),  # written through a link
        ([("x", "file", b"1"), ("x", "file", b"2")], "x"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "link_up",
        "link_abs",
        "hardlink",
        "dotdot_after_link",
        "link_chain",
        "via_link",
        "twice",
    ],
)
def test_unsafe_members_are_refused(tmp_path, members, bad):
    arch, dest = tmp_path / "evil.tar.zst", tmp_path / "box" / "dest"
    _archive(arch, members)
    with pytest.raises(OpdcacheError, match=f"{re.escape(str(arch))}: unsafe member {re.escape(repr(bad))}"):
        unpack_run(arch, dest, progress=False)
    assert not dest.exists() and _no_staging(dest)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "box" / "evil").exists()


def test_pack_reads_under_a_shared_lock(run, tmp_path):
    with RunLock(run, "writer"):
        with pytest.raises(OpdcacheError, match="another opdcache process is writing this run"):
            pack_run(run, tmp_path / "x.tar.zst", progress=False)
    with RunLock(run, shared=True), RunLock(run, shared=True):  # readers share it
        with pytest.raises(OpdcacheError, match="another opdcache process is reading this run"):
            with RunLock(run):
                pass
    assert not (tmp_path / "x.tar.zst").exists()
