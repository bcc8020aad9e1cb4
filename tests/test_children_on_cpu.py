"""The engine's processes die with their command (issue 44): a watcher reaps every process carrying the
command's mark when the command dies, however it dies (opdcache/children.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, sys, time
    from opdcache.children import guard, reap_own

    def sleeper():
        time.sleep(600)

    if __name__ == "__main__":
        guard()
        ps = [mp.get_context("spawn").Process(target=sleeper) for _ in range(2)]
        for p in ps:
            p.start()
        print(" ".join(str(p.pid) for p in ps), flush=True)
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            reap_own()
            sys.exit(130)
    """
)


def gone(pids: list[int], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_children_die_with_their_command(tmp_path, how):
    script = tmp_path / "owner.py"
    script.write_text(SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        kids = [int(x) for x in p.stdout.readline().split()]
        assert len(kids) == 2 and all(psutil.pid_exists(k) for k in kids)
        p.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
        assert p.wait(timeout=30) == (-9 if how == "kill -9" else 130)
        assert gone(kids), f"children {kids} outlived their command ({how})"
        watcher = [
            q.pid
            for q in psutil.process_iter(["cmdline"])
            if f"opdcache.children {p.pid}-" in " ".join(q.info["cmdline"] or [])
        ]
        assert gone(watcher), "the watcher stayed behind"
    finally:
        if p.poll() is None:
            p.kill()
        for k in kids if "kids" in locals() else []:
            if psutil.pid_exists(k):
                os.kill(k, signal.SIGKILL)


# imported by every process of the test's command (the watcher included): the wall clock steps forward a
# second at every look at the boot time, as NTP may step it during a long run; psutil's create_time() adds it
STEPPED_CLOCK = textwrap.dedent(
    """
    import itertools, psutil._pslinux as L
    _n, _real = itertools.count(), L.boot_time
    L.boot_time = lambda: _real() + next(_n)
    """
)


def test_a_stepped_wall_clock_does_not_end_a_live_command(tmp_path):
    """The watcher must not take its owner for dead when the wall clock moves; it still reaps when the
    owner really dies."""
    script, site = tmp_path / "owner.py", tmp_path / "site"
    script.write_text(SCRIPT)
    site.mkdir()
    (site / "sitecustomize.py").write_text(STEPPED_CLOCK)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    )
    kids: list[int] = []
    try:
        kids = [int(x) for x in p.stdout.readline().split()]
        time.sleep(3)  # the watcher looks four times a second
        alive = [
            k for k in kids if psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE
        ]
        assert len(kids) == 2 and alive == kids, "the watcher killed the children of a live command"
        watcher = [
            q.pid
            for q in psutil.process_iter(["cmdline"])
            if f"opdcache.children {p.pid}-" in " ".join(q.info["cmdline"] or [])
        ]
        assert len(watcher) == 1 and p.poll() is None
        p.kill()
        p.wait(timeout=30)
        assert gone(kids), "children outlived their command"
        assert gone(watcher), "the watcher stayed behind"
    finally:
        if p.poll() is None:
            p.kill()
        for k in kids:
            if psutil.pid_exists(k):
                os.kill(k, signal.SIGKILL)


SWALLOWER = textwrap.dedent(
    """
    import sys, threading
    from opdcache.children import interruptible

    def start_up():  # what vLLM's start-up does: swallow the Ctrl-C, then wait on a reply that never comes
        try:
            threading.Event().wait(2)
        except KeyboardInterrupt:
            pass
        threading.Event().wait()

    if __name__ == "__main__":
        print("ready", flush=True)
        try:
            with interruptible(every=0.2):
                start_up()
        except KeyboardInterrupt:
            sys.exit(130)
    """
)


def test_a_swallowed_ctrl_c_still_ends_the_command(tmp_path):
    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWER)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 130
    finally:
        if p.poll() is None:
            p.kill()


def descendants(owner: int) -> list[psutil.Process]:
    try:
        return psutil.Process(owner).children(recursive=True)
    except psutil.Error:
        return []


def name(q: psutil.Process) -> str:
    try:
        return q.name()
    except psutil.Error:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        "kill -9 while rolling out",
        "Ctrl-C during engine start-up",
    ],
)
def test_a_killed_rollout_leaves_no_engine(tiny_overrides, tmp_path, how):
    """The real `opdcache rollout`: vLLM's EngineCore and workers go with the command."""
    run = tmp_path / "run"
    exe = [sys.executable, "-m", "opdcache.cli"]
    subprocess.run([*exe, "init", str(run), *sum((["--set", o] for o in tiny_overrides), [])], check=True)
    p = subprocess.Popen(  # its own process group, as a shell job: Ctrl-C reaches the whole group
        [*exe, "rollout", str(run), "--round", "0", "--quiet"], stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        end, engine = time.monotonic() + 240, []
        while time.monotonic() < end and p.poll() is None:
            engine = [q for q in descendants(p.pid) if "EngineCor" in name(q)]  # comm: 15 chars
            if engine:
                break
            time.sleep(0.1)
        assert engine, "the engine never started"
        marked = descendants(p.pid)
        if how.startswith("kill"):
            time.sleep(5)  # the workers are up, the rollout running
            marked = descendants(p.pid)
            p.kill()
        else:
            os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does; the engine is still starting
        rc = p.wait(timeout=60)
        assert rc == (-9 if how.startswith("kill") else 130), p.stderr.read()[-2000:]
        assert gone([q.pid for q in marked], timeout=30), f"{how}: {[name(q) for q in marked]} left running"
    finally:
        if p.poll() is None:
            p.kill()
        for q in marked if "marked" in locals() else []:
            if q.is_running():
                q.kill()
