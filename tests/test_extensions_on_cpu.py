"""A dead process's lock on a JIT-built extension is removed; a live one is waited for."""

import os
import threading
import time

from opdcache.train.extensions import clear_stale_locks


def _ext(root, name, built, age):
    d = root / name
    d.mkdir(parents=True)
    if built:
        (d / f"{name}.so").write_bytes(b"\0")
    lock = d / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_stale_locks_go_live_ones_are_waited_for(tmp_path, capsys):
    stale_built = _ext(tmp_path, "a", built=True, age=300)  # a loader holds it for a moment, not 5 min
    stale_any = _ext(tmp_path, "b", built=False, age=2000)  # no build takes half an hour
    live = _ext(tmp_path, "c", built=False, age=5)  # a build in progress
    threading.Timer(0.5, live.unlink).start()  # ... that finishes
    t0 = time.perf_counter()
    removed = clear_stale_locks(tmp_path, build_seconds=120, max_seconds=900, poll=0.05)
    assert removed == [stale_built, stale_any] and not live.exists()
    assert time.perf_counter() - t0 >= 0.4  # it waited for the live one instead of removing it
    assert "stale lock" in capsys.readouterr().err
