"""One writer per run directory; a lock left by a killed process is detected and taken over."""

import os
import signal
import subprocess
import sys
import time

import pytest

from opdcache.cli import main
from opdcache.config import RunConfig, write_run_config
from opdcache.errors import OpdcacheError
from opdcache.lock import RunLock
from opdcache.rundir import RunDir

HOLD = "import sys, time; from opdcache.lock import RunLock\nwith RunLock(sys.argv[1], 'holder'):\n    print('locked', flush=True); time.sleep(60)\n"


def _holder(run):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_gets_a_clear_error(tmp_path, capsys):
    p = _holder(tmp_path)
    try:
        with pytest.raises(OpdcacheError, match=f"pid {p.pid} on .*'holder'"):
            with RunLock(tmp_path):
                pass
        assert main(["synth", str(tmp_path), "--rounds", "1"]) == 2
        assert "another opdcache process is writing this run" in capsys.readouterr().err
        assert not (tmp_path / "cache").exists()
        write_run_config(RunDir(tmp_path), RunConfig())  # a run (config.yaml) to read
        assert main(["query", str(tmp_path), "select 1"]) == 0  # readers are not blocked
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_killed_process_is_detected(tmp_path, capsys):
    p = _holder(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with RunLock(tmp_path) as lock:
        assert lock.stale["pid"] == p.pid
    assert "stale lock of pid" in capsys.readouterr().err
    with RunLock(tmp_path) as lock:  # a clean exit leaves nothing stale behind
        assert lock.stale is None


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    p = _holder(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        with RunLock(tmp_path):
            time.sleep(0)
    finally:
        p.kill()
        p.wait()
