"""The engine's processes die with the command that started them (issue 44).

vLLM runs its engine core and workers as child processes. A ``kill -9`` of the command used to leave
them running (2.1 GB here, GPU memory on a GPU), and a Ctrl-C during the engine's start-up hung until a
second one. Before the first engine starts, :func:`guard` marks this process's environment
(``OPDCACHE_OWNER``, inherited by every descendant) and starts a small watcher (``python -m
opdcache.children``, its own session) that blocks on a pipe only this process holds. When the process
dies, however it dies, the pipe reaches end-of-file and the watcher kills every process that carries
the mark, then exits. On Ctrl-C the command itself calls :func:`reap` before it returns.

A mark in the environment, not a list of pids: a child started a moment before the kill, or re-parented
to init, is still found, and a pid reused by an unrelated process never is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

MARK = "OPDCACHE_OWNER"
_watcher: subprocess.Popen | None = None


def _own_mark() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def guard() -> None:
    """Mark this process's descendants and start the watcher (once per process)."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return
    mark = os.environ.get(MARK)
    if not mark or not mark.startswith(f"{os.getpid()}-"):  # inherited from a parent opdcache: our own
        mark = _own_mark()
        os.environ[MARK] = mark
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "opdcache.children", mark],
        stdin=subprocess.PIPE,  # the write end stays here only (not inheritable): EOF when we die
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to our process group does not reach it
        env={k: v for k, v in os.environ.items() if k != MARK},  # it must not kill itself
    )


def marked(mark: str) -> list[int]:
    """Pids of the processes (other than this one) whose environment carries ``mark``."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(MARK) == mark:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
    return found


def reap(mark: str | None = None, grace: float = 3.0) -> int:
    """SIGTERM every marked process, SIGKILL what is left after ``grace`` seconds; how many there were."""
    import psutil

    mark = mark or os.environ.get(MARK)
    if not mark:
        return 0
    procs = []
    for pid in marked(mark):
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)
    return len(procs)


def reap_own() -> int:
    """``reap`` of this process's own mark (not one inherited from an opdcache that started us)."""
    mark = os.environ.get(MARK, "")
    return reap(mark) if mark.startswith(f"{os.getpid()}-") else 0


def _watch(mark: str) -> None:
    """The watcher: wait for the owner's end (EOF on stdin), then reap its marked processes."""
    try:
        while sys.stdin.buffer.read(1 << 16):
            pass
    except OSError:
        pass
    reap(mark, grace=2.0)


if __name__ == "__main__":
    _watch(sys.argv[1])
