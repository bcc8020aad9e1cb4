"""One writer per run directory: an advisory ``flock`` on RUN/.lock holding the owner's pid and host.

The kernel drops a flock when its process dies (even on kill -9), so a lock can never outlive its
holder on a local filesystem; the file's contents then tell the next process whose lock it was,
and that it was stale. Under a launcher (torchrun) only rank 0 takes the lock, except for the
workers of a sharded stage (shard.py), which all hold it shared under one job key: workers of the
same stage, round and worker count are admitted together, any other writer is refused. A reader
that needs a still run (``opdcache pack``) takes it shared: writers are refused meanwhile, other
readers not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir


class RunLock:
    """The run lock: exclusive for one writer; shared by the workers of one sharded stage (``job``:
    its stage, round and worker count, ``Shard.job``); shared by readers (``shared``)."""

    def __init__(
        self, run: RunDir | str | Path, command: str = "", shared: bool = False, job: str | None = None
    ):
        rd = RunDir.of(run)
        self.path, self.gate = rd.lock, rd.lock_gate
        self.command = command or " ".join(sys.argv)
        self.shared = shared  # a reader: many may hold it; it writes no record
        self.job = job
        self.fd: int | None = None
        self.stale: dict | None = None  # the previous holder's record, if it died holding the lock

    def __enter__(self) -> RunLock:
        if self.job is None and int(os.environ.get("RANK", "0")) != 0 or not self.path.parent.is_dir():
            return self  # nothing to protect yet; commands that create a run make its directory first
        fd = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if self.shared or self.job:
                self._join(fd)
            else:
                self._take(fd)
        except OSError as e:  # the lock (or its gate) cannot be made: a run this user cannot write to
            if fd is not None:
                os.close(fd)
            if not self.shared:
                raise OpdcacheError(
                    f"{self.path.parent}: not writable ({e.strerror} on {Path(e.filename or self.path).name}); "
                    "this command writes into the run"
                ) from None
            return self  # a read-only copy: read it unlocked
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self.fd = fd
        if self.stale:
            print(
                f"opdcache: note: stale lock of pid {self.stale.get('pid')} on {self.stale.get('host')} "
                f"({self.stale.get('command')!r}) taken over; that process is gone",
                file=sys.stderr,
            )
        return self

    def _take(self, fd: int) -> None:
        """One writer: exclusive."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(_read(fd))
        self._write_record(fd)

    def _join(self, fd: int) -> None:
        """A reader, or a worker of a sharded stage: shared with its own kind only. Under the gate, an
        exclusive try tells whether anyone holds the lock; the record tells who."""
        with _flocked(self.gate):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            holder = _read(fd)
            if alone:
                if self.job:
                    self._write_record(fd)
                else:  # a reader clears a dead writer's record (there is no holder now)
                    self.stale = holder if holder.get("pid") else None
                    os.ftruncate(fd, 0)
            elif holder.get("job", "") != (self.job or ""):  # a writer, another job, or readers vs a job
                self._refuse(holder)
            try:  # flock converts by dropping then re-taking: a writer may slip in between
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(_read(fd))

    def _write_record(self, fd: int) -> None:
        previous = _read(fd)
        if previous.get("pid"):
            self.stale = previous  # a holder that released by dying: its record was never cleared
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
            **({"job": self.job} if self.job else {}),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)

    def _refuse(self, holder: dict) -> None:
        where = self.path.parent
        if not holder.get("pid"):  # readers leave no record
            raise OpdcacheError(
                f"{where}: another opdcache process is reading this run (opdcache pack); wait for it to finish"
            )
        who = f"the workers of {holder['job']!r}, e.g. " if holder.get("job") else ""
        raise OpdcacheError(
            f"{where}: another opdcache process is writing this run ({who}pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')}: {holder.get('command')!r}); wait for it to finish"
        )

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is None:
            return
        if self.job:
            with _flocked(self.gate):
                try:  # the last worker out clears the record
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.ftruncate(self.fd, 0)
                except BlockingIOError:
                    pass
        elif not self.shared:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no record, so a record means a crash
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """A short exclusive hold of ``path`` (blocking: holders keep it for a few system calls)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
