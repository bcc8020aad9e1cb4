"""The engine's processes die with the command that started them (issue 44).

vLLM runs its engine core and workers as child processes. A ``kill -9`` of the command used to leave
them running (2.1 GB here, GPU memory on a GPU), and a Ctrl-C during the engine's start-up hung until a
second one (now :func:`interruptible` around the start). Before the first engine starts, :func:`guard` marks this process's environment
(``OPDCACHE_OWNER``, inherited by every descendant) and starts a small watcher (``python -m
opdcache.children``, its own session) that blocks on a pipe only this process holds. When the process
dies, however it dies, the pipe reaches end-of-file and the watcher kills every process that carries
the mark, then exits. On Ctrl-C the command itself calls :func:`reap` before it returns.

The watcher also notes the command's descendants four times a second: vLLM retitles its processes
(setproctitle), which hides the environment /proc shows. Pids are checked against their start time,
so a reused pid is never killed (psutil's ``is_running``: the start time in ticks since boot, which a
wall-clock step cannot move).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def interruptible(every: float = 1.0) -> Iterator[None]:
    """A Ctrl-C inside the block reaches the caller as ``KeyboardInterrupt``, even through code that
    swallows it. vLLM's start-up does (``zmq_socket_ctx`` catches ``KeyboardInterrupt``), and its engine
    core, which got the same Ctrl-C, is gone, so ``LLM(...)`` then waits forever on a reply (measured:
    the command hung until a second Ctrl-C). Once interrupted, SIGINT is re-sent every ``every`` seconds
    until the block is left; one that finished regardless raises at its end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    interrupted, left = threading.Event(), threading.Event()

    def on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    def resend() -> None:
        while not left.wait(every):
            if interrupted.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    threading.Thread(target=resend, name="opdcache-interruptible", daemon=True).start()
    try:
        yield
        if interrupted.is_set():
            raise KeyboardInterrupt
    finally:
        left.set()
        signal.signal(signal.SIGINT, previous)


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


def end(procs: list, grace: float) -> int:
    """SIGTERM ``procs`` (psutil processes), SIGKILL what is left after ``grace`` seconds; how many."""
    import psutil

    sent = []
    for p in procs:
        try:
            p.terminate()
            sent.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(sent, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)
    return len(sent)


def reap(mark: str | None = None, grace: float = 3.0) -> int:
    """``end`` every process carrying ``mark``; how many there were."""
    import psutil

    mark = mark or os.environ.get(MARK)
    if not mark:
        return 0
    procs = []
    for pid in marked(mark):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return end(procs, grace)


def reap_own() -> int:
    """``reap`` of this process's own mark (not one inherited from an opdcache that started us)."""
    mark = os.environ.get(MARK, "")
    return reap(mark) if mark.startswith(f"{os.getpid()}-") else 0


def _watch(mark: str, every: float = 0.25) -> None:
    """The watcher: until the owner's end (its pid gone, or EOF on stdin), note the owner's descendants
    every ``every`` seconds; then reap them and every process still carrying the mark. Both, because
    vLLM retitles its processes (setproctitle), which hides the environment /proc shows; and the pid is
    polled, not only the pipe, because a child the owner forks without exec keeps the pipe open."""
    import select

    import psutil

    owner = int(mark.split("-", 1)[0])
    try:
        o = psutil.Process(owner)
    except psutil.Error:
        o = None
    # is_running compares a pid's start time in clock ticks since boot. create_time() adds the boot time,
    # which moves when the wall clock is stepped, so comparing create_time() values took a live owner for
    # a dead one and killed its engine mid-run (tests/test_children_on_cpu.py steps the clock)
    seen: dict[int, psutil.Process] = {}
    while o is not None:
        try:
            if not o.is_running() or o.status() == psutil.STATUS_ZOMBIE:
                break
            kids = o.children(recursive=True)
        except psutil.NoSuchProcess:
            break  # the owner is gone
        except psutil.Error:
            kids = []  # a child went while we looked: next time
        for q in kids:
            if q.pid != os.getpid():  # this watcher is the owner's child too
                seen.setdefault(q.pid, q)
        ready, _, _ = select.select([sys.stdin], [], [], every)
        if ready and not os.read(sys.stdin.fileno(), 1 << 16):
            break  # the pipe closed: the owner ended
    procs = []
    for q in seen.values():
        try:
            if q.is_running():  # not a reused pid
                procs += [c for c in [q, *q.children(recursive=True)] if c.pid != os.getpid()]
        except psutil.Error:
            continue
    end(procs, grace=2.0)
    reap(mark, grace=2.0)


if __name__ == "__main__":
    _watch(sys.argv[1])
