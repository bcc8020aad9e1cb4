"""One writer per run directory: an advisory ``flock`` on RUN/.lock holding the owner's pid and host.

The kernel drops a flock when its process dies (even on kill -9), so a lock can never outlive its
holder on a local filesystem; the file's contents then tell the next process whose lock it was,
and that it was stale. Under a launcher (torchrun) only rank 0 takes the lock. A reader that needs
a still run (``opdcache pack``) takes it shared: writers are refused meanwhile, other readers not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir


class RunLock:
    def __init__(self, run: RunDir | str | Path, command: str = "", shared: bool = False):
        self.path = RunDir.of(run).lock
        self.command = command or " ".join(sys.argv)
        self.shared = shared  # a reader: many may hold it; it writes no record
        self.fd: int | None = None
        self.stale: dict | None = None  # the previous holder's record, if it died holding the lock

    def __enter__(self) -> RunLock:
        if int(os.environ.get("RANK", "0")) != 0 or not self.path.parent.is_dir():
            return self  # nothing to protect yet; commands that create a run make its directory first
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if not self.shared:
                raise
            return self  # a run this user cannot write to (a read-only copy): read it unlocked
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if not holder.get("pid"):  # readers leave no record
                raise OpdcacheError(
                    f"{self.path.parent}: another opdcache process is reading this run (opdcache pack); "
                    "wait for it to finish"
                ) from None
            raise OpdcacheError(
                f"{self.path.parent}: another opdcache process is writing this run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('since')}: {holder.get('command')!r}); wait for it to finish"
            ) from None
        if self.shared:
            self.fd = fd
            return self
        previous = _read(fd)
        if previous.get("pid"):
            self.stale = previous  # a holder that released by dying: its record was never cleared
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        if self.stale:
            print(
                f"opdcache: note: stale lock of pid {self.stale.get('pid')} on {self.stale.get('host')} "
                f"({self.stale.get('command')!r}) taken over; that process is gone",
                file=sys.stderr,
            )
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is not None:
            if not self.shared:
                os.ftruncate(self.fd, 0)  # a clean exit leaves no record, so a record means a crash
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
