"""``opdcache pack`` / ``unpack``: a run directory as one streamed ``.tar.zst``, checked on arrival.

pack    streams the selected components (:meth:`RunDir.components`; default: all but
        :meth:`RunDir.is_local_only`) through tar and zstd into a hidden file beside OUT, renamed into
        place at the end, under a shared run lock. Symlinks stay symlinks; none may leave the run.
unpack  streams the archive into DEST.parent/.DEST.unpacking-<pid>, refusing unsafe members, checks
        every Parquet part against its integrity record, and only then renames the staging
        directory to DEST. The zstd frame's checksum and end are checked too, so a flipped byte or a
        truncated archive is one error, never a half-unpacked run.

Neither direction holds more than a few MB of the run in memory.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import zstandard
from tqdm.auto import tqdm

from opdcache.budget import BudgetController
from opdcache.cache.shards import check_manifest, check_run_parts
from opdcache.errors import OpdcacheError
from opdcache.lock import RunLock
from opdcache.results import PackResult, UnpackResult
from opdcache.rundir import RunDir, remove_dead_leftovers, temp_path_for

CHUNK = 1 << 20  # tar record buffer, copy buffer and compressed read size
ZSTD_LEVEL = 3  # Parquet parts are zstd already; higher levels cost time and save little


class _Damaged(Exception):
    """The compressed stream is cut short or carries trailing data."""


class _ChecksumMismatch(Exception):
    """Every member was read, but the zstd frame's checksum says some byte of them changed."""


def pack_run(
    run: RunDir,
    out: str | os.PathLike,
    only: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> PackResult:
    """Write the ``only`` components of ``run`` (default: all but local-only files) to ``out``."""
    run.require()
    out = Path(out).absolute()
    if out.resolve().is_relative_to(run.root):
        raise OpdcacheError(f"{out}: inside the run it would pack; write the archive elsewhere")
    if out.is_dir():
        raise OpdcacheError(f"{out}: is a directory; name the archive file, e.g. run.tar.zst")
    if out.exists() and not force:
        raise OpdcacheError(f"{out}: exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out.parent, f".{out.name}.", ".tmp")
    with RunLock(run, shared=True):
        top = run.select(only)
        entries = [e for path in top for e in _walk(run, path)]
        _check_run(run, [p for p, st in entries if stat.S_ISREG(st.st_mode)], progress)
        total = sum(st.st_size for _, st in entries if stat.S_ISREG(st.st_mode))
        tmp = temp_path_for(out)
        t0 = time.perf_counter()
        try:
            with (
                open(tmp, "wb") as raw,
                tqdm(total=total, unit="B", unit_scale=True, desc="pack", disable=not progress) as bar,
            ):
                cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=-1)
                with (
                    cctx.stream_writer(raw, closefd=False) as zw,
                    tarfile.open(fileobj=zw, mode="w|", bufsize=CHUNK, copybufsize=CHUNK) as tar,
                ):
                    for path, st in entries:
                        info = _tarinfo(run, path, st)
                        if info.isreg():
                            with path.open("rb") as f:
                                tar.addfile(info, _Counted(f, bar))
                        else:
                            tar.addfile(info)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return PackResult(
        archive=str(out),
        components=[p.name for p in top],
        files=sum(stat.S_ISREG(st.st_mode) for _, st in entries),
        bytes=total,
        archive_bytes=out.stat().st_size,
        seconds=time.perf_counter() - t0,
    )


def unpack_run(archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> UnpackResult:
    """Unpack ``archive`` into the new run directory ``dest``: all of it, checked, or nothing."""
    archive, dest = Path(archive), Path(dest).absolute()
    if not archive.is_file():
        raise OpdcacheError(f"{archive}: no such archive")
    with archive.open("rb") as f:
        magic = f.read(4)
    if magic != b"\x28\xb5\x2f\xfd":  # every zstd frame starts with it
        kind = {b"\x1f\x8b": "a gzip file", b"PK": "a zip file"}.get(magic[:2], "not a zstd file")
        raise OpdcacheError(f"{archive}: {kind}; expected a .tar.zst written by opdcache pack")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OpdcacheError(f"{dest}: exists and is not empty; unpack into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    parent = Path(os.path.realpath(dest.parent))
    remove_dead_leftovers(parent, f".{dest.name}.unpacking-", "")
    staging = parent / f".{dest.name}.unpacking-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    t0 = time.perf_counter()
    try:
        try:
            files, nbytes = _extract(archive, staging, progress)
            mismatch = None
        except _ChecksumMismatch as e:
            mismatch = e
        t1 = time.perf_counter()
        parts = _check_parts(archive, staging, progress)  # names the member if it is a Parquet part
        if not RunDir(staging).is_run():
            raise OpdcacheError(
                f"{archive}: holds no opdcache run (no config.yaml or cache/ at its top); expected a "
                ".tar.zst written by opdcache pack; nothing was unpacked"
            )
        if mismatch:
            raise OpdcacheError(
                f"{archive}: damaged ({mismatch}) in a member other than its {parts} Parquet parts, "
                "which match their records; nothing was unpacked"
            )
        if (staging / "budget.json").exists():
            try:
                BudgetController(staging)
            except OpdcacheError as e:
                why = str(e).removeprefix(f"{staging / 'budget.json'}: ")
                raise OpdcacheError(f"{archive}: member budget.json: {why}; nothing was unpacked") from None
        os.replace(staging, dest)  # over an empty DEST too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    t2 = time.perf_counter()
    return UnpackResult(
        archive=str(archive),
        dest=str(dest),
        files=files,
        bytes=nbytes,
        parts_checked=parts,
        seconds=t2 - t0,
        check_seconds=t2 - t1,
    )


def _walk(run: RunDir, path: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """``path`` and everything under it (links not followed), by name, but what is local-only."""
    if run.is_local_only(path):
        return
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        if not _link_inside(path.relative_to(run.root).as_posix(), target):
            raise OpdcacheError(
                f"{path}: links outside the run (to {target}); the archive would not be whole"
            )
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OpdcacheError(f"{path}: neither a file, a directory nor a link; cannot pack it")
    yield path, st
    if stat.S_ISDIR(st.st_mode):
        for child in sorted(path.iterdir()):
            yield from _walk(run, child)


def _tarinfo(run: RunDir, path: Path, st: os.stat_result) -> tarfile.TarInfo:
    """A member from ``lstat`` alone: no owners, no hard links, so any user can unpack it."""
    info = tarfile.TarInfo(path.relative_to(run.root).as_posix())
    info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    else:
        info.size = st.st_size
    return info


def _link_inside(name: str, target: str) -> bool:
    """Whether a link at archive path ``name`` to ``target`` stays inside the archive's root."""
    if posixpath.isabs(target):
        return False
    full = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return full != ".." and not full.startswith("../")


def _extract(archive: Path, staging: Path, progress: bool) -> tuple[int, int]:
    """Stream every member of ``archive`` into ``staging``; returns (files, bytes)."""
    files = nbytes = 0
    current = last = None  # the member being written, the last one finished
    links: list[Path] = []
    with (
        archive.open("rb") as raw,
        tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, desc="unpack", disable=not progress
        ) as bar,
    ):
        stream = _ZstdReader(raw, bar)
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                for member in tar:
                    current, target = member.name, _target(archive, staging, member)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.issym():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.symlink(member.linkname, target)
                        links.append(target)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tar.extractfile(member)
                        assert src is not None
                        with open(target, "xb") as f:
                            shutil.copyfileobj(src, f, CHUNK)
                            f.flush()
                            os.fsync(f.fileno())
                        os.chmod(target, (member.mode & 0o755) | 0o600)
                        os.utime(target, (member.mtime, member.mtime))
                        files, nbytes = files + 1, nbytes + member.size
                    current, last = None, member.name
            stream.finish()
        except (tarfile.TarError, zstandard.ZstdError, EOFError, _Damaged) as e:
            if isinstance(e, zstandard.ZstdError) and "checksum" in str(e) and current is None:
                raise _ChecksumMismatch(str(e)) from None  # the checksum comes last: all is unpacked
            where = f"in member {current}" if current else f"after member {last}" if last else "at its start"
            if isinstance(e, zstandard.ZstdError) and (current or last):  # found a chunk ahead of the reader
                where = f"at or after member {current or last}"
            raise OpdcacheError(f"{archive}: damaged {where} ({e}); nothing was unpacked") from None
    for link in links:  # a chain of links that each stay inside can still point out
        if not Path(os.path.realpath(link)).is_relative_to(staging):
            _unsafe(archive, link.relative_to(staging).as_posix(), "resolves outside the archive")
    return files, nbytes


def _target(archive: Path, staging: Path, member: tarfile.TarInfo) -> Path:
    """Where ``member`` goes under ``staging``; refuses anything that could land elsewhere."""
    name = member.name
    parts = PurePosixPath(name).parts
    if not parts and member.isdir():
        return staging  # "./"
    if not parts or posixpath.isabs(name) or ".." in parts:
        _unsafe(archive, name, "an absolute path or one with '..'")
    if not (member.isreg() or member.isdir() or member.issym()):
        _unsafe(archive, name, "a hard link or special file")
    if member.issym() and not _link_inside(name, member.linkname):
        _unsafe(archive, name, f"links outside the archive (to {member.linkname})")
    target = staging.joinpath(*parts)
    if os.path.realpath(target.parent) != str(target.parent):
        _unsafe(archive, name, "lies under a link")
    if os.path.lexists(target) and not (member.isdir() and target.is_dir() and not target.is_symlink()):
        _unsafe(archive, name, "appears twice")
    return target


def _unsafe(archive: Path, name: str, why: str) -> None:
    raise OpdcacheError(f"{archive}: unsafe member {name!r} ({why}); nothing was unpacked")


def _all_parts(run: RunDir) -> list[Path]:
    """The Parquet parts of ``run`` and of its replays (a replay's cache linked to the run's: once)."""
    return [
        path
        for sub in (run, *run.replay_runs())
        for kind, _, path in sub.parts()
        if sub == run or kind != "cache" or not sub.cache.is_symlink()
    ]


def _check_bytes(parts: list[Path], progress: bool, member: Callable[[Path, str], str] | None = None) -> None:
    """Each of ``parts`` against its integrity record, sha256 included, with a progress bar; with
    ``member``, a failure is reported as ``member(part, why)`` (an archive's member)."""
    with tqdm(
        total=sum(p.stat().st_size for p in parts),
        unit="B",
        unit_scale=True,
        desc="check",
        disable=not progress,
    ) as bar:
        for p in parts:
            try:
                check_manifest(p, full=True)
            except OpdcacheError as e:
                if member is None:
                    raise
                raise OpdcacheError(member(p, str(e).removeprefix(f"{p}: "))) from None
            bar.update(p.stat().st_size)


def _check_run(run: RunDir, files: list[Path], progress: bool) -> None:
    """Before a byte is written: the run's parts are whole (no lost or foreign part), the ``files`` to
    pack that are Parquet parts match their records byte for byte (sha256), and the budget state
    parses, so an archive never carries damage that ``unpack`` would refuse."""
    check_run_parts(run)
    if run.budget.exists():
        BudgetController(run)
    chosen = set(files)
    _check_bytes([p for p in _all_parts(run) if p in chosen], progress)


def _check_parts(archive: Path, staging: Path, progress: bool) -> int:
    """Every Parquet part of the unpacked run (and its replays) against its integrity record."""
    parts = _all_parts(RunDir(staging))
    _check_bytes(
        parts,
        progress,
        lambda p, why: f"{archive}: member {p.relative_to(staging).as_posix()}: {why}; nothing was unpacked",
    )
    return len(parts)


class _Counted:
    """A file whose reads advance a progress bar."""

    def __init__(self, f: BinaryIO, bar: tqdm):
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


class _ZstdReader:
    """The decompressed bytes of a one-frame zstd file; the frame must end exactly at the file's end.

    The file's last 4 bytes (the frame's checksum) are fed alone, so that all data is out before a
    mismatch is raised."""

    def __init__(self, raw: BinaryIO, bar: tqdm):
        self.raw, self.bar = raw, bar
        self.left = os.fstat(raw.fileno()).st_size
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.buf, self.pos = b"", 0

    def read(self, n: int = -1) -> bytes:
        while self.pos >= len(self.buf):
            if self.dobj.eof:
                return b""
            chunk = self.raw.read(min(CHUNK, self.left - 4) if self.left > 4 else self.left)
            self.left -= len(chunk)
            if not chunk:
                raise _Damaged("the compressed stream ends early: truncated")
            self.bar.update(len(chunk))
            self.buf, self.pos = self.dobj.decompress(chunk), 0
        end = len(self.buf) if n is None or n < 0 else self.pos + n
        out = self.buf[self.pos : end]
        self.pos += len(out)
        return out

    def finish(self) -> None:
        """Read to the frame's end (which checks its checksum); only tar padding may be left, and
        nothing may follow the frame."""
        while chunk := self.read(CHUNK):
            if chunk.count(0) != len(chunk):  # tarfile ends quietly at a header it cannot read
                raise _Damaged("an unreadable tar header follows")
        if self.dobj.unused_data or self.raw.read(1):
            raise _Damaged("data after the end of the compressed stream")
